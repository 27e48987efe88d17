"""benchmarks/de_honest_arms.py: the per-budget LR x WD grid grows beyond an edge until its optimum is bracketed
(or the extension bound is reached, and the report says on which edge it stayed). Synthetic fitness losses in a
real ledger; prepares the benchmark's data (~1 s), trains nothing."""
import math

import pytest

from benchmarks import data_efficiency as D, de_honest_arms as H, de_jobs
from benchmarks.de_ledger import Ledger
from q0ds.data import PreparedData


@pytest.fixture
def bench(tmp_path):
    args = D.parse_args(["--work", str(tmp_path / "work"), "--honest-arms"])
    data = D.prepare_data(args)
    old = de_jobs.LEDGER
    de_jobs.LEDGER = Ledger(tmp_path / "ledger.json", PreparedData.open(data).fingerprint)
    yield args, data
    de_jobs.LEDGER = old


def finish_grid(args, data, E, loss):
    """Record every grid run as finished with fitness loss loss(lr, wd), as the grid grows; -> the final grid."""
    for _ in range(10):
        runs = H.grid_runs(args, data, E)
        todo = [r for r in runs if not de_jobs.complete(r)]
        if not todo:
            return runs
        for r in todo:
            f = loss(r.info["recipe"]["lr"], r.info["recipe"]["wd"])
            de_jobs.LEDGER.put(r, "single_curve", {"curve": [{"epochs": 1.0, "fitness_loss": f, "val_loss": f}]})
    raise AssertionError("the grid never stopped growing")


def bowl(lr0, wd0):
    return lambda lr, wd: (math.log(lr / lr0)) ** 2 + 0.1 * (math.log(wd / wd0)) ** 2


def test_an_inside_optimum_adds_nothing(bench):
    args, data = bench
    runs = finish_grid(args, data, 8.0, bowl(1.5e-3, 0.1))
    assert len(runs) == len(H.LRS) * len(H.WDS)
    rec = H.choose(args, runs)
    assert (rec["lr"], rec["wd"], rec["bracketed"], rec["on_edge"]) == (1.5e-3, 0.1, True, [])


def test_an_optimum_beyond_the_top_lr_and_the_heaviest_wd_is_bracketed(bench):
    args, data = bench
    assert H.choose(args, H.grid_runs(args, data, 8.0)) is None          # nothing finished: no recipe yet
    runs = finish_grid(args, data, 8.0, bowl(6e-3, 9.0))
    lrs = sorted({r.info["recipe"]["lr"] for r in runs})
    wds = sorted({r.info["recipe"]["wd"] for r in runs})
    assert lrs == pytest.approx([7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2])     # 3e-3 on the edge -> 6e-3 -> 1.2e-2
    assert wds == pytest.approx([0.01, 0.1, 1.0, 3.0, 9.0, 27.0])
    rec = H.choose(args, runs)
    assert rec["lr"] == pytest.approx(6e-3) and rec["wd"] == pytest.approx(9.0) and rec["bracketed"]
    sfit = [r for r in H.build(args, data) if r.kind == "sfit" and r.info["budget"] == 8.0]
    assert len(sfit) == args.seeds and sfit[0].info["recipe"] == {"lr": rec["lr"], "wd": rec["wd"]}


def test_extension_is_bounded_and_an_edge_optimum_is_reported(bench):
    args, data = bench
    runs = finish_grid(args, data, 8.0, bowl(1e-6, 0.1))                  # far below every LR
    lrs = sorted({r.info["recipe"]["lr"] for r in runs})
    assert len(lrs) == len(H.LRS) + H.MAX_EXTENSIONS and lrs[0] == pytest.approx(7.5e-4 / 4)
    rec = H.choose(args, runs)
    assert rec["on_edge"] == ["lr"] and not rec["bracketed"]


def test_ensemble_members_take_the_recipe_tuned_at_their_own_length(bench):
    """pmem: once the 16-epoch grid is finished, members of 16 epochs (the M = 2 ensemble at 32, M = 4 at 64) with
    the 16-epoch recipe, not the ensemble budget's; the M = 2 members' bases run first."""
    args, data = bench
    assert not [r for r in H.build(args, data) if r.kind == "pmem"]      # no grid finished: no member recipe yet
    finish_grid(args, data, 16.0, bowl(7.5e-4, 1.0))
    finish_grid(args, data, 64.0, bowl(3e-3, 0.01))
    runs = H.build(args, data)
    pmem = [r for r in runs if r.kind == "pmem"]
    assert sorted(r.name for r in pmem) == [f"pmem-L16-s{s}" for s in range(args.seeds)]   # 64: no 128 budget
    r = pmem[0]
    assert r.info["recipe"] == {"lr": 7.5e-4, "wd": 1.0} and r.info["Ms"] == [2, 4] and r.cfg.bases == 4
    assert r.cfg.optim.lr == pytest.approx(7.5e-4) and r.cfg.seed == H.MEMBER_SEED
    pfit64 = [x for x in runs if x.kind == "pfit" and x.info["budget"] == 64.0 and x.info["M"] == 4]
    assert pfit64 and pfit64[0].info["recipe"] == {"lr": 3e-3, "wd": 0.01}   # pfit keeps the budget's recipe
    assert r.base_tiers[0] == r.base_tiers[1] < r.base_tiers[2] == r.base_tiers[3]
    assert min(r.base_tiers) > max(x.base_tiers[0] for x in runs if x.kind != "pmem")
    assert H.eval_keys(r) == ["ensemble_fitstop_M2", "ensemble_fitstop_M4"]
