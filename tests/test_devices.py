"""--device (issue 19 section 2): auto is the CPU on this machine; an unusable --device is one line and exit 2;
`train`/`distill-ensemble` pin DeepSpeed's accelerator only for the CPU; `rescore`/`eval` put the snapshot model on
the resolved device in its inference dtype."""
import os

import pytest
import torch

from conftest import run_cli
from q0ds import devices
from q0ds.config import ConfigError


def test_auto_is_cpu_here():
    assert not torch.cuda.is_available()
    assert devices.resolve_device("auto") == torch.device("cpu")
    assert devices.inference_dtype(torch.device("cpu")) == torch.float32
    assert devices.inference_dtype(torch.device("cuda", 0)) == torch.bfloat16
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU here; use --device cpu"):
        devices.resolve_device("cuda")


def test_pin_ds_accelerator(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert devices.pin_ds_accelerator("cpu") == torch.device("cpu") and os.environ["DS_ACCELERATOR"] == "cpu"
    monkeypatch.delenv("DS_ACCELERATOR")
    devices.pin_ds_accelerator("auto")                              # no GPU: the CPU
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    # a GPU node (torch's view faked: only the choice of the env var is under test here)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("DS_ACCELERATOR")
    assert devices.pin_ds_accelerator("auto") == torch.device("cuda", 0)
    assert "DS_ACCELERATOR" not in os.environ                        # DeepSpeed detects CUDA itself
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")                     # e.g. left over from a CPU shell
    devices.pin_ds_accelerator("auto")
    assert os.environ["DS_ACCELERATOR"] == "cuda"
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES"):
        devices.pin_ds_accelerator("cuda:1")


@pytest.mark.parametrize("cmd", ["train", "rescore", "eval", "distill-ensemble"])
def test_cuda_without_gpu_is_one_line(cmd, make_config, tmp_path):
    path, cfg = make_config()
    args = ["--config", str(path)] if cmd == "train" else ["--run", str(tmp_path)]
    p = run_cli(cmd, *args, "--device", "cuda", check=False)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert p.stderr.strip().splitlines()[-1].startswith(f"q0ds {cmd}: error: --device cuda: torch sees no CUDA GPU")
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists()


def _snapshot_run(cfg):
    """A run dir with one unscored snapshot of a tiny random model (no training)."""
    from transformers import AutoModelForCausalLM
    from q0ds.config import save_config
    from q0ds.data import PreparedData
    from q0ds.model import build_config
    from q0ds.snapshot import write_snapshot
    from pathlib import Path
    data = PreparedData.open(cfg.data)
    mc = build_config(cfg.model, data.vocab_size, data.eos_id, data.eos_id, cfg.train.seq_len)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(mc)
    save_config(cfg, Path(cfg.run_dir) / "config.json")
    snap = Path(cfg.run_dir) / "bases/base-00/snapshots/cycle-0000"
    write_snapshot(snap, model.state_dict(), mc, data.tokenizer_dir, {"base": 0, "cycle": 0, "step": 1, "epoch": 0.1,
                                                                      "val_loss": None})
    return snap


def test_rescore_places_the_model_with_resolve_device(make_config, monkeypatch):
    """rescore --device X: the model is loaded in inference_dtype(resolve_device(X)) on that device. bf16 is
    forced for the CPU here, so the stored val loss must move by bf16 rounding but stay close to fp32's."""
    from q0ds.population import rescore_run
    from q0ds.snapshot import read_meta
    _, cfg = make_config()
    snap = _snapshot_run(cfg)
    asked = []
    real = devices.resolve_device
    monkeypatch.setattr(devices, "resolve_device", lambda spec="auto": asked.append(spec) or real(spec))
    rescore_run(cfg.run_dir, device="cpu")
    fp32 = read_meta(snap)["val_loss"]
    monkeypatch.setattr(devices, "inference_dtype", lambda dev: torch.bfloat16)
    rescore_run(cfg.run_dir, members=["base-00/cycle-0000"], device="auto")
    bf16 = read_meta(snap)["val_loss"]
    assert asked == ["cpu", "cpu", "auto", "auto"]              # the early check, then the model load
    assert bf16 != fp32 and abs(bf16 - fp32) < 0.05 * fp32, (fp32, bf16)
