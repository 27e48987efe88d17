"""Run-config presets for `q0ds init-config --preset NAME` (every key can still be overridden).

tiny   seconds per step on CPU: tests and CI
small  the CPU benchmark/demo model (0.95M params, cpu-scale.md)
1.8b   the paper's setting on 8-GPU nodes: bf16 ZeRO-3, 524k-token peak batch, 2-epoch cycles, Muon
"""
from __future__ import annotations

PRESETS = {
    "tiny": {
        "model": {"preset": "tiny"},
        "train": {"seq_len": 32, "micro_batch": 4, "global_batch": 8, "ckpt_every": 4},
        "optim": {"lr": 3e-3, "weight_decay": 1.0},
        "schedule": {"cycles": 3, "cycle_epochs": 1.0},
        "distill": {"start_cycle": 1},
        "eval": {"batch": 16},
    },
    "small": {
        "model": {"preset": "small"},
        "train": {"seq_len": 128, "micro_batch": 16, "global_batch": 32, "ckpt_every": 100},
        "optim": {"lr": 3e-3, "weight_decay": 1.0},
        "schedule": {"cycles": 8, "cycle_epochs": 1.0},
        "distill": {"start_cycle": 2},
        "eval": {"batch": 32},
    },
    "1.8b": {
        "ds_config": "ds_configs/zero3_bf16.hjson",
        "model": {"preset": "1.8b", "dtype": "bf16", "dropout": 0.1},
        # 256 x 2048 = 524,288 tokens peak; 192 x 2048 = 393,216 early/late (method.md)
        "train": {"seq_len": 2048, "micro_batch": 4, "global_batch": 256, "small_batch": 192, "ckpt_every": 200,
                  "grad_clip": 1.0},
        # The reference recipe (slowrun unlimited/train.py, effective LR = flag x lr_multiplier 0.25; method.md
        # "Scale of the real run"): Muon 0.04x0.25 on matrices (DeepSpeed's Muon scales it by
        # sqrt(max(1, rows/cols)) per matrix, as the reference), AdamW embeddings 0.15x0.25, head 0.002x0.25,
        # scalars 0.1x0.25 (WD 0), betas (0.8, 0.95), eps 1e-10, WD 1.3; grad clip 1.0 on the raw gradients.
        "optim": {"name": "muon", "muon_lr": 0.01, "lr": 0.0375, "embed_lr": 0.0375, "head_lr": 0.0005,
                  "scalar_lr": 0.025, "betas": [0.8, 0.95], "eps": 1e-10, "weight_decay": 1.3, "muon_momentum": 0.95},
        "schedule": {"cycles": 96, "cycle_epochs": 2.0},
        "distill": {"start_cycle": 8},
        "eval": {"batch": 8},
    },
}


def preset_config(name: str, data: str, run_dir: str) -> dict:
    from .config import ConfigError
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    import copy
    d = copy.deepcopy(PRESETS[name])
    d.update(data=str(data), run_dir=str(run_dir))
    return d
