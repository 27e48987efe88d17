"""The SLURM scripts on a real single-node SLURM cluster (slurm/local_cluster.sh starts it, as root).

    .venv/bin/python -m pytest tests/test_slurm.py -m slurm -v        # ~15 min on 2 cores

The cluster fixture installs Debian's slurm-wlm if needed. Without root (or apt) the tests that need the
cluster are skipped, except with CI=true, where they must run and fail loudly.
Runs use the tiny preset on CPU ranks (Q0DS_CPU=1): `submit.sh` adds no GPU request then.
"""
from __future__ import annotations

import json
import os
import time

import pytest

try:                                   # tests/ as a package or as a plain directory on sys.path
    from . import slurm_util as su
except ImportError:
    import slurm_util as su

pytestmark = [pytest.mark.slurm]

Q0_BASES = su.SLURM_DIR / "q0_bases.sh"
Q0_PRIOR = su.SLURM_DIR / "q0_prior.sh"
SUBMIT = su.SLURM_DIR / "submit.sh"
BANNER = "==== q0_bases"


@pytest.fixture(scope="session")
def slurm_cluster():
    ok, why = su.can_run_local_cluster()
    if not ok and os.environ.get("CI") != "true":
        pytest.skip(why)
    started_before = su.cluster_running_by_us()
    t0 = time.monotonic()
    p = su.cluster("start")
    print(f"local SLURM cluster up in {time.monotonic() - t0:.0f} s\n{p.stderr}")
    yield
    if not started_before:          # leave a cluster the developer started by hand running
        su.cluster("stop")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm-data") / "embedded"
    # the whole corpus (~200 tiny steps per cycle): the scancel test needs a base that is still training a few
    # seconds after its first steps; the pre-emption and submit tests set schedule.cycle_steps
    su.cli("prepare", "--embedded", "--out", out)
    return out


def node_cpus() -> int:
    return os.cpu_count() or 1


def read_log(run_dir, pattern="q0-bases-*.out") -> str:
    logs = sorted((run_dir / "logs").glob(pattern))
    assert logs, f"no log {pattern} in {run_dir / 'logs'}"
    return "\n".join(p.read_text(errors="replace") for p in logs)


def queue_ids() -> set:
    return set(su.run(["squeue", "-h", "-o", "%i"]).stdout.split())


# ---- fail fast: clear message, non-zero exit, nothing submitted --------------------------------------

def test_submit_missing_config_submits_nothing(slurm_cluster, tmp_path):
    before = queue_ids()
    p = su.run(["bash", SUBMIT, tmp_path / "missing.json"], check=False, env=su.job_env())
    assert p.returncode != 0
    assert "run config not found" in p.stderr and "nothing submitted" in p.stderr, p.stderr
    assert p.stdout.strip() == ""
    assert queue_ids() == before


def test_submit_bad_config_submits_nothing(slurm_cluster, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"no_such_key": 1}))
    before = queue_ids()
    p = su.run(["bash", SUBMIT, bad], check=False, env=su.job_env())
    assert p.returncode != 0
    assert "nothing submitted" in p.stderr, p.stderr
    assert queue_ids() == before


def test_submit_without_arguments_prints_usage():
    p = su.run(["bash", SUBMIT], check=False, env=su.job_env())
    assert p.returncode != 0 and "usage" in p.stderr


def test_bases_script_needs_config_and_task(tiny_data, tmp_path):
    p = su.run(["bash", Q0_BASES, tmp_path / "missing.json"], check=False, env=su.job_env(), cwd=su.REPO)
    assert p.returncode != 0 and "run config not found" in p.stderr, p.stderr
    config, _ = su.make_tiny_config(tiny_data, tmp_path)
    p = su.run(["bash", Q0_BASES, config], check=False, env=su.job_env(), cwd=su.REPO)
    assert p.returncode != 0 and "no base index" in p.stderr, p.stderr


def test_bases_task_out_of_range_fails_in_the_job(slurm_cluster, tiny_data, tmp_path):
    config, run_dir = su.make_tiny_config(tiny_data, tmp_path, "bases=2")
    job = su.sbatch("--array=3", "--cpus-per-task=1", f"--output={run_dir}/logs/q0-bases-%A_%a.out",
                    Q0_BASES, config)
    su.wait_finished([job], 120, run_dir / "logs", hurry=False)
    state, restarts, _ = su.final_states(job)["3"]
    assert state == "FAILED" and restarts == 0
    assert "out of range" in read_log(run_dir)
    assert not (run_dir / "bases").exists()


def test_prior_names_bases_without_snapshots(tiny_data, tmp_path):
    config, run_dir = su.make_tiny_config(tiny_data, tmp_path, "bases=2")
    fake = su.base_dir(run_dir, 0) / "snapshots" / "cycle-0000"
    fake.mkdir(parents=True)
    (fake / "snapshot.json").write_text("{}")
    p = su.run(["bash", Q0_PRIOR, config], check=False, env=su.job_env(), cwd=su.REPO)
    assert p.returncode != 0
    assert "no snapshots for base-01" in p.stderr and "base-00" not in p.stderr, p.stderr
    assert not (run_dir / "prior.json").exists()


# ---- real runs ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_submit_trains_all_bases_then_prior(slurm_cluster, tiny_data, tmp_path):
    """submit.sh: a 2-task array on CPU ranks, then the afterok prior job; snapshots and prior.json."""
    config, run_dir = su.make_tiny_config(tiny_data, tmp_path, "bases=2", "schedule.cycles=2", "schedule.cycle_steps=20")
    p = su.run(["bash", SUBMIT, config], env=su.job_env())
    bases_job, prior_job = p.stdout.split()
    su.wait_finished([bases_job, prior_job], 15 * 60, run_dir / "logs")

    diag = su.diagnostics([bases_job, prior_job], run_dir / "logs")
    assert {t: s[0] for t, s in su.final_states(bases_job).items()} == {"0": "COMPLETED", "1": "COMPLETED"}, diag
    assert su.final_states(prior_job)[prior_job][0] == "COMPLETED", diag
    for base in (0, 1):
        snaps = sorted((su.base_dir(run_dir, base) / "snapshots").glob("cycle-*/model.safetensors"))
        assert len(snaps) == 2, (base, snaps, diag)
    members = [json.dumps(m) for m in json.loads((run_dir / "prior.json").read_text())["members"]]
    for base in ("base-00", "base-01"):
        assert any(base in m for m in members), (base, members)
    assert (run_dir / "eval.json").is_file() and (run_dir / "report.md").is_file(), diag


@pytest.mark.slow
@pytest.mark.parametrize("launch,ranks", [
    ("direct", 1),
    # the 2-rank srun path takes ~7 min on 2 cores (its reference run needs both): opt in
    pytest.param("srun", 2, marks=pytest.mark.skipif(os.environ.get("Q0DS_SLURM_FULL") != "1",
                                                     reason="set Q0DS_SLURM_FULL=1 for the 2-rank srun path")),
])
def test_usr1_preemption_requeues_and_resumes_exactly(slurm_cluster, tiny_data, tmp_path, launch, ranks):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@300 does before the time limit): the trainer
    checkpoints and exits 75, the script requeues the task, the rerun resumes, and the snapshots are
    bit-identical to an undisturbed run of the same command."""
    # 2 cycles of 60 steps (the whole corpus would be ~200 per cycle): ~110 steps left after the 10 it waits for
    config, run_dir = su.make_tiny_config(tiny_data, tmp_path, "bases=1", "schedule.cycles=2", "schedule.cycle_steps=60")
    ref_dir = tmp_path / "reference-run"
    (ref_dir / "logs").mkdir(parents=True)
    env = su.job_env(Q0DS_GPUS_PER_NODE=ranks, Q0DS_USE_SRUN=int(launch == "srun"), Q0DS_RESEND_SECONDS=10)
    common = ["--array=0", f"--cpus-per-task={min(ranks, node_cpus())}", "--time=60"]
    job = su.sbatch(*common, f"--output={run_dir}/logs/q0-bases-%A_%a.out", Q0_BASES, config, env=env)
    ref = su.sbatch(*common, f"--output={ref_dir}/logs/q0-bases-%A_%a.out", Q0_BASES, config,
                    f"run_dir={ref_dir}", env=env)
    task = f"{job}_0"

    def progressed():
        m = su.base_dir(run_dir, 0) / "metrics.jsonl"
        return (m.is_file() and len(m.read_text().splitlines()) >= 10) or not su.queued(job)
    su.wait_until(progressed, 600, "training progress in metrics.jsonl",
                  diagnose=lambda: su.diagnostics([job, ref], run_dir / "logs"))
    assert su.queued(job), "the base finished before it could be pre-empted\n" + su.diagnostics([job], run_dir / "logs")
    su.run(["scancel", "--signal=USR1", "--batch", task])
    su.wait_until(lambda: int(su.job_record(task).get("Restarts", 0)) >= 1, 300, "the requeue (Restarts=1)",
                  diagnose=lambda: su.diagnostics([job], run_dir / "logs"))
    su.wait_finished([job, ref], 15 * 60, run_dir / "logs")

    log = read_log(run_dir)
    diag = su.diagnostics([job, ref], run_dir / "logs") + "\n" + su.diagnostics([ref], ref_dir / "logs")
    state, restarts, _ = su.final_states(job)["0"]
    assert (state, restarts) == ("COMPLETED", 1), diag
    assert su.final_states(ref)["0"][:2] == ("COMPLETED", 0), diag
    assert log.count(BANNER) == 2 and "requeueing" in log and "resuming from checkpoint" in log, diag
    hashes, ref_hashes = su.snapshot_hashes(run_dir, 0), su.snapshot_hashes(ref_dir, 0)
    assert len(hashes) == 2 and hashes == ref_hashes, (hashes, ref_hashes)


@pytest.mark.slow
def test_scancel_is_final_not_requeued(slurm_cluster, tiny_data, tmp_path):
    """scancel sends SIGTERM: the trainer may checkpoint, but the script must not requeue (a requeue from
    inside a cancelled job brings it back)."""
    config, run_dir = su.make_tiny_config(tiny_data, tmp_path, "bases=1")
    job = su.sbatch("--array=0", "--cpus-per-task=1", f"--output={run_dir}/logs/q0-bases-%A_%a.out",
                    Q0_BASES, config)
    su.wait_until(lambda: su.has_progress(run_dir, 0) or not su.queued(job), 600, "training progress",
                  diagnose=lambda: su.diagnostics([job], run_dir / "logs"))
    assert su.queued(job), "the base finished before it could be cancelled"
    su.run(["scancel", job])
    su.wait_finished([job], 180, run_dir / "logs", hurry=False)
    time.sleep(5)                                   # a requeue would put it back into the queue
    assert not su.queued(job)
    state, restarts, _ = su.final_states(job)["0"]
    log = read_log(run_dir)
    assert (state, restarts) == ("CANCELLED", 0), su.diagnostics([job], run_dir / "logs")
    assert "got SIGTERM" in log and "requeueing" not in log.replace("not requeueing", ""), log[-3000:]
