"""A tiny `q0ds run` with 2 bases and both baselines, end to end through the deepspeed launcher (conftest's
trained_population: the session's shared run, completed by `q0ds run`); then the prior, the top-K mixture
(checked against a direct computation from the loaded models), report and generate."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(trained_population):
    """The session's trained run with 2 bases (base 0 on 2 ranks), both baselines, prior, eval and report."""
    return Path(trained_population.cfg.run_dir), trained_population.cfg


def test_run_produces_population_prior_eval_and_report(run):
    run_dir, cfg = run
    prior = json.loads((run_dir / "prior.json").read_text())
    assert len(prior["members"]) == 8 and {m.split("/")[0] for m in prior["members"]} == {"base-00", "base-01"}
    assert sum(prior["weights"]) == pytest.approx(1.0)
    assert prior["fit_loss"] <= min(prior["baselines"]["uniform"], prior["baselines"]["best_single"]) + 1e-9
    ev = json.loads((run_dir / "eval.json").read_text())
    assert [r["k"] for r in ev["topk"]] == [1, 2, 4, 8]
    assert set(ev["baselines"]) == {"single", "ensemble"} and ev["baselines"]["ensemble"]["members"] == 2
    # 2 bases x 4 cycles of 3 steps at batch 4, 8, 8, 4 (the block-triangular schedule: small_batch=4)
    assert ev["epochs_spent"] == pytest.approx(2 * 3 * (4 + 8 + 8 + 4) / _windows(cfg))
    rep = json.loads((run_dir / "report.json").read_text())
    assert {"plots/val_vs_epochs.png", "plots/val_vs_k.png", "plots/prior_weights.png", "plots/schedule.png"} <= set(rep["plots"])
    for p in rep["plots"]:
        assert (run_dir / p).stat().st_size > 5000
    assert "## Headline" in (run_dir / "report.md").read_text()
    # the headline K is chosen on the fitness set, never on validation
    assert ev["k_on_fitness"] == min(ev["topk"], key=lambda r: (r["fitness_weighted"], r["k"]))["k"]
    assert rep["headline"]["q0_topk"]["k"] == ev["k_on_fitness"]
    assert rep["headline"]["strongest_baseline"]["name"] in ("single", "ensemble")


def _windows(cfg):
    from q0ds.data import PreparedData
    return PreparedData.open(cfg.data).windows_per_epoch(cfg.train.seq_len)


def test_topk_mixture_matches_direct_computation_from_models(run):
    """eval.json's weighted K=2 loss == -mean log sum_i w_i p_i computed from the two loaded HF models."""
    from q0ds.data import PreparedData
    from q0ds.ensemble import MixtureLM
    run_dir, cfg = run
    ev = json.loads((run_dir / "eval.json").read_text())
    row = next(r for r in ev["topk"] if r["k"] == 2)
    lm = MixtureLM.from_run(run_dir, k=2)
    assert [f"{d.parent.parent.name}/{d.name}" for d in lm.dirs] == row["members"]
    prior = json.loads((run_dir / "prior.json").read_text())
    assert lm.weights.tolist() == pytest.approx(prior["topk"]["2"]["weights"])
    windows, mask = PreparedData.open(cfg.data).eval_windows("val", cfg.train.seq_len)
    lp = torch.cat([lm.logprobs(windows[i:i + 16, :-1]).gather(-1, windows[i:i + 16, 1:, None]).squeeze(-1)
                    for i in range(0, len(windows), 16)])
    assert -lp[mask].double().mean().item() == pytest.approx(row["weighted"], abs=2e-5)


def test_generate_and_k_errors(run):
    run_dir, _ = run
    p = run_cli("generate", "--run", run_dir, "--k", "2", "--prompt", "The import statement", "--max-new-tokens", "8")
    assert p.stdout.startswith("The import statement")
    p = run_cli("eval", "--run", run_dir, "--k", "1,9", check=False)
    assert p.returncode == 2 and "larger than the population (8 members)" in p.stderr


def test_corrupt_snapshot_is_refused_and_nothing_changes(run, tmp_path):
    run_dir, _ = run
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    victim = copy / "bases/base-01/snapshots/cycle-0001/model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    before = (copy / "prior.json").read_bytes()
    p = run_cli("fit-prior", "--run", copy, check=False)
    assert p.returncode == 2 and "corrupt" in p.stderr and "cycle-0001" in p.stderr
    assert "Traceback" not in p.stderr
    assert (copy / "prior.json").read_bytes() == before


def test_fit_prior_refuses_mixed_fitness_sets_and_empty_runs(run, tmp_path):
    run_dir, _ = run
    p = run_cli("fit-prior", "--run", tmp_path / "empty", check=False)
    assert p.returncode == 2 and "no scored snapshots" in p.stderr
    copy = tmp_path / "mixed"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("checkpoints"))
    meta_path = copy / "bases/base-00/snapshots/cycle-0000/snapshot.json"
    meta = json.loads(meta_path.read_text())
    meta["fitness_fingerprint"] = "somethingelse"
    meta_path.write_text(json.dumps(meta))
    p = run_cli("fit-prior", "--run", copy, check=False)
    assert p.returncode == 2 and "different fitness sets" in p.stderr
