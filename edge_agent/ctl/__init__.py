"""``edge-ctl``: the operator's command line for a fleet, over MQTT.

Read it in this order:

- ``cli.py``: the argument parser, the broker settings, ``main`` (errors to exit codes)
- ``commands.py``: one function per subcommand (devices, set-tag, clear-tag, check and
  install, watch)
- ``waiting.py``: ``set-tag --wait``, waiting for the device's answer and reporting it
- ``session.py``: the MQTT session (the shared ``protocol.mqtt.BrokerClient``) and the
  bounded decoding of a device's message
- ``render.py``: device data as terminal-safe text, the fleet table, the ``Printer``
- ``errors.py``: the exit codes and ``CtlError``

It stands on ``edge_agent.protocol`` only (topics, tags, timestamps, events, the answer
judge, the MQTT layer): no docker-py, nothing of the agent or the bridge.
"""
