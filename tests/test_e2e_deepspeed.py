"""End-to-end: the real `deepspeed` launcher, 2 CPU ranks, ZeRO-3, a tiny config over 4 cycles with chain
distillation from cycle 2 and perturbation. Checks snapshots (HF-loadable, reproduce the logged val loss),
the schedule in metrics.jsonl, the teacher refresh, and that pre-emption and a hard kill both resume to
exactly the uninterrupted run. Never skipped in CI."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import read_jsonl, run_launcher

OVERRIDES = ["schedule.cycles=4", "schedule.cycle_steps=3", "distill.start_cycle=2", "train.ckpt_every=2",
             "train.verify_teacher=true", "train.micro_batch=2", "train.global_batch=8", "train.small_batch=4",
             "model.dropout=0.1"]      # residual dropout: exact resume then also needs each rank's generator


def snapshot_hashes(run_dir):
    snaps = sorted(Path(run_dir).glob("bases/base-00/snapshots/cycle-*"))
    return {s.name: json.loads((s / "snapshot.json").read_text())["sha256"] for s in snaps}


def step_losses(run_dir):
    return [(r["step"], r["loss"], r["kl"]) for r in read_jsonl(Path(run_dir) / "bases/base-00/metrics.jsonl") if "event" not in r]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, embedded_data):
    from q0ds.config import load_config, save_config
    from q0ds.presets import preset_config
    root = tmp_path_factory.mktemp("e2e")

    def config(name, *extra):
        cfg = load_config(None, OVERRIDES + list(extra), base=preset_config("tiny", data=str(embedded_data), run_dir=str(root / name)))
        save_config(cfg, root / f"{name}.json")
        return root / f"{name}.json", cfg
    path, cfg = config("straight")
    # every tensor reaching torch.distributed is logged per rank (engine._record_collectives)
    run_launcher(path, 0, env={"Q0DS_RECORD_COLLECTIVES": str(root / "collectives")})
    return config, cfg


def test_snapshots_load_and_reproduce_val_loss(straight):
    from transformers import AutoModelForCausalLM
    from q0ds.data import PreparedData
    from q0ds.snapshot import token_logprobs, verify
    _, cfg = straight
    snaps = sorted(Path(cfg.run_dir).glob("bases/base-00/snapshots/cycle-*"))
    assert [s.name for s in snaps] == [f"cycle-{i:04d}" for i in range(4)]
    assert not list(Path(cfg.run_dir).glob("bases/base-00/snapshots/.tmp*"))
    data = PreparedData.open(cfg.data)
    windows, mask = data.eval_windows("val", cfg.train.seq_len)
    losses = []
    for s in snaps:
        meta = verify(s)
        assert meta["scored"] and meta["cycle"] == int(s.name[-4:])
        model = AutoModelForCausalLM.from_pretrained(s, local_files_only=True).eval()
        lp = token_logprobs(model, windows, mask, batch=16)
        assert abs(-lp.double().mean().item() - meta["val_loss"]) < 1e-4
        losses.append(meta["val_loss"])
        assert (s / "fitness.safetensors").is_file() and (s / "tokenizer.json").is_file()
    assert losses[-1] < losses[0], f"val loss did not improve over cycles: {losses}"


def test_collectives_use_the_engine_device(straight):
    """Issue 12 section 1: q0ds's own collectives go through engine.py's helpers, with every tensor on the
    device the helper was told to use (the engine's), and the step costs exactly one q0ds all-reduce."""
    _, cfg = straight
    logs = sorted((Path(cfg.run_dir).parent / "collectives").glob("rank-*.jsonl"))
    assert [p.name for p in logs] == ["rank-0.jsonl", "rank-1.jsonl"]
    for log in logs:
        recs = read_jsonl(log)
        ours = [r for r in recs if r["caller"]]         # torch.distributed called from q0ds code directly
        outside = {r["caller"] for r in ours if not r["caller"].startswith("engine.py:")}
        assert not outside, f"collectives issued outside engine.py: {outside}"
        assert any(r["within"] and r["within"].startswith("trainer.py") for r in recs if not r["caller"]), \
            "DeepSpeed's own collectives during training should be recorded too"
        helpers = [r for r in ours if r["expected"] is not None]
        assert helpers and all(r["expected"] == "cpu" for r in helpers)
        wrong = [r for r in helpers if any(d != r["expected"] for d in r["devices"])]
        assert not wrong, f"tensors not on the helper's device: {wrong[:3]}"
        calls = [r["caller"] for r in helpers]
        assert calls.count("engine.py:all_reduce_") == 12, "one q0ds all-reduce per step (loss, NaN and stop flag)"
        assert calls.count("engine.py:all_gather_cat") == 8, "val + fitness scores gathered at each of 4 cycle ends"


def test_metrics_show_sawtooth_wd_antiphase_and_distillation(straight):
    _, cfg = straight
    recs = read_jsonl(Path(cfg.run_dir) / "bases/base-00/metrics.jsonl")
    steps = [r for r in recs if "event" not in r]
    assert len(steps) == 12
    for r in steps:
        s = (r["step"] - 1) % 3                       # position within the 3-step cycle
        assert r["lr_mult"] == pytest.approx(0.08 + 0.92 * (1 - s / 3))
        assert r["wd_mult"] == pytest.approx(0.7 + 0.3 * (1 - r["lr_mult"]) / 0.92)
        assert (r["kl"] > 0) == (r["cycle"] >= 2) and r["distilled"] == (r["cycle"] >= 2)
        assert r["batch"] == (8 if r["cycle"] in (1, 2) else 4)      # block-triangular batch schedule
        assert r["lr"] == r["lr_matrix"] == pytest.approx(cfg.optim.lr * r["lr_mult"])   # every group's lr and wd
        assert {"lr_embed", "lr_head", "lr_scalar", "wd_matrix", "wd_scalar"} <= set(r) and r["wd_scalar"] == 0.0
        assert r["wd"] == r["wd_matrix"] == pytest.approx(cfg.optim.weight_decay * r["wd_mult"])
    teacher = [r for r in recs if r.get("event") == "teacher"]
    assert [t["cycle"] for t in teacher] == [1, 2], "teacher must hold snapshot c-1 from cycle distill_start on"
    assert all(t["max_abs_diff"] == 0.0 for t in teacher)
    perturb = [r for r in recs if r.get("event") == "perturb"]
    assert [p["cycle"] for p in perturb] == [0, 1, 2] and perturb[0]["scale"] == pytest.approx(0.25)


@pytest.mark.parametrize("fault", ["preempt_at_step=7", "crash_at_step=8", "crash_in_snapshot=2",
                                   "crash_in_checkpoint=8"])
def test_interrupted_run_resumes_exactly(straight, fault):
    config, cfg = straight
    name = fault.split("=")[0]
    path, other = config(name)
    first = run_launcher(path, 0, env={"Q0DS_FAULT": fault}, check=False)
    assert first.returncode != 0, "the interrupted launch should not report success"
    if name == "preempt":
        assert "pre-empted" in first.stdout + first.stderr
    assert len(snapshot_hashes(other.run_dir)) < 4
    assert not (Path(other.run_dir) / "bases/base-00/done.json").exists()
    run_launcher(path, 0)                              # relaunch: resumes from the newest complete checkpoint
    assert snapshot_hashes(other.run_dir) == snapshot_hashes(cfg.run_dir)
    assert step_losses(other.run_dir) == step_losses(cfg.run_dir)


@pytest.fixture(scope="module")
def straight_no_dropout(straight):
    """The uninterrupted 2-rank run without dropout: the reference for a change of world size, where dropout
    masks cannot continue (the set of ranks, hence of per-rank generators, changes)."""
    config, _ = straight
    path, cfg = config("straight-no-dropout", "model.dropout=0.0")
    run_launcher(path, 0)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize("first,second", [(2, 1), (1, 2)])
def test_resume_on_a_different_world_size(straight, straight_no_dropout, first, second):
    """Pre-empted at step 4 on `first` ranks, resumed on `second` through DeepSpeed's universal checkpoint. The
    schedule, batch sizes, epochs and teacher events continue exactly; losses stay within 1e-4 (nats) of the
    uninterrupted 2-rank run: the reduction order changes with the world size, so bitwise identity is not
    expected (measured differences are ~1e-6). Formats are unchanged. Without dropout: see straight_no_dropout."""
    config, _ = straight
    cfg = straight_no_dropout
    path, other = config(f"world{first}to{second}", "model.dropout=0.0")
    p = run_launcher(path, 0, ranks=first, env={"Q0DS_FAULT": "preempt_at_step=4"}, check=False)
    assert p.returncode == 75, p.stderr[-3000:]
    p = run_launcher(path, 0, ranks=second)
    assert f"came from {first} ranks, this launch has {second}" in p.stdout
    ref = read_jsonl(Path(cfg.run_dir) / "bases/base-00/metrics.jsonl")
    got = read_jsonl(Path(other.run_dir) / "bases/base-00/metrics.jsonl")
    assert [sorted(r) for r in got] == [sorted(r) for r in ref], "metrics.jsonl records differ in form"
    exact = ("step", "epoch", "cycle", "lr_mult", "wd_mult", "lr", "wd", "batch", "distilled", "event")
    for a, b in zip(got, ref):
        assert {k: a.get(k) for k in exact} == {k: b.get(k) for k in exact}
        for k in ("loss", "ce", "kl", "val_loss"):
            if k in b:
                assert a[k] == pytest.approx(b[k], abs=1e-4), (a, b)
    snaps = sorted(Path(other.run_dir).glob("bases/base-00/snapshots/cycle-*"))
    assert [s.name for s in snaps] == list(snapshot_hashes(cfg.run_dir))
    for s in snaps:
        mine = json.loads((s / "snapshot.json").read_text())
        theirs = json.loads((Path(cfg.run_dir) / "bases/base-00/snapshots" / s.name / "snapshot.json").read_text())
        assert sorted(mine) == sorted(theirs)
        assert {k: mine[k] for k in ("step", "epoch", "tokens_seen", "lr_mult", "wd_mult", "teacher")} == \
               {k: theirs[k] for k in ("step", "epoch", "tokens_seen", "lr_mult", "wd_mult", "teacher")}
    assert not (Path(other.run_dir) / "bases/base-00/checkpoints/universal").exists(), "converted copy not cleaned"


def _second_host() -> str:
    """A second name for this machine: its host name if that resolves to a local address, else 127.0.0.1."""
    name = socket.gethostname()
    try:
        local = name != "localhost" and socket.gethostbyname(name).startswith("127.")
    except OSError:
        local = False
    return name if local else "127.0.0.1"


def _node_launches(path, port, env=None, timeout=900):
    """slurm/q0_bases.sh --node-launch once per "node", the way srun starts it on a 2-node allocation: one
    deepspeed launcher per node (--no_ssh --node_rank), one CPU rank each, a hostfile of two distinct host
    names that both resolve to this machine, and a shared master address and port."""
    root = Path(__file__).resolve().parent.parent
    deepspeed = Path(sys.executable).with_name("deepspeed")
    procs = []
    for node in (0, 1):
        e = dict(os.environ, SLURM_JOB_ID=str(port), SLURM_NODEID=str(node), SLURM_JOB_NODELIST=f"localhost,{_second_host()}",
                 **(env or {}))
        cmd = ["bash", str(root / "slurm/q0_bases.sh"), "--node-launch", str(deepspeed), "1", "2", "localhost",
               str(port), "launchers/train.py", "--config", str(path), "--base", "0"]
        procs.append(subprocess.Popen(cmd, cwd=root, env=e, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [p.returncode for p in procs], "\n".join(f"--- node {i}\n{o[-3000:]}" for i, o in enumerate(outs))


@pytest.mark.slow
def test_two_node_launches_form_one_job_and_match_single_launcher(straight):
    """Item 6 of issue 15: the multi-node path of the SLURM script, on one machine. Two node launches form
    one 2-rank ZeRO-3 job (dist_world_size=2), are pre-empted after a cycle end (exit 75 on both nodes),
    resume, and give bit-identical snapshots to the 2-rank single-launcher run."""
    config, cfg = straight
    path, other = config("two-nodes")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rcs, log = _node_launches(path, port, env={"Q0DS_FAULT": "preempt_at_step=7"})
    assert rcs == [75, 75], log
    assert "nnodes=2" in log and "dist_world_size=2" in log and "pre-empted" in log, log
    assert 0 < len(snapshot_hashes(other.run_dir)) < 4, log
    rcs, log = _node_launches(path, port)
    assert rcs == [0, 0], log
    assert snapshot_hashes(other.run_dir) == snapshot_hashes(cfg.run_dir), log
    assert step_losses(other.run_dir) == step_losses(cfg.run_dir)
