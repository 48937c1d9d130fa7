"""The rollout store: one controller by flock (freed when its holder is SIGKILLed),
records written atomically and read back, planted files refused."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edge_agent.rollout import plan
from edge_agent.rollout.spec import parse_spec
from edge_agent.rollout.store import RolloutStore
from tests.support import REPO_ROOT

HOLD = ("import sys, time\nfrom pathlib import Path\n"
        "from edge_agent.rollout.store import RolloutStore\n"
        "store = RolloutStore(Path(sys.argv[1]))\nstore.prepare()\n"
        "print(store.acquire(), flush=True)\ntime.sleep(60)\n")


def test_one_controller_at_a_time_and_the_lock_dies_with_its_holder(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "True"
        store = RolloutStore(tmp_path)
        assert store.acquire() is False  # the other process drives rollouts
        holder.kill()  # SIGKILL: no chance to release anything
        holder.wait(10)
        assert store.acquire() is True
        store.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_a_record_round_trips_and_a_planted_link_is_refused(tmp_path: Path) -> None:
    store = RolloutStore(tmp_path)
    store.prepare()
    spec = parse_spec({"tag": "2.0", "target": {"devices": ["a", "b"]}, "waves": [1]})
    rollout = plan.new_rollout("ro-20240101000000-abcd", spec, [["a"], ["b"]], 1.7e9)
    store.save(rollout)
    (tmp_path / "ro-20240101000001-abcd.json").symlink_to("/etc/passwd")
    (tmp_path / "ro-20240101000002-abcd.json").write_text("{not json")
    loaded = store.load_all()
    assert [r.id for r in loaded] == [rollout.id]
    assert loaded[0].document() == rollout.document()
