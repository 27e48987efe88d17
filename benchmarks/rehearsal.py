"""CPU rehearsal of the 1.8b preset at its real widths (`make rehearsal`, issue 13 item 4).

    .venv/bin/python benchmarks/rehearsal.py [--layers 1] [--tiny] [--out benchmarks/results/rehearsal.json]

The real trainer through the deepspeed launcher (launchers/train.py), 2 CPU ranks, ZeRO-3, micro-batch 1:
the 1.8b preset (hidden 2048, FFN 5632, 16 heads, vocab 50304, seq 2048, Muon, grad clip 1.0) with the layers
reduced to --layers, chain distillation on from cycle 1, 3 cycles of 1 step (every cycle end writes a scored
snapshot, so consecutive snapshots differ by exactly one optimizer step). DTYPE IS FP32: bf16 matmuls on this
CPU are unusably slow (4 matmuls 2048x2048 by 2048x5632 did not finish in 12 CPU-minutes), so the run uses
model.dtype=fp32 and ds_configs/zero3_cpu.hjson. --tiny: the same checks at tiny widths (tests/test_rehearsal.py).

Checks (each recorded with pass/fail and its numbers):
 a. muon_step: the step-3 update of layer 0's matrices, from snapshots cycle 1 and 2, with the decay taken
    out: O = (W_3 - (1 - lr wd) W_2) / (lr sqrt(max(1, m/n))) is the orthogonalised Muon update. Newton-Schulz
    maps the gradient's leading singular values into about [0.68, 1.13] (its quintic's band), so the largest
    singular value of O is ~1; a clip of the Muon update by a global norm (issue 12: / ~700 at 1.8B, / ~100
    at one layer) would put it near 0.01. Passes when sigma_max(O) is in 0.6..1.3 for every matrix. Reported
    too: ||O||_F / sqrt(min(m, n)), which is ~1 only when every singular direction of the gradient is
    well above Newton-Schulz's floor (not so for a 2-sequence gradient at real width: 0.48-0.63 measured), and
    the decay factor fitted by least squares <W_3, W_2> / <W_2, W_2> against the logged 1 - lr wd.
    Perturbation is off in the rehearsal: its noise lands between those two snapshots.
 b. memory: peak resident memory (VmHWM) of each rank process vs plan.cpu_rank_memory, within 15%.
 c. snapshot: the last snapshot loads with AutoModelForCausalLM.from_pretrained and reproduces its val loss.
 d. resume: a run SIGKILLed inside the step-2 checkpoint (written, not yet marked complete:
    Q0DS_FAULT=crash_in_checkpoint=2) relaunches from the step-1 checkpoint and redoes step 2: the redone step's
    loss and the cycle-1 snapshot's sha256 must equal the killed launch's, bit for bit. Without --no-straight,
    also the same snapshot sha256s and step losses as an uninterrupted run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TINY = dict(vocab_size=2048, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
            head_dim=16, intermediate_size=176, tie_word_embeddings=False)
CYCLES, CRASH_AT = 3, 2
MEM_TOL = 0.15


def _hwm(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class RankMemory(threading.Thread):
    """Polls the launcher's descendants; keeps each rank's (--local_rank=N) last-read VmHWM (its peak RSS)."""

    def __init__(self, root_pid: int, every: float = 0.2):
        super().__init__(daemon=True)
        self.root, self.every, self.peak, self.stop = root_pid, every, {}, threading.Event()

    def run(self):
        import psutil
        while not self.stop.is_set():
            try:
                kids = psutil.Process(self.root).children(recursive=True)
            except psutil.Error:
                return
            for k in kids:
                try:
                    rank = next((a.split("=")[1] for a in k.cmdline() if a.startswith("--local_rank=")), None)
                    if rank is not None:
                        self.peak[int(rank)] = max(self.peak.get(int(rank), 0), _hwm(k.pid))
                except (psutil.Error, OSError, ValueError):
                    pass
            time.sleep(self.every)


def launch(config: Path, env: dict, timeout: float):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(port),
           "launchers/train.py", "--config", str(config), "--base", "0"]
    p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **env), text=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    mon = RankMemory(p.pid)
    mon.start()
    out, _ = p.communicate(timeout=timeout)
    mon.stop.set()
    mon.join()
    return p.returncode, out, dict(sorted(mon.peak.items()))


def baseline_rss() -> int:
    """Resident bytes of a process that imported what a rank imports, before any model exists."""
    code = ("import torch, deepspeed, transformers, q0ds.trainer, q0ds.engine\n"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, text=True, capture_output=True, check=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return int(p.stdout.strip().splitlines()[-1]) * 1024


def setup(work: Path, arch: dict, seq: int, tag: str):
    from q0ds.config import load_config, save_config
    from q0ds.data import prepare
    from q0ds.presets import preset_config
    from transformers import Qwen3Config
    data = work / "data"
    if not (data / "meta.json").is_file():
        prepare(data, embedded=True, val_tokens=2 * (seq + 1), fitness_tokens=2 * (seq + 1),
                max_train_tokens=max(100_000, (2 * CYCLES + 4) * (seq + 1)))
    model_dir = work / "model"
    Qwen3Config(**arch, rms_norm_eps=1e-6, max_position_embeddings=max(2048, seq)).save_pretrained(model_dir)
    ov = [f"model.config_path={model_dir}", "model.dtype=fp32", "ds_config=ds_configs/zero3_cpu.hjson",
          f"train.seq_len={seq}", "train.micro_batch=1", "train.global_batch=2", "train.small_batch=0",
          "train.ckpt_every=1", "train.log_every=1", f"schedule.cycles={CYCLES}", "schedule.cycle_steps=1",
          "distill.enabled=true", "distill.start_cycle=1", "eval.batch=1", "eval.fitness=true",
          # no perturbation: its noise (0.25..0.05 x std(W), added right after each snapshot) would land between the
          # two snapshots that check_muon differences and swamp the one-step Muon update (measured: 14-23x)
          "perturb.enabled=false"]
    run = work / f"run-{tag}"
    if run.exists():                          # a rehearsal measures from scratch (an old finished run would
        import shutil                         # make the crash launch a no-op)
        shutil.rmtree(run)
    cfg = load_config(None, ov, base=preset_config("1.8b", data=str(data), run_dir=str(run)))
    config = work / f"config-{tag}.json"
    save_config(cfg, config)
    return data, run, config


def records(run: Path):
    path = run / "bases" / "base-00" / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.exists() else []


def snap_dirs(run: Path):
    return sorted((run / "bases" / "base-00" / "snapshots").glob("cycle-*"))


def cpu_reduce_bucket_size() -> float:
    """ds_configs/zero3_cpu.hjson's reduce_bucket_size, else DeepSpeed's default (zero/config.py: 5e8)."""
    from q0ds.engine import load_ds_config
    return float(load_ds_config("ds_configs/zero3_cpu.hjson")["zero_optimization"].get("reduce_bucket_size", 5e8))


def check_muon(run: Path, recs: list) -> dict:
    import torch
    from safetensors.torch import load_file
    snaps = snap_dirs(run)
    w0, w1 = load_file(str(snaps[-2] / "model.safetensors")), load_file(str(snaps[-1] / "model.safetensors"))
    last = [r for r in recs if "tokens_per_s" in r][-1]
    lr, wd = last["lr_matrix"], last["wd_matrix"]
    out = {"step": last["step"], "lr_matrix": lr, "wd_matrix": wd, "grad_norm": last.get("grad_norm"),
           "grad_clip": 1.0, "matrices": {}}
    for name in ("mlp.down_proj", "mlp.gate_proj", "self_attn.o_proj"):
        key = f"model.layers.0.{name}.weight"
        a, b = w0[key].double(), w1[key].double()
        m, n = a.shape
        O = (b - (1 - lr * wd) * a) / (lr * max(1.0, m / n) ** 0.5)
        sv = torch.linalg.svdvals(O)
        out["matrices"][name] = {
            "shape": [m, n], "sigma_max": sv[0].item(), "sigma_median": sv.median().item(),
            "fro_over_sqrt_min_dim": (O.norm() / min(m, n) ** 0.5).item(),
            "decay_logged": 1 - lr * wd, "decay_fitted": ((a * b).sum() / (a * a).sum()).item()}
    out["pass"] = all(0.6 <= v["sigma_max"] <= 1.3 for v in out["matrices"].values())
    out["criterion"] = ("largest singular value of the decay-corrected, lr-normalised update in 0.6..1.3 for every "
                        "matrix (Newton-Schulz's band ~[0.68, 1.13]; a global-norm clip would give ~0.01)")
    return out


def check_snapshot(run: Path, data: Path, seq: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM
    from q0ds.data import PreparedData
    from q0ds.snapshot import read_meta, token_logprobs
    snap = snap_dirs(run)[-1]
    logged = read_meta(snap)["val_loss"]
    model = AutoModelForCausalLM.from_pretrained(snap, dtype=torch.float32).eval()
    windows, mask = PreparedData.open(data).eval_windows("val", seq)
    loss = -token_logprobs(model, windows, mask, batch=1).double().mean().item()
    rel = abs(loss - logged) / abs(logged)
    return {"snapshot": str(snap.relative_to(run)), "logged_val_loss": logged, "reloaded_val_loss": loss,
            "rel_diff": rel, "pass": rel < 1e-4, "criterion": "relative difference < 1e-4"}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny widths (the `make test` variant)")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=None, help="default 2048 (64 with --tiny)")
    ap.add_argument("--no-straight", action="store_true", help="skip the uninterrupted reference run")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "rehearsal"))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rehearsal.json"))
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per launch")
    args = ap.parse_args(argv)
    if args.layers < 1:
        sys.exit(f"rehearsal: error: --layers must be >= 1, got {args.layers}")
    t0 = time.time()
    import deepspeed
    import torch
    import transformers
    from q0ds import plan
    from q0ds.snapshot import sha256_file
    seq = args.seq_len or (64 if args.tiny else 2048)
    arch = dict(TINY if args.tiny else plan.ARCH["1.8b"], num_hidden_layers=args.layers)
    work = Path(args.work) / ("tiny" if args.tiny else f"{args.layers}l")
    data, run_c, config_c = setup(work, arch, seq, "resume")
    env = {"DS_ACCELERATOR": "cpu", "Q0DS_NO_PROGRESS": "1"}
    launches, peaks = [], {}
    for tag, config, fault in ([] if args.no_straight else [("straight", setup(work, arch, seq, "straight")[2], None)]) + \
            [("crash", config_c, f"crash_in_checkpoint={CRASH_AT}"), ("relaunch", config_c, None)]:
        t = time.time()
        rc, out, peak = launch(config, dict(env, Q0DS_FAULT=fault) if fault else env, args.timeout_s)
        launches.append({"run": tag, "fault": fault, "returncode": rc, "wall_s": round(time.time() - t, 1),
                         "peak_rss_bytes_per_rank": peak})
        peaks[tag] = peak
        if tag == "crash":                    # what the killed launch wrote, before the relaunch redoes it
            killed = {"losses": {r["step"]: r["loss"] for r in records(run_c) if "tokens_per_s" in r},
                      "sha256": {s.name: sha256_file(s / "model.safetensors") for s in snap_dirs(run_c)}}
        if (rc != 0) != (fault is not None):
            print(out[-4000:], file=sys.stderr)
            sys.exit(f"rehearsal: error: launch {tag} exited {rc} (expected {'non-zero' if fault else 0}); log above")
    ref_tag = "relaunch" if args.no_straight else "straight"
    ref = run_c if args.no_straight else work / "run-straight"
    if args.no_straight:        # the resumed run's peak per rank: over its crashed launch and its relaunch
        peaks["relaunch"] = {r: max(peaks["crash"].get(r, 0), v) for r, v in peaks["relaunch"].items()}
    recs = records(ref)
    checks = {"muon_step": check_muon(ref, recs)}
    base = baseline_rss()
    cpu_plan = plan.cpu_rank_memory(arch, world=2, micro_batch=1, seq_len=seq, dtype_bytes=4, optimizer="muon",
                                    teacher=True, baseline_bytes=base, reduce_bucket_size=cpu_reduce_bucket_size())
    measured = peaks[ref_tag]
    checks["memory"] = {"plan_total_bytes": cpu_plan["total_bytes"], "plan_bytes": cpu_plan["bytes"],
                        "measured_peak_rss_bytes": measured, "run": ref_tag,
                        "measured_over_plan": {r: v / cpu_plan["total_bytes"] for r, v in measured.items()},
                        "pass": len(measured) == 2 and all(abs(v / cpu_plan["total_bytes"] - 1) <= MEM_TOL
                                                           for v in measured.values()),
                        "criterion": f"every rank's VmHWM within {MEM_TOL:.0%} of plan.cpu_rank_memory"}
    checks["snapshot"] = check_snapshot(ref, data, seq)
    rec_c = records(run_c)
    steps_c = {r["step"]: r["loss"] for r in rec_c if "tokens_per_s" in r}
    sha_by_name = {s.name: sha256_file(s / "model.safetensors") for s in snap_dirs(run_c)}   # each hashed once
    sha_c = list(sha_by_name.values())
    res = {"resumed_steps": sorted(steps_c), "snapshots": len(sha_c), "relaunch_finished":
           (run_c / "bases" / "base-00" / "done.json").exists()}
    # the step the relaunch redid (killed inside its checkpoint) against the killed launch, bit for bit
    redone = {"step": CRASH_AT, "killed_loss": killed["losses"].get(CRASH_AT), "relaunch_loss": steps_c.get(CRASH_AT),
              "killed_sha256": killed["sha256"], "relaunch_sha256": {k: sha_by_name.get(k) for k in killed["sha256"]}}
    redone["pass"] = (redone["killed_loss"] is not None and redone["killed_loss"] == redone["relaunch_loss"]
                      and len(killed["sha256"]) == CRASH_AT and redone["killed_sha256"] == redone["relaunch_sha256"])
    res["redone_step"] = redone
    if not args.no_straight:
        steps_s = {r["step"]: r["loss"] for r in recs if "tokens_per_s" in r}
        sha_s = [sha256_file(s / "model.safetensors") for s in snap_dirs(ref)]
        res.update(straight_losses=steps_s, resumed_losses=steps_c, straight_sha256=sha_s, resumed_sha256=sha_c,
                   pass_=bool(sha_s and sha_s == sha_c and steps_s == steps_c and res["relaunch_finished"]
                              and redone["pass"]))
        res["criterion"] = "identical snapshot sha256s and step losses vs the uninterrupted run"
    else:
        res.update(pass_=res["relaunch_finished"] and len(sha_c) == CYCLES and sorted(steps_c) == list(range(1, CYCLES + 1))
                   and redone["pass"],
                   criterion=f"relaunch finished with every step and snapshot, and the redone step {CRASH_AT} (loss, "
                             "snapshot sha256) equals the killed launch's bit for bit")
    res["pass"] = res.pop("pass_")
    checks["resume"] = res
    snaps = [r for r in recs if r.get("event") == "snapshot"]
    out = {"ok": all(c["pass"] for c in checks.values()), "tiny": args.tiny,
           "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version()},
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg_at_end": os.getloadavg()},
           "dtype": "fp32", "dtype_note": "fp32, not bf16: bf16 matmuls on this CPU are unusably slow "
           "(4 matmuls 2048x2048 by 2048x5632 did not finish in 12 CPU-minutes)",
           "arch": arch, "seq_len": seq, "ranks": 2, "zero_stage": 3, "micro_batch": 1, "optimizer": "muon",
           "distill_start_cycle": 1, "cycles": CYCLES, "cycle_steps": 1,
           "distilled_steps": sum(bool(r.get("distilled")) for r in recs if "tokens_per_s" in r),
           "val_loss": [s["val_loss"] for s in snaps], "process_baseline_bytes": base,
           "checks": checks, "launches": launches, "wall_s": round(time.time() - t0, 1),
           "command": "benchmarks/rehearsal.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: (v["pass"] if isinstance(v, dict) and "pass" in v else v)
                      for k, v in {"ok": out["ok"], **checks, "wall_s": out["wall_s"]}.items()}))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
