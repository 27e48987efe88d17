"""Job scheduler of benchmarks/data_efficiency.py: every unfinished base of every run is one deepspeed job
(`runner.launch_base`, the real launcher); `parallel` run side by side, lowest tier first, longest first
within a tier. The job list is rebuilt whenever a slot frees, so runs that depend on others (the baselines on
the tuning grid) join as soon as they can. SIGTERM/Ctrl-C: every running base checkpoints and exits (75);
rerun the same command to resume (finished bases are skipped, interrupted ones resume from their checkpoint).
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.de_ledger import merge_timing

# Relative cost of one epoch (plain-epoch units) for ordering and the estimate: a distilled step ~1.6x a
# plain one; scoring a snapshot (val + fitness) and one launch, in epochs (measured on this machine).
COST_DISTILL, COST_SNAPSHOT, COST_LAUNCH = 1.6, 0.25, 3.0


def plan_of(cfg):
    from q0ds.runner import plan_of as _plan_of
    return _plan_of(cfg)


def job_cost(cfg) -> float:
    """Estimated cost of one base in plain-epoch units."""
    plan = plan_of(cfg)
    cost = COST_LAUNCH
    d = cfg.distill
    teacher = d.enabled and d.start_cycle < cfg.schedule.cycles
    for c in plan.cycles:
        ep = c.steps * c.batch / plan.windows_per_epoch
        cost += ep * (COST_DISTILL if teacher and c.index >= d.start_cycle else 1.0) + COST_SNAPSHOT
    return cost


def run_cost(run) -> float:
    """Estimated cost of one base of a Run (a distillation job: ~2 epochs with a K=4 teacher, ~3x a plain step)."""
    return 2 * 3.0 + COST_LAUNCH if run.kind == "distill" else job_cost(run.cfg)


# The ledger of finished runs (benchmarks/de_ledger.py), set by data_efficiency.main; None: files only.
LEDGER = None


def disk_done(run, b: int) -> bool:
    """Base b of the run finished, with its files in the work dir."""
    from q0ds.trainer import base_dir
    if run.kind == "distill":
        return (run.run_dir / "distill_report.json").is_file()
    return (base_dir(run.cfg, b) / "done.json").is_file()


def disk_complete(run) -> bool:
    return all(disk_done(run, b) for b in range(run.cfg.bases))


def in_ledger(run) -> bool:
    """Finished in an earlier session (its numbers are in the ledger), and no unfinished run needs its files."""
    return LEDGER is not None and LEDGER.has(run) and all(complete(f) for f in run.feeds)


def base_done(run, b: int) -> bool:
    return disk_done(run, b) or in_ledger(run)


def complete(run) -> bool:
    return disk_complete(run) or in_ledger(run)


def pending_jobs(runs, running_keys=()) -> list:
    """(tier, -cost, name, base, run) of every unfinished base not running now, in launch order."""
    jobs = []
    for run in runs:
        if run.depends and not all(disk_complete(d) for d in run.depends):       # it reads their files
            continue
        cost = run_cost(run)
        for b in range(run.cfg.bases):
            if (run.name, b) not in running_keys and not base_done(run, b):
                jobs.append((run.base_tiers[b], -cost, run.name, b, run))
    jobs.sort(key=lambda j: j[:4])
    return jobs


def _timing_path(run):
    return run.run_dir / "bench_timing.json"


def read_timing(run) -> dict:
    """The job timing file merged with the ledger's copy (de_ledger.merge_timing: per base, more seconds wins)."""
    p = _timing_path(run)
    return merge_timing(LEDGER.timing(run) if LEDGER is not None else {},
                        json.loads(p.read_text()) if p.is_file() else {})


def _add_timing(run, base, seconds, rc):
    t = read_timing(run)
    rec = t.setdefault(str(base), {"seconds": 0.0, "attempts": 0})
    rec["seconds"] = round(rec["seconds"] + seconds, 2)
    rec["attempts"] += 1
    rec["last_rc"] = rc
    write_json(_timing_path(run), t)
    if LEDGER is not None:
        LEDGER.set_timing(run, t)


def train_all(get_runs, parallel: int, threads: int, t_start: float, max_tier: int = 99, on_complete=None) -> list:
    """Train every unfinished base of get_runs() (called again whenever a slot frees); on_complete(run) when a
    run's last base finishes (the benchmark records it in the ledger). Returns failures."""
    from q0ds.runner import launch_base
    from q0ds.trainer import base_dir
    runs = get_runs()
    jobs = [j for j in pending_jobs(runs) if j[0] <= max_tier]
    print(f"[data_efficiency] {len(jobs)} base job(s) to train now (more join when the tuning grid is done), "
          f"est. {sum(-j[1] for j in jobs):.0f} epoch-units; {parallel} side by side, {threads} thread(s) each",
          flush=True)
    running, failed, stop, last_status = {}, [], [], time.time()
    failed_keys = set()

    def on_signal(signum, frame):
        if not stop:
            print(f"[{hms(time.time() - t_start)}] {signal.Signals(signum).name}: stopping; running bases "
                  "checkpoint and exit (rerun to resume)", flush=True)
            for proc, *_ in running.values():
                for pid in _descendants(proc.pid, leaves=True):   # train.py only: the launcher would SIGKILL it
                    _signal(pid, signal.SIGTERM)
        stop.append(signum)

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            if not stop and len(running) < parallel:
                runs = get_runs()
                keys = {(r[1].name, r[2]) for r in running.values()} | failed_keys
                jobs = [j for j in pending_jobs(runs, keys) if j[0] <= max_tier]
                while jobs and len(running) < parallel:
                    tier, negcost, _, b, run = jobs.pop(0)
                    proc = (launch_distill(run, threads) if run.kind == "distill" else
                            launch_base(run.run_dir / "config.json", b, base_dir(run.cfg, b), 1, threads))
                    running[proc.pid] = (proc, run, b, time.time(), -negcost)
                    print(f"[{hms(time.time() - t_start)}] start {run.name} base {b} (tier {tier}, est. "
                          f"{-negcost:.1f} units; {len(jobs)} queued)", flush=True)
            if not running:
                break
            time.sleep(1.0)
            for pid, (proc, run, b, t0, cost) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[pid]
                dt = time.time() - t0
                _add_timing(run, b, dt, proc.returncode)
                if proc.returncode != 0:
                    failed.append((run.name, b, proc.returncode))
                    failed_keys.add((run.name, b))
                    print(f"[{hms(time.time() - t_start)}] FAILED {run.name} base {b} (exit {proc.returncode}); "
                          f"see {base_dir(run.cfg, b) / 'train.log'}", flush=True)
                else:
                    print(f"[{hms(time.time() - t_start)}] done  {run.name} base {b} in {dt:.0f} s", flush=True)
                    if on_complete is not None and disk_complete(run):
                        on_complete(run)
            if time.time() - last_status > 300 and running:
                last_status = time.time()
                parts = [f"{run.name}/b{b} step {_steps_done(base_dir(run.cfg, b))}/{plan_of(run.cfg).total_steps}"
                         for proc, run, b, t0, cost in running.values()]
                print(f"[{hms(time.time() - t_start)}] running: " + "; ".join(parts), flush=True)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if stop:
        raise SystemExit("[data_efficiency] stopped by signal; rerun the same command to resume.")
    return failed


def launch_distill(run, threads: int):
    """`q0ds distill-ensemble --run SRC --k K [overrides]` (one process, CPU) after fitting SRC's prior."""
    import subprocess
    import sys
    from q0ds.population import fit_prior_run
    src = Path(run.info["source"])
    if not (src / "prior.json").is_file():
        fit_prior_run(src)
    run.run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run.run_dir.parent / f"{run.run_dir.name}.log", "a")
    env = dict(os.environ, Q0DS_NO_PROGRESS="1", Q0DS_THREADS=str(threads))
    cmd = [sys.executable, "-m", "q0ds", "distill-ensemble", "--run", str(src), "--k", str(run.info["k"]),
           *run.info["overrides"]]
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _descendants(pid: int, leaves: bool = False) -> list[int]:
    """Descendants of a process (Linux /proc): the deepspeed runner -> launch -> train.py."""
    out = []
    try:
        kids = [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return out
    for k in kids:
        below = _descendants(k, leaves)
        out += (below or [k]) if leaves else below + [k]
    return out


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _steps_done(d: Path) -> int:
    m = d / "metrics.jsonl"
    return sum(1 for line in m.read_text().splitlines() if line.startswith('{"step"')) if m.is_file() else 0


def hms(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def log_session(start: float, end: float, failed) -> None:
    """Wall time of every training invocation, in the ledger (a resumed benchmark spans several sessions)."""
    LEDGER.doc["sessions"].append({"start": round(start, 1), "end": round(end, 1), "failed_jobs": len(failed),
                                   "start_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(start))})
    LEDGER.save()


def read_sessions() -> list:
    return LEDGER.doc["sessions"] if LEDGER is not None else []
