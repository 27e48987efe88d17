"""`q0ds report --run RUN`: report.md + report.json + plots/*.png from eval.json, prior.json and metrics.

Plots: val loss vs epochs spent (single model, ensemble baseline, q0), val loss vs K (weighted vs uniform),
prior weights per base and cycle, the LR/WD schedule of base 0.
"""
from __future__ import annotations

import json
from pathlib import Path

from .config import atomic_write_text
from .population import epochs_to_match


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Lay out, write (creating the dir) and close a figure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def plot_val_vs_epochs(ev, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    b = ev["baselines"]
    if "single" in b:
        c = b["single"]["curve"]
        ax.plot([r["epochs"] for r in c], [r["val_loss"] for r in c], "o-", ms=3, label="single model (cosine)")
    if "ensemble" in b:
        c = b["ensemble"]["curve"]
        ax.plot([r["epochs"] for r in c], [r["val_loss"] for r in c], "s-", ms=4,
                label=f"independent ensemble ({b['ensemble']['members']} models)")
    c = ev["curve"]
    ax.plot([r["epochs"] for r in c], [r["val_loss"] for r in c], "D-", ms=4, label="q0 (learned prior, all members)")
    ax.set_xlabel("epochs spent (all models)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Validation loss vs training budget")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def plot_val_vs_k(ev, path):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ks = [r["k"] for r in ev["topk"]]
    ax.plot(ks, [r["weighted"] for r in ev["topk"]], "o-", label="top-K, prior weights")
    ax.plot(ks, [r["uniform_topk"] for r in ev["topk"]], "s--", label="top-K, uniform weights")
    ax.axhline(ev["best_single"]["val_loss"], color="gray", ls=":", label="best single q0 member")
    for name, b in ev["baselines"].items():
        v = b.get("best_val_loss", b["final_val_loss"])
        ax.axhline(v, ls="-.", lw=1, color="C3" if name == "single" else "C4", label=f"{name} baseline")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K (members used at inference)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("Any inference budget: val loss vs K")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def plot_prior_weights(prior, path):
    plt = pyplot()
    by_base: dict[str, list] = {}
    for m, w in zip(prior["members"], prior["weights"]):
        base, cyc = m.split("/")
        by_base.setdefault(base, []).append((int(cyc.split("-")[1]), w))
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    width = 0.8 / max(1, len(by_base))
    for i, (base, rows) in enumerate(sorted(by_base.items())):
        ax.bar([c + i * width for c, _ in rows], [w for _, w in rows], width=width, label=base)
    ax.set_xlabel("cycle")
    ax.set_ylabel("prior weight")
    ax.set_title("Learned prior: weight of each snapshot")
    ax.legend()
    save_figure(fig, path)


def plot_schedule(metrics_path, path):
    plt = pyplot()
    recs = [json.loads(l) for l in Path(metrics_path).read_text().splitlines() if l.startswith('{"step"')]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    steps = [r["step"] for r in recs]
    ax.plot(steps, [r["lr_mult"] for r in recs], label="LR multiplier")
    ax.plot(steps, [r["wd_mult"] for r in recs], label="WD multiplier")
    distilled = [r["step"] for r in recs if r.get("distilled")]
    if distilled:
        ax.axvspan(distilled[0] - 0.5, distilled[-1] + 0.5, color="C2", alpha=0.08)
    ax.set_xlabel("optimizer step (base 0)")
    ax.set_title("Sawtooth LR with anti-phase WD (green: distilled steps)")
    ax.legend()
    save_figure(fig, path)


def headline(ev) -> dict:
    """The run's headline. K is chosen on the FITNESS set (eval.json's k_on_fitness; validation is only
    reported); q0 is compared with each baseline and with the stronger of the two ("strongest"), with
    epochs-to-match interpolated in log-epochs on q0's per-cycle curve (q0ds.metrics)."""
    rows = {r["k"]: r for r in ev["topk"]}
    k = ev.get("k_on_fitness") or max(rows)             # old eval.json without fitness rows: all members
    h = {"q0_topk": {"k": k, "val_loss": rows[k]["weighted"], "chosen_on": "fitness set"},
         "q0_all_members": rows[max(rows)]["weighted"],
         "q0_best_single_member": ev["best_single"]["val_loss"], "q0_epochs": ev["epochs_spent"]}
    h["q0_best_topk"] = h["q0_topk"]                    # old key, kept for readers of report.json
    b, q = ev["baselines"], h["q0_topk"]["val_loss"]
    losses = {}
    if "single" in b:
        h["single_model_best"] = losses["single"] = b["single"]["best_val_loss"]
        h["single_saturation_epoch"] = b["single"]["saturation_epoch"]
        h["epochs_to_match_single"] = epochs_to_match(ev["curve"], b["single"]["best_val_loss"], b["single"]["epochs"])
    if "ensemble" in b:
        h["ensemble_baseline"] = losses["ensemble"] = b["ensemble"]["final_val_loss"]
        h["epochs_to_match_ensemble"] = epochs_to_match(ev["curve"], b["ensemble"]["final_val_loss"], b["ensemble"]["epochs"])
    if losses:
        name = min(losses, key=losses.get)
        h["strongest_baseline"] = {"name": name, "val_loss": losses[name]}
        h["epochs_to_match_strongest"] = h[f"epochs_to_match_{name}"]
        h["q0_beats_strongest"] = q < losses[name]
    h["q0_beats_best_member"] = q < ev["best_single"]["val_loss"]
    h["q0_beats_single_model"] = "single" in b and q < b["single"]["best_val_loss"]
    h["q0_beats_ensemble"] = "ensemble" in b and q < b["ensemble"]["final_val_loss"]
    return h


def _etm(e) -> str:
    if not e or e.get("ratio") is None:
        return "q0 does not reach it within its budget"
    lb = ">= " if e.get("lower_bound") else ""
    return f"q0 reaches it at {e['q0_epochs']:.1f} epochs: **{lb}{e['ratio']:.2f}x**" + (
        " (q0 is SLOWER)" if e["ratio"] < 1 else " fewer")


def write_report(run) -> Path:
    run = Path(run)
    for f in ("eval.json", "prior.json"):
        if not (run / f).is_file():
            from .population import PriorError
            raise PriorError(f"{run / f} not found: run `q0ds fit-prior` and `q0ds eval` first")
    ev = json.loads((run / "eval.json").read_text())
    prior = json.loads((run / "prior.json").read_text())
    plots = run / "plots"
    plot_val_vs_epochs(ev, plots / "val_vs_epochs.png")
    plot_val_vs_k(ev, plots / "val_vs_k.png")
    plot_prior_weights(prior, plots / "prior_weights.png")
    metrics = run / "bases" / "base-00" / "metrics.jsonl"
    if metrics.is_file():
        plot_schedule(metrics, plots / "schedule.png")
    h = headline(ev)
    rep = {"headline": h, "eval": ev, "prior": {k: prior[k] for k in ("members", "weights", "fit_loss", "chosen", "baselines")},
           "plots": sorted(str(p.relative_to(run)) for p in plots.glob("*.png"))}
    atomic_write_text(run / "report.json", json.dumps(rep, indent=2))
    atomic_write_text(run / "report.md", _markdown(run, ev, prior, h, rep["plots"]))
    return run / "report.md"


def _markdown(run, ev, prior, h, plots) -> str:
    L = [f"# q0ds report: `{run}`", "",
         f"{ev['members']} snapshots over {len({m.split('/')[0] for m in prior['members']})} base(s), "
         f"{ev['epochs_spent']:.1f} epochs spent; validation set {ev['val_tokens']} tokens. Loss in nats/token.", "",
         "## Headline", "",
         f"- q0 top-{h['q0_topk']['k']} mixture (K chosen on the fitness set): **{h['q0_topk']['val_loss']:.4f}**"
         f" (all {ev['members']} members: {h['q0_all_members']:.4f})",
         f"- best single q0 member: {h['q0_best_single_member']:.4f}"]
    if "single_model_best" in h:
        L.append(f"- single model baseline, best epoch ({h['single_saturation_epoch']:.1f}; chosen on validation, in its "
                 f"favour): {h['single_model_best']:.4f}; epochs-to-match: {_etm(h['epochs_to_match_single'])}")
    if "ensemble_baseline" in h:
        L.append(f"- independent ensemble baseline: {h['ensemble_baseline']:.4f}; epochs-to-match: "
                 f"{_etm(h['epochs_to_match_ensemble'])}")
    if "strongest_baseline" in h:
        sb = h["strongest_baseline"]
        L.append(f"- strongest baseline here: {sb['name']} ({sb['val_loss']:.4f}); q0 "
                 f"{'beats' if h['q0_beats_strongest'] else 'does NOT beat'} it. These baselines are not tuned "
                 "(q0's LR/WD, fixed warmup); benchmarks/data_efficiency.py has tuned ones and several seeds.")
    verdict = "beats" if h["q0_beats_best_member"] else "does NOT beat"
    L += ["", f"The q0 mixture {verdict} its best single member"
          + (f", {'beats' if h['q0_beats_single_model'] else 'does NOT beat'} the single-model baseline" if "single_model_best" in h else "")
          + (f" and {'beats' if h['q0_beats_ensemble'] else 'does NOT beat'} the ensemble baseline" if "ensemble_baseline" in h else "")
          + " on this data.", "", "## Validation loss vs K", "",
          "| K | prior-weighted (val) | uniform top-K (val) | prior-weighted (fitness: selects K) |", "|---|---|---|---|"]
    L += [f"| {r['k']} | {r['weighted']:.4f} | {r['uniform_topk']:.4f} | "
          + (f"{r['fitness_weighted']:.4f} |" if "fitness_weighted" in r else "- |") for r in ev["topk"]]
    L += ["", f"Uniform over all members: {ev['uniform_all']:.4f}. Prior fit: {prior['chosen']}, "
          f"fitness NLL {prior['fit_loss']:.4f} (uniform {prior['baselines']['uniform']:.4f}, best single {prior['baselines']['best_single']:.4f}).",
          "", "## q0 as the budget grows", "", "| after cycle | epochs | members | val loss |", "|---|---|---|---|"]
    L += [f"| {r['cycle']} | {r['epochs']:.1f} | {r['members']} | {r['val_loss']:.4f} |" for r in ev["curve"]]
    L += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(L)
