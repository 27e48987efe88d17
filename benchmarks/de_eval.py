"""Numbers of one finished run of benchmarks/data_efficiency.py, from the scores stored with every snapshot
(val.safetensors / fitness.safetensors: per-token probabilities). Nothing here is chosen on validation except
where a baseline is given an oracle choice in its favour, which is labelled ("best epoch", "best M").

q0 runs are evaluated on their finished prefix (a run still training already gives the smaller budgets), and
cached in <run>/bench_result.json keyed by the number of finished snapshots.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks.common import write_json

PRIOR_STEPS, PRIOR_LR, PRIOR_CLIP = 300, 0.5, 1.0        # the same fit as population.fit_prior_run


def _scores(run_dir, bases=None):
    """(metas, F [M, Nf] or None, V [M, Nv]) of the scored snapshots of a run (optionally some bases)."""
    import torch
    from q0ds.snapshot import list_snapshots, load_scores, read_meta
    snaps = [s for s in list_snapshots(run_dir) if bases is None or read_meta(s)["base"] in bases]
    metas = [read_meta(s) for s in snaps]
    V = torch.stack([load_scores(s, "val") for s in snaps]) if snaps else None
    F = torch.stack([load_scores(s, "fitness") for s in snaps]) if snaps else None
    return metas, F, V


def _nll(p) -> float:
    return -p.clamp_min(1e-30).log().double().mean().item()


def single_curve(run_dir) -> dict:
    """A cosine run scored every epoch: curve, best val (oracle, in its favour), best-on-fitness."""
    metas, F, V = _scores(run_dir)
    ce = json.loads((Path(run_dir) / "config.json").read_text())["schedule"]["cycle_epochs"]   # nominal epochs
    curve = [{"epochs": ce * (m["cycle"] + 1), "epochs_actual": m["epoch"], "val_loss": _nll(V[i]),
              "fitness_loss": _nll(F[i])} for i, m in enumerate(metas)]
    test = _test_losses(run_dir)
    if test is not None:                       # data with a test split: reported, never chosen on
        for r, t in zip(curve, test):
            r["test_loss"] = t
    best = min(curve, key=lambda r: r["val_loss"])
    fit_best = min(curve, key=lambda r: r["fitness_loss"])
    out = {"curve": curve, "best_val_loss": best["val_loss"], "best_epoch": best["epochs"],
           "final_val_loss": curve[-1]["val_loss"], "epochs": curve[-1]["epochs"],
           "val_at_best_fitness_epoch": fit_best["val_loss"], "best_fitness_epoch": fit_best["epochs"]}
    if test is not None:
        out["test_at_best_fitness_epoch"] = fit_best["test_loss"]
    return out


def _test_losses(run_dir) -> list[float] | None:
    """Test NLL of every scored snapshot (list_snapshots order), None unless every one has test scores."""
    from q0ds.snapshot import list_snapshots, load_scores
    snaps = list_snapshots(run_dir)
    if not snaps or not all((s / "test.safetensors").is_file() for s in snaps):
        return None
    return [_nll(load_scores(s, "test")) for s in snaps]


def ensemble_of_first(run_dir, M: int) -> dict:
    """Probability average of the last snapshots of bases 0..M-1 of a pool run."""
    from q0ds.prior import mixture_nll
    metas, F, V = _scores(run_dir, bases=set(range(M)))
    last = {}
    for i, m in enumerate(metas):
        if m["base"] not in last or m["cycle"] > metas[last[m["base"]]]["cycle"]:
            last[m["base"]] = i
    idx = [last[b] for b in sorted(last)]
    assert len(idx) == M, (run_dir, M, sorted(last))
    return {"val_loss": mixture_nll(V[idx], [1.0 / M] * M), "fitness_loss": mixture_nll(F[idx], [1.0 / M] * M),
            "member_val_losses": [_nll(V[i]) for i in idx], "epochs": sum(metas[i]["epoch"] for i in idx)}


def ensemble_fitness_stopped(run_dir, M: int) -> dict:
    """Probability average of bases 0..M-1, each at its snapshot with the lowest FITNESS loss (members stopped at
    their best epoch on fitness, not at their last snapshot); val (and test, when scored) only reported."""
    from q0ds.prior import mixture_nll
    from q0ds.snapshot import list_snapshots, load_scores, read_meta
    metas, F, V = _scores(run_dir, bases=set(range(M)))
    best = {}
    for i, m in enumerate(metas):
        f = _nll(F[i])
        if m["base"] not in best or f < best[m["base"]][1]:
            best[m["base"]] = (i, f)
    idx = [best[b][0] for b in sorted(best)]
    assert len(idx) == M, (run_dir, M, sorted(best))
    out = {"val_loss": mixture_nll(V[idx], [1.0 / M] * M), "fitness_loss": mixture_nll(F[idx], [1.0 / M] * M),
           "member_epochs_chosen": [metas[i]["epoch"] for i in idx],
           "epochs": sum(max(m["epoch"] for m in metas if m["base"] == b) for b in best)}
    snaps = [s for s in list_snapshots(run_dir) if read_meta(s)["base"] in set(range(M))]
    if all((snaps[i] / "test.safetensors").is_file() for i in idx):
        out["test_loss"] = mixture_nll(torch_stack([load_scores(snaps[i], "test") for i in idx]), [1.0 / M] * M)
    return out


def torch_stack(xs):
    import torch
    return torch.stack(xs)


def snapshot_logits(run_dir, snap):
    """logits(split) -> (z [N, vocab], y [N]) of a snapshot over a whole split of its run's data, in the order of
    the score files (eval_windows' labels, padding dropped)."""
    import torch
    from transformers import AutoModelForCausalLM
    from q0ds.data import PreparedData
    cfg = json.loads((Path(run_dir) / "config.json").read_text())
    data = PreparedData.open(cfg["data"])
    model = AutoModelForCausalLM.from_pretrained(snap, local_files_only=True).eval()

    def logits(split):
        w, mask = data.eval_windows(split, cfg["train"]["seq_len"])
        zs, ys = [], []
        with torch.no_grad():
            for i in range(0, len(w), 16):
                z = model(input_ids=w[i:i + 16, :-1]).logits.float()
                zs.append(z[mask[i:i + 16]])
                ys.append(w[i:i + 16, 1:][mask[i:i + 16]])
        return torch.cat(zs), torch.cat(ys)
    logits.has_test = "test" in data.meta["splits"]
    return logits


def nll_at(z, y, T: float) -> float:
    """NLL of softmax(z / T) at labels y."""
    import torch
    return torch.nn.functional.cross_entropy(z / T, y).item()


def fit_temperature(z, y) -> float:
    """The softmax temperature minimising the NLL of (z, y), searched over log T in [-2, 2]."""
    import torch
    from scipy.optimize import minimize_scalar
    return float(torch.exp(torch.tensor(minimize_scalar(lambda lt: nll_at(z, y, math.exp(lt)), bounds=(-2.0, 2.0),
                                                        method="bounded").x)))


def temperature_calibrated(run_dir) -> dict:
    """The single model at its best FITNESS epoch with one softmax temperature fitted on the fitness set
    (minimises fitness NLL of softmax(z / T)); val (and test) NLL at that T. Loads the snapshot's weights."""
    from q0ds.snapshot import list_snapshots, load_scores, read_meta
    snaps = list_snapshots(run_dir)
    fit = [_nll(load_scores(s, "fitness")) for s in snaps]
    snap = snaps[min(range(len(snaps)), key=fit.__getitem__)]
    logits = snapshot_logits(run_dir, snap)
    zf, yf = logits("fitness")
    T = fit_temperature(zf, yf)
    zv, yv = logits("val")
    out = {"snapshot": read_meta(snap)["epoch"], "temperature": T, "fitness_loss": nll_at(zf, yf, 1.0),
           "fitness_loss_calibrated": nll_at(zf, yf, T), "val_loss": nll_at(zv, yv, 1.0),
           "val_loss_calibrated": nll_at(zv, yv, T)}
    if logits.has_test:
        zt, yt = logits("test")
        out.update(test_loss=nll_at(zt, yt, 1.0), test_loss_calibrated=nll_at(zt, yt, T))
    return out


def _fit(F, V):
    from q0ds.prior import fit_prior, mixture_nll
    fit = fit_prior(F, steps=PRIOR_STEPS, lr=PRIOR_LR, clip=PRIOR_CLIP)
    return fit.weights, mixture_nll(V, fit.weights)


def _topk_on_fitness(F, V, weights) -> dict:
    """K for the headline chosen on the FITNESS set (weighted top-K, renormalised); val only reported."""
    from q0ds.prior import default_ks, mixture_nll, top_k
    rows = []
    for k in default_ks(F.shape[0]):
        idx, w = top_k(weights, k)
        rows.append({"k": k, "fitness_loss": mixture_nll(F[idx], w), "val_loss": mixture_nll(V[idx], w)})
    best = min(rows, key=lambda r: r["fitness_loss"])
    return {"k": best["k"], "val_loss": best["val_loss"], "rows": rows}


def q0_curve(run_dir, detail_epochs=(), fitness_sizes=()) -> dict:
    """Per cycle c: prior refitted on the fitness set over the snapshots of cycles <= c (the final fit's
    settings), val loss of the weighted all-member mixture and of the uniform mixture. At `detail_epochs`
    also: K chosen on fitness, and the prior's gain over uniform when fitted on the first n fitness tokens."""
    from q0ds.prior import mixture_nll
    run_dir = Path(run_dir)
    metas, F, V = _scores(run_dir)
    cache = run_dir / "bench_result.json"
    key = {"snapshots": len(metas), "detail_epochs": sorted(detail_epochs), "fitness_sizes": sorted(fitness_sizes)}
    if cache.is_file():
        c = json.loads(cache.read_text())
        if c.get("key") == key:
            return c["result"]
    sched = json.loads((run_dir / "config.json").read_text())["schedule"]
    lens = sched["cycle_epochs"] if isinstance(sched["cycle_epochs"], list) else [sched["cycle_epochs"]] * sched["cycles"]
    curve = []
    for c in sorted({m["cycle"] for m in metas}):
        sel = [i for i, m in enumerate(metas) if m["cycle"] <= c]
        w, val = _fit(F[sel], V[sel])
        ep = sum(lens[:c + 1])                 # nominal; the trainer rounds cycles to whole steps (13 steps
        row = {"cycle": c, "epochs": ep,       # of 12.66 per 1-epoch cycle here: 1.027 epochs), see epochs_actual
               "epochs_actual": max(metas[i]["epoch"] for i in sel), "members": len(sel), "val_loss": val,
               "uniform_val_loss": mixture_nll(V[sel], [1.0 / len(sel)] * len(sel)),
               "last_snapshot_val_loss": _nll(V[sel[-1]])}
        if any(abs(ep - e) < 1e-6 * max(1.0, e) for e in detail_epochs):
            row["topk_on_fitness"] = _topk_on_fitness(F[sel], V[sel], w)
            row["prior_gain_by_fitness_tokens"] = {}
            for n in sorted(fitness_sizes):
                if n <= F.shape[1]:
                    _, v = _fit(F[sel][:, :n], V[sel])
                    row["prior_gain_by_fitness_tokens"][str(n)] = row["uniform_val_loss"] - v
        curve.append(row)
    out = {"curve": curve, "fitness_tokens": int(F.shape[1]), "val_tokens": int(V.shape[1])}
    write_json(cache, {"key": key, "result": out})
    return out


def at_epochs(curve, E: float):
    """The curve row at exactly E nominal epochs (a prefix budget), or None if the run has not reached it."""
    for r in curve:
        if abs(r["epochs"] - E) < 1e-6 * max(1.0, E):
            return r
    return None
