"""Snapshots: immutable population members written as plain HF model dirs, plus their scores.

    runs/<run>/bases/base-XX/snapshots/cycle-XXXX/
        config.json  model.safetensors  tokenizer files   (AutoModelForCausalLM.from_pretrained loads it)
        snapshot.json       provenance + val loss + sha256 of the weights
        fitness.safetensors per-token p(true next token) on the fitness set  {"p": float32 [N]}
        val.safetensors     the same on the validation set (ensemble evaluation reads it, never the model)

The weights are written first, atomically (temp dir + rename); scores are added after, each file atomically,
and snapshot.json says `"scored": true` only when they are all there.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
from pathlib import Path

import torch

from .config import atomic_write_text
from .faults import crash_if
from .files import save_safetensors, write_failure


class SnapshotError(ValueError):
    pass


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def windows_fingerprint(windows_and_mask) -> str:
    """Identity of a scoring set (token windows + mask): members scored on different sets cannot be mixed."""
    w, m = windows_and_mask
    h = hashlib.sha256(w.to(torch.int64).numpy().tobytes())
    h.update(m.numpy().tobytes())
    return h.hexdigest()[:16]


def snapshot_dir(base_dir, cycle: int) -> Path:
    return Path(base_dir) / "snapshots" / f"cycle-{cycle:04d}"


def write_snapshot(out_dir, state_dict, model_config, tokenizer_dir, meta: dict, timings: dict | None = None) -> dict:
    """Rank 0 only. Write weights + config + tokenizer + snapshot.json into a temp dir, then rename into place.
    An existing dir for the same cycle (a re-run after resume) is replaced. `timings` (optional) gets
    hash_s: the seconds spent on the sha256 of the weights."""
    import time
    hash_s = 0.0
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        seen, tensors = set(), {}
        for k, v in state_dict.items():              # tied weights share storage: keep the first name
            if v.data_ptr() in seen:
                continue
            seen.add(v.data_ptr())
            tensors[k] = v.detach().contiguous().cpu()
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        crash_if("crash_in_snapshot", meta.get("cycle"))
        model_config.save_pretrained(tmp)
        for f in Path(tokenizer_dir).iterdir():
            if f.is_file():
                shutil.copy2(f, tmp / f.name)
        t_hash = time.perf_counter()
        meta = dict(meta, sha256=sha256_file(tmp / "model.safetensors"), scored=False)
        hash_s = time.perf_counter() - t_hash
        atomic_write_text(tmp / "snapshot.json", json.dumps(meta, indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except (OSError, RuntimeError) as e:
        failed = write_failure(out_dir, e, "earlier snapshots and the last checkpoint are intact")
        shutil.rmtree(tmp, ignore_errors=True)
        if failed is not None:
            raise failed from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if timings is not None:
        timings["hash_s"] = hash_s
    return meta


def write_scores(out_dir, scores: dict, updates: dict) -> dict:
    """Rank 0 only: store per-token probabilities ({"fitness": T, "val": T}) and mark the snapshot scored."""
    out_dir = Path(out_dir)
    for name, p in scores.items():
        tmp = out_dir / f".{name}.safetensors.tmp"
        try:
            save_safetensors({"p": p.float().contiguous()}, tmp)
            os.replace(tmp, out_dir / f"{name}.safetensors")
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if isinstance(e, OSError):
                raise write_failure(out_dir / f"{name}.safetensors", e) from e
            raise
    meta = read_meta(out_dir)
    meta.update(updates, scored=True)
    meta.update({f"{k}_sha256": sha256_file(out_dir / f"{k}.safetensors") for k in scores})
    atomic_write_text(out_dir / "snapshot.json", json.dumps(meta, indent=2))
    return meta


def read_meta(snap_dir) -> dict:
    p = Path(snap_dir) / "snapshot.json"
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise SnapshotError(f"{p} is missing: {snap_dir} is not a complete snapshot") from None
    except json.JSONDecodeError as e:
        raise SnapshotError(f"{p} is corrupt ({e}); delete the snapshot dir and re-run its cycle") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _restore_hint(snap_dir) -> str:
    """What to do about a damaged config/tokenizer file of a snapshot: copy it back from the prepared data."""
    snap_dir = Path(snap_dir)
    for mix in (snap_dir.parent, snap_dir.parent.parent):               # an exported mixture's tokenizer/ or member
        if (mix / "mixture.json").is_file():
            return f"re-export the mixture (q0ds export-mixture --run RUN --k K --out {mix})"
    run_cfg = snap_dir.parent.parent.parent.parent / "config.json"     # RUN/bases/base-XX/snapshots/cycle-XXXX
    try:
        data = json.loads(run_cfg.read_text())["data"]
        src = f"{Path(data) / 'tokenizer'}/*"
    except (OSError, ValueError, KeyError, TypeError):
        src = "<prepared data dir>/tokenizer/*"
    return (f"copy the tokenizer back from the prepared data (cp {src} {snap_dir}/), or delete {snap_dir} and "
            "re-run its cycle")


def check_files(snap_dir) -> None:
    """The small JSON files a snapshot is loaded by (config.json, the tokenizer's) parse; SnapshotError names
    the first that does not."""
    snap_dir = Path(snap_dir)
    from .files import json_problem
    for name in ("config.json", *TOKENIZER_FILES):
        p = snap_dir / name
        if name != "config.json" and not p.exists():
            continue                  # a tokenizer without a tokenizer.json (slow one): AutoTokenizer decides
        problem = json_problem(p)
        if problem:
            what = "the model config" if name == "config.json" else "the tokenizer"
            hint = ("delete the snapshot dir and re-run its cycle" if name == "config.json"
                    else _restore_hint(snap_dir))
            raise SnapshotError(f"{p} ({what} of snapshot {snap_dir.name}) is unusable: {problem}; {hint}")


def load_tokenizer(snap_dir):
    """The tokenizer of a snapshot (or of any dir saved with save_pretrained), checked: a file that does not
    parse or load is a SnapshotError naming it and the fix, never a JSONDecodeError traceback. Every command
    that loads a snapshot's tokenizer goes through here."""
    from transformers import AutoTokenizer
    snap_dir = Path(snap_dir)
    from .files import json_problem
    for name in TOKENIZER_FILES:
        p = snap_dir / name
        if p.exists():
            problem = json_problem(p)
            if problem:
                raise SnapshotError(f"{p} (the tokenizer of {snap_dir}) is unusable: {problem}; {_restore_hint(snap_dir)}")
    try:
        return AutoTokenizer.from_pretrained(snap_dir, local_files_only=True)
    except Exception as e:
        raise SnapshotError(f"the tokenizer in {snap_dir} could not be loaded ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]}); {_restore_hint(snap_dir)}") from e


def verify(snap_dir) -> dict:
    """Check the weights' sha256 against snapshot.json (corrupt or tampered files are refused), and that its
    config and tokenizer files parse."""
    meta = read_meta(snap_dir)
    check_files(snap_dir)
    weights = Path(snap_dir) / "model.safetensors"
    if not weights.is_file():
        raise SnapshotError(f"{weights} is missing; the snapshot is incomplete")
    digest = sha256_file(weights)
    if digest != meta.get("sha256"):
        raise SnapshotError(f"{weights} is corrupt: sha256 {digest[:12]}... does not match snapshot.json "
                            f"({str(meta.get('sha256'))[:12]}...); delete {snap_dir} and re-run that cycle "
                            "(relaunching the base re-creates it from its checkpoints) or exclude it")
    return meta


def load_scores(snap_dir, name: str, check_hash: bool = True) -> torch.Tensor:
    from safetensors.torch import load_file
    meta = read_meta(snap_dir)
    path = Path(snap_dir) / f"{name}.safetensors"
    if not path.is_file():
        raise SnapshotError(f"{path} is missing: snapshot {snap_dir} was not scored on the {name} set")
    if check_hash and meta.get(f"{name}_sha256") not in (None, sha256_file(path)):
        raise SnapshotError(f"{path} is corrupt (sha256 mismatch with snapshot.json); delete it to re-score")
    return load_file(path)["p"]


_WARNED: set = set()                 # non-member dirs already reported by this process (one line each)


def is_canonical(path) -> bool:
    """Is PATH named exactly as the trainer names a member: bases/base-XX/snapshots/cycle-XXXX (zero-padded)?"""
    snap, base = Path(path).name, Path(path).parent.parent.name
    return (re.fullmatch(r"cycle-\d{4,}", snap) is not None and snap == f"cycle-{int(snap[6:]):04d}"
            and re.fullmatch(r"base-\d{2,}", base) is not None and base == f"base-{int(base[5:]):02d}")


def list_snapshots(run_dir, scored_only: bool = True) -> list[Path]:
    """Complete snapshot dirs of every base of a run, ordered by (base, cycle). Only canonical names are members
    (temp dirs, a user's copy `cycle-0002.bak` or `base-00-old` are not: one warning line names what is
    ignored); two members with the same weights (sha256 in snapshot.json: one is a copy) are refused."""
    out, ignored = [], []
    for d in sorted(Path(run_dir).glob("bases/*/snapshots/*")):
        if not d.is_dir() or d.name.startswith("."):
            continue
        if not is_canonical(d):
            if (d / "snapshot.json").is_file() or (d / "model.safetensors").is_file():
                ignored.append(d)
            continue
        if not (d / "snapshot.json").is_file():
            continue
        if scored_only and not read_meta(d).get("scored"):
            continue
        out.append(d)
    fresh = [d for d in ignored if d not in _WARNED]
    if fresh:
        _WARNED.update(fresh)
        print(f"[q0ds] warning: ignoring {len(fresh)} dir(s) under {Path(run_dir)}/bases that are not named like "
              f"a snapshot (bases/base-XX/snapshots/cycle-XXXX): {', '.join(str(d) for d in fresh)}; they are not "
              "population members (move them out of the run dir to silence this)", file=sys.stderr, flush=True)
    seen: dict = {}
    for d in out:
        digest = read_meta(d).get("sha256")
        if digest in seen:
            raise SnapshotError(f"{d} and {seen[digest]} hold the same weights (sha256 {str(digest)[:12]}...): one is "
                                "a copy and would be counted twice as a member; delete the copy (or move it out of "
                                f"{Path(run_dir)}/bases) and run the command again")
        if digest is not None:
            seen[digest] = d
    return out


def member_id(snap_dir) -> str:
    d = Path(snap_dir)
    return f"{d.parent.parent.name}/{d.name}"


# ---------------------------------------------------------------- scoring
@torch.no_grad()
def token_logprobs(model, windows, mask, batch: int, rank: int = 0, world: int = 1, device=None) -> torch.Tensor:
    """log p(true next token) at every masked position of `windows` ([n, seq+1]), in order, on every rank
    (a host tensor). Windows are sharded over ranks; every rank runs the same number of forwards (ZeRO-3
    gathers parameters collectively, so an idle rank would hang the others), padding with repeats. The
    per-rank results are gathered on `device` (the engine's; default: the model's first parameter's)."""
    from .engine import all_gather_cat
    n, seq = windows.shape[0], windows.shape[1] - 1
    per = math.ceil(n / world)
    mine = list(range(rank * per, min(n, (rank + 1) * per)))
    device = device or next(iter(model.parameters())).device
    out = torch.zeros(per, seq, dtype=torch.float32, device=device)
    for start in range(0, per, batch):
        idx = [mine[i] if i < len(mine) else 0 for i in range(start, min(per, start + batch))]
        w = windows[idx].to(device)
        logits = model(input_ids=w[:, :-1]).logits.float()
        lp = logits.gather(-1, w[:, 1:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        out[start:start + len(idx)] = lp
    out = all_gather_cat(out, device)            # a no-op at world size 1 (unless Q0DS_FORCE_COLLECTIVES=1)
    return out.cpu()[:n][mask]
