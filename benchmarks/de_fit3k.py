"""The data-efficiency headline with a fitness set at about the paper's proportion, reported on val AND test
(issue 20). Every decision reads only the first 3,000 fitness tokens (5.8% of the 51,802 training tokens);
every loss is reported on val and on the test split that no decision reads. Trains nothing.

    .venv/bin/python benchmarks/de_fit3k.py          # evaluates what the work dirs hold (cached), then reports
    .venv/bin/python benchmarks/de_fit3k.py --n 1500 --out /tmp/x

Why a subset of the fitness set and not a new 3,000-token split: training is capped at 55k tokens
(--train-tokens), so a 3k split would train on the same number of tokens, only other documents; the subset
keeps every trained model of the 16k benchmark, so the two fitness sizes are compared on the same runs (a
paired comparison without data noise), and the other 13k fitness tokens are read by nothing.

What reads the 3,000 tokens: q0's prior (refitted at every cycle, the same fit as de_eval), its top-K and its
K = 1 member (the snapshot with the lowest fitness loss); the tuned single model's stop epoch and temperature;
every ensemble member's stop epoch. What does not: the baselines' LR / WD, chosen on all 16,180 fitness tokens
(a better-informed choice, in their favour; the table `grid_choice` shows what 3k would have picked).

Runs (files in the work dirs; their numbers cached in data_efficiency_fit3k_evals.json, so a fresh clone reports
from the cache alone):
  q0        benchmarks/work/distill_retention/pop-s{s}: the retention study's re-run of q0-s{s} (same settings
            fingerprint, same data); every snapshot scored on fitness, val and test. Its costs (epochs, FLOPs,
            wall) are q0-s{s}'s, from the data-efficiency ledger (same steps).
  baselines the budget-tuned arms of benchmarks/de_honest_arms.py (sfit, pfit, pmem; tuneE for grid_choice).
            The 16-epoch-recipe arms (single, pool) are not here: their files are gone and they have no test
            scores.
  seeds 3-4 benchmarks/de_more_seeds.py's runs (q0-s3/4 themselves, and the baselines of the cells it
            serves), for the n = 5 cells (`more_seeds`).
Outputs: data_efficiency_fit3k.json, data_efficiency_fit3k.md and data_efficiency_fit3k_test.png (test loss vs
forward passes per token) in benchmarks/results.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, ci, write_json  # noqa: E402
from benchmarks import de_honest as H  # noqa: E402
from benchmarks.de_eval import _nll  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "benchmarks" / "work" / "data_efficiency_v2"
STUDY_WORK = ROOT / "benchmarks" / "work" / "distill_retention"
CACHE = RESULTS / "data_efficiency_fit3k_evals.json"
SEEDS_LEDGER = RESULTS / "data_efficiency_seeds_ledger.json"      # benchmarks/de_more_seeds.py
N_FIT = 3000
SPLITS = ("val", "test")
FORMAT = 1


# ---- per-run numbers from the score files (per-token probabilities of every snapshot) ----

def _scores(run_dir: Path):
    """(snapshot dirs, metas, {split: [M, N] probabilities}) in list_snapshots order (base, cycle)."""
    import torch
    from q0ds.snapshot import list_snapshots, load_scores, read_meta
    snaps = list_snapshots(run_dir)
    return snaps, [read_meta(s) for s in snaps], {sp: torch.stack([load_scores(s, sp) for s in snaps])
                                                   for sp in ("fitness",) + SPLITS}


def _row(S, i: int, n: int) -> dict:
    return {"fitness_n": _nll(S["fitness"][i, :n]), "fitness_all": _nll(S["fitness"][i]),
            **{sp: _nll(S[sp][i]) for sp in SPLITS}}


def eval_single(run_dir: Path, n: int, calibrate: bool) -> dict:
    """A run with a snapshot every epoch: every epoch's losses; the epoch chosen on the first n fitness tokens;
    with calibrate, one temperature fitted on those n tokens at that epoch (as de_eval.temperature_calibrated)."""
    snaps, metas, S = _scores(run_dir)
    curve = [{"epoch": m["epoch"], **_row(S, i, n)} for i, m in enumerate(metas)]
    i = min(range(len(curve)), key=lambda j: curve[j]["fitness_n"])
    out = {"curve": curve, "chosen": i}
    if calibrate:
        out["calibrated"] = _temperature(run_dir, snaps[i], n, curve[i]["fitness_n"])
    return out


def _temperature(run_dir: Path, snap: Path, n: int, stored_fitness_n: float) -> dict:
    from benchmarks.de_eval import fit_temperature, nll_at, snapshot_logits
    logits = snapshot_logits(run_dir, snap)
    zf, yf = logits("fitness")
    zf, yf = zf[:n], yf[:n]                    # the score files' token order (checked: order_check below)
    T = fit_temperature(zf, yf)
    return {"temperature": T, "order_check": abs(nll_at(zf, yf, 1.0) - stored_fitness_n),
            **{sp: nll_at(*logits(sp), T) for sp in SPLITS}}


def eval_ensemble(run_dir: Path, n: int, Ms) -> dict:
    """Members 0..M-1 of a run (a snapshot every epoch), each at its epoch with the lowest loss on the first n
    fitness tokens; the probability average's losses; epochs = every epoch trained by those members."""
    from q0ds.prior import mixture_nll
    _, metas, S = _scores(run_dir)
    fit = [_nll(S["fitness"][i, :n]) for i in range(len(metas))]
    out = {}
    for M in Ms:
        best, last = {}, {}
        for i, m in enumerate(metas):
            b = m["base"]
            if b >= M:
                continue
            f = fit[i]
            if b not in best or f < best[b][1]:
                best[b] = (i, f)
            last[b] = max(last.get(b, 0.0), m["epoch"])
        assert len(best) == M, (run_dir, M, sorted(best))
        idx = [best[b][0] for b in sorted(best)]
        out[str(M)] = {**{sp: mixture_nll(S[sp][idx], [1.0 / M] * M) for sp in SPLITS},
                       "member_epochs_chosen": [metas[i]["epoch"] for i in idx], "epochs": sum(last.values())}
    return out


def eval_q0(run_dir: Path, n: int, budgets, ks) -> dict:
    """Per cycle c: the prior refitted on the first n fitness tokens over snapshots 0..c (de_eval's fit), the
    mixture's val / test loss. At each budget also: top-K by the prior's weights (K = 1, 2, 4, 8), the K = 1
    member chosen on the n fitness tokens, the uniform mixture."""
    from benchmarks.de_eval import PRIOR_CLIP, PRIOR_LR, PRIOR_STEPS
    from q0ds.prior import fit_prior, mixture_nll, top_k
    _, metas, S = _scores(run_dir)
    assert [m["cycle"] for m in metas] == list(range(len(metas))), run_dir
    fit = [_nll(S["fitness"][i, :n]) for i in range(len(metas))]
    curve = []
    for c in range(len(metas)):
        w = fit_prior(S["fitness"][:c + 1, :n], steps=PRIOR_STEPS, lr=PRIOR_LR, clip=PRIOR_CLIP).weights
        row = {"cycle": c, "epoch": metas[c]["epoch"], **{sp: mixture_nll(S[sp][:c + 1], w) for sp in SPLITS}}
        if c + 1 in budgets:
            row["topk"] = {}
            for k in (k for k in ks if k <= c + 1):
                idx, wk = top_k(w, k)
                row["topk"][str(k)] = {sp: mixture_nll(S[sp][idx], wk) for sp in SPLITS}
            i = min(range(c + 1), key=fit.__getitem__)
            row["k1_on_fitness"] = {"cycle": i, **{sp: _nll(S[sp][i]) for sp in SPLITS}}
            row["uniform"] = {sp: mixture_nll(S[sp][:c + 1], [1.0 / (c + 1)] * (c + 1)) for sp in SPLITS}
        curve.append(row)
    return {"curve": curve}


def eval_grid_point(run_dir: Path, n: int) -> dict:
    r = eval_single(run_dir, n, calibrate=False)
    return {"on_n": r["curve"][r["chosen"]], "on_all": min(r["curve"], key=lambda x: x["fitness_all"])}


# ---- the cache: every run's numbers, keyed by the fingerprint its own ledger gives it ----

def _done(run_dir: Path) -> bool:
    bases = sorted((run_dir / "bases").glob("base-*"))
    return bool(bases) and all((b / "done.json").is_file() for b in bases)


def update_cache(n: int, cache_path: Path = CACHE, work: Path = WORK, study_work: Path = STUDY_WORK,
                 verbose: bool = True) -> dict:
    """Evaluate every finished run of the two ledgers whose files are here and whose cached entry is missing or
    stale (another fingerprint); keep the rest as cached."""
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    if cache.get("format") != FORMAT or cache.get("n") != n:
        cache = {"format": FORMAT, "n": n, "runs": {}}
    de = json.loads((RESULTS / "data_efficiency_ledger.json").read_text())["runs"]
    study = json.loads(H.STUDY.read_text())["runs"] if H.STUDY.is_file() else {}
    todo = []
    for name, e in de.items():
        if e.get("kind") in ("tuneE", "sfit", "pfit", "pmem") and e.get("complete", True):
            todo.append((name, e, work / name))
    extra = json.loads(SEEDS_LEDGER.read_text())["runs"] if SEEDS_LEDGER.is_file() else {}
    for name, e in extra.items():                       # benchmarks/de_more_seeds.py: seeds 3 and 4
        if e.get("complete", True):
            todo.append((name, e, work / name))
    for s in H.SEEDS:
        e = study.get(f"pop-s{s}")
        if e is not None and e["fingerprint"] == de.get(f"q0-s{s}", {}).get("fingerprint"):
            todo.append((f"pop-s{s}", e, study_work / f"pop-s{s}"))
    changed = 0
    for name, e, d in todo:
        c = cache["runs"].get(name)
        if c is not None and c["fingerprint"] == e["fingerprint"]:
            continue
        if not _done(d):
            continue
        kind = e.get("kind") or "q0"
        if kind == "tuneE":
            v = eval_grid_point(d, n)
        elif kind == "sfit":
            v = eval_single(d, n, calibrate=True)
        elif kind in ("pfit", "pmem"):
            bases = len(list((d / "bases").glob("base-*")))
            Ms = ([int(name.split("-M")[1].split("-")[0])] if kind == "pfit" else
                  [M for M in H.ENSEMBLE_SIZES if M <= bases and float(name.split("-L")[1].split("-s")[0]) * M in H.BUDGETS])
            v = eval_ensemble(d, n, Ms)
        else:
            v = eval_q0(d, n, H.BUDGETS, H.KS)
        cache["runs"][name] = {"fingerprint": e["fingerprint"], "kind": kind, "eval": v}
        changed += 1
        if verbose:
            print(f"[de_fit3k] evaluated {name}", flush=True)
        if changed % 10 == 0:
            write_json(cache_path, cache)
    write_json(cache_path, cache)
    return cache


# ---- the report ----

class Arms3k(H.Arms):
    """de_honest.Arms with every loss replaced by the n-token choice's val / test loss; costs unchanged."""

    def __init__(self, L, data, cache: dict, extra: dict | None = None):
        super().__init__(L, data, None)
        self.c = cache["runs"]
        self.fp = {n: e["fingerprint"] for n, e in {**(extra or {}), **L.runs}.items()}   # the runs' own ledgers

    def _e(self, name: str):
        e = self.c.get(name)
        return None if e is None or e["fingerprint"] != self.fp.get(name) else e["eval"]

    def pop(self, s: int):
        e = self.c.get(f"pop-s{s}")
        return None if e is None or e["fingerprint"] != self.L.runs[f"q0-s{s}"]["fingerprint"] else e["eval"]

    def q0_curve(self, s: int) -> list[dict]:
        pop = self.pop(s)["curve"]
        return [{**r, "val_loss": pop[i]["val"], "test_loss": pop[i]["test"]}
                for i, r in enumerate(super().q0_curve(s)) if i < len(pop)]

    def q0_at(self, E: int, s: int) -> dict:
        return self.pop(s)["curve"][E - 1] if s in H.SEEDS else self._e(f"q0-s{s}")["curve"][E - 1]

    def baselines(self, E: int, s: int) -> dict:
        return self.honest_baselines(E, s)

    def losses(self, E: int, s: int) -> dict:
        """label -> val / test loss of every budget-tuned baseline of budget E, seed s, whose run is in the cache
        (seeds 3 and 4 too: benchmarks/de_more_seeds.py's ledger)."""
        out = {}
        sf = self._e(f"sfit-E{E}-s{s}")
        if sf:
            ch = sf["curve"][sf["chosen"]]
            out[H.TUNED] = {"val_loss": ch["val"], "test_loss": ch["test"], "epoch_chosen": ch["epoch"]}
            cal = sf["calibrated"]
            out[H.CALIBRATED] = {"val_loss": cal["val"], "test_loss": cal["test"], "temperature": cal["temperature"]}
        for M in H.ENSEMBLE_SIZES:
            for label, name in ((H.fitstop(M), f"pfit-E{E}-M{M}-s{s}"), (H.memfit(M), f"pmem-L{E / M:g}-s{s}")):
                e = self._e(name)
                if e and str(M) in e:
                    out[label] = {"val_loss": e[str(M)]["val"], "test_loss": e[str(M)]["test"]}
        return out

    def honest_baselines(self, E: int, s: int) -> dict:
        """losses() with each run's costs (de_honest.Arms: the main ledger's seeds only)."""
        costs = super().honest_baselines(E, s)
        return {k: {**costs[k], **v} for k, v in self.losses(E, s).items() if k in costs}


def inference_and_population(A: Arms3k) -> dict:
    """Per budget and split: q0 top-K against the strongest K-forward baseline (lowest mean loss on that split:
    in its favour); the total gain over the strongest baseline by loss = recipe (baseline minus q0's K = 1 member
    chosen on fitness) + population (that member minus the all-snapshot mixture)."""
    out = {}
    for E in H.BUDGETS:
        base = A.complete_baselines(E)
        out[str(E)] = {}
        for sp in SPLITS:
            key = f"{sp}_loss"
            means = {k: statistics.fmean(base[s][k][key] for s in H.SEEDS) for k in base[0]}
            q = {s: A.q0_at(E, s) for s in H.SEEDS}
            rows = {}
            for K in H.KS:
                fwd = [k for k in means if (K == 1 and not k.startswith("ensemble")) or k.startswith(f"ensemble M={K} ")]
                if not fwd:
                    continue
                b = min(fwd, key=means.get)
                qk = [q[s]["topk"][str(K)][sp] for s in H.SEEDS]
                bl = [base[s][b][key] for s in H.SEEDS]
                rows[str(K)] = {"q0_topk": ci(qk), "baseline": b, "baseline_loss": ci(bl),
                                "baseline_minus_q0": ci(x - y for x, y in zip(bl, qk))}
            best = min(means, key=means.get)
            mix = [q[s][sp] for s in H.SEEDS]
            k1 = [q[s]["k1_on_fitness"][sp] for s in H.SEEDS]
            b = [base[s][best][key] for s in H.SEEDS]
            out[str(E)][sp] = {
                "inference_matched": rows,
                "population": {"strongest_by_loss": best, "baseline": ci(b), "q0_mixture": ci(mix),
                               "q0_k1_on_fitness": ci(k1), "total_gain": ci(x - y for x, y in zip(b, mix)),
                               "recipe_gain": ci(x - y for x, y in zip(b, k1)),
                               "population_gain": ci(x - y for x, y in zip(k1, mix))}}
    return out


MORE_SEEDS, MORE_BUDGETS = (3, 4), (32, 64)


def more_seeds(A: Arms3k, by_budget: dict) -> dict | None:
    """At 32 and 64 epochs: K = 1 and K = 2 against the baseline that was the strongest with as many forward passes
    at n = 3, and the total / recipe / population split against the strongest by loss at n = 3, over seeds 0-4
    (seeds 3 and 4: benchmarks/de_more_seeds.py). None until both extra q0 runs are in the cache."""
    if not all(A._e(f"q0-s{s}") for s in MORE_SEEDS):
        return None
    seeds = list(H.SEEDS) + list(MORE_SEEDS)
    out = {}
    for E in MORE_BUDGETS:
        q = {s: A.q0_at(E, s) for s in seeds}
        for sp in SPLITS:
            b3 = by_budget[str(E)][sp]

            def base(label):
                v = [A.losses(E, s).get(label, {}).get(f"{sp}_loss") for s in seeds]
                return None if None in v else v

            rows = {}
            for K in ("1", "2"):
                label = b3["inference_matched"][K]["baseline"]
                b, qk = base(label), [q[s]["topk"][K][sp] for s in seeds]
                rows[f"K={K}"] = {"baseline": label, "n3": b3["inference_matched"][K]["baseline_minus_q0"],
                                  "n5": ci(x - y for x, y in zip(b, qk)) if b else None}
            label = b3["population"]["strongest_by_loss"]
            b = base(label)
            mix, k1 = [q[s][sp] for s in seeds], [q[s]["k1_on_fitness"][sp] for s in seeds]
            for key, xs, ys in (("total", b, mix), ("recipe", b, k1), ("population", k1, mix)):
                rows[key] = {"baseline": label, "n3": b3["population"][f"{key}_gain"],
                             "n5": ci(x - y for x, y in zip(xs, ys)) if xs else None}
            out.setdefault(str(E), {})[sp] = rows
    return out


def grid_choice(cache: dict, L: H.Ledger) -> dict:
    """Per budget, the LR x WD point the grid picks on all fitness tokens (the recipe the baselines use) and on
    the first n; val and test of each at its chosen epoch (seed 0)."""
    out = {}
    for name, e in cache["runs"].items():
        m = re.fullmatch(r"tuneE([\d.]+)-lr([\d.e-]+)-wd([\d.e-]+)", name)
        if m and e["fingerprint"] == (L.runs.get(name) or {}).get("fingerprint"):
            out.setdefault(m[1], []).append({"lr": float(m[2]), "wd": float(m[3]), **e["eval"]})
    res = {}
    for E, pts in sorted(out.items(), key=lambda x: float(x[0])):
        a = min(pts, key=lambda p: p["on_all"]["fitness_all"])
        b = min(pts, key=lambda p: p["on_n"]["fitness_n"])
        res[E] = {"points": len(pts), "on_all_fitness": {"lr": a["lr"], "wd": a["wd"], **a["on_all"]},
                  "on_n_fitness": {"lr": b["lr"], "wd": b["wd"], **b["on_n"]}, "same": a is b}
    return res


def _all_arms() -> dict | None:
    """de_honest.py's strongest ratio per budget and axis (all arms, 16k fitness tokens, val), for comparison."""
    p = RESULTS / "data_efficiency_honest.json"
    if not p.is_file():
        return None
    tw = json.loads(p.read_text())["three_way"]
    return {E: {ax: {"strongest": v["strongest"], "ratio": v["ratio"]} for ax, v in row.items()} for E, row in tw.items()}


def compute(n: int, cache: dict) -> dict:
    L = H.Ledger(RESULTS / "data_efficiency_ledger.json")
    data = json.loads((RESULTS / "data_efficiency.json").read_text())["data"]
    extra = json.loads(SEEDS_LEDGER.read_text())["runs"] if SEEDS_LEDGER.is_file() else {}
    A = Arms3k(L, data, cache, extra)
    missing = [f"pop-s{s}" for s in H.SEEDS if A.pop(s) is None]
    if missing:
        raise SystemExit(f"[de_fit3k] {CACHE}: no numbers for {', '.join(missing)} and their files are not in "
                         f"{STUDY_WORK}: run benchmarks/distill_retention.py first (it trains them)")
    by_budget = inference_and_population(A)
    cal = [e["eval"]["calibrated"]["order_check"] for e in cache["runs"].values() if e["kind"] == "sfit"]
    return {
        "benchmark": "data_efficiency_fit3k", "command": f"python benchmarks/de_fit3k.py --n {n}",
        "fitness_tokens_read": n, "fitness_tokens_all": data["fitness_tokens"], "train_tokens": data["train_tokens"],
        "share_of_train": n / data["train_tokens"], "paper_share_of_train": H.PAPER["fitness_tokens"] / H.PAPER["train_tokens"],
        "three_way": {sp: H.three_way(A, f"{sp}_loss") for sp in SPLITS},
        "by_budget": by_budget,
        "more_seeds": more_seeds(A, by_budget),
        "grid_choice": grid_choice(cache, L),
        "all_arms_16k_val": _all_arms(),
        "score_order_check_max_nats": max(cal) if cal else None,
        "baselines_not_here": "the 16-epoch-recipe arms (single at its val-best epoch, pool ensembles): their run "
                              "files are gone and they have no test scores; de_honest.py reports them on val",
        "q0_runs": "the retention study's pop-s{s}: q0-s{s} re-run (same settings fingerprint and data; CPU "
                   "training drifts between code versions, see de_honest.q0_members_from_study); costs from q0-s{s}",
    }


def markdown(r: dict) -> str:
    from benchmarks.de_honest_md import AXIS_LABEL, iv, ratio_cell
    n, share = r["fitness_tokens_read"], r["share_of_train"]
    L = [f"# Data efficiency with a {n:,}-token fitness set ({share:.1%} of train), on val and test "
         "(benchmarks/de_fit3k.py)", "",
         f"Every decision reads only the first {n:,} of the {r['fitness_tokens_all']:,} fitness tokens (the paper: "
         f"{r['paper_share_of_train']:.2%} of train); the baselines' LR / WD stay those chosen on all fitness tokens "
         "(in their favour). 95% t intervals over 3 seeds. Baselines: the arms tuned at each budget only.", ""]
    for sp in SPLITS:
        L += [f"## Ratios on {sp}", "", "| epochs | " + " | ".join(AXIS_LABEL.values()) + " |", "|---|---|---|---|"]
        for E in map(str, H.BUDGETS):
            L.append(f"| {E} | " + " | ".join(ratio_cell(r["three_way"][sp][E][a]) for a in AXIS_LABEL) + " |")
        if sp == "val" and r.get("all_arms_16k_val"):
            L += ["", "For comparison, de_honest.py (all fitness tokens, every arm including the 16-epoch-recipe single "
                  "model and ensembles with their val-oracle choices): " + "; ".join(
                      f"{E}: " + " / ".join(iv(r["all_arms_16k_val"][E][a]["ratio"], 2, "x") for a in AXIS_LABEL)
                      for E in map(str, H.BUDGETS)) + " (per epoch / FLOP / wall second)."]
        L += ["", f"Inference-matched on {sp} (q0 top-K vs the strongest K-forward baseline; + = q0 better) and where "
              "the gain comes from (recipe: baseline minus q0's fitness-chosen best snapshot; population: that "
              "snapshot minus the mixture of all snapshots):", "",
              "| epochs | K=1 | K=2 | K=4 | K=8 | total (mixture) | recipe | population |", "|---|---|---|---|---|---|---|---|"]
        for E in map(str, H.BUDGETS):
            b = r["by_budget"][E][sp]
            ks = [iv(b["inference_matched"][K]["baseline_minus_q0"]) if K in b["inference_matched"] else "-"
                  for K in ("1", "2", "4", "8")]
            p = b["population"]
            L.append(f"| {E} | " + " | ".join(ks) + f" | {iv(p['total_gain'])} | {iv(p['recipe_gain'])} | "
                     f"{iv(p['population_gain'])} |")
        L.append("")
    if r.get("more_seeds"):
        L += ["## n = 5 (seeds 3 and 4: benchmarks/de_more_seeds.py) for the cells that straddle 0 at n = 3", "",
              "Baseline minus q0 (+ = q0 better); each cell's baseline is the strongest at n = 3.", "",
              "| epochs | split | cell | baseline | n = 3 | n = 5 |", "|---|---|---|---|---|---|"]
        for E, by in r["more_seeds"].items():
            for sp, rows in by.items():
                for cell, x in rows.items():
                    L.append(f"| {E} | {sp} | {cell} | {x['baseline']} | {iv(x['n3'])} | {iv(x['n5'])} |")
        L.append("")
    L += ["## The grid's choice on all fitness tokens (used) and on the first n", "",
          "| epochs | on all: LR / WD | val | test | on n: LR / WD | val | test |", "|---|---|---|---|---|---|---|"]
    for E, g in r["grid_choice"].items():
        a, b = g["on_all_fitness"], g["on_n_fitness"]
        L.append(f"| {E} | {a['lr']:g} / {a['wd']:g} | {a['val']:.3f} | {a['test']:.3f} | "
                 f"{b['lr']:g} / {b['wd']:g} | {b['val']:.3f} | {b['test']:.3f} |")
    return "\n".join(L) + "\n"


def plot(r: dict, path, split: str = "test") -> None:
    """Loss vs forward passes per token on `split`: q0 top-K against the strongest K-forward baseline."""
    from benchmarks.de_honest_md import plot_k_panels
    panels = {}
    for E in map(str, H.BUDGETS):
        rows = r["by_budget"][E][split]["inference_matched"]
        Ks = [int(k) for k in rows]
        panels[E] = (Ks, [rows[str(k)]["q0_topk"] for k in Ks], [rows[str(k)]["baseline_loss"] for k in Ks])
    plot_k_panels(panels, path, f"{split} NLL (nats/token), 95% interval, 3 seeds",
                  (f"q0 top-K (prior on {r['fitness_tokens_read']:,} fitness tokens)",
                   "strongest tuned baseline with K forwards (single / ensemble M=K)"))


def write(out: Path, n: int = N_FIT, cache: Path | None = None, work: Path = WORK, study_work: Path = STUDY_WORK,
          verbose: bool = True, plot_too: bool = True) -> dict:
    """Update the cache from the work dirs, compute, write the JSON and the markdown into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    res = compute(n, update_cache(n, Path(cache) if cache else out / CACHE.name, work, study_work, verbose))
    write_json(out / "data_efficiency_fit3k.json", res)
    (out / "data_efficiency_fit3k.md").write_text(markdown(res))
    if plot_too:
        plot(res, out / "data_efficiency_fit3k_test.png")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=N_FIT, help="fitness tokens every decision reads")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--cache", default=None, help=f"default: {CACHE.name} in --out")
    a = p.parse_args(argv)
    print(markdown(write(Path(a.out), a.n, a.cache)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
