"""Smoke subset against the transformers floor (run by tests/test_transformers_floor.py with
PYTHONPATH=.cache/tf517:<repo>; usage: python tests/smoke_floor.py WORKDIR).

1. transformers 5.17.0 is the one imported, and it lacks prevent_arange_dtype_change (q0ds.compat's copy runs);
2. a tiny 2-rank ZeRO-3 run (the real deepspeed launcher, activation checkpointing on) trains 2 steps to a
   checkpoint and a snapshot; the ranks used 5.17 too (the snapshot's config.json says so);
3. the snapshot reloads with from_pretrained and reproduces its logged val loss;
4. a model built under zero.Init with bf16 keeps RoPE's inv_freq in fp32.
"""
import copy
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("Q0DS_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parent.parent
WANT = "5.17.0"


def main(work: Path) -> int:
    import huggingface_hub
    import torch
    import transformers
    import transformers.integrations.deepspeed as tid
    assert transformers.__version__ == WANT, (transformers.__version__, transformers.__file__)
    assert not hasattr(tid, "prevent_arange_dtype_change"), "this transformers has the helper: not the floor"
    assert not hasattr(transformers.PreTrainedModel, "activation_checkpointing_enable")

    from q0ds.config import load_config, save_config
    from q0ds.data import PreparedData, prepare
    from q0ds.presets import preset_config
    data = work / "data"
    prepare(data, embedded=True, vocab_size=512, fitness_tokens=2000, val_tokens=3000, max_train_tokens=20000)
    cfg = load_config(None, ["schedule.cycles=1", "schedule.cycle_steps=2", "train.ckpt_every=2",
                             "train.activation_checkpointing=true"],
                      base=preset_config("tiny", data=str(data), run_dir=str(work / "run")))
    path = work / "config.json"
    save_config(cfg, path)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
           "launchers/train.py", "--config", str(path), "--base", "0"]
    # own process group, killed whole on timeout: no rank is left behind (the first run JIT-builds DeepSpeed's
    # CPU shm op, minutes on a loaded machine; later runs reuse it)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    if proc.returncode != 0:
        print(out[-4000:], err[-6000:], sep="\n", file=sys.stderr)
        return 1
    base = Path(cfg.run_dir) / "bases" / "base-00"
    assert (base / "done.json").is_file() and list((base / "checkpoints").iterdir()), sorted(base.rglob("*"))
    snap = base / "snapshots" / "cycle-0000"
    hf = json.loads((snap / "config.json").read_text())
    assert hf["transformers_version"] == WANT, hf.get("transformers_version")

    from transformers import AutoModelForCausalLM
    from q0ds.snapshot import token_logprobs, verify
    meta = verify(snap)
    model = AutoModelForCausalLM.from_pretrained(snap, local_files_only=True).eval()
    windows, mask = PreparedData.open(data).eval_windows("val", cfg.train.seq_len)
    val = -token_logprobs(model, windows, mask, batch=16).double().mean().item()
    assert abs(val - meta["val_loss"]) < 1e-4, (val, meta["val_loss"])

    from q0ds import engine as E
    from q0ds.model import build_config
    E.setup_distributed()
    ds = copy.deepcopy(E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, 1))
    ds["bf16"] = {"enabled": True}
    mc = build_config(cfg.model, 128, 0, 1, 16)
    inv = [b for n, b in E.build_partitioned(mc, 0, ds).named_buffers() if n.endswith("inv_freq")]
    assert inv and all(b.dtype == torch.float32 for b in inv), [b.dtype for b in inv]
    print(f"smoke_floor: ok transformers {transformers.__version__} huggingface_hub {huggingface_hub.__version__}: "
          f"2-rank ZeRO-3 run, snapshot val loss {val:.5f} reproduced, inv_freq fp32 under zero.Init bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
