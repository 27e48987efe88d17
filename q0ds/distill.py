"""Chain-distillation loss (pure): (1 - alpha) * CE + alpha * T^2 * KL(p_teacher_T || p_student_T).

Shapes: logits_BSV are [batch, seq, vocab]; labels_BS are [batch, seq] with -100 for ignored positions.
The KL is averaged over the labelled tokens, as the CE is. The teacher never receives a gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits_BSV, labels_BS):
    return F.cross_entropy(logits_BSV.flatten(0, 1).float(), labels_BS.flatten(), ignore_index=-100)


def token_kl(student_BSV, teacher_BSV, temperature: float):
    """Per-token KL(p_teacher_T || p_student_T), shape [batch, seq]."""
    log_ps = F.log_softmax(student_BSV.float() / temperature, dim=-1)
    log_pt = F.log_softmax(teacher_BSV.detach().float() / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum(-1)


def distill_loss(student_BSV, teacher_BSV, labels_BS, alpha: float, temperature: float):
    """Returns (loss, {"ce": float tensor, "kl": float tensor}); teacher_BSV None means plain CE."""
    ce = cross_entropy(student_BSV, labels_BS)
    if teacher_BSV is None or alpha == 0.0:
        return ce, {"ce": ce.detach(), "kl": torch.zeros(())}
    mask = (labels_BS != -100).float()
    kl = (token_kl(student_BSV, teacher_BSV, temperature) * mask).sum() / mask.sum().clamp_min(1.0)
    loss = (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
