"""Benchmark (issue 21): how much of q0's top-K mixture gain ONE distilled model retains, and which settings of
`q0ds distill-ensemble` get it there, over seeds, on CPU. Resumable at the granularity of one job.

    PYTHONPATH=. .venv/bin/python benchmarks/distill_retention.py                # the full study (resumes)
    nice -n 19 ... benchmarks/distill_retention.py > benchmarks/work/dr.log 2>&1 &    # in the background
    ... benchmarks/distill_retention.py --plan-only         # runs, tiers, cost estimate; trains nothing
    ... benchmarks/distill_retention.py --report-only       # JSON/MD/PNG from the committed ledger alone
    ... benchmarks/distill_retention.py --quick --work /tmp/dr --out /tmp/dr-out     # smoke (tests/)

Goal: retained = (best member - student) / (best member - mixture) >= 80% (val NLL; best member chosen on the
fitness set), mean of 3 seeds with its 95% t interval, at budgets 32 and 64 epochs, K = 4 and 8, with the
student's extra compute (teacher forwards counted) <= 25% of the population's training FLOPs; otherwise the
best retention and where its curve saturates.

Populations (benchmarks/dr_arms.py): the data-efficiency benchmark's q0 arm exactly (de_arms.q0_cfg, the
`small` preset, 1-epoch cycles, 64 epochs, seeds 0-2, the same prepared data settings), trained by de_jobs
through the real deepspeed launcher; the budget-E population is the prefix of the first E snapshots
(hard-linked into <work>/pop-E{E}-s{s}, prior refitted there by `q0ds fit-prior`).
Students: `q0ds distill-ensemble` jobs, each paired with its no-teacher control (distill.alpha=0).
Phases (tiers, lower first): 0 populations; 1 the reference student (top1, alpha 0.9, T 1, 2 epochs, K 4, on the
fly) + control at (32, K 4); 2 one knob at a time there (alpha 1 / 0.5, T 2, init avg / scratch, 1 / 4 / 8
epochs, cached top-32 teacher, K 8); 3 the reference at every (budget, K); 4 the settings chosen on FITNESS
retention (per family, within the compute cap; recorded in the ledger once the one-factor phase is complete)
at every (budget, K).
Teacher cache: per population and studied K, the top-N truncation's error (KL, gradient, mass covered; N 8, 32,
128) on the reference student's first 64 windows, and one micro-batch's cached vs on-the-fly time
(q0ds.distill_approx.measure_truncation, recorded in the ledger), reported next to the cache32 arm.
Outputs (benchmarks/dr_report.py): benchmarks/results/distill_retention.{json,md,png} and the ledger
distill_retention_ledger.json (benchmarks/de_ledger.py's format): every finished run's numbers, the selection
and the training sessions. Commit the ledger: a later session with an empty work dir skips what it holds.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, add_data_args, env_defaults, machine_info  # noqa: E402

env_defaults()

from benchmarks import de_arms, de_jobs, dr_arms, dr_report  # noqa: E402
from benchmarks.de_ledger import Ledger  # noqa: E402

DEFAULT_WORK = ROOT / "benchmarks" / "work" / "distill_retention"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
LEDGER_NAME = "distill_retention_ledger.json"
# plain-epoch cost units (de_jobs.job_cost's) -> seconds: the data-efficiency ledger's q0-s1 (64 one-epoch
# cycles of the small preset, 123 units) took 834.5 s on the 2 shared cores of this machine
SECONDS_PER_UNIT = 6.8
# a student epoch in plain-epoch units (ensemble_distill.py's measured step times: student alone 0.39 s,
# K=1 0.67, K=2 0.81, K=4 1.25, K=8 1.75 s/step), a snapshot's scoring, one in-process launch
STUDENT_BASE, STUDENT_PER_MEMBER, STUDENT_LAUNCH = 1.5, 0.4, 1.0
# --quick: two plain knobs and the teacher cache. init-avg is left out: with it the smoke's first run alone took
# 4.5 min on 2 busy cores (3.1 min for the whole test without it); tests/test_ensemble_distill.py tests that init.
QUICK_ARMS = "ref,T2,ep1,cache32"


class StudyLedger(Ledger):
    """de_ledger.Ledger, with a student's fingerprint naming its budget (the prefix) and a persistent selection."""

    def fingerprint(self, run) -> str:
        if run.kind == "distill":
            src = run.depends[0]
            settings = [o for o in run.info["overrides"] if not o.startswith("run_dir=")]
            return (f"student:{self.fingerprint(src)}:E{run.info['budget']:g}:k{run.info['k']}:"
                    f"{','.join(settings)}")
        return super().fingerprint(run)

    def save(self) -> None:
        import json
        if self.path.is_file():
            disk = json.loads(self.path.read_text())
            for key in ("selection", "machine"):
                self.doc[key] = self.doc.get(key) or disk.get(key)
        super().save()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="population budgets (default 32 64)")
    p.add_argument("--seeds", type=int, default=None, help="seeds (default 3)")
    p.add_argument("--ks", type=int, nargs="+", default=None, help="teacher mixture sizes (default 4 8)")
    p.add_argument("--arms", default=None, help=f"one-factor arms, comma-separated subset of {','.join(dr_arms.VARIANTS)} "
                   "(default all; quick ref,T2,ep1,cache32)")
    p.add_argument("--cycle-epochs", type=float, default=None, help="population cycle length (default 1)")
    p.add_argument("--student-cycle-epochs", type=float, default=None,
                   help="a student's cycle length; its 'epochs' setting is a number of such cycles (default 1)")
    add_data_args(p, "population config key=value")
    p.add_argument("--length-curve", action=argparse.BooleanOptionalAction, default=None,
                   help="the reference at every student length of --arms at every (budget, K) cell, so each cell has "
                        "its own retention-vs-length curve (default on; off with --quick)")
    p.add_argument("--max-tier", type=int, default=99, help="train only jobs up to this tier (0 populations, "
                   "1 reference, 2 one-factor variants, 3 reference at every cell, 4 selected settings there, "
                   "5 the length curve at every cell)")
    p.add_argument("--work", default=str(DEFAULT_WORK))
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--quick", action="store_true", help="tiny model (LR 0.02), budgets 3 and 4 in half-epoch cycles, "
                   "K 2, 1 seed, arms ref,T2,ep1,cache32: the smoke test")
    p.add_argument("--plan-only", action="store_true", help="print runs and the cost estimate, train nothing")
    p.add_argument("--report-only", action="store_true", help="train nothing; report from the ledger + finished runs")
    a = p.parse_args(argv)
    q = a.quick
    a.budgets = sorted(a.budgets or ([3.0, 4.0] if q else [32.0, 64.0]))
    if q and not a.overrides:
        # the tiny model's members still improve fast at the preset's LR: a higher one makes the 3-epoch prefix's
        # top-2 mixture beat its best member (measured: by 0.017 nats on val), so retention is defined
        a.overrides = ["optim.lr=0.02"]
    a.seeds = (1 if q else 3) if a.seeds is None else a.seeds
    a.length_curve = (not q) if a.length_curve is None else a.length_curve
    a.ks = a.ks or ([2] if q else [4, 8])
    a.arms = (a.arms or (QUICK_ARMS if q else ",".join(dr_arms.VARIANTS))).split(",")
    a.cycle_epochs = a.cycle_epochs or (0.5 if q else 1.0)
    a.student_cycle_epochs = a.student_cycle_epochs or (0.5 if q else 1.0)
    a.preset = a.preset or ("tiny" if q else "small")
    a.train_tokens = a.train_tokens or (12000 if q else 55000)
    a.test_tokens = (1000 if q else 12000) if a.test_tokens is None else a.test_tokens
    if q:
        a.vocab = min(a.vocab, 512)
    bad = [x for x in a.arms if x not in dr_arms.VARIANTS]
    if bad or "ref" not in a.arms:
        p.error(f"--arms must include ref and name only {', '.join(dr_arms.VARIANTS)}; got {bad or a.arms}")
    if min(a.budgets) <= 0 or a.seeds < 1 or min(a.ks) < 1 or a.cycle_epochs <= 0:
        p.error("--budgets, --cycle-epochs must be > 0 and --seeds, --ks >= 1")
    if any(abs(E / a.cycle_epochs - round(E / a.cycle_epochs)) > 1e-9 for E in a.budgets):
        p.error(f"every budget must be a whole number of {a.cycle_epochs:g}-epoch cycles (a budget is a prefix)")
    if max(a.ks + [dr_arms.VARIANTS[x][2].get("k", 0) for x in a.arms]) > round(min(a.budgets) / a.cycle_epochs):
        p.error("a K is larger than the smallest population (budget / cycle-epochs members)")
    return a


def unsupported_arms(args) -> dict:
    """Arms whose ensemble.* options this checkout's `q0ds distill-ensemble` refuses (its own option parser), e.g.
    init-avg and cache32 before branch `cache` is merged: arm -> the error."""
    from q0ds.config import ConfigError
    from q0ds.ensemble_distill import _split_options
    out = {}
    for arm in args.arms:
        ov = [o for o in dr_arms.overrides_of(dr_arms.settings_of(arm), args.student_cycle_epochs)
              if o.startswith("ensemble.")]
        try:
            _split_options(ov)
        except ConfigError as e:
            out[arm] = str(e)
    return out


def command_of(argv) -> str:
    """The command that trains (and reports) this study: argv without --report-only / --plan-only."""
    argv = list(argv if argv is not None else sys.argv[1:])
    return " ".join(["python", "benchmarks/distill_retention.py"] + [x for x in argv if x not in ("--report-only", "--plan-only")])


def data_info(data: Path, cfg) -> dict:
    from q0ds.data import PreparedData
    d = PreparedData.open(data)
    W = d.windows_per_epoch(cfg.train.seq_len)
    n = d.meta["n_tokens"]
    return {"source": d.meta.get("source"), "vocab_size": d.vocab_size, "seq_len": cfg.train.seq_len,
            **{f"{k}_tokens": n[k] for k in ("train", "fitness", "val", "test") if k in n},
            "windows_per_epoch": W, "steps_per_epoch": W / cfg.train.global_batch, "fingerprint": d.fingerprint}


def student_cost(run, args) -> float:
    s = run.info["settings"]
    per = STUDENT_BASE + STUDENT_PER_MEMBER * s["k"] if s["alpha"] > 0 else 1.0
    e = s["epochs"] * args.student_cycle_epochs
    return STUDENT_LAUNCH + e * per + de_jobs.COST_SNAPSHOT * s["epochs"]


def cost(run, args) -> float:
    return student_cost(run, args) if run.kind == "distill" else de_jobs.job_cost(run.cfg)


def plan(args, data) -> int:
    pops = dr_arms.population_runs(args, data)
    known = pops + dr_arms.student_runs(args, pops, de_jobs.LEDGER.doc.get("selection"))
    tot = 0.0
    for r in sorted(known, key=lambda r: (r.tier, r.name)):
        c = cost(r, args)
        done = de_jobs.complete(r)
        tot += 0 if done else c
        print(f"  {r.name:<44} tier {r.tier} est. {c:6.1f} units{'  (done)' if done else ''}", flush=True)
    h = SECONDS_PER_UNIT / 3600
    msg = (f"[distill_retention] {len(known)} runs; left: {tot:.0f} epoch-units = {tot * h:.1f} h of job time, "
           f"about {tot * h / args.parallel:.1f} h wall with {args.parallel} jobs side by side")
    if de_jobs.LEDGER.doc.get("selection") is None:
        # the selected settings are unknown until the one-factor phase ends: bound them by the costliest choice
        worst = {"families": {}}
        for fam in dr_arms.SELECT_FAMILIES:
            cands = [a for a in args.arms if dr_arms.VARIANTS[a][0] == fam]
            if cands:
                pr = dr_arms.student_runs(argparse.Namespace(**{**vars(args), "arms": ["ref", *cands], "seeds": 1}), pops, None)
                worst["families"][fam] = {"winner": max(cands, key=lambda a: max(
                    cost(r, args) for r in pr if f"one-factor:{a}" in r.info["arms"]))}
        extra = [r for r in dr_arms.student_runs(args, dr_arms.population_runs(args, data), worst)
                 if r.name not in {k.name for k in known}]
        up = sum(cost(r, args) for r in extra)
        msg += (f"; then the settings chosen on fitness at every (budget, K) cell: at most {up:.0f} units more "
                f"({len(extra)} jobs, if every knob picks its costliest variant), so at most {(tot + up) * h:.1f} h "
                f"of job time, about {(tot + up) * h / args.parallel:.1f} h wall")
    print(msg + f" ({SECONDS_PER_UNIT} s per unit: the data-efficiency ledger's measured 64-epoch population "
          "on this machine's 2 shared cores)", flush=True)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from benchmarks.data_efficiency import prepare_data
    data = prepare_data(args)
    from q0ds.data import PreparedData
    L = de_jobs.LEDGER = StudyLedger(Path(args.out) / LEDGER_NAME, PreparedData.open(data).fingerprint)

    def get_runs():
        pops = dr_arms.population_runs(args, data)
        de_arms.write_configs(pops)
        sel = L.doc.get("selection")
        runs = pops + dr_arms.student_runs(args, pops, sel)
        if sel is None:
            by = {r.name: r for r in runs}
            of = dr_report.one_factor(args, dr_report.collect(args, [r for r in runs if r.tier <= 2]), by,
                                      dr_report.flop_model(args, info))
            sel = dr_report.select(args, of)
            if sel is not None:
                L.doc["selection"] = sel
                L.save()
                print("[distill_retention] settings chosen on fitness retention: " + ", ".join(
                    f"{f}={v['winner']}" for f, v in sel["families"].items()), flush=True)
                pops = dr_arms.population_runs(args, data)
                runs = pops + dr_arms.student_runs(args, pops, sel)
        for p in pops:                      # the prefix dirs a pending student reads (rebuilt if missing)
            if de_jobs.disk_complete(p) and not all(de_jobs.complete(f) for f in p.feeds):
                for E in args.budgets:
                    dr_arms.make_prefix(args, p, E)
        return runs

    info = data_info(data, dr_arms.population_runs(args, data)[0].cfg)
    bad = unsupported_arms(args)
    if bad and not args.report_only:
        lines = "\n".join(f"  {a}: {e}" for a, e in bad.items())
        msg = (f"[distill_retention] this checkout's q0ds distill-ensemble refuses {len(bad)} arm(s):\n{lines}\n"
               f"merge the branch that adds them, or leave them out: --arms "
               f"{','.join(a for a in args.arms if a not in bad)}")
        if not args.plan_only:
            raise SystemExit(msg)
        print(msg, flush=True)
    if args.plan_only:
        return plan(args, data)
    runs = get_runs()
    print(f"[distill_retention] {len(runs)} runs; work {work}", flush=True)
    for run in runs:                         # finished in this work dir before the ledger knew: record now
        if de_jobs.disk_complete(run) and not L.has(run):
            dr_report.record(args, run)
    failed = []
    if not args.report_only:
        t0, done = time.time(), []
        pending = de_jobs.pending_jobs(runs)
        if pending:
            L.doc["machine"] = machine_info()
            L.save()

        def on_complete(run):
            done.append(run.name)
            dr_report.record(args, run)

        try:
            failed = de_jobs.train_all(get_runs, args.parallel, args.threads, t_start, args.max_tier, on_complete)
        finally:
            if done or failed:
                de_jobs.log_session(t0, time.time(), failed)
        runs = get_runs()
    res = dr_report.report(args, info, runs, command_of(argv))
    print("\n".join(["", *res["statement"]]), flush=True)
    for k, b, rc in failed:
        print(f"[distill_retention] FAILED {k} (exit {rc})", flush=True)
    print(f"[distill_retention] {res['cells_complete']}/{res['cells_planned']} cells complete; wrote "
          f"{Path(args.out) / 'distill_retention.json'}", flush=True)
    return 1 if failed or (res["incomplete_runs"] and not args.report_only and args.max_tier >= 99) else 0


if __name__ == "__main__":
    sys.exit(main())
