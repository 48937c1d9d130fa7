"""``edge-bridge``: set desired tags over HTTP, read the fleet's state, serve the fleet page.

The bridge is an MQTT client like any operator tool: it publishes the retained
desired-tag topics (docs/PROTOCOL.md) and keeps a device registry from the retained
``state`` and ``availability`` topics (``fleet.Fleet``, every field checked by
``device_data``). ``server`` serves the HTTP API (``api``) with a small strict HTTP/1.1
server of its own (``wire``), standard library only.
"""
