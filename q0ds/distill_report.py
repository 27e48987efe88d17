"""The report of `q0ds distill-ensemble` (moved from ensemble_distill.py; that module re-exports every name):
RUN/distilled/kK/distill_report.{json,png} and the printed summary. distill_summary(run, k) -> dict: the
student's val loss vs the best single member and the top-K mixture, the fraction of the gain retained, the cost."""
from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError, atomic_write_text, read_config_file


def distill_summary(run, k: int, out=None) -> dict:
    """Val loss of the distilled student vs the best single member and the top-K mixture (RUN/eval.json when
    it has them, else recomputed from the members' stored val scores), the fraction of the ensemble's gain
    retained = (best_single - distilled) / (best_single - mixture), and the cost in epochs."""
    from .population import epochs_spent, load_member_scores
    from .prior import mixture_nll
    from .ensemble_distill import SPEC, out_dir
    run = Path(run)
    out = Path(out) if out else out_dir(run, k)
    spec = json.loads((out / SPEC).read_text())
    bdir = base_dir_of(out)
    snaps = sorted(bdir.glob("snapshots/cycle-*/snapshot.json"))
    if not snaps:
        raise ConfigError(f"no snapshots under {bdir}: run `q0ds distill-ensemble --run {run} --k {k}` first")
    metas = [json.loads(p.read_text()) for p in snaps]
    last = metas[-1]
    ev = json.loads((run / "eval.json").read_text()) if (run / "eval.json").is_file() else {}
    row = next((r for r in ev.get("topk", []) if r["k"] == k and r["members"] == spec["members"]), None)
    ids, member_metas, V = load_member_scores(run, "val", members=spec["members"], check_weights=False)
    mixture = row["weighted"] if row else mixture_nll(V, spec["weights"])
    if "best_single" in ev:
        best_id, best = ev["best_single"]["member"], ev["best_single"]["val_loss"]
    else:
        all_ids, _, VA = load_member_scores(run, "val", check_weights=False)
        losses = [-(VA[i].clamp_min(1e-30).log().double().mean().item()) for i in range(len(all_ids))]
        best_id, best = min(zip(all_ids, losses), key=lambda t: t[1])
    distilled = last["val_loss"]
    gain = best - mixture
    epochs = last["epoch"]
    seconds = _train_seconds(out)
    return {
        "run": str(run), "k": k, "out": str(out), "complete": (bdir / "done.json").is_file(),
        "members": spec["members"], "weights": spec["weights"], "init": spec["init"],
        "alpha": spec["alpha"], "temperature": spec["temperature"],
        "snapshot": str(snaps[-1].parent),
        "val_loss": {"distilled": distilled, "best_single": best, "best_single_member": best_id,
                     "mixture": mixture, "top1_member": _single(V, 0)},
        "gain_nats": {"ensemble_over_best_single": gain, "distilled_over_best_single": best - distilled},
        "fraction_retained": (best - distilled) / gain if gain > 0 else None,
        "cost": {"student_epochs": epochs, "teacher_member_forward_epochs": epochs * k if spec["alpha"] > 0 else 0.0,
                 "q0_epochs": ev.get("epochs_spent", epochs_spent(run)), "steps": last["step"], "train_seconds": seconds,
                 "inference_forwards": {"distilled": 1, "mixture": k}},
        "curve": [{"cycle": m["cycle"], "epoch": m["epoch"], "val_loss": m["val_loss"]} for m in metas],
        "same_val_set": last.get("val_fingerprint") == member_metas[0].get("val_fingerprint"),
    }


def base_dir_of(out: Path) -> Path:
    return Path(out) / "bases" / "base-00"


def _single(V, i: int) -> float:
    return -(V[i].clamp_min(1e-30).log().double().mean().item())


def _train_seconds(out: Path):
    """Wall seconds in training steps (from metrics.jsonl's tokens/s; excludes startup, snapshots, scoring)."""
    metrics = base_dir_of(out) / "metrics.jsonl"
    if not metrics.is_file():
        return None
    seq = read_config_file(out / "config.json")["train"]["seq_len"]
    recs = [json.loads(l) for l in metrics.read_text().splitlines() if l.startswith('{"step"')]
    return round(sum(r["batch"] * seq / r["tokens_per_s"] for r in recs if r.get("tokens_per_s")), 1)


def write_distill_report(run, k: int, out=None) -> dict:
    from .ensemble_distill import out_dir
    out = Path(out) if out else out_dir(run, k)
    s = distill_summary(run, k, out)
    atomic_write_text(out / "distill_report.json", json.dumps(s, indent=2) + "\n")
    plot_summary(s, out / "distill_report.png")
    return s


def plot_summary(s: dict, path: Path):
    from .report import pyplot, save_figure
    plt = pyplot()
    v = s["val_loss"]
    names = ["best single\nmember", "distilled\n(1 forward)", f"top-{s['k']} mixture\n({s['k']} forwards)"]
    vals = [v["best_single"], v["distilled"], v["mixture"]]
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    bars = ax.bar(names, vals, color=["C7", "C2", "C0"])
    for b, x in zip(bars, vals):
        ax.text(b.get_x() + b.get_width() / 2, x, f"{x:.4f}", ha="center", va="bottom", fontsize=9)
    lo, hi = min(vals), max(vals)
    ax.set_ylim(lo - 0.6 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
    frac = s["fraction_retained"]
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Ensemble distillation, K={s['k']}: {s['cost']['student_epochs']:.1f} epochs, "
                 f"gain retained {frac:.0%}" if frac is not None else f"Ensemble distillation, K={s['k']}")
    save_figure(fig, path)


def format_summary(s: dict) -> str:
    v, c = s["val_loss"], s["cost"]
    frac = s["fraction_retained"]
    return "\n".join([
        f"[q0ds] distilled top-{s['k']} mixture into one model: {s['snapshot']}",
        f"  val loss  best single member {v['best_single']:.4f} ({v['best_single_member']})",
        f"            distilled student  {v['distilled']:.4f}  (1 forward pass)",
        f"            top-{s['k']} mixture     {v['mixture']:.4f}  ({s['k']} forward passes)",
        f"  gain retained: {frac:.1%}" if frac is not None else "  gain retained: n/a (the mixture does not beat the best member)",
        f"  cost: {c['student_epochs']:.2f} student epochs, {c['teacher_member_forward_epochs']:.1f} epochs of "
        f"member forwards (teacher); the q0 population cost {c['q0_epochs']:.2f} epochs",
        f"  report: {Path(s['out']) / 'distill_report.json'}"])
