"""Distillation loss: closed-form limits and agreement with torch's kl_div."""
import torch
import torch.nn.functional as F

from q0ds.distill import distill_loss


def _logits(seed, shape=(2, 5, 11)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 3


def test_alpha_zero_is_cross_entropy():
    s, t = _logits(0), _logits(1)
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(2))
    loss, parts = distill_loss(s, t, y, alpha=0.0, temperature=1.2)
    assert torch.allclose(loss, F.cross_entropy(s.flatten(0, 1), y.flatten()))


def test_identical_logits_give_zero_kl():
    s = _logits(0)
    y = torch.randint(0, 11, (2, 5))
    _, parts = distill_loss(s, s.clone(), y, alpha=0.45, temperature=1.2)
    assert parts["kl"].abs() < 1e-6


def test_matches_kl_div_and_teacher_gets_no_grad():
    s, t = _logits(0).requires_grad_(), _logits(1).requires_grad_()
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(3))
    y[0, 0] = -100                                           # an ignored position is excluded from both parts
    T, a = 1.2, 0.45
    loss, parts = distill_loss(s, t, y, alpha=a, temperature=T)
    keep = (y != -100).flatten()
    ref_kl = F.kl_div(F.log_softmax(s.flatten(0, 1)[keep] / T, -1), F.log_softmax(t.flatten(0, 1)[keep] / T, -1),
                      log_target=True, reduction="batchmean")
    ref = (1 - a) * F.cross_entropy(s.flatten(0, 1), y.flatten(), ignore_index=-100) + a * T * T * ref_kl
    assert torch.allclose(parts["kl"], ref_kl, atol=1e-6) and torch.allclose(loss, ref, atol=1e-6)
    loss.backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


# ---------------------------------------------------------------- issue 13: chunked loss == unchunked reference
import pytest  # noqa: E402

from q0ds.distill import mixture_distill_loss, mixture_logp, reference_loss  # noqa: E402


def _case(ignored: bool, V=37, shape=(3, 7)):
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(*shape, V, generator=g) * 3, torch.randn(*shape, V, generator=g) * 3
    y = torch.randint(0, V, shape, generator=g)
    if ignored:
        y[0, :3] = -100
        y[2, -1] = -100
    return s, t, y


def _rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("ignored", [False, True])
@pytest.mark.parametrize("alpha,T", [(0.0, 1.0), (0.45, 1.2), (1.0, 2.0)])
@pytest.mark.parametrize("chunk_elems", [37 * 4, 37 * 5, None])          # 4-row chunks, 5 (uneven), one chunk
def test_chunked_loss_and_grad_equal_the_unchunked_reference(ignored, alpha, T, chunk_elems):
    s, t, y = _case(ignored)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss, parts = distill_loss(s1, t, y, alpha, T, chunk_elems=chunk_elems)
    ref, rparts = reference_loss(s2, t, y, alpha, T)
    (loss * 1.7).backward()
    (ref * 1.7).backward()
    assert _rel(loss, ref) < 1e-5 and _rel(parts["ce"], rparts["ce"]) < 1e-5
    assert float((parts["kl"] - rparts["kl"]).abs()) < 1e-5 * max(1.0, float(rparts["kl"].abs()))
    assert _rel(s1.grad, s2.grad) < 1e-5
    if ignored:                                              # ignored positions get no gradient at all
        assert s1.grad[0, :3].abs().max() == 0 and s1.grad[2, -1].abs().max() == 0


@pytest.mark.parametrize("ignored", [False, True])
def test_chunked_mixture_equals_the_unchunked_mixture(ignored):
    s, _, y = _case(ignored)
    g = torch.Generator().manual_seed(5)
    members, w, T, a = [torch.randn(3, 7, 37, generator=g) * 2 for _ in range(3)], [0.2, 0.5, 0.3], 1.5, 0.7
    full = torch.logsumexp(torch.stack([F.log_softmax(z / T, -1) + torch.tensor(wi).log()
                                        for z, wi in zip(members, w)]), 0)
    assert _rel(mixture_logp(members, w, T, chunk_elems=37 * 4), full) < 1e-6
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss, _ = mixture_distill_loss(s1, iter(members), w, y, a, T, chunk_elems=37 * 4)
    ref, _ = reference_loss(s2, full, y, a, T, teacher_is_logp=True)
    loss.backward()
    ref.backward()
    assert _rel(loss, ref) < 1e-5 and _rel(s1.grad, s2.grad) < 1e-5


def test_chunked_loss_keeps_the_logits_dtype_and_runs_without_grad():
    s, t, y = _case(True)
    sb = s.bfloat16().requires_grad_()
    loss, _ = distill_loss(sb, t.bfloat16(), y, 0.5, 1.0, chunk_elems=37 * 4)
    loss.backward()
    assert sb.grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    ref, _ = reference_loss(sb.detach(), t.bfloat16(), y, 0.5, 1.0)
    assert _rel(loss.detach(), ref) < 1e-5
    with torch.no_grad():
        assert torch.equal(distill_loss(s, t, y, 0.5, 1.0)[0], distill_loss(s, t, y, 0.5, 1.0)[0])


# ---------------------------------------------------------------- truncated targets (ensemble.teacher_cache)
def _truncated_reference(s, target, y, alpha, T):
    """CE + the truncated KL through autograd (truncated_kl_rows), unchunked."""
    from q0ds.distill import normalised, truncated_kl_rows
    V = s.shape[-1]
    keep = (y != -100).flatten()
    kl = truncated_kl_rows(F.log_softmax(s / T, -1).reshape(-1, V), normalised(
        type(target)(target.top_logp.reshape(-1, target.top_ids.shape[-1]), target.top_ids.reshape(-1, target.top_ids.shape[-1]),
                     target.log_rest.reshape(-1))))[keep].mean()
    return (1 - alpha) * F.cross_entropy(s.reshape(-1, V), y.flatten(), ignore_index=-100) + alpha * T * T * kl


def test_top_n_equal_to_the_vocab_is_the_full_kl():
    from q0ds.distill import cached_distill_loss, truncate_logp
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(4))
    y[1, 2] = -100
    for T in (1.0, 1.7):
        t = truncate_logp(F.log_softmax(_logits(1) / T, -1), 11)
        assert (t.log_rest <= -1e29).all()                        # the bucket is empty
        s1, s2 = _logits(0).requires_grad_(), _logits(0).requires_grad_()
        full, fp = distill_loss(s1, _logits(1), y, 0.8, T)
        cut, cp = cached_distill_loss(s2, t, y, 0.8, T)
        full.backward()
        cut.backward()
        assert torch.allclose(cut, full, atol=1e-6) and torch.allclose(cp["kl"], fp["kl"], atol=1e-6)
        assert torch.allclose(s2.grad, s1.grad, atol=1e-7)


def test_top_one_and_its_bucket_by_hand():
    """q = (0.5, 0.3, 0.2) truncated to its top 1: (0.5 | rest 0.5). p = (0.2, 0.2, 0.6) collapses to (0.2 | 0.8).
    KL = 0.5 ln(0.5/0.2) + 0.5 ln(0.5/0.8); dKL/dz = p - q on the top id, p_v (1 - 0.5/0.8) elsewhere."""
    import math
    from q0ds.distill import cached_distill_loss, truncate_logp
    t = truncate_logp(torch.tensor([[[0.5, 0.3, 0.2]]]).log(), 1)
    assert t.top_ids.tolist() == [[[0]]] and math.isclose(t.log_rest.exp().item(), 0.5, rel_tol=1e-6)
    z = torch.tensor([[[0.2, 0.2, 0.6]]]).log().requires_grad_()
    loss, parts = cached_distill_loss(z, t, torch.tensor([[2]]), alpha=1.0, temperature=1.0)
    loss.backward()
    assert math.isclose(loss.item(), 0.5 * math.log(0.5 / 0.2) + 0.5 * math.log(0.5 / 0.8), rel_tol=1e-6)
    assert torch.allclose(z.grad, torch.tensor([[[0.2 - 0.5, 0.2 * 0.375, 0.6 * 0.375]]]), atol=1e-7)


def test_chunked_truncated_loss_matches_autograd_with_finite_gradients():
    from q0ds.distill import cached_distill_loss, truncate_logp
    y = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(5))
    y[0, 0] = -100
    for scale, n, T in ((1.0, 1, 1.0), (1.0, 4, 1.3), (40.0, 10, 1.0), (40.0, 3, 2.0)):   # x40: saturated softmaxes
        t = truncate_logp(F.log_softmax(_logits(1) * scale / T, -1), n)
        s1, s2 = (_logits(0) * scale).requires_grad_(), (_logits(0) * scale).requires_grad_()
        loss, _ = cached_distill_loss(s1, t, y, 0.7, T, chunk_elems=3 * 11)     # 3 rows a chunk: 4 chunks
        ref = _truncated_reference(s2, t, y, 0.7, T)
        loss.backward()
        ref.backward()
        assert torch.allclose(loss, ref, atol=1e-5, rtol=1e-5), (scale, n, T)
        assert torch.isfinite(s1.grad).all() and torch.allclose(s1.grad, s2.grad, atol=1e-6), (scale, n, T)


def test_a_half_precision_target_is_renormalised():
    from q0ds.distill import TopK, cached_distill_loss, normalised, truncate_logp
    t = truncate_logp(F.log_softmax(_logits(1), -1), 4)
    half = TopK(t.top_logp.half(), t.top_ids.int(), t.log_rest)
    n = normalised(half)
    total = n.top_logp.exp().sum(-1) + n.log_rest.exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-6)
    y = torch.zeros(2, 5, dtype=torch.long)
    _, parts = cached_distill_loss(_logits(1), half, y, 1.0, 1.0)      # the teacher itself as the student
    assert 0 <= parts["kl"] < 1e-5


def test_truncation_error_shrinks_to_zero_as_n_reaches_the_vocab():
    """Collapsing outcomes never raises a KL (data processing) and refining the partition never lowers it: the
    truncated KL grows with n to the exact one, and the top-n mass to 1."""
    from q0ds.distill import truncation_error
    z = torch.randn(64, 50, generator=torch.Generator().manual_seed(0)) * 2
    lq = F.log_softmax(torch.randn(64, 50, generator=torch.Generator().manual_seed(1)) * 2 / 1.5, -1)
    m = truncation_error(z, lq, [1, 5, 20, 49, 50], temperature=1.5)
    rows = [m["by_n"][n] for n in (1, 5, 20, 49, 50)]
    errs = [r["abs_error"] for r in rows]
    assert all(a >= b for a, b in zip(errs, errs[1:])) and errs[0] > 0.1 and errs[-1] < 1e-6
    assert all(r["truncated_kl"] <= m["exact_kl"] + 1e-6 for r in rows)
    assert [r["mass_mean"] for r in rows] == sorted(r["mass_mean"] for r in rows) and abs(rows[-1]["mass_min"] - 1) < 1e-6
    assert rows[0]["grad_cosine"] < rows[2]["grad_cosine"] and rows[-1]["grad_cosine"] > 1 - 1e-6
    assert m["rows"] == 64 and m["vocab"] == 50
