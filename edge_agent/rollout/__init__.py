"""The operator side of fleet rollouts (issue 12): docker-free, run inside edge-bridge.

- ``spec``: the rollout spec an operator posts, validated field by field;
- ``plan``: the pure decision logic (record + what the bridge knows -> new record +
  actions);
- ``store``: one JSON file per rollout, written atomically, and the controller lock;
- ``desired``: the retained desired tags (device, group, fleet) as the bridge sees them;
- ``controller``: the loop in the bridge that feeds ``plan`` and publishes its actions.
"""
