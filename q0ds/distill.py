"""Chain-distillation loss (pure): (1 - alpha) * CE + alpha * T^2 * KL(p_teacher_T || p_student_T).

Shapes: logits_BSV are [batch, seq, vocab]; labels_BS are [batch, seq] with -100 for ignored positions.
The KL is averaged over the labelled tokens, as the CE is. The teacher never receives a gradient.

The mixture form (ensemble distillation, ensemble_distill.py) replaces p_teacher_T by the probability mixture
p_mix = sum_i w_i softmax(z_i / T) of K members, accumulated member by member in log space, so memory holds
two [batch, seq, vocab] tensors whatever K is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits_BSV, labels_BS):
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), ignore_index=-100)


def token_kl(student_BSV, teacher_BSV, temperature: float):
    """Per-token KL(p_teacher_T || p_student_T), shape [batch, seq]."""
    return token_kl_logp(student_BSV, F.log_softmax(teacher_BSV.detach().float() / temperature, dim=-1), temperature)


def token_kl_logp(student_BSV, teacher_logp_BSV, temperature: float):
    """Per-token KL(p_t || p_student_T) for a teacher given as log-probabilities (already at temperature T)."""
    log_ps = F.log_softmax(student_BSV.float() / temperature, dim=-1)
    log_pt = teacher_logp_BSV.detach()
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def mixture_logp(member_logits, weights, temperature: float):
    """log sum_i w_i softmax(z_i / T) from an iterable of member logits [batch, seq, vocab] (a generator keeps
    one member's logits alive at a time). Weights are renormalised to sum to 1; zero weights drop out."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() < 1 or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError(f"mixture weights must be non-negative with a positive sum, got {w.tolist()}")
    log_w = (w / w.sum()).log().tolist()
    out, n = None, 0
    for n, z in enumerate(member_logits, 1):
        if n > len(log_w):
            raise ValueError(f"{len(log_w)} mixture weights for more members")
        lw = log_w[n - 1]
        if lw == float("-inf"):
            continue
        lp = F.log_softmax(z.detach().float() / temperature, dim=-1)
        if lw != 0.0:
            lp = lp + lw
        out = lp if out is None else torch.logaddexp(out, lp)
    if n != w.numel():
        raise ValueError(f"{w.numel()} mixture weights for {n} members")
    return out


def mixture_distill_loss(student_BSV, member_logits, weights, labels_BS, alpha: float, temperature: float):
    """(1 - alpha) * CE + alpha * T^2 * KL(p_mix || p_student_T), p_mix = sum_i w_i softmax(z_i / T).
    With one member of weight 1 this is distill_loss exactly. Returns (loss, {"ce", "kl"})."""
    if alpha == 0.0:
        return distill_loss(student_BSV, None, labels_BS, 0.0, temperature)
    ce = cross_entropy(student_BSV, labels_BS)
    kl_BS = token_kl_logp(student_BSV, mixture_logp(member_logits, weights, temperature), temperature)
    return _combine(ce, kl_BS, labels_BS, alpha, temperature)


def distill_loss(student_BSV, teacher_BSV, labels_BS, alpha: float, temperature: float):
    """Returns (loss, {"ce": float tensor, "kl": float tensor}); teacher_BSV None means plain CE."""
    ce = cross_entropy(student_BSV, labels_BS)
    if teacher_BSV is None or alpha == 0.0:
        return ce, {"ce": ce.detach(), "kl": torch.zeros(())}
    return _combine(ce, token_kl(student_BSV, teacher_BSV, temperature), labels_BS, alpha, temperature)


def _combine(ce, kl_BS, labels_BS, alpha: float, temperature: float):
    mask = (labels_BS != -100).float()
    kl = (kl_BS * mask).sum() / mask.sum().clamp_min(1.0)
    loss = (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
