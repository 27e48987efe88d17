"""The arms issue 20 adds to benchmarks/data_efficiency.py (`--honest-arms`), resumable like the others:

  tuneE   the single-model LR x WD grid at EVERY budget (not only --tune-budget), seed 0; the recipe of budget E
          is the lowest FITNESS loss at its best fitness epoch. A finished grid whose best point sits on an edge
          grows one row/column beyond it (grid_runs), so the optimum ends bracketed; `bracketed` / `on_edge` in
          the report say whether it is.
  sfit    per budget and seed: the single model with its budget's recipe, reported at its best FITNESS epoch,
          and temperature-calibrated (one temperature fitted on the fitness set, de_eval.temperature_calibrated).
  pfit    per budget, M and seed: ensemble members with the budget's recipe, a snapshot every epoch, each member
          stopped at its best FITNESS epoch (de_eval.ensemble_fitness_stopped).
  pmem    per member length L (a budget whose grid is finished) and seed: members with the recipe tuned at L
          (their OWN length; pfit's members use the recipe of the ensemble's whole budget E = M x L, e.g. a
          64-epoch recipe for 16-epoch members), a snapshot every epoch, stopped at their best fitness epoch;
          the ensemble (E, M) is the first M members of pmem-L{E/M}, so a member serves every E that needs L.
Every choice is on the fitness set; val (and test, when the data has it) are only reported.
The budget-E arms join as soon as the budget-E grid is finished (one jobs list, rebuilt when a slot frees).
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.de_arms import Run, baseline_cfg, pool_plan

LRS, WDS = (7.5e-4, 1.5e-3, 3e-3), (0.01, 0.1, 1.0, 3.0)      # around the 16-epoch optimum (1.5e-3, 0.1)
TIER = 6                                                       # after every existing arm
SFIT_SEED, PFIT_SEED, MEMBER_SEED = 1000, 2000, 3000           # + 100 x the seed index (+ the base)


def tier(args, E: float) -> int:
    """Budgets in ascending order, one tier each, so a cheap budget's grid AND its sfit/pfit arms finish before
    the next budget's grid starts: a stopped session leaves whole budget rows, not a half of every grid."""
    return TIER + sorted(args.budgets).index(E)


EXTEND = {"lr": 2.0, "wd": 3.0}                                # one step beyond an edge of the grid
MAX_EXTENSIONS = 2                                             # per budget: a bound on the grid's cost


def grid_name(E: float, lr: float, wd: float) -> str:
    return f"tuneE{E:g}-lr{lr:g}-wd{wd:g}"


def grid_run(args, data, E: float, lr: float, wd: float) -> Run:
    r = {"lr": lr, "wd": wd}
    run = Run(grid_name(E, lr, wd), "tuneE", 0, info={"recipe": r, "budget": E})
    run.cfg = baseline_cfg(args, data, Path(args.work) / run.name, E, r, 900, 1, per_epoch=True)
    run.base_tiers = [tier(args, E)]
    return run


def _fitness_rows(runs) -> list[dict]:
    from benchmarks.de_report import run_eval
    return [{**r.info["recipe"], "fitness_loss": min(p["fitness_loss"] for p in run_eval(r, "single_curve")["curve"])}
            for r in runs]


def grid_runs(args, data, E: float) -> list[Run]:
    """The budget-E grid: --honest-lrs x --honest-wds, then, while the finished grid's best point (lowest fitness
    loss at its best fitness epoch) sits on an edge of an axis, one more row or column beyond that edge (LR x2
    or /2, WD x3 or /3), at most MAX_EXTENSIONS times; so the optimum is bracketed in both directions or the
    report says on which edge it stayed."""
    from benchmarks import de_jobs
    lrs, wds = sorted(args.honest_lrs), sorted(args.honest_wds)
    for extension in range(MAX_EXTENSIONS + 1):
        runs = [grid_run(args, data, E, lr, wd) for lr in lrs for wd in wds]
        if extension == MAX_EXTENSIONS or not all(de_jobs.complete(r) for r in runs):
            return runs
        win = min(_fitness_rows(runs), key=lambda x: x["fitness_loss"])
        grew = False
        for axis, vals in (("lr", lrs), ("wd", wds)):
            if len(vals) > 1 and win[axis] == vals[-1]:
                vals.append(vals[-1] * EXTEND[axis])
                grew = True
            elif len(vals) > 1 and win[axis] == vals[0]:
                vals.insert(0, vals[0] / EXTEND[axis])
                grew = True
        if not grew:
            return runs
    raise AssertionError("unreachable")


def edges(rows: list[dict], win: dict) -> list[str]:
    """The axes ('lr', 'wd') on which the grid point `win` sits at an edge of the points `rows`."""
    out = []
    for ax in ("lr", "wd"):
        vals = sorted({x[ax] for x in rows})
        if len(vals) > 1 and win[ax] in (vals[0], vals[-1]):
            out.append(ax)
    return out


def choose(args, grid_runs_E) -> dict | None:
    """The budget's recipe (lowest fitness loss at the best fitness epoch) once its grid is finished and no
    extension is pending (grid_runs); `bracketed` says whether it is inside the grid on both axes."""
    from benchmarks import de_jobs
    if not grid_runs_E or not all(de_jobs.complete(r) for r in grid_runs_E):
        return None
    rows = _fitness_rows(grid_runs_E)
    win = min(rows, key=lambda x: x["fitness_loss"])
    edge = edges(rows, win)
    return {"lr": win["lr"], "wd": win["wd"], "bracketed": not edge, "on_edge": edge, "grid": rows}


def member_sizes(args, L: float) -> list[int]:
    """The ensemble sizes M whose members are L epochs long at some budget E = M x L."""
    return [M for M in sorted(args.ensemble_sizes) if any(abs(M * L - E) < 1e-9 for E in args.budgets)]


def member_tier(b: int) -> int:
    """pmem bases after every budget arm: members 0-1 (the M = 2 ensembles) first, then 2-3, then 4-7."""
    return TIER + 4 + (b >= 2) + (b >= 4)


def sfit_run(args, data, E: float, s: int, rec: dict) -> Run:
    """sfit-E{E}-s{s}: the single model with the budget's recipe `rec` (choose()'s row), a snapshot every epoch."""
    recipe = {"lr": rec["lr"], "wd": rec["wd"]}
    run = Run(f"sfit-E{E:g}-s{s}", "sfit", s, info={"budget": E, "recipe": recipe, "tuned": rec})
    run.cfg = baseline_cfg(args, data, Path(args.work) / run.name, E, recipe, SFIT_SEED + 100 * s, 1, per_epoch=True)
    run.base_tiers = [tier(args, E)]
    return run


def pfit_run(args, data, E: float, M: int, s: int, recipe: dict) -> Run:
    """pfit-E{E}-M{M}-s{s}: M members of E / M epochs with the budget's recipe, a snapshot every epoch."""
    L = E / M
    run = Run(f"pfit-E{E:g}-M{M}-s{s}", "pfit", s, info={"budget": E, "M": M, "member_epochs": L, "recipe": recipe})
    run.cfg = baseline_cfg(args, data, Path(args.work) / run.name, L, recipe, PFIT_SEED + 100 * s, M, per_epoch=True)
    run.base_tiers = [tier(args, E)] * M
    return run


def pmem_run(args, data, L: float, s: int, recipe: dict, Ms: list[int]) -> Run:
    """pmem-L{L}-s{s}: max(Ms) members of L epochs with the recipe tuned at L, a snapshot every epoch."""
    run = Run(f"pmem-L{L:g}-s{s}", "pmem", s, info={"member_epochs": L, "Ms": Ms, "recipe": recipe})
    run.cfg = baseline_cfg(args, data, Path(args.work) / run.name, L, recipe, MEMBER_SEED + 100 * s, max(Ms),
                           per_epoch=True)
    run.base_tiers = [member_tier(b) for b in range(max(Ms))]
    return run


def build(args, data, assume: dict | None = None) -> list[Run]:
    """Every honest arm that can be built now: all grids; the budget arms of each finished grid (assume: a
    recipe for every budget instead, for --plan-only's cost estimate)."""
    runs = []
    for E in args.budgets:
        g = grid_runs(args, data, E)
        runs += g
        rec = assume or choose(args, g)
        if rec is None:
            continue
        recipe = {"lr": rec["lr"], "wd": rec["wd"]}
        Ms = member_sizes(args, E)                 # members of length E for the ensembles of budgets M x E
        runs += [pmem_run(args, data, E, s, recipe, Ms) for s in range(args.seeds) if Ms]
        for s in range(args.seeds):
            runs.append(sfit_run(args, data, E, s, rec))
            runs += [pfit_run(args, data, E, M, s, recipe) for M in args.ensemble_sizes if E / M in pool_plan(args)]
    return runs


def eval_keys(run) -> list[str]:
    if run.kind == "tuneE":
        return ["single_curve"]
    if run.kind == "sfit":
        return ["single_curve", "temperature"]
    if run.kind == "pmem":
        return [f"ensemble_fitstop_M{M}" for M in run.info["Ms"]]
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
