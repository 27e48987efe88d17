"""q0ds.metrics: hand-computed cases of the epochs-to-match interpolation, spreads and baseline choice."""
import math

import pytest

from q0ds.metrics import best_of, epochs_to_match, match_ratio, spread, strongest_baseline


def test_interpolates_in_log_epochs():
    # target 3.5 halfway between 4.0 (at 8 epochs) and 3.0 (at 32): log-midpoint of 8 and 32 is 16
    m = epochs_to_match([(8, 4.0), (32, 3.0)], 3.5)
    assert m["reached"] and not m["lower_bound"]
    assert m["epochs"] == pytest.approx(16.0)
    # a quarter of the way: exp(log 8 + 0.25 * log 4) = 8 * 4**0.25 = 11.3137...
    assert epochs_to_match([(8, 4.0), (32, 3.0)], 3.75)["epochs"] == pytest.approx(8 * 4 ** 0.25)


def test_first_crossing_is_used_and_order_does_not_matter():
    curve = [(4, 5.0), (2, 6.0), (8, 4.0), (16, 4.5), (32, 3.9)]      # non-monotone after 8
    m = epochs_to_match(curve, 4.2)
    # crossing between (4, 5.0) and (8, 4.0): f = 0.8, e = exp(log 4 + 0.8 log 2) = 4 * 2**0.8
    assert m["epochs"] == pytest.approx(4 * 2 ** 0.8)


def test_exact_hit_and_lower_bound_and_not_reached():
    assert epochs_to_match([(1, 5.0), (2, 4.0)], 4.0)["epochs"] == pytest.approx(2.0)
    lb = epochs_to_match([(1, 3.0), (2, 2.0)], 4.0)
    assert lb == {"epochs": 1.0, "lower_bound": True, "reached": True}
    nr = epochs_to_match([(1, 5.0), (2, 4.5)], 4.0)
    assert nr == {"epochs": None, "lower_bound": False, "reached": False}


def test_match_ratio():
    r = match_ratio(32, [(8, 4.0), (32, 3.0)], 3.5)
    assert r["ratio"] == pytest.approx(2.0) and r["target"] == 3.5 and r["budget"] == 32
    assert match_ratio(8, [(16, 5.0)], 4.0)["ratio"] is None


def test_bad_curves():
    with pytest.raises(ValueError, match="empty"):
        epochs_to_match([], 1.0)
    with pytest.raises(ValueError, match="> 0"):
        epochs_to_match([(0, 2.0), (1, 1.0)], 1.5)


def test_spread():
    s = spread([1.0, 2.0, 3.0, None])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([4.0])["std"] == 0.0 and spread([None]) is None
    assert spread([1.0, 4.0])["std"] == pytest.approx(math.sqrt(4.5))


def test_best_of_and_strongest():
    assert best_of({2: 4.1, 4: 3.9, 8: None}) == (4, 3.9)
    assert best_of({}) == (None, None)
    s = strongest_baseline({"8": 4.0, "16": 3.5, "32": 3.4}, {"8": 4.2, "16": 3.3})
    assert s == {"8": {"loss": 4.0, "which": "single"}, "16": {"loss": 3.3, "which": "ensemble"}}
