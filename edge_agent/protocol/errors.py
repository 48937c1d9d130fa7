"""The error root of all three programs, and the errors of the shared contract.

Each program translates failures of the outside systems it talks to into subclasses of
``EdgeAgentError`` once, where it talks to them (the agent's are in
``edge_agent/agent/errors.py``).
"""


class EdgeAgentError(Exception):
    """Root of every error the agent raises on purpose."""


class ConfigError(EdgeAgentError):
    """A setting is missing or invalid; the agent refuses to start."""


class TagError(EdgeAgentError):
    """A tag or a desired-tag payload is not acceptable."""
