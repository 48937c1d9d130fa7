"""edge-agent: keeps one Docker container on a device at the tag the fleet wants."""

__version__ = "0.1.0"
