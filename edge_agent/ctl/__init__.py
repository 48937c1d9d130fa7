"""``edge-ctl``: the operator's command line for a fleet, over MQTT."""
