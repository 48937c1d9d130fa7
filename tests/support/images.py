"""Tiny test images built FROM scratch around a static busybox, pushed to a registry.

Every image serves ``/www/version`` (the version string, no newline) with busybox
httpd on port 8080 under a ``sh`` wrapper that exits at once on SIGTERM, so
``docker stop`` is fast. Kinds:

- ``ok``: just that, and no HEALTHCHECK.
- ``healthy``: plus a HEALTHCHECK (every 1 s) that fetches the version file.
- ``unhealthy``: plus a HEALTHCHECK (every 1 s) that always fails.
- ``exits``: exits with code 1 after 0.5 s.
- ``bad_entrypoint``: its ENTRYPOINT names a file that does not exist, so the container
  never starts (Docker answers the start with ``exec: ... no such file or directory``).

Each (repository path, kind, version) has its own digest. The first layer (busybox) also
holds the repository's path (``/bin/.repository``), so no two repositories share a
layer: a test's pull downloads what it measures even while other tests (another
pytest-xdist worker) have their images on the daemon. (A build can still fail when the
builder, looking for a cached step, meets an image another test is deleting: such a
build is run again.) Within a repository builds use the
daemon's build cache, so a build+push takes well under a second once warm. Images carry
the label ``io.edge-agent.test.image=1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Any, Literal

import docker
import docker.errors

from tests.support import DEFAULT_REGISTRY

__all__ = [
    "BUSYBOX",
    "KINDS",
    "ImageBuildError",
    "Kind",
    "build_and_push",
    "build_image",
    "dockerfile_for",
    "full_repo",
    "get_client",
    "push_image",
    "push_padded",
    "remove_registry_images",
    "remove_repo_images",
    "repo_image_ids",
    "split_reference",
]

Kind = Literal["ok", "healthy", "unhealthy", "exits", "bad_entrypoint"]
KINDS: tuple[Kind, ...] = ("ok", "healthy", "unhealthy", "exits", "bad_entrypoint")

#: the static busybox from Debian's busybox-static package
BUSYBOX = Path("/bin/busybox")

TEST_IMAGE_LABEL = "io.edge-agent.test.image"
BUILD_ATTEMPTS = 3

APP_PORT = 8080

# The wrapper is PID 1. httpd as PID 1 would ignore SIGTERM (no handler, and the kernel
# drops default-action signals for PID 1), so the shell traps TERM and exits at once;
# the kernel then kills httpd with the container's PID namespace.
_SERVE = """\
trap 'exit 143' TERM
trap 'exit 130' INT
/bin/busybox httpd -f -p {port} -h /www &
wait $!
"""

_EXITS = """\
trap 'exit 143' TERM
trap 'exit 130' INT
/bin/busybox sleep 0.5
exit 1
"""

_HEALTHCHECKS: dict[Kind, str] = {
    "ok": "",
    "exits": "",
    "bad_entrypoint": "",
    "healthy": (
        "HEALTHCHECK --interval=1s --timeout=1s --retries=2 CMD "
        f'["/bin/busybox", "wget", "-q", "-O", "/dev/null", '
        f'"http://127.0.0.1:{APP_PORT}/version"]\n'
    ),
    "unhealthy": (
        'HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD ["/bin/busybox", "false"]\n'
    ),
}


_ENTRYPOINT = '["/bin/busybox", "sh", "/app.sh"]'
_ENTRYPOINTS: dict[Kind, str] = {"bad_entrypoint": '["/bin/no-such-program"]'}


class ImageBuildError(RuntimeError):
    """docker build or docker push reported an error."""


def get_client() -> docker.DockerClient:
    """A docker-py client for the local daemon (shared, API version negotiated). Cached
    per DOCKER_HOST: a test that points DOCKER_HOST at a proxy or a private daemon must
    not leave later tests talking to it."""
    return _client_for(os.environ.get("DOCKER_HOST"))


@cache
def _client_for(docker_host: str | None) -> docker.DockerClient:
    return docker.from_env(version="auto")


def split_reference(repo: str) -> tuple[str, str]:
    """``"127.0.0.1:5000/t1/app"`` -> ``("127.0.0.1:5000", "t1/app")``."""
    first, sep, rest = repo.partition("/")
    if not sep or not ("." in first or ":" in first or first == "localhost"):
        raise ValueError(f"repository {repo!r} names no registry host")
    return first, rest


def full_repo(repo: str, registry: str = DEFAULT_REGISTRY) -> str:
    """``repo`` with the registry host prefixed unless it already names one."""
    first, sep, _ = repo.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return repo
    return f"{registry}/{repo}"


def _script(kind: Kind) -> str:
    return _EXITS if kind == "exits" else _SERVE.format(port=APP_PORT)


def dockerfile_for(kind: Kind, version: str) -> str:
    """The Dockerfile of one test image (layers ordered for the best cache reuse)."""
    if kind not in KINDS:
        raise ValueError(f"unknown image kind {kind!r}; one of {', '.join(KINDS)}")
    return (
        "FROM scratch\n"
        "COPY bin/ /bin/\n"
        "COPY app.sh /app.sh\n"
        "COPY www/ /www/\n"
        f"EXPOSE {APP_PORT}/tcp\n"
        f"LABEL {TEST_IMAGE_LABEL}=1 io.edge-agent.test.kind={kind} "
        f"io.edge-agent.test.version={json.dumps(version)}\n"
        f"{_HEALTHCHECKS[kind]}"
        f"ENTRYPOINT {_ENTRYPOINTS.get(kind, _ENTRYPOINT)}\n"
    )


def _context(kind: Kind, version: str, repository: str) -> io.BytesIO:
    """The build context as an in-memory tar (nothing to clean up on disk);
    ``repository``, the path without the registry, goes into the first layer."""
    if not BUSYBOX.is_file():
        raise ImageBuildError(f"{BUSYBOX} missing: run scripts/stack (installs busybox-static)")
    buf = io.BytesIO()

    def add(name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mode = mode
        info.mtime = 0  # stable metadata: the builder's cache keys on content
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w") as tar:
        add("Dockerfile", dockerfile_for(kind, version).encode())
        add("bin/busybox", BUSYBOX.read_bytes(), 0o755)
        add("bin/.repository", repository.encode())
        link = tarfile.TarInfo("bin/sh")
        link.type = tarfile.SYMTYPE
        link.linkname = "busybox"
        link.mtime = 0
        tar.addfile(link)
        add("app.sh", _script(kind).encode(), 0o755)
        add("www/version", version.encode())
    buf.seek(0)
    return buf


def _consume(stream: Iterable[Mapping[str, Any]], what: str) -> list[Mapping[str, Any]]:
    """Drain a decoded docker progress stream; raise on the first error message."""
    chunks: list[Mapping[str, Any]] = []
    for chunk in stream:
        if "error" in chunk or "errorDetail" in chunk:
            detail = chunk.get("errorDetail") or {}
            message = detail.get("message") if isinstance(detail, Mapping) else None
            raise ImageBuildError(f"{what}: {message or chunk.get('error')}")
        chunks.append(chunk)
    return chunks


def build_image(  # noqa: PLR0913 - an image's name, content and target
    repo: str,
    tag: str,
    version: str,
    kind: Kind = "ok",
    *,
    registry: str = DEFAULT_REGISTRY,
    client: docker.DockerClient | None = None,
) -> str:
    """Build one test image as ``<registry>/<repo>:<tag>``; returns the local image id."""
    client = client or get_client()
    ref = f"{full_repo(repo, registry)}:{tag}"
    for attempt in range(1, BUILD_ATTEMPTS + 1):
        stream = client.api.build(
            fileobj=_context(kind, version, split_reference(full_repo(repo, registry))[1]),
            custom_context=True,
            tag=ref,
            rm=True,
            forcerm=True,
            decode=True,
        )
        try:
            chunks = _consume(stream, f"docker build {ref}")
            break
        except ImageBuildError as exc:
            # The classic builder looks through the daemon's images for a cached step;
            # one that another test (another pytest-xdist worker) deletes meanwhile
            # fails the build. Built again, the image is simply not there to look at.
            lost = ("unknown parent image ID", "failed to get digest", "unable to find image")
            if not any(text in str(exc) for text in lost) or attempt == BUILD_ATTEMPTS:
                raise
    for chunk in reversed(chunks):
        aux = chunk.get("aux")
        if isinstance(aux, Mapping) and isinstance(aux.get("ID"), str):
            return str(aux["ID"])
    image_id = client.images.get(ref).id
    if image_id is None:  # pragma: no cover - the daemon always reports one
        raise ImageBuildError(f"docker build {ref}: no image id")
    return image_id


def push_image(
    repo: str,
    tag: str,
    *,
    registry: str = DEFAULT_REGISTRY,
    auth: Mapping[str, str] | None = None,
    client: docker.DockerClient | None = None,
) -> str:
    """Push ``<registry>/<repo>:<tag>``; returns the registry's manifest digest.

    ``auth`` is docker-py's auth_config, e.g. ``{"username": "u", "password": "p"}``.
    """
    client = client or get_client()
    name = full_repo(repo, registry)
    stream = client.api.push(
        name, tag=tag, stream=True, decode=True, auth_config=dict(auth) if auth else None
    )
    chunks = _consume(stream, f"docker push {name}:{tag}")
    for chunk in reversed(chunks):
        aux = chunk.get("aux")
        if isinstance(aux, Mapping) and str(aux.get("Digest", "")).startswith("sha256:"):
            return str(aux["Digest"])
    raise ImageBuildError(f"docker push {name}:{tag}: no digest in the push output")


def build_and_push(  # noqa: PLR0913 - an image's name, content and target
    repo: str,
    tag: str,
    version: str,
    kind: Kind = "ok",
    registry: str = DEFAULT_REGISTRY,
    *,
    auth: Mapping[str, str] | None = None,
    client: docker.DockerClient | None = None,
) -> str:
    """Build a test image and push it; returns the pushed manifest digest (``sha256:...``,
    what ``RepoDigests`` shows after the push).

    ``repo`` is either a full repository (``127.0.0.1:5000/t1a2b/app``, as the
    ``unique_repo`` fixture gives) or a path that ``registry`` is prefixed to.
    """
    build_image(repo, tag, version, kind, registry=registry, client=client)
    return push_image(repo, tag, registry=registry, auth=auth, client=client)


def push_padded(repo: str, tag: str, pad_mb: int, client: docker.DockerClient) -> None:
    """Rebuild ``repo:tag`` with an extra layer of ``pad_mb`` MiB of random (incompressible,
    so its download is as large as its files) bytes, and push it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("Dockerfile", f"FROM {repo}:{tag}\nCOPY pad /pad\n".encode()),
                           ("pad", os.urandom(pad_mb << 20))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    for chunk in client.api.build(fileobj=buf, custom_context=True, tag=f"{repo}:{tag}",
                                  rm=True, decode=True):
        assert "error" not in chunk, chunk
    for chunk in client.api.push(repo, tag=tag, stream=True, decode=True):
        assert "error" not in chunk, chunk


def repo_image_ids(
    repo: str, registry: str = DEFAULT_REGISTRY, *, client: docker.DockerClient | None = None
) -> set[str]:
    """Ids of the local images that ``repo`` references by tag or digest."""
    name = full_repo(repo, registry)
    return {
        image_id
        for image_id, refs in _references(client or get_client()).items()
        if any(ref.startswith((f"{name}:", f"{name}@")) for ref in refs)
    }


def container_image_id(client: docker.DockerClient, name: str) -> str:
    """Id of the image the container ``name`` runs."""
    image = client.containers.get(name).image
    assert image is not None and image.id is not None, f"the image of {name} is gone"
    return image.id


def _references(client: docker.DockerClient) -> dict[str, list[str]]:
    # One listing call: images.list() inspects each image afterwards, which races with
    # other tests removing images in between (ImageNotFound).
    out: dict[str, list[str]] = {}
    for attrs in client.api.images():
        refs = [*(attrs.get("RepoTags") or []), *(attrs.get("RepoDigests") or [])]
        out[str(attrs["Id"])] = [ref for ref in refs if not ref.startswith("<none>")]
    return out


def _remove_references(client: docker.DockerClient, wanted: Callable[[str], bool]) -> int:
    """Untag every reference ``wanted`` accepts; then delete images left with no
    reference at all (unless a container still uses them)."""
    touched: set[str] = set()
    removed = 0
    for image_id, refs in _references(client).items():
        for ref in refs:
            if not wanted(ref):
                continue
            touched.add(image_id)
            try:
                client.images.remove(ref, force=True)
                removed += 1
            except docker.errors.NotFound:
                pass
            except docker.errors.APIError as exc:
                # 409: a container uses it; 500 "unrecognized image ID": another test
                # removed the image between the listing and this call (a shared daemon)
                if exc.status_code not in (409, 500):
                    raise
    for image_id in touched:
        try:
            image = client.images.get(image_id)
        except docker.errors.NotFound:
            continue
        if image.attrs.get("RepoTags") or image.attrs.get("RepoDigests"):
            continue  # still referenced by another repository
        with contextlib.suppress(docker.errors.APIError):  # 409: a container uses it
            client.images.remove(image_id)
    return removed


def remove_repo_images(
    repo: str,
    registry: str = DEFAULT_REGISTRY,
    *,
    client: docker.DockerClient | None = None,
) -> int:
    """Remove every local tag and digest reference of ``repo``; returns how many.

    Removes references, not image ids, so an identical image that another repository
    also references stays. Images still used by a container are only untagged.
    """
    name = full_repo(repo, registry)
    return _remove_references(
        client or get_client(), lambda ref: ref.startswith((f"{name}:", f"{name}@"))
    )


def remove_registry_images(address: str, *, client: docker.DockerClient | None = None) -> int:
    """Remove every local reference to any repository of the registry ``address``."""
    return _remove_references(client or get_client(), lambda ref: ref.startswith(f"{address}/"))
