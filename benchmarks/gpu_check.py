"""One-command GPU check (`make gpu-check`, issue 13): the 1.8b preset on the GPUs present, <= 8 minutes.

    .venv/bin/python benchmarks/gpu_check.py [--steps 3] [--seq-len 2048] [--out benchmarks/results/gpu_check.json]

Runs the real trainer through the deepspeed launcher (launchers/train.py, no second loop): the 1.8b preset
(full 30 layers if `q0ds plan --memory` says they fit on the GPU count and memory present, else the largest
layer count that does, stated in the JSON), bf16, Muon, chain distillation on from cycle 1, two cycles of
--steps steps each (cycle 0 ends with snapshot + scoring + teacher refresh + checkpoint; cycle 1 is distilled).
With two or more GPUs the run is pre-empted after the first distilled step (Q0DS_FAULT=preempt_at_step, the
step-flag collective) and relaunched: it must resume and finish, exercising the scoring gather, teacher refresh,
checkpoint and resume across ranks. Prints one JSON summary: tokens/s, model FLOPs utilisation (time_plan's
FLOPs/token over the GPUs' bf16 peak), peak GPU memory (rank 0, torch.cuda.max_memory_allocated, logged by the
trainer) against memory_plan() for the same configuration. Exits 2 with a one-line error when no CUDA GPU is
visible (this script has nothing to measure on CPU: use `make rehearsal` there).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fail(msg: str, code: int = 2):
    print(json.dumps({"ok": False, "error": msg}))
    print(f"gpu-check: error: {msg}", file=sys.stderr)
    sys.exit(code)


def pick_layers(plan, gpus: int, micro_batch: int, seq: int, mem_gb: float) -> int:
    from q0ds.plan import ARCH
    for L in range(ARCH["1.8b"]["num_hidden_layers"], 0, -1):
        arch = dict(ARCH["1.8b"], num_hidden_layers=L)
        if plan.memory_plan(arch, gpus=gpus, micro_batch=micro_batch, seq_len=seq, optimizer="muon",
                            gpu_mem_gb=mem_gb, deepspeed_check=False)["fits"]:
            return L
    return 0


def launch(config: Path, gpus: int, env: dict, timeout: float) -> subprocess.CompletedProcess:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", str(gpus), "--master_port", str(port),
           "launchers/train.py", "--config", str(config), "--base", "0"]
    return subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, **env), text=True, capture_output=True, timeout=timeout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per cycle (2 cycles)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "gpu_check"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check.json"))
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock limit for the whole check")
    args = ap.parse_args(argv)
    t0 = time.time()
    import torch
    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        fail("no CUDA GPU visible (torch.cuda.is_available() is False); run this on a GPU machine, "
             "or `make rehearsal` for the CPU rehearsal")
    if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
        fail(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} but this check is for CUDA; unset it or set DS_ACCELERATOR=cuda")
    from q0ds import plan
    from q0ds.config import load_config, save_config
    from q0ds.data import prepare
    from q0ds.presets import preset_config
    from transformers import Qwen3Config
    gpus = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    mem_gb = props.total_memory / 1e9
    L = pick_layers(plan, gpus, args.micro_batch, args.seq_len, mem_gb)
    if L == 0:
        fail(f"the 1.8b widths do not fit even with one layer on {gpus} x {mem_gb:.0f} GB (memory_plan); "
             "lower --seq-len or --micro-batch")
    work = Path(args.work)
    data = work / "data"
    windows = 2 * args.steps * gpus * args.micro_batch + 4
    if not (data / "meta.json").is_file():
        prepare(data, embedded=True, val_tokens=2 * (args.seq_len + 1), fitness_tokens=2 * (args.seq_len + 1),
                max_train_tokens=windows * (args.seq_len + 1))
    model_dir = work / f"model-{L}l"
    Qwen3Config(**dict(plan.ARCH["1.8b"], num_hidden_layers=L), rms_norm_eps=1e-6,
                max_position_embeddings=max(2048, args.seq_len)).save_pretrained(model_dir)
    ov = [f"model.config_path={model_dir}", f"train.seq_len={args.seq_len}", f"train.micro_batch={args.micro_batch}",
          f"train.global_batch={gpus * args.micro_batch}", "train.small_batch=0", f"train.ckpt_every={args.steps}",
          "schedule.cycles=2", f"schedule.cycle_steps={args.steps}", "distill.enabled=true", "distill.start_cycle=1",
          "eval.batch=1", "eval.fitness=true"]
    run = work / "run"
    cfg = load_config(None, ov, base=preset_config("1.8b", data=str(data), run_dir=str(run)))
    config = work / "config.json"
    save_config(cfg, config)
    env = {"DS_ACCELERATOR": "cuda", "Q0DS_NO_PROGRESS": "1"}
    launches = []
    if gpus >= 2:                                   # pre-empt after the first distilled step, then resume
        first = launch(config, gpus, dict(env, Q0DS_FAULT=f"preempt_at_step={args.steps + 1}"), args.budget_s)
        launches.append({"fault": f"preempt_at_step={args.steps + 1}", "returncode": first.returncode})
        if "pre-empted" not in first.stdout + first.stderr:
            fail(f"the pre-empted launch did not pre-empt (exit {first.returncode}): {first.stderr[-500:]!r}", 1)
    p = launch(config, gpus, env, max(60.0, args.budget_s - (time.time() - t0)))
    launches.append({"fault": None, "returncode": p.returncode})
    if p.returncode != 0:
        fail(f"training exited {p.returncode}: {p.stderr[-800:]!r}", 1)
    base = run / "bases" / "base-00"
    recs = [json.loads(l) for l in (base / "metrics.jsonl").read_text().splitlines() if l.strip()]
    steps = [r for r in recs if "tokens_per_s" in r]
    snaps = [r for r in recs if r.get("event") == "snapshot"]
    tok_s = sorted(r["tokens_per_s"] for r in steps[1:] or steps)
    tok_s = tok_s[len(tok_s) // 2]
    peak_name = next((k for k in plan.PEAK_FLOPS if k in props.name.lower()), None)
    arch = dict(plan.ARCH["1.8b"], num_hidden_layers=L)
    tp = plan.time_plan(arch, gpus=gpus, seq_len=args.seq_len, gpu=peak_name or "h100")
    mp_ = plan.memory_plan(arch, gpus=gpus, micro_batch=args.micro_batch, seq_len=args.seq_len, optimizer="muon",
                           gpu_mem_gb=mem_gb, deepspeed_check=False)
    peak = max(r.get("peak_gpu_mem_bytes", 0) for r in steps)
    out = {"ok": bool(len(snaps) == 2 and (base / "done.json").exists()), "gpus": gpus, "gpu": props.name,
           "gpu_mem_gb": mem_gb, "layers": L, "layers_note": "full depth" if L == 30 else f"reduced from 30 to fit",
           "seq_len": args.seq_len, "micro_batch": args.micro_batch, "steps": len(steps), "cycles": len(snaps),
           "distilled_steps": sum(bool(r.get("distilled")) for r in steps), "val_loss": [s["val_loss"] for s in snaps],
           "tokens_per_s": tok_s, "flops_per_token": tp["flops_per_token"],
           "mfu": (tok_s * tp["flops_per_token"] / (gpus * plan.PEAK_FLOPS[peak_name])) if peak_name else None,
           "peak_gpu_mem_bytes_rank0": peak, "plan_total_bytes": mp_["total_bytes"],
           "peak_over_plan": peak / mp_["total_bytes"], "launches": launches, "wall_s": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
