"""Signed images: the idle agent's RSS with TRUSTED_KEYS set, before and after an
update, next to one without keys; and the registry requests the signature check adds.

Two standalone agents (tag file), each with its own repository and container, at
POLL_INTERVAL=0.1: one without keys, one with TRUSTED_KEYS (an ECDSA P-256 key). Both
install 1.0 (signed), idle ``--seconds``, update to 2.0 (signed), idle again. RSS is the
median of samples every 2 s in each idle window. The requests for the signature are
counted from the registry's log during the update to 2.0 (the agent's GETs: the size
estimate's manifest and config, and with keys the signature manifest and payload).

Needs the stack (scripts/stack). Prints a table and writes bench/results/signed.json.
Run: python -m bench.bench_signed [--seconds 30]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import docker

from bench.common import rss_mb, table, wait_for, write_results
from tests.support.agent_process import AgentProcess
from tests.support.containers import remove_test_containers
from tests.support.device import Device
from tests.support.images import build_and_push, remove_repo_images
from tests.support.registry import RegistryLog, repo_path
from tests.support.signing import SigningKey, sign


def idle_rss(agent: AgentProcess, seconds: float) -> float:
    assert agent.proc is not None
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append(rss_mb(agent.proc.pid))
        time.sleep(2)
    return statistics.median(samples)


def settled(device: Device, tag: str) -> bool:
    try:
        status = device.status()
    except (OSError, ValueError):
        return False
    return bool(status["running"]["tag"] == tag and status["update"]["status"] == "idle")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="each idle window")
    args = parser.parse_args()
    client = docker.from_env(version="auto")
    log = RegistryLog()
    run = uuid.uuid4().hex[:8]
    rows = []
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        key = SigningKey.create(Path(tmp) / "keys", "fleet")
        for mode in ("no keys", "TRUSTED_KEYS"):
            slug = f"bsig{run}{'k' if mode != 'no keys' else 'n'}"
            repo, name = f"127.0.0.1:5000/{slug}/app", f"edge-test-{slug}"
            for tag in ("1.0", "2.0"):
                build_and_push(repo, tag, tag)
                sign(repo, tag, key)
            device = Device(repo, name, Path(tmp) / slug)
            device.write_tag("1.0")
            extra = {"TRUSTED_KEYS": str(key.public)} if mode != "no keys" else {}
            agent = AgentProcess(device.agent_env(POLL_INTERVAL="0.1", FALLBACK_TAG="",
                                                  LOG_LEVEL="INFO", **extra),
                                 Path(tmp) / f"{slug}.log").start()
            try:
                wait_for(functools.partial(settled, device, "1.0"), 90, "1.0")
                before = idle_rss(agent, args.seconds)
                mark = log.mark()
                device.write_tag("2.0")
                wait_for(functools.partial(settled, device, "2.0"), 90, "2.0")
                log.sync()
                # the agent's own GETs (the daemon's pull has another user agent)
                sig = [r for r in log.requests(mark) if repo_path(repo) in r.path
                       and r.method == "GET" and r.user_agent == "edge-agent"]
                after = idle_rss(agent, args.seconds)
            finally:
                agent.stop()
                remove_test_containers(client, slug, name, repo)
                remove_repo_images(repo, client=client)
            results[mode] = {"rss_before_mib": before, "rss_after_mib": after,
                             "signature_requests": float(len(sig))}
            rows.append([mode, before, after, len(sig)])
    print(table(rows, ["agent", "idle RSS MiB at 1.0", "idle RSS MiB after update to 2.0",
                       "agent GETs during the update"]))
    write_results("signed", results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
