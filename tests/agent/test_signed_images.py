"""Signed images (issue 15), with the real registry and daemon: with TRUSTED_KEYS set the
agent runs only images that carry a sigstore signature (cosign's ``sha256-<hex>.sig``
tag, as skopeo and cosign write it) by a trusted key, for exactly that digest and this
repository; every other image is refused before it is pulled, the app keeps serving.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import docker
import pytest

from edge_agent.agent.registry import RegistryClient
from edge_agent.agent.trust import judge_signatures, load_trusted_keys
from tests.support import wait_until
from tests.support.agent_process import AgentProcess
from tests.support.device import Device
from tests.support.images import build_and_push
from tests.support.registry import RegistryLog, repo_path
from tests.support.signing import SigningKey, SigstoreDisabled, Skopeo, copy_signature, sign

pytestmark = pytest.mark.stack

# each refused case: its tag and a part of the reason the state must give
REFUSALS = {
    "3.0-unsigned": "not signed (the registry holds no signature",
    "3.0-otherkey": "no signature by a trusted key",
    "3.0-copied": "the signature is for another image",
    "3.0-otherrepo": "the signature names another repository",
    "3.0-corrupt": "no signature by a trusted key",
}


def make_cases(repo: str, trusted: SigningKey, other: SigningKey) -> dict[str, str]:
    """Push 1.0, 2.0 (signed by ``trusted``) and the refused cases; tag -> digest."""
    digests = {tag: build_and_push(repo, tag, tag) for tag in ("1.0", "2.0", *REFUSALS)}
    sign(repo, "1.0", trusted)
    sign(repo, "2.0", trusted)
    sign(repo, "3.0-otherkey", other)
    # a valid signature of 2.0, put where 3.0-copied's signatures are looked for
    copy_signature(repo, digests["2.0"], repo, digests["3.0-copied"])
    # signed by the trusted key, for the same digest, but pushed as another repository
    sign(repo, "3.0-otherrepo", trusted, identity=f"{repo.rsplit('/', 1)[0]}/other:3.0")
    # a valid signature whose payload blob is then altered
    sign(repo, "3.0-corrupt", trusted)
    copy_signature(repo, digests["3.0-corrupt"], repo, digests["3.0-corrupt"], corrupt=True)
    return digests


def local_tags(client: docker.DockerClient, repo: str) -> set[str]:
    return {t.rsplit(":", 1)[1] for image in client.images.list(name=repo) for t in image.tags}


def sig_fetches(log: RegistryLog, repo: str, digest: str, since: int) -> int:
    tag = f"sha256-{digest.removeprefix('sha256:')}.sig"
    return len(log.matching("GET", f"/v2/{repo_path(repo)}/manifests/{tag}", since=since))


def watch(device: Device) -> Callable[[], dict[str, Any]]:
    def update() -> dict[str, Any]:
        try:
            found: dict[str, Any] = device.status()["update"]
        except (OSError, ValueError, KeyError):
            return {}
        return found
    return update


def settled_on(device: Device, tag: str) -> bool:
    try:
        status = device.status()
    except (OSError, ValueError):
        return False
    return bool(status["running"]["tag"] == tag and status["update"]["status"] == "idle"
                and device.serving() == tag)


def test_only_images_signed_by_a_trusted_key_run(
    docker_client: docker.DockerClient, unique_repo: str, container_name: str,
    registry_log: RegistryLog, tmp_path: Path,
) -> None:
    repo, name = unique_repo, container_name
    trusted = SigningKey.create(tmp_path / "keys", "trusted")
    other = SigningKey.create(tmp_path / "keys", "other")
    digests = make_cases(repo, trusted, other)
    device = Device(repo, name, tmp_path / "data")
    device.write_tag("1.0")
    agent = AgentProcess(device.agent_env(TRUSTED_KEYS=str(trusted.public), FALLBACK_TAG="",
                                          LOG_LEVEL="INFO"), tmp_path / "agent.log").start()
    update = watch(device)
    try:
        wait_until(lambda: settled_on(device, "1.0"), timeout=60, message="signed 1.0 installed")
        # -- 1. signed 2.0: updated; its signature asked once; idle checks one HEAD each --
        mark = registry_log.mark()
        device.write_tag("2.0")
        wait_until(lambda: settled_on(device, "2.0"), timeout=60, message="signed 2.0")
        assert f"signature of {digests['2.0']} verified" in agent.log()
        registry_log.sync()
        assert sig_fetches(registry_log, repo, digests["2.0"], mark) == 1
        idle = registry_log.mark()
        first = update()["last_check_at"]
        wait_until(lambda: update().get("last_check_at") not in (first, None), timeout=30,
                   message="an idle check")
        second = update()["last_check_at"]
        wait_until(lambda: update().get("last_check_at") not in (second, None), timeout=30,
                   message="another idle check")
        registry_log.sync()
        seen = [(r.method, r.path) for r in registry_log.requests(idle)
                if repo_path(repo) in r.path]
        assert seen, "no idle check reached the registry"
        assert set(seen) == {("HEAD", f"/v2/{repo_path(repo)}/manifests/2.0")}, seen
        container_id = docker_client.containers.get(name).id

        # -- 2. every forged or missing signature: refused before pulling ------------------
        for tag, reason in REFUSALS.items():
            mark = registry_log.mark()
            device.write_tag(tag)

            def refused(tag: str = tag) -> str | None:
                found = update()
                error = found.get("last_error") or ""
                return error if (found.get("error_code") == "signature_invalid"
                                 and f"refused {tag} " in error) else None

            error = wait_until(refused, timeout=30, message=f"{tag} refused")
            assert reason in error, error
            # asked once: the next checks remember the refusal
            checked = update()["last_check_at"]

            def checked_again(checked: str = checked) -> bool:
                return bool(update().get("last_check_at") != checked)

            wait_until(checked_again, timeout=30, message="a check after the refusal")
            registry_log.sync()
            assert sig_fetches(registry_log, repo, digests[tag], mark) == 1, tag
            assert registry_log.blob_gets(repo, since=mark) <= 1  # the payload, not a layer
            assert tag not in local_tags(docker_client, repo)
            app = docker_client.containers.get(name)
            assert app.id == container_id and app.status == "running"
            assert device.serving() == "2.0"
        log = agent.log()
        assert log.count("code=signature_invalid") == len(REFUSALS), log[-4000:]
        assert log.count("event update_started") == 2, log[-4000:]  # 1.0 and 2.0 only
    finally:
        agent.stop(signal.SIGKILL)


def test_rotation_two_keys_then_the_old_one_removed(
    docker_client: docker.DockerClient, unique_repo: str, container_name: str,
    tmp_path: Path,
) -> None:
    repo, name = unique_repo, container_name
    old = SigningKey.create(tmp_path / "keys", "old")
    new = SigningKey.create(tmp_path / "keys", "new", kind="ed25519")
    for tag, key in (("1.0", old), ("2.0", new)):
        build_and_push(repo, tag, tag)
        sign(repo, tag, key)
    device = Device(repo, name, tmp_path / "data")
    device.write_tag("1.0")
    both = f"{old.public},{new.public}"
    agent = AgentProcess(device.agent_env(TRUSTED_KEYS=both, FALLBACK_TAG=""),
                         tmp_path / "agent.log").start()
    try:
        wait_until(lambda: settled_on(device, "1.0"), timeout=60, message="1.0 (old key)")
        device.write_tag("2.0")
        wait_until(lambda: settled_on(device, "2.0"), timeout=60, message="2.0 (new key)")
    finally:
        agent.stop()
    agent = AgentProcess(device.agent_env(TRUSTED_KEYS=str(new.public), FALLBACK_TAG=""),
                         tmp_path / "agent2.log").start()
    update = watch(device)
    try:
        # 1.0 was verified under both keys; with the old key gone it is refused
        device.write_tag("1.0")
        error = wait_until(lambda: update().get("error_code") == "signature_invalid"
                           and update().get("last_error"), timeout=30, message="1.0 refused")
        assert "no signature by a trusted key" in str(error), error
        assert device.serving() == "2.0"
    finally:
        agent.stop(signal.SIGKILL)


def test_skopeo_policy_agrees_with_the_agent(unique_repo: str, tmp_path: Path) -> None:
    """skopeo's own ``sigstoreSigned`` policy, an independent verifier, accepts exactly
    what the agent accepts."""
    repo = unique_repo
    trusted = SigningKey.create(tmp_path / "keys", "trusted")
    other = SigningKey.create(tmp_path / "keys", "other")
    skopeo = Skopeo(tmp_path / "skopeo")
    digests = make_cases(repo, trusted, other)
    try:
        skopeo.accepts(repo, digests["2.0"], [trusted])
    except SigstoreDisabled as exc:
        pytest.skip(f"this skopeo cannot verify sigstore signatures: {exc}")
    trust = load_trusted_keys((trusted.public,))
    client = RegistryClient(repo)
    try:
        for tag, digest in digests.items():
            try:
                signed = client.signatures(digest)
            except Exception:  # noqa: BLE001 - unsigned or unreadable: refused
                agent_accepts = False
            else:
                signer, _ = judge_signatures(signed, trust, repository=repo, digest=digest)
                agent_accepts = signer is not None
            assert agent_accepts == (tag in ("1.0", "2.0")), tag
            assert skopeo.accepts(repo, digest, [trusted]) == agent_accepts, tag
    finally:
        client.close()
