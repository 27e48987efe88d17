"""Smoke test of benchmarks/data_efficiency.py with a minuscule setting (tiny model, one 1-epoch budget, a
2-member ensemble, one ablation, one alternative allocation): it trains every arm through the real deepspeed
launcher, evaluates with q0ds's population code, writes a complete JSON and both PNGs, and a rerun trains
nothing (resumable)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, timeout=900):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "data_efficiency.py"), *map(str, args)]
    p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=timeout)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-5000:]}"
    return p.stdout


@pytest.mark.slow
def test_data_efficiency_smoke(embedded_data, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    args = ["--quick", "--budgets", "1", "--ablation-budget", "1", "--ablation-arms", "q0-nodistill",
            "--max-alternatives", "1", "--members", "2", "--data", embedded_data, "--work", work, "--out", out]
    stdout = _run(args)
    assert "Epochs-to-match" in stdout and "Ablations at E=1" in stdout
    for png in ("data_efficiency.png", "data_efficiency_ablations.png"):
        assert (out / png).stat().st_size > 1000, png
    r = json.loads((out / "data_efficiency.json").read_text())
    for key in ("command", "settings", "machine", "allocations", "results", "aggregate", "epochs_to_match",
                "ablations", "allocations_compared", "wall_time_s", "train_process_s_by_arm"):
        assert key in r, key
    assert r["incomplete_arms"] == [] and r["failed_jobs"] == []
    arms = {x["arm"] for x in r["results"]}
    assert {"q0", "single", "ensemble", "q0-nodistill"} <= arms and any(a.startswith("alloc-") for a in arms)
    agg = r["aggregate"]
    for arm, key in (("q0", "val_loss"), ("single", "best_val_loss"), ("ensemble", "val_loss")):
        v = agg[arm]["1"][key]["mean"]
        assert 0 < v < 10, (arm, v)
    assert agg["single"]["1"]["saturation_epoch"]["mean"] > 0
    assert agg["ensemble"]["1"]["val_loss"]["n"] == 1
    q0 = next(x for x in r["results"] if x["arm"] == "q0")
    assert q0["allocation"]["bases"] == 1 and q0["prefix_curve"] and q0["members"] == q0["allocation"]["cycles"]
    assert all(x["train_process_s"] > 0 for x in r["results"])
    for name in ("ensemble", "single_best"):
        m = r["epochs_to_match"][name]["1"]
        assert "measured" in m and "prefix" in m
        assert m["measured"]["ratio"] is None or m["measured"]["ratio"] > 0
    labels = [x["label"] for x in r["ablations"]]
    assert labels[0].startswith("q0") and "no distillation" in labels and "uniform prior, all members" in labels
    assert r["allocations_compared"][0]["name"] == "planner" and len(r["allocations_compared"]) == 2

    again = _run(args)                      # resumable: everything finished, nothing is retrained
    assert "0 base job(s) to train" in again
