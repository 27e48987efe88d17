"""The teacher cache of `q0ds distill-ensemble` (ensemble.teacher_cache=N): the top-K mixture's top-N tokens per
position, computed ONCE for every training window of the student's plan, then read back instead of running the
K member forwards at every step (the standard trick at scale; the loss is distill.cached_distill_loss).

    RUN/distilled/kK/teacher_cache/
      header.json                  the key (below) and the shard list; written last, atomically: a cache
                                   without it is unfinished and is rebuilt from scratch
      shard-00000.safetensors ...  samples [i*S, (i+1)*S) of the student's data stream, each written atomically:
          top_logp [S, L, N] float16 (ensemble.teacher_cache_dtype=float32 for exactness tests), sorted descending
          top_ids  [S, L, N] int32,  log_rest [S, L] float32 (log of the mass outside the top N),
          tokens   [S, L + 1] int32  (the window itself: every read checks it equals the batch)

Keyed by sample index: sample k is data.train_samples(seed, base, k), and step s's micro-batch i on rank r is
samples plan.sample_at(s) + r * (batch / world) + i * micro_batch onward, so the cache does not depend on the
world size or the micro-batch, and a resumed run reads exactly the targets the uninterrupted one read.
The key: N, K, members + sha256, weights, temperature (the cache holds the TEMPERED mixture p_mix_T, so it
serves that T only; teacher.json already refuses a changed T), data fingerprint, seed, seq_len, samples, steps,
dtype. A header that differs from the launch's key is refused with one line naming the file (delete the dir to
rebuild). Size: tokens x N x 6 bytes + 8 bytes a token (distill.py: 20 GB per 100M tokens at N = 32).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from .config import ConfigError, atomic_write_text
from .distill import TopK, truncate_logp
from .files import save_safetensors, temp_name

HEADER = "header.json"
SHARD_BYTES = 256 << 20          # about this much per shard file
DTYPES = {"float16": torch.float16, "float32": torch.float32}


def cache_key(n: int, spec: dict, dtype: str, data_fingerprint, seed: int, seq_len: int, samples: int, steps: int) -> dict:
    """What a cache must match to serve a launch (header.json holds it plus the shard list)."""
    return {"version": 1, "n": n, "k": spec["k"], "members": spec["members"], "member_sha256": spec["member_sha256"],
            "weights": spec["weights"], "temperature": spec["temperature"], "data": data_fingerprint, "seed": seed,
            "seq_len": seq_len, "samples": samples, "steps": steps, "dtype": dtype,
            "shard_samples": max(1, SHARD_BYTES // (seq_len * (6 * n + 8)))}


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def read_header(cache_dir: Path, key: dict) -> dict | None:
    """The header of a finished cache that matches `key`; None when there is none; a ConfigError when it differs."""
    path = Path(cache_dir) / HEADER
    if not path.is_file():
        return None
    try:
        header = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(f"teacher cache header {path} is not valid JSON; delete {cache_dir} to rebuild it") from None
    diff = [k for k in key if header.get(k) != key[k]]
    missing = [s["file"] for s in header.get("shards", []) if not (Path(cache_dir) / s["file"]).is_file()]
    if diff or missing:
        what = f"{', '.join(diff)} differ" if diff else f"{missing[0]} is missing"
        raise ConfigError(f"teacher cache {path} does not match this launch ({what}); delete {cache_dir} to rebuild it")
    return header


def build(cache_dir: Path, key: dict, windows, teacher_logp, batch: int, rank: int = 0, world: int = 1, agree=None) -> dict:
    """Compute and write every shard, then the header (rank 0). windows(start, n) -> LongTensor [n, L + 1] of the
    student's stream; teacher_logp(inputs [b, L]) -> the tempered mixture's log-probs [b, L, V]. Shards go round
    robin to the ranks; every rank runs the same number of teacher forwards (a ZeRO-3 forward is a collective),
    a rank without a shard in the last round recomputes one and drops it. agree(err) is an agreement point."""
    cache_dir = Path(cache_dir)
    agree = agree or (lambda err: _raise(err))
    n, S, total = key["n"], key["shard_samples"], key["samples"]
    shards = math.ceil(total / S)
    err = None
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        (cache_dir / HEADER).unlink(missing_ok=True)
    except OSError as e:
        err = e
    agree(err)
    for r in range(math.ceil(shards / world)):
        i = r * world + rank
        m = min(S, total - r * world * S)            # every rank computes m rows: its round's largest shard
        win = windows(i * S if i < shards else 0, m)  # (past the end of the plan the stream goes on: real windows)
        with torch.no_grad():
            parts = [truncate_logp(teacher_logp(win[j:j + batch, :-1]), n) for j in range(0, m, batch)]
        if i < shards:
            keep = min(S, total - i * S)
            t = TopK(*(torch.cat(p)[:keep] for p in zip(*parts)))
            tensors = {"top_logp": t.top_logp.to(DTYPES[key["dtype"]]).contiguous(),
                       "top_ids": t.top_ids.to(torch.int32).contiguous(),
                       "log_rest": t.log_rest.float().contiguous(), "tokens": win[:keep].to(torch.int32).contiguous()}
            tensors = {name: v.cpu() for name, v in tensors.items()}
            try:
                tmp = temp_name(cache_dir / shard_name(i))
                save_safetensors(tensors, tmp)
                os.replace(tmp, cache_dir / shard_name(i))
            except OSError as e:
                err = e
        agree(err)
    if rank == 0:
        header = dict(key, shards=[{"file": shard_name(i), "start": i * S, "count": min(S, total - i * S)}
                                   for i in range(shards)])
        try:
            atomic_write_text(cache_dir / HEADER, json.dumps(header, indent=1) + "\n")
        except OSError as e:
            err = e
    agree(err)
    return read_header(cache_dir, key)


def _raise(err):
    if err is not None:
        raise err


class CacheReader:
    """Reads the targets of samples [start, start + b) for a batch, checking the stored windows are the batch's."""

    def __init__(self, cache_dir: Path, header: dict):
        self.dir, self.header = Path(cache_dir), header
        self.S = header["shard_samples"]
        self.open = {}                               # shard index -> safe_open handle (lazy, sliced reads)

    def _slice(self, i: int, name: str, a: int, b: int):
        from safetensors import safe_open
        if i not in self.open:
            self.open[i] = safe_open(str(self.dir / shard_name(i)), framework="pt")
        return self.open[i].get_slice(name)[a:b]

    def read(self, start: int, windows) -> TopK:
        """TopK of samples start .. start + len(windows) - 1; `windows` [b, L + 1] or inputs [b, L]."""
        count = windows.shape[0]
        if start < 0 or start + count > self.header["samples"]:
            raise ConfigError(f"teacher cache {self.dir / HEADER} holds samples 0..{self.header['samples'] - 1}, "
                              f"asked for {start}..{start + count - 1}")
        pieces = []
        k = start
        while k < start + count:                    # a batch may straddle two shards
            i, a = divmod(k, self.S)
            b = min(self.S, a + start + count - k)
            pieces.append({name: self._slice(i, name, a, b) for name in ("top_logp", "top_ids", "log_rest", "tokens")})
            k += b - a
        cat = {name: torch.cat([p[name] for p in pieces]) for name in pieces[0]}
        L = windows.shape[1]
        if not torch.equal(cat["tokens"][:, :L].to(windows.device), windows.to(torch.int32)):
            raise ConfigError(f"teacher cache {self.dir} holds other windows than samples {start}..{start + count - 1} "
                              "of this run's data order; delete it to rebuild")
        dev = windows.device
        return TopK(cat["top_logp"].to(dev), cat["top_ids"].to(dev), cat["log_rest"].to(dev))
