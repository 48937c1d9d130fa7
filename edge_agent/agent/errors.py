"""The agent's errors. Docker and registry failures are translated into these classes
once, at the module that talks to the outside system (``engine``, ``registry``,
``store``), so the rest of the agent never sees a ``docker.errors`` or ``urllib``
exception. A file that cannot be read or written is ``files.StorageError``, shared with
the bridge's rollout records."""

from edge_agent.protocol.errors import EdgeAgentError


class RunConfigError(EdgeAgentError):
    """``docker_config.json`` is unreadable or holds arguments Docker rejects."""


class DockerUnavailable(EdgeAgentError):
    """The Docker daemon cannot be reached or failed in a way worth retrying."""


class DockerOperationError(EdgeAgentError):
    """The daemon answered, but refused an operation."""


class RegistryError(EdgeAgentError):
    """The registry could not answer the question (network, auth, server)."""


class ManifestUnknown(RegistryError):
    """The registry says the tag or digest does not exist."""


class InsufficientSpace(EdgeAgentError):
    """An update's pull would not fit on Docker's data root: refused before pulling."""

    def __init__(self, message: str, *, tag: str, needed: int, free: int, path: str) -> None:
        super().__init__(message)
        self.tag = tag
        self.needed = needed
        self.free = free
        self.path = path


class SignatureRefused(EdgeAgentError):
    """TRUSTED_KEYS is set and the image about to run has no valid signature by one of
    them: refused before anything is pulled or stopped."""

    def __init__(self, message: str, *, tag: str, digest: str | None) -> None:
        super().__init__(message)
        self.tag = tag
        self.digest = digest
