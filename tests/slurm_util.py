"""Helpers for tests/test_slurm.py: the local SLURM cluster, job submission, polling and run-dir checks.

Everything goes through the real SLURM commands (sbatch, squeue, scontrol, scancel); nothing is mocked.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLURM_DIR = REPO / "slurm"
LOCAL_CLUSTER = SLURM_DIR / "local_cluster.sh"

# SLURM holds a requeued job in PENDING (reason BeginTime) for ~120 s before it may start again; tests
# skip that wait with `scontrol update JobId=J StartTime=now` (the requeue itself is what they check).
REQUEUE_HOLD_S = 120


def run(cmd, check=True, timeout=120, **kw) -> subprocess.CompletedProcess:
    """Run a command, capture text output; on failure raise with both streams in the message."""
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


def can_run_local_cluster() -> tuple[bool, str]:
    """(possible, why not): root is needed, and either SLURM installed or apt-get to install it."""
    if os.geteuid() != 0:
        return False, "local SLURM cluster needs root"
    if not (shutil.which("slurmctld") or os.path.exists("/usr/sbin/slurmctld") or shutil.which("apt-get")):
        return False, "SLURM is not installed and apt-get is unavailable"
    return True, ""


def cluster(action: str, timeout=900) -> subprocess.CompletedProcess:
    return run(["bash", LOCAL_CLUSTER, action], timeout=timeout)


def cluster_running_by_us() -> bool:
    p = run(["bash", LOCAL_CLUSTER, "status"], check=False, timeout=60)
    return "slurmctld: running" in p.stdout


def job_env(**extra) -> dict:
    """Environment for submissions: this python and project, CPU ranks, no SLURM variables of an outer job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.update(Q0DS_CPU="1", Q0DS_PYTHON=sys.executable, Q0DS_ROOT=str(REPO), DS_ACCELERATOR="cpu",
               Q0DS_NO_PROGRESS="1")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(*args, timeout=600) -> subprocess.CompletedProcess:
    """`python -m q0ds.cli ARGS` from the project dir."""
    return run([sys.executable, "-m", "q0ds.cli", *args], cwd=REPO, env=job_env(), timeout=timeout)


def make_tiny_config(data: Path, workdir: Path, *overrides: str, name="config") -> tuple[Path, Path]:
    """`q0ds init-config --preset tiny` for DATA -> (config path, run dir); logs dir created."""
    run_dir = workdir / f"{name}-run"
    config = workdir / f"{name}.json"
    cli("init-config", "--preset", "tiny", "--data", data, "--run", run_dir, "--out", config, *overrides)
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    return config, run_dir


def sbatch(*args, env=None) -> str:
    """sbatch --parsable ARGS -> job id."""
    p = run(["sbatch", "--parsable", *args], cwd=REPO, env=env or job_env())
    return p.stdout.strip().split(";")[0]


def job_records(jobid: str) -> list[dict]:
    """`scontrol show job -o` as dicts, one per job (an array job gives one per task); [] if unknown."""
    p = run(["scontrol", "show", "job", "-o", jobid], check=False)
    if p.returncode != 0:
        return []
    return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in p.stdout.splitlines() if line.strip()]


def job_record(jobid: str) -> dict:
    recs = job_records(jobid)
    assert len(recs) == 1, f"expected one job record for {jobid}, got {len(recs)}"
    return recs[0]


def queued(jobid: str) -> list[str]:
    """Jobs/tasks of JOBID still in the queue (pending, running or completing)."""
    p = run(["squeue", "-h", "-j", jobid, "-o", "%i %T"], check=False)
    return [line for line in p.stdout.splitlines() if line.strip()]


def hurry_requeued(jobid: str, delay_s: int = 5) -> None:
    """Shorten SLURM's ~120 s BeginTime hold of requeued tasks of JOBID to DELAY_S seconds. Not to zero: a
    task started within the same second as its requeue is refused by slurmd ("Killing non-startable batch
    JobId=N: Job credential revoked", slurmctld.log) and fails with exit 1 and no output."""
    for r in job_records(jobid):
        if r.get("JobState") == "PENDING" and r.get("Reason") == "BeginTime" and int(r.get("Restarts", 0)) > 0:
            begin = r.get("EligibleTime") or r.get("StartTime") or ""
            try:
                wait = (datetime.datetime.fromisoformat(begin) - datetime.datetime.now()).total_seconds()
            except ValueError:
                wait = float("inf")
            if wait > 2 * delay_s:                       # still SLURM's hold, not ours
                task = f"{r['ArrayJobId']}_{r['ArrayTaskId']}" if r.get("ArrayTaskId") else r["JobId"]
                run(["scontrol", "update", f"JobId={task}", f"StartTime=now+{delay_s}"], check=False)


def wait_until(cond, timeout: float, what: str, poll=2.0, diagnose=None):
    """Poll COND() until it returns something truthy; on timeout raise naming WHAT (plus diagnostics)."""
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = diagnose() if diagnose else ""
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{extra}")
        time.sleep(poll)


def wait_finished(jobids: list[str], timeout: float, logs_dir: Path | None = None, hurry=True) -> None:
    """Wait until none of JOBIDS is queued any more (requeued tasks are released early when HURRY)."""
    def done():
        if hurry:
            for j in jobids:
                hurry_requeued(j)
        return not any(queued(j) for j in jobids)
    wait_until(done, timeout, f"jobs {jobids} to finish", poll=3.0, diagnose=lambda: diagnostics(jobids, logs_dir))


def diagnostics(jobids: list[str], logs_dir: Path | None = None, tail=40) -> str:
    """squeue, job states and log tails, for assertion messages."""
    out = [run(["squeue"], check=False).stdout]
    for j in jobids:
        for r in job_records(j):
            out.append(" ".join(f"{k}={r.get(k)}" for k in ("JobId", "ArrayTaskId", "JobState", "Reason",
                                                              "Restarts", "ExitCode")))
    if logs_dir and logs_dir.is_dir():
        for log in sorted(logs_dir.glob("*.out")):
            lines = log.read_text(errors="replace").splitlines()
            out.append(f"--- {log} (last {tail} lines)\n" + "\n".join(lines[-tail:]))
    return "\n".join(out)


def final_states(jobid: str) -> dict:
    """{task id or job id: (JobState, Restarts, ExitCode)} once JOBID has left the queue."""
    return {r.get("ArrayTaskId") or r["JobId"]: (r["JobState"], int(r.get("Restarts", 0)), r.get("ExitCode"))
            for r in job_records(jobid)}


def base_dir(run_dir: Path, base: int) -> Path:
    return Path(run_dir) / "bases" / f"base-{base:02d}"


def snapshot_hashes(run_dir: Path, base: int) -> dict:
    """{cycle dir name: sha256 of the weights} from each snapshot.json of one base."""
    return {d.name: json.loads((d / "snapshot.json").read_text())["sha256"]
            for d in sorted((base_dir(run_dir, base) / "snapshots").glob("cycle-*")) if (d / "snapshot.json").is_file()}


def has_progress(run_dir: Path, base: int) -> bool:
    m = base_dir(run_dir, base) / "metrics.jsonl"
    return m.is_file() and m.stat().st_size > 0
