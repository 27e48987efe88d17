"""The CPU rehearsal's checks at tiny widths (benchmarks/rehearsal.py --tiny; `make rehearsal` is the real-width run):
real deepspeed launcher, 2 ranks, ZeRO-3, Muon with grad clip, chain distillation, kill + relaunch. With
--no-straight: the resumed run is checked against the killed launch (the redone step and snapshot bit for bit);
that a killed-in-checkpoint run ends identical to an uninterrupted one is test_e2e_deepspeed's fault chain."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_rehearsal_tiny(tmp_path):
    out = tmp_path / "rehearsal.json"
    p = subprocess.run([sys.executable, "benchmarks/rehearsal.py", "--tiny", "--work", str(tmp_path / "work"),
                        "--out", str(out), "--no-straight"], cwd=ROOT, text=True, capture_output=True, timeout=900)
    assert out.exists(), p.stdout[-3000:] + p.stderr[-3000:]
    d = json.loads(out.read_text())
    c = d["checks"]
    assert c["muon_step"]["pass"], c["muon_step"]              # the orthogonalised step is not shrunk
    assert c["memory"]["pass"], c["memory"]                    # VmHWM per rank within 15% of cpu_rank_memory
    assert set(c["memory"]["measured_peak_rss_bytes"]) == {"0", "1"}
    assert c["snapshot"]["pass"], c["snapshot"]                # from_pretrained reproduces the logged val loss
    assert c["resume"]["pass"] and c["resume"]["relaunch_finished"], c["resume"]
    assert c["resume"]["resumed_steps"] == [1, 2, 3] and c["resume"]["snapshots"] == 3, c["resume"]
    assert c["memory"]["run"] == "relaunch"                    # peaks over the killed launch and its relaunch
    redone = c["resume"]["redone_step"]                        # killed inside checkpoint 2: step 2 redone exactly
    assert redone["pass"] and redone["killed_loss"] == redone["relaunch_loss"] and len(redone["killed_sha256"]) == 2
    for m in c["muon_step"]["matrices"].values():              # the WD path: fitted decay = the logged 1 - lr wd
        assert m["decay_fitted"] == pytest.approx(m["decay_logged"], abs=0.02), m
    assert d["distilled_steps"] == 2 and len(d["val_loss"]) == 3 and d["dtype"] == "fp32"
    assert d["ok"] and p.returncode == 0
