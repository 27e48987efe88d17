"""transformers 5.17 (the floor of setup.py) as well as the CI's 5.23.

In process: a model built under deepspeed.zero.Init with bf16 (engine.build_partitioned) keeps RoPE's inv_freq
in fp32, both with transformers' own prevent_arange_dtype_change and with q0ds.compat's copy for 5.17; without
either guard it is bf16 (the control, so the check can fail). Then tests/smoke_floor.py against a real
transformers 5.17.0 (+ the huggingface_hub < 2 it requires), installed once into .cache/tf517 with pip.
"""
import contextlib
import copy
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from q0ds import compat
from q0ds import engine as E
from q0ds.config import load_config
from q0ds.model import build_config
from q0ds.presets import preset_config

FLOOR = {"transformers": "5.17.0", "huggingface_hub": "1.33.0"}    # 5.17 requires huggingface-hub>=1.5,<2
FLOOR_DIR = ROOT / ".cache" / "tf517"


@pytest.fixture(scope="module")
def bf16_setup():
    E.setup_distributed()
    cfg = load_config(None, [], base=preset_config("tiny", "d", "r"))
    mc = build_config(cfg.model, 128, 0, 1, 16)
    ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, 1)
    ds = copy.deepcopy(ds)
    ds["bf16"] = {"enabled": True}
    return mc, ds


def _inv_freqs(model):
    return [(n, b) for n, b in model.named_buffers() if n.endswith("inv_freq")]


def _reference_inv_freq(mc):
    dim = mc.head_dim
    return 1.0 / (mc.rope_parameters["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def _build(mc, ds, guard, monkeypatch):
    monkeypatch.setattr(compat, "prevent_arange_dtype_change", guard)
    model = E.build_partitioned(mc, 0, ds)
    buffers = _inv_freqs(model)
    assert buffers, "no RoPE inv_freq buffer found"
    return buffers


@pytest.mark.parametrize("guard", ["transformers", "compat"])
def test_inv_freq_stays_fp32_under_zero_init_bf16(bf16_setup, monkeypatch, guard):
    mc, ds = bf16_setup
    fn = compat.prevent_arange_dtype_change if guard == "transformers" else compat.keep_arange_dtype
    ref = _reference_inv_freq(mc)
    for name, b in _build(mc, ds, fn, monkeypatch):
        assert b.dtype == torch.float32, (guard, name, b.dtype)
        assert torch.equal(b.cpu(), ref), (guard, name)
    assert torch.arange(3, dtype=torch.float).dtype == torch.float32          # nothing left patched
    import deepspeed.runtime.zero.partition_parameters as pp
    assert pp.zero_wrapper_for_fp_tensor_constructor.__name__ == "zero_wrapper_for_fp_tensor_constructor"


def test_without_guard_inv_freq_is_bf16(bf16_setup, monkeypatch):
    """The control: the failure the guard prevents (so the test above can fail)."""
    mc, ds = bf16_setup
    ref = _reference_inv_freq(mc)
    for _, b in _build(mc, ds, contextlib.nullcontext, monkeypatch):
        assert b.dtype == torch.bfloat16
        rel = ((b.float().cpu() - ref).abs() / ref).max().item()
        assert rel > 1e-3, rel


def test_compat_picks_the_present_api(monkeypatch):
    import transformers.integrations.deepspeed as tid
    assert compat.prevent_arange_dtype_change().__class__.__name__ == "_GeneratorContextManager"
    monkeypatch.delattr(tid, "prevent_arange_dtype_change")                  # as in 5.17
    assert compat.prevent_arange_dtype_change().gen.__name__ == "keep_arange_dtype"
    calls = []

    class Old:                       # 5.17's PreTrainedModel: gradient_checkpointing_enable only
        def gradient_checkpointing_enable(self, kwargs):
            calls.append(("gradient", kwargs))

    class New(Old):
        def activation_checkpointing_enable(self, kwargs):
            calls.append(("activation", kwargs))
    compat.enable_activation_checkpointing(Old(), {"use_reentrant": False})
    compat.enable_activation_checkpointing(New(), {"use_reentrant": False})
    assert calls == [("gradient", {"use_reentrant": False}), ("activation", {"use_reentrant": False})]


def floor_site() -> str:
    """.cache/tf517 with transformers 5.17.0 and huggingface_hub 1.33 (pip --target --no-deps, once; their other
    requirements are met by the venv: tests/smoke_floor.py checks with importlib.metadata)."""
    stamp = FLOOR_DIR / ".complete"
    if not stamp.is_file():
        cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(FLOOR_DIR), "--upgrade",
               *(f"{k}=={v}" for k, v in FLOOR.items())]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if p.returncode != 0:
            pytest.fail(f"could not install the transformers floor ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
        stamp.write_text(" ".join(f"{k}=={v}" for k, v in FLOOR.items()) + "\n")
    return str(FLOOR_DIR)


@pytest.mark.slow
def test_smoke_against_transformers_5_17(tmp_path):
    """Model build (inv_freq fp32), a 2-rank ZeRO-3 step with activation checkpointing, a checkpoint resume and a
    snapshot reload, all with transformers 5.17.0 (tests/smoke_floor.py)."""
    # its own JIT dir: DeepSpeed's CPU shm op is rebuilt whenever the include paths change (another interpreter
    # path to the same venv), which took minutes here; this one stays valid between runs
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([floor_site(), str(ROOT)]),
               TORCH_EXTENSIONS_DIR=str(ROOT / ".cache" / "tf517-torch-extensions"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)                                # set by the in-process tests above
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "smoke_floor.py"), str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"{p.stdout[-4000:]}\n{p.stderr[-6000:]}"
    assert "smoke_floor: ok transformers 5.17.0" in p.stdout, p.stdout[-3000:]
