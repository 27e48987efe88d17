"""Two more seeds (3 and 4) for the headline cells whose 95% interval straddles 0 at n = 3 (issue 20): q0 at
K = 1 and K = 2 against the strongest baseline with as many forward passes, and the recipe / population split,
at 32 and 64 epochs (benchmarks/de_fit3k.py reports them at n = 5).

    nice -n 10 .venv/bin/python benchmarks/de_more_seeds.py      # ~50 min on 2 cores; resumable like the benchmark

Runs, in the data-efficiency work dir, with that benchmark's settings and seed rule (seed index s):
  q0-s{s}            q0 over 64 one-epoch cycles (seed 100 s), every snapshot scored on fitness, val and test
  sfit-E32/E64-s{s}  the single model with the recipe tuned at 32 / 64 epochs (seed 1000 + 100 s)
  pmem-L16-s{s}      2 members of 16 epochs with the 16-epoch recipe (seed 3000 + 100 s): K = 2 at 32
  pfit-E64-M2-s{s}   2 members of 32 epochs with the 64-epoch recipe (seed 2000 + 100 s): K = 2 at 64
Which baseline each cell uses is the strongest at n = 3 on test (de_fit3k.json), fixed before these runs.
Their numbers go to benchmarks/results/data_efficiency_seeds_ledger.json (a ledger of its own: the main
ledger's seed count stays 3).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT  # noqa: E402

SEEDS = (3, 4)
LEDGER = ROOT / "benchmarks" / "results" / "data_efficiency_seeds_ledger.json"


def build(args, data) -> list:
    """The runs above, with the recipes the main ledger's budget grids chose."""
    from benchmarks import de_honest_arms as HA, de_jobs
    from benchmarks.de_arms import q0_run
    from benchmarks.de_ledger import Ledger
    from q0ds.data import PreparedData
    main = de_jobs.LEDGER
    de_jobs.LEDGER = Ledger(ROOT / "benchmarks" / "results" / "data_efficiency_ledger.json",
                            PreparedData.open(data).fingerprint)
    try:
        tuned = {}
        for E in (16.0, 32.0, 64.0):
            c = HA.choose(args, HA.grid_runs(args, data, E))
            if c is None:
                raise SystemExit(f"[de_more_seeds] the {E:g}-epoch grid is not finished in the main ledger: run "
                                 "benchmarks/data_efficiency.py --honest-arms first")
            tuned[E] = c
    finally:
        de_jobs.LEDGER = main
    rec = {E: {"lr": c["lr"], "wd": c["wd"]} for E, c in tuned.items()}
    runs = []
    for s in SEEDS:
        runs += [q0_run(args, data, s, 64.0), HA.sfit_run(args, data, 32.0, s, tuned[32.0]),
                 HA.sfit_run(args, data, 64.0, s, tuned[64.0]), HA.pmem_run(args, data, 16.0, s, rec[16.0], [2]),
                 HA.pfit_run(args, data, 64.0, 2, s, rec[64.0])]
    for r in runs:
        r.base_tiers = [0 if r.kind == "q0" else 1] * r.cfg.bases       # the long q0 runs first
    return runs


def main(argv=None) -> int:
    from benchmarks import data_efficiency as D, de_arms, de_jobs, de_report
    from benchmarks.de_ledger import Ledger
    from q0ds.data import PreparedData
    args = D.parse_args(["--honest-arms"] + list(argv if argv is not None else sys.argv[1:]))
    data = D.prepare_data(args)
    runs = build(args, data)
    de_jobs.LEDGER = Ledger(LEDGER, PreparedData.open(data).fingerprint)
    de_arms.write_configs(runs)
    for run in runs:
        if de_jobs.disk_complete(run) and not de_jobs.LEDGER.has(run):
            de_report.record(args, run)
    t0 = time.time()
    try:
        failed = de_jobs.train_all(lambda: runs, args.parallel, args.threads, t0,
                                   on_complete=lambda run: de_report.record(args, run))
    finally:
        de_jobs.log_session(t0, time.time(), [])
    print(f"[de_more_seeds] {sum(de_jobs.complete(r) for r in runs)}/{len(runs)} runs complete; ledger {LEDGER}",
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
