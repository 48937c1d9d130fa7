"""The wire contract shared by the agent, the bridge and edge-ctl.

Docker-free, and it imports nothing from the programs above it."""
