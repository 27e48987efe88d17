"""End-to-end: the real `deepspeed` launcher, 2 CPU ranks, ZeRO-3, a tiny config over 4 cycles with chain
distillation from cycle 2 and perturbation (conftest.E2E_OVERRIDES; the uninterrupted run is the session's
`trained_2rank`). Checks snapshots (HF-loadable, reproduce the logged val loss), the schedule in metrics.jsonl,
the teacher refresh, and that pre-emption and hard kills (also under the two-node launch path and across
world sizes) all resume to exactly the uninterrupted run. Never skipped in CI."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import read_jsonl, run_launcher


def snapshot_hashes(run_dir):
    snaps = sorted(Path(run_dir).glob("bases/base-00/snapshots/cycle-*"))
    return {s.name: json.loads((s / "snapshot.json").read_text())["sha256"] for s in snaps}


def step_losses(run_dir):
    return [(r["step"], r["loss"], r["kl"]) for r in read_jsonl(Path(run_dir) / "bases/base-00/metrics.jsonl") if "event" not in r]


def test_snapshots_load_and_reproduce_val_loss(trained_2rank):
    from transformers import AutoModelForCausalLM
    from q0ds.data import PreparedData
    from q0ds.snapshot import token_logprobs, verify
    cfg = trained_2rank.cfg
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


def test_collectives_use_the_engine_device(trained_2rank):
    """Issue 12 section 1: q0ds's own collectives go through engine.py's helpers, with every tensor on the
    device the helper was told to use (the engine's), and the step costs exactly one q0ds all-reduce."""
    logs = sorted(trained_2rank.collectives.glob("rank-*.jsonl"))
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
        calls = [(r["caller"], r["via"]) for r in helpers]
        assert calls.count(("engine.py:all_reduce_", "trainer.py:_train_step")) == 12, \
            "one q0ds all-reduce per step (loss, NaN and stop flag)"
        gathers = [v for c, v in calls if c == "engine.py:all_gather_cat" and v != "engine.py:agree_error"]
        assert len(gathers) == 8 and all(v.startswith("snapshot.py:") for v in gathers), \
            "val + fitness scores gathered at each of 4 cycle ends"
        other = {c for c in calls if c[1] not in ("trainer.py:_train_step", "engine.py:agree_error")
                 and not c[1].startswith("snapshot.py:")}
        assert not other, f"unexpected q0ds collectives: {other}"
        # agreement points (engine.agree_error: start-up, resume, cycle ends, checkpoints): all_gather only
        assert {c for c, v in calls if v == "engine.py:agree_error"} == {"engine.py:all_gather_cat"}


def test_metrics_show_sawtooth_wd_antiphase_and_distillation(trained_2rank):
    cfg = trained_2rank.cfg
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


# One run dir interrupted four times, each launch resuming the previous one's state (12 steps; snapshots and
# checkpoints at the cycle ends 3, 6, 9, 12; checkpoints every 2 steps between):
#   fault                   launch                what is left                  the next launch resumes at
CHAIN = [("crash_in_checkpoint=8", "launcher",   "ckpt 8 written, not marked",  6),   # incomplete ckpt skipped
         ("preempt_at_step=7",     "two nodes",  "ckpt 7, exit 75 on both",     7),   # the SLURM multi-node path
         ("crash_at_step=8",       "launcher",   "ckpt 8 complete, SIGKILL",    8),
         ("crash_in_snapshot=2",   "launcher",   "cycle-0002 half-written",     8),
         (None,                    "two nodes",  "finished",                    None)]


def test_interrupted_run_resumes_exactly(trained_2rank):
    """Each fault interrupts the run (non-zero exit, no done.json, snapshots missing), the next launch resumes
    from the newest complete checkpoint (the step is checked), and the finished run has bit-identical snapshots
    and the same per-step losses as the uninterrupted `trained_2rank`. Two of the launches go through
    slurm/q0_bases.sh --node-launch as two one-rank "nodes" (issue 15 item 6): they form one 2-rank job and
    exit 75 on both nodes when pre-empted. Every finished launch must exit 0 (run_launcher / rcs)."""
    cfg = trained_2rank.cfg
    path, other = trained_2rank.config("chain")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    resume_at = None
    for fault, how, _, next_step in CHAIN:
        env = {"Q0DS_FAULT": fault} if fault else {}
        if how == "two nodes":
            rcs, log = _node_launches(path, port, env=env)
            assert "nnodes=2" in log and "dist_world_size=2" in log, log
            assert rcs == ([75, 75] if fault else [0, 0]), (fault, rcs, log)
        else:
            p = run_launcher(path, 0, env=env, check=False)
            log = p.stdout + p.stderr
            assert p.returncode != 0, f"{fault}: the interrupted launch should not report success"
        if resume_at is not None:
            assert f"(step {resume_at}/12)" in log, (fault, resume_at, log[-3000:])
        if fault and fault.startswith("preempt"):
            assert "pre-empted" in log, log[-3000:]
        if fault:
            assert len(snapshot_hashes(other.run_dir)) < 4, fault
            assert not (Path(other.run_dir) / "bases/base-00/done.json").exists(), fault
        resume_at = next_step
    assert snapshot_hashes(other.run_dir) == snapshot_hashes(cfg.run_dir)
    assert step_losses(other.run_dir) == step_losses(cfg.run_dir)


@pytest.fixture(scope="module")
def straight_no_dropout(trained_2rank):
    """The uninterrupted 2-rank run without dropout: the reference for a change of world size, where dropout
    masks cannot continue (the set of ranks, hence of per-rank generators, changes)."""
    path, cfg = trained_2rank.config("straight-no-dropout", "model.dropout=0.0")
    run_launcher(path, 0)
    return cfg


@pytest.mark.slow
def test_resume_on_a_different_world_size(trained_2rank, straight_no_dropout):
    """Pre-empted at step 4 on 2 ranks, resumed on 1 and pre-empted at step 8, resumed on 2 to the end: each
    change of world size goes through DeepSpeed's universal checkpoint. The schedule, batch sizes, epochs and
    teacher events continue exactly; losses stay within 1e-4 (nats) of the uninterrupted 2-rank run: the
    reduction order changes with the world size, so bitwise identity is not expected (measured differences are
    ~1e-6). Formats are unchanged. Without dropout: see straight_no_dropout."""
    cfg = straight_no_dropout
    path, other = trained_2rank.config("world2to1to2", "model.dropout=0.0")
    p = run_launcher(path, 0, ranks=2, env={"Q0DS_FAULT": "preempt_at_step=4"}, check=False)
    assert p.returncode == 75, p.stderr[-3000:]
    p = run_launcher(path, 0, ranks=1, env={"Q0DS_FAULT": "preempt_at_step=8"}, check=False)
    assert p.returncode == 75, p.stderr[-3000:]
    assert "came from 2 ranks, this launch has 1" in p.stdout and "(step 4/12)" in p.stdout, p.stdout[-3000:]
    p = run_launcher(path, 0, ranks=2)
    assert "came from 1 ranks, this launch has 2" in p.stdout and "(step 8/12)" in p.stdout, p.stdout[-3000:]
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
