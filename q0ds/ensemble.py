"""Serving the top-K prior-weighted probability mixture of a run (Python API, `q0ds generate`, `export-mixture`).

    lm = MixtureLM.from_run("runs/demo", k=4)                  # members on the accelerator when present
    lm.generate(["The import statement", "A class"], max_new_tokens=40, temperature=0)   # batched, greedy
    logp_BV = lm.next_token_logprobs([[5, 7, 9], [3]])          # log sum_i w_i p_i(. | row), [batch, vocab]
    lm.export("mix/")                                           # one dir: members/, tokenizer/, mixture.json
    lm = MixtureLM.from_pretrained("mix/")                      # one call, sha256 of every member checked

How a step runs. Prompts are left-padded into one batch: attention mask 0 on the pads, position ids counted
from each row's first real token (0, 1, ...), so a padded row computes what it computes alone. Every member
keeps its own KV cache (transformers DynamicCache); after the prefill each step feeds one token per row. The
mixture is taken in probability space, log sum_i exp(log w_i + log_softmax(z_i)) in float32 (method.md),
never by averaging logits. temperature 0 is greedy; otherwise tokens are drawn from p_mix^(1/T) (renormalised)
with a seeded CPU generator: the same prompts, batch size and seed give the same tokens. A row stops at its
EOS and leaves the batch (its cache rows are dropped).

The trained context. Members were trained on windows of seq_len tokens at positions 0..seq_len-1. A row's
context is its last tokens since its window start: a prompt longer than seq_len keeps its last seq_len
tokens (with a warning); when a new token would make the context seq_len + 1 long, the context is cut to its
last `slide_keep` tokens (default seq_len // 2) and every member's cache is rebuilt from those tokens, again at
positions 0.. (a cache cannot drop its oldest token exactly: every later key depends on it). So each row sees
between slide_keep and seq_len tokens, and pays one prefill every seq_len - slide_keep + 1 tokens.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from .devices import inference_dtype, resolve_device
from .distill import mixture_logp
from .snapshot import SnapshotError, load_tokenizer, member_id, sha256_file, verify

FORMAT, FORMAT_VERSION = "q0ds-mixture", 1
MEMBER_FILES = ("config.json", "generation_config.json", "model.safetensors", "snapshot.json")


class MixtureLM:
    def __init__(self, snapshot_dirs, weights, device="auto", seq_len: int | None = None, tokenizer_dir=None,
                 member_ids=None, source: dict | None = None, slide_keep: int | None = None, check_hashes=True):
        from transformers import AutoModelForCausalLM
        if len(snapshot_dirs) != len(weights) or not snapshot_dirs:
            raise ValueError("need one weight per snapshot dir, and at least one")
        w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
        if not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"mixture weights must be finite, >= 0 and not all 0; got {list(weights)}")
        if check_hashes:
            for d in snapshot_dirs:
                verify(d)
        self.dirs = [Path(d) for d in snapshot_dirs]
        self.member_ids = list(member_ids) if member_ids else [member_id(d) for d in self.dirs]
        self.source = source or {}
        self.weights = w / w.sum()
        self.device = resolve_device(device)
        self.dtype = inference_dtype(self.device)
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else self.dirs[0]
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.models = [AutoModelForCausalLM.from_pretrained(d, local_files_only=True, dtype=self.dtype)
                       .to(self.device).eval() for d in self.dirs]
        vocab = {m.config.vocab_size for m in self.models}
        if len(vocab) != 1:
            raise ValueError(f"members have different vocab sizes {sorted(vocab)}; they cannot be mixed token by token")
        # the context the members were trained on; position embeddings beyond it exist but were never trained
        self.seq_len = int(seq_len or self.models[0].config.max_position_embeddings)
        self.slide_keep = int(slide_keep or max(1, self.seq_len // 2))
        if not 1 <= self.slide_keep <= self.seq_len:
            raise ValueError(f"slide_keep {self.slide_keep} must be in 1..seq_len ({self.seq_len})")
        self.eos_id = self.tokenizer.eos_token_id
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        # zero-weight members contribute nothing: they are loaded (the API lists them) but never run
        self.last_stats = {}                            # of the last generate_ids: prompts, new_tokens, seconds
        self._active = [(m, float(wi)) for m, wi in zip(self.models, self.weights) if wi > 0]   # (member, weight)

    # ------------------------------------------------------------ construction
    @classmethod
    def from_run(cls, run, k: int, device="auto", **kw):
        dirs, weights, ids, seq_len = run_members(run, k)
        return cls(dirs, weights, device, seq_len=seq_len, member_ids=ids,
                   source={"run": str(Path(run).resolve()), "k": int(k)}, **kw)

    @classmethod
    def from_pretrained(cls, mixture_dir, device="auto", **kw):
        """Load a dir written by `export` / `q0ds export-mixture`; every member's weights must match mixture.json."""
        root = Path(mixture_dir)
        doc = read_mixture_json(root)
        dirs = []
        for m in doc["members"]:
            weights = root / m["path"] / "model.safetensors"
            if not weights.is_file():
                raise SnapshotError(f"{weights} is missing: {root} is an incomplete mixture; re-export it")
            digest = sha256_file(weights)
            if digest != m["sha256"]:
                raise SnapshotError(f"{weights} was modified after export: sha256 {digest[:12]}... does not match "
                                    f"{root / 'mixture.json'} ({m['sha256'][:12]}...); re-export the mixture with "
                                    "`q0ds export-mixture`")
            dirs.append(root / m["path"])
        return cls(dirs, [m["weight"] for m in doc["members"]], device, seq_len=doc["seq_len"],
                   tokenizer_dir=root / doc["tokenizer"], member_ids=[m["source"] for m in doc["members"]],
                   source=doc.get("source", {}), check_hashes=False, **kw)

    def export(self, out_dir) -> Path:
        return export_mixture(self.dirs, self.weights.tolist(), self.member_ids, self.tokenizer_dir, self.seq_len,
                              self.source, out_dir)

    # ------------------------------------------------------------ scoring (no cache)
    def _mix(self, logits_per_member) -> torch.Tensor:
        """log sum_i w_i softmax(z_i), float32, from the active members' [..., vocab] logits in member order, one
        alive at a time (distill.mixture_logp: the same mixture the ensemble distillation trains against)."""
        return mixture_logp(logits_per_member, [w for _, w in self._active], 1.0)

    @torch.inference_mode()
    def logprobs(self, input_ids, attention_mask=None) -> torch.Tensor:
        """Mixture log-probabilities at every position: [batch, seq, vocab] (float32). With an attention mask
        (left padding), position ids count from each row's first real token."""
        ids = torch.as_tensor(input_ids, device=self.device)
        kw = {}
        if attention_mask is not None:
            mask = torch.as_tensor(attention_mask, device=self.device)
            kw = dict(attention_mask=mask, position_ids=_positions(mask))
        return self._mix(m(input_ids=ids, **kw).logits for m, _ in self._active)

    def next_token_logprobs(self, input_ids) -> torch.Tensor:
        """[batch, vocab] for a [batch, seq] tensor, or for a list of token lists of any lengths (left-padded)."""
        if isinstance(input_ids, torch.Tensor) or _rectangular(input_ids):
            return self.logprobs(input_ids)[:, -1]
        ids, mask = self._left_pad(input_ids)
        return self.logprobs(ids, mask)[:, -1]

    def _left_pad(self, rows):
        L = max(len(r) for r in rows)
        ids = torch.full((len(rows), L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, L - len(r):] = torch.as_tensor(r, dtype=torch.long)
                mask[i, L - len(r):] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------ generation (KV cache per member)
    def generate_ids(self, ids_list, max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0,
                     batch: int = 8, return_logprobs: bool = False):
        """New token ids for each prompt (a list of token-id lists), up to and including EOS. With
        return_logprobs, also each row's mixture log-probabilities before every new token ([n_new, vocab])."""
        rows = [list(map(int, r)) for r in ids_list]
        if any(not r for r in rows):
            raise ValueError("every prompt needs at least one token")
        if batch < 1 or max_new_tokens < 0:
            raise ValueError(f"batch ({batch}) must be >= 1 and max_new_tokens ({max_new_tokens}) >= 0")
        gen = torch.Generator().manual_seed(int(seed))
        t0 = time.perf_counter()
        tokens, logps = [], []
        for start in range(0, len(rows), batch):
            t, lp = self._generate_batch(rows[start:start + batch], max_new_tokens, temperature, gen, return_logprobs)
            tokens += t
            logps += lp
        self.last_stats = {"prompts": len(rows), "new_tokens": sum(map(len, tokens)),
                           "seconds": time.perf_counter() - t0}
        return (tokens, logps) if return_logprobs else tokens

    @torch.inference_mode()
    def _generate_batch(self, rows, max_new: int, temperature: float, gen, keep_lp: bool):
        from transformers import DynamicCache
        ctx = [r[-self.seq_len:] for r in rows]          # each row's context since its window start
        new, lps = [[] for _ in rows], [[] for _ in rows]
        active = list(range(len(rows)))                  # original row index of each batch row
        caches = pending = None
        for _ in range(max_new):
            if caches is None:                           # prefill (start, or after a slide)
                ids, mask = self._left_pad([ctx[i] for i in active])
                pos = _positions(mask)
                caches = [DynamicCache(config=m.config) for m, _ in self._active]
            else:                                        # one new token per row
                ids = pending[:, None]
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                pos = pos[:, -1:] + 1
            lp = self._mix(m(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=c,
                             use_cache=True, logits_to_keep=1).logits[:, -1]
                           for (m, _), c in zip(self._active, caches)).cpu()
            if temperature <= 0:
                nxt = lp.argmax(-1)
            else:
                nxt = torch.multinomial(torch.softmax(lp / temperature, -1), 1, generator=gen)[:, 0]
            keep, slide = [], False
            for j, i in enumerate(active):
                t = int(nxt[j])
                new[i].append(t)
                if keep_lp:
                    lps[i].append(lp[j])
                if t == self.eos_id:
                    continue
                keep.append(j)
                ctx[i].append(t)
                if len(ctx[i]) > self.seq_len:           # the trained window is full: restart it
                    ctx[i] = ctx[i][-self.slide_keep:]
                    slide = True
            if not keep:
                break
            if len(keep) < len(active):                  # rows that ended leave the batch
                idx = torch.tensor(keep, device=self.device)
                for c in caches:
                    c.batch_select_indices(idx)
                mask, pos, nxt = mask[idx], pos[idx], nxt[torch.tensor(keep)]
                active = [active[j] for j in keep]
            pending = nxt.to(self.device)
            if slide:
                caches = None
        return new, [torch.stack(x) if x else torch.empty(0) for x in lps]

    def generate(self, prompt, max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0, batch: int = 8):
        """Prompt + completion text for one prompt (str) or each of a list of prompts (temperature 0 = greedy)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        rows = []
        for p in prompts:
            ids = self.tokenizer(p).input_ids or [self.eos_id if self.eos_id is not None else self.pad_id]
            if len(ids) > self.seq_len:
                print(f"q0ds generate: the prompt has {len(ids)} tokens, more than the trained seq_len "
                      f"{self.seq_len}; the mixture sees only its last {self.seq_len} tokens", file=sys.stderr)
            rows.append(ids)
        outs = self.generate_ids(rows, max_new_tokens, temperature, seed, batch)
        texts = [self.tokenizer.decode(r + o, skip_special_tokens=True) for r, o in zip(rows, outs)]
        return texts[0] if isinstance(prompt, str) else texts


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch: 0 at each row's first real token (pads get 0; they are masked)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _rectangular(rows) -> bool:
    return len({len(r) for r in rows}) == 1


# ---------------------------------------------------------------- runs, export format
def run_members(run, k: int):
    """(snapshot dirs, renormalised weights, member ids, trained seq_len) of the top-K members of RUN/prior.json."""
    from .population import PriorError, topk_weights
    from .prior import read_prior_json
    run = Path(run)
    if not (run / "prior.json").is_file():
        raise PriorError(f"{run / 'prior.json'} not found: run `q0ds fit-prior --run {run}` first")
    prior = read_prior_json(run / "prior.json")
    idx, w = topk_weights(prior["weights"], k)
    ids = [prior["members"][i] for i in idx]
    dirs = [run / "bases" / m.split("/")[0] / "snapshots" / m.split("/")[1] for m in ids]
    return dirs, w.tolist(), ids, _trained_seq_len(run)


def _trained_seq_len(run: Path) -> int | None:
    """train.seq_len of the run's resolved config (None if the run dir has no config.json)."""
    path = run / "config.json"
    return json.loads(path.read_text())["train"]["seq_len"] if path.is_file() else None


def export_mixture(dirs, weights, member_ids, tokenizer_dir, seq_len, source, out_dir) -> Path:
    """Write one self-contained dir: members/<base-NN_cycle-NNNN>/ (plain HF model dirs), tokenizer/, and
    mixture.json (format, version, weights, member sha256s, source run). Written to a temp dir, then renamed."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SnapshotError(f"{out} already exists and is not an empty directory: pass a new --out to export into")
    for d in dirs:
        verify(d)
    tok = load_tokenizer(tokenizer_dir)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "members").mkdir(parents=True)
    try:
        members = []
        for d, mid, w in zip(map(Path, dirs), member_ids, weights):
            name = mid.replace("/", "_")
            dst = tmp / "members" / name
            dst.mkdir()
            for f in MEMBER_FILES:
                if (d / f).is_file():
                    shutil.copy2(d / f, dst / f)
            members.append({"name": name, "path": f"members/{name}", "source": mid, "weight": float(w),
                            "sha256": sha256_file(dst / "model.safetensors")})
        tok.save_pretrained(tmp / "tokenizer")
        doc = {"format": FORMAT, "version": FORMAT_VERSION, "members": members,
               "weights": [m["weight"] for m in members], "seq_len": seq_len, "tokenizer": "tokenizer",
               "source": dict(source or {})}
        (tmp / "mixture.json").write_text(json.dumps(doc, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_mixture_json(root) -> dict:
    path = Path(root) / "mixture.json"
    if not path.is_file():
        raise SnapshotError(f"{path} is missing: {root} is not an exported mixture (write one with "
                            "`q0ds export-mixture --run RUN --k K --out DIR`)")
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{path} is corrupt ({e}); re-export the mixture") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a {FORMAT} file (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    if not isinstance(doc.get("version"), int) or doc["version"] > FORMAT_VERSION:
        raise SnapshotError(f"{path} has format version {doc.get('version')!r}; this q0ds reads up to "
                            f"{FORMAT_VERSION}: upgrade q0ds")
    missing = [k for k in ("members", "seq_len", "tokenizer") if k not in doc]
    if missing or not doc["members"] or any({"path", "weight", "sha256", "source"} - set(m) for m in doc["members"]):
        raise SnapshotError(f"{path} lacks fields ({', '.join(missing) or 'members[*]'}); re-export the mixture")
    return doc
