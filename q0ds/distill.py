"""Chain-distillation loss (pure): (1 - alpha) * CE + alpha * T^2 * KL(p_teacher_T || p_student_T).

Shapes: logits_BSV are [batch, seq, vocab]; labels_BS are [batch, seq] with -100 for ignored positions.
The KL is averaged over the labelled tokens, as the CE is. The teacher never receives a gradient.

Chunked (issue 13): `distill_loss` and `mixture_distill_loss` walk the tokens in chunks of about
CHUNK_ELEMS / vocab rows, so at most one chunk of fp32 full-vocabulary intermediates (log-softmaxes, exp,
differences) is alive instead of about six [batch, seq, vocab] fp32 tensors. The gradient w.r.t. the student
logits is computed in the same pass (softmax - onehot for CE, p_s - p_t for KL: no second softmax in backward)
and stored in the logits' dtype; backward only scales it (_ChunkedCEKL). Values and gradients equal the
unchunked reference (`reference_loss`, kept for tests) within float rounding (tests/test_distill.py).
The teacher's logits are not kept for backward, so the caller's reference is the only one.

The mixture form (ensemble distillation, ensemble_distill.py) replaces p_teacher_T by the probability mixture
p_mix = sum_i w_i softmax(z_i / T) of K members, accumulated member by member and chunk by chunk in log space:
one fp32 [batch, seq, vocab] buffer (log p_mix) plus one chunk of temporaries, whatever K is.

liger-kernel (fused linear CE/JSD on CUDA) is not used: its fused forms take the hidden states and the
lm_head weight, which under ZeRO-3 is a partitioned parameter gathered inside the model's forward; using it
means changing the model call, which cannot be checked without a GPU here. The chunked path runs everywhere.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

CHUNK_ELEMS = 1 << 24          # fp32 elements per chunk temporary (64 MB): 333 tokens at vocab 50304


def chunk_rows(vocab: int, chunk_elems: int | None = None) -> int:
    return max(1, int(chunk_elems or CHUNK_ELEMS) // max(1, vocab))


def _full_kl_chunk(zc, teacher_NV, s, e, T, teacher_is_logp, need_grad):
    """(KL(p_t || p_s) per row, T * dKL/dz = p_s - p_t or None) of rows s:e; the teacher is full-vocabulary."""
    tc = teacher_NV[s:e].detach().float()
    lt = tc if teacher_is_logp else F.log_softmax(tc / T, dim=-1)
    ls = F.log_softmax(zc / T, dim=-1)
    pt = lt.exp()
    kl_rows = (pt * (lt - ls)).sum(-1)
    return kl_rows, (ls.exp_() - pt) if need_grad else None


def kl_chunk(zc, teacher, s, e, T, teacher_is_logp, need_grad):
    """The KL term of rows s:e: a full-vocabulary teacher tensor, or a TopK target (the teacher cache)."""
    if isinstance(teacher, TopK):
        return _topk_kl_chunk(zc, teacher, s, e, T, need_grad)
    return _full_kl_chunk(zc, teacher, s, e, T, teacher_is_logp, need_grad)


class _ChunkedCEKL(torch.autograd.Function):
    """loss = (1 - alpha) * CE + alpha * T^2 * KL over [N, V] rows, chunk by chunk; grad computed in forward."""

    @staticmethod
    def forward(ctx, z_NV, teacher_NV, labels_N, alpha, T, teacher_is_logp, rows, want_grad):
        need_grad = ctx.needs_input_grad[0] and want_grad     # False under torch.no_grad (eval): no gradient work
        mask = labels_N != -100
        n = mask.sum().to(torch.float32)             # CE: mean over labelled tokens (nan if none, as F.cross_entropy)
        nk = n.clamp_min(1.0)                        # KL: same mean, clamped (as before)
        safe = labels_N.masked_fill(~mask, 0)
        ce_sum = torch.zeros((), dtype=torch.float32, device=z_NV.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=z_NV.device)
        grad = torch.empty_like(z_NV) if need_grad else None
        use_kl = teacher_NV is not None and alpha != 0.0
        alpha = alpha if use_kl else 0.0             # no teacher: plain CE at weight 1
        for s in range(0, z_NV.shape[0], rows):
            e = min(s + rows, z_NV.shape[0])
            zc, mc, yc = z_NV[s:e].float(), mask[s:e], safe[s:e, None]
            mf = mc.to(torch.float32)[:, None]
            ce_sum += ((torch.logsumexp(zc, -1) - zc.gather(1, yc).squeeze(1)) * mf[:, 0]).sum()
            if need_grad:
                g = torch.softmax(zc, -1)
                g.scatter_add_(1, yc, torch.full_like(yc, -1, dtype=g.dtype))
                g.mul_(mf * ((1.0 - alpha) / n))
            if use_kl:
                kl_rows, dkl = kl_chunk(zc, teacher_NV, s, e, T, teacher_is_logp, need_grad)
                kl_sum += (kl_rows * mf[:, 0]).sum()
                if need_grad:
                    g.add_(dkl.mul_(mf * (alpha * T / nk)))
                del kl_rows, dkl
            if need_grad:
                grad[s:e] = g.to(grad.dtype)
                del g
        ce = ce_sum / n
        kl = kl_sum / nk
        loss = (1.0 - alpha) * ce + alpha * T ** 2 * kl      # alpha 0 (no teacher): exactly ce
        ctx.grad = grad          # not save_for_backward: backward scales it in place, so no second full copy
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_loss, _g_ce, _g_kl):
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("the chunked distillation loss was backpropagated twice (retain_graph); "
                               "call backward once per forward")
        grad.mul_(g_loss.to(grad.dtype))     # always: testing g_loss == 1 first would be a host sync per micro-step
        return grad, None, None, None, None, None, None, None


def _chunked(student_BSV, teacher_BSV, labels_BS, alpha, temperature, teacher_is_logp, chunk_elems):
    V = student_BSV.shape[-1]
    t = None if teacher_BSV is None else teacher_BSV.detach().reshape(-1, V)
    loss, ce, kl = _ChunkedCEKL.apply(student_BSV.reshape(-1, V), t, labels_BS.reshape(-1),
                                      float(alpha), float(temperature), teacher_is_logp, chunk_rows(V, chunk_elems),
                                      torch.is_grad_enabled())
    return loss, {"ce": ce.detach(), "kl": kl.detach() if t is not None and alpha != 0.0 else torch.zeros(())}


def distill_loss(student_BSV, teacher_BSV, labels_BS, alpha: float, temperature: float, chunk_elems: int | None = None):
    """Returns (loss, {"ce": float tensor, "kl": float tensor}); teacher_BSV None or alpha 0 means plain CE."""
    if teacher_BSV is None or alpha == 0.0:
        return _chunked(student_BSV, None, labels_BS, 0.0, temperature, False, chunk_elems)
    return _chunked(student_BSV, teacher_BSV, labels_BS, alpha, temperature, False, chunk_elems)


def mixture_logp(member_logits, weights, temperature: float, chunk_elems: int | None = None):
    """log sum_i w_i softmax(z_i / T) from an iterable of member logits [batch, seq, vocab] (a generator keeps
    one member's logits alive at a time). Weights are renormalised to sum to 1; zero weights drop out.
    Accumulates into one fp32 buffer, chunk by chunk (no full-size temporaries)."""
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
        z = z.detach()
        if out is None:
            out = torch.empty(z.shape, dtype=torch.float32, device=z.device)
            fresh = True
        else:
            fresh = False
        flat_z, flat_o = z.reshape(-1, z.shape[-1]), out.view(-1, z.shape[-1])
        rows = chunk_rows(z.shape[-1], chunk_elems)
        for s in range(0, flat_z.shape[0], rows):
            lp = F.log_softmax(flat_z[s:s + rows].float() / temperature, dim=-1)
            if lw != 0.0:
                lp.add_(lw)
            if fresh:
                flat_o[s:s + rows] = lp
            else:
                flat_o[s:s + rows] = torch.logaddexp(flat_o[s:s + rows], lp)
    if n != w.numel():
        raise ValueError(f"{w.numel()} mixture weights for {n} members")
    return out


def mixture_distill_loss(student_BSV, member_logits, weights, labels_BS, alpha: float, temperature: float,
                         chunk_elems: int | None = None):
    """(1 - alpha) * CE + alpha * T^2 * KL(p_mix || p_student_T), p_mix = sum_i w_i softmax(z_i / T).
    With one member of weight 1 this is distill_loss exactly. Returns (loss, {"ce", "kl"})."""
    if alpha == 0.0:
        return distill_loss(student_BSV, None, labels_BS, 0.0, temperature, chunk_elems)
    logp = mixture_logp(member_logits, weights, temperature, chunk_elems)
    return _chunked(student_BSV, logp, labels_BS, alpha, temperature, True, chunk_elems)


# ------------------------------------------------------------------ truncated targets (the teacher cache)
# A teacher distribution q over V tokens truncated to its top n tokens plus one "everything else" bucket holding
# the remaining mass: a proper distribution over n + 1 outcomes. The student's p is collapsed onto the same
# outcomes (its probabilities of the n ids, and the sum of the rest), and the distillation term is
# KL(q_trunc || p_collapsed). With n = V the bucket is empty and this is the full KL exactly.
# Memory (ensemble_distill.py, ensemble.teacher_cache=n): tokens x n x 6 bytes (fp16 log-prob + int32 id), plus
# 8 bytes a token (fp32 bucket, int32 window token): at n = 32, 192 B/token; 100M tokens/epoch (the paper's
# scale) = 19.2 GB + 0.8 GB per epoch, instead of 100M x 50304 x 2 B = 10 TB for the full distribution.

LOG_ZERO = -1e30     # a finite log(0): exp() is exactly 0, and no inf - inf or 0 * inf makes a NaN


class TopK(NamedTuple):
    """A truncated target: top_logp [..., n] (sorted, descending), top_ids [..., n], log_rest [...]."""
    top_logp: torch.Tensor
    top_ids: torch.Tensor
    log_rest: torch.Tensor

    def rows(self, s, e):
        return TopK(self.top_logp[s:e], self.top_ids[s:e], self.log_rest[s:e])


def truncate_logp(logp, n: int) -> TopK:
    """The top n of a log-distribution [..., V] and the log of the mass outside them (a logsumexp over the
    other tokens, not log(1 - sum): exact however close to 1 the top-n mass is). n = V: log_rest = LOG_ZERO."""
    logp = logp.detach().float()
    top, ids = logp.topk(n, dim=-1)
    rest = torch.logsumexp(logp.scatter(-1, ids, LOG_ZERO), -1)
    return TopK(top, ids, rest.clamp_min(LOG_ZERO))


def normalised(target: TopK) -> TopK:
    """The target as fp32 log-probs renormalised over its n + 1 outcomes (a stored fp16 copy sums to 1 only
    within rounding); ids as int64 for gather/scatter."""
    lq = torch.cat([target.top_logp.float(), target.log_rest.float()[..., None]], -1).clamp_min(LOG_ZERO)
    lq = lq - torch.logsumexp(lq, -1, keepdim=True)
    return TopK(lq[..., :-1].clamp_min(LOG_ZERO), target.top_ids.long(), lq[..., -1].clamp_min(LOG_ZERO))


def collapse(ls, ids):
    """A student's log-probs [..., V] on the target's outcomes: (log p of the n ids, log p of the rest)."""
    return ls.gather(-1, ids), torch.logsumexp(ls.scatter(-1, ids, LOG_ZERO), -1)


def truncated_kl_rows(ls, target: TopK):
    """KL(q_trunc || p_collapsed) per row, from the student's log-probs ls [..., V] and a normalised target.
    Differentiable (autograd): the reference for the chunked closed-form gradient and for measurements."""
    return _collapsed_kl(*collapse(ls, target.top_ids), target)


def _collapsed_kl(lp_top, lp_rest, target: TopK):
    lq, lq_rest = target.top_logp, target.log_rest
    return (lq.exp() * (lq - lp_top)).sum(-1) + lq_rest.exp() * (lq_rest - lp_rest)


def _topk_kl_chunk(zc, target: TopK, s, e, T, need_grad):
    """(KL per row, T * dKL/dz) of rows s:e. The gradient in closed form: p_v - q_v for a top id v, and
    p_v - q_rest * p_v / p_rest for any other token (the bucket's mass spread as the student spreads it)."""
    t = normalised(target.rows(s, e))
    ls = F.log_softmax(zc / T, dim=-1)
    lp_top, lp_rest = collapse(ls, t.top_ids)
    kl_rows = _collapsed_kl(lp_top, lp_rest, t)
    if not need_grad:
        return kl_rows, None
    spread = (ls + (t.log_rest - lp_rest)[:, None]).exp_()      # q_rest * p_v / p_rest <= q_rest, in log space
    g = ls.exp_().sub_(spread)                                   # (the ratio q_rest / p_rest alone can overflow)
    del spread
    g.scatter_(1, t.top_ids, lp_top.exp() - t.top_logp.exp())
    return kl_rows, g


def cached_distill_loss(student_BSV, target: TopK, labels_BS, alpha: float, temperature: float,
                        chunk_elems: int | None = None):
    """(1 - alpha) * CE + alpha * T^2 * KL(q_trunc || p_student_T collapsed), q_trunc a TopK target of the
    tempered teacher (shapes [B, S, n], [B, S, n], [B, S]). Chunked like distill_loss. Returns (loss, parts)."""
    if alpha == 0.0:
        return distill_loss(student_BSV, None, labels_BS, 0.0, temperature, chunk_elems)
    V, n = student_BSV.shape[-1], target.top_ids.shape[-1]
    flat = TopK(target.top_logp.reshape(-1, n), target.top_ids.reshape(-1, n), target.log_rest.reshape(-1))
    loss, ce, kl = _ChunkedCEKL.apply(student_BSV.reshape(-1, V), flat, labels_BS.reshape(-1), float(alpha),
                                      float(temperature), True, chunk_rows(V, chunk_elems), torch.is_grad_enabled())
    return loss, {"ce": ce.detach(), "kl": kl.detach()}


def truncation_error(student_NV, teacher_logp_NV, ns, temperature: float = 1.0) -> dict:
    """How well top-n truncation approximates the distillation term on given tokens (rows of [N, V] student
    logits and the teacher's tempered log-probs, e.g. mixture_logp on a few windows, flattened). For each n:
    the exact KL(q || p_T) and the truncated one (means over rows), their difference, the cosine between their
    gradients w.r.t. the student logits, and the teacher mass the top n covers (mean and min over rows)."""
    z = student_NV.detach().float().reshape(-1, student_NV.shape[-1])
    lq = teacher_logp_NV.detach().float().reshape(z.shape)

    def value_and_grad(kl_fn):
        zz = z.clone().requires_grad_()
        kl = kl_fn(F.log_softmax(zz / temperature, -1)).mean()
        (g,) = torch.autograd.grad(kl, zz)
        return kl.item(), g.flatten()

    exact, g_exact = value_and_grad(lambda ls: (lq.exp() * (lq - ls)).sum(-1))
    out = {"exact_kl": exact, "rows": z.shape[0], "vocab": z.shape[1], "by_n": {}}
    for n in ns:
        t = truncate_logp(lq, int(n))
        kl, g = value_and_grad(lambda ls: truncated_kl_rows(ls, normalised(t)))
        mass = torch.logsumexp(t.top_logp, -1).exp()
        out["by_n"][int(n)] = {"truncated_kl": kl, "abs_error": abs(kl - exact),
                               "relative_error": abs(kl - exact) / max(abs(exact), 1e-30),
                               "grad_cosine": F.cosine_similarity(g, g_exact, dim=0, eps=1e-30).item(),
                               "mass_mean": mass.mean().item(), "mass_min": mass.min().item()}
    return out


# ------------------------------------------------------------------ unchunked reference (tests, benchmarks)

def reference_loss(student_BSV, teacher_BSV, labels_BS, alpha: float, temperature: float, teacher_is_logp=False):
    """The pre-issue-13 loss: full-vocabulary fp32 tensors for the whole micro-batch (about six of them)."""
    ce = F.cross_entropy(student_BSV.flatten(0, 1).float(), labels_BS.flatten(), ignore_index=-100)
    if teacher_BSV is None or alpha == 0.0:
        return ce, {"ce": ce.detach(), "kl": torch.zeros(())}
    log_pt = (teacher_BSV.detach().float() if teacher_is_logp
              else F.log_softmax(teacher_BSV.detach().float() / temperature, dim=-1))
    log_ps = F.log_softmax(student_BSV.float() / temperature, dim=-1)
    kl_BS = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    mask = (labels_BS != -100).float()
    kl = (kl_BS * mask).sum() / mask.sum().clamp_min(1.0)
    loss = (1.0 - alpha) * ce + alpha * temperature ** 2 * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
