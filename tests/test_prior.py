"""Tests for q0ds.prior: the learned prior fit (analytic gradient, guarantees), mixture NLL, top-K, I/O."""
import json
import math
import os

import pytest
import torch

from q0ds.prior import (PriorFit, default_ks, fit_prior, mixture_logprob, mixture_nll, nll_and_grad,
                        read_prior_json, top_k, topk_table, write_prior_json)


def synthetic_P(M=12, N=3000, best=(), seed=0, noise=0.5, boost=0.4):
    """Correlated members: shared token difficulty x_t, member offsets, member noise; `best` get +boost."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, generator=g) * 2.0 - 1.0
    d = torch.randn(M, generator=g) * 0.05
    for i in best:
        d[i] += boost
    return torch.sigmoid(x[None] + d[:, None] + noise * torch.randn(M, N, generator=g))


def one_hot(M, i):
    w = torch.zeros(M, dtype=torch.float64)
    w[i] = 1.0
    return w


def test_weights_sum_to_one_and_shapes():
    fit = fit_prior(synthetic_P(), steps=50)
    assert isinstance(fit, PriorFit)
    assert len(fit.weights) == len(fit.logits) == 12
    assert math.isclose(sum(fit.weights), 1.0, abs_tol=1e-9)
    assert torch.allclose(torch.softmax(torch.tensor(fit.logits, dtype=torch.float64), 0),
                          torch.tensor(fit.weights, dtype=torch.float64), atol=1e-12)
    assert len(fit.history) == 51 and fit.steps == 50


def test_clearly_best_member_gets_most_weight():
    fit = fit_prior(synthetic_P(best=(7,), boost=1.0, noise=1.5), steps=300)
    assert fit.chosen == "fitted"
    assert fit.weights[7] > 0.5
    assert max(range(12), key=lambda i: fit.weights[i]) == 7
    assert fit.loss < fit.baselines["best_single"] < fit.baselines["uniform"]
    assert fit.baselines["best_single_index"] == 7


def test_fit_improves_and_keeps_best_iterate():
    fit = fit_prior(synthetic_P(best=(1, 2)), steps=100)
    assert fit.history[-1] < fit.history[0]
    assert fit.loss <= min(fit.history) + 1e-5          # exact value of the kept iterate
    assert fit.history[fit.best_step] == min(fit.history)


@pytest.mark.parametrize("case", ["random", "identical", "one_member", "dominant", "adversarial", "tiny_probs"])
def test_never_worse_than_best_single_or_uniform(case):
    g = torch.Generator().manual_seed(3)
    if case == "random":
        P = torch.rand(9, 500, generator=g)
    elif case == "identical":
        P = synthetic_P(M=1, N=800).repeat(6, 1)
    elif case == "one_member":
        P = synthetic_P(M=1, N=800)
    elif case == "dominant":                 # member 0 better on every token: the optimum is one-hot
        P = torch.rand(5, 400, generator=g) * 0.5
        P[0] = 0.9
    elif case == "adversarial":              # a huge lr makes Adam overshoot; the guarantee must hold
        P = synthetic_P(M=7, N=600, best=(3,))
    else:                                    # probabilities down to the float32 floor
        P = torch.exp(-torch.rand(6, 700, generator=g) * 90)
    lr = 50.0 if case == "adversarial" else 0.5
    fit = fit_prior(P, steps=40, lr=lr, init_std=2.0 if case == "adversarial" else 0.0)
    M = P.shape[0]
    best_single = min(mixture_nll(P, one_hot(M, i)) for i in range(M))
    uniform = mixture_nll(P, torch.full((M,), 1.0 / M, dtype=torch.float64))
    got = mixture_nll(P, fit.weights)
    assert got <= best_single + 1e-12 and got <= uniform + 1e-12
    assert math.isclose(got, fit.loss, rel_tol=0, abs_tol=1e-12)
    assert fit.chosen in ("fitted", "best_single", "uniform")
    assert math.isfinite(fit.loss)


def test_analytic_gradient_matches_autograd():
    P = synthetic_P(M=6, N=200, seed=5).double()
    logits = torch.tensor([0.3, -1.0, 0.5, 2.0, -0.2, 0.0], dtype=torch.float64)
    loss, grad = nll_and_grad(P, logits)
    a = logits.clone().requires_grad_(True)
    ref = -torch.log(torch.softmax(a, 0) @ P).mean()   # autograd through the plain formula
    ref.backward()
    assert math.isclose(loss, ref.item(), rel_tol=1e-5)
    assert torch.allclose(grad, a.grad, rtol=1e-4, atol=1e-7)


def test_mixture_nll_and_logprob_agree():
    P = synthetic_P(M=5, N=300)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.0], dtype=torch.float64)
    lp = mixture_logprob(P.log(), w)
    assert lp.shape == (300,)
    direct = -torch.log(w @ P.double()).mean()
    assert math.isclose(-float(lp.mean()), float(direct), rel_tol=1e-6)
    assert math.isclose(mixture_nll(P, w), float(direct), rel_tol=1e-6)
    with pytest.raises(ValueError, match="4 weights for 5 members"):
        mixture_nll(P, w[:4])


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="members, tokens"):
        fit_prior(torch.rand(10))
    with pytest.raises(ValueError, match="finite"):
        fit_prior(torch.tensor([[0.5, float("nan")]]))


def test_top_k_renormalises_and_breaks_ties_by_index():
    w = [0.1, 0.3, 0.3, 0.2, 0.1]
    idx, rw = top_k(w, 3)
    assert idx == [1, 2, 3]
    assert torch.allclose(rw, torch.tensor([0.375, 0.375, 0.25], dtype=torch.float64))
    idx, rw = top_k(w, 5)
    assert idx == [1, 2, 3, 0, 4] and math.isclose(float(rw.sum()), 1.0)
    assert top_k(torch.tensor(w), 1) == ([1], torch.tensor([1.0], dtype=torch.float64))


def test_top_k_errors():
    with pytest.raises(ValueError, match=r"--k 8 is larger than the population \(5 members\)"):
        top_k([0.2] * 5, 8)
    with pytest.raises(ValueError, match="at least 1"):
        top_k([0.2] * 5, 0)


def test_default_ks_and_table():
    assert default_ks(1) == [1]
    assert default_ks(5) == [1, 2, 4, 5]
    assert default_ks(8) == [1, 2, 4, 8]
    assert default_ks(480) == [1, 2, 4, 8, 16, 32, 64, 128, 256, 480]
    with pytest.raises(ValueError):
        default_ks(0)
    t = topk_table([0.5, 0.2, 0.3], [1, 2, 3])
    assert list(t) == ["1", "2", "3"]
    assert t["2"]["members"] == [0, 2] and t["2"]["weights"] == pytest.approx([0.625, 0.375])


def test_prior_json_roundtrip(tmp_path):
    fit = fit_prior(synthetic_P(M=5, N=400, best=(2,)), steps=30)
    ids = [f"base-00/cycle-{c:04d}" for c in range(5)]
    path = tmp_path / "prior.json"
    write_prior_json(path, ids, fit, ks=[1, 2, 5], extra={"fitness_tokens": 400})
    assert os.listdir(tmp_path) == ["prior.json"]          # no temp file left behind
    doc = read_prior_json(path)
    assert doc["members"] == ids and doc["weights"] == fit.weights and doc["steps"] == 30
    assert doc["fit_loss"] == fit.loss and doc["chosen"] == fit.chosen
    assert set(doc["baselines"]) >= {"best_single", "uniform"}
    assert doc["topk"]["1"]["members"] == [ids[2]] and doc["topk"]["1"]["weights"] == [1.0]
    assert list(doc["topk"]) == ["1", "2", "5"] and doc["fitness_tokens"] == 400
    json.loads(path.read_text())                            # strict JSON (no NaN/Infinity)
    with pytest.raises(ValueError, match="overwrite"):
        write_prior_json(path, ids, fit, extra={"weights": 1})
    with pytest.raises(ValueError, match="member ids"):
        write_prior_json(path, ids[:3], fit)
    (tmp_path / "bad.json").write_text('{"members": []}')
    with pytest.raises(ValueError, match="missing field"):
        read_prior_json(tmp_path / "bad.json")


def test_one_hot_choice_is_valid_json(tmp_path):
    P = torch.full((3, 50), 0.1)
    P[1] = 0.9                                               # member 1 strictly best everywhere
    fit = fit_prior(P, steps=0)                              # no steps: uniform logits vs best single
    assert fit.chosen == "best_single" and fit.weights == [0.0, 1.0, 0.0]
    write_prior_json(tmp_path / "p.json", ["a", "b", "c"], fit)
    doc = json.loads((tmp_path / "p.json").read_text())
    assert doc["topk"]["1"]["members"] == ["b"]
    assert torch.allclose(torch.softmax(torch.tensor(doc["logits"], dtype=torch.float64), 0),
                          torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_multi_block_threaded_fit_matches_autograd_reference():
    """N spans several 4096-token blocks, so the fit runs its threaded path; compare with plain autograd."""
    P = synthetic_P(M=6, N=10_000, best=(2,), noise=1.0)
    fit = fit_prior(P, steps=60)
    a = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.AdamW([a], lr=0.5, weight_decay=0.0)
    Pd, best = P.double(), math.inf
    for _ in range(61):
        loss = -torch.log(torch.softmax(a, 0) @ Pd).mean()
        best = min(best, loss.item())
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([a], 1.0)
        opt.step()
    assert fit.loss == pytest.approx(best, abs=1e-6)
    assert fit.history[0] == pytest.approx(mixture_nll(P, torch.full((6,), 1 / 6)), abs=1e-6)
