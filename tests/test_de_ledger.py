"""The committed data-efficiency ledger stays valid: every finished run in it has the fingerprint that today's code
gives the same run, so a benchmark session skips it instead of silently retraining hours of CPU (a config key
added later, such as distill.teacher_mode, once invalidated every entry). Prepares the benchmark's data (~1 s);
trains nothing."""
import json

import pytest

from benchmarks import data_efficiency as D, de_arms, de_honest_arms, de_jobs
from benchmarks.de_ledger import Ledger
from q0ds.data import PreparedData

LEDGER = D.DEFAULT_OUT / "data_efficiency_ledger.json"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    args = D.parse_args(["--work", str(tmp_path_factory.mktemp("de")), "--honest-arms"])
    data = D.prepare_data(args)
    ledger = Ledger(LEDGER, PreparedData.open(data).fingerprint)
    old, de_jobs.LEDGER = de_jobs.LEDGER, ledger
    try:
        runs = de_arms.build_runs(args, data, ledger.doc["tuned"]["recipe"]) + de_honest_arms.build(args, data)
    finally:
        de_jobs.LEDGER = old
    return ledger, {r.name: r for r in runs}


def test_the_benchmark_data_has_the_ledgers_data_fingerprint(built):
    ledger, _ = built
    recorded = {e["fingerprint"].rsplit(":", 1)[-1] for e in ledger.doc["runs"].values() if e["kind"] != "distill"}
    assert recorded == {ledger.data_fp[:16]}, "the benchmark's prepared data changed: every ledger entry is stale"


def test_every_ledger_entry_matches_its_run_today(built):
    ledger, runs = built
    entries = json.loads(LEDGER.read_text())["runs"]
    assert len(entries) >= 79
    orphans = sorted(set(entries) - set(runs))
    assert not orphans, f"ledger entries the benchmark no longer builds: {orphans}"
    stale = [name for name, e in entries.items() if e["fingerprint"] != ledger.fingerprint(runs[name])]
    assert not stale, (f"{len(stale)} ledger entries would be retrained (their settings fingerprint changed), "
                       f"e.g. {stale[:3]}: a new config key that does not change a trajectory belongs in "
                       "q0ds.config.EXECUTION_ONLY")


def test_a_run_recorded_before_its_job_exits_takes_the_jobs_timing(built, tmp_path):
    """The race CI met: a report can record a run from its finished files while its process has not exited (a
    slot frees elsewhere); the timing file is written only at exit, so the entry is made without a timing. When
    the job's timing is written the entry takes it, and a second ledger object merging the file keeps it."""
    ledger, runs = built
    run = runs["tuneE8-lr0.003-wd3"]
    L = Ledger(tmp_path / "ledger.json", ledger.data_fp)
    old, de_jobs.LEDGER = de_jobs.LEDGER, L
    try:
        assert de_jobs.read_timing(run) == {}
        L.put(run, "curve", {"val": 1.0}, timing=de_jobs.read_timing(run))
        assert L.timing(run) == {}
        other = Ledger(tmp_path / "ledger.json", ledger.data_fp)       # a --report-only beside the benchmark
        de_jobs._add_timing(run, 0, 12.5, 0)
        want = {"0": {"seconds": 12.5, "attempts": 1, "last_rc": 0}}
        assert L.timing(run) == want and Ledger(tmp_path / "ledger.json", ledger.data_fp).timing(run) == want
        other.put(run, "curve2", {"val": 2.0})
        assert Ledger(tmp_path / "ledger.json", ledger.data_fp).timing(run) == want
        # a timing file behind the ledger (an older version's, or a killed attempt's) does not shrink the total
        from benchmarks.common import write_json
        write_json(de_jobs._timing_path(run), {"0": {"seconds": 3.0, "attempts": 1, "last_rc": -15}})
        assert de_jobs.read_timing(run) == want
        de_jobs._add_timing(run, 0, 1.0, 0)
        assert L.timing(run) == {"0": {"seconds": 13.5, "attempts": 2, "last_rc": 0}}
    finally:
        de_jobs.LEDGER = old


def test_the_extra_seeds_ledger_matches_its_runs_today(tmp_path):
    """benchmarks/de_more_seeds.py's ledger (seeds 3 and 4 of the cells that straddle 0) stays valid likewise."""
    from benchmarks import de_more_seeds
    args = D.parse_args(["--work", str(tmp_path), "--honest-arms"])
    data = D.prepare_data(args)
    ledger = Ledger(de_more_seeds.LEDGER, PreparedData.open(data).fingerprint)
    runs = {r.name: r for r in de_more_seeds.build(args, data)}
    entries = ledger.doc["runs"]
    assert len(entries) == len(runs) == 10 and set(entries) == set(runs)
    assert [n for n, e in entries.items() if e["fingerprint"] != ledger.fingerprint(runs[n])] == []
