"""benchmarks/de_honest.py: the honest data-efficiency report regenerates from the committed ledger byte for byte,
and its figures keep the invariants the method implies. Reads committed files only (~5 s, no training)."""
import json
import math

import pytest

from benchmarks import de_honest
from benchmarks.de_honest_md import markdown

R = de_honest.RESULTS


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory):
    out = tmp_path_factory.mktemp("honest")
    de_honest.write(out, R / "data_efficiency_ledger.json", R / "data_efficiency.json", plot_too=False)
    return out


@pytest.fixture(scope="module")
def res(regenerated):
    return json.loads((regenerated / "data_efficiency_honest.json").read_text())


def test_regenerates_byte_identically(regenerated):
    for name in ("data_efficiency_honest.json", "data_efficiency_honest.md"):
        assert (regenerated / name).read_bytes() == (R / name).read_bytes(), f"{name} differs from the committed copy"


def test_flop_ratio_below_epoch_ratio(res):
    """q0 pays teacher forwards that the baselines do not: per FLOP its ratio is lower than per epoch once q0
    matches the baseline after its distillation starts; matched in its first, undistilled cycles (a weak
    baseline), no teacher is paid yet and the two ratios are equal."""
    undistilled = de_honest.DISTILL_START * res["actual_epochs_per_nominal"]["q0_and_single"]
    for E, axes in res["three_way"].items():
        for name, row in axes["epoch"]["by_baseline"].items():
            e, f = row["ratio"]["per_seed"], axes["flop"]["by_baseline"][name]["ratio"]["per_seed"]
            q0_epochs = [c / r for c, r in zip(row["baseline_cost"]["per_seed"], e)]
            for fs, es, q in zip(f, e, q0_epochs):
                if row["lower_bound"] or q <= undistilled + 1e-9:
                    assert fs <= es * (1 + 1e-9), (E, name)
                else:
                    assert fs < es, (E, name)


def test_q0_flops_exceed_a_plain_run(res):
    """At any cycle past the distillation start q0 has spent more FLOPs than plain training plus scoring."""
    A = de_honest.Arms(de_honest.Ledger(R / "data_efficiency_ledger.json"), res["data"])
    r = A.q0_curve(0)[31]
    plain = A._flops(r["epochs_actual"], r["cycle"] + 1)
    teach = (r["epochs_actual"] - A.q0_curve(0)[1]["epochs_actual"]) * A.fm["tokens_per_epoch"] * A.fm["forward_per_token"]
    assert r["flops"] == pytest.approx(plain + teach)
    assert A.fm["forward_per_token"] / A.fm["train_per_token"] == pytest.approx(1 / 3, rel=0.05)


def test_actual_epochs_and_fitness_share(res):
    d = res["data"]
    steps = round(d["steps_per_epoch"])                          # 13 whole steps per 1-epoch cycle
    assert res["actual_epochs_per_nominal"]["q0_and_single"] == pytest.approx(steps * 32 / d["windows_per_epoch"])
    assert res["fitness_share"]["share_of_train"] == pytest.approx(16169 / 51802)
    assert 0.30 < res["fitness_share"]["share_of_train"] < 0.32
    assert res["fitness_share"]["paper_share_of_train"] == pytest.approx(0.00132)


def test_gain_decomposes_per_seed(res):
    for E, p in res["population"].items():
        for t, r, q in zip(p["total_gain"]["per_seed"], p["recipe_gain"]["per_seed"], p["population_gain"]["per_seed"]):
            assert t == pytest.approx(r + q), E
        assert p["population_gain"]["mean"] >= -1e-9           # the best member is never better than... itself


def test_intervals_and_verdicts():
    d = de_honest.ci([0.1, 0.2, 0.3])
    assert d["mean"] == pytest.approx(0.2)
    assert d["hi"] - d["mean"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)   # t(0.975, 2)
    assert de_honest.verdict(de_honest.ci([0.03, 0.04, 0.035])) == "worse (interval excludes 0)"
    assert de_honest.verdict(de_honest.ci([0.03, 0.05, 0.01])).startswith("no effect measured")   # |mean| > std
    assert de_honest.verdict(de_honest.ci([0.06, 0.04, -0.01])).startswith("no effect measured")
    assert de_honest.verdict(de_honest.ci([-0.01, -0.02, -0.015])) == "better (interval excludes 0)"


def test_ablation_verdicts_follow_intervals(res):
    for a in res["ablations_32"]:
        d = a["val_delta"]
        excludes = d["lo"] > 0 or d["hi"] < 0
        assert excludes != a["verdict_val"].startswith("no effect"), a["label"]


def test_markdown_has_every_budget(res):
    md = markdown(res)
    for E in ("8", "16", "32", "64"):
        assert f"| {E} |" in md
    assert "per wall second" in md and "population share" in md


def test_honest_arms_enter_every_table_once_finished_for_all_seeds(tmp_path):
    """The baselines tuned at each budget (benchmarks/de_honest_arms.py) join the ratios, the inference-matched
    rows and the strongest-baseline choices as soon as every seed has them, and not before. Synthetic entries:
    copies of the 8-epoch single model / M=2 ensemble, made 0.5 nats better so that they must become strongest."""
    doc = json.loads((R / "data_efficiency_ledger.json").read_text())
    runs = doc["runs"]
    for name in [n for n in runs if n.startswith(("sfit-", "pfit-"))]:     # the real arms, as far as they ran:
        del runs[name]                                                   # this test brings its own
    for s in (0, 1, 2):
        single = json.loads(json.dumps(runs[f"single-E8-s{s}"]))
        for p in single["eval"]["single_curve"]["curve"]:
            p["val_loss"] -= 0.5
            p["fitness_loss"] -= 0.5
        single["eval"]["single_curve"]["val_at_best_fitness_epoch"] -= 0.5
        single["eval"]["temperature"] = {"temperature": 1.1, "val_loss_calibrated":
                                         single["eval"]["single_curve"]["val_at_best_fitness_epoch"] - 0.01}
        single["kind"] = "sfit"
        runs[f"sfit-E8-s{s}"] = single
        if s < 2:                                # one seed missing: the fitness-stopped ensemble stays out
            pool = json.loads(json.dumps(runs[f"pool-L4-s{s}"]))
            pool["eval"] = {"ensemble_fitstop_M2": {**pool["eval"]["ensemble_M2"],
                                                    "val_loss": pool["eval"]["ensemble_M2"]["val_loss"] - 0.5}}
            pool["kind"] = "pfit"
            runs[f"pfit-E8-M2-s{s}"] = pool
    ledger = tmp_path / "ledger.json"
    ledger.write_text(json.dumps(doc))
    res = de_honest.compute(ledger, R / "data_efficiency.json", R)
    tw = res["three_way"]["8"]
    assert de_honest.TUNED in tw["epoch"]["by_baseline"] and de_honest.CALIBRATED in tw["epoch"]["by_baseline"]
    assert de_honest.fitstop(2) not in tw["epoch"]["by_baseline"]          # seed 2 not finished
    assert "sfit" not in json.dumps(res["three_way"]["16"])                 # only where the runs exist
    im = res["inference_matched"]["8"]
    assert im["1-calibrated"]["baseline_val"]["mean"] < im["1-tuned"]["baseline_val"]["mean"] < im["1"]["baseline_val"]["mean"]
    assert res["inference_strongest"]["8"]["1"] == "1-calibrated"
    assert im["2-fitstop"]["baseline_val"] is None and im["2-fitstop"]["missing"] == [de_honest.fitstop(2)]
    assert res["inference_strongest"]["8"]["2"] == "2"
    assert res["population"]["8"]["strongest_by_loss"] == de_honest.CALIBRATED
    assert "1-calibrated" in markdown(res)


def test_q0_member_chosen_on_fitness_comes_from_a_reproduced_study_run(tmp_path):
    """With the retention study's re-run of q0-s{s} (same fingerprint, every snapshot's val loss equal), q0 at
    K = 1 is its best snapshot on FITNESS; a re-run that differs is not used. Synthetic study ledger."""
    q0 = json.loads((R / "data_efficiency_ledger.json").read_text())["runs"]
    runs = {}
    for s in (0, 1, 2):
        curve = q0[f"q0-s{s}"]["eval"][de_honest.Q0_KEY]["curve"]
        rows = [{"cycle": c["cycle"], "val_loss": c["last_snapshot_val_loss"],
                 "fitness_loss": 5.0 - (0.1 if c["cycle"] == 5 else 0.0) + 0.001 * c["cycle"]} for c in curve]
        rows[40]["val_loss"] += 0.01                     # rounding differences grow over 64 cycles: accepted
        if s == 1:
            rows[50]["val_loss"] += 0.05                 # ... until they exceed DRIFT_TOL: budgets <= 50 only
        if s == 2:
            rows[0]["val_loss"] += 1e-3                  # seed 2's re-run started elsewhere: not the same run
        runs[f"pop-s{s}"] = {"fingerprint": q0[f"q0-s{s}"]["fingerprint"], "kind": "q0",
                             "eval": {"population_E64|k4,8": {"snapshots": rows}}}
    study = tmp_path / "study.json"
    study.write_text(json.dumps({"runs": runs}))
    L = de_honest.Ledger(R / "data_efficiency_ledger.json")
    members, check = de_honest.q0_members_from_study(L, study)
    assert sorted(members) == [0, 1] and check[2].startswith("not reproduced")
    res = de_honest.compute(R / "data_efficiency_ledger.json", R / "data_efficiency.json", R, study)
    A = de_honest.Arms(L, res["data"], study)
    for s in (0, 1):
        assert A.q0_best_member_on_fitness(8, s) == q0[f"q0-s{s}"]["eval"][de_honest.Q0_KEY]["curve"][5]["last_snapshot_val_loss"]
        assert A.q0_best_member_on_fitness(4, s) == q0[f"q0-s{s}"]["eval"][de_honest.Q0_KEY]["curve"][0]["last_snapshot_val_loss"]
    assert A.q0_best_member_on_fitness(64, 0) is not None and A.q0_best_member_on_fitness(64, 1) is None
    assert "budgets <= 50" in check[1] and "budgets <= 64" in check[0]
    assert res["inference_matched"]["8"]["1-fitbest"]["q0_topk"] is None          # seed 2 missing: no cell
    assert "population_share_fitness_chosen" not in res["population"]["8"]
    runs["pop-s2"]["eval"]["population_E64|k4,8"]["snapshots"][0]["val_loss"] -= 1e-3
    study.write_text(json.dumps({"runs": runs}))
    res = de_honest.compute(R / "data_efficiency_ledger.json", R / "data_efficiency.json", R, study)
    assert res["inference_matched"]["8"]["1-fitbest"]["q0_topk"]["n"] == 3
    p = res["population"]["8"]
    for t, r_, q in zip(p["total_gain"]["per_seed"], p["recipe_gain_fitness_chosen"]["per_seed"],
                        p["population_gain_fitness_chosen"]["per_seed"]):
        assert t == pytest.approx(r_ + q)
    assert "chosen on FITNESS (no oracle)" in markdown(res)


def _pop(gains: dict, k1: float, mix: dict) -> dict:
    return {"best_on_fitness": {"val_loss": k1, "test_loss": k1 + 0.5},
            "topk": {K: {"val_loss": v, "test_loss": v + 0.5} for K, v in mix.items()},
            "prior_by_fitness_tokens": {"held_out_tokens": 4000, "by_n": {
                n: {"held_out_loss": 5.0 - g, "gain_over_uniform": g} for n, g in gains.items()}}}


def test_fitness_size_is_decided_on_held_out_fitness_tokens():
    """default = the n with the lowest mean held-out loss when both budgets agree; floor = the size above the
    largest n whose prior lost to uniform in every seed at every budget. Synthetic study populations."""
    g32 = {"750": -0.1, "1500": -0.05, "3000": 0.02, "6000": 0.01}
    g64 = {"750": -0.01, "1500": 0.03, "3000": 0.06, "6000": 0.02}
    runs = {f"pop-s{s}": {"eval": {f"population_E{E}|k4,8": _pop(g, 4.6, {"4": 4.5, "8": 4.4})
                                   for E, g in ((32, g32), (64, g64))}} for s in (0, 1, 2)}
    fs = de_honest.fitness_size_on_fitness(runs)
    assert fs["default"] == 3000 and fs["floor"] == 1500 and fs["harmful_n"] == [750]
    assert fs["prior_loses_to_uniform_at_every_n"] == []
    runs["pop-s2"]["eval"]["population_E64|k4,8"]["prior_by_fitness_tokens"]["by_n"]["750"]["gain_over_uniform"] = 0.01
    assert de_honest.fitness_size_on_fitness(runs)["floor"] == 750         # no size hurt everywhere: no floor
    g64["6000"] = 0.2
    runs = {f"pop-s{s}": {"eval": {f"population_E{E}|k4,8": _pop(g, 4.6, {"4": 4.5, "8": 4.4})
                                   for E, g in ((32, g32), (64, g64))}} for s in (0, 1, 2)}
    assert de_honest.fitness_size_on_fitness(runs)["default"] is None          # the budgets disagree: not decided
    assert de_honest.fitness_size_on_fitness({}) is None


def test_committed_fitness_size_decision_is_the_code_default(res):
    """q0ds's default fitness size and warning floor are what the committed fitness-only figures decide."""
    row = next(d for d in res["defaults_on_fitness"] if d["default"].startswith("fitness-set size"))
    assert row["matches_code"], row


def test_population_split_on_one_run_decomposes(res):
    for E, p in res["population_in_study"].items():
        for K in ("4", "8"):
            k = p[f"K{K}"]
            for t, r_, q in zip(k["total_gain"]["per_seed"], p["recipe_gain"]["per_seed"], k["population_gain"]["per_seed"]):
                assert t == pytest.approx(r_ + q), (E, K)


def test_budget_grids_report_the_fitness_best_point(res):
    for E, g in res["budget_grids"].items():
        assert g["best_on_fitness"]["fitness_loss"] == min(p["fitness_loss"] for p in g["points"]), E
        for ax in g["best_on_edge_of_finished_points"]:
            vals = [p[ax] for p in g["points"]]
            assert g["best_on_fitness"][ax] in (min(vals), max(vals)), (E, ax)
