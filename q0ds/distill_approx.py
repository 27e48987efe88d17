"""How far the teacher cache (ensemble.teacher_cache=N) is from the mixture it stands for, on a run's own data.

    measure_truncation(RUN, K, ns=[8, 32, 128], windows=64) -> dict (JSON-able)

What it measures. The top-K members of RUN/prior.json (the teacher `q0ds distill-ensemble --run RUN --k K` would
use: resolve() with the same overrides, sha256 of every member checked) are loaded as plain HF models (eval
mode, CPU, one process: they give exactly the logits the ZeRO-3 teacher engines give, tests/test_ensemble_distill.py).
On the student's FIRST `windows` training windows (data.train_samples(student seed, base 0, 0, windows): the
windows its first steps read, in that order) it computes the tempered mixture log p_mix_T (distill.mixture_logp,
as training does) and takes as the student's logits those of the top-weighted member: the student's weights at
step 0 under ensemble.init=top1 (the default; only top1 is measured). Then distill.truncation_error over all
windows x seq_len tokens: for each N the exact KL(p_mix_T || p_student_T), the truncated KL (top N + one bucket),
their absolute / relative error, the cosine between the two gradients w.r.t. the student logits (the direction
training moves in) and the teacher mass the top N covers (mean and min over tokens). Where the exact KL is below
KL_FLOOR (the prior puts all its weight on the top member, so the teacher IS the student's start) the relative
error and the cosine are None: both would be ratios of float rounding. All tokens count (the
training stream is packed: no ignored labels). It measures the truncation alone: the cache's fp16 storage
(ensemble.teacher_cache_dtype=float16) rounds the kept log-probs further (below 1e-3 relative).

Timing, on one micro-batch (the student's first), interleaved over `repeats` rounds (median and min, seconds):
  on_the_fly  what EnsembleDistillTrainer._loss runs without a cache: K member forwards + the log-mixture
              ("target_s"), and with it the distillation loss forward + backward (mixture_distill_loss, "loss_s")
  cached[N]   what it runs with a top-N cache: reading the micro-batch's TopK from a cache written by
              teacher_cache.build for these windows ("target_s"), and with it cached_distill_loss forward +
              backward ("loss_s"); "cache_bytes_per_token": the shard files' size per token
The student's own forward and backward (the same in both) are not timed. The study records speed-up = on-the-fly
loss_s / cached loss_s; at the paper's scale the member forwards dominate far more (K forwards of a 1.8B model).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from .config import ConfigError
from .distill import cached_distill_loss, mixture_distill_loss, mixture_logp, truncation_error


KL_FLOOR = 1e-6      # nats: below it the exact KL is float rounding (the mixture IS the student's start)


def _t(xs) -> dict:
    return {"median": round(statistics.median(xs), 6), "min": round(min(xs), 6)}


def measure_truncation(run, k: int, ns=(8, 32, 128), windows: int = 64, overrides=(), repeats: int = 5,
                       threads: int | None = None) -> dict:
    """The truncation error and the cached vs on-the-fly timing of RUN's top-K teacher (module docstring)."""
    from transformers import AutoModelForCausalLM
    from .data import PreparedData
    from .ensemble_distill import member_dir, resolve
    from .snapshot import verify
    from .teacher_cache import CacheReader, build, cache_key
    cfg, spec, opts = resolve(run, k, overrides)
    if opts["init"] != "top1":
        raise ConfigError(f"measure_truncation measures from the ensemble.init=top1 start, not {opts['init']}")
    if cfg.distill.alpha == 0:
        raise ConfigError("distill.alpha is 0: the student has no teacher to truncate")
    if windows < 1 or repeats < 1:
        raise ValueError("windows and repeats must be >= 1")
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        used_threads = torch.get_num_threads()
        data = PreparedData.open(cfg.data)
        L, T, alpha, mb = cfg.train.seq_len, spec["temperature"], cfg.distill.alpha, cfg.train.micro_batch
        snaps = [member_dir(spec["run"], m) for m in spec["members"]]
        for s in snaps:
            verify(s)
        models = [AutoModelForCausalLM.from_pretrained(s, local_files_only=True).eval() for s in snaps]
        V = models[0].config.vocab_size
        ns = sorted({int(n) for n in ns})
        if not ns or ns[0] < 1 or ns[-1] > V:
            raise ValueError(f"every N must be in 1..{V} (the vocab), got {ns}")
        win = data.train_samples(cfg.seed, 0, 0, windows, L)          # the student's first windows, in order
        inputs = win[:, :-1]

        def member_logits(x, keep=None):
            for i, m in enumerate(models):
                with torch.no_grad():
                    z = m(input_ids=x).logits
                if keep is not None and i == 0:
                    keep.append(z)
                yield z

        top1, parts = [], []
        for j in range(0, windows, mb):
            parts.append(mixture_logp(member_logits(inputs[j:j + mb], top1), spec["weights"], T))
        logp, z0 = torch.cat(parts), torch.cat(top1)
        err = truncation_error(z0.reshape(-1, V), logp.reshape(-1, V), ns, T)
        degenerate = err["exact_kl"] < KL_FLOOR
        if degenerate:                   # a ratio over rounding, a cosine of two rounding-noise gradients
            for e in err["by_n"].values():
                e.update(relative_error=None, grad_cosine=None)

        # timing: one micro-batch, every path once per round
        x, labels, b = inputs[:mb], win[:mb, 1:], min(mb, windows)
        w = torch.tensor(spec["weights"], dtype=torch.float64)
        readers, sizes = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for n in ns:
                pos = [0]

                def teacher_logp(xx):                   # build() asks for the windows in order: serve them
                    a = pos[0]
                    assert torch.equal(xx, inputs[a:a + xx.shape[0]]), "teacher cache built out of order"
                    pos[0] += xx.shape[0]
                    return logp[a:a + xx.shape[0]]
                key = cache_key(n, spec, opts["teacher_cache_dtype"], data.fingerprint, cfg.seed, L, windows, 0)
                where = Path(tmp) / f"n{n}"
                readers[n] = CacheReader(where, build(where, key, lambda s, c: win[s:s + c], teacher_logp, mb))
                sizes[n] = sum(f.stat().st_size for f in where.glob("shard-*.safetensors")) / (windows * L)
            times = {"fly_target": [], "fly_loss": [], **{f"{p}{n}": [] for n in ns for p in ("target", "loss")}}
            for _ in range(repeats):
                t0 = time.perf_counter()
                mixture_logp(member_logits(x), w, T)
                times["fly_target"].append(time.perf_counter() - t0)
                z = z0[:b].clone().requires_grad_()
                t0 = time.perf_counter()
                mixture_distill_loss(z, member_logits(x), w, labels, alpha, T)[0].backward()
                times["fly_loss"].append(time.perf_counter() - t0)
                for n in ns:
                    t0 = time.perf_counter()
                    readers[n].read(0, x)
                    times[f"target{n}"].append(time.perf_counter() - t0)
                    z = z0[:b].clone().requires_grad_()
                    t0 = time.perf_counter()
                    cached_distill_loss(z, readers[n].read(0, x), labels, alpha, T)[0].backward()
                    times[f"loss{n}"].append(time.perf_counter() - t0)
            readers.clear()                              # close the shard handles before the dir goes
    finally:
        torch.set_num_threads(old_threads)
    fly = _t(times["fly_loss"])
    return {
        "run": str(Path(run).resolve()), "k": k, "members": spec["members"], "weights": spec["weights"],
        "temperature": T, "alpha": alpha, "student_start": f"init=top1: {spec['members'][0]}",
        "windows": windows, "seq_len": L, "tokens": err["rows"], "vocab": V, "seed": cfg.seed,
        "data": data.fingerprint, "exact_kl": err["exact_kl"],
        "undefined": (f"the exact KL ({err['exact_kl']:.2e}) is below {KL_FLOOR:g} nats: the top-{k} mixture is the "
                      "student's start (a prior with all its weight on the top member); relative error and gradient "
                      "cosine are undefined (None)") if degenerate else None,
        "by_n": {str(n): {**err["by_n"][n], "cache_bytes_per_token": round(sizes[n], 2)} for n in ns},
        "timing": {"micro_batch": b, "repeats": repeats, "threads": used_threads,
                   "on_the_fly": {"target_s": _t(times["fly_target"]), "loss_s": fly},
                   "cached": {str(n): {"target_s": _t(times[f"target{n}"]), "loss_s": _t(times[f"loss{n}"]),
                                       "loss_speedup": round(fly["median"] / max(statistics.median(times[f"loss{n}"]), 1e-9), 3)}
                              for n in ns}},
    }
