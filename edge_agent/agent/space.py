"""Room for a pull: what an update will download, how much disk that takes, and whether
Docker's data root has it. Pure decisions (unit-tested, no I/O), and ``free_bytes``.

The registry's manifest lists each layer's compressed size; the image config lists the
layers' ``diff_ids`` in the same order, which is what ``docker inspect`` shows as
``RootFS.Layers`` of the local images: a layer whose diff id is already here is not
downloaded. At its peak a pulled layer takes its compressed blob (downloaded into the
data root before extraction) and its extracted files; the extracted size is not in the
manifest, so it is estimated from the compressed one (``EXPANSION``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

MIB = 1 << 20
# Image layers gzip about 2:1 to 3:1 (binaries, text); the extracted layer is estimated
# at twice its download. An image of incompressible data is overestimated (1:1), which
# errs on the side of keeping the serving container's disk usable.
EXPANSION = 2
# Left free after the pull: the daemon's metadata, container logs, the app's own writes.
# A disk filled to the last byte breaks more than the pull.
RESERVE_BYTES = 32 * MIB
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
INDEX_TYPES = frozenset({"application/vnd.oci.image.index.v1+json",
                         "application/vnd.docker.distribution.manifest.list.v2+json"})
# ``docker info`` Architecture (uname -m) -> the OCI platform's architecture and variant
ARCHITECTURES: dict[str, tuple[str, str | None]] = {
    "x86_64": ("amd64", None), "amd64": ("amd64", None),
    "aarch64": ("arm64", None), "arm64": ("arm64", None),
    "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "armv5tel": ("arm", "v5"),
    "i386": ("386", None), "i686": ("386", None),
}


class UnreadableManifest(ValueError):
    """A manifest, index or config that does not say what the estimate needs."""


@dataclass(frozen=True)
class Platform:
    """What the daemon runs: the platform to pick from a multi-arch index."""

    os: str
    architecture: str
    variant: str | None = None


def platform_of(os_type: str, machine: str) -> Platform:
    """The OCI platform of a daemon from ``docker info`` (OSType, Architecture)."""
    architecture, variant = ARCHITECTURES.get(machine, (machine, None))
    return Platform(os_type or "linux", architecture, variant)


@dataclass(frozen=True)
class ImageLayers:
    """An image as the registry describes it: compressed layer sizes and diff ids, in
    the same order."""

    sizes: tuple[int, ...]
    diff_ids: tuple[str, ...]


def is_index(manifest: dict[str, Any]) -> bool:
    media = manifest.get("mediaType")
    return media in INDEX_TYPES or (media is None and isinstance(manifest.get("manifests"),
                                                                 list))


def pick_manifest(index: dict[str, Any], platform: Platform) -> str:
    """The digest of the platform's manifest in a multi-arch index: same os and
    architecture, the same variant preferred (then none given, then any)."""
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise UnreadableManifest("the index lists no manifests")
    matching: list[tuple[int, str]] = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        wanted = entry.get("platform")
        digest = entry.get("digest")
        if not isinstance(wanted, dict) or not _is_digest(digest):
            continue
        if wanted.get("os") != platform.os or wanted.get("architecture") != platform.architecture:
            continue
        variant = wanted.get("variant")
        rank = 0 if variant == platform.variant else 1 if variant is None else 2
        matching.append((rank, str(digest)))
    if not matching:
        raise UnreadableManifest(f"the index has no manifest for {platform.os}/"
                                 f"{platform.architecture}")
    return min(matching, key=lambda found: found[0])[1]


def read_manifest(manifest: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
    """An image manifest's config digest and compressed layer sizes."""
    config = manifest.get("config")
    layers = manifest.get("layers")
    if not isinstance(config, dict) or not _is_digest(config.get("digest")):
        raise UnreadableManifest("the manifest names no config blob")
    if not isinstance(layers, list):
        raise UnreadableManifest("the manifest lists no layers")
    sizes = []
    for layer in layers:
        size = layer.get("size") if isinstance(layer, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise UnreadableManifest("a layer of the manifest has no size")
        sizes.append(size)
    return str(config["digest"]), tuple(sizes)


def read_diff_ids(config: dict[str, Any]) -> tuple[str, ...]:
    """The ``rootfs.diff_ids`` of an image config."""
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(_is_digest(d) for d in diff_ids):
        raise UnreadableManifest("the image config has no rootfs.diff_ids")
    return tuple(str(d) for d in diff_ids)


def download_bytes(image: ImageLayers, local_layers: frozenset[str]) -> int:
    """Bytes a pull downloads: the layers whose diff id no local image has (each once).
    When the manifest and the config disagree on the layer count, every layer counts."""
    if len(image.sizes) != len(image.diff_ids):
        return sum(image.sizes)
    missing: dict[str, int] = {}
    for size, diff_id in zip(image.sizes, image.diff_ids, strict=True):
        if diff_id not in local_layers:
            missing[diff_id] = size
    return sum(missing.values())


def room_needed(download: int) -> int:
    """Free bytes a pull of ``download`` compressed bytes needs: the blobs, their
    extracted layers and the reserve. Nothing to download needs no room."""
    if download <= 0:
        return 0
    return download * (1 + EXPANSION) + RESERVE_BYTES


@dataclass(frozen=True)
class Room:
    """The answer to "does the pull fit": the numbers, and whether pruning was needed."""

    fits: bool
    needed: int
    free: int
    pruned: bool = False


def make_room(measure: Callable[[], tuple[int, int]], prune: Callable[[], bool]) -> Room:
    """Fits as it is, or after ``prune()`` (our own older images; True when it removed
    any) and a new ``measure()`` (needed, free): a pruned image may also have held a layer
    the pull needs. The caller refuses the pull when it does not fit."""
    needed, free = measure()
    if needed <= free:
        return Room(True, needed, free)
    if not prune():
        return Room(False, needed, free)
    needed, free = measure()
    return Room(needed <= free, needed, free, pruned=True)


def megabytes(size: int, *, up: bool = True) -> str:
    """Bytes as whole MB (MiB): rounded up for what is needed, down for what is free."""
    return str(-(-size // MIB) if up else size // MIB)


@dataclass(frozen=True)
class DataRoot:
    """Where to measure free space; ``path`` None with ``why`` when the agent cannot."""

    path: str | None
    why: str = ""


OFF = "off"
SETTING = "DOCKER_DATA_ROOT"


def data_root(  # noqa: PLR0911, PLR0913 - one answer per way to (not) know; the facts
    setting: str, docker_root_dir: str, *, local_daemon: bool, in_container: bool,
    is_dir: bool, is_mount: bool,
) -> DataRoot:
    """Where the agent sees Docker's data root. ``setting`` (DOCKER_DATA_ROOT) names it,
    or ``off``; by default the daemon's DockerRootDir, when it is visible here: on the
    host, or mounted at the same path in the agent's container (``is_dir`` and
    ``is_mount`` describe that path). A directory of the container's own filesystem
    would measure the container, not Docker's disk."""
    if setting.lower() == OFF:
        return DataRoot(None, f"{SETTING}=off")
    if setting:
        return DataRoot(setting)
    if not docker_root_dir:
        return DataRoot(None, f"the daemon does not say where its data root is; set {SETTING}")
    if not local_daemon:
        return DataRoot(None, "the Docker daemon is not on this machine (DOCKER_HOST); set "
                              f"{SETTING} to where its data root is mounted, or to off")
    if not is_dir:
        return DataRoot(None, f"Docker's data root {docker_root_dir} is not visible here; "
                              f"mount it read-only (-v {docker_root_dir}:{docker_root_dir}:ro)"
                              f" or set {SETTING} to where it is mounted")
    if in_container and not is_mount:
        return DataRoot(None, f"{docker_root_dir} in the agent's container is not Docker's "
                              f"data root; mount it read-only (-v {docker_root_dir}:"
                              f"{docker_root_dir}:ro) or set {SETTING}")
    return DataRoot(docker_root_dir)


def free_bytes(path: str) -> int:
    """Bytes an unprivileged writer may still use on the filesystem of ``path``
    (OSError when it cannot be asked)."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and DIGEST_RE.fullmatch(value) is not None

