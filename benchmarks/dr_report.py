"""Numbers and report of benchmarks/distill_retention.py (issue 21).

Evaluation (recorded in the ledger as each run finishes, so `--report-only` needs no run files):
  population  per budget E (the prefix dir pop-E{E}-s{s}): every snapshot's fitness / val (/ test) NLL and prior
              weight, the prior (q0ds fit-prior on the prefix, fitness set), the top-K members for every studied
              K with their mixture's NLL, the best member on FITNESS (its val NLL is the retention denominator's
              "best member") and, labelled as an oracle, the best member on val.
  student     its last snapshot's fitness / val (/ test) NLL, actual epochs and steps, the per-cycle curve, and
              what `q0ds distill-ensemble`'s own distill_report.json says (its retention uses the val-best member).
  truncation  per budget E and studied K (key truncation_E{E}|k..|n..|w..): q0ds.distill_approx.measure_truncation
              on the prefix population: the teacher cache's top-N truncation error (N = TRUNCATION_NS) on the
              reference student's first TRUNCATION_WINDOWS train windows from its top1 start, and one
              micro-batch's cached vs on-the-fly teacher time (measured in this process while jobs run: noisy).
Cell = (arm, budget, K, seed): complete when the population, the student and its no-teacher control are.
    retained = (best member - student) / (best member - mixture)          val NLL; best member chosen on fitness
Tables show complete cells only, each row with its n; intervals are 95% t intervals over seeds.
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from benchmarks import de_jobs, dr_arms
from benchmarks.common import ci as common_ci, write_json
from benchmarks.de_eval import _nll

GOAL_RETENTION, GOAL_COMPUTE_SHARE = 0.80, 0.25
MIN_GAIN_NATS = 1e-4            # a mixture gain below this leaves retention undefined (None)
TRUNCATION_NS, TRUNCATION_WINDOWS, TRUNCATION_REPEATS = (8, 32, 128), 64, 5   # the cache's approximation
SATURATION_STEP = 0.05          # the retention curve saturates where the next doubling adds less than this


def ci(xs) -> dict | None:
    """benchmarks.common.ci; one value: the mean with no interval."""
    return common_ci(xs, single=True)


def retention(best: float, model: float, mixture: float):
    """(best member - model) / (best member - mixture); None when the mixture does not beat the best member by
    more than MIN_GAIN_NATS (a prior that puts all weight on the best member gives a 'gain' of float rounding,
    and a ratio over it is noise)."""
    gain = best - mixture
    return (best - model) / gain if gain > MIN_GAIN_NATS else None


# ------------------------------------------------------------------ evaluation of finished runs
def population_record(dest: Path, ks) -> dict:
    import torch
    from q0ds.prior import mixture_nll, read_prior_json, top_k
    from q0ds.snapshot import list_snapshots, load_scores, member_id, read_meta
    snaps = list_snapshots(dest)
    prior = read_prior_json(dest / "prior.json")
    ids = [member_id(s) for s in snaps]
    if ids != prior["members"]:
        raise SystemExit(f"[distill_retention] {dest}/prior.json names other members than the dir holds")
    splits = ["fitness", "val"] + (["test"] if all((s / "test.safetensors").is_file() for s in snaps) else [])
    P = {sp: torch.stack([load_scores(s, sp) for s in snaps]) for sp in splits}
    metas = [read_meta(s) for s in snaps]
    rows = [{"member": ids[i], "cycle": m["cycle"], "epoch": m["epoch"], "prior_weight": prior["weights"][i],
             **{f"{sp}_loss": _nll(P[sp][i]) for sp in splits}} for i, m in enumerate(metas)]
    topk = {}
    for K in ks:
        if K <= len(ids):
            idx, w = top_k(prior["weights"], K)
            topk[str(K)] = {"members": [ids[i] for i in idx], "weights": [float(x) for x in w],
                            **{f"{sp}_loss": mixture_nll(P[sp][idx], w) for sp in splits}}
    bf = min(rows, key=lambda r: r["fitness_loss"])
    bv = min(rows, key=lambda r: r["val_loss"])
    cfg = json.loads((dest / "config.json").read_text())
    start = cfg["distill"]["start_cycle"] if cfg["distill"]["enabled"] else len(rows)
    before = rows[start - 1]["epoch"] if 0 < start <= len(rows) else 0.0
    return {"members": len(ids), "splits": splits, "snapshots": rows,
            "prior": {"fit_loss": prior.get("fit_loss"), "chosen": prior.get("chosen"),
                      "fitness_tokens": prior.get("fitness_tokens")},
            "topk": topk,
            "best_on_fitness": {k: bf[k] for k in bf if k != "prior_weight"},
            "best_on_val_oracle": {k: bv[k] for k in bv if k != "prior_weight"},
            "epochs_actual": rows[-1]["epoch"], "teacher_epochs_actual": rows[-1]["epoch"] - before if start < len(rows) else 0.0,
            "prior_by_fitness_tokens": prior_by_fitness_tokens(P["fitness"]),
            "prefix": json.loads((dest / "prefix.json").read_text())}


FITNESS_SIZES, FITNESS_HELD_OUT = (750, 1500, 3000, 6000, 12000), 4000


def prior_by_fitness_tokens(F) -> dict:
    """The fitness-set size decided on fitness alone (issue 20): the prior fitted on the first n fitness tokens
    (n in FITNESS_SIZES) and scored on the LAST FITNESS_HELD_OUT fitness tokens, which no fit reads, against
    the uniform mixture there. F: [members, fitness tokens] per-token probabilities."""
    from benchmarks.de_eval import PRIOR_CLIP, PRIOR_LR, PRIOR_STEPS
    from q0ds.prior import fit_prior, mixture_nll
    held = F[:, -FITNESS_HELD_OUT:]
    M = F.shape[0]
    out = {"held_out_tokens": FITNESS_HELD_OUT, "uniform_held_out_loss": mixture_nll(held, [1.0 / M] * M), "by_n": {}}
    for n in FITNESS_SIZES:
        if n <= F.shape[1] - FITNESS_HELD_OUT:
            loss = mixture_nll(held, fit_prior(F[:, :n], steps=PRIOR_STEPS, lr=PRIOR_LR, clip=PRIOR_CLIP).weights)
            out["by_n"][str(n)] = {"held_out_loss": loss, "gain_over_uniform": out["uniform_held_out_loss"] - loss}
    return out


def student_record(out: Path) -> dict:
    from q0ds.snapshot import list_snapshots, load_scores, read_meta
    snaps = list_snapshots(out)
    splits = ["fitness", "val"] + (["test"] if all((s / "test.safetensors").is_file() for s in snaps) else [])
    curve = []
    for s in snaps:
        m = read_meta(s)
        curve.append({"cycle": m["cycle"], "epoch": m["epoch"], "step": m["step"],
                      **{f"{sp}_loss": _nll(load_scores(s, sp)) for sp in splits}})
    rep = json.loads((out / "distill_report.json").read_text())
    return {**{k: v for k, v in curve[-1].items() if k.endswith("_loss")}, "epochs_actual": curve[-1]["epoch"],
            "steps": curve[-1]["step"], "curve": curve,
            "command_report": {"fraction_retained_val_oracle": rep["fraction_retained"], "val_loss": rep["val_loss"],
                               "members": rep["members"], "weights": rep["weights"], "init": rep["init"],
                               "alpha": rep["alpha"], "temperature": rep["temperature"],
                               "train_seconds": rep["cost"]["train_seconds"], "same_val_set": rep["same_val_set"]}}


def truncation_key(args, E) -> str:
    return (f"truncation_E{dr_arms._b(E)}|k" + ",".join(map(str, sorted(set(args.ks)))) + "|n"
            + ",".join(map(str, TRUNCATION_NS)) + f"|w{TRUNCATION_WINDOWS}")


def eval_keys(args, run) -> list[str]:
    if run.kind == "q0":
        return ([f"population_E{dr_arms._b(E)}|k" + ",".join(map(str, sorted(set(args.ks)))) for E in args.budgets]
                + [truncation_key(args, E) for E in args.budgets])
    return ["student"]


def truncation_record(args, dest: Path) -> dict:
    """{K: measure_truncation(prefix population, K)} for every studied K the population has, with the reference
    student's settings (its seed, T, alpha: the windows and teacher the reference and cache32 students see)."""
    from q0ds.data import PreparedData
    from q0ds.distill_approx import measure_truncation
    vocab = PreparedData.open(json.loads((dest / "config.json").read_text())["data"]).vocab_size
    members = len(json.loads((dest / "prefix.json").read_text())["members"])
    ov = dr_arms.overrides_of(dr_arms.settings_of("ref"), args.student_cycle_epochs)
    return {str(K): measure_truncation(dest, K, [n for n in TRUNCATION_NS if n <= vocab], TRUNCATION_WINDOWS, ov,
                                       TRUNCATION_REPEATS, args.threads)
            for K in sorted(set(args.ks)) if K <= members}


def _compute(args, run, key: str):
    if key.startswith("truncation_E"):
        E = float(key[len("truncation_E"):].split("|")[0])
        return truncation_record(args, dr_arms.make_prefix(args, run, E))
    if key.startswith("population_E"):
        E = float(key[len("population_E"):].split("|")[0])
        dest = dr_arms.make_prefix(args, run, E)
        return population_record(dest, sorted(set(args.ks)))
    return student_record(run.run_dir)


def run_eval(args, run, key: str, optional: bool = False):
    """From the ledger when it has it, else from the finished run's files (then recorded); None otherwise.
    optional: a ledger entry without the key whose files are gone gives None (a measurement added later)."""
    L = de_jobs.LEDGER
    if L is not None and L.has(run):
        v = L.get(run, key)
        if v is not None:
            return v
    if de_jobs.disk_complete(run):
        v = _compute(args, run, key)
        if L is not None:
            L.put(run, key, v, timing=de_jobs.read_timing(run))
        return v
    if L is not None and L.has(run) and not optional:
        raise SystemExit(f"[distill_retention] the ledger {L.path} has {run.name} without '{key}' and its files are "
                         "gone: report with the settings it was recorded with, or delete its entry to retrain it")
    return None


def record(args, run) -> None:
    for key in eval_keys(args, run):
        run_eval(args, run, key)


# ------------------------------------------------------------------ cells and tables
def flop_model(args, data_info: dict) -> dict:
    """FLOPs per token of the study's model (q0ds.plan.time_plan, the model behind de_honest.flop_model):
    training 6N + 12Lhs, a forward 2N + 4Lhs."""
    from q0ds.plan import ARCH, time_plan
    arch = dict(ARCH[args.preset], vocab_size=data_info["vocab_size"])
    tp = time_plan(arch, gpus=1, tokens_per_step=1, seq_len=data_info["seq_len"], teacher=True)
    return {"train_per_token": tp["student_flops_per_token"], "forward_per_token": tp["teacher_flops_per_token"],
            "source": f"q0ds.plan.time_plan(ARCH[{args.preset!r}] with vocab {data_info['vocab_size']}, "
                      f"seq_len={data_info['seq_len']})", "assumptions": tp["assumptions"][:2]}


def compute_share(fm: dict, pop: dict, student: dict, k: int, alpha: float) -> float:
    """Student epochs x (train + K member forwards per token) / the population's training FLOPs (its epochs x
    train + its chain-distillation teacher forwards); tokens per epoch cancel; scoring not counted."""
    t, f = fm["train_per_token"], fm["forward_per_token"]
    k_eff = k if alpha > 0 else 0
    return student["epochs_actual"] * (t + k_eff * f) / (pop["epochs_actual"] * t + pop["teacher_epochs_actual"] * f)


def collect(args, runs) -> dict:
    """{"pop": {E: {seed: record}}, "runs": {name: record}, "cells": {...}} from finished runs only."""
    out = {"pop": {}, "runs": {}, "cells": {}, "truncation": {}}
    ks = "k" + ",".join(map(str, sorted(set(args.ks))))
    for r in runs:
        ok = de_jobs.complete(r)
        if r.kind == "q0":
            for E in args.budgets:
                out["cells"][f"population/E{dr_arms._b(E)}/s{r.seed}"] = ok
                if ok:
                    out["pop"].setdefault(dr_arms._b(E), {})[r.seed] = run_eval(args, r, f"population_E{dr_arms._b(E)}|{ks}")
                    t = run_eval(args, r, truncation_key(args, E), optional=True)
                    if t is not None:
                        out["truncation"].setdefault(dr_arms._b(E), {})[r.seed] = t
        else:
            out["cells"][r.name] = ok
            if ok:
                out["runs"][r.name] = run_eval(args, r, "student")
    return out


def _timing_s(run) -> float | None:
    t = de_jobs.read_timing(run)
    return round(sum(v["seconds"] for v in t.values()), 1) if t else None


def arm_row(args, C, by, fm, arm: str, label: str, E, s: dict) -> dict:
    """One arm at one (budget, K) over the seeds whose population, student and control are complete."""
    K = s["k"]
    c = dr_arms.control_settings(s, args.ks[0])
    per = {}
    for seed in range(args.seeds):
        pop = C["pop"].get(dr_arms._b(E), {}).get(seed)
        sn, cn = dr_arms.student_name(E, s, seed), dr_arms.control_name(E, c, seed)
        st, ct = C["runs"].get(sn), C["runs"].get(cn)
        if pop is None or st is None or ct is None or str(K) not in pop["topk"]:
            continue
        mix, bf, bv = pop["topk"][str(K)], pop["best_on_fitness"], pop["best_on_val_oracle"]
        row = {"student_val": st["val_loss"], "control_val": ct["val_loss"], "best_member_val": bf["val_loss"],
               "best_member": bf["member"], "mixture_val": mix["val_loss"],
               "retained": retention(bf["val_loss"], st["val_loss"], mix["val_loss"]),
               "control_retained": retention(bf["val_loss"], ct["val_loss"], mix["val_loss"]),
               "retained_vs_val_oracle_best": retention(bv["val_loss"], st["val_loss"], mix["val_loss"]),
               "fitness_retained": retention(bf["fitness_loss"], st["fitness_loss"], mix["fitness_loss"]),
               "teacher_effect_val": ct["val_loss"] - st["val_loss"],
               "compute_share": compute_share(fm, pop, st, K, s["alpha"]),
               "student_epochs": st["epochs_actual"], "wall_s": _timing_s(by[sn]), "control_wall_s": _timing_s(by[cn])}
        if "test_loss" in st and "test_loss" in mix:
            row["test_retained"] = retention(bf["test_loss"], st["test_loss"], mix["test_loss"])
        per[seed] = row
    keys = ("retained", "fitness_retained", "test_retained", "retained_vs_val_oracle_best", "control_retained",
            "teacher_effect_val", "student_val", "control_val", "best_member_val", "mixture_val", "compute_share",
            "student_epochs", "wall_s", "control_wall_s")
    return {"arm": arm, "label": label, "budget": E, "k": K, "settings": {k: v for k, v in s.items()},
            "student": dr_arms.settings_key(s), "n": len(per),
            **{k: ci(v.get(k) for v in per.values()) for k in keys}, "per_seed": per}


def one_factor(args, C, by, fm) -> dict:
    E0, K0 = min(args.budgets), args.ks[0]
    rows = []
    for arm in args.arms:
        s = dr_arms.settings_of(arm)
        if s["k"] == dr_arms.REFERENCE["k"]:
            s["k"] = K0
        rows.append(arm_row(args, C, by, fm, arm, dr_arms.VARIANTS[arm][1], E0, s))
    return {"budget": E0, "k": K0, "rows": rows}


def select(args, of: dict) -> dict | None:
    """Per family, the arm (reference included) with the highest mean FITNESS retention among those within the
    compute cap; None until every one-factor arm has every seed. Val is never read here."""
    rows = {r["arm"]: r for r in of["rows"]}
    if any(r["n"] < args.seeds for r in rows.values()) or "ref" not in rows:
        return None
    ref = rows["ref"]
    fams = {}
    for fam in dr_arms.SELECT_FAMILIES:
        cands = ["ref"] + [a for a in args.arms if dr_arms.VARIANTS[a][0] == fam]
        if len(cands) < 2:
            continue
        table = {a: {"fitness_retained": rows[a]["fitness_retained"]["mean"] if rows[a]["fitness_retained"] else None,
                     "compute_share": rows[a]["compute_share"]["mean"]} for a in cands}
        ok = [a for a in cands if table[a]["fitness_retained"] is not None
              and table[a]["compute_share"] <= GOAL_COMPUTE_SHARE]
        win = max(ok, key=lambda a: (table[a]["fitness_retained"], a == "ref")) if ok else "ref"
        diff = ci(rows[win]["per_seed"][sd]["fitness_retained"] - ref["per_seed"][sd]["fitness_retained"]
                  for sd in rows[win]["per_seed"] if sd in ref["per_seed"]
                  and None not in (rows[win]["per_seed"][sd]["fitness_retained"], ref["per_seed"][sd]["fitness_retained"]))
        fams[fam] = {"winner": win, "setting": dr_arms.SETTING_OF_FAMILY[fam],
                     "value": dr_arms.settings_of(win)[dr_arms.SETTING_OF_FAMILY[fam]], "candidates": table,
                     "winner_minus_ref_fitness_retained": diff if win != "ref" else None,
                     "separated": bool(diff and diff["lo"] is not None and (diff["lo"] > 0 or diff["hi"] < 0))}
    return {"families": fams, "budget": of["budget"], "k": of["k"],
            "rule": "per family the highest seed-mean FITNESS retention among arms whose compute share is within "
                    f"{GOAL_COMPUTE_SHARE:.0%} (ties: the reference); val is not read"}


def grid(args, C, by, fm, selection) -> dict:
    """Per (budget, K) cell: the reference, the selected settings and (--length-curve) the reference at every
    student length; complete rows only."""
    out = {}
    for E in args.budgets:
        for K in args.ks:
            rows = []
            arms = dr_arms.grid_arms(selection)
            arms += [(a, dr_arms.settings_of(a)) for a in dr_arms.length_arms(args) if a not in dict(arms)]
            for arm, s in arms:
                label = dr_arms.VARIANTS[arm][1] if arm in dr_arms.VARIANTS else "all selected settings combined"
                row = arm_row(args, C, by, fm, arm, label, E, dict(s, k=K))
                if row["n"]:
                    rows.append(row)
            out[f"E{dr_arms._b(E)}/k{K}"] = rows
    return out


def cell_curves(grid_rows: dict) -> dict:
    """Per cell, the reference's retention vs student length (the reference and the length family's rows) and
    where it saturates."""
    ref = dr_arms.settings_key(dict(dr_arms.settings_of("ref"), epochs=0))
    out = {}
    for cell, rows in grid_rows.items():
        pts = sorted(({"epochs": r["student_epochs"]["mean"], "retained": r["retained"], "n": r["n"],
                       "compute_share": r["compute_share"], "arm": r["arm"]} for r in rows
                      if dr_arms.settings_key(dict(r["settings"], epochs=0)) == ref), key=lambda p: p["epochs"])
        out[cell] = {"points": pts, "saturation": saturation({"points": pts})}
    return out


def truncation_summary(args, C, of) -> dict:
    """The teacher cache's approximation per (budget, K) over seeds (measure_truncation's numbers), and the
    cache32 arm next to the on-the-fly reference at the one-factor cell (retention, wall time)."""
    cells = {}
    for E, by_seed in sorted(C["truncation"].items(), key=lambda x: float(x[0])):
        for K in sorted(set(args.ks)):
            recs = [r[str(K)] for _, r in sorted(by_seed.items()) if str(K) in r]
            if not recs:
                continue

            def over(f):
                return ci(f(r) for r in recs)
            cells[f"E{E}/k{K}"] = {
                "budget": float(E), "k": K, "n": len(recs), "windows": recs[0]["windows"], "tokens": recs[0]["tokens"],
                "exact_kl": over(lambda r: r["exact_kl"]),
                "on_the_fly_target_s": over(lambda r: r["timing"]["on_the_fly"]["target_s"]["median"]),
                "on_the_fly_loss_s": over(lambda r: r["timing"]["on_the_fly"]["loss_s"]["median"]),
                "rows": [{"N": int(n), **{k: over(lambda r, k=k: r["by_n"][n][k]) for k in
                                          ("mass_mean", "mass_min", "relative_error", "abs_error", "grad_cosine")},
                          "cached_target_s": over(lambda r: r["timing"]["cached"][n]["target_s"]["median"]),
                          "cached_loss_s": over(lambda r: r["timing"]["cached"][n]["loss_s"]["median"]),
                          "loss_speedup": over(lambda r: r["timing"]["cached"][n]["loss_speedup"]),
                          "cache_bytes_per_token": recs[0]["by_n"][n]["cache_bytes_per_token"]}
                         for n in recs[0]["by_n"]]}
    rows = {r["arm"]: r for r in of["rows"]}
    arm = None
    if "cache32" in rows and rows["cache32"]["n"] and rows["ref"]["n"]:
        c, f = rows["cache32"], rows["ref"]
        both = [sd for sd in c["per_seed"] if sd in f["per_seed"]]

        def paired(g):
            return ci(g(c["per_seed"][sd], f["per_seed"][sd]) for sd in both)
        arm = {"budget": of["budget"], "k": of["k"], "n": len(both), "retained": c["retained"], "ref_retained": f["retained"],
               "retained_minus_ref": paired(lambda a, b: None if None in (a["retained"], b["retained"])
                                            else a["retained"] - b["retained"]),
               "student_val": c["student_val"], "ref_student_val": f["student_val"],
               "wall_s": c["wall_s"], "ref_wall_s": f["wall_s"],
               "wall_ratio": paired(lambda a, b: a["wall_s"] / b["wall_s"] if a["wall_s"] and b["wall_s"] else None)}
    return {"ns": list(TRUNCATION_NS), "windows": TRUNCATION_WINDOWS, "cells": cells, "cache32_vs_reference": arm}


def curves(args, C, by, fm, of) -> list[dict]:
    """Retention vs student epochs at the one-factor cell: one line per setting family (all knobs but the
    length equal), students and no-teacher controls; complete points only."""
    E0, K0 = of["budget"], of["k"]
    lines = {}
    for r in of["rows"]:
        if not r["n"]:
            continue
        s = r["settings"]
        key = dr_arms.settings_key(dict(s, epochs=0))
        ln = lines.setdefault(key, {"family": key, "kind": "student", "arms": [], "points": []})
        ln["arms"].append(r["arm"])
        ep = r["student_epochs"]["mean"]                    # actual epochs (cycles x --student-cycle-epochs)
        ln["points"].append({"epochs": ep, "retained": r["retained"], "n": r["n"],
                             "compute_share": r["compute_share"]})
        c = dr_arms.control_settings(s, K0)
        ckey = "control-" + dr_arms.settings_key(dict(c, epochs=0))
        cl = lines.setdefault(ckey, {"family": ckey, "kind": "control", "arms": [], "points": []})
        if all(p["epochs"] != ep for p in cl["points"]):
            cl["points"].append({"epochs": ep, "retained": r["control_retained"], "n": r["n"]})
    for ln in lines.values():
        ln["points"].sort(key=lambda p: p["epochs"])
        ln["label"] = ("no-teacher control, " if ln["kind"] == "control" else "") + ln["family"].replace("-ep0", "")
    return sorted(lines.values(), key=lambda l: (l["kind"] != "student", l["family"]))


def saturation(line: dict | None) -> dict | None:
    pts = [p for p in (line or {}).get("points", []) if p["retained"]]
    if len(pts) < 2:
        return None
    for a, b in zip(pts, pts[1:]):
        if b["retained"]["mean"] - a["retained"]["mean"] < SATURATION_STEP:
            return {"saturates_at_epochs": a["epochs"], "retained": a["retained"]["mean"],
                    "next": {"epochs": b["epochs"], "retained": b["retained"]["mean"]}}
    return {"saturates_at_epochs": None, "retained": pts[-1]["retained"]["mean"], "up_to_epochs": pts[-1]["epochs"]}


def goal_check(args, grid_rows, selection, of) -> dict:
    cells = {}
    for cell, rows in grid_rows.items():
        if not rows:
            cells[cell] = None
            continue
        capped = [r for r in rows if r["compute_share"]["mean"] <= GOAL_COMPUTE_SHARE]
        pool = capped or rows             # nothing within the cap: report the cheapest-best anyway, flagged
        scored = [r for r in pool if r["fitness_retained"]]
        pick = (max(scored, key=lambda r: r["fitness_retained"]["mean"]) if scored
                else min(pool, key=lambda r: r["compute_share"]["mean"]))
        v = pick["retained"]
        within = pick["compute_share"]["mean"] <= GOAL_COMPUTE_SHARE
        cells[cell] = {"arm": pick["arm"], "chosen_on": "fitness retention" if scored else "none (no fitness gain)",
                       "n": pick["n"], "retained": v, "compute_share": pick["compute_share"]["mean"],
                       "within_compute_cap": within,
                       "meets_mean": bool(within and v and v["mean"] >= GOAL_RETENTION),
                       "meets_interval": bool(within and v and v["lo"] is not None and v["lo"] >= GOAL_RETENTION)}
    done = [c for c in cells.values() if c]
    scored = [c for c in done if c["retained"]]
    best = max(scored, key=lambda c: (c["within_compute_cap"], c["retained"]["mean"])) if scored else None
    return {"goal": f"retained >= {GOAL_RETENTION:.0%} with the student's extra compute <= {GOAL_COMPUTE_SHARE:.0%} "
                    "of the population's training FLOPs, every (budget, K) cell",
            "cells": cells, "all_cells_complete": len(done) == len(cells) and all(c["n"] == args.seeds for c in done),
            "met_everywhere_by_mean": bool(done) and len(done) == len(cells) and all(c["meets_mean"] for c in done),
            "best": best}


def statements(args, res) -> list[str]:
    out = []
    sel = res["selection"]
    if sel is None:
        out.append("Defaults: not decided yet (the one-factor phase is not complete for every seed).")
    else:
        for fam, f in sel["families"].items():
            d = f["winner_minus_ref_fitness_retained"]
            if all(v["fitness_retained"] is None for v in f["candidates"].values()):
                out.append(f"{fam}: undecided (no fitness retention: the mixture does not beat the best member on "
                           "fitness); the default stays.")
            elif f["winner"] == "ref":
                out.append(f"{fam}: the reference ({f['setting']}={dr_arms.REFERENCE[f['setting']]}) is best on "
                           "fitness retention; the data supports keeping the default.")
            elif f["candidates"]["ref"]["compute_share"] > GOAL_COMPUTE_SHARE:
                c = f["candidates"]
                out.append(f"{fam}: {f['setting']}={f['value']} ({f['winner']}) is chosen because the reference's "
                           f"compute share ({c['ref']['compute_share']:.1%}) is above the {GOAL_COMPUTE_SHARE:.0%} cap; "
                           f"fitness retention {c[f['winner']]['fitness_retained']:.1%} vs the reference's "
                           + (f"{c['ref']['fitness_retained']:.1%}." if c['ref']['fitness_retained'] is not None else "-."))
            else:
                out.append(f"{fam}: {f['setting']}={f['value']} ({f['winner']}) beats the reference on fitness "
                           f"retention by {d['mean']:+.1%}" + (f" [{d['lo']:+.1%}, {d['hi']:+.1%}]" if d["lo"] is not None
                                                               else " (one seed)")
                           + ("; the interval excludes 0: the data supports changing the default." if f["separated"]
                              else "; the interval includes 0: not separated from the reference at this n."))
    g = res["goal_check"]
    if not any(g["cells"].values()):
        out.append("Goal: no complete (budget, K) cell yet.")
    elif g["best"] is None:
        out.append("Goal: no retention to judge: in the complete cells the top-K mixture does not beat the best "
                   "member (fitness-chosen) on val.")
    elif g["met_everywhere_by_mean"]:
        out.append(f"Goal met by the mean at every cell (>= {GOAL_RETENTION:.0%} within the compute cap); see the "
                   "interval column for whether it holds at the lower bound.")
    else:
        b = g["best"]
        sat = res["saturation"]
        out.append(f"Goal not met everywhere: best retention {b['retained']['mean']:.1%} (arm {b['arm']}, chosen on "
                   f"fitness, n = {b['n']}, compute share {b['compute_share']:.1%}"
                   + ("" if b["within_compute_cap"] else f", ABOVE the {GOAL_COMPUTE_SHARE:.0%} cap") + ")."
                   + ("" if not sat else f" The reference's retention-vs-length curve saturates at "
                      f"{sat['saturates_at_epochs']:.3g} student epochs ({sat['retained']:.1%})." if sat["saturates_at_epochs"]
                      else f" The reference's curve has not saturated up to {sat['up_to_epochs']:.3g} epochs "
                           f"({sat['retained']:.1%})."))
    sats = {c: v["saturation"] for c, v in res.get("cell_curves", {}).items() if v["saturation"] and len(v["points"]) > 2}
    if sats:
        out.append("Retention vs student length (reference settings) per cell: " + "; ".join(
            f"{c}: " + (f"saturates at {v['saturates_at_epochs']:.3g} epochs ({v['retained']:.1%}; next "
                        f"{v['next']['epochs']:.3g} epochs: {v['next']['retained']:.1%})" if v["saturates_at_epochs"]
                        else f"still rising at {v['up_to_epochs']:.3g} epochs ({v['retained']:.1%})")
            for c, v in sats.items()) + ".")
    return out


def report(args, data_info: dict, runs, command: str) -> dict:
    by = {r.name: r for r in runs}
    C = collect(args, runs)
    fm = flop_model(args, data_info)
    of = one_factor(args, C, by, fm)
    L = de_jobs.LEDGER
    selection = L.doc.get("selection") if L is not None else None
    selection = selection or select(args, of)
    gr = grid(args, C, by, fm, selection)
    cv = curves(args, C, by, fm, of)
    cc = cell_curves(gr)
    ref_line = next((l for l in cv if l["kind"] == "student" and "ref" in l["arms"]), None)
    sessions = L.doc["sessions"] if L is not None else []
    res = {
        "benchmark": "distill_retention",
        "command": command,
        "settings": {k: v for k, v in sorted(vars(args).items()) if k not in ("plan_only", "report_only")},
        "data": data_info,
        "machine_of_last_training_session": L.doc.get("machine") if L is not None else None,
        "flop_model": fm,
        "goal": {"retained": GOAL_RETENTION, "compute_share_max": GOAL_COMPUTE_SHARE,
                 "formula": "retained = (best member - student) / (best member - top-K mixture), val NLL; the best "
                            "member is chosen on the fitness set"},
        "cells": C["cells"], "cells_complete": sum(C["cells"].values()), "cells_planned": len(C["cells"]),
        "incomplete_runs": sorted(r.name for r in runs if not de_jobs.complete(r)),
        "populations": {E: {str(s): v for s, v in sorted(d.items())} for E, d in sorted(C["pop"].items(), key=lambda x: float(x[0]))},
        "population_summary": {E: {"n": len(d), **{k: ci(f(v) for v in d.values()) for k, f in (
            ("best_member_on_fitness_val", lambda v: v["best_on_fitness"]["val_loss"]),
            ("best_member_val_oracle", lambda v: v["best_on_val_oracle"]["val_loss"]),
            *[(f"mixture_k{K}_val", (lambda K: lambda v: v["topk"].get(str(K), {}).get("val_loss"))(K)) for K in args.ks],
            *[(f"gain_k{K}_nats", (lambda K: lambda v: v["best_on_fitness"]["val_loss"] - v["topk"][str(K)]["val_loss"]
                                   if str(K) in v["topk"] else None)(K)) for K in args.ks])}}
            for E, d in sorted(C["pop"].items(), key=lambda x: float(x[0]))},
        "one_factor": of,
        "teacher_cache_approximation": truncation_summary(args, C, of),
        "truncation_per_seed": {E: {str(sd): v for sd, v in sorted(d.items())}
                                for E, d in sorted(C["truncation"].items(), key=lambda x: float(x[0]))},
        "selection": selection,
        "grid": gr,
        "curves": cv,
        "saturation": saturation(ref_line),
        "cell_curves": cc,
        "training_sessions": sessions,
        "training_wall_time_total_s": round(sum(x["end"] - x["start"] for x in sessions), 1),
        "notes": [
            "val/fitness/test loss = mean NLL (nats/token) of the same held-out tokens for every model.",
            "best member: the population member with the lowest FITNESS loss (never val); "
            "'retained_vs_val_oracle_best' uses the val-best member instead (an oracle, for comparison), as does "
            "q0ds distill-ensemble's own distill_report.json (command_report in the ledger).",
            f"the budget-E population is the first E epochs of one {max(args.budgets):g}-epoch q0 run per seed "
            "(hard-linked snapshots, prior refitted by `q0ds fit-prior` on them), as in the data-efficiency benchmark.",
            f"retention is undefined (-) where the mixture beats the best member by <= {MIN_GAIN_NATS:g} nats.",
            "mixture: the prior-weighted top-K (weights renormalised), the students' teacher.",
            "fitness_retained uses fitness NLLs: the prior and the best member are fitted/chosen on that set, so it is "
            "in-sample for the teacher side; it is the selection criterion, val/test are the reported figures.",
            "compute share = student epochs x (train + K teacher forwards per token; 0 forwards when alpha = 0) / the "
            "population's training FLOPs (its epochs + its chain teacher's forwards); a cached teacher "
            "(ensemble.teacher_cache) is charged the same K forwards per epoch: an upper bound; snapshot scoring "
            "is not counted on either side.",
            "control: the same student training with distill.alpha=0 (no teacher): more epochs from the same start.",
            f"saturation: the first student length after which the next doubling adds < {SATURATION_STEP:.0%} retention.",
            "wall_s: the job's wall seconds (launch to exit) as measured by the scheduler.",
            f"teacher cache approximation: q0ds.distill_approx.measure_truncation per population and K, on the "
            f"reference student's first {TRUNCATION_WINDOWS} train windows from its top1 start: the top-N "
            "truncation's KL relative error |KL_N - KL| / KL, the cosine between the truncated and the exact KL "
            "gradients w.r.t. the student logits, the mixture mass the top N covers (mean over tokens); the times "
            "are one micro-batch's teacher target + distillation loss (forward + backward), on the fly (K member "
            "forwards) vs read from a top-N cache, measured in the study's own process while jobs run (noisy). "
            "The cache32 student's wall_s includes building its cache.",
        ],
    }
    res["goal_check"] = goal_check(args, gr, selection, of)
    res["statement"] = statements(args, res)
    out = Path(args.out)
    write_json(out / "distill_retention.json", res)
    (out / "distill_retention.md").write_text(markdown(res))
    plot(res, out / "distill_retention.png")
    return res


# ------------------------------------------------------------------ markdown and plot
def _pct(d) -> str:
    if not d:
        return "-"
    if d["lo"] is None:
        return f"{d['mean']:.1%}"
    return f"{d['mean']:.1%} [{d['lo']:.1%}, {d['hi']:.1%}]"


def _f(d, p=4) -> str:
    return "-" if not d else f"{d['mean']:.{p}f}"


def _rows_table(rows) -> list[str]:
    out = ["| arm | n | retained (val) | retained (fitness) | retained (test) | control retained | student | control | "
           "best member | mixture | extra compute | student epochs | wall s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if not r["n"]:
            out.append(f"| {r['arm']} | 0 | (not run yet) |||||||||||")
            continue
        out.append(f"| {r['arm']} | {r['n']} | {_pct(r['retained'])} | {_pct(r['fitness_retained'])} | "
                   f"{_pct(r['test_retained'])} | {_pct(r['control_retained'])} | {_f(r['student_val'])} | "
                   f"{_f(r['control_val'])} | {_f(r['best_member_val'])} | {_f(r['mixture_val'])} | "
                   f"{r['compute_share']['mean']:.1%} | {r['student_epochs']['mean']:.2f} | {_f(r['wall_s'], 0)} |")
    return out


def markdown(res: dict) -> str:
    st = res["settings"]
    L = ["# Ensemble distillation: how much of the top-K mixture's gain one model keeps (issue 21)", "",
         f"Generated by `{res['command']}` (benchmarks/distill_retention.py; `--report-only` regenerates it from "
         "the ledger). " + f"{res['cells_complete']}/{res['cells_planned']} cells complete.", "",
         "retained = (best member - student) / (best member - top-K mixture), val NLL; the best member is chosen "
         "on the fitness set. Intervals: 95% t over seeds; n = complete seeds (population, student and its "
         "no-teacher control all finished). Extra compute: the student's training + teacher forwards as a share "
         "of the population's training FLOPs.", ""]
    L += ["## Statement", ""] + [f"- {s}" for s in res["statement"]] + [""]
    L += ["## Populations (q0, " + f"{st['preset']} preset, {st['cycle_epochs']:g}-epoch cycles, prefix of one "
          f"{max(st['budgets']):g}-epoch run per seed)", "",
          "| budget | n | best member on fitness (val) | best member on val (oracle) | " +
          " | ".join(f"top-{K} mixture | gain K={K}" for K in st["ks"]) + " |",
          "|---|---|---|---|" + "---|---|" * len(st["ks"])]
    for E, p in res["population_summary"].items():
        L.append(f"| {E} | {p['n']} | {_f(p['best_member_on_fitness_val'])} | {_f(p['best_member_val_oracle'])} | "
                 + " | ".join(f"{_f(p[f'mixture_k{K}_val'])} | {_f(p[f'gain_k{K}_nats'])}" for K in st["ks"]) + " |")
    of = res["one_factor"]
    L += ["", f"## One knob at a time (budget {of['budget']:g}, K = {of['k']}; 'k8' at K = 8)", ""]
    L += _rows_table(of["rows"])
    L += truncation_markdown(res["teacher_cache_approximation"])
    sel = res["selection"]
    L += ["", "## Settings chosen on fitness retention", ""]
    if sel is None:
        L.append("Not yet: every one-factor arm needs every seed.")
    else:
        L += [f"Rule: {sel['rule']}.", "", "| family | winner | setting | fitness retained by candidate | "
              "winner - reference (fitness) |", "|---|---|---|---|---|"]
        for fam, f in sel["families"].items():
            cands = ", ".join(f"{a} {v['fitness_retained']:.1%}" if v["fitness_retained"] is not None else f"{a} -"
                              for a, v in f["candidates"].items())
            L.append(f"| {fam} | {f['winner']} | {f['setting']}={f['value']} | {cands} | "
                     f"{_pct(f['winner_minus_ref_fitness_retained'])} |")
    L += ["", "## Every (budget, K) cell: the reference and the selected settings", ""]
    for cell, rows in res["grid"].items():
        L += [f"### {cell.replace('/', ', ').replace('E', 'budget ').replace('k', 'K = ')}", ""]
        L += (_rows_table(rows) if rows else ["No complete cell yet."]) + [""]
    g = res["goal_check"]
    L += ["## Goal check", "", f"{g['goal']}; per cell the arm with the best FITNESS retention within the cap.", "",
          "| cell | arm | n | retained (val) | extra compute | within cap | mean >= goal | lower bound >= goal |",
          "|---|---|---|---|---|---|---|---|"]
    for cell, c in g["cells"].items():
        L.append(f"| {cell} | - | 0 | - | - | - | - | - |" if c is None else
                 f"| {cell} | {c['arm']} | {c['n']} | {_pct(c['retained'])} | {c['compute_share']:.1%} | "
                 f"{'yes' if c['within_compute_cap'] else 'no'} | "
                 f"{'yes' if c['meets_mean'] else 'no'} | {'yes' if c['meets_interval'] else 'no'} |")
    L += ["", "## Retention vs student epochs", "", "![curve](distill_retention.png)", ""]
    for ln in res["curves"]:
        L.append(f"- {ln['label']}: " + ", ".join(f"{p['epochs']:.3g} ep {_pct(p['retained'])} (n={p['n']})"
                                                   for p in ln["points"]))
    if res.get("cell_curves"):
        L += ["", "Per (budget, K) cell, the reference settings at every student length (retained on val; extra "
              "compute):", "", "| cell | student epochs: retained (extra compute) |", "|---|---|"]
        for cell, v in res["cell_curves"].items():
            L.append(f"| {cell} | " + "; ".join(f"{p['epochs']:.3g}: {_pct(p['retained'])} ({p['compute_share']['mean']:.1%})"
                                                for p in v["points"]) + " |")
    L += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(L) + "\n"


def _num(d, fmt: str) -> str:
    if not d:
        return "-"
    if d["lo"] is None:
        return format(d["mean"], fmt)
    return f"{format(d['mean'], fmt)} [{format(d['lo'], fmt)}, {format(d['hi'], fmt)}]"


def truncation_markdown(t: dict) -> list[str]:
    L = ["", "## Teacher cache: the top-N truncation vs the mixture on the fly", "",
         f"On the reference student's first {t['windows']} train windows, from its top1 start (see Notes). Mass: the "
         "share of the mixture's probability the top N tokens hold (mean over tokens; min over tokens in the JSON). "
         "KL error: |truncated KL - exact KL| / exact KL. Gradient cosine: between the truncated and the exact "
         "KL's gradients w.r.t. the student logits (-: undefined, the mixture is the student's start: a prior with "
         "all its weight on the top member). Time: one micro-batch's teacher target + loss (fwd + bwd), seconds.", ""]
    if not t["cells"]:
        L.append("Not measured yet (no finished population).")
    else:
        L += ["| cell | N | n | mass covered | KL relative error | gradient cosine | loss s, cached | "
              "loss s, on the fly | speed-up | cache bytes / token |", "|---|---|---|---|---|---|---|---|---|---|"]
        for cell, c in t["cells"].items():
            for r in c["rows"]:
                L.append(f"| {cell} | {r['N']} | {c['n']} | {_pct(r['mass_mean'])} | {_pct(r['relative_error'])} | "
                         f"{_num(r['grad_cosine'], '.4f')} | {_num(r['cached_loss_s'], '.4f')} | "
                         f"{_num(c['on_the_fly_loss_s'], '.4f')} | {_num(r['loss_speedup'], '.2f')} | "
                         f"{r['cache_bytes_per_token']:g} |")
    a = t["cache32_vs_reference"]
    L.append("")
    if a is None:
        L.append("cache32 arm: not run (or not complete) next to the reference.")
    else:
        L.append(f"cache32 arm vs the on-the-fly reference (budget {a['budget']:g}, K = {a['k']}, n = {a['n']}): "
                 f"retained {_pct(a['retained'])} vs {_pct(a['ref_retained'])} (difference "
                 f"{_pct(a['retained_minus_ref'])}); job wall time {_num(a['wall_s'], '.0f')} s vs "
                 f"{_num(a['ref_wall_s'], '.0f')} s (ratio {_num(a['wall_ratio'], '.2f')}, cache build included).")
    return L


def _yerr(pts) -> list[list[float]]:
    """matplotlib's [below, above] error bars of points' retained intervals (0 where a seed has no interval)."""
    r = [p["retained"] for p in pts]
    return [[x["mean"] - x["lo"] if x["lo"] is not None else 0 for x in r],
            [x["hi"] - x["mean"] if x["hi"] is not None else 0 for x in r]]


def plot(res: dict, path: Path) -> None:
    from q0ds.report import pyplot, save_figure
    plt = pyplot()
    fig, (a, c, b) = plt.subplots(1, 3, figsize=(18, 4.6))
    for i, ln in enumerate(res["curves"]):
        pts = [p for p in ln["points"] if p["retained"]]
        if not pts:
            continue
        x = [p["epochs"] for p in pts]
        y = [p["retained"]["mean"] for p in pts]
        a.errorbar(x, y, yerr=_yerr(pts), marker="o" if ln["kind"] == "student" else "s", capsize=3,
                   ls="-" if ln["kind"] == "student" else "--", label=ln["label"])
    a.axhline(GOAL_RETENTION, color="k", lw=0.8, ls=":")
    a.set_xscale("log", base=2)
    a.set_xlabel("student epochs")
    a.set_ylabel("gain retained (val)")
    of = res["one_factor"]
    lows = [p["retained"]["mean"] for ln in res["curves"] for p in ln["points"] if p["retained"]]
    clipped = bool(lows) and min(lows) < -2.5
    if clipped:                          # a scratch start sits near -800%: keep the other arms readable
        a.set_ylim(-2.5, max(1.3, max(lows) + 0.1))
    a.set_title(f"budget {of['budget']:g}, K = {of['k']} (95% t intervals)" + (", y clipped at -250%" if clipped else ""))
    if a.get_legend_handles_labels()[0]:
        a.legend(fontsize=7)
    for cell, v in res.get("cell_curves", {}).items():
        pts = [p for p in v["points"] if p["retained"]]
        if len(pts) > 1:
            m = [p["retained"]["mean"] for p in pts]
            line = c.errorbar([p["epochs"] for p in pts], m, yerr=_yerr(pts), marker="o", capsize=3, label=cell)
            over = [(p["epochs"], x) for p, x in zip(pts, m) if p["compute_share"]["mean"] > GOAL_COMPUTE_SHARE]
            if over:                     # beyond the compute cap: hollow markers
                c.plot(*zip(*over), "o", mfc="white", color=line[0].get_color())
    c.axhline(GOAL_RETENTION, color="k", lw=0.8, ls=":")
    c.set_xscale("log", base=2)
    c.set_xlabel("student epochs")
    c.set_ylabel("gain retained (val)")
    c.set_title(f"reference settings, every cell (hollow: extra compute > {GOAL_COMPUTE_SHARE:.0%})")
    if c.get_legend_handles_labels()[0]:
        c.legend(fontsize=7)
    cells = [(c_, r) for c_, rows in res["grid"].items() for r in rows if r["retained"]]
    arms = sorted({r["arm"] for _, r in cells})
    names = list(res["grid"])
    w = 0.8 / max(1, len(arms))
    for j, arm in enumerate(arms):
        xs, ys, es = [], [], []
        for c_, r in cells:
            if r["arm"] == arm:
                xs.append(names.index(c_) + j * w)
                ys.append(r["retained"]["mean"])
                es.append(r["retained"]["mean"] - r["retained"]["lo"] if r["retained"]["lo"] is not None else 0)
        b.bar(xs, ys, width=w, yerr=es, capsize=3, label=arm)
    b.axhline(GOAL_RETENTION, color="k", lw=0.8, ls=":")
    b.set_xticks([i + 0.4 - w / 2 for i in range(len(names))], names)
    b.set_ylabel("gain retained (val)")
    b.set_title("every (budget, K) cell")
    if arms:
        b.legend(fontsize=7)
    save_figure(fig, path)
