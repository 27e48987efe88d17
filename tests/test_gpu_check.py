"""benchmarks/gpu_check.py on a machine without a GPU: one JSON line, a one-line error, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `make gpu-check` runs for real")
def test_gpu_check_fails_clearly_without_a_gpu(tmp_path):
    p = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--out", str(tmp_path / "g.json")], cwd=ROOT,
                       text=True, capture_output=True, timeout=120)
    assert p.returncode == 2
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ok"] is False and "no CUDA GPU" in out["error"]
    assert p.stderr.strip().splitlines()[-1].startswith("gpu-check: error: no CUDA GPU")
    assert not (tmp_path / "g.json").exists()
