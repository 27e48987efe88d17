"""Clean exits of 2-rank launches: kill + relaunch, several times; every completed launch must exit 0 (a rank
dying with "terminate called without an active exception" turns it into 250), every kill must fail, and no
launch may leave DeepSpeed's shm all-reduce buffers in /dev/shm (run_launcher checks each launch)."""
from pathlib import Path

import pytest

from conftest import read_jsonl, run_launcher

ROUNDS = 1      # more kill + relaunch rounds, each relaunch required to exit 0: test_e2e_deepspeed's fault chain
CRASH_AT = 2    # the cycle-0 end: snapshot, checkpoint and (distill.start_cycle=1) the teacher refresh


@pytest.mark.slow
def test_kill_and_relaunch_always_exits_cleanly(make_config):
    codes = []
    for i in range(ROUNDS):
        path, cfg = make_config("schedule.cycles=2", "schedule.cycle_steps=2", "train.ckpt_every=1",
                                "distill.start_cycle=1", "train.micro_batch=2", "train.global_batch=4",
                                run=f"round{i}", name=f"round{i}.json")
        killed = run_launcher(path, 0, env={"Q0DS_FAULT": f"crash_at_step={CRASH_AT}"}, check=False)
        done = run_launcher(path, 0, check=False)
        again = run_launcher(path, 0, check=False) if i == ROUNDS - 1 else done   # a finished base: exit 0
        codes.append((killed.returncode, done.returncode, again.returncode))
        assert "terminate called" not in done.stderr + again.stderr, done.stderr[-3000:]
        assert (Path(cfg.run_dir) / "bases/base-00/done.json").is_file()
        steps = [r["step"] for r in read_jsonl(Path(cfg.run_dir) / "bases/base-00/metrics.jsonl") if "event" not in r]
        assert steps == [1, 2, 3, 4]
    assert all(k != 0 and d == 0 and a == 0 for k, d, a in codes), codes
