"""Resume with Muon on another number of ranks (issue 19 section 2): 2 -> 1 -> 2 CPU ranks, real launcher, ZeRO-3.

DeepSpeed's converter reads exp_avg/exp_avg_sq for every sub-group and dies with KeyError: 'exp_avg' on Muon's
momentum_buffer (engine_universal.py). Here: 2 ranks pre-empted at step 2, 1 rank resumes from the universal
conversion and is pre-empted at step 3, 2 ranks resume again and finish. After each resume the fp32 master of
every parameter and its optimizer state (Muon momentum for matrices, Adam moments for the rest) equal exactly
what the checkpoint's writer held; training continues to the end with finite losses."""
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import LAUNCH_PORTS, ROOT, read_jsonl

RANK_SCRIPT = Path(__file__).with_name("universal_muon_rank.py")


def _launch(config, out, ranks, fault=None):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    LAUNCH_PORTS.add(port)
    import os
    env = dict(os.environ, Q0DS_MUON_COMPILE="0")          # eager Newton-Schulz: no inductor build per launch
    env.pop("Q0DS_FAULT", None)
    if fault:
        env["Q0DS_FAULT"] = fault
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(ranks), "--master_port", str(port),
           str(RANK_SCRIPT), str(config), str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=900)


def _same(a, b, what):
    assert a["step"] == b["step"], what
    assert a["fp32"].keys() == b["fp32"].keys()
    for n in a["fp32"]:
        assert torch.equal(a["fp32"][n], b["fp32"][n]), f"{what}: fp32 {n}"
        assert a["optim"][n].keys() == b["optim"][n].keys(), (what, n)
        for k in a["optim"][n]:
            assert torch.equal(a["optim"][n][k], b["optim"][n][k]), f"{what}: {k} of {n}"


@pytest.mark.slow
def test_muon_resume_2_to_1_to_2_ranks(make_config, tmp_path):
    path, cfg = make_config("optim.name=muon", "train.grad_clip=1.0", "schedule.cycles=1", "schedule.cycle_steps=4",
                            "train.micro_batch=2", "train.global_batch=4", "train.small_batch=4",
                            "train.ckpt_every=100", "distill.enabled=false", "perturb.enabled=false")
    p = _launch(path, tmp_path / "a.pt", 2, "preempt_at_step=2")
    assert p.returncode == 75, p.stdout[-2000:] + p.stderr[-4000:]
    p = _launch(path, tmp_path / "b.pt", 1, "preempt_at_step=3")
    assert p.returncode == 75, p.stdout[-2000:] + p.stderr[-4000:]
    assert "came from 2 ranks, this launch has 1" in p.stdout
    p = _launch(path, tmp_path / "c.pt", 2)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    assert "came from 1 ranks, this launch has 2" in p.stdout
    load = lambda name: torch.load(tmp_path / name, weights_only=False)
    a, b_loaded, b, c_loaded, c = (load(n) for n in ("a.pt", "b.pt.loaded", "b.pt", "c.pt.loaded", "c.pt"))
    assert (a["step"], b["step"], c["step"]) == (2, 3, 4)
    mom = [n for n, s in a["optim"].items() if "momentum_buffer" in s]
    adam = [n for n, s in a["optim"].items() if "exp_avg" in s]
    assert mom and adam and all(a["optim"][n]["momentum_buffer"].abs().sum() > 0 for n in mom)
    _same(a, b_loaded, "2 -> 1 ranks")
    _same(b, c_loaded, "1 -> 2 ranks")
    assert not torch.equal(b["optim"][mom[0]]["momentum_buffer"], a["optim"][mom[0]]["momentum_buffer"])
    steps = [r for r in read_jsonl(Path(cfg.run_dir) / "bases/base-00/metrics.jsonl") if "event" not in r]
    assert [r["step"] for r in steps][-2:] == [3, 4] and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    assert (Path(cfg.run_dir) / "bases/base-00/done.json").is_file()


def test_converter_writes_muon_momentum_where_deepspeeds_fails(tmp_path, monkeypatch):
    """1 CPU rank, in-process: a Muon ZeRO-3 checkpoint. DeepSpeed's own converter raises KeyError: 'exp_avg';
    q0ds's writes zero/<matrix>/momentum_buffer.pt equal to the engine's momentum, and Adam moments elsewhere."""
    import argparse
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    from test_gpu_node import Net, _cfg, _train
    from q0ds import engine as E
    from q0ds import engine_universal
    monkeypatch.setenv("Q0DS_MUON_COMPILE", "0")
    E.setup_distributed()
    cfg = _cfg("optim.name=muon")
    torch.manual_seed(0)
    eng, _ = E.make_student(Net(), E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, 1), cfg.optim,
                            lambda s: (1.0, 1.0))
    _train(eng, 2)
    E.save_checkpoint(eng, tmp_path, "step-2", {"step": 2})
    state = E.full_optimizer_state(eng)
    with pytest.raises(KeyError, match="exp_avg"):
        ds_to_universal(argparse.Namespace(input_folder=str(tmp_path / "step-2"), output_folder=str(tmp_path / "ds"),
                                           num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                           strict=True, inject_missing_state=False))
    engine_universal.convert(tmp_path / "step-2", tmp_path / "q0")
    zero = tmp_path / "q0" / "zero"
    for name in ("up.weight", "down.weight"):
        assert sorted(p.name for p in (zero / name).iterdir()) == ["fp32.pt", "momentum_buffer.pt"]
        mom = torch.load(zero / name / "momentum_buffer.pt", weights_only=False)
        assert torch.equal(mom.reshape(state[name]["momentum_buffer"].shape), state[name]["momentum_buffer"])
    assert sorted(p.name for p in (zero / "embed.weight").iterdir()) == ["exp_avg.pt", "exp_avg_sq.pt", "fp32.pt"]
