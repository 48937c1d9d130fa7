"""What the Dockerfile test needs to build the image with no public registry or index.

- ``base_image()``: a local stand-in for ``python:3.11-slim``: Debian bookworm
  (``debootstrap --variant=minbase``) with python3, python3-venv and python3-pip,
  imported with ``docker import``. Made once (about a minute) and cached: the image
  stays in the daemon as ``edge-agent-test-base:<key>`` and its root file system as a
  tar under the cache directory, so a pruned image is re-imported in seconds.
- ``dependency_wheelhouse()``: the project's dependency wheels (plus setuptools and
  wheel for the isolated build), fetched with the host's pip for the daemon's
  architecture and Python 3.11; cached by the dependency list.
- ``build_context()``: the repository as ``docker build`` would send it (honouring
  ``.dockerignore``), plus the wheelhouse as ``wheelhouse/``.

The cache directory is ``$EDGE_AGENT_CACHE``, else ``/var/cache/edge-agent`` when
writable, else ``$STACK_DIR/cache``. Concurrent test runs share it under a file lock.
Run ``python -m tests.support.base_image`` to warm the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import io
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import docker
import docker.errors
from docker.utils.build import exclude_paths

from tests.support import REPO_ROOT, stack_dir

BASE_REPOSITORY = "edge-agent-test-base"
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv", "python3-pip")
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Bump to rebuild every cached base (e.g. after changing how it is made).
RECIPE_VERSION = "1"

# Docker's architecture names -> the manylinux platform tags pip should fetch wheels for.
WHEEL_PLATFORMS = {
    "x86_64": ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"),
    "aarch64": ("manylinux2014_aarch64", "manylinux_2_17_aarch64", "manylinux_2_28_aarch64"),
}


def cache_dir() -> Path:
    """Where the cached root file system and wheelhouse live (created on demand)."""
    explicit = os.environ.get("EDGE_AGENT_CACHE")
    candidates = [Path(explicit)] if explicit else [Path("/var/cache/edge-agent"),
                                                     stack_dir() / "cache"]
    for path in candidates:
        with contextlib.suppress(OSError):
            path.mkdir(parents=True, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
    raise RuntimeError(f"no writable cache directory among {', '.join(map(str, candidates))}")


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock shared by every test run on this machine."""
    with (cache_dir() / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:12]


def daemon_arch(client: docker.DockerClient) -> str:
    """The daemon's architecture in kernel terms (x86_64, aarch64, ...)."""
    return str(client.info().get("Architecture") or platform.machine())


# -- the base image ---------------------------------------------------------------------
def base_image(client: docker.DockerClient) -> str:
    """``edge-agent-test-base:<key>``, made (or re-imported from the cached tar) if missing."""
    arch = daemon_arch(client)
    key = _key(RECIPE_VERSION, SUITE, "minbase", ",".join(PACKAGES), arch)
    name = f"{BASE_REPOSITORY}:{key}"
    if _has_image(client, name):
        return name
    with _locked(f"base-{key}"):
        if _has_image(client, name):  # another test run made it meanwhile
            return name
        rootfs = cache_dir() / f"base-{key}.tar"
        if not rootfs.is_file():
            _debootstrap(rootfs)
        client.api.import_image_from_file(str(rootfs), repository=BASE_REPOSITORY, tag=key)
    if not _has_image(client, name):
        raise RuntimeError(f"docker import of {rootfs} did not produce {name}")
    return name


def _has_image(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _debootstrap(rootfs_tar: Path) -> None:
    """debootstrap into a temporary directory, then pack it as ``rootfs_tar``."""
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not Path(debootstrap).exists():
        raise RuntimeError("debootstrap is missing: run scripts/stack (it installs it)")
    if os.geteuid() != 0:
        raise RuntimeError("debootstrap needs root")
    log_path = rootfs_tar.with_suffix(".log")
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir=rootfs_tar.parent) as tmp:
        root = Path(tmp) / "root"
        with log_path.open("w") as log:
            result = subprocess.run(
                [debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}",
                 SUITE, str(root), MIRROR],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
            )
        if result.returncode != 0:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"debootstrap failed (exit {result.returncode}); log "
                               f"{log_path}:\n{tail}")
        partial = rootfs_tar.with_suffix(".tar.partial")
        # The downloaded packages and apt lists are not part of the image.
        def keep(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
            name = info.name
            if name.startswith("./var/cache/apt/archives/") and name.endswith(".deb"):
                return None
            if name.startswith("./var/lib/apt/lists/") and info.isfile() \
                    and not name.endswith("/lock"):
                return None
            return info

        with tarfile.open(partial, "w") as tar:
            tar.add(str(root), arcname=".", filter=keep)
        partial.replace(rootfs_tar)


# -- the wheelhouse ---------------------------------------------------------------------
def _requirements() -> list[str]:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    build = project.get("build-system", {}).get("requires", [])
    signing = project["project"]["optional-dependencies"]["signing"]  # the image has it
    return [*project["project"]["dependencies"], *signing, *build, "wheel"]


def dependency_wheelhouse(arch: str) -> Path:
    """A directory of wheels for the project's dependencies, for Python 3.11 on ``arch``."""
    if arch not in WHEEL_PLATFORMS:
        raise RuntimeError(f"no wheel platform known for the daemon's architecture {arch}")
    requirements = _requirements()
    key = _key(RECIPE_VERSION, arch, *sorted(requirements))
    target = cache_dir() / f"wheels-{key}"
    if target.is_dir():
        return target
    with _locked(f"wheels-{key}"):
        if target.is_dir():
            return target
        partial = Path(tempfile.mkdtemp(prefix=f"wheels-{key}-", dir=cache_dir()))
        platforms = [arg for tag in WHEEL_PLATFORMS[arch] for arg in ("--platform", tag)]
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
             "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
             "--abi", "cp311", "--abi", "abi3", "--abi", "none", *platforms,
             "--dest", str(partial), *requirements],
            capture_output=True, text=True, check=False,
        )
        if result.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            raise RuntimeError(f"pip download of the dependency wheels failed:\n{result.stderr}")
        partial.rename(target)
    return target


# -- the build context ------------------------------------------------------------------
def dockerignore_patterns(root: Path = REPO_ROOT) -> list[str]:
    """``.dockerignore`` as docker-py reads it."""
    path = root / ".dockerignore"
    if not path.exists():
        return []
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def build_context(wheelhouse: Path | None = None, root: Path = REPO_ROOT) -> io.BytesIO:
    """The context ``docker build root`` would send, plus ``wheelhouse`` as wheelhouse/."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for relative in sorted(exclude_paths(str(root), dockerignore_patterns(root))):
            if relative.startswith("wheelhouse/") and wheelhouse is not None:
                continue  # ours replaces a local one
            tar.add(str(root / relative), arcname=relative, recursive=False)
        if wheelhouse is not None:
            for wheel in sorted(wheelhouse.glob("*.whl")):
                tar.add(str(wheel), arcname=f"wheelhouse/{wheel.name}")
    buf.seek(0)
    return buf


def context_names(context: io.BytesIO) -> list[str]:
    """The member names of a build context tar (for assertions)."""
    context.seek(0)
    with tarfile.open(fileobj=context, mode="r") as tar:
        names = tar.getnames()
    context.seek(0)
    return names


if __name__ == "__main__":
    client = docker.from_env(version="auto")
    print(base_image(client))
    print(dependency_wheelhouse(daemon_arch(client)))
