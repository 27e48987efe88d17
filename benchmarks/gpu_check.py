"""First contact with a GPU node (issue 19 section 4): one run of at most ~8 minutes, one JSON. docs/gpu-check.md.

    python benchmarks/gpu_check.py                      # the node's own interpreter, every GPU visible
    python benchmarks/gpu_check.py --cpu-rehearsal      # the same orchestration: tiny preset, 2 CPU ranks

1 preflight  versions, nvcc / C compiler, GPUs and their memory, free disk against the run's checkpoints and
             snapshots, extension/Triton caches.
2 launch A   `python -m deepspeed.launcher.runner` on every GPU: the 1.8b preset at full depth (bf16, Muon with
             the raw-gradient clip, residual dropout), micro batch 4 x 2048 with 4 micro-steps per step, 3 cycles
             of 4 steps, distillation from cycle 1, per-phase timings (Q0DS_PHASE_TIMES), the collective helpers
             forced at world size 1 (Q0DS_FORCE_COLLECTIVES), the Muon check on the fp32 master of three matrices
             around step 1. Checkpoint after step 5 (the first distilled step), SIGKILL after step 6.
3 launch B   resume from step 5: step, LR/WD, teacher and RNG state as checkpointed; step 6 redone within
             tolerance; snapshot cycle-0000 reloaded with from_pretrained reproduces its logged val loss.
4 JSON       tokens/s and MFU of plain and distilled steps, distillation overhead, phase and event times, peak
             memory vs memory_plan, resume time, what one GPU cannot settle. Written after every phase (partial on
             any failure). Without a GPU and without --cpu-rehearsal: exit 2 with a one-line error.

Every launch runs in its own session (process group), killed whole on timeout and after it exits.
The ranks run this file with --rank-entry (the trainer, instrumented: Muon check, state fingerprints).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STEPS, CYCLES, MICRO_STEPS, KEEP_AT, KILL_AFTER = 4, 3, 4, 5, 6      # checkpoint at 5, SIGKILL after 6
MATRICES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.{mid}.mlp.down_proj.weight",
            "model.layers.{last}.mlp.gate_proj.weight")
TOL = {"gpu": {"redo_loss_rel": 2e-3, "reload_val_rel": 5e-3}, "cpu": {"redo_loss_rel": 1e-6, "reload_val_rel": 1e-5}}
PREEMPT_AT = 9                      # with 2+ ranks launch B is pre-empted here (exit 75), launch C finishes


def cannot_settle(ranks: int) -> list:
    """What this run leaves unmeasured with `ranks` GPUs on one node."""
    one = ["multi-rank NCCL traffic (the Muon gradient all-reduce across ranks and its time; q0ds plan --memory "
           "estimates it)", "Muon's work split across ranks (each rank orthogonalises its share of the matrices)",
           "pre-emption across ranks (the stop flag in the loss all-reduce)"] if ranks == 1 else []
    return one + ["universal-checkpoint conversion across ranks (resume on another GPU count)",
                  "inter-node traffic (InfiniBand; q0ds plan --memory estimates it)"]


class CheckError(Exception):
    """A failed check: its phase and one line."""


def fail(msg: str, code: int = 2):
    print(json.dumps({"ok": False, "error": msg}))
    print(f"gpu-check: error: {msg}", file=sys.stderr)
    sys.exit(code)


# ---------------------------------------------------------------- 1 preflight
def preflight(work: Path, cpu: bool, need_bytes: int) -> dict:
    import torch
    import transformers
    import deepspeed
    nvcc = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                    if os.environ.get("CUDA_HOME") else None)
    cc = next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    work.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(work).free
    gpus = [] if cpu else gpu_list()
    caches = {}
    from torch.utils.cpp_extension import get_default_build_root
    for var, default in (("TORCH_EXTENSIONS_DIR", get_default_build_root()), ("TRITON_CACHE_DIR", "~/.triton/cache")):
        p = Path(os.path.expanduser(os.environ.get(var) or default))
        caches[var] = {"path": str(p), "exists": p.is_dir(),
                       "entries": len(list(p.iterdir())) if p.is_dir() else 0}
    return {"versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                         "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
                         "cuda": torch.version.cuda},
            "nvcc": nvcc, "c_compiler": cc,
            "nvcc_means": "DeepSpeed can JIT-build FusedAdam/ops" if nvcc else
                          "no CUDA toolkit: no JIT-built DeepSpeed ops (FusedAdam); the AdamW groups need a fallback",
            "c_compiler_means": "torch.compile (Triton) can build Muon's Newton-Schulz kernel" if cc else
                                "no C compiler: Triton cannot compile DeepSpeed's torch.compile'd muon_update",
            "gpus": gpus, "free_disk_bytes": free, "needed_disk_bytes": need_bytes, "disk_ok": free >= need_bytes,
            "caches": caches}


def gpu_list() -> list:
    """Names and memory of the visible GPUs, from a child process: this one must not hold a CUDA context on
    GPU 0 (~0.5 GB) while the ranks measure their peak memory."""
    code = ("import json, torch; print(json.dumps([{'name': torch.cuda.get_device_name(i), 'memory_bytes': "
            "torch.cuda.get_device_properties(i).total_memory} for i in range(torch.cuda.device_count())]))")
    return json.loads(subprocess.run([sys.executable, "-c", code], text=True, capture_output=True, check=True,
                                     timeout=300).stdout.strip().splitlines()[-1])


def disk_need(N: int, matrices: int, keep: int, cycles: int) -> int:
    """Bytes the check writes: `keep` DeepSpeed checkpoints (bf16 module 2 N + fp32 master 4 N + Muon momentum
    4 B per matrix param + Adam 8 B per other param) and `cycles` bf16 snapshots (2 N), 10% slack."""
    ckpt = 6 * N + 4 * matrices + 8 * (N - matrices)
    return int(1.1 * (keep * ckpt + cycles * 2 * N))


# ---------------------------------------------------------------- launches
def launch(work: Path, name: str, config: Path, ranks: int, env: dict, timeout: float) -> dict:
    """One `python -m deepspeed.launcher.runner` in its own session; the whole group is SIGKILLed on timeout and
    after it exits (no rank left behind). Returns {rc, wall_s, log, left_behind}."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(port),
           str(Path(__file__).resolve()), "--rank-entry", "--config", str(config), "--work", str(work)]
    log = work / f"launch-{name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, **env), stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            rc = "timeout"
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    left = group_alive(p.pid)
    return {"rc": rc, "wall_s": round(time.time() - t0, 2), "log": str(log), "left_behind": left,
            "stale_build_locks_removed": drop_build_locks(t0) if rc == "timeout" else []}


def group_alive(pgid: int, wait_s: float = 15.0) -> bool:
    """Is any process of group `pgid` still running (zombies not counted) after up to `wait_s`?"""
    end = time.time() + wait_s
    while True:
        alive = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":        # fields: state, ppid, pgrp, ...
                alive.append(stat.parent.name)
        if not alive or time.time() > end:
            return bool(alive)
        time.sleep(0.5)


def drop_build_locks(since: float) -> list:
    """A rank killed inside a JIT build (DeepSpeed ops, torch.utils.cpp_extension) leaves <ext dir>/<op>/lock,
    and every later load of that op waits for it forever. Remove the locks our killed launch created."""
    from torch.utils.cpp_extension import get_default_build_root
    root = Path(os.path.expanduser(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()))
    gone = []
    for lock in root.glob("**/lock"):
        if lock.stat().st_mtime >= since - 1:
            lock.unlink(missing_ok=True)
            gone.append(str(lock))
    return gone


def tail(path, n=1500) -> str:
    return Path(path).read_text(errors="replace")[-n:].replace("\n", " | ")


# ---------------------------------------------------------------- the rank side
def rank_entry(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rank-entry", action="store_true")
    ap.add_argument("--config", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    a = ap.parse_args(argv)
    t_start = time.time()
    import torch
    from q0ds import engine as E
    from q0ds.config import load_config
    from q0ds.trainer import BaseTrainer
    trainer = BaseTrainer(load_config(a.config, []), 0)
    out = Path(a.work) / f"{os.environ.get('Q0DS_CHECK_LAUNCH', 'x')}-rank{trainer.rank}.json"
    facts = {"teacher_mode": trainer.teacher_mode, "build_s": time.time() - t_start}
    L = trainer.model_config.num_hidden_layers
    names = [m.format(mid=L // 2, last=L - 1) for m in MATRICES]
    params = dict(trainer.student.module.named_parameters())

    def save():
        out.write_text(json.dumps(facts, indent=1))

    def fingerprint(label):
        """Step, lr/wd of every group, teacher cycle and weights digest, RNG digests of this rank."""
        g = E.group_values(trainer.sched, trainer.sched.mults)
        rng = {"torch": hashlib.sha256(torch.get_rng_state().numpy().tobytes()).hexdigest()[:16]}
        if torch.cuda.is_available():
            rng["cuda"] = hashlib.sha256(torch.cuda.get_rng_state().numpy().tobytes()).hexdigest()[:16]
        teacher = None
        if trainer.teacher is not None and trainer.teacher_mode == "replicated":
            teacher = hashlib.sha256(json.dumps([float(p.double().sum()) for p in trainer.teacher.parameters()])
                                     .encode()).hexdigest()[:16]
        live = [[pg["lr"], pg["weight_decay"]] for pg in trainer.sched.optimizer.param_groups]
        facts[label] = {"step": trainer.step, "groups": {k: list(v) for k, v in g.items()}, "optimizer_groups": live,
                        "teacher_cycle": trainer.teacher_cycle, "teacher_digest": teacher, "rng": rng}
        save()

    step, ckpt, resume = trainer._train_step, trainer._checkpoint, trainer._resume

    def train_step(cyc):
        if trainer.step != 0:
            return step(cyc)
        from deepspeed.utils import safe_get_full_fp32_param
        before = {n: safe_get_full_fp32_param(params[n]).float().clone() for n in names}     # collective
        parts = step(cyc)
        after = {n: safe_get_full_fp32_param(params[n]).float() for n in names}
        if trainer.rank == 0:
            facts["muon"] = muon_check(before, after, E.group_values(trainer.sched, (parts["lr_mult"], parts["wd_mult"])))
            save()
        return parts

    def checkpoint():
        ckpt()
        if trainer.step == KEEP_AT:
            fingerprint("at_checkpoint")

    def resumed():
        t = time.time()
        resume()
        facts["resume_s"] = time.time() - t
        if trainer.step:
            fingerprint("after_resume")
    trainer._train_step, trainer._checkpoint, trainer._resume = train_step, checkpoint, resumed
    save()
    code = trainer.train()
    facts["exit"] = code
    save()
    E.finish()
    return code


def muon_check(before: dict, after: dict, groups: dict) -> dict:
    """DeepSpeed's Muon step on a matrix W (runtime/zero/muon/original_muon.py): W <- W (1 - lr wd) - lr U, U the
    Newton-Schulz orthogonalised momentum times sqrt(max(1, rows/cols)). From the fp32 master before/after step
    1: U = (W0 (1 - lr wd) - W1) / lr; an orthogonalised update has every singular value of U / scale near 1
    (quintic NS: about 0.7-1.2), a raw gradient step does not. Pass: median in [0.5, 1.5], >= 90% in [0.3, 1.6]."""
    import torch
    lr, wd = groups["matrix"]
    res = {"lr": lr, "wd": wd, "matrices": {}}
    ok = True
    for n, w0 in before.items():
        w1 = after[n]
        rows, cols = w0.shape
        u = (w0 * (1 - lr * wd) - w1) / lr / (max(1.0, rows / cols) ** 0.5)
        sv = torch.linalg.svdvals(u.double().cpu())
        med = float(sv.median())
        frac = float(((sv > 0.3) & (sv < 1.6)).double().mean())
        good = 0.5 <= med <= 1.5 and frac >= 0.9
        ok &= good
        res["matrices"][n] = {"shape": [rows, cols], "sv_median": med, "sv_min": float(sv.min()),
                              "sv_max": float(sv.max()), "frac_in_0.3_1.6": frac,
                              "rel_change": float((w1 - w0).norm() / w0.norm()), "ok": good}
    res["ok"] = ok
    return res


# ---------------------------------------------------------------- orchestration
def records(run: Path) -> list:
    p = run / "bases" / "base-00" / "metrics.jsonl"
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.is_file() else []


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def setup_run(work: Path, cpu: bool, ranks: int):
    from q0ds.config import load_config, save_config
    from q0ds.data import prepare
    from q0ds.presets import preset_config
    seq, micro = (32, 2) if cpu else (2048, 4)
    batch = ranks * micro * MICRO_STEPS
    data = work / "data"
    if not (data / "meta.json").is_file():
        prepare(data, embedded=True, vocab_size=512 if cpu else 2048, val_tokens=4 * (seq + 1),
                fitness_tokens=4 * (seq + 1), max_train_tokens=(STEPS * CYCLES * batch + 4) * (seq + 1))
    ov = [f"train.seq_len={seq}", f"train.micro_batch={micro}", f"train.global_batch={batch}", "train.small_batch=0",
          f"train.ckpt_every={KEEP_AT}", "train.keep_ckpts=2", "train.grad_clip=1.0", f"schedule.cycles={CYCLES}",
          f"schedule.cycle_steps={STEPS}", "distill.enabled=true", "distill.start_cycle=1", "eval.batch=2",
          "eval.fitness=true", "optim.name=muon", "model.dropout=0.1"]
    if cpu:     # mirror the GPU path: an 80+ GB GPU gets the replicated teacher from auto (q0ds plan --memory)
        ov += ["distill.teacher_mode=replicated"]
    run = work / "run"
    shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(None, ov, base=preset_config("tiny" if cpu else "1.8b", data=str(data), run_dir=str(run)))
    config = work / "config.json"
    save_config(cfg, config)
    return cfg, config, run


def reload_snapshot(run: Path, cpu: bool) -> dict:
    """Snapshot cycle-0000 through from_pretrained (bf16 on the GPU) against its logged val loss."""
    import torch
    from transformers import AutoModelForCausalLM
    from q0ds.data import PreparedData
    from q0ds.snapshot import read_meta, snapshot_dir, token_logprobs
    from q0ds.config import load_config
    cfg = load_config(run / "config.json", [])
    snap = snapshot_dir(run / "bases" / "base-00", 0)
    dev = "cpu" if cpu else "cuda"
    model = AutoModelForCausalLM.from_pretrained(snap, dtype=torch.float32 if cpu else torch.bfloat16).to(dev).eval()
    w, m = PreparedData.open(cfg.data).eval_windows("val", cfg.train.seq_len)
    got = -token_logprobs(model, w, m, cfg.eval.batch, device=dev).double().mean().item()
    logged = read_meta(snap)["val_loss"]
    return {"snapshot": str(snap), "logged_val_loss": logged, "reloaded_val_loss": got,
            "rel_diff": abs(got - logged) / abs(logged)}


def summarize(out: dict, recs: list, cpu: bool, ranks: int, cfg):
    from q0ds import plan
    steps = [r for r in recs if "tokens_per_s" in r]
    plain = [r for r in steps if not r["distilled"] and r["step"] > 1]          # step 1: warm-up (compile, JIT)
    dist = [r for r in steps if r["distilled"]]
    arch = plan.ARCH["tiny" if cpu else "1.8b"]
    tp = plan.time_plan(arch, gpus=ranks, tokens_per_step=cfg.train.global_batch * cfg.train.seq_len,
                        seq_len=cfg.train.seq_len)
    name = (out["preflight"]["gpus"] or [{"name": ""}])[0]["name"].lower()
    peak = next((v for k, v in plan.PEAK_FLOPS.items() if k in name), None)
    res = {}
    for label, rs in (("plain", plain), ("distilled", dist)):
        tok = med([r["tokens_per_s"] for r in rs])
        res[label] = {"steps": len(rs), "tokens_per_s": tok, "step_s": med([r["step_s"] for r in rs]),
                      "mfu_student": tok * tp["student_flops_per_token"] / (ranks * peak) if tok and peak else None,
                      **{p: med([r.get(p) for r in rs]) for p in ("fwd_s", "teacher_s", "loss_s", "bwd_s", "opt_s")}}
    out["steps"] = res
    out["distillation_overhead"] = (res["distilled"]["step_s"] / res["plain"]["step_s"] - 1
                                    if res["plain"]["step_s"] and res["distilled"]["step_s"] else None)
    out["optimizer_step_s"] = med([r.get("opt_s") for r in steps if r["step"] > 1])
    ev = {}
    for kind, keys in (("snapshot", ("gather_s", "write_s", "hash_s", "score_s")), ("teacher", ("refresh_s",)),
                       ("perturb", ("perturb_s",)), ("checkpoint", ("checkpoint_s",))):
        for k in keys:
            ev[k] = med([r.get(k) for r in recs if r.get("event") == kind])
    out["events_median_s"] = ev
    out["cycle_end_s"] = sum(v for k, v in ev.items() if v is not None)
    if not cpu:
        alloc = max((r.get("peak_gpu_mem_bytes", 0) for r in steps), default=0)
        reserved = max((r.get("peak_gpu_reserved_bytes", 0) for r in steps), default=0)
        mp = plan.memory_plan(arch, gpus=ranks, micro_batch=4, seq_len=cfg.train.seq_len, optimizer="muon",
                              teacher_mode=out.get("teacher_mode") or "auto", deepspeed_check=False)
        no_reserve = mp["total_bytes"] - next(v for k, v in mp["bytes"].items() if k.startswith("reserve"))
        out["memory"] = {"peak_allocated_bytes": alloc, "peak_reserved_bytes": reserved,
                         "plan_without_reserve_bytes": no_reserve, "allocated_over_plan": alloc / no_reserve,
                         "reserved_over_plan": reserved / no_reserve}


def orchestrate(args) -> dict:
    cpu = args.cpu_rehearsal
    import torch
    if not cpu:
        if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
            fail("no CUDA GPU visible (torch.cuda.is_available() is False); run this on a GPU node, or pass "
                 "--cpu-rehearsal to rehearse the orchestration on 2 CPU ranks")
        if os.environ.get("DS_ACCELERATOR", "cuda") != "cuda":
            fail(f"DS_ACCELERATOR={os.environ['DS_ACCELERATOR']} but this check is for CUDA; unset it")
    from q0ds import plan
    ranks = 2 if cpu else torch.cuda.device_count()
    work = Path(args.work)
    pb = plan.param_breakdown("tiny" if cpu else "1.8b")
    out = {"ok": False, "mode": "cpu-rehearsal" if cpu else "gpu", "ranks": ranks, "phase": "preflight",
           "tolerances": TOL["cpu" if cpu else "gpu"], "not_settled_here": cannot_settle(ranks)}
    t0 = time.time()

    def write():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    try:
        out["preflight"] = preflight(work, cpu, disk_need(pb["total"], pb["matrices"], 2, CYCLES))
        write()
        if not out["preflight"]["disk_ok"]:
            raise CheckError(f"free disk {out['preflight']['free_disk_bytes'] / 1e9:.1f} GB at {work} is below the "
                             f"{out['preflight']['needed_disk_bytes'] / 1e9:.1f} GB the check writes; pass --work on a larger disk")
        cfg, config, run = setup_run(work, cpu, ranks)
        env = {"DS_ACCELERATOR": "cpu" if cpu else "cuda", "Q0DS_NO_PROGRESS": "1", "Q0DS_PHASE_TIMES": "1",
               "Q0DS_FORCE_COLLECTIVES": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        for f in work.glob("[AB]-rank*.json"):
            f.unlink()
        out["phase"] = "launch A"
        a = launch(work, "A", config, ranks, dict(env, Q0DS_CHECK_LAUNCH="A", Q0DS_FAULT=f"crash_at_step={KILL_AFTER}"),
                   args.budget_s - (time.time() - t0))
        out["launch_A"] = a
        recs_a = records(run)
        write()
        if a["rc"] == 0 or a["rc"] == "timeout" or a["left_behind"]:
            raise CheckError(f"launch A should die by SIGKILL after step {KILL_AFTER}, got rc {a['rc']} "
                             f"(left behind: {a['left_behind']}): {tail(a['log'])}")
        done = [r["step"] for r in recs_a if "tokens_per_s" in r]
        if done[-1:] != [KILL_AFTER]:
            raise CheckError(f"launch A logged steps {done}, expected 1..{KILL_AFTER}: {tail(a['log'])}")
        facts_a = [json.loads((work / f"A-rank{r}.json").read_text()) for r in range(ranks)]
        out["teacher_mode"] = facts_a[0]["teacher_mode"]
        out["muon_check"] = facts_a[0].get("muon")
        out["phase"] = "launch B"
        env_b = dict(env, Q0DS_CHECK_LAUNCH="B")
        if ranks > 1:                                  # the pre-emption path across ranks, then launch C finishes
            env_b["Q0DS_FAULT"] = f"preempt_at_step={PREEMPT_AT}"
        b = launch(work, "B", config, ranks, env_b, args.budget_s - (time.time() - t0))
        out["launch_B"] = b
        write()
        want = 75 if ranks > 1 else 0
        if b["rc"] != want or b["left_behind"]:
            raise CheckError(f"launch B (resume) exited {b['rc']}, expected {want} (left behind: {b['left_behind']}): "
                             f"{tail(b['log'])}")
        if ranks > 1:
            out["phase"] = "launch C"
            c = launch(work, "C", config, ranks, dict(env, Q0DS_CHECK_LAUNCH="C"), args.budget_s - (time.time() - t0))
            out["launch_C"] = c
            write()
            if c["rc"] != 0 or c["left_behind"]:
                raise CheckError(f"launch C (after the pre-emption) exited {c['rc']} (left behind: "
                                 f"{c['left_behind']}): {tail(c['log'])}")
        facts_b = [json.loads((work / f"B-rank{r}.json").read_text()) for r in range(ranks)]
        recs = records(run)
        redo_a = next(r for r in recs_a if r.get("step") == KILL_AFTER and "tokens_per_s" in r)
        redo_b = next(r for r in recs if r.get("step") == KILL_AFTER and "tokens_per_s" in r)
        match = {f"rank{r}": facts_a[r]["at_checkpoint"] == facts_b[r]["after_resume"] for r in range(ranks)}
        out["resume"] = {"state_matches": match, "at_checkpoint": facts_a[0]["at_checkpoint"],
                         "after_resume": facts_b[0]["after_resume"], "resume_s": facts_b[0].get("resume_s"),
                         "build_s": facts_b[0].get("build_s"), "launch_wall_s": b["wall_s"],
                         "redone_step": KILL_AFTER, "loss_A": redo_a["loss"], "loss_B": redo_b["loss"],
                         "loss_rel_diff": abs(redo_a["loss"] - redo_b["loss"]) / abs(redo_a["loss"])}
        out["phase"] = "reload"
        out["reload"] = reload_snapshot(run, cpu)
        out["phase"] = "summary"
        summarize(out, recs, cpu, ranks, cfg)
        tol = out["tolerances"]
        checks = {"state_matches": all(match.values()),
                  "redone_loss": out["resume"]["loss_rel_diff"] <= tol["redo_loss_rel"],
                  "reload_val_loss": out["reload"]["rel_diff"] <= tol["reload_val_rel"],
                  "muon": bool(out["muon_check"] and out["muon_check"]["ok"]),
                  "finished": (run / "bases" / "base-00" / "done.json").is_file(),
                  "distilled_steps": out["steps"]["distilled"]["steps"] == STEPS * (CYCLES - 1)}
        out["checks"] = checks
        out["ok"] = all(checks.values())
        out["phase"] = "done"
    except CheckError as e:
        out["error"] = str(e)
    except Exception as e:                      # partial JSON on any failure, with the phase it stopped in
        out["error"] = f"{type(e).__name__}: {e}"
    out["wall_s"] = round(time.time() - t0, 1)
    write()
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--rank-entry" in argv:
        return rank_entry(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-rehearsal", action="store_true",
                    help="tiny preset on 2 CPU ranks: the same phases, for tests (tests/test_gpu_check.py)")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / "work" / "gpu_check"))
    ap.add_argument("--out", default=None, help="default benchmarks/results/gpu_check[_cpu_rehearsal].json")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="wall-clock limit for the launches (default 480; 1800 with --cpu-rehearsal on shared CPUs)")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = str(ROOT / "benchmarks" / "results" / ("gpu_check_cpu_rehearsal.json" if args.cpu_rehearsal
                                                           else "gpu_check.json"))
    if args.budget_s is None:
        args.budget_s = 1800.0 if args.cpu_rehearsal else 480.0
    if args.cpu_rehearsal:
        os.environ["DS_ACCELERATOR"] = "cpu"
    out = orchestrate(args)
    print(json.dumps({k: out.get(k) for k in ("ok", "mode", "phase", "error", "checks", "wall_s")}))
    if not out["ok"]:
        print(f"gpu-check: error: {out.get('error') or 'a check failed: ' + str(out.get('checks'))} "
              f"(phase {out['phase']}; {args.out})", file=sys.stderr)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    code = main()
    if "--rank-entry" in sys.argv:
        from q0ds.engine import exit_process
        exit_process(code)
    sys.exit(code)
