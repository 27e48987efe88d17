"""The replicated teacher (distill.teacher_mode=replicated, issue 19 section 3) against the ZeRO-3 teacher engine,
on the real `deepspeed` launcher with 2 CPU ranks; and step vs event timing (an injected slow cycle end).

One ZeRO-3 run straight through (with every cycle end slowed by Q0DS_FAULT=sleep_in_cycle_end), one replicated
run pre-empted in the first distilled cycle and resumed (its teacher then comes from the snapshot on disk), then
refreshed in-gather at the next cycle end: the distilled losses must agree to float tolerance."""
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import read_jsonl, run_launcher

OVERRIDES = ["schedule.cycles=3", "schedule.cycle_steps=3", "distill.start_cycle=1", "train.ckpt_every=2",
             "train.verify_teacher=true", "train.micro_batch=2", "train.global_batch=8", "train.small_batch=4",
             "model.dropout=0.1"]
SLEEP_S = 10


def records(run_dir):
    return read_jsonl(Path(run_dir) / "bases/base-00/metrics.jsonl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, embedded_data):
    from q0ds.config import load_config, save_config
    from q0ds.presets import preset_config
    root = tmp_path_factory.mktemp("teacher")
    out = {}
    for mode in ("zero3", "replicated"):
        cfg = load_config(None, OVERRIDES + [f"distill.teacher_mode={mode}"],
                          base=preset_config("tiny", data=str(embedded_data), run_dir=str(root / mode)))
        save_config(cfg, root / f"{mode}.json")
        out[mode] = (root / f"{mode}.json", cfg)
    z = run_launcher(out["zero3"][0], 0, env={"Q0DS_FAULT": f"sleep_in_cycle_end={SLEEP_S}"})
    assert "teacher: zero3 (requested)" in z.stdout
    first = run_launcher(out["replicated"][0], 0, env={"Q0DS_FAULT": "preempt_at_step=5"}, check=False)
    assert first.returncode == 75 and "pre-empted" in first.stdout, first.stdout[-2000:] + first.stderr[-3000:]
    second = run_launcher(out["replicated"][0], 0)
    assert "teacher: replicated (requested)" in second.stdout and "resumed base 0 from step-00000005" in second.stdout
    return {mode: records(cfg.run_dir) for mode, (_, cfg) in out.items()}


def test_replicated_and_zero3_teachers_give_the_same_losses_across_a_resume(runs):
    steps = {m: {r["step"]: r for r in recs if "event" not in r} for m, recs in runs.items()}
    assert sorted(steps["zero3"]) == sorted(steps["replicated"]) == list(range(1, 10))
    for s in range(1, 10):
        z, r = steps["zero3"][s], steps["replicated"][s]
        assert z["distilled"] == r["distilled"] == (s > 3)
        for k in ("loss", "ce", "kl"):
            assert r[k] == pytest.approx(z[k], rel=1e-5, abs=1e-7), (s, k)
    assert all(steps["replicated"][s]["kl"] > 0 for s in range(4, 10))
    for mode, recs in runs.items():
        teacher = [r for r in recs if r.get("event") == "teacher"]
        assert [t["cycle"] for t in teacher] == [0, 1] and {t["mode"] for t in teacher} == {mode}
        assert all(t["max_abs_diff"] == 0.0 for t in teacher)          # the teacher holds the snapshot exactly
    rep = [r for r in runs["replicated"] if r.get("event") == "teacher"]
    assert all(t["refresh_s"] < 0.05 for t in rep)                     # copied inside the snapshot's gather


def test_step_time_excludes_a_slow_cycle_end(runs):
    recs = runs["zero3"]
    snaps = [r for r in recs if r.get("event") == "snapshot"]
    assert [s["cycle"] for s in snaps] == [0, 1, 2]
    for s in snaps:
        assert s["write_s"] >= SLEEP_S and {"gather_s", "hash_s", "score_s"} <= set(s)
        assert all(s[k] >= 0 for k in ("gather_s", "hash_s", "score_s"))
    assert all("perturb_s" in r for r in recs if r.get("event") == "perturb")
    assert all("refresh_s" in r for r in recs if r.get("event") == "teacher")
    ckpts = [r for r in recs if r.get("event") == "checkpoint"]
    assert {3, 6, 9} <= {c["step"] for c in ckpts} and all(c["checkpoint_s"] > 0 for c in ckpts)
    steps = {r["step"]: r for r in recs if "event" not in r}
    for s, r in steps.items():
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 32 / r["step_s"], rel=1e-3)   # tiny: seq_len 32
    # the steps right after a cycle end (4, 7) come after a > SLEEP_S pause, yet their own time is a step's
    for s in (4, 7):
        assert steps[s]["step_s"] < SLEEP_S / 2, (s, steps[s]["step_s"])


def test_replica_is_frozen_and_keeps_the_students_fp32_buffers():
    """bf16: the replica's params are bf16, its RoPE inv_freq the student's fp32 tensor (never rounded)."""
    from transformers import AutoModelForCausalLM, Qwen3Config
    from q0ds import engine as E
    c = Qwen3Config(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                    num_key_value_heads=4, head_dim=16, intermediate_size=128)
    student = AutoModelForCausalLM.from_config(c, dtype=torch.bfloat16)
    student.model.rotary_emb.inv_freq = student.model.rotary_emb.inv_freq.float() * 1.0000001   # distinct fp32
    rep = E.make_replicated_teacher(c, SimpleNamespace(device="cpu", module=student))
    assert not rep.training and not any(p.requires_grad for p in rep.parameters())
    assert next(rep.parameters()).dtype == torch.bfloat16
    inv = rep.model.rotary_emb.inv_freq
    assert inv.dtype == torch.float32 and torch.equal(inv, student.model.rotary_emb.inv_freq)
    E.load_replica_(rep, student.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(rep.parameters(), student.parameters()))
    with pytest.raises(KeyError, match="no tensor"):
        E.load_replica_(rep, {})
