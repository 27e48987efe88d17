"""What differs between the supported dependency versions (setup.py ranges), in one place.

- Optional packages (the extras of setup.py): `require` imports one or raises MissingExtra, a user error
  (ConfigError, so every entry point prints one line and exits 2) naming the extra to install.
- transformers 5.17 (the floor) lacks two names q0ds uses from 5.23: `prevent_arange_dtype_change`
  (integrations/deepspeed.py) and `PreTrainedModel.activation_checkpointing_enable` (the new name of
  gradient_checkpointing_enable). `prevent_arange_dtype_change` and `enable_activation_checkpointing` give
  the 5.23 behaviour on both.
"""
from __future__ import annotations

import contextlib
import importlib
from pathlib import Path

from .config import ConfigError


class MissingExtra(ConfigError, ImportError):
    """An optional dependency is not installed (an ImportError too, for `except ImportError` callers)."""


def require(module: str, extra: str, what: str):
    """import `module`, or raise MissingExtra: "<what> needs `pip install q0ds[<extra>]` (<module> ...)"."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtra(f"{what} needs `pip install q0ds[{extra}]` ({module} is not installed: {e})") from None


def missing_extra(extra: str, what: str, error: ImportError) -> MissingExtra:
    """MissingExtra for an ImportError already caught (a `from x import y` at a module's top)."""
    return MissingExtra(f"{what} needs `pip install q0ds[{extra}]` ({error})")


# ------------------------------------------------------------------ checkout or installed package
SHIPPED = ("launchers/train.py", "ds_configs/")       # copied into the wheel as q0ds/_shipped/ (setup.py build_py)


def repo_file(rel) -> Path:
    """<checkout>/<rel> when q0ds runs from a checkout (or an editable install), else the copy shipped in the
    installed package (q0ds/_shipped/<rel>): launchers/train.py and ds_configs/*.hjson live outside the package."""
    pkg = Path(__file__).resolve().parent
    checkout = pkg.parent / rel
    return checkout if checkout.exists() else pkg / "_shipped" / rel


# ------------------------------------------------------------------ transformers < 5.23
@contextlib.contextmanager
def keep_arange_dtype():
    """transformers 5.23's prevent_arange_dtype_change (integrations/deepspeed.py:777-813), for 5.17-5.22.

    Why it matters: deepspeed.zero.Init, on entry, replaces torch's tensor constructors with
    zero_wrapper_for_fp_tensor_constructor(fn, target_fp_dtype, target_device) (deepspeed/runtime/zero/
    partition_parameters.py:263-275, installed in Init._add_tensor_creation_wrappers :637-672, torch.arange
    at :664), whose result is cast to the engine dtype whenever it is floating (:270-271). Qwen3's RoPE computes
    inv_freq = 1 / base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim) (models/qwen3/modeling_qwen3.py
    :118 in 5.23, :121 in 5.17), so with bf16 inv_freq comes out bf16 (relative error 3.7e-3, growing with
    position). As in 5.23, this context (entered BEFORE zero.Init) swaps the wrapper factory so that arange
    only gets zero.Init's device, never its dtype; every other constructor is wrapped as before."""
    from deepspeed.runtime.zero import partition_parameters as pp
    factory = pp.zero_wrapper_for_fp_tensor_constructor

    def factory_keeping_arange(fn, *args, **kwargs):
        if fn is not pp._orig_torch_arange:
            return factory(fn, *args, **kwargs)
        target_device = kwargs.get("target_device", args[1] if len(args) > 1 else None)

        def arange(*a, **kw):
            if kw.get("device") is None and target_device is not None:
                kw["device"] = target_device
            return fn(*a, **kw)
        return arange

    pp.zero_wrapper_for_fp_tensor_constructor = factory_keeping_arange
    try:
        yield
    finally:
        pp.zero_wrapper_for_fp_tensor_constructor = factory


def prevent_arange_dtype_change():
    """transformers' own helper where it has one (5.23+), else keep_arange_dtype (same behaviour)."""
    try:
        from transformers.integrations.deepspeed import prevent_arange_dtype_change as own
    except ImportError:
        return keep_arange_dtype()
    return own()


def enable_activation_checkpointing(model, kwargs: dict):
    """model.activation_checkpointing_enable(kwargs) (transformers 5.23: modeling_utils.PreTrainedModel), or
    its former name gradient_checkpointing_enable (5.17), which takes the same gradient_checkpointing_kwargs."""
    fn = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    fn(kwargs)
