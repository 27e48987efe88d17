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
