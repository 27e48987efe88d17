"""Run-config validation: every mistake names its field."""
import json

import pytest

from q0ds.config import ConfigError, load_config
from q0ds.presets import PRESETS, preset_config


def _load(tmp_path, d, overrides=()):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(d))
    return load_config(p, overrides)


@pytest.mark.parametrize("overrides,field", [
    (["schedule.cyclez=3"], "schedule.cyclez"),
    (["train.micro_batch=\"4\""], "train.micro_batch"),
    (["schedule.cycles=0"], "schedule.cycles"),
    (["schedule.lr_floor=1.5"], "schedule.lr_floor"),
    (["distill.start_cycle=0"], "distill.start_cycle"),
    (["optim.name=\"sgd\""], "optim.name"),
    (["schedule.cycle_epochs=[1, 2]"], "schedule.cycle_epochs"),
    (["distill.enabled=1"], "distill.enabled"),
    (["model.preset=huge"], "model.preset"),
    (["bogus=1"], "bogus"),
])
def test_bad_values_name_the_field(tmp_path, overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("[", r"\[")):
        _load(tmp_path, preset_config("tiny", "d", "r"), overrides)


def test_batch_arithmetic_checked_against_world_size(tmp_path):
    cfg = _load(tmp_path, preset_config("tiny", "d", "r"), ["train.global_batch=12", "train.micro_batch=4"])
    cfg.train.check_world(1)
    with pytest.raises(ConfigError, match=r"train\.global_batch=12 .* 4 x 2 = 8"):
        cfg.train.check_world(2)


def test_malformed_file_and_missing_file(tmp_path):
    p = tmp_path / "bad.hjson"
    p.write_text("{ schedule: { cycles: 3 ")
    with pytest.raises(ConfigError, match="not valid JSON/HJSON"):
        load_config(p)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.json")


def test_hjson_with_comments_and_resolved_roundtrip(tmp_path):
    p = tmp_path / "c.hjson"
    p.write_text("// a comment\n{\n data: d\n run_dir: r\n schedule: { cycles: 5 }  # five\n}\n")
    cfg = load_config(p, ["optim.lr=0.01"])
    assert cfg.schedule.cycles == 5 and cfg.optim.lr == 0.01 and cfg.distill.alpha == 0.45
    again = _load(tmp_path, cfg.to_dict())
    assert again == cfg and again.fingerprint() == cfg.fingerprint()
    assert _load(tmp_path, cfg.to_dict(), ["seed=1"]).fingerprint() != cfg.fingerprint()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates_and_builds_its_model_config(name):
    from q0ds.model import build_config
    cfg = load_config(None, [], base=preset_config(name, "d", "r"))
    mc = build_config(cfg.model, 2048, 0, 1, cfg.train.seq_len)
    assert mc.vocab_size >= 2048
    if name == "1.8b":
        import torch
        from transformers import AutoModelForCausalLM
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(mc)
        assert abs(sum(p.numel() for p in m.parameters()) - 1.748e9) < 0.001e9
        cfg.train.check_world(8)


def test_every_shipped_ds_config_parses():
    from pathlib import Path
    from q0ds.engine import load_ds_config, student_ds_config
    files = sorted(Path(__file__).resolve().parent.parent.glob("ds_configs/*.hjson"))
    assert len(files) >= 2
    for f in files:
        raw = load_ds_config(f)
        dtype = "bf16" if raw.get("bf16", {}).get("enabled") else "fp32"
        cfg = load_config(None, [f"model.dtype={dtype}"], base=preset_config("tiny", "d", "r"))
        d = student_ds_config(raw, cfg, 2)
        assert d["zero_optimization"]["stage"] == 3 and d["gradient_clipping"] == cfg.train.grad_clip
        assert d["train_batch_size"] == cfg.train.micro_batch * 2
        if dtype == "bf16":      # micro-batches are summed in fp32, not bf16 (issue 12 section 4)
            assert d["data_types"]["grad_accum_dtype"] == "fp32"
        other = load_config(None, [f"model.dtype={'fp32' if dtype == 'bf16' else 'bf16'}"], base=cfg.to_dict())
        with pytest.raises(ConfigError, match=f"bf16.enabled=.*model.dtype={other.model.dtype}; set model.dtype={dtype}"):
            student_ds_config(raw, other, 2)       # a silent fp32 run on the bf16 engine config is refused


def test_muon_turns_the_engine_clip_off_and_keeps_momentum_fp32():
    from q0ds.engine import load_ds_config, student_ds_config
    cfg = load_config(None, [], base=preset_config("1.8b", "d", "r"))
    assert cfg.optim.name == "muon" and cfg.train.grad_clip == 1.0
    d = student_ds_config(load_ds_config(cfg.ds_config), cfg, 8)
    assert d["gradient_clipping"] == 0.0 and d["communication_data_type"] == "fp32"
    assert d["zero_optimization"]["reduce_scatter"] is False
    adamw = load_config(None, ["optim.name=adamw"], base=cfg.to_dict())
    d = student_ds_config(load_ds_config(cfg.ds_config), adamw, 8)
    assert d["gradient_clipping"] == 1.0 and "communication_data_type" not in d


def test_ds_config_refuses_managed_keys(tmp_path):
    from q0ds.engine import load_ds_config
    p = tmp_path / "ds.hjson"
    p.write_text("{ train_batch_size: 8, zero_optimization: { stage: 3 } }")
    with pytest.raises(ConfigError, match="train_batch_size"):
        load_ds_config(p)


def test_execution_only_keys_do_not_block_a_resume(tmp_path):
    """A run dir written before distill.teacher_mode existed (or with another teacher_mode) resumes; a change of a
    trajectory key is still refused, naming it. The fingerprint ignores execution-only keys."""
    import dataclasses
    import json
    from q0ds.config import ConfigError, RunConfig
    from q0ds.trainer import _write_run_config
    cfg = RunConfig(run_dir=str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    old = cfg.to_dict()
    del old["distill"]["teacher_mode"]                      # what an older q0ds wrote
    (tmp_path / "run" / "config.json").write_text(json.dumps(old))
    _write_run_config(cfg)
    _write_run_config(dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher_mode="zero3")))
    assert dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, teacher_mode="zero3")).fingerprint() \
        == cfg.fingerprint()
    changed = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, alpha=0.5))
    assert changed.fingerprint() != cfg.fingerprint()
    with pytest.raises(ConfigError, match="distill.alpha"):
        _write_run_config(changed)
