"""Typed run configuration: dataclasses that fail loudly at load, `key=value` overrides, resolved JSON.

A run config is one JSON (or HJSON) file. Every section is a dataclass below; unknown keys, wrong types,
impossible values and batch arithmetic that does not add up raise ConfigError naming the field, before any
expensive work. The resolved config (every default filled in) is written as `<run_dir>/config.json`.

    cfg = load_config("configs/tiny.json", ["schedule.cycles=3", "bases=2"])
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A user error in a run config; the message names the field and the fix."""


@dataclass
class ModelConfig:
    preset: str = "tiny"          # tiny | small | 1.8b, or "" when `config_path` is set
    config_path: str = ""         # any AutoModelForCausalLM config (dir or config.json); overrides preset
    dropout: float = 0.0          # residual dropout on each layer's attention and MLP outputs (model.add_residual_dropout)
    dtype: str = "fp32"           # fp32 | bf16 (bf16 needs ds config bf16.enabled; GPUs)

    def check(self):
        _require(self.preset or self.config_path, "model.preset", "set a preset (tiny|small|1.8b) or model.config_path")
        _require(self.preset in ("", "tiny", "small", "1.8b"), "model.preset", f"unknown preset {self.preset!r}; use tiny, small or 1.8b")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        _require(self.dtype in ("fp32", "bf16"), "model.dtype", "must be fp32 or bf16")


@dataclass
class TrainConfig:
    seq_len: int = 128
    micro_batch: int = 8          # sequences per rank per forward
    global_batch: int = 32        # sequences per optimizer step (the peak batch of the batch-size schedule)
    small_batch: int = 0          # early/late-cycle batch of the block-triangular schedule; 0 = constant batch
    grad_clip: float = 1.0        # set explicitly: DeepSpeed 0.19.8 defaults to 1.0 silently
    log_every: int = 1
    ckpt_every: int = 50          # optimizer steps between resume checkpoints (also at every cycle end)
    keep_ckpts: int = 2
    nan_policy: str = "stop"      # stop | skip
    verify_teacher: bool = False  # after each teacher refresh, gather it and log its max diff to the snapshot
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (HF gradient_checkpointing_enable)

    def check(self):
        for name in ("seq_len", "micro_batch", "global_batch", "log_every", "ckpt_every", "keep_ckpts"):
            _require(getattr(self, name) >= 1, f"train.{name}", "must be >= 1")
        _require(self.small_batch >= 0, "train.small_batch", "must be >= 0 (0 = constant batch)")
        _require(self.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = off)")
        _require(self.nan_policy in ("stop", "skip"), "train.nan_policy", "must be stop or skip")

    def check_world(self, world: int):
        """Batch arithmetic: every batch must split into whole micro-batches on every rank."""
        for name in ("global_batch", "small_batch"):
            b = getattr(self, name)
            if b and b % (self.micro_batch * world):
                raise ConfigError(f"train.{name}={b} is not a multiple of train.micro_batch x world size = "
                                  f"{self.micro_batch} x {world} = {self.micro_batch * world}; change train.{name} or train.micro_batch")


@dataclass
class OptimConfig:
    name: str = "adamw"           # adamw | muon (Muon for matrices, AdamW for the rest; DeepSpeed's MuonWithAuxAdam)
    # Per-group base LRs (every group gets the same schedule multiplier). The 1.8b preset has the reference's.
    lr: float = 3e-3              # matrices with adamw; the default of every group LR left at 0
    embed_lr: float = 0.0         # embeddings (AdamW); 0 = same as lr
    head_lr: float = 0.0          # LM head (AdamW); 0 = same as lr
    scalar_lr: float = 0.0        # 1-D params, norms (AdamW, no weight decay); 0 = same as lr
    weight_decay: float = 1.0     # base WD on matrices/embeddings/head; 1-D params get none
    betas: typing.List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    muon_lr: float = 0.02         # matrix LR when name=muon, x sqrt(max(1, rows/cols)) per matrix inside DeepSpeed's Muon
    muon_momentum: float = 0.95

    def check(self):
        _require(self.name in ("adamw", "muon"), "optim.name", "must be adamw or muon")
        _require(self.lr > 0, "optim.lr", "must be > 0")
        _require(self.muon_lr > 0, "optim.muon_lr", "must be > 0")
        for name in ("embed_lr", "head_lr", "scalar_lr", "weight_decay", "eps"):
            _require(getattr(self, name) >= 0, f"optim.{name}", "must be >= 0")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optim.betas", "must be two numbers in [0, 1)")


@dataclass
class ScheduleConfig:
    shape: str = "sawtooth"       # sawtooth (q0) | cosine (single-model baseline: warmup + cosine over the whole run)
    cycles: int = 4
    cycle_epochs: typing.Any = 1.0  # float, or a list of per-cycle lengths (the planner packs cycles toward the end)
    cycle_steps: int = 0          # > 0: fixed optimizer steps per cycle instead of epochs
    lr_floor: float = 0.08
    wd_floor: float = 0.7
    wd_coupling: bool = True      # False = flat WD (ablation)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1     # cosine shape only

    def check(self):
        _require(self.shape in ("sawtooth", "cosine"), "schedule.shape", "must be sawtooth or cosine")
        _require(self.cycles >= 1, "schedule.cycles", "must be >= 1")
        lens = self.cycle_epochs if isinstance(self.cycle_epochs, list) else [self.cycle_epochs]
        _require(all(isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in lens),
                 "schedule.cycle_epochs", "must be a positive number or a list of positive numbers")
        if isinstance(self.cycle_epochs, list):
            _require(len(self.cycle_epochs) == self.cycles, "schedule.cycle_epochs",
                     f"has {len(self.cycle_epochs)} entries but schedule.cycles={self.cycles}")
        _require(self.cycle_steps >= 0, "schedule.cycle_steps", "must be >= 0")
        _require(0 < self.lr_floor <= 1, "schedule.lr_floor", "must be in (0, 1]")
        _require(0 <= self.wd_floor <= 1, "schedule.wd_floor", "must be in [0, 1]")
        _require(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0")
        _require(0 <= self.min_lr_ratio <= 1, "schedule.min_lr_ratio", "must be in [0, 1]")


@dataclass
class DistillConfig:
    enabled: bool = True
    start_cycle: int = 8          # cycles are numbered from 0; cycle c >= start_cycle learns from snapshot c-1
    alpha: float = 0.45
    temperature: float = 1.2
    # auto: a plain bf16 replica of the teacher on every GPU when `q0ds plan --memory` says it fits (no gathers
    # per micro-step), else a ZeRO-3 teacher engine (today's path; always on CPU); replicated | zero3 force one
    teacher_mode: str = "auto"  # auto: plain replicas per GPU (the chain teacher, or distill-ensemble's resident members) if `q0ds plan --memory` fits them, else ZeRO-3 (always on CPU); replicated, zero3

    def check(self):
        _require(self.teacher_mode in ("auto", "replicated", "zero3"), "distill.teacher_mode",
                 "must be auto, replicated or zero3")
        _require(self.start_cycle >= 1, "distill.start_cycle", "must be >= 1 (cycle 0 has no predecessor)")
        _require(0 <= self.alpha <= 1, "distill.alpha", "must be in [0, 1]")
        _require(self.temperature > 0, "distill.temperature", "must be > 0")


@dataclass
class PerturbConfig:
    enabled: bool = True
    start: float = 0.25           # noise scale x std(param) after the first cycle, cosine down to `end`
    end: float = 0.05

    def check(self):
        _require(self.start >= 0 and self.end >= 0, "perturb.start/end", "must be >= 0")


@dataclass
class EvalConfig:
    batch: int = 16               # sequences per rank per scoring forward
    fitness: bool = True          # score the fitness set at every snapshot (needed by fit-prior)

    def check(self):
        _require(self.batch >= 1, "eval.batch", "must be >= 1")


@dataclass
class MonitorConfig:
    """Where per-step records go besides metrics.jsonl (q0ds/monitor.py). Not part of the trajectory: changing it
    on a relaunch is allowed and does not change the run fingerprint."""
    tensorboard: bool = False     # <base dir>/tensorboard (torch.utils.tensorboard); `tensorboard --logdir RUN`
    wandb: bool = False           # Weights & Biases run per base (and one for fit-prior)
    wandb_mode: str = "offline"   # offline (no network; `wandb sync <base dir>/wandb/offline-run-*` later) | online
    wandb_project: str = "q0ds"
    wandb_entity: str = ""        # "" = the W&B default entity

    def check(self):
        _require(self.wandb_mode in ("offline", "online"), "monitor.wandb_mode", "must be offline or online")
        _require(bool(self.wandb_project), "monitor.wandb_project", "must not be empty")


@dataclass
class RunConfig:
    data: str = ""                # prepared data dir (`q0ds prepare`)
    run_dir: str = "runs/default"
    seed: int = 0
    bases: int = 1
    ds_config: str = "ds_configs/zero3_cpu.hjson"
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    perturb: PerturbConfig = field(default_factory=PerturbConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def check(self):
        _require(bool(self.data), "data", "set the prepared data dir (run `q0ds prepare` first)")
        _require(self.bases >= 1, "bases", "must be >= 1")
        for f in dataclasses.fields(self):
            sub = getattr(self, f.name)
            if dataclasses.is_dataclass(sub):
                sub.check()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self, exclude=None) -> str:
        """Hash of everything that changes the trajectory (resume refuses a different one)."""
        d = self.to_dict()
        for key in EXECUTION_ONLY if exclude is None else exclude:
            *parents, leaf = key.split(".")
            sub = d
            for k in parents:
                sub = sub.get(k, {})
            sub.pop(leaf, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# Keys that change how a run executes, never its trajectory: a resume may change them, and they are not part of
# the fingerprint (so a run started before distill.teacher_mode existed resumes unchanged).
EXECUTION_ONLY = ("run_dir", "monitor", "distill.teacher_mode")


def execution_only(key: str) -> bool:
    """Is the dotted config key KEY (or a key below it) one of EXECUTION_ONLY?"""
    return any(key == k or key.startswith(k + ".") for k in EXECUTION_ONLY)


def _require(ok, name, what):
    if not ok:
        raise ConfigError(f"config field `{name}`: {what}")


def _coerce(value, tp, path):
    """Check/convert one JSON value against a dataclass field type; ConfigError names the field."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config field `{path}` must be an object, got {type(value).__name__}")
        return from_dict(tp, value, path + ".")
    if origin in (list, typing.List):
        if not isinstance(value, list):
            raise ConfigError(f"config field `{path}` must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config field `{path}` must be true or false, got {value!r}")
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"config field `{path}` must be {tp.__name__}, got {value!r} ({type(value).__name__})")
    return value


def from_dict(cls, d: dict, prefix=""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(prefix + u for u in unknown)}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    return cls(**{k: _coerce(v, hints[k], prefix + k) for k, v in d.items()})


def parse_override(item: str):
    """`a.b=value` -> (["a", "b"], value); the value is JSON when it parses, else a string."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not key=value (e.g. schedule.cycles=3)")
    key, raw = item.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(d: dict, overrides) -> dict:
    for item in overrides or []:
        keys, value = parse_override(item)
        node = d
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: `{k}` is not a section")
        node[keys[-1]] = value
    return d


def read_config_file(path) -> dict:
    import hjson
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"run config {p} not found; create one with `q0ds init-config` or pass an existing file")
    try:
        text = p.read_text()
        d = json.loads(text) if p.suffix == ".json" else hjson.loads(text)
    except (ValueError, hjson.HjsonDecodeError) as e:
        raise ConfigError(f"run config {p} is not valid JSON/HJSON: {e}") from None
    if not isinstance(d, dict):
        raise ConfigError(f"run config {p} must hold an object at the top level")
    return json.loads(json.dumps(d))   # plain dicts/lists (hjson returns OrderedDict)


def load_config(path=None, overrides=(), base: dict | None = None) -> RunConfig:
    d = read_config_file(path) if path else dict(base or {})
    return from_dict(RunConfig, apply_overrides(d, overrides)).check()


def save_config(cfg: RunConfig, path):
    atomic_write_text(path, json.dumps(cfg.to_dict(), indent=2) + "\n")


def atomic_write_text(path, text: str):
    """Write via a temp file in the same directory + os.replace, so readers never see half a file. The temp file
    is removed on any failure (and on SIGTERM/SIGINT in the CLI, which turns them into exceptions); ones left by
    a killed writer are removed by the next write of the same path (files.remove_stale_temps)."""
    from .files import WriteFailed, remove_stale_temps, temp_name, write_failure
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_name(path)
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteFailed):
            raise write_failure(path, e) from e     # one line: the file, the free space, what to do
        raise


def get_key(cfg: RunConfig, key: str):
    node = cfg
    for k in key.split("."):
        if not hasattr(node, k):
            raise ConfigError(f"no config key `{key}`")
        node = getattr(node, k)
    return node
