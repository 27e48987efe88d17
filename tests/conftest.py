"""Shared fixtures: CPU DeepSpeed env, one prepared embedded corpus per session, tiny run configs."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")          # before any deepspeed import (deepspeed.md section 12)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("Q0DS_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    from q0ds.data import prepare
    out = tmp_path_factory.mktemp("data") / "embedded"
    prepare(out, embedded=True, vocab_size=512, fitness_tokens=2000, val_tokens=3000, max_train_tokens=20000)
    return out


@pytest.fixture
def make_config(embedded_data, tmp_path):
    """tiny preset + overrides -> (config path, RunConfig)."""
    from q0ds.config import load_config, save_config
    from q0ds.presets import preset_config

    def make(*overrides, run="run", name="config.json"):
        cfg = load_config(None, list(overrides), base=preset_config("tiny", data=str(embedded_data), run_dir=str(tmp_path / run)))
        path = tmp_path / name
        save_config(cfg, path)
        return path, cfg
    return make


def run_cli(*args, env=None, timeout=600, check=True):
    """Run `python -m q0ds.cli ...` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "q0ds.cli", *map(str, args)], cwd=ROOT, env=e, text=True,
                       capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"q0ds {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_launcher(config, base, *overrides, ranks=2, env=None, timeout=900, check=True):
    """The real `deepspeed` launcher on CPU ranks."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    e = dict(os.environ, **(env or {}))
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(port), "launchers/train.py",
           "--config", str(config), "--base", str(base), *overrides]
    LAUNCH_PORTS.add(port)
    p = subprocess.run(cmd, cwd=ROOT, env=e, text=True, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    left = shm_leftovers({port})
    assert not left, f"the launch left DeepSpeed shm buffers behind: {left}"
    return p


LAUNCH_PORTS: set = set()      # master ports of this session's launches (other sessions may share /dev/shm)


def shm_leftovers(ports) -> list:
    """DeepSpeed shm all-reduce buffers (engine.shm_buffer_path) still in /dev/shm for these master ports."""
    return sorted(str(f) for port in ports for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.fixture(autouse=True, scope="session")
def _no_shm_left_behind():
    """Every launch of the session must release its /dev/shm buffers (about 69 MB per rank)."""
    yield
    left = shm_leftovers(LAUNCH_PORTS)
    assert not left, f"DeepSpeed shm buffers left in /dev/shm by this test session: {left}"


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


@pytest.fixture(autouse=True, scope="module")
def _restore_distributed_env():
    """In-process engine tests (q0ds.engine.setup_distributed) set RANK/MASTER_PORT...; a `q0ds` or `deepspeed`
    subprocess started later would inherit them and try to join that dead rendezvous. Restore per module."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
