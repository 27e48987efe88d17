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
