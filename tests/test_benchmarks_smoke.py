"""Smoke test of benchmarks/overheads.py with tiny settings: it runs end to end (engines, bare loop, the real
trainer with monkeypatched timers) and writes a complete JSON with positive timings and a PNG."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow      # ~35 CPU-seconds (8 DeepSpeed engines + a 2-cycle trainer run): 80 s wall on the loaded 2-core box
def test_overheads_smoke(embedded_data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "overheads.py"), "--preset", "tiny", "--rounds", "2",
           "--steps", "1", "--warmup", "1", "--cycles", "2", "--cycle-steps", "2", "--data", str(embedded_data),
           "--out", str(out), "--work", str(tmp_path / "work")]
    p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=600)
    assert p.returncode == 0, f"{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    assert (out / "overheads.png").stat().st_size > 1000
    r = json.loads((out / "overheads.json").read_text())

    for key in ("command", "args", "machine", "config", "step_times", "cycle_end", "targets", "all_targets_pass",
                "notes", "run_time_s", "load"):
        assert key in r, key
    m = r["machine"]
    assert m["cores_usable"] >= 1 and m["torch_threads"] >= 1 and m["torch"] and m["deepspeed"]
    assert r["run_time_s"] > 0

    steps = r["step_times"]
    assert set(steps["order"]) == {"bare", "engine", "distilled", "engine_persist", "engine_tuned", "distilled_tuned",
                                  "teacher_fwd", "loss_ce", "loss_distill"}
    assert steps["distill_breakdown"]["teacher_forward_s"] > 0
    for name, v in steps["variants"].items():
        assert len(v["steps_s"]) == 2 and all(len(x) == 1 and x[0] > 0 for x in v["steps_s"]), name
        assert v["median_s"] > 0 and len(v["round_means_s"]) == 2, name
    for name, ratio in steps["ratios"].items():
        assert ratio["paired_median"] > 0 and ratio["of_medians"] > 0 and len(ratio["per_round"]) == 2, name

    cyc = r["cycle_end"]
    assert [c["cycle"] for c in cyc["cycles"]] == [0, 1] and cyc["plan"]["steps_per_cycle"] == 2
    for c in cyc["cycles"]:
        for part in ("train_steps_s", "end_cycle_s", "gather", "write_snapshot", "score", "write_scores",
                     "checkpoint", "snapshot_scoring_s", "snapshot_scoring_frac", "end_cycle_frac"):
            assert c[part] > 0, (c["cycle"], part)
        assert c["end_cycle_s"] >= c["snapshot_scoring_s"] + c["checkpoint"]
        assert all(c[p + "_frac"] >= 0 for p in ("gather", "score", "teacher_refresh", "perturb", "checkpoint"))
    first = cyc["cycles"][0]              # tiny preset distils from cycle 1: cycle 0's end refreshes the teacher
    assert first["teacher_refresh"] > 0 and first["perturb"] > 0
    assert cyc["by_kind"]["distilled_vs_plain_step"] > 0
    assert all(v > 0 for k, v in cyc["medians"].items() if k in ("train_steps_s", "end_cycle_s", "snapshot_scoring_s"))

    t = r["targets"]
    for key, target in (("engine_vs_bare", 1.3), ("distilled_vs_plain", 1.4), ("snapshot_scoring_vs_cycle", 0.03)):
        assert t[key]["target"] == target and t[key]["value"] > 0 and isinstance(t[key]["pass"], bool), key
    assert t["full_cycle_end_vs_cycle"]["value"] > 0
