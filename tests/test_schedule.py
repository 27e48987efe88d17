"""Schedule math against hand-computed values (method.md formulas)."""
import math

import pytest

from q0ds.config import ScheduleConfig
from q0ds.schedule import (batch_for_cycle, cosine_lr_mult, cycle_plan, lr_mult, multipliers, perturb_scale,
                           wd_mult)


def test_sawtooth_hand_values():
    # L = 4, floor 0.08: 1.0, 0.77, 0.54, 0.31, and the floor 0.08 at the cycle boundary s = L
    assert [round(lr_mult(s, 4), 10) for s in range(5)] == [1.0, 0.77, 0.54, 0.31, 0.08]
    # WD: 0.7 at the LR peak, 1.0 at the LR floor, linear in between (anti-phase)
    assert wd_mult(0, 4) == pytest.approx(0.7)
    assert wd_mult(4, 4) == pytest.approx(1.0)
    assert wd_mult(2, 4) == pytest.approx(0.85)
    for s in range(5):
        assert wd_mult(s, 4) == pytest.approx(0.7 + 0.3 * (1 - lr_mult(s, 4)) / 0.92)


def test_restart_and_cycle_plan():
    plan = cycle_plan(3, 1.0, 0, windows_per_epoch=40, peak_batch=8)
    assert [c.steps for c in plan.cycles] == [5, 5, 5] and plan.total_steps == 15
    sched = ScheduleConfig()
    lrs = [multipliers(s, plan, sched)[0] for s in range(15)]
    assert lrs[0] == lrs[5] == lrs[10] == 1.0                      # hard restart every cycle
    assert lrs[4] == pytest.approx(0.08 + 0.92 / 5)                # last step before the boundary
    assert all(a > b for a, b in zip(lrs[:4], lrs[1:5]))           # monotone within a cycle
    wds = [multipliers(s, plan, sched)[1] for s in range(15)]
    assert wds[0] == pytest.approx(0.7) and max(wds) == wds[4]     # WD peaks where LR bottoms
    assert plan.epoch_at(15) == pytest.approx(3.0) and plan.sample_at(7) == 56


def test_flat_wd_ablation_and_cosine_baseline():
    plan = cycle_plan(2, 1.0, 0, 40, 8)
    flat = ScheduleConfig(wd_coupling=False)
    assert {multipliers(s, plan, flat)[1] for s in range(10)} == {1.0}
    cos = ScheduleConfig(shape="cosine", warmup_steps=2, min_lr_ratio=0.1)
    lrs = [multipliers(s, plan, cos)[0] for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] == pytest.approx(0.1)
    assert cosine_lr_mult(2, 10, 2, 0.1) == 1.0


def test_perturb_scale_cosine_and_batch_schedule():
    assert perturb_scale(0, 5) == pytest.approx(0.25) and perturb_scale(4, 5) == pytest.approx(0.05)
    assert perturb_scale(2, 5) == pytest.approx(0.15)
    # block-triangular: middle half of 8 cycles (2..5) at the peak
    assert [batch_for_cycle(c, 8, 32, 24) for c in range(8)] == [24, 24, 32, 32, 32, 32, 24, 24]
    assert batch_for_cycle(0, 8, 32, 0) == 32
    plan = cycle_plan(8, 1.0, 0, 96, 32, 24)
    assert [c.steps for c in plan.cycles] == [4, 4, 3, 3, 3, 3, 4, 4]
    assert plan.cycles[3].start_sample == 4 * 24 * 2 + 3 * 32


def test_list_of_cycle_lengths():
    plan = cycle_plan(3, [2.0, 1.0, 0.5], 0, 40, 8)
    assert [c.steps for c in plan.cycles] == [10, 5, 2]
    assert plan.epoch_at(plan.total_steps) == pytest.approx(17 * 8 / 40)
