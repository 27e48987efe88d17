"""The production path's settings that CPU runs would not exercise (issue 12 sections 3-5): the 1.8b preset is
the reference recipe, models are built partitioned (zero.Init), `prepare --split paper`, and submit.sh refuses
a python that cannot import q0ds before submitting anything."""
import os
import subprocess
from pathlib import Path

import pytest
import torch

from q0ds import engine as E
from q0ds.config import load_config
from q0ds.presets import preset_config

ROOT = Path(__file__).resolve().parent.parent


def test_1p8b_preset_is_the_reference_recipe():
    # method.md "Scale of the real run": the authors' flags x lr_multiplier 0.25
    cfg = load_config(None, [], base=preset_config("1.8b", "d", "r"))
    o = cfg.optim
    assert o.name == "muon" and cfg.model.dtype == "bf16" and cfg.train.grad_clip == 1.0
    assert E.group_lrs(o) == pytest.approx({"matrix": 0.04 * 0.25, "embed": 0.15 * 0.25, "head": 0.002 * 0.25,
                                            "scalar": 0.1 * 0.25})
    assert o.betas == [0.8, 0.95] and o.eps == 1e-10 and o.weight_decay == 1.3 and o.muon_momentum == 0.95
    # effective per-step matrix decay at the peak of a cycle (wd_mult 0.7): lr x wd, as p *= 1 - lr*wd in
    # DeepSpeed's Muon (muon_optimizer.py step); the reference's cautious decay applies the same factor to the
    # entries whose update agrees in sign, so the same order of magnitude
    assert 1e-3 < o.muon_lr * o.weight_decay * cfg.schedule.wd_floor < 1e-1
    assert cfg.model.dropout == 0.1


def test_zero_init_construction_partitions_and_initialises(tmp_path):
    import deepspeed
    from q0ds.model import build_config
    E.setup_distributed()
    cfg = load_config(None, ["model.dropout=0.1"], base=preset_config("tiny", "d", str(tmp_path)))
    mc = build_config(cfg.model, 128, 0, 1, 16)
    ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, 1)

    def gathered(model):
        out = {}
        for n, p in model.named_parameters():
            assert hasattr(p, "ds_id") and p.data.numel() == 0, f"{n} was not partitioned at construction"
            with deepspeed.zero.GatheredParameters([p]):
                out[n] = p.data.clone()
        return out
    a, b = gathered(E.build_partitioned(mc, 5, ds)), gathered(E.build_partitioned(mc, 5, ds))
    c = gathered(E.build_partitioned(mc, 6, ds))
    name = "model.layers.0.mlp.up_proj.weight"
    assert all(torch.equal(a[n], b[n]) for n in a), "same seed, same initial weights"
    assert not torch.equal(a[name], c[name])
    assert a[name].std().item() == pytest.approx(mc.initializer_range, rel=0.15)   # transformers' init ran
    assert torch.equal(a["model.norm.weight"], torch.ones_like(a["model.norm.weight"]))


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    import sys
    return subprocess.run([sys.executable, "-m", "q0ds.cli", *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=120)


def test_prepare_split_paper_needs_the_tokenizer_and_owns_the_sizes(tmp_path):
    p = _cli("prepare", "--embedded", "--out", str(tmp_path / "d"), "--split", "paper")
    assert p.returncode == 2 and "GPT-2 tokenizer" in p.stderr and "Traceback" not in p.stderr
    p = _cli("prepare", "--embedded", "--out", str(tmp_path / "d"), "--split", "paper", "--tokenizer", str(tmp_path),
             "--val-tokens", "5")
    assert p.returncode == 2 and "drop --val-tokens" in p.stderr
    from q0ds.data import SPLITS
    assert SPLITS["paper"] == {"fitness_tokens": 132_000, "val_tokens": 10_000_000, "max_train_tokens": 100_000_000}


def test_submit_refuses_a_python_without_q0ds(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text("#!/bin/sh\necho SBATCH-CALLED >&2\nexit 0\n")
    (fake / "sbatch").chmod(0o755)
    bare = tmp_path / "python"                    # a python that cannot import deepspeed
    bare.write_text("#!/bin/sh\nexec /usr/bin/env -i /bin/sh -c 'echo \"ModuleNotFoundError: No module named deepspeed\" >&2; exit 1'\n")
    bare.chmod(0o755)
    cfg = tmp_path / "c.json"
    cfg.write_text("{}")
    env = dict(os.environ, PATH=f"{fake}:{os.environ['PATH']}", Q0DS_PYTHON=str(bare))
    p = subprocess.run(["bash", str(ROOT / "slurm/submit.sh"), str(cfg)], env=env, text=True, capture_output=True,
                       timeout=60)
    assert p.returncode != 0 and "SBATCH-CALLED" not in p.stderr
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "cannot import q0ds and deepspeed" in err[0] and "No module named deepspeed" in err[0]


def test_shipped_bf16_config_trains_with_muon_and_raw_clip(tmp_path):
    """The production engine config on CPU: bf16 weights built by zero.Init, micro-batches summed in fp32,
    Muon momentum gathered in fp32, the raw-gradient clip active, the loss going down."""
    from q0ds.model import build_config
    E.setup_distributed()
    cfg = load_config(None, ["ds_config=ds_configs/zero3_bf16.hjson", "model.dtype=bf16", "optim.name=muon",
                             "train.grad_clip=0.5"], base=preset_config("tiny", "d", str(tmp_path)))
    mc = build_config(cfg.model, 128, 0, 1, 16)
    ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, 1)
    model = E.build_partitioned(mc, 3, ds)
    assert next(model.parameters()).dtype == torch.bfloat16
    eng, _ = E.make_student(model, ds, cfg.optim, lambda s: (1.0, 1.0), grad_clip=cfg.train.grad_clip)
    assert eng.get_data_types() == (torch.bfloat16, torch.float32) and eng.communication_data_type == torch.float32
    ids = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        for j in range(2):                                   # two micro-batches per step, our accumulation
            E.micro_step(eng, eng(input_ids=ids, labels=ids).loss, 2, last=j == 1)
        assert eng.q0ds_raw_grad_norm.item() > cfg.train.grad_clip      # so the clip acted
        losses.append(eng(input_ids=ids, labels=ids).loss.item())
    assert losses[-1] < losses[0], losses
