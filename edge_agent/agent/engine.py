"""The one module that talks to the Docker daemon.

Every docker-py call goes through ``Engine`` and every docker-py or requests error
is translated here into the agent's own errors, so callers never import docker.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import docker
import requests
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import (  # type: ignore[attr-defined]
    Container,
    _create_container_args,  # the converter containers.run uses; no public twin
)

from edge_agent.agent.errors import (
    DockerOperationError,
    DockerUnavailable,
    ManifestUnknown,
    RunConfigError,
)
from edge_agent.agent.reconcile import PullProgress

log = logging.getLogger(__name__)

LABEL_MANAGED = "io.edge-agent.managed"
LABEL_TAG = "io.edge-agent.tag"
LABEL_DIGEST = "io.edge-agent.digest"
LABEL_CONFIG = "io.edge-agent.config"


@dataclass(frozen=True)
class ContainerInfo:
    """A snapshot of one container, as far as the agent cares."""

    id: str
    name: str
    image_id: str
    image_ref: str
    labels: dict[str, str]
    status: str
    health: str | None
    has_healthcheck: bool
    started_at: str | None
    restart_count: int
    exit_code: int

    @property
    def running(self) -> bool:
        return self.status == "running"

    @property
    def tag(self) -> str | None:
        """The tag the agent created it for, or the tag in its image reference."""
        if LABEL_TAG in self.labels:
            return self.labels[LABEL_TAG]
        ref = self.image_ref.rsplit("/", 1)[-1]
        return ref.split(":", 1)[1] if ":" in ref and "@" not in ref else None

    @property
    def config_digest(self) -> str | None:
        return self.labels.get(LABEL_CONFIG)


@dataclass(frozen=True)
class ImageInfo:
    """A local image: its id and the registry digests it is known by."""

    id: str
    repo_digests: tuple[str, ...]
    tags: tuple[str, ...]

    def digests_for(self, repository: str) -> set[str]:
        """Registry digests of this image within ``repository``."""
        return {
            ref.split("@", 1)[1] for ref in self.repo_digests if ref.split("@", 1)[0] == repository
        }


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn docker-py and transport errors into agent errors, once, here."""
    try:
        yield
    except APIError as exc:
        explanation = exc.explanation or str(exc)
        if exc.status_code is not None and exc.status_code >= 500 and (
            "manifest unknown" in explanation or "not found" in explanation
        ):
            raise ManifestUnknown(f"{action}: {explanation}") from None
        if exc.status_code == 404 and "manifest" in explanation:
            raise ManifestUnknown(f"{action}: {explanation}") from None
        if exc.status_code is not None and exc.status_code >= 500:
            raise DockerUnavailable(f"{action}: {explanation}") from None
        raise DockerOperationError(f"{action}: {explanation}") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        reason = type(exc).__name__
        raise DockerUnavailable(f"{action}: Docker daemon unreachable ({reason})") from None
    except DockerException as exc:
        raise DockerUnavailable(f"{action}: {exc}") from None


class Engine:
    """Docker operations on the managed container and its images."""

    def __init__(self, client: docker.DockerClient) -> None:
        self._client = client

    @classmethod
    def connect(cls, timeout_s: float = 30.0) -> Engine:
        """Connect to the daemon from the environment, negotiating the API version."""
        with _translated("connect to Docker"):
            client = docker.from_env(version="auto", timeout=int(timeout_s))
        return cls(client)

    def close(self) -> None:
        self._client.close()

    def ping(self) -> None:
        with _translated("ping"):
            self._client.ping()

    # -- containers -------------------------------------------------------------
    def container(self, name_or_id: str) -> ContainerInfo | None:
        """Inspect a container by exact name or id; None when it does not exist."""
        with _translated(f"inspect container {name_or_id}"):
            try:
                container = self._client.containers.get(name_or_id)
            except NotFound:
                return None
        return _container_info(container)

    def validate_run_kwargs(self, kwargs: dict[str, Any]) -> None:
        """Fail fast: convert the kwargs the way ``containers.run`` would, without a request.

        docker-py reports malformed values as TypeError, ValueError or AttributeError
        from deep inside its converters; they all mean the same to an operator.
        """
        trial = {**kwargs, "image": "validation", "version": self._client.api.api_version}
        try:
            _create_container_args(trial)
        except (TypeError, ValueError, AttributeError, KeyError, DockerException) as exc:
            raise RunConfigError(f"docker_config.json: invalid containers.run arguments: "
                                 f"{type(exc).__name__}: {exc}") from None

    def create(
        self, image: str, name: str, kwargs: dict[str, Any], labels: dict[str, str]
    ) -> str:
        """Create (not start) a container; bad run arguments raise RunConfigError."""
        run_kwargs = dict(kwargs)
        user_labels = run_kwargs.pop("labels", None) or {}
        if isinstance(user_labels, list):
            user_labels = dict.fromkeys(user_labels, "")
        run_kwargs["labels"] = {**user_labels, **labels, LABEL_MANAGED: "true"}
        try:
            with _translated(f"create container {name}"):
                container = self._client.containers.create(image, name=name, **run_kwargs)
        except DockerOperationError as exc:
            if "Conflict" in str(exc) or "already in use" in str(exc):
                raise
            raise RunConfigError(f"Docker refused the run arguments: {exc}") from None
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # docker-py rejects unknown or malformed keyword arguments before any request.
            raise RunConfigError(f"invalid containers.run arguments: {exc}") from None
        return str(container.id)

    def start(self, container_id: str) -> None:
        with _translated(f"start container {container_id[:12]}"):
            self._client.api.start(container_id)

    def stop(self, container_id: str, timeout_s: int | None = None) -> None:
        with _translated(f"stop container {container_id[:12]}"):
            if timeout_s is None:
                self._client.api.stop(container_id)
            else:
                self._client.api.stop(container_id, timeout=timeout_s)

    def rename(self, container_id: str, name: str) -> None:
        with _translated(f"rename container {container_id[:12]} to {name}"):
            self._client.api.rename(container_id, name)

    def remove(self, container_id: str) -> None:
        """Force-remove a container; a container already gone is fine."""
        with _translated(f"remove container {container_id[:12]}"), contextlib.suppress(NotFound):
                self._client.api.remove_container(container_id, force=True)

    # -- images -----------------------------------------------------------------
    def image(self, reference: str) -> ImageInfo | None:
        """A local image by id or reference; None when it is not here."""
        with _translated(f"inspect image {reference}"):
            try:
                attrs = self._client.api.inspect_image(reference)  # type: ignore[no-untyped-call]
            except (ImageNotFound, NotFound):
                return None
        return _image_info(attrs)

    def pull(
        self,
        repository: str,
        reference: str,
        on_progress: Callable[[float], None],
        should_abort: Callable[[], bool],
    ) -> ImageInfo:
        """Pull ``repository`` at a tag or digest, reporting percent done.

        ``should_abort`` is asked between progress messages so a shutdown never
        waits for a slow download.
        """
        progress = PullProgress()
        with _translated(f"pull {repository}:{reference}"):
            stream = self._client.api.pull(repository, tag=reference, stream=True, decode=True)
            try:
                for message in stream:
                    if should_abort():
                        raise DockerOperationError("pull aborted: agent is stopping")
                    if "error" in message:
                        detail = str(message.get("error"))
                        if "manifest unknown" in detail or "not found" in detail:
                            raise ManifestUnknown(f"pull {repository}:{reference}: {detail}")
                        raise DockerUnavailable(f"pull {repository}:{reference}: {detail}")
                    percent = progress.update(message)
                    if percent is not None:
                        on_progress(percent)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
        separator = "@" if reference.startswith("sha256:") else ":"
        info = self.image(f"{repository}{separator}{reference}")
        if info is None:
            raise DockerOperationError(f"pulled {repository}:{reference} but cannot find it")
        return info

    def repository_images(self, repository: str) -> list[ImageInfo]:
        """Every local image of ``repository``, tagged or only known by digest."""
        with _translated(f"list images of {repository}"):
            found = self._client.api.images(name=repository)
            dangling = self._client.api.images(filters={"dangling": True})
        infos: dict[str, ImageInfo] = {}
        for attrs in [*found, *dangling]:
            digests = tuple(attrs.get("RepoDigests") or ())
            tags = tuple(t for t in attrs.get("RepoTags") or () if t != "<none>:<none>")
            info = ImageInfo(id=attrs["Id"], repo_digests=digests, tags=tags)
            in_repo = any(r.split("@", 1)[0] == repository for r in digests) or any(
                t.rsplit(":", 1)[0] == repository for t in tags
            )
            if in_repo:
                infos[info.id] = info
        return list(infos.values())

    def remove_image_refs(self, image: ImageInfo, repository: str) -> None:
        """Drop this repository's tags and digests from ``image``; Docker deletes the image
        once nothing refers to it. An image a container still uses is kept."""
        refs = [t for t in image.tags if t.rsplit(":", 1)[0] == repository]
        refs += [d for d in image.repo_digests if d.split("@", 1)[0] == repository]
        for ref in refs:
            try:
                with _translated(f"remove image {ref}"), contextlib.suppress(NotFound):
                    self._client.api.remove_image(ref, force=False, noprune=False)
            except DockerOperationError as exc:
                log.info("kept image %s: %s", ref, exc)
                return

    def managed_containers(self) -> list[ContainerInfo]:
        """All containers the agent created (for cleanup after a crash)."""
        with _translated("list containers"):
            found = self._client.containers.list(all=True, filters={"label": LABEL_MANAGED})
        return [_container_info(c) for c in found]

    def events(self, container_name: str) -> Iterator[dict[str, Any]]:
        """Stream Docker events of the managed container (blocks; for a watcher thread)."""
        with _translated("watch Docker events"):
            stream = self._client.events(
                decode=True, filters={"type": "container", "container": container_name}
            )
        with _translated("watch Docker events"):
            yield from stream


def _container_info(container: Container) -> ContainerInfo:
    attrs: dict[str, Any] = container.attrs
    state = attrs.get("State") or {}
    config = attrs.get("Config") or {}
    healthcheck = config.get("Healthcheck") or {}
    test = healthcheck.get("Test") or []
    health = (state.get("Health") or {}).get("Status")
    started_at = state.get("StartedAt")
    return ContainerInfo(
        id=str(attrs["Id"]),
        name=str(attrs.get("Name", "")).lstrip("/"),
        image_id=str(attrs.get("Image", "")),
        image_ref=str(config.get("Image", "")),
        labels=dict(config.get("Labels") or {}),
        status=str(state.get("Status", "unknown")),
        health=str(health) if health else None,
        has_healthcheck=bool(test) and test[0] != "NONE",
        started_at=None if not started_at or started_at.startswith("0001-") else str(started_at),
        restart_count=int(attrs.get("RestartCount") or 0),
        exit_code=int(state.get("ExitCode") or 0),
    )


def _image_info(attrs: dict[str, Any]) -> ImageInfo:
    return ImageInfo(
        id=str(attrs["Id"]),
        repo_digests=tuple(attrs.get("RepoDigests") or ()),
        tags=tuple(attrs.get("RepoTags") or ()),
    )
