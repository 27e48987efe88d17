"""The air-gapped install (tools/wheelhouse.py, `make wheelhouse`), round trip on this machine.

Build the wheelhouse for this interpreter and glibc (pip download --only-binary with --python-version/--platform,
DeepSpeed built from its sdist), then into a venv that holds only torch 2.13.0 (the node's own torch):
pip install --no-index --find-links WHEELHOUSE q0ds, which must leave torch as it is, and train a tiny base with
that install's `q0ds` (outside the checkout, no PYTHONPATH). Cached under .cache/wheelhouse-test: pip's
downloads, DeepSpeed's wheel, the torch-only venv (extra packages are uninstalled before each install) and
the JIT-built DeepSpeed CPU op of that venv.
"""
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

CACHE = ROOT / ".cache" / "wheelhouse-test"
TORCH = "torch==2.13.0"


def _run(cmd, timeout=900, **kw):
    p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout, **kw)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-4000:]}"
    return p


def _freeze(py) -> set:
    return set(_run([py, "-m", "pip", "freeze", "--all"]).stdout.split())


def _torch_only_venv() -> Path:
    """A venv with torch (from this machine's pip config: the local CPU build) and nothing else; reused."""
    venv = CACHE / "venv"
    py = venv / "bin" / "python"
    base = venv / "torch-only.txt"
    if not base.is_file():
        _run([sys.executable, "-m", "venv", "--clear", venv])
        _run([py, "-m", "pip", "install", "-q", TORCH])
        base.write_text("\n".join(sorted(_freeze(py))) + "\n")
    extra = sorted({l.split("==")[0].split(" @ ")[0] for l in _freeze(py) - set(base.read_text().split())})
    if extra:                                          # what the previous round trip installed
        _run([py, "-m", "pip", "uninstall", "-y", "-q", *extra])
    assert _freeze(py) == set(base.read_text().split())
    return venv


@pytest.mark.wheelhouse
def test_wheelhouse_round_trip(tmp_path):
    env = dict(os.environ, PIP_CACHE_DIR=str(ROOT / ".cache" / "pip"))
    wh = CACHE / "wheels"
    for w in wh.glob("q0ds-*.whl"):
        w.unlink()                                     # always this checkout's q0ds
    glibc = platform.libc_ver()[1].split(".")
    plat = f"manylinux_{glibc[0]}_{glibc[1]}_{platform.machine()}"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    p = _run([sys.executable, ROOT / "tools" / "wheelhouse.py", "--out", wh, "--python-version", ver, "--platform", plat],
             env=env, timeout=1200)
    wheels = sorted(x.name for x in wh.glob("*.whl"))
    assert not [w for w in wheels if w.startswith(("torch-", "nvidia", "triton"))], wheels
    assert any(w.startswith("deepspeed-0.19.8-py3-none-any") for w in wheels), wheels
    print(p.stdout.splitlines()[-1])

    venv = _torch_only_venv()
    py, q0ds = venv / "bin" / "python", venv / "bin" / "q0ds"
    torch_before = [l for l in _freeze(py) if l.startswith("torch==")]
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_FIND_LINKS", "PIP_INDEX_URL")}
    clean.update(PIP_CONFIG_FILE=os.devnull, TORCH_EXTENSIONS_DIR=str(CACHE / "torch_extensions"))
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--find-links", wh, "q0ds"], env=clean, cwd=tmp_path)
    assert [l for l in _freeze(py) if l.startswith("torch==")] == torch_before      # the node's torch untouched
    where = _run([py, "-c", "import q0ds, deepspeed, transformers; print(q0ds.__file__)"], env=clean, cwd=tmp_path)
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    _run([q0ds, "prepare", "--embedded", "--out", "data", "--vocab-size", 512, "--fitness-tokens", 2000,
          "--val-tokens", 3000, "--max-train-tokens", 20000], env=clean, cwd=tmp_path)
    _run([q0ds, "init-config", "--preset", "tiny", "--data", "data", "--run", "run", "--out", "cfg.json",
          "schedule.cycles=1", "schedule.cycle_steps=2", "train.ckpt_every=2"], env=clean, cwd=tmp_path)
    _run([q0ds, "train", "--config", "cfg.json"], env=clean, cwd=tmp_path)
    done = tmp_path / "run" / "bases" / "base-00" / "done.json"
    assert done.is_file(), sorted(map(str, tmp_path.rglob("*")))
    steps = [json.loads(l) for l in (done.parent / "metrics.jsonl").read_text().splitlines() if '"step"' in l]
    assert steps, "no step was logged"
