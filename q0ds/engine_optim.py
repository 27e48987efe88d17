"""Part of the DeepSpeed boundary (used only by engine.py): which optimizer kernels a node can run.

A GPU node may have the CUDA runtime (torch's wheel) but no CUDA toolkit (nvcc, CUDA_HOME) and no C compiler.
DeepSpeed 0.19.8 then fails in two places that CPU tests never reach (docs/gpu.md):

1. Adam kernels. Without `torch_adam`, DeepSpeed builds FusedAdam by JIT for AdamW and for Muon's AdamW groups
   (runtime/engine.py:2377-2409 get_optimizer_configuration; ops/adam/fused_adam.py:94 FusedAdamBuilder().load()).
   Without a toolkit the build raises OSError/MissingCUDAException; Muon's fallback catches RuntimeError only
   (runtime/zero/muon/muon_optimizer.py:30-35) and plain AdamW has none. `choose_adam` tries the same load
   DeepSpeed would do (cached in OpBuilder._loaded_ops on success, so no second build) and otherwise sets
   `torch_adam: true`: torch.optim.AdamW (foreach on CUDA), the same update rule.
2. Newton-Schulz. `muon_update` and both Newton-Schulz functions are `torch.compile`d at import
   (runtime/zero/muon/original_muon.py:50,81,189; runtime/compiler.py:125-129). Inductor needs a C compiler at
   run time: Triton's launcher stub on CUDA (CC, else gcc, else clang), C++ code on CPU (CXX, else g++;
   torch/_inductor/config.py:1690). `choose_muon_compile` checks for them (override: Q0DS_MUON_COMPILE=0|1)
   and `use_eager_muon` swaps the uncompiled functions in. Every DeepSpeed caller imports `muon_update` from
   the module at call time (stage3.py:1706,2592; stage_1_and_2.py:2064,2749,2858; bf16_optimizer.py:444), and
   the eager `muon_update` calls the Newton-Schulz functions through module globals, so replacing the module
   attributes reaches every call; muon_optimizer.py imported its own name at import and is replaced too.
"""
from __future__ import annotations

import copy
import importlib
import os
import shutil
import sys

import torch

MUON_COMPILE_ENV = "Q0DS_MUON_COMPILE"
_NS_FUNCTIONS = ("muon_update", "zeropower_via_newtonschulz5", "zeropower_via_gram_newtonschulz")


class RuntimeChoiceError(ValueError):
    pass


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip().rstrip(":")


def fused_adam_error() -> str | None:
    """None if DeepSpeed's FusedAdam kernel loads on this accelerator, else why not (one line)."""
    from deepspeed.accelerator import get_accelerator
    try:
        builder = get_accelerator().create_op_builder("FusedAdamBuilder")
        if builder is None:
            return f"no FusedAdam kernel for accelerator {get_accelerator()._name}"
        builder.load(verbose=False)
    except Exception as e:        # OSError (no CUDA_HOME/nvcc), MissingCUDAException, RuntimeError (no ninja, build failed)
        return _first_line(e)
    return None


def choose_adam(ds_cfg: dict) -> tuple[dict, str]:
    """(config, note): the engine config with `torch_adam: true` where DeepSpeed's FusedAdam cannot load, and
    one line saying which Adam implementation the AdamW groups will use and why."""
    opt = ds_cfg.get("optimizer") or {}
    kind = str(opt.get("type", "")).lower()
    params = opt.get("params") or {}
    if kind not in ("adam", "adamw", "muon"):
        return ds_cfg, f"{opt.get('type')} (not an Adam variant)"
    if params.get("torch_adam"):
        return ds_cfg, "torch.optim.AdamW (torch_adam: true in the DeepSpeed config)"
    offload = (ds_cfg.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    if offload and kind != "muon":
        return ds_cfg, "DeepSpeedCPUAdam (offload_optimizer)"
    err = fused_adam_error()
    if err is None:
        return ds_cfg, "DeepSpeed FusedAdam"
    c = copy.deepcopy(ds_cfg)
    c["optimizer"].setdefault("params", {})["torch_adam"] = True
    return c, f"torch.optim.AdamW (DeepSpeed FusedAdam cannot load: {err})"


def describe_optimizer(engine) -> str:
    """What DeepSpeed actually built, e.g. 'MuonWithAuxAdam + torch.optim.AdamW (foreach=None)'."""
    basic = getattr(engine, "basic_optimizer", None)
    if basic is None:
        return "none"
    name = type(basic).__name__
    if hasattr(basic, "aux_optimizer"):
        aux = basic.aux_optimizer
        if aux is None:
            return f"{name} + Muon's inline Adam"
        return f"{name} + {_optimizer_name(aux)}"
    return _optimizer_name(basic)


def _optimizer_name(opt) -> str:
    cls = type(opt)
    if cls.__module__.startswith("torch.optim"):
        d = opt.defaults
        return f"torch.optim.{cls.__name__} (foreach={d.get('foreach')}, fused={d.get('fused')})"
    return f"{cls.__module__}.{cls.__name__}"


# ---------------------------------------------------------------- Newton-Schulz compilation
def compiler_missing(device_type: str) -> str | None:
    """None if torch.compile can build kernels for `device_type` here, else what is missing (one line)."""
    try:
        import torch._inductor  # noqa: F401
    except Exception as e:          # a torch build without inductor
        return f"torch._inductor is not importable ({_first_line(e)})"
    if device_type == "cuda":
        try:
            import triton  # noqa: F401
        except Exception as e:
            return f"Triton is not importable ({_first_line(e)})"
        cc = os.environ.get("CC")               # Triton's own search: CC, then gcc, then clang
        if cc:
            return None if shutil.which(cc) else f"CC={cc} is not an executable"
        return None if (shutil.which("gcc") or shutil.which("clang")) else \
            "no C compiler for Triton (CC unset, no gcc or clang on PATH)"
    cxx = os.environ.get("CXX") or "g++"        # inductor's CPU C++ compiler (config.cpp.cxx)
    return None if shutil.which(cxx) else f"no C++ compiler for inductor's CPU backend ({cxx} not on PATH; set CXX)"


def choose_muon_compile(device_type: str) -> tuple[bool, str]:
    """(compile?, why) for Newton-Schulz on `device_type` (cuda|cpu); Q0DS_MUON_COMPILE=0|1 overrides."""
    env = os.environ.get(MUON_COMPILE_ENV, "").strip()
    if env:
        if env not in ("0", "1"):
            raise RuntimeChoiceError(f"{MUON_COMPILE_ENV}={env!r} is not 0 or 1; set it to 1 (torch.compile "
                                     "Newton-Schulz), 0 (run it uncompiled) or unset it (decide from the node)")
        return env == "1", f"{MUON_COMPILE_ENV}={env}"
    missing = compiler_missing(device_type)
    return missing is None, missing or "torch.compile available"


_MUON_MODULES = ("deepspeed.runtime.zero.muon.original_muon", "deepspeed.runtime.zero.muon.muon_optimizer")


def import_muon_uncompiled() -> None:
    """For an engine without Muon. DeepSpeed's ZeRO optimizer check imports Muon's module only to put its class
    on the supported list (runtime/zero/utils.py:66-77, is_zero_supported_optimizer), and that import
    `torch.compile`s three functions (original_muon.py:50,81,189 via runtime/compiler.py:125-129), which
    imports inductor: ~1.9 s of CPU per rank per launch, measured here. Import it with torch.compile as the
    identity instead; `import_muon_compiled` re-imports it compiled if a Muon engine follows in this process."""
    if _MUON_MODULES[1] in sys.modules:
        return
    real = torch.compile
    torch.compile = lambda model=None, **kw: (lambda fn: fn) if model is None else model
    try:
        importlib.import_module(_MUON_MODULES[1])
    finally:
        torch.compile = real
    sys.modules[_MUON_MODULES[0]]._q0ds_uncompiled = True


def import_muon_compiled() -> None:
    """Before a Muon engine: undo `import_muon_uncompiled` (re-execute both modules with the real torch.compile)."""
    om = sys.modules.get(_MUON_MODULES[0])
    if om is None or not om.__dict__.get("_q0ds_uncompiled"):
        return
    for name in _MUON_MODULES:
        mod = sys.modules[name]
        for attr in ("_q0ds_uncompiled", "_q0ds_compiled"):
            mod.__dict__.pop(attr, None)
        importlib.reload(mod)


def use_eager_muon(eager: bool = True):
    """Run DeepSpeed's Muon update uncompiled (eager=True) or restore the compiled functions (False)."""
    from deepspeed.runtime.zero.muon import muon_optimizer as mo
    from deepspeed.runtime.zero.muon import original_muon as om
    saved = om.__dict__.setdefault("_q0ds_compiled", {n: getattr(om, n) for n in _NS_FUNCTIONS})
    for name in _NS_FUNCTIONS:
        fn = saved[name]
        setattr(om, name, getattr(fn, "_torchdynamo_orig_callable", fn) if eager else fn)
    mo.muon_update = om.muon_update


def muon_is_eager() -> bool:
    from deepspeed.runtime.zero.muon import original_muon as om
    return not hasattr(om.muon_update, "_torchdynamo_orig_callable")


def runtime_summary(engine, adam_note: str, muon_note: str | None) -> dict:
    info = {"optimizer": describe_optimizer(engine), "adam": adam_note,
            "device": str(engine.device), "torch": torch.__version__}
    if muon_note is not None:
        info["newton_schulz"] = muon_note
    return info
