"""The runs of benchmarks/data_efficiency.py: what is trained, with which config, in which order.

Every run is one q0ds run dir (config.json + bases/base-XX) under the work dir; every base is one deepspeed job.
Priorities (`tier`, lower first) make a time-limited run informative: seed 0 of every arm at the budgets up to
32 first, then the other seeds, then the ablations' other seeds, then budget 64, then the extras.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

# Ablations at --ablation-budget (default 32): name -> (label, run-config overrides on top of the reference,
# or an allocation name). The reference is q0 planned for that budget with the main cycle length.
ABLATIONS = {
    "nodistill": ("no distillation", ["distill.enabled=false"]),
    "nowd": ("flat WD (no LR/WD coupling)", ["schedule.wd_coupling=false"]),
    "noperturb": ("no perturbation", ["perturb.enabled=false"]),
    "batchsched": ("with batch-size schedule (small 16 / peak 32)", ["train.small_batch=16"]),
    "cycles2": ("2-epoch cycles (instead of 1)", "uniform-2"),
    "planner": ("packed cycles (warm cycle + short ones: the old planner)", "planner"),
}


@dataclass
class Run:
    name: str                  # unique, = its dir name under the work dir
    kind: str                  # tune | single | pool | q0 | abl | extra
    seed: int                  # benchmark seed index (0, 1, 2, ...)
    cfg: object = None         # RunConfig
    base_tiers: list = field(default_factory=list)   # tier of each base (a pool's later members wait longer)
    info: dict = field(default_factory=dict)
    depends: list = field(default_factory=list)        # runs that must be complete first (distill jobs)
    feeds: list = field(default_factory=list)          # runs that need this run's files on disk (the inverse)

    @property
    def run_dir(self) -> Path:
        return Path(self.info["out"]) if self.kind == "distill" else Path(self.cfg.run_dir)

    @property
    def tier(self) -> int:
        return min(self.base_tiers)


def steps_per_epoch(data: Path, cfg) -> float:
    from q0ds.data import PreparedData
    return PreparedData.open(data).windows_per_epoch(cfg.train.seq_len) / cfg.train.global_batch


def _base_dict(args, data, run_dir):
    from q0ds.presets import preset_config
    return preset_config(args.preset, data=str(data), run_dir=str(run_dir))


def _load(args, d, overrides=()):
    from q0ds.config import load_config
    return load_config(None, list(args.overrides) + list(overrides), base=d)


def baseline_cfg(args, data, run_dir, epochs: float, recipe: dict, seed: int, bases: int, per_epoch: bool):
    """The tuned single-model recipe over `epochs`: linear warmup over `warmup_frac` of the run, then cosine
    to min_lr_ratio at the run's end; flat WD; no distillation/perturbation. per_epoch: a snapshot every
    epoch (the single model's curve); else one snapshot at the end (an ensemble member)."""
    d = _base_dict(args, data, run_dir)
    probe = _load(args, json.loads(json.dumps(d)))
    total_steps = epochs * steps_per_epoch(data, probe)
    cycles = max(1, round(epochs)) if per_epoch else 1
    warmup = max(1, round(args.warmup_frac * total_steps))
    ov = [f"optim.lr={recipe['lr']}", f"optim.weight_decay={recipe['wd']}", "schedule.shape=cosine",
          f"schedule.cycles={cycles}", f"schedule.cycle_epochs={epochs / cycles!r}", "schedule.cycle_steps=0",
          f"schedule.warmup_steps={warmup}", "schedule.wd_coupling=false", "train.small_batch=0",
          "distill.enabled=false", "perturb.enabled=false", f"seed={seed}", f"bases={bases}"]
    return _load(args, d, ov)


def q0_cfg(args, data, run_dir, cycle_epochs, seed: int, extra=()):
    from q0ds.plan import Allocation
    lens = list(cycle_epochs)
    alloc = Allocation("x", float(sum(lens)), 1, tuple(lens))
    return _load(args, _base_dict(args, data, run_dir), alloc.override_args() + [f"seed={seed}"] + list(extra))


def q0_run(args, data, s: int, budget: float) -> Run:
    """q0-s{s}: uniform --cycle-epochs cycles up to `budget` epochs, seed 100 s (base_tiers left to the caller)."""
    from q0ds.plan import uniform_cycles
    run = Run(f"q0-s{s}", "q0", s, info={"cycle_epochs": args.cycle_epochs, "budget": budget})
    run.cfg = q0_cfg(args, data, Path(args.work) / run.name, uniform_cycles(budget, args.cycle_epochs), 100 * s)
    return run


def recipe_grid(args) -> list[dict]:
    return [{"lr": lr, "wd": wd} for lr in args.tune_lrs for wd in args.tune_wds]


def tier_of(E: float, seed: int, args) -> int:
    """0/1: seed 0 up to 32 epochs; 2: other seeds up to 32; 4: budgets above 32."""
    if E > args.early_budget_max:
        return 4
    return 1 if seed == 0 else 2


def pool_plan(args) -> dict[float, int]:
    """Member length L -> how many members: ensemble (E, M) uses the first M members of pool L = E/M."""
    need = {}
    for E in args.budgets:
        for M in args.ensemble_sizes:
            L = E / M
            need[L] = max(need.get(L, 0), M)
    return dict(sorted(need.items()))


def build_runs(args, data, recipe: dict | None) -> list[Run]:
    """All runs. Baselines (single, pool) need the tuned recipe: before it exists only the grid and q0 are built."""
    from q0ds.plan import plan_budget, uniform_cycles
    work = Path(args.work)
    runs = []
    for i, r in enumerate(recipe_grid(args)):                              # tuning grid: seed 0, one budget
        run = Run(f"tune-lr{r['lr']:g}-wd{r['wd']:g}", "tune", 0, info={"recipe": r, "budget": args.tune_budget})
        run.cfg = baseline_cfg(args, data, work / run.name, args.tune_budget, r, 900, 1, per_epoch=True)
        run.base_tiers = [0]
        runs.append(run)
    Emax = max(args.budgets)
    for s in range(args.seeds):                                             # q0: one run per seed, every budget
        run = q0_run(args, data, s, Emax)
        run.base_tiers = [0 if s == 0 else 2]
        runs.append(run)
    if recipe is not None:
        for s in range(args.seeds):
            for E in args.budgets:
                run = Run(f"single-E{E:g}-s{s}", "single", s, info={"budget": E, "recipe": recipe})
                run.cfg = baseline_cfg(args, data, work / run.name, E, recipe, 1000 + 100 * s, 1, per_epoch=True)
                run.base_tiers = [tier_of(E, s, args)]
                runs.append(run)
            for L, n in pool_plan(args).items():
                run = Run(f"pool-L{L:g}-s{s}", "pool", s, info={"member_epochs": L, "recipe": recipe})
                run.cfg = baseline_cfg(args, data, work / run.name, L, recipe, 2000 + 100 * s, n, per_epoch=False)
                run.base_tiers = [min([tier_of(E, s, args) for E in args.budgets for M in args.ensemble_sizes
                                       if abs(E / M - L) < 1e-9 and b < M] or [9]) for b in range(n)]
                runs.append(run)
    if args.ablations:
        A = args.ablation_budget
        for s in range(args.seeds):
            t = 1 if s == 0 else 3
            ref = Run(f"abl-ref-E{A:g}-s{s}", "abl", s, info={"ablation": "ref", "label": "q0 (reference)", "budget": A})
            ref.cfg = q0_cfg(args, data, work / ref.name, uniform_cycles(A, args.cycle_epochs), 100 * s)
            ref.base_tiers = [t]
            runs.append(ref)
            for name, (label, how) in ABLATIONS.items():
                if args.ablation_arms != "all" and name not in args.ablation_arms.split(","):
                    continue
                run = Run(f"abl-{name}-E{A:g}-s{s}", "abl", s, info={"ablation": name, "label": label, "budget": A})
                if how == "planner":
                    lens = plan_budget(A, schedule="packed").cycle_epochs
                elif isinstance(how, str):
                    lens = uniform_cycles(A, float(how.split("-")[1]))
                else:
                    lens = uniform_cycles(A, args.cycle_epochs)
                run.info["cycle_epochs"] = list(lens)
                run.cfg = q0_cfg(args, data, work / run.name, lens, 100 * s, [] if isinstance(how, str) else how)
                run.base_tiers = [t]
                runs.append(run)
        for s in range(args.seeds if args.planner_budget else 0):          # planner vs uniform at a 2nd budget
            P = args.planner_budget
            for name, lens in (("planner", plan_budget(P, schedule="packed").cycle_epochs),   # the previous rule
                               ("uniform", uniform_cycles(P, args.cycle_epochs))):
                run = Run(f"alloc-{name}-E{P:g}-s{s}", "extra", s, info={"allocation": name, "budget": P,
                                                                         "cycle_epochs": list(lens)})
                run.cfg = q0_cfg(args, data, work / run.name, lens, 100 * s)
                run.base_tiers = [5]
                runs.append(run)
        # ensemble distillation of the reference's top-4 mixture into one model (q0ds distill-ensemble: the
        # command's defaults when these ran, 2 epochs from the top member, pinned; the default is now 4), and the
        # same training without a teacher (alpha 0)
        for s in range(min(args.seeds, args.distill_seeds)):
            src = next(r for r in runs if r.name == f"abl-ref-E{A:g}-s{s}")
            for name, ov in (("distill-k4", []), ("distill-k4-noteacher", ["distill.alpha=0"])):
                out = src.run_dir / "distilled" / ("k4" if not ov else "k4-noteacher")
                run = Run(f"{name}-s{s}", "distill", s, cfg=src.cfg, base_tiers=src.base_tiers, depends=[src],
                          info={"source": str(src.run_dir), "out": str(out), "k": 4,
                                "overrides": [DISTILL_CYCLES] + ov + [f"run_dir={out}"]})
                src.feeds.append(run)
                runs.append(run)
    return runs


DISTILL_CYCLES = "schedule.cycles=2"     # the distill arm's length: q0ds distill-ensemble's default until issue 21


def write_configs(runs) -> None:
    """Each run's resolved config.json; a changed setting in an existing run dir is refused (use --work)."""
    from q0ds.config import save_config
    from q0ds.trainer import _diff
    for run in runs:
        if run.kind == "distill":
            continue                           # q0ds distill-ensemble writes and checks its own config
        path = run.run_dir / "config.json"
        if path.is_file():
            diff = _diff(json.loads(path.read_text()), run.cfg.to_dict())
            if diff:
                raise SystemExit(f"{path} was written with different settings ({', '.join(diff)}); "
                                 f"use another --work dir or delete {run.run_dir}")
        else:
            save_config(run.cfg, path)
