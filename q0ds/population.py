"""Run-level population steps: fit the learned prior from stored fitness scores, and evaluate top-K mixtures.

    q0ds fit-prior --run RUN      -> RUN/prior.json   (never loads a model: reads fitness.safetensors)
    q0ds eval --run RUN [--k ...] -> RUN/eval.json    (reads val.safetensors; scores a member from its
                                                       weights, one at a time, only if that file is missing)
Baselines trained beside the run (RUN/baselines/single, RUN/baselines/ensemble) are evaluated on the same
validation tokens and reported in eval.json.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .config import atomic_write_text, read_config_file
from .monitor import log_prior, monitor_config_of
from .prior import default_ks, fit_prior, mixture_nll, read_prior_json, top_k, write_prior_json
from .snapshot import SnapshotError, list_snapshots, load_scores, member_id, read_meta, verify


class PriorError(ValueError):
    pass


def load_member_scores(run, split: str, members=None, check_weights: bool = True, device=None):
    """(ids, metas, P [M, N]) for every scored snapshot of a run (or the given ids), verified. A snapshot without
    val scores is scored from its weights on `device` (devices.resolve_device: default auto)."""
    run = Path(run)
    snaps = list_snapshots(run)
    if members is not None:
        by_id = {member_id(s): s for s in snaps}
        missing = [m for m in members if m not in by_id]
        if missing:
            raise PriorError(f"prior.json names members that are not in {run}: {missing[:3]}; re-run `q0ds fit-prior`")
        snaps = [by_id[m] for m in members]
    if not snaps:
        raise PriorError(f"no scored snapshots under {run}/bases/*/snapshots: train the bases first "
                         "(`q0ds run --config ...` or the SLURM array)")
    metas, rows = [], []
    for s in snaps:
        meta = verify(s) if check_weights else read_meta(s)
        if split == "val" and not (s / "val.safetensors").is_file():
            score_member_from_weights(s, run, device=device)
            meta = read_meta(s)
        if split == "fitness" and not (s / "fitness.safetensors").is_file():
            raise PriorError(f"{s / 'fitness.safetensors'} is missing: snapshot {member_id(s)} was never scored on "
                             f"the fitness set. Score it with `q0ds rescore --run {run} --member {member_id(s)}`, or "
                             f"exclude it by moving {s} out of {run}/bases, then run fit-prior again")
        rows.append(load_scores(s, split))
        metas.append(meta)
    fps = {m.get(f"{split}_fingerprint") for m in metas}
    if len(fps) > 1:
        raise PriorError(f"snapshots of {run} were scored on different {split} sets ({len(fps)} fingerprints); "
                         "all bases must use the same prepared data and seq_len")
    lengths = {len(r) for r in rows}
    if len(lengths) > 1:
        raise PriorError(f"snapshots of {run} have {split} scores of different lengths {sorted(lengths)}; "
                         "they were scored on different data")
    return [member_id(s) for s in snaps], metas, torch.stack(rows)


def fit_prior_run(run, steps: int = 300, lr: float = 0.5) -> dict:
    run = Path(run)
    ids, metas, P = load_member_scores(run, "fitness")
    t0 = time.time()
    fit = fit_prior(P, steps=steps, lr=lr, clip=1.0)
    extra = {"fitness_tokens": int(P.shape[1]), "fitness_fingerprint": metas[0].get("fitness_fingerprint"),
             "fit_seconds": round(time.time() - t0, 3), "lr": lr}
    write_prior_json(run / "prior.json", ids, fit, extra=extra)
    mcfg = monitor_config_of(run)
    if mcfg.tensorboard or mcfg.wandb:
        curve = {}                                   # the top-K curve: weighted top-K mixture NLL on fitness
        for k in default_ks(len(ids)):
            idx, w = _topk(fit.weights, k)
            curve[k] = mixture_nll(P[idx], w)
        log_prior(run, mcfg, read_prior_json(run / "prior.json"), curve)
    print(f"[q0ds] prior over {len(ids)} members on {P.shape[1]} fitness tokens: NLL {fit.loss:.4f} "
          f"(uniform {fit.baselines['uniform']:.4f}, best single {fit.baselines['best_single']:.4f}); "
          f"{run / 'prior.json'}")
    return read_prior_json(run / "prior.json")


def topk_weights(weights, k):
    """(indices, renormalised weights) of the K heaviest members; a K the prior cannot give is a PriorError."""
    try:
        return top_k(weights, k)
    except ValueError as e:
        raise PriorError(str(e)) from None


_topk = topk_weights               # the former private name


def eval_run(run, ks=None, device=None) -> dict:
    """Validation NLL of the weighted top-K mixture for each K, the uniform top-K and uniform-all ablations,
    the best single member (by val: an oracle choice), and the baselines when present."""
    from .devices import resolve_device
    resolve_device(device)                                    # a bad --device fails before any work
    run = Path(run)
    if not (run / "prior.json").is_file():
        raise PriorError(f"{run / 'prior.json'} not found: run `q0ds fit-prior --run {run}` first")
    prior = read_prior_json(run / "prior.json")
    ids, metas, V = load_member_scores(run, "val", members=prior["members"], device=device)
    M = len(ids)
    ks = sorted(set(ks or default_ks(M)))
    for k in ks:
        topk_weights(prior["weights"], k)                      # refuse k > M before any work
    _, _, F = load_member_scores(run, "fitness", members=ids, check_weights=False)
    singles = [-(V[i].clamp_min(1e-30).log().double().mean().item()) for i in range(M)]
    rows = []
    for k in ks:
        idx, w = topk_weights(prior["weights"], k)
        by_val = sorted(range(M), key=lambda i: singles[i])[:k]
        rows.append({"k": k, "weighted": mixture_nll(V[idx], w), "uniform_topk": mixture_nll(V[idx], [1.0 / k] * k),
                     "fitness_weighted": mixture_nll(F[idx], w),
                     "members": [ids[i] for i in idx], "uniform_best_val_k": mixture_nll(V[by_val], [1.0 / k] * k)})
    best = min(range(M), key=lambda i: singles[i])
    # the headline K is chosen on the FITNESS set (the prior's own data); validation is only reported
    k_fit = min(rows, key=lambda r: (r["fitness_weighted"], r["k"]))["k"]
    out = {"members": M, "val_tokens": int(V.shape[1]), "topk": rows, "k_on_fitness": k_fit,
           "uniform_all": mixture_nll(V, [1.0 / M] * M),
           "best_single": {"member": ids[best], "val_loss": singles[best]},
           "last_snapshot_per_base": _last_per_base(ids, singles),
           "singles": dict(zip(ids, singles)),
           "epochs_spent": epochs_spent(run),
           "curve": population_curve(run),
           "baselines": eval_baselines(run)}
    atomic_write_text(run / "eval.json", json.dumps(out, indent=2))
    _print_eval(run, out)
    return out


def _last_per_base(ids, singles):
    last = {}
    for i, m in enumerate(ids):
        last[m.split("/")[0]] = {"member": m, "val_loss": singles[i]}
    return last


def epochs_spent(run) -> float:
    """Training epochs summed over all bases (the budget q0 is charged)."""
    total = 0.0
    for base in sorted(Path(run).glob("bases/base-*")):
        snaps = [s for s in list_snapshots(run, scored_only=False) if s.parent.parent == base]
        if snaps:
            total += read_meta(snaps[-1])["epoch"]
    return total


def population_curve(run, steps: int = 300, lr: float = 0.5) -> list[dict]:
    """q0's val loss as the budget grows: after cycle c of every base, fit the prior on the snapshots so far
    (fitness set; the same fit settings as fit_prior_run, the final one) and evaluate the full weighted mixture
    on val. One point per cycle index."""
    ids, metas, F = load_member_scores(run, "fitness", check_weights=False)
    _, _, V = load_member_scores(run, "val", members=ids, check_weights=False)
    out = []
    for c in sorted({m["cycle"] for m in metas}):
        sel = [i for i, m in enumerate(metas) if m["cycle"] <= c]
        fit = fit_prior(F[sel], steps=steps, lr=lr, clip=1.0)
        epochs = sum(max(m["epoch"] for m in metas if m["base"] == b and m["cycle"] <= c)
                     for b in {metas[i]["base"] for i in sel})
        out.append({"cycle": c, "epochs": epochs, "members": len(sel), "val_loss": mixture_nll(V[sel], fit.weights)})
    return out


def eval_baselines(run) -> dict:
    """Single-model and independent-ensemble baselines trained under RUN/baselines/ (same data and eval)."""
    out = {}
    single = Path(run) / "baselines" / "single"
    if list_snapshots(single):
        ids, metas, V = load_member_scores(single, "val", check_weights=False)
        curve = [{"epochs": m["epoch"], "val_loss": m["val_loss"]} for m in metas]
        best = min(curve, key=lambda r: r["val_loss"])
        out["single"] = {"curve": curve, "best_val_loss": best["val_loss"], "saturation_epoch": best["epochs"],
                         "final_val_loss": curve[-1]["val_loss"], "epochs": curve[-1]["epochs"]}
    ens = Path(run) / "baselines" / "ensemble"
    if list_snapshots(ens):
        ids, metas, V = load_member_scores(ens, "val", check_weights=False)
        bases = sorted({m["base"] for m in metas})
        curve = []
        for c in sorted({m["cycle"] for m in metas}):
            sel = [i for i, m in enumerate(metas) if m["cycle"] == c]
            if len(sel) == len(bases):
                curve.append({"epochs": sum(metas[i]["epoch"] for i in sel), "members": len(sel),
                              "val_loss": mixture_nll(V[sel], [1.0 / len(sel)] * len(sel))})
        out["ensemble"] = {"curve": curve, "members": len(bases), "final_val_loss": curve[-1]["val_loss"],
                           "epochs": curve[-1]["epochs"]}
    return out


def epochs_to_match(q0_curve, baseline_loss: float, baseline_epochs: float):
    """q0 budget at which its per-cycle curve reaches the baseline's loss, interpolated in log-epochs
    (q0ds.metrics.epochs_to_match); ratio = baseline budget / that budget (None if never reached)."""
    from .metrics import match_ratio
    m = match_ratio(baseline_epochs, [(r["epochs"], r["val_loss"]) for r in q0_curve], baseline_loss)
    return {"q0_epochs": m["epochs"], "ratio": m["ratio"], "lower_bound": m["lower_bound"]}


def _print_eval(run, out):
    print(f"[q0ds] eval of {out['members']} members on {out['val_tokens']} val tokens ({run / 'eval.json'}):")
    for r in out["topk"]:
        print(f"  K={r['k']:>3}  weighted {r['weighted']:.4f}   uniform top-K {r['uniform_topk']:.4f}")
    print(f"  uniform over all {out['uniform_all']:.4f}; best single {out['best_single']['val_loss']:.4f} "
          f"({out['best_single']['member']})")
    for name, b in out["baselines"].items():
        print(f"  baseline {name}: final {b['final_val_loss']:.4f} at {b['epochs']:.1f} epochs"
              + (f", best {b['best_val_loss']:.4f} at epoch {b['saturation_epoch']:.1f}" if "best_val_loss" in b else ""))


def score_member_from_weights(snap_dir, run, splits=("val",), device=None):
    """Score a snapshot from its weights (one model in memory) on the run's SPLITS and store the scores: the
    fallback when a snapshot has no cached val scores, and `q0ds rescore`. The scoring sets are rebuilt from
    the run's prepared data and must match the fingerprints the trainer recorded. The model goes to `device`
    (devices.resolve_device: auto = the GPU if torch sees one) in devices.inference_dtype (bf16 on CUDA)."""
    from transformers import AutoModelForCausalLM
    from .devices import inference_dtype, resolve_device
    from .data import PreparedData
    from .snapshot import token_logprobs, windows_fingerprint, write_scores
    cfg = read_config_file(Path(run) / "config.json")
    data = PreparedData.open(cfg["data"])
    meta = verify(snap_dir)
    dev = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(snap_dir, local_files_only=True,
                                                 dtype=inference_dtype(dev)).to(dev).eval()
    scores, updates = {}, {}
    for split in splits:
        windows, mask = data.eval_windows(split, cfg["train"]["seq_len"])
        fp = windows_fingerprint((windows, mask))
        if meta.get(f"{split}_fingerprint") not in (None, fp):
            raise PriorError(f"{snap_dir} was scored on a different {split} set than {cfg['data']} gives now; "
                             "rescore it with the prepared data it was trained on")
        lp = token_logprobs(model, windows, mask, batch=cfg["eval"]["batch"])
        scores[split] = lp.exp()
        updates[f"{split}_fingerprint"] = fp
        if split == "val":
            updates["val_loss"] = -lp.double().mean().item()
    write_scores(snap_dir, scores, updates)
    del model


def rescore_run(run, members=None, device=None) -> list[str]:
    """`q0ds rescore`: score the named members (ids like base-00/cycle-0003) on the fitness and val sets, or,
    with no names, every snapshot of RUN that lacks a score file. Returns the ids rescored."""
    from .devices import resolve_device
    resolve_device(device)                                    # a bad --device fails before any work
    run = Path(run)
    snaps = list_snapshots(run, scored_only=False)
    by_id = {member_id(s): s for s in snaps}
    if members:
        unknown = [m for m in members if m not in by_id]
        if unknown:
            raise PriorError(f"no snapshot {unknown[0]} in {run}/bases (members look like base-00/cycle-0003; "
                             f"{len(by_id)} found)")
        todo = [by_id[m] for m in members]
    else:
        todo = [s for s in snaps if not all((s / f"{k}.safetensors").is_file() for k in ("fitness", "val"))]
    for s in todo:
        score_member_from_weights(s, run, splits=("fitness", "val"), device=device)
        print(f"[q0ds] rescored {member_id(s)}: val loss {read_meta(s)['val_loss']:.4f}", flush=True)
    if not todo:
        print(f"[q0ds] every snapshot of {run} has its fitness and val scores; nothing to rescore", flush=True)
    return [member_id(s) for s in todo]
