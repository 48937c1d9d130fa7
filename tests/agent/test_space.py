"""Room for a pull (agent/space.py): which layers are missing, the margin, where free
space is measured, and prune-then-refuse. Pure: no I/O."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.agent.space import (
    EXPANSION,
    MIB,
    RESERVE_BYTES,
    ImageLayers,
    Platform,
    UnreadableManifest,
    data_root,
    download_bytes,
    is_index,
    make_room,
    megabytes,
    pick_manifest,
    platform_of,
    read_diff_ids,
    read_manifest,
    room_needed,
)


def digest(n: int) -> str:
    return f"sha256:{n:064x}"


BASE, APP, PAD = digest(1), digest(2), digest(3)


# -- which layers are missing ------------------------------------------------------------
def test_only_layers_no_local_image_has_are_downloaded() -> None:
    image = ImageLayers((2 * MIB, 1000, 50 * MIB), (BASE, APP, PAD))
    assert download_bytes(image, frozenset()) == 52 * MIB + 1000
    assert download_bytes(image, frozenset({BASE, APP})) == 50 * MIB
    assert download_bytes(image, frozenset({BASE, APP, PAD})) == 0


def test_a_layer_repeated_in_one_image_is_downloaded_once() -> None:
    image = ImageLayers((10, 10, 7), (BASE, BASE, APP))
    assert download_bytes(image, frozenset()) == 17


def test_a_manifest_and_config_that_disagree_count_every_layer() -> None:
    image = ImageLayers((10, 20, 30), (BASE, APP))
    assert download_bytes(image, frozenset({BASE, APP})) == 60


# -- the margin ----------------------------------------------------------------------------
def test_room_needed_is_blob_plus_extracted_estimate_plus_reserve() -> None:
    assert room_needed(0) == 0
    assert room_needed(10 * MIB) == 10 * MIB * (1 + EXPANSION) + RESERVE_BYTES
    assert room_needed(10 * MIB) > 10 * MIB * 2  # a blob and its extracted copy at least


def test_megabytes_rounds_needed_up_and_free_down() -> None:
    assert megabytes(MIB + 1) == "2"
    assert megabytes(MIB + 1, up=False) == "1"
    assert megabytes(0) == "0"


# -- prune, then refuse --------------------------------------------------------------------
class Disk:
    """A disk that pruning frees ``freed`` bytes on (plain numbers, no Docker)."""

    def __init__(self, free: int, needed: int, freed: int = 0, prunable: bool = True,
                 needed_after: int | None = None) -> None:
        self.free, self.needed, self.freed, self.prunable = free, needed, freed, prunable
        self.needed_after = needed if needed_after is None else needed_after
        self.prunes = 0
        self.measures = 0

    def measure(self) -> tuple[int, int]:
        self.measures += 1
        return self.needed, self.free

    def prune(self) -> bool:
        self.prunes += 1
        if not self.prunable:
            return False
        self.free += self.freed
        self.needed = self.needed_after
        return True


def test_room_enough_prunes_nothing() -> None:
    disk = Disk(free=100, needed=100)
    assert make_room(disk.measure, disk.prune).fits
    assert disk.prunes == 0


def test_short_then_fits_after_pruning() -> None:
    disk = Disk(free=50, needed=80, freed=40)
    room = make_room(disk.measure, disk.prune)
    assert room.fits and room.pruned and (room.needed, room.free) == (80, 90)
    assert disk.prunes == 1 and disk.measures == 2


def test_still_short_after_pruning_is_refused_with_the_new_numbers() -> None:
    disk = Disk(free=50, needed=200, freed=40)
    room = make_room(disk.measure, disk.prune)
    assert not room.fits and room.pruned and (room.needed, room.free) == (200, 90)


def test_nothing_to_prune_is_refused_without_measuring_again() -> None:
    disk = Disk(free=50, needed=80, prunable=False)
    room = make_room(disk.measure, disk.prune)
    assert not room.fits and not room.pruned and disk.measures == 1


def test_a_pruned_image_that_held_a_needed_layer_is_counted_again() -> None:
    # pruning freed 40 but the pull now downloads the layer the pruned image held
    disk = Disk(free=50, needed=80, freed=40, needed_after=95)
    room = make_room(disk.measure, disk.prune)
    assert not room.fits and room.needed == 95


# -- what the registry says ------------------------------------------------------------------
def manifest(config: str = APP, sizes: tuple[int, ...] = (5, 6)) -> dict[str, Any]:
    return {"schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"digest": config, "size": 100},
            "layers": [{"digest": digest(10 + i), "size": s} for i, s in enumerate(sizes)]}


def index(*platforms: tuple[str, str, str | None, str]) -> dict[str, Any]:
    return {"mediaType": "application/vnd.oci.image.index.v1+json", "manifests": [
        {"digest": d, "platform": {"os": o, "architecture": a,
                                   **({"variant": v} if v else {})}}
        for o, a, v, d in platforms]}


def test_a_manifest_gives_its_config_and_layer_sizes() -> None:
    assert read_manifest(manifest()) == (APP, (5, 6))
    assert not is_index(manifest())


def test_the_platform_manifest_is_picked_from_an_index() -> None:
    found = index(("linux", "amd64", None, digest(20)), ("linux", "arm", "v6", digest(21)),
                  ("linux", "arm", "v7", digest(22)), ("linux", "arm64", "v8", digest(23)))
    assert is_index(found)
    assert pick_manifest(found, platform_of("linux", "x86_64")) == digest(20)
    assert pick_manifest(found, platform_of("linux", "armv7l")) == digest(22)
    assert pick_manifest(found, platform_of("linux", "aarch64")) == digest(23)
    with pytest.raises(UnreadableManifest, match="s390x"):
        pick_manifest(found, Platform("linux", "s390x"))


def test_a_config_gives_its_diff_ids() -> None:
    assert read_diff_ids({"rootfs": {"type": "layers", "diff_ids": [BASE, APP]}}) == (BASE, APP)


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=80),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20))
def test_untrusted_documents_give_an_answer_or_unreadable_manifest(document: Any) -> None:
    for read in (read_manifest, read_diff_ids,
                 lambda d: pick_manifest(d, Platform("linux", "amd64"))):
        if not isinstance(document, dict):
            continue
        with contextlib.suppress(UnreadableManifest):
            read(document)


@given(st.dictionaries(st.sampled_from(["config", "layers", "mediaType"]),
                       st.lists(st.dictionaries(st.sampled_from(["digest", "size"]),
                                                st.integers() | st.text(max_size=70)
                                                | st.booleans()), max_size=3)
                       | st.dictionaries(st.sampled_from(["digest"]), st.text(max_size=70))))
def test_a_manifest_read_never_gives_a_negative_or_boolean_size(document: Any) -> None:
    try:
        _, sizes = read_manifest(document)
    except UnreadableManifest:
        return
    assert all(type(size) is int and size >= 0 for size in sizes)


# -- where free space is measured --------------------------------------------------------------
FACTS = {"local_daemon": True, "in_container": False, "is_dir": True, "is_mount": False}


def test_on_the_host_docker_root_dir_is_measured() -> None:
    assert data_root("", "/var/lib/docker", **FACTS).path == "/var/lib/docker"


def test_the_setting_names_the_place_or_turns_the_check_off() -> None:
    assert data_root("/host/docker", "/var/lib/docker", **FACTS).path == "/host/docker"
    off = data_root("off", "/var/lib/docker", **FACTS)
    assert off.path is None and "DOCKER_DATA_ROOT=off" in off.why


def test_in_a_container_only_a_mounted_data_root_is_measured() -> None:
    mounted = {**FACTS, "in_container": True, "is_mount": True}
    assert data_root("", "/var/lib/docker", **mounted).path == "/var/lib/docker"
    own = data_root("", "/var/lib/docker", **{**mounted, "is_mount": False})
    assert own.path is None and "-v /var/lib/docker:/var/lib/docker:ro" in own.why
    absent = data_root("", "/var/lib/docker", **{**mounted, "is_dir": False, "is_mount": False})
    assert absent.path is None and "DOCKER_DATA_ROOT" in absent.why


def test_a_remote_daemon_is_not_measured_here() -> None:
    remote = data_root("", "/var/lib/docker", **{**FACTS, "local_daemon": False})
    assert remote.path is None and "not on this machine" in remote.why
    assert data_root("", "", **FACTS).path is None
