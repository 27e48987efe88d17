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


def test_report_headline_picks_k_on_fitness_and_the_strongest_baseline():
    """The headline K comes from the fitness set even when validation prefers another K; q0 is compared with
    the stronger baseline, and epochs-to-match is interpolated on the per-cycle curve."""
    from q0ds.report import headline
    ev = {"topk": [{"k": 1, "weighted": 3.0, "fitness_weighted": 3.4},
                   {"k": 2, "weighted": 2.9, "fitness_weighted": 3.1},     # best on fitness
                   {"k": 4, "weighted": 2.8, "fitness_weighted": 3.2}],    # best on validation: not chosen
          "k_on_fitness": 2, "best_single": {"val_loss": 3.0}, "epochs_spent": 4.0,
          "curve": [{"epochs": 1.0, "val_loss": 3.5}, {"epochs": 4.0, "val_loss": 2.5}],
          "baselines": {"single": {"best_val_loss": 3.0, "saturation_epoch": 3.0, "epochs": 4.0},
                        "ensemble": {"final_val_loss": 3.2, "epochs": 4.0}}}
    h = headline(ev)
    assert h["q0_topk"] == {"k": 2, "val_loss": 2.9, "chosen_on": "fitness set"}
    assert h["strongest_baseline"] == {"name": "single", "val_loss": 3.0} and h["q0_beats_strongest"]
    # 3.0 is halfway from 3.5 (1 epoch) to 2.5 (4 epochs) in loss: exp(0.5 log 4) = 2 epochs -> 4 / 2 = 2x
    assert h["epochs_to_match_strongest"]["q0_epochs"] == pytest.approx(2.0)
    assert h["epochs_to_match_single"]["ratio"] == pytest.approx(2.0)
