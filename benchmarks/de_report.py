"""Report of benchmarks/data_efficiency.py: per-seed cells from finished runs (benchmarks/de_eval.py), spreads,
strongest baseline, epochs-to-match (q0ds.metrics), ablations as paired differences, JSON + plots + table.

A cell is one (arm, budget, seed) number; it exists only when the runs behind it are finished (a q0 run's
prefix counts once it has passed the budget). Tables and plots show only existing cells, each with its n;
"cells" in the JSON lists, for every planned cell, whether it is complete.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from benchmarks import de_eval, de_jobs
from benchmarks.common import machine_info, write_json
from q0ds.metrics import best_of, match_ratio, spread

FITNESS_SIZES = (1500, 3000, 6000, 12000)


def _b(E) -> str:
    return f"{E:g}"


def eval_keys(args, run) -> list[str]:
    """The numbers the report reads from one run (one ledger key each)."""
    if run.kind in ("tune", "single"):
        return ["single_curve"]
    if run.kind == "pool":
        return [f"ensemble_M{M}" for M in args.ensemble_sizes if M <= run.cfg.bases]
    if run.kind == "q0":
        return ["q0_curve|" + ",".join(map(_b, sorted(set(args.budgets) | {args.ablation_budget}))) + "|"
                + ",".join(map(str, FITNESS_SIZES))]
    if run.kind in ("abl", "extra"):
        return [f"q0_curve|{_b(run.info['budget'])}|"]
    if run.kind in ("tuneE", "sfit", "pfit", "pmem"):
        from benchmarks.de_honest_arms import eval_keys as honest_keys
        return honest_keys(run)
    return ["distill_report"]


def _compute(run, key: str):
    if key == "single_curve":
        return de_eval.single_curve(run.run_dir)
    if key.startswith("ensemble_M"):
        return de_eval.ensemble_of_first(run.run_dir, int(key[len("ensemble_M"):]))
    if key.startswith("ensemble_fitstop_M"):
        return de_eval.ensemble_fitness_stopped(run.run_dir, int(key[len("ensemble_fitstop_M"):]))
    if key == "temperature":
        return de_eval.temperature_calibrated(run.run_dir)
    if key.startswith("q0_curve|"):
        _, detail, sizes = key.split("|")
        return de_eval.q0_curve(run.run_dir, [float(x) for x in detail.split(",") if x],
                                [int(x) for x in sizes.split(",") if x])
    import json
    return json.loads((run.run_dir / "distill_report.json").read_text())


def run_eval(run, key: str, partial: bool = False):
    """One number set of a run: from the ledger when it is there, else from the run's files (and then recorded
    in the ledger); None when neither has it. partial: the caller has the files of an unfinished run (a pool's
    first bases, a q0 run's prefix): computed from them afresh and recorded as partial, so that a report from
    the ledger alone has the same cells."""
    L = de_jobs.LEDGER
    if L is not None and (L.has(run) or not partial):
        v = L.get(run, key)
        if v is not None:
            return v
    if de_jobs.disk_complete(run) or partial:
        v = _compute(run, key)
        if L is not None:
            L.put(run, key, v, timing=de_jobs.read_timing(run), complete=de_jobs.disk_complete(run))
        return v
    if L is not None and L.has(run):
        raise SystemExit(f"[data_efficiency] the ledger {L.path} has run {run.name} without '{key}' and its files "
                         f"are gone: report with the settings it was recorded with, or delete its entry to retrain it")
    return None


def record(args, run) -> None:
    """Every number of a finished run into the ledger (called as each run finishes)."""
    for key in eval_keys(args, run):
        run_eval(run, key)


def collect(args, runs) -> dict:
    """{"single": {E: {s: row}}, "ensemble": {E: {M: {s: row}}}, "q0": {s: curve}, "abl": {name: {s: row}},
    "extra": {name: {s: row}}, "tune": [...], "cells": {...}}"""
    by = {r.name: r for r in runs}
    out = {"single": {}, "ensemble": {}, "q0": {}, "abl": {}, "extra": {}, "cells": {}}
    for s in range(args.seeds):
        for E in args.budgets:
            r = by.get(f"single-E{_b(E)}-s{s}")
            ok = r is not None and de_jobs.complete(r)
            out["cells"][f"single/E{_b(E)}/s{s}"] = ok
            if ok:
                out["single"].setdefault(_b(E), {})[s] = run_eval(r, "single_curve")
            for M in args.ensemble_sizes:
                r = by.get(f"pool-L{_b(E / M)}-s{s}")
                on_disk = r is not None and all(de_jobs.disk_done(r, b) for b in range(M))
                v = run_eval(r, f"ensemble_M{M}", partial=on_disk) if r is not None else None
                out["cells"][f"ensemble/E{_b(E)}/M{M}/s{s}"] = v is not None
                if v is not None:
                    out["ensemble"].setdefault(_b(E), {}).setdefault(M, {})[s] = v
        r = by[f"q0-s{s}"]
        from q0ds.snapshot import list_snapshots
        c = run_eval(r, eval_keys(args, r)[0], partial=not de_jobs.complete(r) and bool(list_snapshots(r.run_dir)))
        if c is not None:
            out["q0"][s] = dict(c, complete=de_jobs.complete(r))
        for E in args.budgets:
            out["cells"][f"q0/E{_b(E)}/s{s}"] = s in out["q0"] and de_eval.at_epochs(out["q0"][s]["curve"], E) is not None
    for r in runs:
        if r.kind == "distill":
            ok = de_jobs.complete(r)
            out["cells"][r.name] = ok
            if ok:
                d = run_eval(r, "distill_report")
                out.setdefault("distill", {}).setdefault(r.name.rsplit("-s", 1)[0], {})[r.seed] = {
                    "val_loss": d["val_loss"], "fraction_retained": d["fraction_retained"],
                    "student_epochs": d["cost"]["student_epochs"], "alpha": d["alpha"]}
        if r.kind in ("abl", "extra"):
            ok = de_jobs.complete(r)
            out["cells"][r.name] = ok
            if ok:
                last = run_eval(r, eval_keys(args, r)[0])["curve"][-1]
                row = {"val_loss": last["val_loss"], "uniform_val_loss": last["uniform_val_loss"],
                       "last_snapshot_val_loss": last["last_snapshot_val_loss"], "members": last["members"],
                       "topk_on_fitness": last.get("topk_on_fitness"), "train_process_s": _proc_s(r)}
                key = r.info.get("ablation") or r.info.get("allocation")
                out["abl" if r.kind == "abl" else "extra"].setdefault(key, {})[r.seed] = row
    return out


def _proc_s(run) -> float:
    return round(sum(x["seconds"] for x in de_jobs.read_timing(run).values()), 1)


def summarize(args, cells) -> dict:
    seeds = range(args.seeds)
    table, etm = {}, {}
    for E in args.budgets:
        b = _b(E)
        single = {s: v["best_val_loss"] for s, v in cells["single"].get(b, {}).items()}
        ens_by_m = {M: {s: v["val_loss"] for s, v in d.items()} for M, d in cells["ensemble"].get(b, {}).items()}
        # best M: the lowest seed-mean among sizes with every seed present (in the baseline's favour, on val)
        full = {M: spread(d.values())["mean"] for M, d in ens_by_m.items() if len(d) == len(seeds)}
        anyM = {M: spread(d.values())["mean"] for M, d in ens_by_m.items()}
        bestM, _ = best_of(full or anyM)
        ens = ens_by_m.get(bestM, {}) if bestM else {}
        q0 = {}
        for s, c in cells["q0"].items():
            row = de_eval.at_epochs(c["curve"], E)
            if row:
                q0[s] = row
        row = {"single_best_epoch": spread(single.values()), "single_per_seed": single,
               "single_best_epoch_at": spread(v["best_epoch"] for v in cells["single"].get(b, {}).values()),
               "single_val_at_fitness_best_epoch": spread(v["val_at_best_fitness_epoch"] for v in cells["single"].get(b, {}).values()),
               "ensemble_by_M": {str(M): spread(d.values()) for M, d in sorted(ens_by_m.items())},
               "ensemble_best_M": bestM, "ensemble_best_M_from": "all seeds" if full else "the seeds so far",
               "ensemble": spread(ens.values()), "ensemble_per_seed": ens,
               "q0": spread(r["val_loss"] for r in q0.values()), "q0_per_seed": {s: r["val_loss"] for s, r in q0.items()},
               "q0_uniform_prior": spread(r["uniform_val_loss"] for r in q0.values()),
               "q0_last_snapshot": spread(r["last_snapshot_val_loss"] for r in q0.values()),
               "q0_topk_on_fitness": spread(r["topk_on_fitness"]["val_loss"] for r in q0.values() if r.get("topk_on_fitness")),
               "q0_k_on_fitness": [r["topk_on_fitness"]["k"] for r in q0.values() if r.get("topk_on_fitness")],
               "prior_gain_by_fitness_tokens": {
                   n: spread(r["prior_gain_by_fitness_tokens"].get(n) for r in q0.values() if r.get("prior_gain_by_fitness_tokens"))
                   for n in map(str, FITNESS_SIZES)}}
        # the paper's "matched ensemble size": q0's prior-weighted top-K with K = the ensemble's M
        row["q0_matched_k"] = spread(next((x["val_loss"] for x in r["topk_on_fitness"]["rows"] if x["k"] == bestM), None)
                                     for r in q0.values() if r.get("topk_on_fitness")) if bestM else None
        sm, em = row["single_best_epoch"], row["ensemble"]
        row["strongest"] = None if not (sm and em) else ("ensemble" if em["mean"] < sm["mean"] else "single")
        table[b] = row
        # epochs-to-match, paired by seed: q0 seed s's per-cycle curve against the baseline's seed s
        etm[b] = {}
        for name, per in (("strongest", None), ("single", single), ("ensemble", ens)):
            if name == "strongest":
                per = {"single": single, "ensemble": ens}.get(row["strongest"], {})
            rs = {}
            for s, target in per.items():
                if s in cells["q0"]:
                    c = cells["q0"][s]
                    m = match_ratio(E, [(r["epochs"], r["val_loss"]) for r in c["curve"]], target)
                    if not m["reached"] and not c.get("complete"):
                        continue                 # q0 still training: not known yet
                    rs[s] = m
            ratios = [m["ratio"] for m in rs.values() if m["ratio"] is not None]
            etm[b][name] = {"per_seed": rs, "ratio": spread(ratios), "not_reached": sum(not m["reached"] for m in rs.values()),
                            "lower_bounds": sum(m["lower_bound"] for m in rs.values()),
                            "q0_epochs": spread(m["epochs"] for m in rs.values())}
    return {"table": table, "epochs_to_match": etm}


def ablation_rows(args, cells) -> list[dict]:
    """Each ablation as a paired difference from the reference (same seed), with its spread over seeds."""
    ref = cells["abl"].get("ref", {})
    rows = [{"name": "ref", "label": f"q0 reference (uniform {args.cycle_epochs:g}-epoch cycles, learned prior, all members)",
             "val_loss": spread(v["val_loss"] for v in ref.values()), "delta": None, "n": len(ref)}]
    pairs = {"uniform prior (same runs)": {s: v["uniform_val_loss"] - v["val_loss"] for s, v in ref.items()},
             "last snapshot only (same runs)": {s: v["last_snapshot_val_loss"] - v["val_loss"] for s, v in ref.items()}}
    from benchmarks.de_arms import ABLATIONS
    for name, (label, _) in ABLATIONS.items():
        if args.ablation_arms != "all" and name not in args.ablation_arms.split(","):
            continue
        d = cells["abl"].get(name, {})
        pairs[label] = {s: v["val_loss"] - ref[s]["val_loss"] for s, v in d.items() if s in ref}
        rows.append({"name": name, "label": label, "val_loss": spread(v["val_loss"] for v in d.values()),
                     "delta": spread(pairs[label].values()), "delta_per_seed": pairs[label], "n": len(pairs[label])})
    for label in ("uniform prior (same runs)", "last snapshot only (same runs)"):
        rows.append({"name": label.split(" (")[0].replace(" ", "_"), "label": label, "val_loss": None,
                     "delta": spread(pairs[label].values()), "delta_per_seed": pairs[label], "n": len(pairs[label])})
    for r in rows[1:]:
        d = r["delta"]
        r["verdict"] = ("no data" if not d else "one seed: no spread" if d["n"] < 2 else
                        "within the spread" if abs(d["mean"]) <= d["std"] else ("worse" if d["mean"] > 0 else "better"))
    # prefix vs planned: q0-s's first A epochs against abl-ref (same seed, planned for A)
    A = args.ablation_budget
    pre = {s: de_eval.at_epochs(c["curve"], A) for s, c in cells["q0"].items()}
    diff = {s: pre[s]["val_loss"] - ref[s]["val_loss"] for s in ref if pre.get(s)}
    rows.append({"name": "prefix_vs_planned", "label": f"{A:g}-epoch prefix of the {max(args.budgets):g}-epoch q0 run "
                 "(vs a run planned for it)", "val_loss": None, "delta": spread(diff.values()),
                 "delta_per_seed": diff, "n": len(diff), "verdict": "-"})
    return rows


def planner_rows(cells) -> dict:
    p, u = cells["extra"].get("planner", {}), cells["extra"].get("uniform", {})
    d = {s: p[s]["val_loss"] - u[s]["val_loss"] for s in p if s in u}
    return {"planner": spread(v["val_loss"] for v in p.values()), "uniform": spread(v["val_loss"] for v in u.values()),
            "planner_minus_uniform": spread(d.values()), "per_seed": d}


def distill_rows(cells) -> dict:
    """Ensemble distillation (top-4 mixture -> one model) and its no-teacher control, over seeds."""
    out = {}
    for name, per in cells.get("distill", {}).items():
        out[name] = {"distilled_val_loss": spread(v["val_loss"]["distilled"] for v in per.values()),
                     "mixture_val_loss": spread(v["val_loss"]["mixture"] for v in per.values()),
                     "best_member_val_loss": spread(v["val_loss"]["best_single"] for v in per.values()),
                     "fraction_retained": spread(v["fraction_retained"] for v in per.values()),
                     "student_epochs": spread(v["student_epochs"] for v in per.values()), "per_seed": per}
    return out


def report(args, data, runs, argv, failed, t_start) -> dict:
    from benchmarks.de_plots import markdown, plot, summary_text
    cells = collect(args, runs)
    summ = summarize(args, cells)
    import json
    out = Path(args.out)
    tuned = de_jobs.LEDGER.doc["tuned"] if de_jobs.LEDGER is not None else None
    sessions = de_jobs.read_sessions()
    grid = []                                 # every finished grid run (the recipe is chosen only when all are)
    for r in runs:
        if r.kind == "tune" and de_jobs.complete(r):
            c = run_eval(r, "single_curve")
            grid.append({**r.info["recipe"], "budget": r.info["budget"], "best_val_loss": c["best_val_loss"],
                         "best_epoch": c["best_epoch"], "final_val_loss": c["final_val_loss"],
                         "val_at_best_fitness_epoch": c["val_at_best_fitness_epoch"],
                         "best_fitness_epoch": c["best_fitness_epoch"]})
    res = {
        "benchmark": "data_efficiency",
        "command": " ".join(["python", "benchmarks/data_efficiency.py"] + list(argv if argv is not None else sys.argv[1:])),
        "settings": {k: v for k, v in vars(args).items() if k not in ("plan_only", "report_only")},
        "data": data_info(data, runs[0].cfg),
        "machine": machine_info(),
        "tuning": tuned,
        "tuning_grid_finished": grid,
        "cells": cells["cells"],
        "cells_complete": sum(cells["cells"].values()), "cells_planned": len(cells["cells"]),
        "incomplete_runs": sorted(r.name for r in runs if not de_jobs.complete(r)),
        "failed_jobs": [{"run": k, "base": b, "exit": rc} for k, b, rc in failed],
        "table": summ["table"], "epochs_to_match": summ["epochs_to_match"],
        "ablations": ablation_rows(args, cells) if args.ablations else [],
        **({"honest_arms": __import__("benchmarks.de_honest_arms", fromlist=["summary"]).summary(args, runs)}
           if getattr(args, "honest_arms", False) else {}),
        "planner_vs_uniform": planner_rows(cells),
        "ensemble_distillation": distill_rows(cells),
        "single_curves": {b: {s: v["curve"] for s, v in d.items()} for b, d in cells["single"].items()},
        "q0_curves": {s: c["curve"] for s, c in cells["q0"].items()},
        "q0_runs_complete": {s: c["complete"] for s, c in cells["q0"].items()},
        "training_sessions": sessions,
        "training_wall_time_total_s": round(sum(x["end"] - x["start"] for x in sessions), 1),
        "train_process_s_by_run": {r.name: _proc_s(r) for r in runs if de_jobs.read_timing(r)},
        "report_time_s": round(time.time() - t_start, 1),
        "notes": [
            "val loss = mean NLL (nats/token) on the held-out val split, the same tokens for every arm.",
            "epochs are nominal (budget units); the trainer rounds each cycle/epoch to whole steps: 13 steps of 12.66 "
            "per epoch for q0 and the single model (1.027 actual epochs), ensemble members 0.99-1.01; "
            "benchmarks/de_honest.py recomputes every ratio in actual epochs.",
            "single: best epoch chosen on validation (oracle, in its favour); ensemble: best M chosen on validation "
            "by seed-mean (in its favour); q0: weighted all-member mixture, prior fitted on the fitness set.",
            "q0 at budget E = the first E epochs of one long run per seed (prior refitted on them); it differs from "
            "a run planned for E only in the perturbation scale schedule; 'prefix_vs_planned' measures it.",
            "epochs-to-match is paired by seed and interpolated in log-epochs (q0ds.metrics); a lower bound when "
            "q0's first cycle already matches; not_reached counts seeds whose q0 never reached the baseline.",
            "q0's LR/WD are the preset's (3e-3, 1.0), not tuned; the baselines' are tuned on the fitness set.",
        ],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "data_efficiency.json", res)
    plot(res, out)
    (out / "data_efficiency.md").write_text(markdown(res))
    print("\n" + summary_text(res))
    from benchmarks import de_honest
    if res["cells_complete"] == res["cells_planned"] and de_honest.applies(res["settings"]):
        de_honest.write(out, out / "data_efficiency_ledger.json", out / "data_efficiency.json")
        print(f"[data_efficiency] wrote {out / 'data_efficiency_honest.md'} (benchmarks/de_honest.py)", flush=True)
    else:
        print("[data_efficiency] benchmarks/de_honest.py needs the full benchmark's cells: skipped", flush=True)
    print(f"[data_efficiency] {res['cells_complete']}/{res['cells_planned']} cells complete; wrote "
          f"{out / 'data_efficiency.json'}", flush=True)
    return res


def data_info(data: Path, cfg) -> dict:
    from q0ds.data import PreparedData
    d = PreparedData.open(data)
    W = d.windows_per_epoch(cfg.train.seq_len)
    return {"source": d.meta.get("source"), "vocab_size": d.vocab_size,
            "train_tokens": d.meta["n_tokens"]["train"], "val_tokens": d.meta["n_tokens"]["val"],
            "fitness_tokens": d.meta["n_tokens"]["fitness"], "windows_per_epoch": W,
            "steps_per_epoch": W / cfg.train.global_batch, "fingerprint": d.fingerprint}
