"""Smoke test of benchmarks/data_efficiency.py with a minuscule setting (tiny model, one 1-epoch budget, a
1-point tuning grid, a 2-member ensemble, the ablation reference + one ablation): every run goes through the
real deepspeed launcher, the baselines wait for the tuned recipe, the report has per-seed cells, spreads,
epochs-to-match and paired ablation deltas, both PNGs are written, and a rerun in a new work dir trains only the arm whose ledger entry no longer
matches (resumable from the committed ledger)."""
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
    args = ["--quick", "--budgets", "1", "--tune-wds", "0.1", "--ablation-arms", "nodistill",
            "--data", embedded_data, "--work", work, "--out", out]
    stdout = _run(args)
    assert "Epochs-to-match" in stdout and "Ablations at 1 epochs" in stdout and "tuned single-model recipe" in stdout
    for png in ("data_efficiency.png", "data_efficiency_ablations.png"):
        assert (out / png).stat().st_size > 1000, png
    r = json.loads((out / "data_efficiency.json").read_text())
    assert r["incomplete_runs"] == [] and r["failed_jobs"] == []
    assert r["cells_complete"] == r["cells_planned"] and all(r["cells"].values())
    assert r["tuning"]["selected_on"] == "fitness set" and r["tuning"]["recipe"] == {"lr": 3e-3, "wd": 0.1}
    row = r["table"]["1"]
    for key in ("single_best_epoch", "ensemble", "q0", "q0_uniform_prior", "q0_topk_on_fitness"):
        assert 0 < row[key]["mean"] < 10 and row[key]["n"] == 1, key
    assert row["ensemble_best_M"] == 2 and row["strongest"] in ("single", "ensemble")
    assert set(row["prior_gain_by_fitness_tokens"]) >= {"1500", "3000"}
    for name in ("strongest", "single", "ensemble"):
        e = r["epochs_to_match"]["1"][name]
        assert len(e["per_seed"]) + 0 == 1
        m = e["per_seed"]["0"]
        assert m["ratio"] is None or m["ratio"] > 0
    abl = {a["name"]: a for a in r["ablations"]}
    assert abl["nodistill"]["n"] == 1 and abl["nodistill"]["delta"]["mean"] == pytest.approx(
        abl["nodistill"]["val_loss"]["mean"] - abl["ref"]["val_loss"]["mean"])
    assert "prefix_vs_planned" in abl and "uniform_prior" in abl

    # a new session: the work dir is gone, the committed ledger remains, and one arm's setting changed (its
    # ledger fingerprint no longer matches): only that arm is trained again (1 of the base jobs), everything
    # else comes from the ledger alone, and the report has the same numbers (the retrained arm is deterministic)
    ledger = json.loads((out / "data_efficiency_ledger.json").read_text())
    assert set(ledger["runs"]) == set(r["train_process_s_by_run"]) and ledger["tuned"]["recipe"] == r["tuning"]["recipe"]
    assert all(e["fingerprint"] and e["eval"] for e in ledger["runs"].values())
    import shutil
    shutil.rmtree(work)
    ledger["runs"][next(n for n in ledger["runs"] if n.startswith("q0-"))]["fingerprint"] = "other"
    (out / "data_efficiency_ledger.json").write_text(json.dumps(ledger))
    fresh = _run(args + ["--max-tier", "0"])
    assert "1 base job(s) to train now" in fresh, fresh[-3000:]
    r2 = json.loads((out / "data_efficiency.json").read_text())
    for key in ("table", "epochs_to_match", "ablations", "cells", "tuning"):
        assert r2[key] == r[key], key
    _run(args + ["--report-only"])
    assert json.loads((out / "data_efficiency.json").read_text())["table"] == r["table"]
