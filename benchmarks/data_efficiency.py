"""Benchmark: data efficiency of q0 against TUNED baselines (a single model and independent ensembles), over
several seeds, on CPU. Resumable at the granularity of one base (one deepspeed job).

    .venv/bin/python benchmarks/data_efficiency.py                 # the full benchmark (resumes; ~3 h on 2 idle cores)
    nice -n 19 .venv/bin/python benchmarks/data_efficiency.py > benchmarks/work/de.log 2>&1 &   # in the background
    .venv/bin/python benchmarks/data_efficiency.py --plan-only     # runs, tiers, cost estimate
    .venv/bin/python benchmarks/data_efficiency.py --report-only   # JSON + plots from the ledger + finished runs
    .venv/bin/python benchmarks/data_efficiency.py --quick --work /tmp/de --out /tmp/de-out   # smoke

Setting (cpu-scale.md): the `small` preset (Qwen3, hidden 128, 2 layers, 0.95M params, seq 128, batch 32) on
the embedded corpus (CPython docs, BPE 2048), train cut to ~55k tokens (whole documents) so a single model
saturates inside the budgets; --fitness-tokens 12000, which whole documents make 16,169 tokens (31% of the
51,802 train tokens; the paper: 0.13%), so the prior can be refitted on sub-sets of it.
Runs (benchmarks/de_arms.py), all through the real deepspeed launcher:
  tune    the single-model recipe: LR x WD grid (heavy WD included) at --tune-budget epochs, seed 0; the recipe
          with the lowest FITNESS-set loss (at its best epoch on fitness) is used by every baseline below.
  single  per budget E and seed: warmup (--warmup-frac of the run) + cosine over E epochs, a snapshot every
          epoch; reported at its best epoch on VALIDATION (an oracle choice in its favour, labelled).
  pool    ensemble members: E/M epochs each, the same recipe, one snapshot at the end; the ensemble (E, M) of a
          seed is the probability average of the first M members of the seed's pool of length E/M (a member is
          shared between budgets that need the same length; seeds never share members). Baseline at E = the
          best M in --ensemble-sizes (chosen on validation, in its favour).
  q0      one run per seed of uniform --cycle-epochs cycles up to max(budgets): the budget-E result is the
          prefix of its first E epochs, with the prior refitted on the fitness set over the snapshots so far
          (population.population_curve, the same fit as the final one). The prefix equals a run planned for E
          except for the perturbation scale, a cosine over the planned cycle count (measured: abl-ref at the
          ablation budget is the same seed planned for it). q0's LR/WD are the preset's, NOT tuned.
  abl     at --ablation-budget, every seed: the reference (q0 planned for it) and one change each.
  extra   planner vs uniform cycles at --planner-budget, every seed.
Order (tiers): the grid and q0 seed 0; seed 0 of every baseline up to 32 epochs and of the ablations; the other
seeds up to 32; the ablations' other seeds; budget 64; the planner comparison.

Outputs (benchmarks/de_report.py): benchmarks/results/data_efficiency.json (every cell says whether it is
complete; only complete cells enter tables and plots), data_efficiency.png, data_efficiency_ablations.png, and
the ledger data_efficiency_ledger.json (benchmarks/de_ledger.py): every finished run's numbers, the tuned
recipe and the training sessions. Commit the ledger: a later session (with an empty work dir) skips every run
in it, and `--report-only` rebuilds the JSON and plots from it alone.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, add_data_args, env_defaults, write_json  # noqa: E402

env_defaults()

from benchmarks import de_arms, de_jobs  # noqa: E402

DEFAULT_WORK = ROOT / "benchmarks" / "work" / "data_efficiency_v2"
DEFAULT_OUT = ROOT / "benchmarks" / "results"


def prepare_data(args) -> Path:
    from q0ds.data import PreparedData, prepare
    if args.data:
        PreparedData.open(args.data)
        return Path(args.data).resolve()
    data = Path(args.work) / "data"
    if not (data / "meta.json").is_file():
        print(f"[data_efficiency] preparing the embedded corpus in {data} (vocab {args.vocab}, fitness "
              f"{args.fitness_tokens}, train <= {args.train_tokens} tokens)", flush=True)
        kw = dict(fitness_tokens=2000, val_tokens=3000) if args.quick else dict(fitness_tokens=args.fitness_tokens)
        # a test split from the documents the train cut leaves over: the other splits and the data fingerprint
        # (so every ledger entry) are unchanged; scored with every snapshot, read by no decision
        prepare(data, embedded=True, vocab_size=args.vocab, max_train_tokens=args.train_tokens,
                test_tokens=args.test_tokens, **kw)
    PreparedData.open(data)
    return data.resolve()


def select_recipe(args, runs) -> dict | None:
    """The tuned recipe once every grid run is finished: lowest fitness loss at its best fitness epoch."""
    from benchmarks.de_report import run_eval
    L = de_jobs.LEDGER
    if L.doc.get("tuned"):
        return L.doc["tuned"]["recipe"]
    grid = [r for r in runs if r.kind == "tune"]
    if not grid or not all(de_jobs.complete(r) for r in grid):
        return None
    rows = []
    for r in grid:
        c = run_eval(r, "single_curve")["curve"]
        best = min(c, key=lambda p: p["fitness_loss"])
        rows.append({**r.info["recipe"], "best_fitness_loss": best["fitness_loss"], "best_epoch_on_fitness": best["epochs"],
                     "val_loss_at_that_epoch": best["val_loss"], "curve": c})
    win = min(rows, key=lambda x: x["best_fitness_loss"])
    recipe = {"lr": win["lr"], "wd": win["wd"]}
    L.doc["tuned"] = {"recipe": recipe, "budget": args.tune_budget, "selected_on": "fitness set", "grid": rows,
                      "warmup_frac": args.warmup_frac}
    L.save()
    print(f"[data_efficiency] tuned single-model recipe (fitness set): LR {recipe['lr']:g}, WD {recipe['wd']:g}",
          flush=True)
    return recipe


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="epoch budgets (default 8 16 32 64)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 3)")
    p.add_argument("--ensemble-sizes", type=int, nargs="+", default=None, help="M to try (default 2 4 8)")
    p.add_argument("--cycle-epochs", type=float, default=None, help="q0 cycle length (default 1)")
    p.add_argument("--tune-budget", type=float, default=None, help="budget of the LR x WD grid (default 16)")
    p.add_argument("--tune-lrs", type=float, nargs="+", default=None, help="default 3.75e-4 7.5e-4 1.5e-3 3e-3 6e-3")
    p.add_argument("--tune-wds", type=float, nargs="+", default=None, help="default 0.1 1.0 3.0")
    p.add_argument("--warmup-frac", type=float, default=0.05, help="baseline warmup, fraction of the run")
    p.add_argument("--ablations", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ablation-budget", type=float, default=None, help="default 32")
    p.add_argument("--ablation-arms", default="all", help=f"comma-separated subset of {','.join(de_arms.ABLATIONS)}")
    p.add_argument("--distill-seeds", type=int, default=None, help="ensemble-distillation seeds (default 2)")
    p.add_argument("--planner-budget", type=float, default=None, help="planner vs uniform here (default 16; 0 = off)")
    p.add_argument("--honest-arms", action="store_true", help="add issue 20's arms (benchmarks/de_honest_arms.py): "
                   "an LR x WD grid at every budget, fitness-chosen single models (+ temperature), fitness-stopped members")
    p.add_argument("--honest-lrs", type=float, nargs="+", default=None, help="default 7.5e-4 1.5e-3 3e-3")
    p.add_argument("--honest-wds", type=float, nargs="+", default=None, help="default 0.01 0.1 1.0 3.0")
    p.add_argument("--early-budget-max", type=float, default=32.0, help="budgets above this run last")
    add_data_args(p)
    p.add_argument("--max-tier", type=int, default=99, help="train only runs up to this tier")
    p.add_argument("--work", default=str(DEFAULT_WORK))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="tiny model and budgets: the smoke test")
    p.add_argument("--plan-only", action="store_true", help="print runs and the cost estimate, train nothing")
    p.add_argument("--report-only", action="store_true", help="train nothing; report the finished runs")
    a = p.parse_args(argv)
    q = a.quick
    a.budgets = sorted(a.budgets or ([1.0, 2.0] if q else [8.0, 16.0, 32.0, 64.0]))
    a.seeds = (1 if q else 3) if a.seeds is None else a.seeds
    a.ensemble_sizes = sorted(a.ensemble_sizes or ([2] if q else [2, 4, 8]))
    a.cycle_epochs = a.cycle_epochs or (0.5 if q else 1.0)
    a.tune_budget = a.tune_budget or (1.0 if q else 16.0)
    # 3.75e-4 and 7.5e-4 added after the first grid's best (fitness 5.081) sat at its lowest LR, 1.5e-3
    a.tune_lrs = a.tune_lrs or ([3e-3] if q else [3.75e-4, 7.5e-4, 1.5e-3, 3e-3, 6e-3])
    a.tune_wds = a.tune_wds or ([0.1, 1.0] if q else [0.1, 1.0, 3.0])
    a.ablation_budget = a.ablation_budget or (1.0 if q else 32.0)
    a.planner_budget = (0.0 if q else 16.0) if a.planner_budget is None else a.planner_budget
    a.distill_seeds = (0 if q else 2) if a.distill_seeds is None else a.distill_seeds
    a.preset = a.preset or ("tiny" if q else "small")
    a.train_tokens = a.train_tokens or (12000 if q else 55000)
    a.test_tokens = (1000 if q else 12000) if a.test_tokens is None else a.test_tokens
    from benchmarks.de_honest_arms import LRS, WDS
    a.honest_lrs = a.honest_lrs or ([3e-3] if q else list(LRS))
    a.honest_wds = a.honest_wds or ([0.1, 1.0] if q else list(WDS))
    if q:
        a.vocab = min(a.vocab, 512)
    if not 0 < a.warmup_frac < 1:
        p.error(f"--warmup-frac must be in (0, 1), got {a.warmup_frac}")
    if min(a.budgets) <= 0 or a.seeds < 1 or min(a.ensemble_sizes) < 1 or a.cycle_epochs <= 0:
        p.error("--budgets, --cycle-epochs must be > 0 and --seeds, --ensemble-sizes >= 1")
    if any(abs(E / a.cycle_epochs - round(E / a.cycle_epochs)) > 1e-9 for E in a.budgets):
        p.error(f"every budget must be a whole number of q0 cycles of {a.cycle_epochs:g} epochs (the budget-E "
                f"result is the prefix after E / cycle-epochs cycles); change --budgets or --cycle-epochs")
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args)
    from benchmarks.de_ledger import Ledger
    from q0ds.data import PreparedData
    de_jobs.LEDGER = Ledger(Path(args.out) / "data_efficiency_ledger.json", PreparedData.open(data).fingerprint)
    state = {"recipe": None, "runs": None, "honest": []}

    def get_runs():
        if state["runs"] is None or state["recipe"] is None:
            recipe = select_recipe(args, state["runs"] or de_arms.build_runs(args, data, None))
            if state["runs"] is None or recipe != state["recipe"]:
                state["recipe"] = recipe
                state["runs"] = de_arms.build_runs(args, data, recipe)
                de_arms.write_configs(state["runs"])
        if args.honest_arms:                  # issue 20's arms: a budget's arms join when its grid is finished
            from benchmarks import de_honest_arms
            honest = de_honest_arms.build(args, data)
            if [r.name for r in honest] != [r.name for r in state["honest"]]:
                de_arms.write_configs(honest)
                state["honest"] = honest
        return state["runs"] + state["honest"]

    runs = get_runs() if not args.plan_only else de_arms.build_runs(args, data, select_recipe(
        args, de_arms.build_runs(args, data, None)) or {"lr": args.tune_lrs[0], "wd": args.tune_wds[0]})
    print(f"[data_efficiency] {len(runs)} runs; work {work}" + ("" if state["recipe"] or args.plan_only else
          " (baselines join when the tuning grid is done)"), flush=True)
    if args.plan_only:
        if args.honest_arms:
            from benchmarks import de_honest_arms
            runs = runs + de_honest_arms.build(args, data, assume=runs[-1].cfg and {"lr": 1.5e-3, "wd": 0.1})
        total = 0.0
        for r in sorted(runs, key=lambda r: (r.tier, r.name)):
            c = de_jobs.run_cost(r) * r.cfg.bases
            total += c
            print(f"  {r.name:<28} tier {r.tier} {r.cfg.bases} base(s) x {de_jobs.plan_of(r.cfg).total_steps} steps "
                  f"est. {c:.0f} units", flush=True)
        print(f"[data_efficiency] total est. {total:.0f} epoch-units, "
              f"{sum(r.cfg.bases for r in runs)} deepspeed jobs", flush=True)
        return 0
    failed = []
    from benchmarks import de_report
    for run in runs:                          # finished in this work dir before the ledger knew (an interrupted
        if de_jobs.disk_complete(run) and not de_jobs.LEDGER.has(run):        # session): record them now
            de_report.record(args, run)
    if not args.report_only:
        t0 = time.time()
        try:
            failed = de_jobs.train_all(get_runs, args.parallel, args.threads, t_start, args.max_tier,
                                       on_complete=lambda run: de_report.record(args, run))
        finally:
            de_jobs.log_session(t0, time.time(), failed)
        runs = get_runs()
    res = de_report.report(args, data, runs, argv, failed, t_start)
    return 1 if failed or (res.get("incomplete_runs") and not args.report_only and args.max_tier >= 99) else 0


if __name__ == "__main__":
    sys.exit(main())
