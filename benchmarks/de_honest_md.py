"""Tables and the inference plot of benchmarks/de_honest.py (from its JSON only)."""
from __future__ import annotations

BUDGETS = ("8", "16", "32", "64")
AXIS_LABEL = {"epoch": "per epoch (actual)", "flop": "per FLOP", "wall": "per wall second"}


def iv(d, nd=3, x="") -> str:
    """'mean [lo, hi]' of a ci() dict."""
    if not d:
        return "-"
    return f"{d['mean']:.{nd}f}{x} [{d['lo']:.{nd}f}, {d['hi']:.{nd}f}]"


def ratio_cell(e) -> str:
    if not e["ratio"]:
        return f"q0 does not reach {e['strongest']}"
    return f"{'>=' if e['lower_bound'] else ''}{iv(e['ratio'], 2, 'x')} vs {e['strongest']}"


def markdown(r: dict) -> str:
    L = ["# Data efficiency in what users pay (benchmarks/de_honest.py, from the committed ledger)", "",
         "95% t intervals over 3 seeds, paired by seed. Losses: val NLL (nats/token). Ratio = the baseline's cost / "
         "q0's cost to reach the baseline's loss; the strongest baseline on each axis is the one giving q0 the "
         "smallest ratio. ≥: q0's first cycle already beats that baseline in some seed (a lower bound).", "",
         "| epochs | " + " | ".join(AXIS_LABEL.values()) + " |", "|---|---|---|---|"]
    for E in BUDGETS:
        L.append(f"| {E} | " + " | ".join(ratio_cell(r["three_way"][E][a]) for a in AXIS_LABEL) + " |")
    L += ["", "Every baseline, per axis (ratio, 95% interval):", "",
          "| epochs | baseline | " + " | ".join(AXIS_LABEL.values()) + " |", "|---|---|---|---|---|"]
    for E in BUDGETS:
        for b in r["three_way"][E]["epoch"]["by_baseline"]:
            cells = [r["three_way"][E][a]["by_baseline"][b] for a in AXIS_LABEL]
            L.append(f"| {E} | {b} | " + " | ".join(("≥" if c["lower_bound"] else "") + iv(c["ratio"], 2, "x")
                                                   for c in cells) + " |")
    L += ["", "## Inference-matched (K forward passes per token)", "",
          "q0 = prior-weighted top-K (prior fitted on fitness); baseline = the single model at its oracle best val "
          "epoch (K = 1) or the K-member ensemble. K = '1-oracle': q0's best single snapshot chosen on val, against "
          "the single model's best epoch on val (both oracles). '-tuned' / '-calibrated' / '-fitstop': the "
          "baselines tuned at each budget on fitness (benchmarks/de_honest_arms.py; '-' = not yet run for every "
          "seed); '-memfit': the K-member ensemble whose members use the recipe tuned at their own length E/K. "
          "Difference = baseline minus q0 (+ = q0 better); * = the strongest baseline at that K.", "",
          "| epochs | K | q0 top-K | baseline | baseline val | baseline minus q0 |", "|---|---|---|---|---|---|"]
    for E in BUDGETS:
        best = set(r["inference_strongest"][E].values())
        for K, x in r["inference_matched"][E].items():
            L.append(f"| {E} | {K} | {iv(x['q0_topk'])} | {x['baseline']}{' *' if K in best else ''} | "
                     f"{iv(x['baseline_val'])} | {iv(x['baseline_minus_q0'])} |")
    L += ["", "Single model at its best epoch on FITNESS (no val choice) minus q0 K = 1: " + "; ".join(
        f"{E}: {iv(r['inference_matched'][E]['1']['single_at_fitness_epoch_minus_q0'])}" for E in BUDGETS), ""]
    L += ["## Where the gain comes from", "",
          "Total = strongest baseline by loss minus q0's mixture = recipe (baseline minus q0's best single snapshot, "
          "chosen on val: an oracle, so the population's part is a lower bound) + population (that snapshot minus "
          "the mixture). Last column: the population's gain over the prior's top member (K = 1 on fitness).", "",
          "| epochs | strongest by loss | total gain | recipe (one trajectory) | population | population share | "
          "population vs prior's top member |", "|---|---|---|---|---|---|---|"]
    for E in BUDGETS:
        p = r["population"][E]
        L.append(f"| {E} | {p['strongest_by_loss']} | {iv(p['total_gain'])} | {iv(p['recipe_gain'])} | "
                 f"{iv(p['population_gain'])} | {iv(p['population_share'], 2)} | "
                 f"{iv(p['population_gain_vs_prior_top_member'])} |")
    if any("population_share_fitness_chosen" in r["population"][E] for E in BUDGETS):
        L += ["", "The same split with q0's best single snapshot chosen on FITNESS (no oracle):", "",
              "| epochs | q0 best member (fitness-chosen) | recipe | population | population share |", "|---|---|---|---|---|"]
        for E in BUDGETS:
            p = r["population"][E]
            if "population_share_fitness_chosen" in p:
                L.append(f"| {E} | {iv(p['q0_best_member_on_fitness'])} | {iv(p['recipe_gain_fitness_chosen'])} | "
                         f"{iv(p['population_gain_fitness_chosen'])} | {iv(p['population_share_fitness_chosen'], 2)} |")
    if r.get("population_in_study"):
        L += ["", "The split on ONE run per seed, nothing chosen on val (benchmarks/distill_retention.py's populations "
              "pop-s{s}: q0-s{s}'s settings re-run, every snapshot scored on fitness, val and test): q0 at K = 1 = "
              "its snapshot with the lowest fitness loss; population = the prior's top-K mixture of the same run "
              "minus that snapshot; baseline = the strongest by val among the finished baselines above.", "",
              "| epochs | K | baseline | q0 K=1 (fitness-chosen) | q0 top-K | total gain | recipe | population | "
              "population share | population (test) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for E, p in r["population_in_study"].items():
            for K in ("4", "8"):
                k = p[f"K{K}"]
                L.append(f"| {E} | {K} | {p['strongest_by_loss']} {iv(p['baseline_val'])} | "
                         f"{iv(p['q0_k1_on_fitness_val'])} | {iv(k['q0_topk_val'])} | {iv(k['total_gain'])} | "
                         f"{iv(p['recipe_gain'])} | {iv(k['population_gain'])} | {iv(k['population_share'], 2)} | "
                         f"{iv(k['population_gain_test'])} |")
    L += ["", "## Ablations at 32 epochs (variant minus reference, paired; + = the variant is worse)", "",
          "| change | val delta | verdict (val) | fitness delta | verdict (fitness) |", "|---|---|---|---|---|"]
    for a in r["ablations_32"]:
        L.append(f"| {a['label']} | {iv(a['val_delta'], 4)} | {a['verdict_val']} | {iv(a['fitness_delta'], 4)} | "
                 f"{a['verdict_fitness']} |")
    L += ["", "## Defaults re-decided on the fitness set", "",
          "| default | figure | fitness delta | val delta | decided before on | decision |", "|---|---|---|---|---|---|"]
    for d in r["defaults_on_fitness"]:
        L.append(f"| {d['default']} | {d['figure']} | {iv(d['fitness_delta'], 4)} | {iv(d['val_delta'], 4)} | "
                 f"{d['was_decided_on']} | {d['decision']} ({d['strength']}) |")
    fs = r.get("fitness_size_on_fitness")
    if fs:
        ns = list(fs["by_budget"][next(iter(fs["by_budget"]))])
        L += ["", f"Fitness-set size on fitness alone: the prior fitted on the first n fitness tokens, scored on the "
              f"last {fs['held_out_tokens']:,} (held out from every fit); gain over the uniform mixture on those "
              "tokens (+ = the prior helps):", "",
              "| epochs | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
        for E, rows in fs["by_budget"].items():
            L.append(f"| {E} | " + " | ".join(iv(rows[n]["gain_over_uniform"]) for n in ns) + " |")
        if fs["prior_loses_to_uniform_at_every_n"]:
            L += ["", "At " + " and ".join(fs["prior_loses_to_uniform_at_every_n"]) + " epochs the fitted prior "
                  "scores worse than the uniform mixture on the held-out fitness tokens at every n (interval below 0)."]
    if r.get("budget_grids"):
        L += ["", "Budget-tuned grids so far (seed 0; each point at its best FITNESS epoch; the grid grows past an edge "
              "until its best point is inside):", "",
              "| epochs | points finished | best on fitness: LR / WD | its fitness | its val | its test | best fitness epoch | "
              "on an edge of the finished points |", "|---|---|---|---|---|---|---|---|"]
        for E, g in r["budget_grids"].items():
            b = g["best_on_fitness"]
            L.append(f"| {E} | {len(g['points'])} | {b['lr']:g} / {b['wd']:g} | {b['fitness_loss']:.3f} | "
                     f"{b['val_loss']:.3f} | {'-' if b['test_loss'] is None else format(b['test_loss'], '.3f')} | "
                     f"{b['best_fitness_epoch']:g} | {', '.join(g['best_on_edge_of_finished_points']) or 'no'} |")
    f = r["fitness_share"]
    L += ["", "Budget-tuned arms finished (benchmarks/de_honest_arms.py; a table row needs every seed): " + ", ".join(
        f"{k} {v['finished']}/{v['planned']}" + (f" of the base grids + {v['extension_points_finished']} points "
                                                 "beyond their edges" if "extension_points_finished" in v else "")
        for k, v in r["honest_arms_finished"].items()) + ".", "",
          f"Fitness set: {f['fitness_tokens']:,} tokens = {f['share_of_train']:.1%} of the {f['train_tokens']:,} "
          f"training tokens (paper: {f['paper_fitness_tokens']:,} of {f['paper_train_tokens']:,} = "
          f"{f['paper_share_of_train']:.2%}).",
          f"Actual epochs per nominal epoch: q0 and single {r['actual_epochs_per_nominal']['q0_and_single']:.4f}; "
          "ensemble members " + ", ".join(f"{k} {v:.4f}" for k, v in r["actual_epochs_per_nominal"]["ensemble_members"].items()) + ".",
          f"FLOPs/token ({r['flop_model']['source']}): training {r['flop_model']['train_per_token']:.4g}, forward "
          f"{r['flop_model']['forward_per_token']:.4g}; {r['scored_tokens_per_snapshot']:,} tokens scored per snapshot.", ""]
    for k, v in r["readme_derived"].items():
        L.append(f"- {k}: {v['value']:.4f} ({v['source']})")
    L += ["", "q0's per-snapshot fitness losses (benchmarks/distill_retention.py's re-run of the same q0 runs): " + "; ".join(
        f"seed {k}: {v}" for k, v in r["q0_members_from_study"].items()) + "."]
    L += ["", f"Splits: {r['splits']}.", ""] + [f"- not in the ledger: {x}" for x in r["not_in_ledger"]]
    return "\n".join(L) + "\n"


def plot_k_panels(panels: dict, path, ylabel: str, labels: tuple[str, str]) -> None:
    """One panel per budget: q0 top-K and the strongest K-forward baseline against K. panels: {E: (Ks, q0 cells,
    baseline cells)}, each cell a ci() dict."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4), sharey=False)
    for ax, (E, (Ks, *sides)) in zip(axes, panels.items()):
        for cells, label, style in zip(sides, labels, ("o-", "s--")):
            m = [c["mean"] for c in cells]
            err = [[m[i] - c["lo"] for i, c in enumerate(cells)], [c["hi"] - m[i] for i, c in enumerate(cells)]]
            ax.errorbar(Ks, m, yerr=err, fmt=style, capsize=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ks, [str(k) for k in Ks])
        ax.set_title(f"{E} epochs")
        ax.set_xlabel("forward passes per token (K = M)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ylabel)
    handles, labels_ = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels_, loc="lower center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))              # the legend below the panels covers no point
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot(r: dict, path) -> None:
    panels = {}
    for E in BUDGETS:
        rows, strongest = r["inference_matched"][E], r["inference_strongest"][E]
        Ks = [int(k) for k in rows if "-" not in k]
        panels[E] = (Ks, [rows[str(k)]["q0_topk"] for k in Ks], [rows[strongest[str(k)]]["baseline_val"] for k in Ks])
    plot_k_panels(panels, path, "val NLL (nats/token), 95% interval, 3 seeds",
                  ("q0 top-K (prior on fitness)", "strongest baseline with K forwards (single / ensemble M=K)"))
