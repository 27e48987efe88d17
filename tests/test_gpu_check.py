"""benchmarks/gpu_check.py: without a GPU a one-line error (exit 2); with --cpu-rehearsal the whole orchestration
(preflight, launch A, the SIGKILL, launch B, the JSON) on 2 CPU ranks; a launch over budget is killed whole with
a partial JSON; the collective helpers forced at world size 1 (Q0DS_FORCE_COLLECTIVES)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = "benchmarks/gpu_check.py"


def ranks_left(marker: str) -> list:
    """Processes whose command line names `marker` (this test's work dir)."""
    out = subprocess.run(["ps", "-eo", "pid,args"], text=True, capture_output=True).stdout
    return [l for l in out.splitlines() if marker in l and "ps -eo" not in l]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `make gpu-check` runs for real")
def test_gpu_check_fails_clearly_without_a_gpu(tmp_path):
    p = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "g.json")], cwd=ROOT,
                       text=True, capture_output=True, timeout=120)
    assert p.returncode == 2
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["ok"] is False and "no CUDA GPU" in out["error"] and "--cpu-rehearsal" in out["error"]
    assert p.stderr.strip().splitlines()[-1].startswith("gpu-check: error: no CUDA GPU")
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path / "g.json").exists()


def test_cpu_rehearsal_runs_every_phase(tmp_path):
    work, out = tmp_path / "work", tmp_path / "g.json"
    p = subprocess.run([sys.executable, SCRIPT, "--cpu-rehearsal", "--work", str(work), "--out", str(out)], cwd=ROOT,
                       text=True, capture_output=True, timeout=600)
    r = json.loads(out.read_text())
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-2000:], r.get("error"))
    assert r["ok"] and r["phase"] == "done" and all(r["checks"].values()), r["checks"]
    pf = r["preflight"]
    assert {"torch", "transformers", "deepspeed", "python"} <= set(pf["versions"]) and pf["disk_ok"]
    assert {"TORCH_EXTENSIONS_DIR", "TRITON_CACHE_DIR"} == set(pf["caches"]) and "nvcc_means" in pf
    a, b = r["launch_A"], r["launch_B"]
    assert a["rc"] not in (0, "timeout") and b["rc"] == 75 and not a["left_behind"] and not b["left_behind"]
    assert r["teacher_mode"] == "replicated"
    res = r["resume"]
    assert all(res["state_matches"].values()) and res["at_checkpoint"]["step"] == 5
    assert res["at_checkpoint"]["teacher_cycle"] == 0 and res["at_checkpoint"]["teacher_digest"]
    assert res["loss_rel_diff"] <= r["tolerances"]["redo_loss_rel"]
    assert r["reload"]["rel_diff"] <= r["tolerances"]["reload_val_rel"]
    assert r["muon_check"]["ok"] and len(r["muon_check"]["matrices"]) == 3
    s = r["steps"]
    assert s["plain"]["steps"] == 3 and s["distilled"]["steps"] == 8         # steps 2-4 plain, 5-12 distilled
    for kind in ("plain", "distilled"):
        assert s[kind]["tokens_per_s"] > 0 and s[kind]["fwd_s"] > 0 and s[kind]["opt_s"] > 0
    assert s["distilled"]["teacher_s"] > 0 and r["distillation_overhead"] is not None
    assert r["optimizer_step_s"] > 0 and r["cycle_end_s"] > 0
    assert all(r["events_median_s"][k] is not None for k in ("gather_s", "write_s", "hash_s", "score_s",
                                                             "refresh_s", "perturb_s", "checkpoint_s"))
    assert r["launch_C"]["rc"] == 0 and not r["launch_C"]["left_behind"]       # B was pre-empted (2 ranks)
    assert any("universal" in x for x in r["not_settled_here"]) and not ranks_left(str(work))


def test_a_launch_over_budget_is_killed_whole_with_a_partial_json(tmp_path):
    work, out = tmp_path / "work", tmp_path / "g.json"
    p = subprocess.run([sys.executable, SCRIPT, "--cpu-rehearsal", "--work", str(work), "--out", str(out),
                        "--budget-s", "8"], cwd=ROOT, text=True, capture_output=True, timeout=300)
    assert p.returncode == 1
    r = json.loads(out.read_text())
    assert r["ok"] is False and r["phase"] == "launch A" and r["launch_A"]["rc"] == "timeout"
    assert "preflight" in r and not r["launch_A"]["left_behind"] and not ranks_left(str(work))
    assert p.stderr.strip().splitlines()[-1].startswith("gpu-check: error: launch A")


@pytest.mark.parametrize("forced", [True, False])
def test_collective_helpers_forced_at_world_size_one(tmp_path, forced):
    code = ("from q0ds import engine as E; import torch; E.setup_distributed(); "
            "t = E.all_reduce_(torch.ones(2), 'cpu'); g = E.all_gather_cat(torch.ones(3), 'cpu'); "
            "b = E.broadcast_(torch.ones(1), 'cpu'); assert t.tolist() == [1, 1] and g.shape == (3,); E.finish()")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "Q0DS_FORCE_COLLECTIVES")}
    env.update(Q0DS_RECORD_COLLECTIVES=str(tmp_path), PYTHONPATH=str(ROOT))
    if forced:
        env["Q0DS_FORCE_COLLECTIVES"] = "1"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=900)
    log = tmp_path / "rank-0.jsonl"
    ops = [json.loads(l)["op"] for l in log.read_text().splitlines()] if log.is_file() else []
    helper_ops = [o for o in ops if o in ("all_reduce", "all_gather_into_tensor", "broadcast")]
    if forced:
        assert {"all_reduce", "all_gather_into_tensor", "broadcast"} <= set(helper_ops), ops
    else:
        assert helper_ops == [], ops


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: `make gpu-check` runs for real")
def test_make_gpu_check_uses_an_interpreter_that_imports_q0ds(tmp_path):
    """With q0ds importable by PY (a cluster's own CUDA env), the target never builds the pinned venv."""
    venv = tmp_path / "never-built"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(["make", "-s", "gpu-check", f"PY={sys.executable}", f"VENV={venv}"], cwd=ROOT, env=env,
                       text=True, capture_output=True, timeout=300)
    assert p.returncode != 0 and not venv.exists()
    assert "gpu-check: error: no CUDA GPU" in p.stderr and "pip" not in p.stdout + p.stderr
