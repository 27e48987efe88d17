"""train.activation_checkpointing under ZeRO-3 (one CPU rank, the real trainer): same losses as without it,
distillation included, and the switch really reaches the model (transformers' per-layer checkpointing)."""
from pathlib import Path

import pytest

from conftest import read_jsonl, run_cli


def _losses(run_dir):
    return [(r["step"], r["loss"], r["kl"]) for r in read_jsonl(Path(run_dir) / "bases/base-00/metrics.jsonl")
            if "event" not in r]


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_losses_under_zero3(make_config):
    common = ("schedule.cycles=2", "schedule.cycle_steps=2", "distill.start_cycle=1", "model.dropout=0.0")
    plain, cfg_plain = make_config(*common, run="plain", name="plain.json")
    ck, cfg_ck = make_config(*common, "train.activation_checkpointing=true", run="ck", name="ck.json")
    run_cli("train", "--config", plain)
    run_cli("train", "--config", ck)
    a, b = _losses(cfg_plain.run_dir), _losses(cfg_ck.run_dir)
    assert len(a) == 4 and any(kl > 0 for _, _, kl in a)             # the last 2 steps are distilled
    assert [s for s, _, _ in a] == [s for s, _, _ in b]
    for (_, la, ka), (_, lb, kb) in zip(a, b):
        assert lb == pytest.approx(la, rel=1e-5) and kb == pytest.approx(ka, rel=1e-4, abs=1e-7)


def test_activation_checkpointing_switch_reaches_the_model():
    from transformers import Qwen3Config, AutoModelForCausalLM
    m = AutoModelForCausalLM.from_config(Qwen3Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     num_key_value_heads=2, head_dim=16, intermediate_size=64,
                                                     vocab_size=64))
    assert not m.is_gradient_checkpointing
    from q0ds.compat import enable_activation_checkpointing
    enable_activation_checkpointing(m, {"use_reentrant": False})          # what BaseTrainer calls
    assert m.is_gradient_checkpointing
