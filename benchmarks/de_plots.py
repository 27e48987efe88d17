"""Plots and the text table of benchmarks/data_efficiency.py (only existing cells; every entry carries its n)."""
from __future__ import annotations

import statistics
from pathlib import Path


def _fmt(d, nd=3, sep="±", empty="-"):
    """mean±std (n=...) of a spread() dict; std only when n > 1."""
    if not d:
        return empty
    s = f"{d['mean']:.{nd}f}"
    if d["n"] > 1:
        s += f"{sep}{d['std']:.{nd}f}"
    return s + f" (n={d['n']})"


def _ratio(e):
    r = e.get("ratio")
    if not r:
        nr = e.get("not_reached", 0)
        return f"not reached ({nr} seed(s))" if nr else "-"
    lb = ">=" if e.get("lower_bounds") else ""
    s = f"{lb}{r['mean']:.2f}x" + (f" ±{r['std']:.2f} [{r['min']:.2f}-{r['max']:.2f}]" if r["n"] > 1 else "")
    s += f" (n={r['n']}"
    if e.get("not_reached"):
        s += f"; {e['not_reached']} seed(s) not reached"
    return s + ")"


def summary_text(res: dict) -> str:
    L = []
    t = res.get("tuning")
    if t:
        L.append(f"Tuned single-model recipe (on the fitness set, at {t['budget']:g} epochs): LR {t['recipe']['lr']:g}, "
                 f"WD {t['recipe']['wd']:g}, warmup {t['warmup_frac']:.0%} of the run + cosine")
    elif res.get("tuning_grid_finished"):
        L.append("Tuning grid (single model, seed 0), finished points so far (val NLL at the best val epoch):")
        for g in res["tuning_grid_finished"]:
            L.append(f"  LR {g['lr']:g} WD {g['wd']:g} at {g['budget']:g} epochs: best {g['best_val_loss']:.3f} at epoch "
                     f"{g['best_epoch']:g}, final {g['final_val_loss']:.3f}")
    L.append("Validation NLL (nats/token), mean±std over seeds (n seeds); only finished cells")
    L.append(f"{'E':>4} | {'single (best ep.)':>22} | {'ensemble (best M)':>26} | {'q0 (learned prior)':>22} | "
             f"{'q0 K on fitness':>22} | strongest")
    for b, r in res["table"].items():
        ens = _fmt(r["ensemble"]) + (f" M={r['ensemble_best_M']}" if r["ensemble_best_M"] else "")
        L.append(f"{b:>4} | {_fmt(r['single_best_epoch']):>22} | {ens:>26} | {_fmt(r['q0']):>22} | "
                 f"{_fmt(r['q0_topk_on_fitness']):>22} | {r['strongest'] or '-'}")
    L.append("\nEnsembles by size M (val NLL)")
    for b, r in res["table"].items():
        L.append(f"{b:>4} | " + "  ".join(f"M={M}: {_fmt(v)}" for M, v in r["ensemble_by_M"].items()))
    L.append("\nEpochs-to-match (B / q0 epochs reaching the baseline's loss at B; paired by seed, log-epoch interpolation)")
    for b, e in res["epochs_to_match"].items():
        L.append(f"{b:>4} | vs strongest {_ratio(e['strongest'])} | vs single {_ratio(e['single'])} | "
                 f"vs ensemble {_ratio(e['ensemble'])}")
    if res.get("ablations"):
        A = res["settings"]["ablation_budget"]
        L.append(f"\nAblations at {A:g} epochs: val NLL, and the paired difference from the reference (+ = worse)")
        for r in res["ablations"]:
            L.append(f"  {r['label'][:64]:<64} {_fmt(r['val_loss']):>22}  delta {_fmt(r['delta'], 4):>24}  "
                     f"{r.get('verdict', '')}")
    p = res.get("planner_vs_uniform") or {}
    if p.get("planner_minus_uniform"):
        L.append(f"\nPacked cycles (the old planner) vs uniform cycles at {res['settings']['planner_budget']:g} epochs: "
                 f"packed {_fmt(p['planner'])}, uniform {_fmt(p['uniform'])}, "
                 f"difference {_fmt(p['planner_minus_uniform'], 4)}")
    for name, d in (res.get("ensemble_distillation") or {}).items():
        L.append(f"\n{name}: distilled {_fmt(d['distilled_val_loss'])} vs mixture {_fmt(d['mixture_val_loss'])} vs best "
                 f"member {_fmt(d['best_member_val_loss'])}; gain retained {_fmt(d['fraction_retained'], 2)}")
    L.append("\nPrior's gain over the uniform mixture (nats) by fitness-set size (first n fitness tokens)")
    for b, r in res["table"].items():
        g = r["prior_gain_by_fitness_tokens"]
        if any(g.values()):
            L.append(f"{b:>4} | " + "  ".join(f"{n}: {_fmt(v, 4)}" for n, v in g.items() if v))
    L.append(f"\n{res['cells_complete']}/{res['cells_planned']} cells complete; incomplete runs: "
             f"{len(res['incomplete_runs'])}")
    return "\n".join(L)


def plot(res: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7.6, 5.0))
    tab = res["table"]

    def band(key, label, color, marker):
        pts = [(float(b), r[key]) for b, r in tab.items() if r.get(key)]
        if not pts:
            return
        x = [p[0] for p in pts]
        m = [p[1]["mean"] for p in pts]
        ax.plot(x, m, marker + "-", color=color, lw=1.8, ms=6,
                label=f"{label} (n={'/'.join(str(p[1]['n']) for p in pts)})")
        ax.fill_between(x, [p[1]["min"] for p in pts], [p[1]["max"] for p in pts], color=color, alpha=0.15, lw=0)

    band("single_best_epoch", "single model, best epoch (tuned; oracle epoch)", "C0", "o")
    band("ensemble", "independent ensemble, best M (tuned members)", "C1", "s")
    # q0: per-cycle curve, mean over the seeds that reached each point, min-max band
    by_e = {}
    for s, curve in res["q0_curves"].items():
        for r in curve:
            by_e.setdefault(r["epochs"], []).append(r["val_loss"])
    if by_e:
        xs = sorted(by_e)
        ax.plot(xs, [statistics.fmean(by_e[x]) for x in xs], "-", color="C2", lw=1.6,
                label=f"q0 per-cycle curve, learned prior ({len(res['q0_curves'])} seed(s))")
        ax.fill_between(xs, [min(by_e[x]) for x in xs], [max(by_e[x]) for x in xs], color="C2", alpha=0.15, lw=0)
        band("q0", "q0 at the budgets", "C2", "D")
    for b, r in tab.items():
        for M, v in r["ensemble_by_M"].items():
            if v:
                ax.plot([float(b)], [v["mean"]], "x", color="C1", alpha=0.5, ms=5)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("epochs spent (all models)")
    ax.set_ylabel("validation loss (nats/token)")
    d = res["data"]
    ax.set_title(f"Data efficiency on CPU: {res['settings']['preset']} model, {d['train_tokens']} train tokens; "
                 "bands = min-max over seeds; x = ensembles of other M", fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "data_efficiency.png", dpi=120)
    plt.close(fig)

    rows = [r for r in res.get("ablations", []) if r.get("delta")]
    p = res.get("planner_vs_uniform") or {}
    if p.get("planner_minus_uniform"):
        rows.append({"label": f"packed (old planner) - uniform 1-ep cycles at {res['settings']['planner_budget']:g} ep",
                     "delta": p["planner_minus_uniform"]})
    if not rows:
        (out / "data_efficiency_ablations.png").unlink(missing_ok=True)     # never leave a stale plot
        return
    fig, ax = plt.subplots(figsize=(8.5, 0.45 * len(rows) + 1.4))
    vals = [r["delta"]["mean"] for r in rows]
    ax.barh(range(len(rows)), vals, xerr=[r["delta"]["std"] for r in rows], color=["C3" if v > 0 else "C2" for v in vals],
            capsize=3)
    ax.set_yticks(range(len(rows)), [f"{r['label'][:60]} (n={r['delta']['n']})" for r in rows], fontsize=7)
    ax.axvline(0, color="k", lw=0.8)
    ax.invert_yaxis()
    ax.set_xlabel("val loss minus the reference, paired by seed\n(nats/token; + = worse); error bar = std over seeds")
    ax.set_title(f"q0 ablations at {res['settings']['ablation_budget']:g} epochs", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(out / "data_efficiency_ablations.png", dpi=120, bbox_inches="tight")   # long labels
    plt.close(fig)


def _md(d, nd=3):
    return _fmt(d, nd, sep=" ± ", empty="–")


def markdown(res: dict) -> str:
    """The README tables, generated from the JSON (benchmarks/results/data_efficiency.md)."""
    L = ["| epochs | single, best epoch (tuned) | ensemble, best M (tuned members) | strongest | q0, learned prior "
         "| q0, K on fitness | q0, K = M (matched size) | q0, uniform prior |", "|---|---|---|---|---|---|---|---|"]
    for b, r in res["table"].items():
        if not any(r.get(k) for k in ("single_best_epoch", "ensemble", "q0")):
            continue
        M = f" M={r['ensemble_best_M']}" if r["ensemble_best_M"] else ""
        L.append(f"| {b} | {_md(r['single_best_epoch'])} | {_md(r['ensemble'])}{M} | {r['strongest'] or '–'} | "
                 f"{_md(r['q0'])} | {_md(r['q0_topk_on_fitness'])} | {_md(r.get('q0_matched_k'))} | "
                 f"{_md(r['q0_uniform_prior'])} |")
    L += ["", "| budget B | epochs-to-match vs strongest | vs single | vs ensemble |", "|---|---|---|---|"]
    for b, e in res["epochs_to_match"].items():
        if any(e[k]["per_seed"] for k in e):
            L.append(f"| {b} | {_ratio(e['strongest'])} | {_ratio(e['single'])} | {_ratio(e['ensemble'])} |")
    if any(r.get("n") for r in res.get("ablations", [])):
        L += ["", f"| at {res['settings']['ablation_budget']:g} epochs | val loss | minus reference (paired) | verdict |",
              "|---|---|---|---|"]
        for r in res["ablations"]:
            if r.get("n") or r["name"] == "ref":
                L.append(f"| {r['label']} | {_md(r['val_loss'])} | {_md(r['delta'], 4)} | {r.get('verdict', '') or ''} |")
    gains = [(b, r["prior_gain_by_fitness_tokens"]) for b, r in res["table"].items()
             if any(r["prior_gain_by_fitness_tokens"].values())]
    if gains:
        sizes = list(gains[0][1])
        L += ["", "| epochs | " + " | ".join(f"prior gain, {n} fitness tokens" for n in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
        for b, g in gains:
            L.append(f"| {b} | " + " | ".join(_md(g[n], 4) for n in sizes) + " |")
    return "\n".join(L) + "\n"
