"""Where commands put their models: inference (generate, rescore, eval) and DeepSpeed (train, in-process
distill-ensemble, through DS_ACCELERATOR).

`--device auto` (the default) takes the accelerator when torch sees one and the CPU otherwise; an explicit
`cpu`, `cuda` or `cuda:N` overrides it. Models run in bf16 on CUDA (what the snapshots hold) and in fp32 on
the CPU, where bf16 matmuls are slow and the tests compare against fp32 references.
"""
from __future__ import annotations

import torch

from .config import ConfigError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda:0 if available else cpu; 'cpu' / 'cuda' / 'cuda:N' as given (checked)."""
    spec = "auto" if spec is None else str(spec)
    if spec == "auto":
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError as e:
        raise ConfigError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: torch sees no CUDA GPU here; use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible; "
                              f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif dev.type != "cpu":
        raise ConfigError(f"--device {spec}: only cpu and cuda devices are supported")
    return dev


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA, fp32 on the CPU."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def pin_ds_accelerator(spec: str | None = "auto") -> torch.device:
    """Point DeepSpeed at the device of `--device SPEC` before it is imported (deepspeed.md section 12: the
    accelerator is fixed at import). cpu (or auto without a GPU): DS_ACCELERATOR=cpu (auto keeps a value the
    user set); cuda: DS_ACCELERATOR=cuda; auto with a GPU: left to DeepSpeed's detection (cuda)."""
    import os
    spec = "auto" if spec is None else str(spec)
    dev = resolve_device(spec)
    if dev.index not in (None, 0):
        raise ConfigError(f"--device {spec}: a DeepSpeed rank uses the GPU of its LOCAL_RANK; select GPUs with "
                          "CUDA_VISIBLE_DEVICES (or the launcher's --include) and pass --device cuda")
    if dev.type == "cpu":
        if spec == "auto":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        else:
            os.environ["DS_ACCELERATOR"] = "cpu"
    elif spec != "auto" or os.environ.get("DS_ACCELERATOR") == "cpu":
        os.environ["DS_ACCELERATOR"] = "cuda"
    return dev
