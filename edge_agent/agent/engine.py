"""The one module that talks to the Docker daemon.

Every docker-py call goes through ``Engine`` and every docker-py or requests error
is translated here into the agent's own errors, so callers never import docker.

Every call has a total deadline (``deadline.call``): a daemon that accepts the
connection and never answers costs a check ``CALL_TIMEOUT_S``, not the agent, and a stop
request ends the wait within the stop grace. A pull has no useful total size, so it is
bounded by progress: given up when the daemon sends nothing for ``PULL_IDLE_S``, and
after ``PULL_TIMEOUT_S`` in any case; closing its connection makes the daemon cancel it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import docker
import requests
import urllib3
from docker import auth as docker_auth
from docker.errors import (
    APIError,
    DockerException,
    ImageNotFound,
    NotFound,
    create_api_error_from_http_exception,
)
from docker.models.containers import (  # type: ignore[attr-defined]
    Container,
    _create_container_args,  # the converter containers.run uses; no public twin
)

from edge_agent.agent import deadline
from edge_agent.agent.errors import (
    DockerOperationError,
    DockerUnavailable,
    ManifestUnknown,
    RunConfigError,
)
from edge_agent.agent.reconcile import PullProgress
from edge_agent.agent.space import Platform, platform_of

log = logging.getLogger(__name__)

LABEL_MANAGED = "io.edge-agent.managed"
LABEL_TAG = "io.edge-agent.tag"
LABEL_DIGEST = "io.edge-agent.digest"
LABEL_CONFIG = "io.edge-agent.config"

# Total deadline of one Docker call (docker-py's per-read timeout is a little longer, so a call
# given up on a stalled daemon does not outlive it by much). ``stop`` adds the grace it
# gives the container.
CALL_TIMEOUT_S = 60.0
DEFAULT_STOP_GRACE_S = 10
# A pull is given up when the daemon reports nothing for this long (a stalled registry)
PULL_IDLE_S = 120.0
# and in any case after this (a registry dripping bytes slowly enough to report progress).
PULL_TIMEOUT_S = 2 * 3600.0
PULL_CONNECT_TIMEOUT_S = 10.0

T = TypeVar("T")


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


@dataclass(frozen=True)
class DaemonStorage:
    """Where the daemon keeps its images (``DockerRootDir``), its platform, and whether
    it runs on this machine (a unix socket) so that its data root can be seen here."""

    root_dir: str
    platform: Platform
    local: bool


def socket_denied_hint() -> str:
    """What to do when the socket is there but our user may not open it."""
    return ("permission denied on the Docker socket: the agent's user is not in the "
            "socket's group (docker run --group-add $(stat -c %g /var/run/docker.sock), "
            "compose DOCKER_GID)")


def _permission_denied(exc: BaseException) -> bool:
    """The socket is there but our uid/gids may not open it (docker-py wraps the OSError)."""
    return "Permission denied" in str(exc) or "PermissionError" in str(exc)


def insecure_in(config: dict[str, Any], registry: str) -> bool:
    """Whether the daemon's RegistryConfig (``docker info``) marks ``registry`` insecure."""
    index = (config.get("IndexConfigs") or {}).get(registry)
    if isinstance(index, dict) and index.get("Secure") is False:
        return True
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False  # a name: only listed names count, as for the daemon
    for cidr in config.get("InsecureRegistryCIDRs") or []:
        with contextlib.suppress(ValueError, TypeError):
            if address in ipaddress.ip_network(str(cidr), strict=False):
                return True
    return False


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    """Turn docker-py and transport errors into agent errors, once, here."""
    try:
        yield
    except APIError as exc:
        explanation = exc.explanation or str(exc)
        if exc.status_code is not None and exc.status_code >= 500 and (  # noqa: PLR2004 - 5xx
            "manifest unknown" in explanation or "not found" in explanation
        ):
            raise ManifestUnknown(f"{action}: {explanation}") from None
        if exc.status_code == HTTPStatus.NOT_FOUND and "manifest" in explanation:
            raise ManifestUnknown(f"{action}: {explanation}") from None
        if exc.status_code is not None and exc.status_code >= 500:  # noqa: PLR2004 - 5xx
            raise DockerUnavailable(f"{action}: {explanation}") from None
        raise DockerOperationError(f"{action}: {explanation}") from None
    except (requests.ConnectionError, requests.Timeout) as exc:
        if _permission_denied(exc):
            raise DockerUnavailable(f"{action}: {socket_denied_hint()}") from None
        reason = type(exc).__name__
        raise DockerUnavailable(f"{action}: Docker daemon unreachable ({reason})") from None
    except DockerException as exc:
        if _permission_denied(exc):
            raise DockerUnavailable(f"{action}: {socket_denied_hint()}") from None
        raise DockerUnavailable(f"{action}: {exc}") from None
    except deadline.GaveUp as exc:
        if exc.stopping:
            raise DockerUnavailable(str(exc)) from None
        raise DockerUnavailable(f"{exc} (the Docker daemon is stalled or overloaded)") from None


class Engine:
    """Docker operations on the managed container and its images."""

    def __init__(
        self, client: docker.DockerClient, *, call_timeout_s: float = CALL_TIMEOUT_S,
        pull_idle_s: float = PULL_IDLE_S, pull_timeout_s: float = PULL_TIMEOUT_S,
    ) -> None:
        self._client = client
        self._call_timeout_s = call_timeout_s
        self._pull_idle_s = pull_idle_s
        self._pull_timeout_s = pull_timeout_s

    @classmethod
    def connect(
        cls, timeout_s: float = CALL_TIMEOUT_S, *, pull_idle_s: float = PULL_IDLE_S,
        pull_timeout_s: float = PULL_TIMEOUT_S,
    ) -> Engine:
        """Connect to the daemon from the environment, negotiating the API version."""
        action = "connect to Docker"
        with _translated(action):
            client = deadline.call(
                lambda: docker.from_env(version="auto", timeout=int(timeout_s) + 5),
                timeout_s=timeout_s, what=action, should_abort=deadline.stopping)
        return cls(client, call_timeout_s=timeout_s, pull_idle_s=pull_idle_s,
                   pull_timeout_s=pull_timeout_s)

    def close(self) -> None:
        self._client.close()

    def _call(
        self, action: str, fn: Callable[[], T], *, changes: bool = False, extra_s: float = 0.0,
    ) -> T:
        """``fn()`` (docker-py calls) within the call deadline, errors translated. A call
        that ``changes`` something gets the stop grace; a question is dropped at once."""
        with _translated(action):
            return deadline.call(fn, timeout_s=self._call_timeout_s + extra_s, what=action,
                                 should_abort=None if changes else deadline.stopping)

    # -- containers -------------------------------------------------------------
    def container(self, name_or_id: str) -> ContainerInfo | None:
        """Inspect a container by exact name or id; None when it does not exist."""

        def inspect() -> Container | None:
            try:
                return self._client.containers.get(name_or_id)
            except NotFound:
                return None

        container = self._call(f"inspect container {name_or_id}", inspect)
        return None if container is None else _container_info(container)

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
            container = self._call(
                f"create container {name}",
                lambda: self._client.containers.create(image, name=name, **run_kwargs),
                changes=True)
        except DockerOperationError as exc:
            if "Conflict" in str(exc) or "already in use" in str(exc):
                raise
            raise RunConfigError(f"Docker refused the run arguments: {exc}") from None
        except (TypeError, ValueError, AttributeError, KeyError) as exc:
            # docker-py rejects unknown or malformed keyword arguments before any request.
            raise RunConfigError(f"invalid containers.run arguments: {exc}") from None
        return str(container.id)

    def start(self, container_id: str) -> None:
        self._call(f"start container {container_id[:12]}",
                   lambda: self._client.api.start(container_id), changes=True)

    def stop(self, container_id: str, timeout_s: int | None = None) -> None:
        # The daemon waits up to the grace before it answers; the deadline allows for it.
        grace = DEFAULT_STOP_GRACE_S if timeout_s is None else timeout_s
        self._call(f"stop container {container_id[:12]}",
                   lambda: self._client.api.stop(container_id, timeout=grace), changes=True,
                   extra_s=grace)

    def rename(self, container_id: str, name: str) -> None:
        self._call(f"rename container {container_id[:12]} to {name}",
                   lambda: self._client.api.rename(container_id, name), changes=True)

    def remove(self, container_id: str) -> None:
        """Force-remove a container; a container already gone is fine."""

        def remove() -> None:
            with contextlib.suppress(NotFound):
                self._client.api.remove_container(container_id, force=True)

        self._call(f"remove container {container_id[:12]}", remove, changes=True)

    # -- the agent's own container (agent/selfupdate.py) -------------------------
    def container_attrs(self, name_or_id: str) -> dict[str, Any] | None:
        """A container's full inspect document (Config, HostConfig, State); None when
        it does not exist. For carrying the agent's own configuration over."""

        def inspect() -> dict[str, Any] | None:
            try:
                attrs: dict[str, Any] = self._client.api.inspect_container(name_or_id)
            except NotFound:
                return None
            return attrs

        return self._call(f"inspect container {name_or_id[:64]}", inspect)

    def image_attrs(self, reference: str) -> dict[str, Any] | None:
        """An image's full inspect document; None when it is not here."""

        def inspect() -> dict[str, Any] | None:
            try:
                attrs: dict[str, Any] = self._client.api.inspect_image(  # type: ignore[no-untyped-call]
                    reference)
            except (ImageNotFound, NotFound):
                return None
            return attrs

        return self._call(f"inspect image {reference}", inspect)

    def create_from_config(self, name: str, config: dict[str, Any]) -> str:
        """Create (not start) a container from a Docker API create request as is
        (``Config`` with ``HostConfig``): the handover's candidate."""
        container: dict[str, Any] = self._call(
            f"create container {name}",
            lambda: self._client.api.create_container_from_config(  # type: ignore[no-untyped-call]
                config, name),
            changes=True)
        return str(container["Id"])

    # -- images -----------------------------------------------------------------
    def registry_is_insecure(self, registry: str) -> bool:
        """True when the daemon pulls from ``registry`` (``host[:port]``) over plain HTTP:
        listed in its ``insecure-registries`` by name or by a CIDR holding its address."""
        info: dict[str, Any] = self._call("read the daemon's registry settings",
                                          self._client.info)
        return insecure_in(info.get("RegistryConfig") or {}, registry)

    def storage(self) -> DaemonStorage:
        """Where the daemon keeps images and for which platform it pulls."""
        info: dict[str, Any] = self._call("read the daemon's data root", self._client.info)
        return DaemonStorage(
            root_dir=str(info.get("DockerRootDir") or ""),
            platform=platform_of(str(info.get("OSType") or ""),
                                 str(info.get("Architecture") or "")),
            # a unix socket (docker-py's base URL for one): the daemon shares our disk
            local=self._client.api.base_url == "http+docker://localhost",
        )

    def local_layers(self) -> frozenset[str]:
        """The diff ids of every layer of every local image: what a pull need not fetch."""
        listed = self._call("list images", lambda: self._client.api.images(quiet=True))
        layers: set[str] = set()
        for image_id in listed:

            def inspect(image_id: str = image_id) -> dict[str, Any] | None:
                try:
                    attrs: dict[str, Any] = self._client.api.inspect_image(  # type: ignore[no-untyped-call]
                        image_id)
                except (ImageNotFound, NotFound):
                    return None  # removed meanwhile
                return attrs

            attrs = self._call(f"inspect image {image_id}", inspect)
            rootfs = (attrs or {}).get("RootFS") or {}
            layers.update(str(layer) for layer in rootfs.get("Layers") or ())
        return frozenset(layers)

    def image(self, reference: str) -> ImageInfo | None:
        """A local image by id or reference; None when it is not here."""

        def inspect() -> dict[str, Any] | None:
            try:
                attrs: dict[str, Any] = self._client.api.inspect_image(  # type: ignore[no-untyped-call]
                    reference)
            except (ImageNotFound, NotFound):
                return None
            return attrs

        attrs = self._call(f"inspect image {reference}", inspect)
        return None if attrs is None else _image_info(attrs)

    def pull(
        self,
        repository: str,
        reference: str,
        on_progress: Callable[[float], None],
        should_abort: Callable[[], bool],
    ) -> ImageInfo:
        """Pull ``repository`` at a tag or digest, reporting percent done.

        ``should_abort`` is asked while waiting for the daemon, so a shutdown never waits
        for a slow or stalled download; a pull given up is cancelled in the daemon too
        (it stops when the request's connection closes).
        """
        progress = PullProgress()
        action = f"pull {repository}:{reference}"

        def stop() -> bool:
            return should_abort() or deadline.stopping()

        try:
            response = deadline.call(
                lambda: self._open_pull(repository, reference, action),
                timeout_s=self._pull_idle_s, what=action, should_abort=stop)
            messages = deadline.stream(
                lambda: _pull_messages(response), idle_s=self._pull_idle_s,
                timeout_s=self._pull_timeout_s, what=action,
                cancel=lambda: _shut_down(response), should_abort=stop)
            try:
                for message in messages:
                    if "error" in message:
                        detail = str(message.get("error"))
                        if "manifest unknown" in detail or "not found" in detail:
                            raise ManifestUnknown(f"pull {repository}:{reference}: {detail}")
                        raise DockerUnavailable(f"pull {repository}:{reference}: {detail}")
                    percent = progress.update(message)
                    if percent is not None:
                        on_progress(percent)
            finally:
                messages.close()  # stops the reader (and cancels the pull) if we broke off
                response.close()
        except deadline.GaveUp as exc:
            if exc.stopping:
                raise DockerOperationError("pull aborted: agent is stopping") from None
            raise DockerUnavailable(f"{exc} (a stalled registry or daemon); "
                                    "pull cancelled, retried at the next check") from None
        except requests.RequestException as exc:
            # The read timeout backs up the idle limit; anything else is a broken stream.
            if _is_read_timeout(exc):
                raise DockerUnavailable(
                    f"{action}: no progress for {self._pull_idle_s:g} s (a stalled registry "
                    "or daemon); pull cancelled, retried at the next check") from None
            raise DockerUnavailable(f"{action}: the daemon's answer broke off "
                                    f"({type(exc).__name__})") from None
        separator = "@" if reference.startswith("sha256:") else ":"
        info = self.image(f"{repository}{separator}{reference}")
        if info is None:
            raise DockerOperationError(f"pulled {repository}:{reference} but cannot find it")
        return info

    def _open_pull(self, repository: str, reference: str, action: str) -> requests.Response:
        """Start ``POST /images/create`` as docker-py's ``pull`` does, but with a read
        timeout (docker-py sends none for pulls) and a response whose connection can be
        shut from another thread."""
        api = self._client.api
        registry, _ = docker_auth.resolve_repository_name(repository)
        headers = {}
        header = docker_auth.get_config_header(api, registry)
        if header:
            headers["X-Registry-Auth"] = header
        with _translated(action):
            response = api.post(
                f"{api.base_url}/v{api.api_version}/images/create",
                params={"fromImage": repository, "tag": reference}, headers=headers,
                stream=True, timeout=(PULL_CONNECT_TIMEOUT_S, self._pull_idle_s + 5))
            try:
                response.raise_for_status()
            except requests.HTTPError as exc:
                response.close()
                create_api_error_from_http_exception(exc)  # raises docker's APIError
        return response

    def repository_images(self, repository: str) -> list[ImageInfo]:
        """Every local image of ``repository``, tagged or only known by digest."""
        found = self._call(f"list images of {repository}",
                           lambda: self._client.api.images(name=repository))
        dangling = self._call("list dangling images",
                              lambda: self._client.api.images(filters={"dangling": True}))
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

            def remove(ref: str = ref) -> None:
                with contextlib.suppress(NotFound):
                    self._client.api.remove_image(ref, force=False, noprune=False)

            try:
                self._call(f"remove image {ref}", remove, changes=True)
            except DockerOperationError as exc:
                log.info("kept image %s: %s", ref, exc)
                return

    def events(self, container_name: str) -> Iterator[dict[str, Any]]:
        """Stream Docker events of the managed container (blocks; for a watcher thread)."""
        with _translated("watch Docker events"):
            stream = self._client.events(
                decode=True, filters={"type": "container", "container": container_name}
            )
        with _translated("watch Docker events"):
            yield from stream


def _pull_messages(response: requests.Response) -> Iterator[dict[str, Any]]:
    """The JSON progress messages of a pull, one per line (unreadable lines skipped)."""
    for line in response.iter_lines():
        if not line:
            continue
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if isinstance(message, dict):
            yield message


def _is_read_timeout(exc: requests.RequestException) -> bool:
    # requests reports a read timeout while streaming as ConnectionError(ReadTimeoutError)
    return isinstance(exc, requests.Timeout) or any(
        isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in exc.args)


def _shut_down(response: requests.Response) -> None:
    """Shut the socket of a streamed response, waking the thread blocked reading it.
    (Closing alone would not wake it; the daemon sees the hang-up and cancels the pull.)"""
    connection = getattr(response.raw, "connection", None)
    sock = getattr(connection, "sock", None)
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


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
