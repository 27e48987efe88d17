"""Pure metrics of the data-efficiency comparison (method.md, "Baselines the method is judged against").

    spread(xs)                          mean, sample std, min, max, n of a list of numbers
    epochs_to_match(curve, target)      the q0 budget at which its loss curve first reaches `target`,
                                        interpolated linearly in log-epochs between the two points around it
    match_ratio(B, curve, target)       B / epochs_to_match, with flags (lower bound, not reached)
    best_of(losses)                     the key with the lowest loss (e.g. the best ensemble size M)
    strongest_baseline(single, ens)     per budget, the better of the two baselines and which one it is

No I/O and no torch: benchmarks/data_efficiency.py, q0ds/report.py and the tests share these.
"""
from __future__ import annotations

import math
import statistics


def spread(xs) -> dict | None:
    """{mean, std (sample, 0 for one value), min, max, n} of the non-None values; None if there are none."""
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "n": len(xs)}


def epochs_to_match(curve, target: float) -> dict:
    """First budget at which the curve [(epochs, loss), ...] reaches loss <= target.

    Between the last point above the target (e1, l1) and the first at or below it (e2, l2) the crossing is
    interpolated linearly in log-epochs: log e = log e1 + (l1 - target) / (l1 - l2) * (log e2 - log e1).
    Returns {"epochs": e, "lower_bound": bool, "reached": bool}: lower_bound when the first point already
    reaches the target (q0 matches at or before it: the true figure is <= e, so B / e is a lower bound);
    reached False (epochs None) when no point does.
    """
    pts = sorted((float(e), float(v)) for e, v in curve)
    if not pts:
        raise ValueError("epochs_to_match: empty curve")
    if any(e <= 0 for e, _ in pts):
        raise ValueError("epochs_to_match: epochs must be > 0 (interpolation is in log-epochs)")
    if pts[0][1] <= target:
        return {"epochs": pts[0][0], "lower_bound": True, "reached": True}
    for (e1, l1), (e2, l2) in zip(pts, pts[1:]):
        if l2 <= target:
            f = (l1 - target) / (l1 - l2)
            return {"epochs": math.exp(math.log(e1) + f * (math.log(e2) - math.log(e1))),
                    "lower_bound": False, "reached": True}
    return {"epochs": None, "lower_bound": False, "reached": False}


def match_ratio(budget: float, curve, target: float) -> dict:
    """Data-efficiency figure: budget / (q0 epochs to reach the baseline's loss `target` at `budget`).
    ratio None when q0 never reaches it within the curve; '>=' semantics when lower_bound."""
    m = epochs_to_match(curve, target)
    m["target"] = float(target)
    m["budget"] = float(budget)
    m["ratio"] = budget / m["epochs"] if m["reached"] else None
    return m


def best_of(losses: dict):
    """(key, loss) with the lowest loss among non-None values; (None, None) if empty."""
    items = [(k, v) for k, v in losses.items() if v is not None]
    if not items:
        return None, None
    return min(items, key=lambda kv: (kv[1], str(kv[0])))


def strongest_baseline(single: dict, ensemble: dict) -> dict:
    """Per budget present in both: {"loss": the lower, "which": "single" | "ensemble"} (ties -> single)."""
    out = {}
    for b in single:
        if b in ensemble and single[b] is not None and ensemble[b] is not None:
            s, e = single[b], ensemble[b]
            out[b] = {"loss": e, "which": "ensemble"} if e < s else {"loss": s, "which": "single"}
    return out
