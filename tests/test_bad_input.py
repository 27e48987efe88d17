"""Bad input and numerical faults: a clear error (exit 2, names the problem, no traceback) and no finished
work lost. Runs `q0ds` as users do (subprocesses, 1 CPU rank)."""
import errno
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from conftest import run_cli

TINY = ["schedule.cycles=3", "schedule.cycle_steps=3", "train.ckpt_every=2"]


def tree_digest(root) -> dict:
    """sha256 of every file under snapshots/ and checkpoints/ (what must never change on a refused launch)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and ("snapshots" in p.parts or "checkpoints" in p.parts):
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_user_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    msg = p.stderr
    for n in needles:
        assert n in msg, f"{n!r} not in: {msg[-1500:]}"
    assert "Traceback" not in msg


@pytest.fixture(scope="module")
def partial_run(tmp_path_factory, embedded_data):
    """A tiny run pre-empted at step 4: snapshot cycle-0000 and checkpoints exist, cycles 1-2 remain."""
    from q0ds.config import load_config, save_config
    from q0ds.presets import preset_config
    root = tmp_path_factory.mktemp("bad")
    cfg = load_config(None, TINY, base=preset_config("tiny", data=str(embedded_data), run_dir=str(root / "run")))
    save_config(cfg, root / "c.json")
    p = run_cli("train", "--config", root / "c.json", env={"Q0DS_FAULT": "preempt_at_step=4"}, check=False)
    assert p.returncode == 75, p.stderr[-2000:]
    return root, cfg


def _copy(partial_run, tmp_path, *overrides):
    """A copy of the partial run (own run dir) and a config for it with `overrides`."""
    from q0ds.config import load_config, save_config
    root, cfg = partial_run
    shutil.copytree(cfg.run_dir, tmp_path / "run")
    d = cfg.to_dict()
    d["run_dir"] = str(tmp_path / "run")
    new = load_config(None, list(overrides), base=json.loads(json.dumps(d)))
    save_config(new, tmp_path / "c.json")
    # the copied run dir keeps the original resolved config.json, rewritten for its new location
    (tmp_path / "run" / "config.json").write_text(json.dumps(dict(d), indent=2))
    return tmp_path / "c.json", tmp_path / "run"


def test_prepare_missing_empty_and_too_small(tmp_path):
    assert_user_error(run_cli("prepare", "--input", tmp_path / "nope", "--out", tmp_path / "d", check=False), "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n\n")
    assert_user_error(run_cli("prepare", "--input", tmp_path / "empty", "--out", tmp_path / "d2", check=False), "empty")
    (tmp_path / "small.txt").write_text("one short document.\n\nanother one.\n")
    assert_user_error(run_cli("prepare", "--input", tmp_path / "small.txt", "--out", tmp_path / "d3", check=False), "small")


@pytest.mark.parametrize("overrides,needle", [
    (["schedule.cyclez=3"], "schedule.cyclez"),
    (["train.global_batch=6"], "train.global_batch=6"),          # 6 is not a multiple of micro 4 x world 1
    (["train.seq_len=100000"], "seq_len"),                        # corpus too small for one window
    (["ds_config=\"/nonexistent/ds.hjson\""], "/nonexistent/ds.hjson"),
])
def test_bad_config_refused_before_work(make_config, tmp_path, overrides, needle):
    from q0ds.config import save_config
    path, cfg = make_config(*TINY)
    raw = json.loads(path.read_text())
    for o in overrides:                                           # write the bad value into the file itself
        k, v = o.split("=", 1)
        node = raw
        *parents, last = k.split(".")
        for part in parents:
            node = node[part]
        node[last] = json.loads(v)
    path.write_text(json.dumps(raw))
    p = run_cli("train", "--config", path, check=False)
    assert_user_error(p, needle)
    assert not list(Path(cfg.run_dir).rglob("model.safetensors"))


def test_malformed_files(make_config, tmp_path):
    path, cfg = make_config(*TINY)
    bad = tmp_path / "bad.json"
    bad.write_text(path.read_text()[:-20])
    assert_user_error(run_cli("train", "--config", bad, check=False), "not valid JSON")
    ds = tmp_path / "ds.hjson"
    ds.write_text("{ zero_optimization: { stage: 3 ")
    p2, _ = make_config(*TINY, f"ds_config=\"{ds}\"", name="c2.json")
    assert_user_error(run_cli("train", "--config", p2, check=False), "not valid HJSON")


def test_model_vocab_smaller_than_tokenizer(make_config, tmp_path):
    from transformers import Qwen3Config
    Qwen3Config(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                head_dim=16, intermediate_size=64).save_pretrained(tmp_path / "m")
    path, _ = make_config(*TINY, f"model.config_path=\"{tmp_path / 'm'}\"", "model.preset=\"\"")
    assert_user_error(run_cli("train", "--config", path, check=False), "vocab_size 100", "512")


def test_tokenizer_not_matching_data(make_config, embedded_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(embedded_data, data)
    tok = json.loads((data / "tokenizer" / "tokenizer.json").read_text())
    tok["model"]["vocab"]["zzzz-extra"] = len(tok["model"]["vocab"]) + 5
    (data / "tokenizer" / "tokenizer.json").write_text(json.dumps(tok))
    path, _ = make_config(*TINY, f"data=\"{data}\"")
    assert_user_error(run_cli("train", "--config", path, check=False), "tokenizer")


def test_resume_with_changed_config_is_refused(partial_run, tmp_path):
    path, run = _copy(partial_run, tmp_path, "schedule.cycles=5")
    before = tree_digest(run)
    assert_user_error(run_cli("train", "--config", path, check=False), "schedule.cycles")
    assert tree_digest(run) == before


def test_resume_with_changed_data_is_refused(partial_run, tmp_path):
    root, cfg = partial_run
    from q0ds.data import prepare
    data = tmp_path / "other_data"
    prepare(data, embedded=True, vocab_size=512, fitness_tokens=2000, val_tokens=3000, max_train_tokens=15000)
    path, run = _copy(partial_run, tmp_path)
    d = json.loads(path.read_text())
    d["data"] = str(data)
    path.write_text(json.dumps(d))
    (run / "config.json").write_text(json.dumps(d))                # even with the run config edited to match
    before = tree_digest(run)
    assert_user_error(run_cli("train", "--config", path, check=False), "different prepared data")
    assert tree_digest(run) == before


def test_truncated_checkpoint_is_refused_then_previous_is_usable(partial_run, tmp_path):
    path, run = _copy(partial_run, tmp_path)
    ckpts = sorted((run / "bases/base-00/checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000003", "step-00000004"]
    states = next(ckpts[-1].glob("*model_states.pt"))
    states.write_bytes(states.read_bytes()[:100])
    snaps = {p: p.read_bytes() for p in run.rglob("snapshots/*/model.safetensors")}
    p = run_cli("train", "--config", path, check=False)
    assert_user_error(p, "step-00000004", "could not be loaded")
    assert {p: p.read_bytes() for p in run.rglob("snapshots/*/model.safetensors")} == snaps
    shutil.rmtree(ckpts[-1])                                        # the fix the message gives
    run_cli("train", "--config", path)
    assert len(list(run.glob("bases/base-00/snapshots/cycle-*"))) == 3


def test_nan_loss_stops_with_step_and_cycle_and_keeps_work(partial_run, tmp_path):
    path, run = _copy(partial_run, tmp_path)
    before = tree_digest(run)
    p = run_cli("train", "--config", path, env={"Q0DS_FAULT": "nan_at_step=5"}, check=False)
    assert_user_error(p, "non-finite loss at step 5 (cycle 1", "nan_policy")
    assert tree_digest(run) == before                               # nothing finished was touched
    run_cli("train", "--config", path)                              # relaunch without the fault: completes
    assert (run / "bases/base-00/done.json").is_file()


def test_nan_loss_skip_policy_continues(make_config):
    path, cfg = make_config(*TINY, "train.nan_policy=\"skip\"")
    run_cli("train", "--config", path, env={"Q0DS_FAULT": "nan_at_step=2"})
    metas = [json.loads(p.read_text()) for p in sorted(Path(cfg.run_dir).rglob("snapshot.json"))]
    assert len(metas) == 3 and all(m["val_loss"] == m["val_loss"] and m["val_loss"] < 20 for m in metas)


def test_out_of_disk_space_while_writing_snapshot(tmp_path, monkeypatch):
    import safetensors.torch
    import torch
    from transformers import Qwen3Config
    from q0ds.files import WriteFailed
    from q0ds.snapshot import write_snapshot
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")
    cfg = Qwen3Config(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                      head_dim=8, intermediate_size=32)
    target = tmp_path / "snapshots" / "cycle-0000"
    write_snapshot(target, {"w": torch.ones(3)}, cfg, tmp_path / "tok", {"cycle": 0})
    good = (target / "model.safetensors").read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(WriteFailed, match=f"cannot write {target}: out of disk space .* free of .*; free space on "):
        write_snapshot(target, {"w": torch.zeros(3)}, cfg, tmp_path / "tok", {"cycle": 0})
    assert (target / "model.safetensors").read_bytes() == good      # the existing snapshot is untouched
    assert [p.name for p in (tmp_path / "snapshots").iterdir()] == ["cycle-0000"]   # no temp dir left
