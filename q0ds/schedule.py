"""Pure schedule math: cycles, LR/WD multipliers, perturbation scale, batch-size schedule.

Formulas are exactly those of method.md (q0 reference code):
  lr_mult(s) = floor + (1 - floor) * (1 - s / L)                    step s = 0..L-1 of a cycle of L steps
  wd_mult(s) = wd_floor + (1 - wd_floor) * (1 - lr_mult(s)) / (1 - floor)
so the LR falls linearly from 1.0 towards `floor` (reached at s = L, the cycle boundary, where the
snapshot is taken) and restarts at 1.0, while WD rises from wd_floor to 1.0 in anti-phase.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


def lr_mult(s: int, L: int, floor: float = 0.08) -> float:
    """Sawtooth LR multiplier at step s (0 <= s <= L) of a cycle of L steps."""
    return floor + (1.0 - floor) * (1.0 - s / L)


def wd_mult(s: int, L: int, floor: float = 0.08, wd_floor: float = 0.7) -> float:
    """WD multiplier anti-correlated with lr_mult: wd_floor at the LR peak, 1.0 at the LR floor."""
    if floor >= 1.0:
        return 1.0
    return wd_floor + (1.0 - wd_floor) * (1.0 - lr_mult(s, L, floor)) / (1.0 - floor)


def cosine_lr_mult(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Baseline schedule: linear warmup, then cosine from 1.0 to min_ratio at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


def perturb_scale(cycle: int, n_cycles: int, start: float = 0.25, end: float = 0.05) -> float:
    """Noise scale (x std(param)) applied after cycle `cycle`: cosine from start (cycle 0) to end (last cycle)."""
    if n_cycles <= 1:
        return start
    t = cycle / (n_cycles - 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * t))


def batch_for_cycle(cycle: int, n_cycles: int, peak: int, small: int) -> int:
    """Block-triangular batch schedule: the middle ~50% of cycles use the peak batch, early and late ones
    the small batch (constant within a cycle). small == 0 disables it."""
    if not small:
        return peak
    return peak if 0.25 * n_cycles <= cycle < 0.75 * n_cycles else small


@dataclass(frozen=True)
class Cycle:
    index: int
    steps: int            # optimizer steps in this cycle
    batch: int            # sequences per optimizer step
    start_step: int       # global optimizer step where the cycle starts
    start_sample: int     # position in the base's sample stream where the cycle starts

    @property
    def end_step(self):
        return self.start_step + self.steps


@dataclass(frozen=True)
class CyclePlan:
    cycles: tuple
    windows_per_epoch: int

    @property
    def total_steps(self) -> int:
        return self.cycles[-1].end_step

    def cycle_at(self, step: int) -> Cycle:
        for c in self.cycles:
            if step < c.end_step:
                return c
        raise IndexError(f"step {step} is past the end of the plan ({self.total_steps} steps)")

    def sample_at(self, step: int) -> int:
        """Stream position at the start of optimizer step `step`."""
        c = self.cycle_at(step) if step < self.total_steps else self.cycles[-1]
        return c.start_sample + (step - c.start_step) * c.batch

    def epoch_at(self, step: int) -> float:
        return self.sample_at(step) / self.windows_per_epoch

    def to_dict(self):
        return {"windows_per_epoch": self.windows_per_epoch,
                "cycles": [c.__dict__ for c in self.cycles]}


def cycle_plan(n_cycles: int, cycle_epochs, cycle_steps: int, windows_per_epoch: int,
               peak_batch: int, small_batch: int = 0) -> CyclePlan:
    """Lay out the cycles of one base. A cycle of e epochs at batch b has round(e * W / b) steps (>= 1)."""
    lengths = cycle_epochs if isinstance(cycle_epochs, (list, tuple)) else [cycle_epochs] * n_cycles
    cycles, step, sample = [], 0, 0
    for i in range(n_cycles):
        b = batch_for_cycle(i, n_cycles, peak_batch, small_batch)
        n = cycle_steps if cycle_steps else max(1, round(lengths[i] * windows_per_epoch / b))
        cycles.append(Cycle(i, n, b, step, sample))
        step, sample = step + n, sample + n * b
    return CyclePlan(tuple(cycles), windows_per_epoch)


def run_plan(cfg, windows_per_epoch: int) -> CyclePlan:
    """The cycle plan of one base of a RunConfig, given the data's windows per epoch."""
    s, t = cfg.schedule, cfg.train
    return cycle_plan(s.cycles, s.cycle_epochs, s.cycle_steps, windows_per_epoch, t.global_batch, t.small_batch)


def multipliers(step: int, plan: CyclePlan, sched) -> tuple[float, float]:
    """(lr_mult, wd_mult) for optimizer step `step` under a ScheduleConfig-like `sched`."""
    if sched.shape == "cosine":
        lr = cosine_lr_mult(step, plan.total_steps, sched.warmup_steps, sched.min_lr_ratio)
        return lr, 1.0
    c = plan.cycle_at(step)
    s = step - c.start_step
    lr = lr_mult(s, c.steps, sched.lr_floor)
    wd = wd_mult(s, c.steps, sched.lr_floor, sched.wd_floor) if sched.wd_coupling else 1.0
    if sched.warmup_steps and step < sched.warmup_steps:
        lr *= (step + 1) / sched.warmup_steps
    return lr, wd
