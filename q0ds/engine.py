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

from .compat import repo_file
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
        if os.environ.get("Q0DS_RECORD_COLLECTIVES"):
            _record_collectives(os.environ["Q0DS_RECORD_COLLECTIVES"])
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


# ---------------------------------------------------------------- collectives
# Every collective q0ds issues goes through the helpers below (tests/test_collectives.py fails on a direct
# torch.distributed / deepspeed.comm collective elsewhere in q0ds/). On GPUs DeepSpeed's process group is
# NCCL-only and NCCL takes CUDA tensors only (deepspeed.md section 14), so every helper moves its tensor to
# `device` (pass the engine's: `engine.device`) and hands back a tensor on that device; `.cpu()` it where the
# host needs the value. With Q0DS_RECORD_COLLECTIVES=DIR set, each rank logs the device of every tensor that
# reaches torch.distributed (tests only; see _record_collectives).
_OPS = {"sum": "SUM", "max": "MAX", "min": "MIN"}
_EXPECTED: dict = {"device": None}       # the device the running helper was told to use (for the recorder)


def _multi() -> bool:
    """Run the collective? Yes with 2+ ranks; at world size 1 only with Q0DS_FORCE_COLLECTIVES=1 (gpu_check.py:
    one GPU then still sends every helper's tensor through NCCL, whose device rule a skipped call never tests)."""
    if not torch.distributed.is_initialized():
        return False
    return world_size() > 1 or os.environ.get("Q0DS_FORCE_COLLECTIVES") == "1"


def all_reduce_(t: torch.Tensor, device, op: str = "sum") -> torch.Tensor:
    """All-reduce (sum|max|min) of `t` over all ranks; the result is on `device` (t itself if already there)."""
    t = t.to(device)
    if _multi():
        _EXPECTED["device"] = str(torch.device(device))
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, _OPS[op]))
    return t


def all_gather_cat(t: torch.Tensor, device) -> torch.Tensor:
    """Every rank's `t` (same shape on all ranks) concatenated along dim 0 in rank order, on `device`."""
    t = t.to(device).contiguous()
    if not _multi():
        return t
    _EXPECTED["device"] = str(torch.device(device))
    out = torch.empty((world_size() * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    torch.distributed.all_gather_into_tensor(out, t)
    return out


def broadcast_(t: torch.Tensor, device, src: int = 0) -> torch.Tensor:
    """Rank `src`'s `t` on every rank, on `device`."""
    t = t.to(device)
    if _multi():
        _EXPECTED["device"] = str(torch.device(device))
        torch.distributed.broadcast(t, src)
    return t


def any_rank(flag: bool, device=None) -> bool:
    """True on every rank if `flag` is true on any rank (signals, NaN): all ranks take the same branch.
    `device`: the engine's; default this rank's accelerator device (deepspeed.accelerator get_accelerator()
    .current_device_name(): cuda:LOCAL_RANK on GPUs, cpu on CPU). The training step folds its flag into the
    loss all-reduce instead of calling this."""
    if not _multi():
        return bool(flag)
    if device is None:
        from deepspeed.accelerator import get_accelerator
        device = get_accelerator().current_device_name()
    return bool(all_reduce_(torch.tensor([1.0 if flag else 0.0]), device, "max").item() > 0)


class RankFailed(RuntimeError):
    """Raised by agree_error on the ranks that did not fail themselves, when the failing rank's error was a bug
    (not a user error): its type and message, so the other ranks do not die later on a collective."""


_AGREE_BYTES = 2048


def agree_error(error: BaseException | None, device=None) -> None:
    """Collective, at a point every rank reaches (start-up, resume, checkpoint and snapshot boundaries): each
    rank passes the exception it caught since the last agreement, or None. If any rank has one, every rank
    raises: a failing rank its own exception (traceback kept), the others the first failing rank's, rebuilt
    with the same type when it is a user error (q0ds.errors.user_errors: the entry point prints the same one
    line and exits 2 on every rank) and RankFailed otherwise. So no rank goes on into a collective its peer
    will never join (gloo: "Connection closed by peer"), nor prints advice about files that are fine."""
    if not _multi():
        if error is not None:
            raise error
        return
    if device is None:
        from deepspeed.accelerator import get_accelerator
        device = get_accelerator().current_device_name()
    payload = b"" if error is None else f"{type(error).__name__}\n{error}".encode()[:_AGREE_BYTES - 1]
    row = torch.zeros(_AGREE_BYTES, dtype=torch.uint8)
    if error is not None:
        row[0] = 1
        row[1:1 + len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    rows = all_gather_cat(row[None], device).cpu()
    failed = [r for r in range(rows.shape[0]) if rows[r, 0]]
    if not failed:
        return
    name, _, msg = bytes(rows[failed[0], 1:].tolist()).rstrip(b"\0").decode(errors="replace").partition("\n")
    from .errors import user_errors
    by_name = {t.__name__: t for t in user_errors()}
    if error is not None and (failed[0] == torch.distributed.get_rank()
                              or not (name in by_name and isinstance(error, user_errors()))):
        raise error                  # the first failing rank's own, or a bug: keep this rank's traceback
    if name in by_name:              # every rank alike, also when several hit the same user error (a full disk)
        raise by_name[name](msg)
    raise RankFailed(f"rank {failed[0]} failed ({name}: {msg}); see its output above")


def barrier():
    if torch.distributed.is_initialized():
        import deepspeed.comm as dist
        dist.barrier()


HELPERS = ("engine.py:all_reduce_", "engine.py:all_gather_cat", "engine.py:broadcast_")


def _record_collectives(out_dir: str):
    """Test hook: wrap torch.distributed's collectives in this process and append one JSON line per call to
    OUT_DIR/rank-R.jsonl: the collective, the device of every tensor passed, `caller` = the q0ds function that
    called torch.distributed itself (None when DeepSpeed did, e.g. ZeRO-3 gathers during a forward), the
    device the q0ds helper was told to use, `within` = the innermost q0ds frame on the stack, and `via` = the
    innermost q0ds frame outside the helpers (who asked for the collective: a step, a score gather, an
    agreement point)."""
    import json
    import traceback
    d = torch.distributed
    path = Path(out_dir) / f"rank-{os.environ.get('RANK', '0')}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parent

    def wrap(name, fn):
        def recorded(*args, **kwargs):
            vals = list(args) + list(kwargs.values())
            tensors = [a for a in vals if isinstance(a, torch.Tensor)]
            tensors += [x for a in vals if isinstance(a, (list, tuple)) for x in a if isinstance(x, torch.Tensor)]
            frames = traceback.extract_stack()[:-1]
            direct = frames[-1]                          # the code that called torch.distributed.<name>
            ours = [f for f in frames if Path(f.filename).resolve().parent == here]
            caller = f"{Path(direct.filename).name}:{direct.name}" \
                if Path(direct.filename).resolve().parent == here else None
            helper = caller in HELPERS
            via = [f"{Path(f.filename).name}:{f.name}" for f in ours]
            via = [v for v in via if v not in HELPERS]
            with open(path, "a") as f:
                f.write(json.dumps({"op": name, "devices": [str(x.device) for x in tensors], "caller": caller,
                                    "within": f"{Path(ours[-1].filename).name}:{ours[-1].name}" if ours else None,
                                    "via": via[-1] if via else None,
                                    "expected": _EXPECTED["device"] if helper else None}) + "\n")
            return fn(*args, **kwargs)
        return recorded
    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter_tensor",
                 "all_to_all_single", "reduce", "gather", "scatter"):
        if hasattr(d, name):
            setattr(d, name, wrap(name, getattr(d, name)))


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
    if not p.is_file() and not p.is_absolute() and repo_file(p).is_file():
        p = repo_file(p)             # a shipped config, wherever the command runs from (checkout or wheel)
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
    bf16 = cfg.model.dtype == "bf16"
    declared = c.get("bf16", {}).get("enabled")
    if declared is not None and bool(declared) != bf16:
        raise ConfigError(f"DeepSpeed config {cfg.ds_config} has bf16.enabled={str(bool(declared)).lower()} but the run "
                          f"config has model.dtype={cfg.model.dtype}; set model.dtype={'bf16' if declared else 'fp32'} "
                          f"or use a DeepSpeed config whose bf16.enabled matches")
    c.setdefault("bf16", {})["enabled"] = bf16
    if bf16:
        # ZeRO-3 sums the micro-batches' gradients in grad_accum_dtype, default the model dtype (bf16): fp32 instead
        # (deepspeed/runtime/engine.py DeepSpeedEngine.get_data_types; stage3.py partition_grads adds into a
        # buffer of gradient_accumulation_dtype).
        c.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    opt = c.setdefault("optimizer", {"type": "AdamW", "params": {}})
    params = opt.setdefault("params", {})
    o = cfg.optim
    params.update(lr=o.lr, weight_decay=o.weight_decay, betas=list(o.betas), eps=o.eps)
    c["gradient_clipping"] = cfg.train.grad_clip
    if o.name == "muon":
        opt["type"] = "Muon"        # a `torch_adam: true` in the file is kept: Muon's AdamW groups honour it too
        params.update(muon_lr=o.muon_lr, momentum=o.muon_momentum, adam_lr=o.lr)
        c["zero_optimization"]["reduce_scatter"] = False      # pitfall 2
        # Pitfall 1: ZeRO-3 takes the global norm over the Muon *updates* (stage3.py step():
        # _apply_muon_to_accumulated_grads, then _get_norm_groups, then unscale_and_clip_grads), about 700 at
        # 1.8B, so any engine clip of order 1 shrinks every matrix step ~700x. The engine never clips with
        # Muon; make_student(grad_clip=) clips the raw gradients instead, as the reference does.
        c["gradient_clipping"] = 0.0
        if bf16:
            # Muon gathers gradients and its fp32 momentum partitions in communication_data_type (stage3.py
            # _apply_muon_to_accumulated_grads -> _partitioned_buffers_all_gather; _muon_update_sub_group), which
            # defaults to bf16 with bf16 (engine.py DeepSpeedEngine.communication_data_type): the momentum would
            # be rounded to bf16 every step. fp32 keeps it exact at 2x the gradient traffic; a ds config that
            # sets communication_data_type explicitly wins.
            c.setdefault("communication_data_type", "fp32")
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


GROUPS = ("matrix", "embed", "head", "scalar")


def group_lrs(ocfg) -> dict:
    """Base LR of each parameter group (the schedule multiplies all of them by the same lr_mult)."""
    return {"matrix": ocfg.muon_lr if ocfg.name == "muon" else ocfg.lr, "embed": ocfg.embed_lr or ocfg.lr,
            "head": ocfg.head_lr or ocfg.lr, "scalar": ocfg.scalar_lr or ocfg.lr}


def param_groups(model, ocfg) -> list[dict]:
    """LR groups as in the reference: matrices, embeddings, head, scalars; no weight decay on 1-D params.
    With Muon, DeepSpeed splits each group into its Muon and Adam halves and keeps the group's lr and
    weight_decay (engine.py DeepSpeedEngine._muon_param_groups: names `matrix-muon-params`, `embed-adam-params`...)."""
    lrs = group_lrs(ocfg)
    groups: dict[str, list] = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault(param_group_name(n, p), []).append(p)
    return [{"params": ps, "name": g, "lr": lrs[g], "weight_decay": 0.0 if g == "scalar" else ocfg.weight_decay}
            for g, ps in groups.items()]


def group_values(sched, mults=None) -> dict:
    """{group: (lr, weight_decay)} of a CyclicScheduler's optimizer for multipliers `mults` (default: the
    current ones), keyed by q0ds group name (matrix, embed, head, scalar; Muon's `matrix-muon-params` ->
    matrix). From the bases, not the live groups: DeepSpeed's step() has already advanced those to the next step."""
    lr_m, wd_m = mults or sched.mults
    return {str(g.get("name", f"group{i}")).split("-")[0]: (lr * lr_m, wd * wd_m)
            for i, (g, (lr, wd)) in enumerate(zip(sched.optimizer.param_groups, sched.base))}


# ---------------------------------------------------------------- engines
def build_partitioned(config, seed: int, ds_cfg: dict, dropout: float = 0.0, init: bool = True):
    """The model built under deepspeed.zero.Init (deepspeed/runtime/zero/partition_parameters.py, class Init):
    every parameter is partitioned as its module is constructed, in the engine's dtype (bf16.enabled), on the
    accelerator, so no rank ever holds the whole model (without it: 7 GB fp32 per rank on the host at 1.8B,
    then moved whole to each GPU). Weight init as transformers does under ZeRO-3 (modeling_utils
    PreTrainedModel._from_config -> integrations/deepspeed.py initialize_weights_zero3: each module's params
    gathered, rank 0 initialises from torch.manual_seed(seed), the edit broadcast). transformers' own switch
    for this (HfDeepSpeedConfig) needs `accelerate`; the same three context managers are used directly.
    init=False (a teacher, whose weights are always overwritten from a snapshot): no random init at all."""
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import initialize_weights_zero3
    from .compat import prevent_arange_dtype_change        # RoPE inv_freq stays fp32 (absent in transformers 5.17)
    from .model import add_residual_dropout
    with no_init_weights(), prevent_arange_dtype_change(), deepspeed.zero.Init(config_dict_or_path=ds_cfg):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    if init:
        torch.manual_seed(seed)
        initialize_weights_zero3(model)
    add_residual_dropout(model, dropout)
    return model


def make_student(model, ds_cfg: dict, ocfg, mult_fn, grad_clip: float = 0.0):
    """The trained engine. `grad_clip` (train.grad_clip) matters with Muon only, where student_ds_config turned
    the engine's clip off: then the raw gradients of all groups are clipped to global norm `grad_clip`
    before Muon sees them (install_raw_grad_clip)."""
    import deepspeed
    from . import engine_optim as O
    ds_cfg, adam_note = O.choose_adam(ds_cfg)        # FusedAdam, else torch AdamW (a node without a CUDA toolkit)
    muon_note = None
    if ocfg.name == "muon":
        from deepspeed.accelerator import get_accelerator
        O.import_muon_compiled()
        try:
            compiled, why = O.choose_muon_compile(get_accelerator().device_name())
        except O.RuntimeChoiceError as e:
            raise ConfigError(str(e)) from None
        O.use_eager_muon(not compiled)
        muon_note = f"{'torch.compile' if compiled else 'eager (uncompiled)'}: {why}"
    else:
        O.import_muon_uncompiled()           # DeepSpeed's ZeRO check imports Muon's module: skip its compile
    engine, _, _, sched = deepspeed.initialize(model=model, model_parameters=param_groups(model, ocfg),
                                               config=ds_cfg, lr_scheduler=lambda opt: CyclicScheduler(opt, mult_fn))
    if ocfg.name == "muon" and grad_clip > 0:
        install_raw_grad_clip(engine, grad_clip)
    engine.q0ds_runtime = O.runtime_summary(engine, adam_note, muon_note)
    if rank() == 0:
        rt = engine.q0ds_runtime
        print(f"[q0ds] optimizer {rt['optimizer']}; Adam groups: {rt['adam']}"
              + (f"; Newton-Schulz: {muon_note}" if muon_note else ""), flush=True)
    return engine, sched


def install_raw_grad_clip(engine, max_norm: float):
    """Clip the raw (accumulated, reduced) gradients of every group to global L2 norm `max_norm` before Muon
    orthogonalises the matrix gradients: the reference's order (clip, then Muon), so the clip reaches the
    Muon momentum and the AdamW groups but never rescales an orthogonalised update.

    Hook point, read in deepspeed/runtime/zero/stage3.py (0.19.8), DeepSpeedZeroOptimizer_Stage3.step():
    _overflow_check_and_loss_scale_update, then (no overflow) _apply_muon_to_accumulated_grads, which reads
    the reduced gradient partitions in self.averaged_gradients[i] (one tensor per parameter, this rank's
    partition), then the norm and unscale_and_clip_grads (a no-op here, the engine clip is 0). We wrap
    _apply_muon_to_accumulated_grads on the instance: at that point every group's partitions hold the step's
    full raw gradient (scaled by loss_scale, 1 with bf16/fp32) and a skipped step never reaches it.
    The sum of squares is this rank's partitions; one all-reduce (all_reduce_, on the engine's device) makes
    it global. The norm is kept in engine.q0ds_raw_grad_norm (the last step's, before clipping)."""
    opt = engine.optimizer
    if getattr(opt, "offload_optimizer", False):
        raise ConfigError("optim.name=muon with train.grad_clip > 0 is not supported with offload_optimizer "
                          "(q0ds clips the raw gradient partitions on the device); set train.grad_clip=0 or drop the offload")
    original = opt._apply_muon_to_accumulated_grads
    device = engine.device

    def clipped():
        parts = [g for group in opt.averaged_gradients.values() for g in group]     # {sub_group: [partition]}
        sq = torch.zeros(1, dtype=torch.float32, device=device)
        for g in parts:
            sq += g.detach().float().pow(2).sum().to(device)
        norm = all_reduce_(sq, device).sqrt() / float(opt.loss_scale)
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for g in parts:
            g.mul_(coef.to(g.device, g.dtype))
        engine.q0ds_raw_grad_norm = norm
        return original()
    opt._apply_muon_to_accumulated_grads = clipped


def make_teacher(model, ds_cfg: dict):
    import deepspeed
    engine, _, _, _ = deepspeed.initialize(model=model, config=teacher_ds_config(ds_cfg))
    engine.eval()
    for p in engine.module.parameters():
        p.requires_grad_(False)
    return engine


def make_replicated_teacher(config, student):
    """The teacher as a plain module, whole on every rank (distill.teacher_mode replicated): eval, no grad, no
    DeepSpeed engine, so its forward gathers nothing (a ZeRO-3 teacher re-gathers all its weights on every
    micro-step, deepspeed.md section 14). Built on the student's device in the student module's dtype, without a
    random init (refresh_replica_ / load_replica_ overwrite every weight). Buffers (RoPE inv_freq) are the
    student's own tensors' values: built under zero.Init with prevent_arange_dtype_change they are fp32, and
    copying them keeps the two teachers bit-identical whatever transformers does outside zero.Init."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    device = torch.device(student.device)
    dtype = next(student.module.parameters()).dtype
    with no_init_weights(), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    theirs = dict(student.module.named_buffers())
    for name, _ in list(model.named_buffers()):
        owner, _, attr = name.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        mod._buffers[attr] = theirs[name].detach().clone().to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def consolidated_state_dict(engine, replica=None):
    """Full 16-bit (module dtype) state dict gathered from ZeRO-3; collective; rank 0 gets it, others None.
    replica (a make_replicated_teacher module): also copied, on every rank, from the same per-module gather, so
    refreshing the teacher costs no second gather. Without it: DeepSpeed's own consolidation."""
    if replica is None:
        return engine._zero3_consolidated_16bit_state_dict()
    return _gather_into_replica(engine, replica)


def _gather_into_replica(engine, replica):
    """DeepSpeed's _zero3_consolidated_16bit_state_dict (runtime/engine.py, 0.19.8: one module's params gathered
    at a time, shared params by ds_id, persistent buffers; checkpoint event prologue/epilogue), read-only
    (modifier_rank=None: no broadcast back on exit), and each gathered tensor copied into `replica` on every rank."""
    import collections
    import deepspeed
    r0 = rank() == 0
    out = collections.OrderedDict() if r0 else None
    shared = {}
    dst = dict(replica.named_parameters(remove_duplicate=False))

    def walk(module, prefix):
        params = list(module.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            for name, p in module.named_parameters(recurse=False):
                key = prefix + name
                with torch.no_grad():
                    dst[key].copy_(p.data)
                if r0:
                    if p.ds_id in shared:
                        out[key] = out[shared[p.ds_id]]
                    else:
                        out[key] = p.detach().cpu()
                        shared[p.ds_id] = key
            if r0:
                for name, buf in module.named_buffers(recurse=False):
                    if buf is not None and name not in module._non_persistent_buffers_set:
                        out[prefix + name] = buf.detach().cpu()
        for name, child in module.named_children():
            if child is not None:
                walk(child, prefix + name + ".")

    if engine._optimizer_has_ckpt_event_prologue():
        engine.optimizer.checkpoint_event_prologue()
    walk(engine.module, "")
    if engine._optimizer_has_ckpt_event_epilogue():
        engine.optimizer.checkpoint_event_epilogue()
    return out


def load_replica_(model, state_dict):
    """Overwrite a replicated teacher's weights from a full state dict this rank holds (a snapshot's
    model.safetensors: tied weights stored under their first name). No collective."""
    seen = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        src = state_dict.get(name, seen.get(id(p)))
        if src is None:
            raise KeyError(f"state dict has no tensor {name!r} (different architecture?)")
        seen[id(p)] = src
        with torch.no_grad():
            p.copy_(src.to(p.device, p.dtype))


def micro_step(engine, loss, n_micro: int, last: bool, clock=None):
    """One micro-batch of our own gradient accumulation (section 7, option B: exact for any n_micro).
    clock(phase) (optional, the trainer's phase timer) is called after the backward and after the step."""
    engine.set_gradient_accumulation_boundary(last)
    engine.backward(loss / n_micro, scale_wrt_gas=False)
    if clock:
        clock("bwd")
    engine.step()
    if clock:
        clock("opt")


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
    """Max |engine weight - state_dict weight| over all parameters (collective gather; rank 0 computes).
    A replicated teacher (plain module, no .module): compared in place on rank 0, no collective."""
    import deepspeed
    worst = 0.0
    if not hasattr(engine, "module"):
        if rank() == 0:
            for name, p in engine.named_parameters():
                worst = max(worst, (p.data.float().cpu() - state_dict[name].float().cpu()).abs().max().item())
        return worst
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
            if rank() == 0:
                worst = max(worst, (p.data.float().cpu() - state_dict[name].float().cpu()).abs().max().item())
    return worst


def perturb_(engine, scale: float, seed: int) -> float:
    """Add N(0, (scale * std(param))^2) to every tensor with more than one element, in the fp32 master
    (section 5 recipe C: otherwise the next step undoes it) and in the module copy. Same generator on every
    rank, so safe_set_full_fp32_param gets identical values (pitfall 8). The noise is drawn on the engine's
    device (no full-size host tensors on GPUs); the same seed gives other values on CUDA than on CPU, but the
    same on every rank of one device type. Returns the mean relative change."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param
    device = torch.device(engine.device)
    gen = torch.Generator(device=device).manual_seed(seed)
    r, rel = rank(), []
    for _, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        if full is None or full.numel() <= 1:
            continue
        full = full.to(device)
        noise = torch.randn(full.shape, generator=gen, dtype=torch.float32, device=device) * (scale * full.std())
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


def full_optimizer_state(engine) -> dict:
    """{param name: {state key: full fp32 tensor}} of every parameter, gathered (collective): momentum_buffer
    for a Muon sub-group, exp_avg/exp_avg_sq for an Adam one. For tests and checks."""
    from deepspeed.utils import safe_get_full_optimizer_state
    opt = engine.optimizer
    muon = getattr(opt, "sub_groups_using_muon", None)
    out = {}
    for n, p in engine.module.named_parameters():
        group = opt.grad_position[opt.get_param_id(p)][0]
        keys = ("momentum_buffer",) if muon and muon[group] else ("exp_avg", "exp_avg_sq")
        out[n] = {k: safe_get_full_optimizer_state(p, k).detach().clone().cpu() for k in keys}
    return out


def save_checkpoint(engine, ckpt_dir, tag: str, client_state: dict) -> BaseException | None:
    """Collective. None, or this rank's exception from a failed write (disk full: torch.save's RuntimeError or
    an OSError), returned for agree_error. DeepSpeed 0.19.8's DeepSpeedEngine.save_checkpoint
    (runtime/engine.py:4869) writes every file after the tag validation all-reduce (:4912;
    _create_checkpoint_file swallows OSError, :5362), then runs two more collectives: ZeRO-3's
    checkpoint_event_epilogue (:4954 -> zero/stage3.py:3847, an all-gather of the persistent parameters) and a
    final dist.barrier() (:4964). A rank whose write failed skipped both; it runs them here, so the ranks stay
    in step (found by the 2-rank tmpfs test: without the epilogue the healthy rank hung in that all-gather).
    save_latest=False: the `latest` file is written after the epilogue (a failure there could not be told
    apart), and q0ds never reads it (it loads by tag; q0ds_complete.json marks a finished checkpoint)."""
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as e:
        if engine._optimizer_has_ckpt_event_epilogue():
            engine.optimizer.checkpoint_event_epilogue()
        barrier()
        return e
    return None


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
    its stage-3 path merges every rank's fp32 + optimizer-state fragments into one file per parameter under zero/
    and copies the model-state files, which carry our client state), extended to Muon's momentum buffer
    (engine_universal.py). Rank 0 converts (serially: one worker, no fork inside a process group), every rank
    waits; a finished conversion is reused. Collective. Returns the dir to load from (tag unchanged), with the
    engine built from universal_ds_config."""
    from . import engine_universal
    src = Path(ckpt_dir) / tag
    root = Path(ckpt_dir) / UNIVERSAL_DIR
    out = root / tag
    error = None
    if rank() == 0 and not (out / UNIVERSAL_DONE).is_file():
        import shutil
        shutil.rmtree(out, ignore_errors=True)
        try:
            engine_universal.convert(src, out)
            (out / UNIVERSAL_DONE).write_text(f'{{"source_world_size": {source_world}}}\n')
        except Exception as e:                  # reported on every rank below, not just rank 0
            error = f"{type(e).__name__}: {e}"
    if any_rank(error is not None):
        raise RuntimeError(f"checkpoint {src} (world size {source_world}) could not be converted to a universal "
                           f"checkpoint ({error or 'failed on rank 0'}). Convert it by hand: python -m "
                           f"q0ds.engine_universal --input_folder {src} --output_folder {out} "
                           f"&& touch {out / UNIVERSAL_DONE}, or relaunch with {source_world} ranks")
    return root


def drop_universal(ckpt_dir):
    """Remove converted universal copies once the run has written a checkpoint of its own (rank 0)."""
    import shutil
    shutil.rmtree(Path(ckpt_dir) / UNIVERSAL_DIR, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir, tag: str) -> dict:
    """Load a checkpoint written by this world size, or (engine built from universal_ds_config) a universal one.
    The universal optimizer load is q0ds's (engine_universal.load_any_state), which also fixes two faults of
    DeepSpeed 0.19.8's own (runtime/zero/stage3.py, load_hp_checkpoint_state_from_checkpoint_dir_stage3), found by
    the 2 -> 1 rank resume test (loss off by 1e-2 one step after the resume): (1) every sub-group got the *same*
    `step` tensor object, which torch's AdamW increments in place once per group (the bias correction then
    advanced 4 per step with our 4 groups); (2) every param group got group 0's hyperparameters (the 1-D group
    would get decay; with Muon, every group group 0's use_muon). lr/wd are re-synced by the trainer's scheduler."""
    universal = engine.load_universal_checkpoint()
    if universal:
        from . import engine_universal
        engine_universal.install_loader(engine)
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    return client
