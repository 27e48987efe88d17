"""Primitive 3 of q0: the learned prior over population members (method.md, "Primitive 3").

Every snapshot i scored the fitness set once, giving `P[i, t] = p_i(y_t)`, the probability it put on
the true next token t. The prior is one logit per member; the mixture `sum_i softmax(a)_i p_i` is the
ensemble's prediction, and we fit `a` by minimising the mixture NLL (ref-code: AdamW lr 0.5, no weight
decay, 300 steps, grad-norm clip 1.0, init near 0).

Speed. Fitting 480 members on 132k tokens is a few hundred passes over a 250 MB matrix, so the fit is
memory-bound. We never call autograd on the [M, N] matrix; the gradient is analytic:
    m_t = sum_i w_i P_it,   L = -mean_t log m_t,   dL/da_i = w_i - mean_t (w_i P_it / m_t)
(the last term is the mean "responsibility" of member i). Each step is two matrix-vector products per
block of 4096 tokens (the second one reads the block from cache), one range of blocks per CPU thread.
Stability: we store Q = P / max_i P[:, t] (per-token rescaling, exact: log m_t = log(w.Q_t) + log max_t),
so Q has a 1 in every column and nothing underflows however small the probabilities are.

Guarantee: the returned weights are never worse (exact NLL) than the best single member or the uniform
mixture: we keep the best iterate and compare it against those two candidates at the end.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .config import atomic_write_text

_TINY = torch.finfo(torch.float32).tiny      # probabilities are clamped here before the log
_BLOCK = 4096                                # tokens per block: 480 x 4096 x 4 B = 7.9 MB, fits L3
_ONE_HOT_LOGIT = -1e4                        # finite "-inf" so a one-hot choice stays valid JSON


@dataclass
class PriorFit:
    logits: list[float]          # softmax(logits) == weights
    weights: list[float]
    loss: float                  # exact mixture NLL (nats/token) of `weights` on the fitting tokens
    history: list[float]         # loss at iterates 0..steps (float32 fast path)
    steps: int
    chosen: str = "fitted"       # "fitted" | "best_single" | "uniform"
    best_step: int = 0           # iterate of the fit that was kept
    baselines: dict = field(default_factory=dict)   # best_single, best_single_index, uniform
    seconds: float = 0.0         # wall time of fit_prior
    timings: dict = field(default_factory=dict)     # seconds: prepare, steps, final (comparisons)


class _Scaled:
    """Q = P / max_i P (per token) as contiguous float32 blocks, plus the fixed pieces of the NLL.

    Work is split into one contiguous range of token blocks per thread of `pool` (if given).
    MKL's gemv runs ~2x faster on a contiguous [M, 4096] block than on a strided slice of [M, N].
    """

    def __init__(self, P: torch.Tensor, pool: ThreadPoolExecutor | None = None, workers: int = 1):
        if P.dim() != 2 or P.shape[0] < 1 or P.shape[1] < 1:
            raise ValueError(f"P must be a [members, tokens] matrix, got shape {tuple(P.shape)}")
        self.P, self.pool = P.detach().to("cpu", torch.float32), pool
        self.M, self.N = P.shape
        nb = -(-self.N // _BLOCK)
        k = max(1, min(workers if pool else 1, nb))
        self.ranges = [(nb * i // k, nb * (i + 1) // k) for i in range(k)]   # block ranges per thread
        parts = self._map(self._prepare)
        self.blocks = [b for p in parts for b in p[0]]
        self.single_sum = sum(p[1] for p in parts)          # sum_t log p_i(y_t), float64 [M]
        self.logc_sum = sum(p[2] for p in parts)            # sum_t log max_i p_i(y_t)
        del self.P

    def _map(self, fn, *args):
        if self.pool is None or len(self.ranges) == 1:
            return [fn(lo, hi, *args) for lo, hi in self.ranges]
        futs = [self.pool.submit(fn, lo, hi, *args) for lo, hi in self.ranges]
        return [f.result() for f in futs]

    def _prepare(self, lo, hi):
        blocks, single, logc_sum = [], torch.zeros(self.M, dtype=torch.float64), 0.0
        for b in range(lo, hi):
            raw = self.P[:, b * _BLOCK:(b + 1) * _BLOCK]
            lo_t, hi_t = torch.aminmax(raw, dim=0)                 # one pass: validity + per-token max
            if not (float(lo_t.min()) >= 0 and math.isfinite(float(hi_t.max()))):   # also catches NaN
                raise ValueError("P must hold finite, non-negative probabilities p_i(y_t)")
            c, p = hi_t.clamp_min(_TINY), raw.clamp_min(_TINY)
            single += p.log().sum(1).double()
            logc_sum += float(c.log().sum(dtype=torch.float64))
            blocks.append(p.div_(c))
        return blocks, single, logc_sum

    def _part(self, lo, hi, w32, want_grad):
        log_sum, g = 0.0, torch.zeros(self.M, dtype=torch.float32)
        for blk in self.blocks[lo:hi]:
            m = (w32 @ blk).clamp_min_(_TINY)
            log_sum += float(m.log().sum(dtype=torch.float64))
            if want_grad:
                g.addmv_(blk, m.reciprocal_())
        return log_sum, g

    def loss_grad(self, w: torch.Tensor, want_grad=True):
        """Float32 fast path: (NLL, dL/da) at weights w (float64 [M])."""
        parts = self._map(self._part, w.to(torch.float32), want_grad)
        loss = -(sum(p[0] for p in parts) + self.logc_sum) / self.N
        if not want_grad:
            return loss, None
        g = sum(p[1].double() for p in parts) / self.N       # mean_t Q_it / m_t
        return loss, w - w * g

    def _exact_part(self, lo, hi, w64):
        return sum(float((w64 @ blk.double()).log().sum()) for blk in self.blocks[lo:hi])

    def exact_nll(self, w) -> float:
        """Mixture NLL accumulated in float64 (exact up to the float32 rounding of the inputs)."""
        total = sum(self._map(self._exact_part, torch.as_tensor(w, dtype=torch.float64)))
        return -(total + self.logc_sum) / self.N


@contextlib.contextmanager
def _scaled(P: torch.Tensor):
    """_Scaled(P) with one worker thread per torch thread; torch's own threading is off meanwhile
    (each worker runs single-threaded BLAS on its own token range, which is ~2x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            yield _Scaled(P, pool, threads)
    finally:
        torch.set_num_threads(threads)


def fit_prior(P: torch.Tensor, steps: int = 300, lr: float = 0.5, clip: float = 1.0,
              init_std: float = 0.0, seed: int = 0) -> PriorFit:
    """Fit softmax weights over M members to P [M, N] (p_i(y_t)); see the module docstring.

    AdamW(lr, weight_decay=0) on the logits, grad-norm clip `clip` (0 = off), `steps` steps from
    logits N(0, init_std^2) (0 = all zeros, the uniform mixture). Returns the best of: the best iterate,
    the best single member, the uniform mixture, by exact NLL (`chosen` says which).
    """
    if steps < 0 or not lr > 0:
        raise ValueError(f"need steps >= 0 and lr > 0, got steps={steps}, lr={lr}")
    t0 = time.perf_counter()
    with _scaled(P) as S:
        t1 = time.perf_counter()
        fit = _optimise(S, steps, lr, clip, init_std, seed)
    fit.seconds = time.perf_counter() - t0
    fit.timings = {"prepare": t1 - t0, **fit.timings}
    return fit


def _optimise(S: _Scaled, steps, lr, clip, init_std, seed) -> PriorFit:
    M, t0 = S.M, time.perf_counter()
    a = torch.zeros(M, dtype=torch.float64)
    if init_std > 0:
        gen = torch.Generator().manual_seed(seed)
        a = torch.randn(M, generator=gen, dtype=torch.float64) * init_std
    a.requires_grad_(True)
    opt = torch.optim.AdamW([a], lr=lr, weight_decay=0.0)
    history, best = [], (math.inf, a.detach().clone(), 0)
    for k in range(steps + 1):
        with torch.no_grad():
            w = torch.softmax(a, 0)
            loss, grad = S.loss_grad(w, want_grad=k < steps)
        history.append(loss)
        if loss < best[0]:
            best = (loss, a.detach().clone(), k)
        if k == steps:
            break
        a.grad = grad
        if clip and clip > 0:
            torch.nn.utils.clip_grad_norm_([a], clip)
        opt.step()
    t_steps = time.perf_counter() - t0

    uniform = torch.full((M,), 1.0 / M, dtype=torch.float64)
    i_best = int(torch.argmax(S.single_sum))
    one_hot = torch.zeros(M, dtype=torch.float64)
    one_hot[i_best] = 1.0
    fitted_w = torch.softmax(best[1], 0)
    cands = [("fitted", fitted_w, best[1]),
             ("best_single", one_hot, torch.where(one_hot > 0, 0.0, _ONE_HOT_LOGIT)),
             ("uniform", uniform, torch.zeros(M, dtype=torch.float64))]
    nlls = [S.exact_nll(c[1]) for c in cands]
    pick = min(range(3), key=lambda i: (nlls[i], i))       # ties go to the fitted weights
    name, w, logits = cands[pick]
    return PriorFit(logits=logits.tolist(), weights=w.tolist(), loss=nlls[pick], history=history,
                    steps=steps, chosen=name, best_step=best[2],
                    baselines={"best_single": nlls[1], "best_single_index": i_best, "uniform": nlls[2]},
                    timings={"steps": t_steps, "final": time.perf_counter() - t0 - t_steps})


def nll_and_grad(P: torch.Tensor, logits) -> tuple[float, torch.Tensor]:
    """The fit's fast-path NLL and analytic gradient at `logits` (exposed for tests)."""
    a = torch.as_tensor(logits, dtype=torch.float64)
    return _Scaled(P).loss_grad(torch.softmax(a, 0))


def _check_weights(weights, M: int) -> torch.Tensor:
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != M:
        raise ValueError(f"{w.numel()} weights for {M} members")
    return w


def mixture_nll(P: torch.Tensor, weights) -> float:
    """Exact mean NLL of the probability mixture sum_i w_i P[i, t] (nats/token)."""
    weights = _check_weights(weights, P.shape[0])
    with _scaled(P) as S:
        return S.exact_nll(weights)


def mixture_logprob(logP: torch.Tensor, weights) -> torch.Tensor:
    """Per-token log sum_i w_i exp(logP[i, t]) as float64 [N]; zero weights drop out."""
    lw = _check_weights(weights, logP.shape[0]).log()[:, None]
    out = torch.empty(logP.shape[1], dtype=torch.float64)
    for j in range(0, logP.shape[1], _BLOCK):
        out[j:j + _BLOCK] = torch.logsumexp(logP[:, j:j + _BLOCK].double() + lw, 0)
    return out


def top_k(weights, k: int) -> tuple[list[int], torch.Tensor]:
    """Top-k members by weight (ties: lower index first), weights renormalised to sum to 1."""
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    M = w.numel()
    if k < 1:
        raise ValueError(f"--k {k} must be at least 1")
    if k > M:
        raise ValueError(f"--k {k} is larger than the population ({M} member{'s' if M != 1 else ''})")
    idx = sorted(range(M), key=lambda i: (-float(w[i]), i))[:k]
    sel = w[idx]
    total = float(sel.sum())
    sel = sel / total if total > 0 else torch.full((k,), 1.0 / k, dtype=torch.float64)
    return idx, sel


def topk_table(weights, ks) -> dict:
    """{"k": {"members": [indices], "weights": [renormalised]}} for every k in ks."""
    table = {}
    for k in ks:
        idx, w = top_k(weights, int(k))
        table[str(int(k))] = {"members": idx, "weights": w.tolist()}
    return table


def default_ks(M: int) -> list[int]:
    """[1, 2, 4, 8, ...] up to M, with M itself always last."""
    if M < 1:
        raise ValueError(f"the population is empty (M={M})")
    ks, k = [], 1
    while k < M:
        ks.append(k)
        k *= 2
    return ks + [M]


_RESERVED = {"members", "logits", "weights", "fit_loss", "steps", "chosen", "baselines", "topk"}


def write_prior_json(path, member_ids, fit: PriorFit, ks=None, extra: dict | None = None) -> None:
    """Write prior.json atomically (temp file in the same dir, then os.replace)."""
    member_ids = list(member_ids)
    if len(member_ids) != len(fit.weights):
        raise ValueError(f"{len(member_ids)} member ids for {len(fit.weights)} fitted weights")
    clash = _RESERVED & set(extra or {})
    if clash:
        raise ValueError(f"extra keys {sorted(clash)} would overwrite prior.json fields")
    table = topk_table(fit.weights, ks if ks is not None else default_ks(len(member_ids)))
    for row in table.values():
        row["members"] = [member_ids[i] for i in row["members"]]
    doc = {"members": member_ids, "logits": fit.logits, "weights": fit.weights, "fit_loss": fit.loss,
           "steps": fit.steps, "chosen": fit.chosen, "baselines": fit.baselines, "topk": table,
           **(extra or {})}
    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False))


def read_prior_json(path) -> dict:
    """Load prior.json, checking the fields every consumer relies on."""
    with open(path) as f:
        doc = json.load(f)
    for key in ("members", "weights", "topk"):
        if key not in doc:
            raise ValueError(f"{path}: missing field {key!r}; not a q0ds prior.json")
    if len(doc["members"]) != len(doc["weights"]):
        raise ValueError(f"{path}: {len(doc['members'])} members but {len(doc['weights'])} weights")
    return doc
