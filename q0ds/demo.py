"""`q0ds demo` / `make demo`: the main job on the embedded corpus, on CPU, end to end, in minutes.

prepare (embedded CPython docs, BPE 2048) -> 2 q0 bases with chain distillation, side by side through the
deepspeed launcher -> single-model and independent-ensemble baselines at the same epoch budget -> prior ->
eval -> report (runs/demo/report.md). Re-running resumes: finished stages are not redone.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from .config import load_config, save_config
from .presets import preset_config

# The demo's budget, sized with cpu-scale.md: a training split cut to ~40k tokens so that a single model
# saturates within the budget, and 2 bases x 12 one-epoch cycles = 24 epochs of the `small` model.
TRAIN_TOKENS = 40000
DEMO = ["bases=2", "schedule.cycles=12", "schedule.cycle_epochs=1.0", "distill.start_cycle=2"]
QUICK = ["bases=2", "schedule.cycles=3", "schedule.cycle_epochs=0.25", "distill.start_cycle=1",
         "train.seq_len=64", "train.global_batch=16"]


def demo(out="runs/demo", quick: bool = False) -> int:
    from .data import PreparedData, prepare
    from .runner import run_all
    t0 = time.time()
    out = Path(out)
    data = out / "data"
    if not (data / "meta.json").is_file():
        print("[q0ds demo] 1/4 preparing the embedded corpus (CPython's documentation topics, PSF license)")
        prepare(data, embedded=True, vocab_size=2048, max_train_tokens=TRAIN_TOKENS)
    PreparedData.open(data)
    config = out / "config.json"
    cfg = load_config(None, QUICK if quick else DEMO, base=preset_config("small", data=str(data.resolve()), run_dir=str(out)))
    if not config.is_file():
        save_config(cfg, config)
    print(f"[q0ds demo] 2/4 training {cfg.bases} q0 bases x {cfg.schedule.cycles} cycles, then the baselines "
          f"(progress below; logs in {out}/bases/*/train.log)")
    run_all(config, parallel=2, ranks=1, baselines=True, ensemble_members=2 if quick else 4)
    rep = json.loads((out / "report.json").read_text())["headline"]
    print(f"\n[q0ds demo] done in {time.time() - t0:.0f} s. Report: {out / 'report.md'}")
    print(f"  q0 top-{rep['q0_topk']['k']} mixture val loss:  {rep['q0_topk']['val_loss']:.4f}  (K chosen on the fitness set)")
    print(f"  best single q0 member:        {rep['q0_best_single_member']:.4f}")
    if "single_model_best" in rep:
        print(f"  single-model baseline (best): {rep['single_model_best']:.4f} (epoch {rep['single_saturation_epoch']:.1f}, "
              f"chosen on validation)")
    if "ensemble_baseline" in rep:
        print(f"  independent ensemble:         {rep['ensemble_baseline']:.4f}")
    if "strongest_baseline" in rep:
        sb, e = rep["strongest_baseline"], rep["epochs_to_match_strongest"]
        how = ("not reached within q0's budget" if e["ratio"] is None else
               f"q0 reaches it at {e['q0_epochs']:.1f} epochs ({'>=' if e.get('lower_bound') else ''}{e['ratio']:.2f}x"
               + (", q0 is slower)" if e["ratio"] < 1 else " fewer)"))
        print(f"  strongest baseline: {sb['name']} ({sb['val_loss']:.4f}); {how}. One seed, untuned baselines: "
              "see the README's Results for the tuned, multi-seed benchmark.")
    return 0
