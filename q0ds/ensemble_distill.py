"""Distil a run's top-K prior-weighted mixture into ONE model (q0's stated limitation: K forward passes).

    q0ds distill-ensemble --run RUN --k 4 [key=value ...]                 # 1 rank, in this process (CPU)
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 --module q0ds.ensemble_distill --run RUN --k 4 [key=value ...]
    deepspeed --num_gpus 8 --module q0ds.ensemble_distill --run RUN --k 4  # GPUs, one node
    python -m q0ds.ensemble_distill --run RUN --bench 0,1,2,4,8,4/1,4@32   # step time vs K ("K/S": S engines,
                                                                            #  "K@N": from a top-N teacher cache)

Relaunching the same command resumes exactly (exit 75 = pre-empted, checkpoint written: relaunch). The end
writes RUN/distilled/k{K}/distill_report.json + .png and prints a summary (distill_report.py; distill_summary(run, k)
-> dict). The truncated teacher's error on a run's own windows: distill_approx.measure_truncation.

What it trains. The student is a run of its own, RUN/distilled/k{K}/ (config.json = RUN/config.json + DEFAULTS
below + your overrides; one base, seed + 3000), trained by BaseTrainer: the same ZeRO-3 engine, event order,
checkpoints, exact resume, snapshots (plain HF dirs, val/fitness scored) as a q0 base. Only the loss differs
(BaseTrainer._loss hook): the teacher is the top-K members of RUN/prior.json, renormalised weights w_i, frozen,

    p_mix = sum_i w_i softmax(z_i / T)
    loss  = (1 - alpha) * CE + alpha * T^2 * KL(p_mix || softmax(z_student / T))     (distill.mixture_distill_loss)

accumulated member by member in log space (two [batch, seq, vocab] tensors, whatever K). Knobs (key=value):
ensemble.init=top1|scratch|avg (default top1: start from the top-weighted member; avg: from the
prior-weighted average of the K members' weights, one base only), distill.alpha (0.9),
distill.temperature (1.0), schedule.cycles x schedule.cycle_epochs (default 4 x 1 epoch, warmup 10 steps +
cosine; one scored snapshot per cycle; 4, not 2, from benchmarks/distill_retention.py: see below), optim.*,
model.* (a smaller student works if the vocab matches),
ensemble.max_engines (8), ensemble.teacher_cache=N (0: the mixture on the fly; N >= 1: targets from a top-N
cache, option (c) below; ensemble.teacher_cache_dtype=float16|float32 its log-prob dtype), run_dir=... (another
output dir, e.g. for a CE-only control with distill.alpha=0).
Every snapshot.json names its teachers under "teachers" (member, weight, sha256 each) and "distilled_from"
(run, K, members, weights, sha256s, alpha, T, init), and its recipe under "recipe" (command, loss, alpha, T,
init, seed, schedule, optimizer, seq_len, batch, config fingerprint); a relaunch whose teachers differ (say, a refitted prior) is refused (teacher.json).

Teacher memory: the options and the choice.
  (a) K ZeRO-3 inference engines held at once: K x params / world_size per rank (bf16 1.8B on 8 GPUs:
      0.44 GB per member), weights loaded once. Simple and the fastest.
  (b) ONE engine whose weights are swapped per member per micro-batch (engine.load_weights_inplace): constant
      memory, K loads (file read + gather + broadcast of the whole model) per micro-batch.
  (c) soft targets precomputed member by member and cached on disk: constant memory, but tokens x vocab per
      epoch (each epoch re-chunks the stream): 110k x 2048 x 2 B = 0.45 GB per epoch here, 100M x 50304 x 2 B
      = 10 TB per epoch at the paper's scale. Only a top-k truncation would fit, and it changes the target.
  Chosen: (a) up to ensemble.max_engines resident engines, with (b) above the cap: member m runs in slot
  m % cap, always in member order, so any cap gives bitwise the same loss (tested) and resume stays exact.
  ensemble.teacher_cache=N is (c) truncated, on request: one pass before training writes the tempered mixture's
  top N log-probs + ids + the log of the remaining mass for every window of the plan (teacher_cache.py; tokens
  x N x 6 B: 19 GB per 100M tokens at N = 32); training then runs no member forward, and the KL is taken over
  the N + 1 outcomes (distill.cached_distill_loss). The target changes: measure it with distill.truncation_error.

COMMITTED RESULT (benchmarks/data_efficiency.py, `ensemble_distillation` in benchmarks/results/
data_efficiency.json): top-4 mixture of a 32-epoch q0 run into one model, defaults, 2 seeds: 17% and 55% of
the mixture's gain retained (mean 36%); the no-teacher control ends 0.05-0.10 nats worse than the member it starts
from. The 84-94% below are single runs on an earlier code version and were not reproduced there.

MEASURED on 2 shared CPU cores (load 3-12), `small` model (0.95M params, vocab 2048), batch 32 x 128.
  Step time, s per optimizer step, min / median of 12 round-robin steps (--bench 0,1,2,4,8,4/1,8/2):
      student alone (CE) 0.38 / 0.39    K=1 0.58 / 0.67    K=2 0.71 / 0.81    K=4 1.03 / 1.25    K=8 1.66 / 1.75
      K=4 through 1 swapped engine 1.04 / 1.17 (96 loads)    K=8 through 2: 1.67 / 1.92 (192 loads)
    Each member adds ~0.16 s, ~0.4 x a student step (its forward + the vocab-wide log-mixture). Swapping is
    free at this size (a 3.8 MB load from page cache); at 1.8B it is a 3.5 GB load per member per micro-batch.
    Teacher cache (--bench 0,3,3@32 schedule.cycle_steps=6, `tiny` model, vocab 512, batch 8 x 32, 2 cores at
      load ~2): student alone 0.53 s median, K=3 on the fly 1.12 s, K=3 from a top-32 cache 0.60 s; building
      the cache for the plan's 96 windows took 19.3 s (engine builds and member hashing included).
  Quality, val NLL (nats/token); retained = (best member - student) / (best member - mixture):
    benchmarks/results/distill_retention.md (3 seeds; q0 populations of 32 and 64 one-epoch cycles, K = 4 and 8;
    settings chosen on FITNESS retention): 4 student epochs keep 52-87% of the gain (2 epochs: 2-51%;
    8 epochs: 83-116%, at 22-70% of the population's compute), which is why the default is 4; alpha 1, T 2
    and init=avg were not separated from the defaults at n = 3, and avg + alpha 1 + T 2 with 4 epochs kept
    less than 4 epochs alone at 3 of 4 cells; a top-32 teacher cache and a student LR of 1e-3 kept less. The
    single-seed figures below are older (2 epochs was the default then):
    runs/demo (2 bases x 12 one-epoch cycles, 24.6 epochs): best member 5.3434, top-4 (= top-2) mixture 5.2589
      defaults (top1, 2 epochs), K=4        5.2688   88% retained, 2.05 epochs (8% of the population's cost)
      same, K=2                             5.2688   88%
      same 2 epochs, CE only (alpha=0)      5.3052   45%: half of the gain is the teacher's, half more training
      scratch, 12 epochs, K=4               5.4930   below the members (12 chain-distilled epochs each)
      scratch, 12 epochs, CE only           5.5708   (so the teacher is worth 0.08 nats from scratch)
    saturated run (28k train tokens, batch 8, 2 bases x 8 two-epoch cycles; members overfit after ~14 epochs):
    best member 5.4819, top-4 mixture 5.2922
      defaults (top1, 2 epochs), K=4        5.3232   84% retained   (alpha 1.0: 74%, T 2.0: 77%)
      same 2 epochs, CE only                5.5749   -49%: more data epochs only overfit; the teacher is the gain
      scratch, 16 epochs, K=4               5.3045   94% retained   (CE only: 5.7064)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from . import engine as E
from .config import ConfigError, RunConfig, apply_overrides, atomic_write_text, from_dict, read_config_file
from .distill import cached_distill_loss, mixture_distill_loss, mixture_logp
from .distill_report import (_single, _train_seconds, base_dir_of, distill_summary,  # noqa: F401  (re-exported:
                             format_summary, plot_summary, write_distill_report)      #  the report lives there)
from .trainer import BaseTrainer, _rng_state, _set_rng_state

# Applied to RUN/config.json before the user's overrides: one base, an ordinary warmup + cosine schedule
# (no sawtooth, no perturbation, no chain teacher: the mixture is the teacher).
DEFAULTS = ["bases=1", "schedule.shape=cosine", "schedule.cycles=4", "schedule.cycle_epochs=1.0",
            "schedule.cycle_steps=0", "schedule.warmup_steps=10", "schedule.wd_coupling=false",
            "train.small_batch=0", "distill.enabled=false", "distill.alpha=0.9", "distill.temperature=1.0",
            "perturb.enabled=false"]
# name: (default, the allowed strings or the smallest allowed integer)
ENSEMBLE_OPTIONS = {"init": ("top1", ("top1", "scratch", "avg")), "max_engines": (8, 1),
                    "teacher_cache": (0, 0), "teacher_cache_dtype": ("float16", ("float16", "float32"))}
SEED_OFFSET = 3000          # the student's own init seed and data order (baselines use +1000)
SPEC = "teacher.json"


def out_dir(run, k: int) -> Path:
    return Path(run).resolve() / "distilled" / f"k{k}"


# ---------------------------------------------------------------- config and teacher spec
def _split_options(overrides):
    """ensemble.* keys are ours; everything else is a run-config override."""
    opts = {k: v for k, (v, _) in ENSEMBLE_OPTIONS.items()}
    rest = []
    for item in overrides or []:
        key, _, raw = item.partition("=")
        if not key.startswith("ensemble."):
            rest.append(item)
            continue
        name = key[len("ensemble."):]
        if name not in ENSEMBLE_OPTIONS:
            raise ConfigError(f"unknown option {key}; valid: {', '.join('ensemble.' + k for k in ENSEMBLE_OPTIONS)}")
        default, allowed = ENSEMBLE_OPTIONS[name]
        try:
            value = type(default)(raw)
        except ValueError:
            raise ConfigError(f"{key} must be {type(default).__name__}, got {raw!r}") from None
        if value not in allowed if isinstance(allowed, tuple) else value < allowed:
            raise ConfigError(f"{key}={raw} is invalid; use "
                              f"{' or '.join(allowed) if isinstance(allowed, tuple) else f'an integer >= {allowed}'}")
        opts[name] = value
    return opts, rest


def resolve(run, k: int, overrides=()) -> tuple[RunConfig, dict, dict]:
    """(student RunConfig, teacher spec, ensemble options). The spec names the teachers exactly."""
    from .population import PriorError, topk_weights
    from .prior import read_prior_json
    from .snapshot import read_meta
    run = Path(run)
    if not (run / "prior.json").is_file():
        raise PriorError(f"{run / 'prior.json'} not found: run `q0ds fit-prior --run {run}` first")
    opts, rest = _split_options(overrides)
    base = read_config_file(run / "config.json")
    d = apply_overrides(base, DEFAULTS + [f"run_dir={out_dir(run, k)}", f"seed={base.get('seed', 0) + SEED_OFFSET}"] + rest)
    cfg = from_dict(RunConfig, d).check()
    if cfg.distill.enabled:
        raise ConfigError("distill.enabled must stay false: the teacher of distill-ensemble is the top-K mixture, "
                          "not the chain (distill.alpha and distill.temperature apply to the mixture)")
    if cfg.bases != 1:
        raise ConfigError("distill-ensemble trains one student: bases must be 1")
    if opts["teacher_cache"] and cfg.distill.alpha == 0:
        raise ConfigError("ensemble.teacher_cache needs a teacher: distill.alpha is 0 (CE only); drop the option")
    prior = read_prior_json(run / "prior.json")
    idx, w = topk_weights(prior["weights"], k)
    ids = [prior["members"][i] for i in idx]
    if opts["init"] == "avg":
        check_one_trajectory(ids)
    snaps = [member_dir(run, m) for m in ids]
    metas = [read_meta(s) for s in snaps]
    spec = {"run": str(run.resolve()), "k": k, "members": ids, "weights": [float(x) for x in w],
            "member_sha256": [m["sha256"] for m in metas], "init": opts["init"],
            "alpha": cfg.distill.alpha, "temperature": cfg.distill.temperature}
    if opts["teacher_cache"]:               # only then: teacher.json of an on-the-fly student stays as it was
        spec.update(teacher_cache=opts["teacher_cache"], teacher_cache_dtype=opts["teacher_cache_dtype"])
    return cfg, spec, opts


def check_one_trajectory(members):
    """ensemble.init=avg averages weights, which only makes sense along ONE trajectory (one base)."""
    bases = sorted({m.split("/")[0] for m in members})
    if len(bases) > 1:
        raise ConfigError(f"ensemble.init=avg averages the members' weights, but the top-{len(members)} members come "
                          f"from {len(bases)} bases ({', '.join(bases)}): use ensemble.init=top1 or a K whose "
                          "members share a base")


def average_weights(state_dicts, weights) -> dict:
    """sum_i w_i * sd_i per tensor, accumulated in float64, returned in float32 (the fp32 master the student
    trains; set_trained_weights_ casts the module copy to the model dtype). The weights are used as given.
    `state_dicts` may be a generator: one member's tensors alive at a time, plus the float64 sum."""
    acc = None
    for sd, w in zip(state_dicts, weights):
        if acc is None:
            acc = {name: torch.zeros(t.shape, dtype=torch.float64) for name, t in sd.items()}
        for name, t in acc.items():
            t += float(w) * sd[name].double()        # w * x rounded, then the sum: the plain formula
    return {name: t.float() for name, t in acc.items()}


def member_dir(run, member: str) -> Path:
    base, cycle = member.split("/")
    return Path(run) / "bases" / base / "snapshots" / cycle


def check_spec(out: Path, spec: dict, write: bool):
    """A relaunch must distil from the same teachers (a refitted prior would silently change them)."""
    path = out / SPEC
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [key for key in sorted(set(old) | set(spec)) if old.get(key) != spec.get(key)]
        if diff:
            raise ConfigError(f"{path} records a different teacher ({', '.join(diff)} differ): the prior or the "
                              "options changed since this student started; use run_dir=... for a new student")
    elif write:
        atomic_write_text(path, json.dumps(spec, indent=2) + "\n")


# ---------------------------------------------------------------- the teacher
class MixtureTeacher:
    """The K members as frozen inference teachers, at most `slots` resident; member logits are yielded one at a
    time, always in member order (so any slot count gives bitwise the same mixture). mode "zero3": ZeRO-3
    inference engines (a slot's weights re-gathered on every forward); "replicated": plain whole modules on
    every rank (engine.make_replicated_teacher: no gathers, each rank loads a member from its file itself)."""

    def __init__(self, snaps, model_config, ds_cfg: dict, slots: int, seed: int, mode: str = "zero3", student=None):
        self.snaps = list(snaps)
        self.mode = mode
        n = min(slots, len(self.snaps))
        if mode == "replicated":
            self.engines = [E.make_replicated_teacher(model_config, student) for _ in range(n)]
        else:   # partitioned at construction, no random init: every slot is overwritten from a snapshot (issue 12, 5)
            self.engines = [E.make_teacher(E.build_partitioned(model_config, seed, ds_cfg, init=False), ds_cfg)
                            for _ in range(n)]
        self.loaded = [None] * len(self.engines)
        self.loads = 0
        if E.rank() == 0:
            from .snapshot import verify
            for s in self.snaps:
                verify(s)                         # sha256 of the weights, once
        for slot in range(len(self.engines)):
            self._load(slot, slot)

    def _load(self, slot: int, member: int):
        from safetensors.torch import load_file
        if self.mode == "replicated":             # every rank reads the file: no collective
            E.load_replica_(self.engines[slot], load_file(self.snaps[member] / "model.safetensors"))
        else:
            sd = load_file(self.snaps[member] / "model.safetensors") if E.rank() == 0 else None
            E.load_weights_inplace(self.engines[slot], sd)
        self.loaded[slot] = member
        self.loads += 1

    def member_logits(self, inputs):
        n = len(self.engines)
        for m in range(len(self.snaps)):
            slot = m % n
            if self.loaded[slot] != m:
                self._load(slot, m)
            with torch.no_grad():                 # leave no_grad before yielding: grad mode is global state
                z = self.engines[slot](input_ids=inputs).logits
            yield z


# ---------------------------------------------------------------- the student
class EnsembleDistillTrainer(BaseTrainer):
    """A BaseTrainer whose teacher is the top-K mixture, in every cycle."""

    def __init__(self, cfg: RunConfig, spec: dict, opts: dict):
        super().__init__(cfg, 0)
        from transformers import AutoConfig
        self.spec, self.opts = spec, opts
        snaps = [member_dir(spec["run"], m) for m in spec["members"]]
        teacher_config = AutoConfig.from_pretrained(snaps[0], local_files_only=True)
        if teacher_config.vocab_size != self.model_config.vocab_size:
            raise ConfigError(f"the student's vocab ({self.model_config.vocab_size}) differs from the members' "
                              f"({teacher_config.vocab_size}); the KL is taken token by token")
        ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, self.world)
        self.weights = torch.tensor(spec["weights"], dtype=torch.float64)

        def make_mixture():
            rng = _rng_state()                    # building teachers must not move the training generators
            mode = self._choose_teacher_mode(replicas=min(opts["max_engines"], len(snaps)))
            mixture = MixtureTeacher(snaps, teacher_config, ds, opts["max_engines"], self.seed, mode, self.student)
            _set_rng_state(rng)
            return mixture
        self.mixture, self.cache, self.cache_build_s = None, None, None
        if opts["teacher_cache"]:                 # targets from the cache; the members only run to build it
            self.cache = self._open_cache(make_mixture)
        else:
            self.mixture = make_mixture()

    def _open_cache(self, make_mixture):
        """The teacher cache of this student (teacher_cache.py): reused when its header matches, else built now."""
        from .teacher_cache import CacheReader, build, cache_key, read_header
        t, n = self.cfg.train, self.opts["teacher_cache"]
        key = cache_key(n, self.spec, self.opts["teacher_cache_dtype"], self.data.fingerprint, self.cfg.seed,
                        t.seq_len, self.plan.sample_at(self.plan.total_steps), self.plan.total_steps)
        where = Path(self.cfg.run_dir) / "teacher_cache"
        header, err = None, None
        try:
            header = read_header(where, key)
        except Exception as e:
            err = e
        self._agree(err)
        if header is not None:
            self._print(f"teacher cache: reusing {where} (top-{n}, {key['samples']} windows)")
            return CacheReader(where, header)
        self._print(f"teacher cache: computing the mixture's top-{n} for {key['samples']} windows -> {where}")
        t0 = time.perf_counter()
        mixture, T = make_mixture(), self.cfg.distill.temperature
        dev = self.student.device
        header = build(where, key, lambda start, count: self.data.train_samples(self.cfg.seed, self.base, start, count, t.seq_len),
                       lambda x: mixture_logp(mixture.member_logits(x.to(dev)), self.weights, T),
                       t.micro_batch, self.rank, self.world, self._agree)
        self.cache_build_s = round(time.perf_counter() - t0, 3)
        self._print(f"teacher cache: built in {self.cache_build_s:.1f} s ({len(header['shards'])} shards)")
        return CacheReader(where, header)

    def _distilled(self, cyc) -> bool:
        return True

    def _train_step(self, cyc) -> dict:
        # the sample index of this rank's first window this step (BaseTrainer._train_step reads the same rows)
        self._row = self.plan.sample_at(self.step) + self.rank * (cyc.batch // self.world)
        return super()._train_step(cyc)

    def _loss(self, logits, inputs, labels, distilled: bool):
        d = self.cfg.distill
        if self.cache is not None:               # micro-batches come in order: rows _row, _row + micro, ...
            target = self.cache.read(self._row, inputs)
            self._row += inputs.shape[0]
            return cached_distill_loss(logits, target, labels, d.alpha, d.temperature)
        return mixture_distill_loss(logits, self.mixture.member_logits(inputs), self.weights, labels,
                                    d.alpha, d.temperature)

    def _resume(self):
        super()._resume()
        if self.step != 0:
            return
        from safetensors.torch import load_file
        files = [member_dir(self.spec["run"], m) / "model.safetensors" for m in self.spec["members"]]
        if self.opts["init"] == "top1":           # a fresh start from the top-weighted member
            E.set_trained_weights_(self.student, load_file(files[0]))
            self._print(f"student initialised from {self.spec['members'][0]}")
        elif self.opts["init"] == "avg":          # from the prior-weighted average of the K members' weights
            E.set_trained_weights_(self.student, average_weights((load_file(f) for f in files), self.spec["weights"]))
            self._print(f"student initialised from the weighted average of {', '.join(self.spec['members'])}")

    def _snapshot_meta(self, cyc) -> dict:
        meta = super()._snapshot_meta(cyc)
        meta.update(teacher=f"top-{self.spec['k']} mixture of {self.spec['run']}", distilled_from=self.spec,
                    teachers=[{"member": m, "weight": w, "sha256": h} for m, w, h in
                              zip(self.spec["members"], self.spec["weights"], self.spec["member_sha256"])],
                    recipe=student_recipe(self.cfg, self.spec, self.opts))
        return meta


def student_recipe(cfg: RunConfig, spec: dict, opts: dict) -> dict:
    """How the student was trained, in one place of its snapshot.json (the full config is RUN/distilled/kK/config.json)."""
    s, o, t = cfg.schedule, cfg.optim, cfg.train
    n = opts["teacher_cache"]
    kl = (f"KL(top-{n} of p_mix + rest || p_student on the same {n} + 1 outcomes)" if n else "KL(p_mix || p_student)")
    return {"command": f"q0ds distill-ensemble --run {spec['run']} --k {spec['k']}",
            "loss": f"(1 - alpha) * CE + alpha * T^2 * {kl}", "alpha": cfg.distill.alpha,
            "temperature": cfg.distill.temperature, "init": opts["init"], "max_engines": opts["max_engines"],
            "teacher_cache": n, **({"teacher_cache_dtype": opts["teacher_cache_dtype"]} if n else {}),
            "seed": cfg.seed, "schedule": {"shape": s.shape, "cycles": s.cycles, "cycle_epochs": s.cycle_epochs,
                                           "cycle_steps": s.cycle_steps, "warmup_steps": s.warmup_steps},
            "optim": {"name": o.name, "lr": o.lr, "weight_decay": o.weight_decay},
            "seq_len": t.seq_len, "global_batch": t.global_batch, "run_config": cfg.fingerprint()}


def distill_ensemble(run, k: int = 4, overrides=(), device=None) -> int:
    """Train (or resume) the distilled student of RUN's top-K mixture, then write its report. Exit code.
    In-process (no launcher): one rank on `device` (devices.pin_ds_accelerator; default auto, like `q0ds train`)."""
    if "RANK" not in os.environ:
        from .devices import pin_ds_accelerator
        pin_ds_accelerator(device)
    cfg, spec, opts = resolve(run, k, overrides)
    out = Path(cfg.run_dir)
    check_spec(out, spec, write=False)
    trainer = EnsembleDistillTrainer(cfg, spec, opts)
    if trainer.rank == 0:
        check_spec(out, spec, write=True)
    code = trainer.train()
    E.finish()
    if code == 0 and trainer.rank == 0:
        summary = write_distill_report(run, k, out)
        print(format_summary(summary), flush=True)
    return code


# ---------------------------------------------------------------- step time vs K
def bench_step_time(run, configs=("0", "1", "2", "4", "4/1"), overrides=(), steps: int = 4, rounds: int = 3) -> dict:
    """Seconds per optimizer step for each config "K" (K resident teacher engines; "0" = the student alone,
    CE), "K/S" (K members through S swapped engines) or "K@N" (targets read from a top-N teacher cache, built
    first for the whole plan: keep the plan small, e.g. schedule.cycle_steps=12; "cache_build_s" is its cost).
    All engines live in this process and are timed round-robin (`rounds` x `steps` steps each), so machine
    noise hits every config alike."""
    import statistics
    import tempfile
    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for c in configs:
            k, _, cache = str(c).partition("@")
            k, _, slots = k.partition("/")
            extra = (["distill.alpha=0"] if k == "0" else []) + ([f"ensemble.max_engines={slots}"] if slots else []) \
                + ([f"ensemble.teacher_cache={cache}"] if cache else [])
            cfg, spec, opts = resolve(run, max(int(k), 1), list(overrides) + extra + [f"run_dir={tmp}/{k}-{slots}-{cache}"])
            trainers[str(c)] = EnsembleDistillTrainer(cfg, spec, opts)
        times = {c: [] for c in trainers}
        for _ in range(rounds):
            for c, tr in trainers.items():
                for _ in range(steps):
                    t0 = time.perf_counter()
                    tr._train_step(tr.plan.cycle_at(tr.step))
                    tr.step += 1
                    times[c].append(time.perf_counter() - t0)
    mix = {c: tr.mixture if c != "0" else None for c, tr in trainers.items()}
    return {c: {"median_s": round(statistics.median(v), 3), "min_s": round(min(v), 3), "all_s": [round(x, 3) for x in v],
                "teacher_engines": len(mix[c].engines) if mix[c] else 0, "weight_loads": mix[c].loads if mix[c] else 0,
                **({"cache_build_s": trainers[c].cache_build_s} if trainers[c].cache is not None else {})}
            for c, v in times.items()}


# ---------------------------------------------------------------- launcher entry point
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m q0ds.ensemble_distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    p.add_argument("--bench", default=None, help="e.g. 0,1,2,4,4/1,4@32: time steps vs K (K/S: S swapped engines; "
                                                 "K@N: from a top-N teacher cache)")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    from .errors import user_errors
    try:
        if a.bench:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            print(json.dumps(bench_step_time(a.run, a.bench.split(","), a.overrides), indent=1))
            return 0
        return distill_ensemble(a.run, a.k, a.overrides)
    except user_errors() as e:
        print(f"q0ds distill-ensemble (rank {os.environ.get('RANK', 0)}): error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
