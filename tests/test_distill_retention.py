"""Smoke test of benchmarks/distill_retention.py (issue 21) in its --quick setting (tiny model, one seed, one
population through the real deepspeed launcher, its two prefix populations made by hard links + `q0ds fit-prior`,
4 one-factor arms (ref, T2, ep1, cache32) + no-teacher controls through `q0ds distill-ensemble`, the
fitness-chosen grid, the teacher cache's truncation error per population): the JSON's structure; every retention,
control retention and compute share recomputed from the numbers the ledger stores (the formula); the truncation
table from the ledger's measurements; a rerun in an EMPTY work dir trains nothing (the ledger); `--report-only` writes the same JSON
byte for byte."""
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, timeout=600):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "distill_retention.py"), *map(str, args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-5000:]}"
    return p.stdout


def _diff(a, b, path="") -> list[str]:
    """Paths where two JSON values differ (with both values), for a readable failure."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str) for d in
                (_diff(a.get(k), b.get(k), f"{path}/{k}") if k in a and k in b else [f"{path}/{k} only in one"])]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _ret(best, model, mix):
    from benchmarks.dr_report import MIN_GAIN_NATS
    return (best - model) / (best - mix) if best - mix > MIN_GAIN_NATS else None


@pytest.mark.slow
def test_distill_retention_quick(embedded_data, tmp_path):
    out = tmp_path / "out"
    common = ["--quick", "--data", embedded_data, "--out", out]
    stdout = _run(common + ["--work", tmp_path / "w1"])
    assert "start pop-s0" in stdout and "population pop-E" in stdout
    res = json.loads((out / "distill_retention.json").read_text())
    ledger = json.loads((out / "distill_retention_ledger.json").read_text())
    for png in ("distill_retention.png",):
        assert (out / png).stat().st_size > 1000
    assert "## Goal check" in (out / "distill_retention.md").read_text()
    assert res["incomplete_runs"] == [] and res["cells_complete"] == res["cells_planned"] > 0

    # populations: the prefix (first budget) is a strict prefix of the last one, snapshot by snapshot
    st = res["settings"]
    E0, E1 = (f"{E:g}" for E in st["budgets"])
    p0, p1 = res["populations"][E0]["0"], res["populations"][E1]["0"]
    assert p0["members"] == round(st["budgets"][0] / st["cycle_epochs"]) < p1["members"]
    assert p1["snapshots"][:p0["members"]] == [dict(r, prior_weight=q["prior_weight"]) for r, q in
                                               zip(p0["snapshots"], p1["snapshots"])]
    for p in (p0, p1):
        assert p["prefix"]["members"] == [r["member"] for r in p["snapshots"]]
        assert abs(sum(r["prior_weight"] for r in p["snapshots"]) - 1) < 1e-6
        bf = min(p["snapshots"], key=lambda r: r["fitness_loss"])
        assert p["best_on_fitness"]["member"] == bf["member"] and p["best_on_fitness"]["val_loss"] == bf["val_loss"]
        assert p["best_on_val_oracle"]["val_loss"] == min(r["val_loss"] for r in p["snapshots"])
        assert len(p["topk"]["2"]["members"]) == 2

    # every row's numbers from the ledger's stored numbers, by the formula
    of = res["one_factor"]
    assert [r["arm"] for r in of["rows"]] == ["ref", "T2", "ep1", "cache32"]
    assert all(r["n"] == 1 for r in of["rows"])
    rows = of["rows"] + [r for rs in res["grid"].values() for r in rs]
    assert {c for c in res["grid"]} == {f"E{E0}/k2", f"E{E1}/k2"} and all(res["grid"].values())
    fm = res["flop_model"]
    from benchmarks import dr_arms
    for r in rows:
        s, E = r["settings"], r["budget"]
        pop = res["populations"][f"{E:g}"]["0"]
        stud = ledger["runs"][dr_arms.student_name(E, s, 0)]["eval"]["student"]
        ctl = ledger["runs"][dr_arms.control_name(E, dr_arms.control_settings(s, 2), 0)]["eval"]["student"]
        assert ctl["command_report"]["alpha"] == 0.0 and stud["command_report"]["alpha"] == s["alpha"]
        best, mix = pop["best_on_fitness"]["val_loss"], pop["topk"]["2"]["val_loss"]
        seed = r["per_seed"]["0"]
        assert seed["student_val"] == stud["val_loss"] and seed["mixture_val"] == mix and seed["best_member_val"] == best
        for key, want in (("retained", _ret(best, stud["val_loss"], mix)),
                          ("control_retained", _ret(best, ctl["val_loss"], mix)),
                          ("fitness_retained", _ret(pop["best_on_fitness"]["fitness_loss"], stud["fitness_loss"],
                                                    pop["topk"]["2"]["fitness_loss"]))):
            assert seed[key] == pytest.approx(want) if want is not None else seed[key] is None, key
            assert (r[key] or {}).get("mean") == seed[key] if seed[key] is not None else r[key] is None
        share = stud["epochs_actual"] * (fm["train_per_token"] + 2 * fm["forward_per_token"]) / (
            pop["epochs_actual"] * fm["train_per_token"] + pop["teacher_epochs_actual"] * fm["forward_per_token"])
        assert seed["compute_share"] == pytest.approx(share)
        assert seed["teacher_effect_val"] == pytest.approx(ctl["val_loss"] - stud["val_loss"])
    assert res["selection"]["families"].keys() == {"temperature", "length", "teacher"}
    assert res["curves"] and res["statement"]

    # the teacher cache's approximation: the table is the ledger's measurements; more N covers more mass
    from benchmarks.dr_report import truncation_key
    import argparse
    ta = res["teacher_cache_approximation"]
    assert set(ta["cells"]) == {f"E{E0}/k2", f"E{E1}/k2"}
    defined = []
    for cell, c in ta["cells"].items():
        E = float(cell[1:].split("/")[0])
        key = truncation_key(argparse.Namespace(ks=[2]), E)
        m = ledger["runs"]["pop-s0"]["eval"][key]["2"]
        assert m["windows"] == 64 and m["k"] == 2 and m["members"] == res["populations"][f"{E:g}"]["0"]["topk"]["2"]["members"]
        assert [r["N"] for r in c["rows"]] == [8, 32, 128] and c["n"] == 1 and c["exact_kl"]["mean"] == m["exact_kl"]
        for r in c["rows"]:
            b = m["by_n"][str(r["N"])]
            assert r["mass_mean"]["mean"] == b["mass_mean"]
            assert r["loss_speedup"]["mean"] == m["timing"]["cached"][str(r["N"])]["loss_speedup"]
            for k in ("relative_error", "grad_cosine"):      # None (shown -) where the teacher is the start
                assert (r[k] or {}).get("mean") == b[k] and (b[k] is None) == (m["undefined"] is not None)
        mass = [r["mass_mean"]["mean"] for r in c["rows"]]
        assert mass[0] < mass[1] < mass[2] <= 1 + 1e-6
        if m["undefined"] is None:
            defined.append(cell)
            assert c["rows"][2]["relative_error"]["mean"] < c["rows"][0]["relative_error"]["mean"]
    assert defined, "every quick population's prior puts all its weight on one member"
    a = ta["cache32_vs_reference"]
    ref_row, c32 = of["rows"][0]["per_seed"]["0"], of["rows"][3]["per_seed"]["0"]
    assert a["n"] == 1 and a["wall_ratio"]["mean"] == pytest.approx(c32["wall_s"] / ref_row["wall_s"])
    assert "## Teacher cache: the top-N truncation" in (out / "distill_retention.md").read_text()

    # a later session with an empty work dir: everything is in the ledger, nothing is trained
    args2 = common + ["--work", tmp_path / "w2"]
    stdout = _run(args2)
    assert "0 base job(s) to train now" in stdout and "start " not in stdout, stdout[-3000:]
    assert not (tmp_path / "w2" / "students").exists()
    first = (out / "distill_retention.json").read_bytes()
    again = json.loads(first)
    diffs = _diff(res["one_factor"], again["one_factor"], "one_factor") + _diff(res["grid"], again["grid"], "grid")
    # every number but the measured wall times must be the same; those come from the ledger's job timings
    # (checked below), which a job's own timing file may have moved past in the first run
    assert not [d for d in diffs if "wall_s" not in d], f"the ledger-only rerun differs from the first run: {diffs[:10]}"
    ledger = json.loads((out / "distill_retention_ledger.json").read_text())["runs"]
    for row in again["one_factor"]["rows"]:
        for seed, r in row["per_seed"].items():
            name = dr_arms.student_name(row["budget"], row["settings"], int(seed))
            assert r["wall_s"] == round(sum(v["seconds"] for v in ledger[name]["timing"].values()), 1), name
    _run(args2 + ["--report-only"])
    assert (out / "distill_retention.json").read_bytes() == first


def test_interval_is_the_t_interval():
    """benchmarks.common.ci (a t table: scipy is not a dependency) is the 95% Student t interval where scipy
    exists; dr_report keeps a single seed's mean, de_honest drops it."""
    from benchmarks import de_honest
    from benchmarks.common import T975, ci as common_ci
    from benchmarks.dr_report import ci, retention
    t = pytest.importorskip("scipy.stats").t
    for df, q in T975.items():
        assert q == pytest.approx(t.ppf(0.975, df), abs=1e-6)
    for xs in ([0.5, 0.7], [0.61, 0.83, 0.72], [0.1 * i for i in range(1, 14)]):
        a = ci(xs)
        h = t.ppf(0.975, len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
        assert a == common_ci(xs) and a["mean"] == pytest.approx(statistics.fmean(xs))
        assert a["hi"] - a["mean"] == pytest.approx(h, rel=1e-6)
    assert ci([0.4])["lo"] is None and ci([None]) is None and de_honest.ci([0.4]) is None
    assert retention(5.0, 4.95, 4.9) == pytest.approx(0.5) and retention(5.0, 4.9, 5.0 - 1e-6) is None


def test_prior_by_fitness_tokens_fits_on_the_front_and_scores_the_held_out_tail():
    import torch
    from benchmarks import dr_report
    g = torch.Generator().manual_seed(0)
    n = 16169
    F = torch.rand(3, n, generator=g) * 0.05 + torch.tensor([[0.30], [0.05], [0.05]])   # member 0 is better
    r = dr_report.prior_by_fitness_tokens(F)
    assert sorted(map(int, r["by_n"])) == [750, 1500, 3000, 6000, 12000]        # 12000 <= 16169 - 4000
    for row in r["by_n"].values():
        assert row["gain_over_uniform"] > 0.5                                    # weight moves to member 0
    F2 = F.clone()
    F2[0, :n - dr_report.FITNESS_HELD_OUT] = 0.01                               # the front now says member 0 is worst
    r2 = dr_report.prior_by_fitness_tokens(F2)
    assert r2["uniform_held_out_loss"] == pytest.approx(r["uniform_held_out_loss"])   # the tail is untouched
    assert all(row["gain_over_uniform"] < 0 for row in r2["by_n"].values())     # fitted on the front only


def test_lr_variant_changes_only_its_own_students():
    """The student-LR arm passes optim.lr and tags its student and control names; the reference's overrides (the
    ledger's fingerprints of every finished student) are exactly as before the arm existed."""
    from benchmarks import dr_arms
    ref, lr = dr_arms.settings_of("ref"), dr_arms.settings_of("lr1e-3")
    assert dr_arms.overrides_of(ref, 1.0) == ["ensemble.init=top1", "distill.alpha=0.9", "distill.temperature=1.0",
                                              "schedule.cycles=2", "schedule.cycle_epochs=1.0"]
    assert dr_arms.overrides_of(lr, 1.0)[-1] == "optim.lr=0.001"
    assert dr_arms.student_name(32, ref, 0) == "st-E32-k4-top1-a0.9-T1-ep2-c0-s0"
    assert dr_arms.student_name(32, lr, 0).endswith("-c0-lr0.001-s0")
    c = dr_arms.control_settings(lr, 4)
    assert dr_arms.control_name(32, c, 0) == "ctl-E32-top1-ep2-lr0.001-s0"
    assert dr_arms.overrides_of(c, 1.0)[-1] == "optim.lr=0.001"
    assert dr_arms.control_name(32, dr_arms.control_settings(ref, 4), 0) == "ctl-E32-top1-ep2-s0"
