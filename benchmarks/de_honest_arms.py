"""The arms issue 20 adds to benchmarks/data_efficiency.py (`--honest-arms`), resumable like the others:

  tuneE   the single-model LR x WD grid at EVERY budget (not only --tune-budget), seed 0; the recipe of budget E
          is the lowest FITNESS loss at its best fitness epoch; `bracketed` says whether it sits inside the grid
          on both axes (if not, widen --honest-lrs / --honest-wds: the report says which edge).
  sfit    per budget and seed: the single model with its budget's recipe, reported at its best FITNESS epoch,
          and temperature-calibrated (one temperature fitted on the fitness set, de_eval.temperature_calibrated).
  pfit    per budget, M and seed: ensemble members with the budget's recipe, a snapshot every epoch, each member
          stopped at its best FITNESS epoch (de_eval.ensemble_fitness_stopped).
Every choice is on the fitness set; val (and test, when the data has it) are only reported.
The budget-E arms join as soon as the budget-E grid is finished (one jobs list, rebuilt when a slot frees).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.de_arms import Run, baseline_cfg, pool_plan

LRS, WDS = (7.5e-4, 1.5e-3, 3e-3), (0.01, 0.1, 1.0, 3.0)      # around the 16-epoch optimum (1.5e-3, 0.1)
TIER = 6                                                       # after every existing arm


def grid(args) -> list[dict]:
    return [{"lr": lr, "wd": wd} for lr in args.honest_lrs for wd in args.honest_wds]


def grid_runs(args, data, E: float) -> list[Run]:
    work = Path(args.work)
    runs = []
    for r in grid(args):
        run = Run(f"tuneE{E:g}-lr{r['lr']:g}-wd{r['wd']:g}", "tuneE", 0, info={"recipe": r, "budget": E})
        run.cfg = baseline_cfg(args, data, work / run.name, E, r, 900, 1, per_epoch=True)
        run.base_tiers = [TIER]
        runs.append(run)
    return runs


def choose(args, grid_runs_E) -> dict | None:
    """The budget's recipe (lowest fitness loss at the best fitness epoch) once its grid is finished."""
    from benchmarks import de_jobs
    from benchmarks.de_report import run_eval
    if not all(de_jobs.complete(r) for r in grid_runs_E):
        return None
    rows = [{**r.info["recipe"], "fitness_loss": min(p["fitness_loss"] for p in run_eval(r, "single_curve")["curve"])}
            for r in grid_runs_E]
    win = min(rows, key=lambda x: x["fitness_loss"])
    edge = [ax for ax, vals in (("lr", args.honest_lrs), ("wd", args.honest_wds)) if len(vals) > 1
            and win[ax] in (min(vals), max(vals))]
    return {"lr": win["lr"], "wd": win["wd"], "bracketed": not edge, "on_edge": edge, "grid": rows}


def build(args, data, assume: dict | None = None) -> list[Run]:
    """Every honest arm that can be built now: all grids; the budget arms of each finished grid (assume: a
    recipe for every budget instead, for --plan-only's cost estimate)."""
    work = Path(args.work)
    runs = []
    for E in args.budgets:
        g = grid_runs(args, data, E)
        runs += g
        rec = assume or choose(args, g)
        if rec is None:
            continue
        recipe = {"lr": rec["lr"], "wd": rec["wd"]}
        for s in range(args.seeds):
            run = Run(f"sfit-E{E:g}-s{s}", "sfit", s, info={"budget": E, "recipe": recipe, "tuned": rec})
            run.cfg = baseline_cfg(args, data, work / run.name, E, recipe, 1000 + 100 * s, 1, per_epoch=True)
            run.base_tiers = [TIER]
            runs.append(run)
            for M in args.ensemble_sizes:
                L = E / M
                if L not in pool_plan(args):
                    continue
                run = Run(f"pfit-E{E:g}-M{M}-s{s}", "pfit", s, info={"budget": E, "M": M, "member_epochs": L,
                                                                       "recipe": recipe})
                run.cfg = baseline_cfg(args, data, work / run.name, L, recipe, 2000 + 100 * s, M, per_epoch=True)
                run.base_tiers = [TIER] * M
                runs.append(run)
    return runs


def eval_keys(run) -> list[str]:
    if run.kind == "tuneE":
        return ["single_curve"]
    if run.kind == "sfit":
        return ["single_curve", "temperature"]
    return [f"ensemble_fitstop_M{run.info['M']}"]


def summary(args, runs) -> dict:
    """Per budget: the tuned recipe, the single model on fitness (plain and calibrated), the fitness-stopped
    ensembles; n = the seeds finished."""
    from benchmarks import de_jobs
    from benchmarks.de_report import run_eval
    from q0ds.metrics import spread
    out = {}
    for E in args.budgets:
        g = [r for r in runs if r.kind == "tuneE" and r.info["budget"] == E]
        rec = choose(args, g)
        row = {"recipe": rec}
        fin = [r for r in runs if r.kind == "sfit" and r.info["budget"] == E and de_jobs.complete(r)]
        row["single_val_at_fitness_epoch"] = spread(run_eval(r, "single_curve")["val_at_best_fitness_epoch"] for r in fin)
        row["single_calibrated_val"] = spread(run_eval(r, "temperature")["val_loss_calibrated"] for r in fin)
        for M in args.ensemble_sizes:
            fin = [r for r in runs if r.kind == "pfit" and r.info["budget"] == E and r.info["M"] == M
                   and de_jobs.complete(r)]
            row[f"ensemble_fitstop_M{M}"] = spread(run_eval(r, f"ensemble_fitstop_M{M}")["val_loss"] for r in fin)
        out[f"{E:g}"] = row
    return out
