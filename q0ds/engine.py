"""The only module that calls DeepSpeed: student and teacher engines, the LR/WD scheduler, 16-bit gathers,
in-place weight loads, perturbation of the fp32 master, checkpoints and process-group lifetime.

Verified DeepSpeed 0.19.8 behaviour this relies on is in shared/docs/deepspeed.md (section numbers below).
"""
from __future__ import annotations

import copy
import os
import socket
from pathlib import Path

import torch

from .config import ConfigError
from .model import param_group_name

ROOT = Path(__file__).resolve().parent.parent
MANAGED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping")


# ---------------------------------------------------------------- process group
def setup_distributed() -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed; without the launcher, act as a 1-rank world (section 11)."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import deepspeed
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)
        _unlink_shm_buffer()
    return rank(), world_size(), int(os.environ.get("LOCAL_RANK", 0))


def shm_buffer_path(rank_: int, addr=None, port=None) -> Path:
    """DeepSpeed's CPU shm all-reduce buffer of one rank (ops/csrc/cpu/comm/shm.cpp, shm_initialize: the name is
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>; ~69 MB each)."""
    addr = os.environ.get("MASTER_ADDR", "") if addr is None else addr
    port = os.environ.get("MASTER_PORT", "") if port is None else port
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank_}"


def _unlink_shm_buffer():
    """Remove this rank's shm all-reduce buffer name right after start-up. DeepSpeed never unlinks it (shm.cpp's
    shared_close is never called), so every launch used to leave world_size x 69 MB in /dev/shm. The buffers
    are created in TorchBackend.__init__ (comm/torch.py -> shm_interface.cpp initialize, only when all ranks are
    local: LOCAL_SIZE == world size), and shm_initialize returns only after this rank has mmap'ed every other
    rank's buffer; after a barrier every rank has mapped all of them, so the names can go: the mappings stay
    valid and the kernel frees the memory when the last rank exits, whether it succeeds, fails or is killed."""
    if world_size() <= 1 and "LOCAL_SIZE" not in os.environ:
        return
    barrier()
    try:
        shm_buffer_path(rank()).unlink()
    except FileNotFoundError:
        pass                    # multi-node (no shm all-reduce) or shm op unavailable


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier():
    if torch.distributed.is_initialized():
        import deepspeed.comm as dist
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (signals, NaN): all ranks take the same branch."""
    if not torch.distributed.is_initialized() or world_size() == 1:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def finish():
    """Success-path exit: barrier, then destroy (section 9: avoids 'terminate called without an active exception')."""
    if torch.distributed.is_initialized():
        import deepspeed.comm as dist
        dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int):
    """End a launcher rank with `code` without running interpreter finalization. After finish() every file is
    closed and every collective done, but C++ objects of torch.distributed (gloo pairs and worker threads, the
    TCPStore client) and DeepSpeed are still alive and are destroyed during interpreter finalization, racing with
    the other rank's teardown (rank 0 hosts the TCPStore): destroying a still-joinable std::thread, or work that
    re-acquires the GIL of a dying interpreter, aborts the process with "terminate called without an active
    exception" (pytorch issue #190489, PR #179291: SIGABRT from gloo threads during finalization). The rank dies
    -6, the launcher returns 250 and SLURM marks a finished base FAILED (~3 in 50 2-rank runs despite barrier +
    destroy, deepspeed.md section 9). os._exit skips finalization, so the code we return is the code the launcher
    sees. stdio and logging are flushed first; our writes are atomic and already fsynced, TensorBoard/W&B closed."""
    import logging
    import sys
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


# ---------------------------------------------------------------- configs
def load_ds_config(path) -> dict:
    import hjson
    p = Path(path)
    if not p.is_file() and not p.is_absolute() and (ROOT / p).is_file():
        p = ROOT / p                 # a shipped config, wherever the command runs from
    if p.is_dir():
        raise ConfigError(f"DeepSpeed config {p} is a directory, not a file (run config key `ds_config`); "
                          "name a .hjson/.json file in it, e.g. ds_configs/zero3_cpu.hjson")
    if not p.is_file():
        raise ConfigError(f"DeepSpeed config {p} not found (run config key `ds_config`); see ds_configs/")
    try:
        d = hjson.loads(p.read_text())
    except hjson.HjsonDecodeError as e:
        raise ConfigError(f"DeepSpeed config {p} is not valid HJSON: {e}") from None
    d = _plain(d)
    clash = [k for k in MANAGED_KEYS if k in d]
    if clash:
        raise ConfigError(f"DeepSpeed config {p} sets {', '.join(clash)}; q0ds sets these from the run config "
                          f"(train.micro_batch, train.global_batch, train.grad_clip): remove them from {p.name}")
    if d.get("zero_optimization", {}).get("stage") != 3:
        raise ConfigError(f"DeepSpeed config {p}: zero_optimization.stage must be 3 (q0ds runs ZeRO-3)")
    return d


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def student_ds_config(base: dict, cfg, world: int) -> dict:
    """Engine config for the student: batch keys for one micro-batch per backward (accumulation is ours,
    section 7 option B), explicit gradient clipping (pitfall 1), optimizer from the run config."""
    c = copy.deepcopy(base)
    c["train_micro_batch_size_per_gpu"] = cfg.train.micro_batch
    c["gradient_accumulation_steps"] = 1
    c["train_batch_size"] = cfg.train.micro_batch * world
    c["gradient_clipping"] = cfg.train.grad_clip
    c.setdefault("bf16", {})["enabled"] = cfg.model.dtype == "bf16"
    opt = c.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    o = cfg.optim
    params.update(lr=o.lr, weight_decay=o.weight_decay, betas=list(o.betas), eps=o.eps)
    if o.name == "muon":
        opt["type"] = "Muon"
        params.pop("torch_adam", None)
        params.update(muon_lr=o.muon_lr, momentum=o.muon_momentum, adam_lr=o.lr)
        c["zero_optimization"]["reduce_scatter"] = False      # pitfall 2
    return c


def teacher_ds_config(student_cfg: dict) -> dict:
    """Same partitioning, no optimizer or scheduler: DeepSpeed then uses ZeRO-3 offload-free inference (section 3)."""
    c = copy.deepcopy(student_cfg)
    for k in ("optimizer", "scheduler", "gradient_clipping"):
        c.pop(k, None)
    return c


# ---------------------------------------------------------------- schedule hook
class CyclicScheduler:
    """LR scheduler handed to deepspeed.initialize as a callable (pitfall 3). Each param group keeps its own
    base lr / wd (matrices, embeddings, head, scalars); every step writes base x multiplier into the real
    optimizer's groups. `mult_fn(step) -> (lr_mult, wd_mult)` is the pure schedule. DeepSpeed calls step()
    once per optimizer step and saves state_dict() in checkpoints; the trainer also calls sync(step) before
    every step so a skipped step (NaN) can never desynchronise the schedule from the data (pitfall 4)."""

    def __init__(self, optimizer, mult_fn):
        self.optimizer = optimizer
        self.mult_fn = mult_fn
        self.base = [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]
        self.last_step = 0
        self.mults = (1.0, 1.0)
        self.sync(0)

    def sync(self, step: int):
        self.last_step = step
        self.mults = self.mult_fn(step)
        lr_m, wd_m = self.mults
        for g, (lr, wd) in zip(self.optimizer.param_groups, self.base):
            g["lr"] = lr * lr_m
            g["weight_decay"] = wd * wd_m

    def step(self, *args, **kwargs):
        self.sync(self.last_step + 1)

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]

    get_lr = get_last_lr

    def state_dict(self):
        return {"last_step": self.last_step, "base": self.base}

    def load_state_dict(self, sd):
        self.base = [tuple(b) for b in sd["base"]]
        self.sync(sd["last_step"])    # re-apply: the optimizer's saved group values load after us (pitfall 5)


def param_groups(model, ocfg) -> list[dict]:
    """LR groups as in the reference: matrices, embeddings, head, scalars; no weight decay on 1-D params."""
    lrs = {"matrix": ocfg.muon_lr if ocfg.name == "muon" else ocfg.lr, "embed": ocfg.embed_lr or ocfg.lr,
           "head": ocfg.head_lr or ocfg.lr, "scalar": ocfg.scalar_lr or ocfg.lr}
    groups: dict[str, list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(param_group_name(n, p), []).append(p)
    return [{"params": ps, "name": g, "lr": lrs[g], "weight_decay": 0.0 if g == "scalar" else ocfg.weight_decay}
            for g, ps in groups.items()]


# ---------------------------------------------------------------- engines
def make_student(model, ds_cfg: dict, ocfg, mult_fn):
    import deepspeed
    engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=param_groups(model, ocfg),
                                               config=ds_cfg, lr_scheduler=lambda opt: CyclicScheduler(opt, mult_fn))
    return engine, sched


def make_teacher(model, ds_cfg: dict):
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, config=teacher_ds_config(ds_cfg))
    engine.eval()
    for p in engine.module.parameters():
        p.requires_grad_(False)
    return engine


def micro_step(engine, loss, n_micro: int, last: bool):
    """One micro-batch of our own gradient accumulation (section 7, option B: exact for any n_micro)."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss / n_micro, scale_wrt_gas=False)
    engine.step()


def consolidated_state_dict(engine):
    """Full 16-bit (module dtype) state dict gathered from ZeRO-3; collective; rank 0 gets it, others None."""
    return engine._zero3_consolidated_16bit_state_dict()


def load_weights_inplace(engine, state_dict):
    """Overwrite a (teacher) engine's partitioned weights from rank 0's state dict, without rebuilding it.
    modifier_rank=0 broadcasts the edit (modifier_rank=None drops it silently, pitfall 7)."""
    import deepspeed
    r = rank()
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if r == 0:
                p.data.copy_(state_dict[name].to(p.dtype))


def max_weight_diff(engine, state_dict) -> float:
    """Max |engine weight - state_dict weight| over all parameters (collective gather; rank 0 computes)."""
    import deepspeed
    worst = 0.0
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank() == 0:
                worst = max(worst, (p.data.float().cpu() - state_dict[name].float().cpu()).abs().max().item())
    return worst


def perturb_(engine, scale: float, seed: int) -> float:
    """Add N(0, (scale * std(param))^2) to every tensor with more than one element, in the fp32 master
    (section 5 recipe C: otherwise the next step undoes it) and in the module copy. Same generator on every
    rank, so safe_set_full_fp32_param gets identical values (pitfall 8). Returns the mean relative change."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    gen = torch.Generator().manual_seed(seed)
    r, rel = rank(), []
    for _, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None or full.numel() <= 1:
            continue
        noise = torch.randn(full.shape, generator=gen, dtype=torch.float32).to(full.device) * (scale * full.std())
        new = full + noise
        safe_set_full_fp32_param(p, new)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if r == 0:
                p.data.copy_(new.to(p.dtype))
        rel.append((noise.norm() / full.norm().clamp_min(1e-12)).item())
    return sum(rel) / max(1, len(rel))


def set_trained_weights_(engine, state_dict):
    """Overwrite a trained (student) engine's weights with `state_dict`, which every rank holds in full: the
    fp32 master, or the next step would undo the edit (section 5 recipe C), and the module copy. Adam moments
    are untouched. Used to start a student from a snapshot (ensemble_distill.py, init=top1)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param
    r = rank()
    for name, p in engine.module.named_parameters():
        if name not in state_dict:
            raise KeyError(f"state dict has no tensor {name!r} (different architecture?)")
        value = state_dict[name].detach().float().to(p.device)
        safe_set_full_fp32_param(p, value)
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if r == 0:
                p.data.copy_(value.to(p.dtype))


def full_fp32_params(engine) -> dict:
    """Every parameter's fp32 master, gathered (collective). For tests and checks."""
    from deepspeed.utils import safe_get_full_fp32_param
    return {n: safe_get_full_fp32_param(p).detach().clone().cpu() for n, p in engine.module.named_parameters()}


def save_checkpoint(engine, ckpt_dir, tag: str, client_state: dict):
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=True)


UNIVERSAL_DIR = "universal"
UNIVERSAL_DONE = "q0ds_universal.json"


def universal_ds_config(ds_cfg: dict) -> dict:
    """The student's engine config for loading a universal checkpoint. DeepSpeed reads `checkpoint.load_universal`
    once, at engine construction (runtime/engine.py, DeepSpeedEngine.load_universal_checkpoint -> _config), so the
    trainer must know before building the engine that the checkpoint came from another world size."""
    c = copy.deepcopy(ds_cfg)
    c.setdefault("checkpoint", {})["load_universal"] = True
    return c


def to_universal(ckpt_dir, tag: str, source_world: int) -> Path:
    """Convert ZeRO checkpoint <ckpt_dir>/<tag> (written by `source_world` ranks) to a universal checkpoint in
    <ckpt_dir>/universal/<tag> with DeepSpeed's own converter (deepspeed/checkpoint/ds_to_universal.py, main:
    its stage-3 path merges every rank's fp32 + Adam fragments into one file per parameter under zero/ and copies
    the model-state files, which carry our client state). Rank 0 converts (serially: one worker, no fork inside a
    process group), every rank waits; a finished conversion is reused. Collective. Returns the dir to load from
    (tag unchanged), with the engine built from universal_ds_config."""
    import argparse
    src = Path(ckpt_dir) / tag
    root = Path(ckpt_dir) / UNIVERSAL_DIR
    out = root / tag
    error = None
    if rank() == 0 and not (out / UNIVERSAL_DONE).is_file():
        import shutil
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
        shutil.rmtree(out, ignore_errors=True)
        try:
            ds_to_universal(argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                                               num_merge_workers=1, keep_temp_folder=False, strict=True,
                                               inject_missing_state=False))
            (out / UNIVERSAL_DONE).write_text(f'{{"source_world_size": {source_world}}}\n')
        except Exception as e:                  # reported on every rank below, not just rank 0
            error = f"{type(e).__name__}: {e}"
    if any_rank(error is not None):
        raise RuntimeError(f"checkpoint {src} (world size {source_world}) could not be converted to a universal "
                           f"checkpoint ({error or 'failed on rank 0'}). Convert it by hand: python -m "
                           f"deepspeed.checkpoint.ds_to_universal --input_folder {src} --output_folder {out} "
                           f"&& touch {out / UNIVERSAL_DONE}, or relaunch with {source_world} ranks")
    return root


def drop_universal(ckpt_dir):
    """Remove converted universal copies once the run has written a checkpoint of its own (rank 0)."""
    import shutil
    shutil.rmtree(Path(ckpt_dir) / UNIVERSAL_DIR, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir, tag: str) -> dict:
    universal = engine.load_universal_checkpoint()
    inner = getattr(engine.optimizer, "optimizer", None)        # the torch optimizer inside ZeRO-3
    groups = [{k: v for k, v in g.items() if k != "params"} for g in inner.param_groups] if universal else []
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    if universal:
        _repair_universal_load(inner, groups)
    return client


def _repair_universal_load(inner, groups):
    """Two faults of DeepSpeed 0.19.8's ZeRO-3 universal load (runtime/zero/stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3), found by the 2 -> 1 rank resume test (loss off by 1e-2
    one step after the resume): (1) every sub-group gets the *same* `step` tensor object (state[0]['step']);
    torch's AdamW increments it in place once per group, so with our 4 groups the shared counter advances 4 per
    step and the bias correction is wrong; each group gets its own copy. (2) every param group is given group
    0's hyperparameters (name, weight_decay: the 1-D group would get decay); the groups' own values, built from
    the same (fingerprint-checked) config, are put back. lr/wd are re-synced by the trainer's scheduler."""
    for state in inner.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    for g, saved in zip(inner.param_groups, groups):
        g.update(saved)
