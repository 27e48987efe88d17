"""The runs of benchmarks/distill_retention.py (issue 21): populations, their prefix dirs, students, controls.

Population: one q0 run per seed with exactly the data-efficiency benchmark's q0 arm (de_arms.q0_cfg: the
preset, uniform --cycle-epochs cycles up to max(--budgets), seed 100 * s), trained by de_jobs through the real
deepspeed launcher. The budget-E population is the PREFIX of that run: its first E / cycle-epochs snapshots,
hard-linked (copied across file systems) under the canonical names q0ds discovers members by
(bases/base-00/snapshots/cycle-XXXX) into <work>/pop-E{E}-s{s}/ with the run's config.json, then
`q0ds fit-prior --run` on it. Its prior is what `q0ds distill-ensemble` reads.

Student: `q0ds distill-ensemble --run <prefix dir> --k K <settings> run_dir=<work>/students/<name>`: one job
(de_jobs.launch_distill). Settings are (init, alpha, T, student epochs, teacher cache); a student is named by
its settings, so an arm that reaches the same settings from two phases is trained once. Control: the same
training with distill.alpha=0 (no teacher; its trajectory depends on init and length only, and on K only for
init=avg, whose start is the top-K average), shared by every student with those settings.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks import de_arms
from benchmarks.de_arms import Run

# The reference student: the defaults of `q0ds distill-ensemble` today (ensemble_distill.DEFAULTS), K = 4.
# lr: the student's peak LR, the population's optim.lr (the small preset's 3e-3); an override (and a part of the
# student's name) only where a variant changes it, so the reference students' recorded settings stay as they were.
REFERENCE = {"init": "top1", "alpha": 0.9, "T": 1.0, "epochs": 2, "cache": 0, "k": 4, "lr": 3e-3}

# One-factor-at-a-time variants of the reference: name -> (family, label, changed settings).
# ensemble.init=avg and ensemble.teacher_cache=N come from branch `cache` (not on this branch when written).
VARIANTS = {
    "ref": ("reference", "reference: top1, alpha 0.9, T 1, 2 epochs, K 4, teacher on the fly", {}),
    "alpha1": ("loss", "pure KL (alpha 1)", {"alpha": 1.0}),
    "alpha0.5": ("loss", "KL + CE (alpha 0.5)", {"alpha": 0.5}),
    "T2": ("temperature", "temperature 2", {"T": 2.0}),
    "init-avg": ("init", "init: prior-weighted average of the top-K members", {"init": "avg"}),
    "init-scratch": ("init", "init: from scratch", {"init": "scratch"}),
    "ep1": ("length", "1 student epoch", {"epochs": 1}),
    "ep4": ("length", "4 student epochs", {"epochs": 4}),
    "ep8": ("length", "8 student epochs", {"epochs": 8}),
    "cache32": ("teacher", "cached top-32 teacher (ensemble.teacher_cache=32)", {"cache": 32}),
    "lr1e-3": ("lr", "student peak LR 1e-3 (the population's 3e-3 / 3): the no-teacher control from the best "
                     "member gets worse at 3e-3, so the re-warmed LR may undo the start", {"lr": 1e-3}),
    "k8": ("k", "K = 8 members in the teacher mixture", {"k": 8}),
}
# families whose winner (on FITNESS retention, within the compute cap) is carried to every (budget, K) cell
SELECT_FAMILIES = ("loss", "temperature", "init", "length", "teacher", "lr")
SETTING_OF_FAMILY = {"loss": "alpha", "temperature": "T", "init": "init", "length": "epochs", "teacher": "cache",
                     "lr": "lr"}


def settings_of(arm: str, k: int | None = None) -> dict:
    s = dict(REFERENCE, **VARIANTS[arm][2])
    if k is not None:
        s["k"] = k
    return s


def _lr_tag(s: dict) -> str:
    return f"-lr{s['lr']:g}" if s.get("lr", REFERENCE["lr"]) != REFERENCE["lr"] else ""


def settings_key(s: dict) -> str:
    return f"{s['init']}-a{s['alpha']:g}-T{s['T']:g}-ep{s['epochs']:g}-c{s['cache']}" + _lr_tag(s)


def control_settings(s: dict, k_default: int) -> dict:
    """The no-teacher control of settings s: alpha 0, same init and length; K only matters for init=avg."""
    return {"init": s["init"], "alpha": 0.0, "T": 1.0, "epochs": s["epochs"], "cache": 0,
            "k": s["k"] if s["init"] == "avg" else k_default, "lr": s.get("lr", REFERENCE["lr"])}


def overrides_of(s: dict, student_cycle_epochs: float) -> list[str]:
    """distill-ensemble key=value settings. Every knob explicit (a changed command default cannot silently change
    a recorded student), except ensemble.teacher_cache when 0 (on the fly: the option does not exist before
    branch `cache`)."""
    ov = [f"ensemble.init={s['init']}", f"distill.alpha={s['alpha']!r}", f"distill.temperature={s['T']!r}",
          f"schedule.cycles={int(s['epochs'])}", f"schedule.cycle_epochs={student_cycle_epochs!r}"]
    if s["cache"]:
        ov.append(f"ensemble.teacher_cache={s['cache']}")
    if _lr_tag(s):
        ov.append(f"optim.lr={s['lr']!r}")
    return ov


def _b(E) -> str:
    return f"{E:g}"


def student_name(E, s: dict, seed: int) -> str:
    return f"st-E{_b(E)}-k{s['k']}-{settings_key(s)}-s{seed}"


def control_name(E, c: dict, seed: int) -> str:
    return (f"ctl-E{_b(E)}-{c['init']}-ep{c['epochs']:g}" + (f"-k{c['k']}" if c["init"] == "avg" else "") + _lr_tag(c)
            + f"-s{seed}")


def prefix_dir(args, E, seed: int) -> Path:
    return Path(args.work) / f"pop-E{_b(E)}-s{seed}"


def population_runs(args, data) -> list[Run]:
    from q0ds.plan import uniform_cycles
    Emax = max(args.budgets)
    runs = []
    for s in range(args.seeds):
        run = Run(f"pop-s{s}", "q0", s, info={"cycle_epochs": args.cycle_epochs, "budget": Emax})
        run.cfg = de_arms.q0_cfg(args, data, Path(args.work) / run.name, uniform_cycles(Emax, args.cycle_epochs),
                                 100 * s)
        run.base_tiers = [0]
        runs.append(run)
    return runs


def grid_arms(selection: dict | None) -> list[tuple[str, dict]]:
    """(arm name, settings without k) carried to every (budget, K) cell: the reference, each family winner that
    differs from it, and all winners combined ("best") when that is yet another setting."""
    arms = [("ref", settings_of("ref"))]
    if not selection:
        return arms
    best = dict(REFERENCE)
    for fam in SELECT_FAMILIES:
        w = selection["families"].get(fam, {}).get("winner")
        if w and w != "ref":
            arms.append((w, settings_of(w)))
            best.update(VARIANTS[w][2])
    if all(settings_key(best) != settings_key(s) for _, s in arms):
        arms.append(("best", best))
    return arms


def length_arms(args) -> list[str]:
    """The length family's arms of --arms when the length curve runs at every cell (--length-curve), else none."""
    return [a for a in args.arms if VARIANTS[a][0] == "length"] if getattr(args, "length_curve", False) else []


def student_runs(args, pops: list[Run], selection: dict | None) -> list[Run]:
    """Students and controls; tier 1: the reference (+ control) at (min budget, first K); 2: the one-factor
    variants; 3: the reference at the other cells; 4: the selected variants there; 5: the reference at every
    length of the length family at the other cells (--length-curve: each cell's own retention-vs-length curve,
    and the longest student within the compute cap where the population's FLOPs allow it)."""
    E0, K0 = min(args.budgets), args.ks[0]
    planned = []                                           # (tier, E, settings, arm label)
    for arm in args.arms:
        s = settings_of(arm)
        if s["k"] == REFERENCE["k"]:
            s["k"] = K0
        planned.append((1 if arm == "ref" else 2, E0, s, arm, "one-factor"))
    for arm, s in grid_arms(selection):
        for E in args.budgets:
            for K in args.ks:
                planned.append((3 if arm == "ref" else 4, E, dict(s, k=K), arm, "grid"))
    for arm in length_arms(args):
        for E in args.budgets:
            for K in args.ks:
                if (E, K) != (E0, K0):
                    planned.append((5, E, dict(settings_of(arm), k=K), arm, "curve"))
    by_name: dict[str, Run] = {}
    out = []

    def add(name, E, seed, s, tier, role, arm, phase):
        if name in by_name:
            r = by_name[name]
            r.base_tiers = [min(r.base_tiers[0], tier)]
            r.info["arms"] = sorted(set(r.info["arms"]) | {f"{phase}:{arm}"})
            return r
        pop = pops[seed]
        src = prefix_dir(args, E, seed)
        outd = Path(args.work) / "students" / name
        r = Run(name, "distill", seed, cfg=pop.cfg, base_tiers=[tier], depends=[pop],
                info={"source": str(src), "out": str(outd), "k": s["k"], "budget": E, "role": role,
                      "settings": s, "arms": [f"{phase}:{arm}"],
                      "overrides": overrides_of(s, args.student_cycle_epochs) + [f"run_dir={outd}"]})
        pop.feeds.append(r)
        by_name[name] = r
        out.append(r)
        return r

    for seed in range(args.seeds):
        for tier, E, s, arm, phase in planned:
            add(student_name(E, s, seed), E, seed, s, tier, "student", arm, phase)
            c = control_settings(s, K0)
            add(control_name(E, c, seed), E, seed, c, tier, "control", arm, phase)
    return out


# ------------------------------------------------------------------ the prefix population dirs
def make_prefix(args, pop: Run, E) -> Path:
    """<work>/pop-E{E}-s{s}: config.json + the first E / cycle-epochs snapshots of the population run under
    canonical member names (hard links; copies across devices) + prefix.json, then `q0ds fit-prior` on it.
    Idempotent: an existing dir whose prefix.json names the same snapshots (sha256) and that has its prior.json
    is kept; a half-made one is rebuilt."""
    from q0ds.snapshot import list_snapshots, read_meta
    dest = prefix_dir(args, E, pop.seed)
    n = round(E / args.cycle_epochs)
    snaps = [p for p in list_snapshots(pop.run_dir) if read_meta(p)["base"] == 0 and read_meta(p)["cycle"] < n]
    if len(snaps) != n:
        raise SystemExit(f"[distill_retention] {pop.run_dir} has {len(snaps)} of the {n} snapshots the {E:g}-epoch "
                         "prefix needs")
    want = {"source": str(Path(pop.run_dir).resolve()), "budget": E, "cycles": n,
            "members": [f"base-00/{p.name}" for p in snaps], "sha256": [read_meta(p)["sha256"] for p in snaps]}
    pj = dest / "prefix.json"
    if pj.is_file() and (dest / "prior.json").is_file():
        have = json.loads(pj.read_text())
        if {k: have.get(k) for k in want} == want:
            return dest
    shutil.rmtree(dest, ignore_errors=True)
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "bases" / "base-00" / "snapshots").mkdir(parents=True)
    shutil.copy2(Path(pop.run_dir) / "config.json", tmp / "config.json")
    linked = True
    for p in snaps:
        d = tmp / "bases" / "base-00" / "snapshots" / p.name
        d.mkdir()
        for f in sorted(p.iterdir()):
            if not f.is_file():
                continue
            try:
                os.link(f, d / f.name)
            except OSError:
                shutil.copy2(f, d / f.name)
                linked = False
    (tmp / "prefix.json").write_text(json.dumps(dict(want, hardlinked=linked), indent=1) + "\n")
    os.replace(tmp, dest)
    p = subprocess.run([sys.executable, "-m", "q0ds", "fit-prior", "--run", str(dest)], capture_output=True,
                       text=True, env=dict(os.environ, Q0DS_NO_PROGRESS="1"))
    if p.returncode != 0:
        raise SystemExit(f"[distill_retention] q0ds fit-prior --run {dest} failed ({p.returncode}):\n"
                         f"{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    print(f"[distill_retention] population {dest.name}: {n} snapshots of {pop.name}, "
          f"{'hard-linked' if linked else 'copied'}; {p.stdout.strip().splitlines()[-1]}", flush=True)
    return dest
