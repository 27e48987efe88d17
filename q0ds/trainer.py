"""The training loop of one base (one q0 trajectory), with the cycle-end event order in one place.

    for step in resumed_step .. total_steps:
        lr/wd multipliers -> optimizer groups; CE or distillation loss; backward; step
        at a cycle end: 1 save snapshot, 2 score it, 3 teacher <- snapshot, 4 perturb student, 5 checkpoint
    also checkpoint every N steps and on SIGUSR1/SIGTERM (then exit 75 so SLURM requeues)

Run it through `deepspeed --num_gpus N launchers/train.py --config C --base B` or `q0ds train` (1 process).
"""
from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import engine as E
from .compat import enable_activation_checkpointing
from .config import ConfigError, RunConfig, atomic_write_text, execution_only, save_config
from .data import PreparedData
from .distill import distill_loss
from .faults import crash_if, fault, sleep_if
from .files import write_failure
from .model import build_config
from .monitor import Monitor, check_sinks
from .runlock import BaseLock
from .schedule import multipliers, perturb_scale, run_plan
from .snapshot import snapshot_dir, token_logprobs, windows_fingerprint, write_scores, write_snapshot

EXIT_PREEMPTED = 75          # EX_TEMPFAIL: checkpoint written, relaunch to continue (SLURM requeue)
COMPLETE = "q0ds_complete.json"


class ResumeError(RuntimeError):
    pass


class NonFiniteLoss(RuntimeError):
    pass


class _Signals:
    """SIGUSR1 (SLURM's pre-emption warning) and SIGTERM set a flag; the loop checkpoints at the next step."""

    def __init__(self):
        self.caught = None
        for s in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.caught = signal.Signals(signum).name


def base_dir(cfg: RunConfig, base: int) -> Path:
    return Path(cfg.run_dir) / "bases" / f"base-{base:02d}"


def _device_rng():
    """(get, set) of this rank's accelerator generator (CUDA: drives dropout on GPUs), or None on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_rng_state, torch.cuda.set_rng_state
    return None


def _rng_state() -> dict:
    """This rank's generator states; saved in its own client state (per rank under ZeRO-3, deepspeed.md 6)."""
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    dev = _device_rng()
    if dev is not None:
        s["device"] = dev[0]()
    return s


def _set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    dev = _device_rng()
    if dev is not None:
        if "device" not in s:
            raise ResumeError("this checkpoint has no accelerator RNG state (written on CPU); resuming it on GPUs "
                              "would not reproduce dropout: resume on CPU or use a new run_dir")
        dev[1](s["device"])


def rank_seed(seed: int, rank: int, *more: int) -> int:
    """The dropout/generator seed of one rank of a base: different on every rank (and from the init seed)."""
    return int(np.random.SeedSequence([seed, rank, *more]).generate_state(1)[0])


def latest_checkpoint(ckpt_dir: Path):
    """Newest checkpoint whose completion marker exists (a half-written one is ignored)."""
    tags = sorted(d.name for d in ckpt_dir.glob("step-*") if (d / COMPLETE).is_file())
    return tags[-1] if tags else None


def _rotate(ckpt_dir: Path, keep: int):
    tags = sorted(d for d in ckpt_dir.glob("step-*") if (d / COMPLETE).is_file())
    for d in tags[:-keep]:
        shutil.rmtree(d, ignore_errors=True)
    for d in ckpt_dir.glob("step-*"):          # leftovers of a checkpoint killed mid-write
        if not (d / COMPLETE).is_file() and d.name < (tags[-1].name if tags else ""):
            shutil.rmtree(d, ignore_errors=True)


def _write_run_config(cfg: RunConfig, base_path: Path | None = None) -> BaseLock | None:
    """The run dir holds one resolved config; a relaunch with a different one is refused, naming the keys.
    Called once the run config, data, model and DeepSpeed config are all validated, so a refused launch
    writes nothing. Creates BASE_PATH too and takes its one-writer lock (q0ds/runlock.py) before writing any
    file there; returns the lock. A run dir we cannot write to is a one-line ConfigError."""
    path = Path(cfg.run_dir) / "config.json"
    lock = None
    try:
        if base_path is not None:
            base_path.mkdir(parents=True, exist_ok=True)
            probe = base_path / f".write-test-{os.getpid()}"     # an existing, resumed run dir may be read-only
            probe.touch()
            probe.unlink()
            lock = BaseLock(base_path)
        if path.is_file():
            old = json.loads(path.read_text())
            diff = [k for k in _diff(old, cfg.to_dict()) if not execution_only(k) or k == "run_dir"]
            if diff:
                raise ConfigError(f"{path} was written by a different config (differs in: {', '.join(diff)}); "
                                  "use a new run_dir, or restore the original settings to resume")
        else:
            save_config(cfg, path)
    except OSError as e:
        where = e.filename or cfg.run_dir
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):      # disk full, quota, I/O error
            raise write_failure(where, e) from None
        raise ConfigError(f"cannot write to the run dir: {where}: {e.strerror}; make {cfg.run_dir} writable "
                          "or set `run_dir` to a writable directory") from None
    return lock


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _now() -> float:
    """perf_counter once the accelerator's queued work is done: events are timed, not their kernel launches."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


class PhaseClock:
    """Per-step phase timings with Q0DS_PHASE_TIMES=1 (benchmarks/gpu_check.py): fwd_s, teacher_s, loss_s, bwd_s,
    opt_s summed over the step's micro-steps (opt_s: DeepSpeed's engine.step(), the optimizer on the last one).
    A device sync at every phase boundary, so measurements only; unset, every call returns at once."""

    def __init__(self):
        self.on = os.environ.get("Q0DS_PHASE_TIMES") == "1"
        self.acc, self.t = {}, 0.0

    def start(self):
        if self.on:
            self.acc, self.t = {}, _now()

    def __call__(self, phase: str):
        if self.on:
            t = _now()
            self.acc[phase] = self.acc.get(phase, 0.0) + t - self.t
            self.t = t

    def record(self) -> dict:
        return {f"{k}_s": round(v, 6) for k, v in self.acc.items()} if self.on else {}


def cpu_threads(local_world: int = 1) -> int:
    """Torch threads of a CPU rank: Q0DS_THREADS, else OMP_NUM_THREADS, else the cores shared by the ranks."""
    threads = int(os.environ.get("Q0DS_THREADS", 0) or os.environ.get("OMP_NUM_THREADS", 0) or 0)
    return threads or max(1, (os.cpu_count() or 1) // local_world)


class BaseTrainer:
    def __init__(self, cfg: RunConfig, base: int):
        self.cfg, self.base = cfg, base
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated")
        self.rank, self.world, self.local_rank = E.setup_distributed()
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        if not torch.cuda.is_available():
            # Q0DS_THREADS lets `q0ds run` share the cores between bases trained side by side; then the thread
            # count the launcher or the SLURM script set (q0_bases.sh: SLURM_CPUS_PER_TASK / ranks). Ignoring
            # OMP_NUM_THREADS made two 1-CPU array tasks on a 2-core node run 2 OpenMP threads each: libgomp's
            # spinning barriers then made every tiny step 15-20x slower (0.1 s alone, 1.6-2 s side by side).
            torch.set_num_threads(cpu_threads(local_world))
        elif not os.environ.get("OMP_NUM_THREADS"):
            # GPU node outside SLURM: the deepspeed launcher sets no thread count (launcher/launch.py main(), only
            # with --bind_cores_to_rank), so 8 ranks would each use every core for host work (hashing, scoring)
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        cfg.train.check_world(self.world)
        check_sinks(cfg.monitor)        # every rank, before any build: a missing tensorboard/wandb is one line
        if not 0 <= base < cfg.bases:
            raise ConfigError(f"--base {base} is out of range: the run config has bases={cfg.bases}")
        self.data = PreparedData.open(cfg.data)
        self.tokenizer = self.data.load_tokenizer()
        t = cfg.train
        self.plan = run_plan(cfg, self.data.windows_per_epoch(t.seq_len))
        self.dir = base_dir(cfg, base)
        self.ckpt_dir = self.dir / "checkpoints"
        self.lock = None
        self.model_config = build_config(cfg.model, self.data.vocab_size, self.data.eos_id,
                                         self.data.meta.get("pad_id", self.data.eos_id), t.seq_len)
        self.seed = cfg.seed + base
        ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, self.world)
        self.source_world = self._checkpoint_world()
        if self.source_world not in (None, self.world):      # resume on another world size: universal checkpoint
            ds = E.universal_ds_config(ds)
        # built partitioned (zero.Init) in the engine's dtype; the teacher without a random init (overwritten)
        student = E.build_partitioned(self.model_config, self.seed, ds, cfg.model.dropout)
        if t.activation_checkpointing:
            # transformers modeling_utils.PreTrainedModel.activation_checkpointing_enable (5.23; 5.17 calls it
            # gradient_checkpointing_enable, compat picks the one present): non-reentrant torch.utils.checkpoint
            # around each decoder layer's __call__, so ZeRO-3's module hooks re-gather the layer's params in the recompute
            enable_activation_checkpointing(student, {"use_reentrant": False})
        self.student, self.sched = E.make_student(student, ds, cfg.optim,
                                                  lambda s: multipliers(min(s, self.plan.total_steps - 1), self.plan, cfg.schedule),
                                                  grad_clip=cfg.train.grad_clip)
        d = cfg.distill
        self.teacher, self.teacher_mode = None, None
        if d.enabled and d.start_cycle < cfg.schedule.cycles:
            self.teacher_mode = self._choose_teacher_mode()
            self.teacher = (E.make_replicated_teacher(self.model_config, self.student)
                            if self.teacher_mode == "replicated" else
                            E.make_teacher(E.build_partitioned(self.model_config, self.seed, ds, init=False), ds))
        self.teacher_cycle = None
        self._pending = None         # rank 0: a failed metrics write, reported at the next agreement point
        err = None
        self.clock = PhaseClock()
        if self.rank == 0:   # only now that DeepSpeed accepted the config: a refused launch leaves no run dir behind
            try:
                self.lock = _write_run_config(cfg, self.dir)
            except Exception as e:
                err = e
        self._agree(err)     # a refusal (lock, read-only dir, other config) stops every rank with rank 0's message
        # every rank built the same initial weights from self.seed; from here each rank draws its own dropout
        # masks (torch.manual_seed seeds the CPU and every CUDA generator)
        torch.manual_seed(rank_seed(self.seed, self.rank))
        self.val = self.data.eval_windows("val", t.seq_len)
        self.fitness = self.data.eval_windows("fitness", t.seq_len) if cfg.eval.fitness else None
        self.fitness_fingerprint = windows_fingerprint(self.fitness) if self.fitness else None
        self.val_fingerprint = windows_fingerprint(self.val)
        # the optional test split (q0ds/data.py): scored and stored with every snapshot, read by no decision
        self.test = self.data.eval_windows("test", t.seq_len) if "test" in self.data.meta["splits"] else None
        self.signals = _Signals()
        self.step = 0
        self._last_checkpoint = None
        self.monitor = None          # rank 0: metrics.jsonl + TensorBoard/W&B (q0ds/monitor.py), opened after resume

    def _choose_teacher_mode(self, replicas: int = 1) -> str:
        """distill.teacher_mode, auto resolved by q0ds.plan.teacher_choice for this model, world size, micro batch
        and the smallest GPU of the job (one all-reduce), with `replicas` resident teachers (distill-ensemble: its
        resident members). On CPU auto is zero3: the plan is a GPU memory plan."""
        mode = self.cfg.distill.teacher_mode
        if mode != "auto" or not torch.cuda.is_available():
            chosen = "zero3" if mode == "auto" else mode
            self._print(f"teacher: {chosen} ({'requested' if mode != 'auto' else 'auto, no GPU'})")
            return chosen
        from .plan import teacher_choice
        c, t = self.model_config, self.cfg.train
        arch = {k: getattr(c, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                           "num_key_value_heads", "intermediate_size")}
        arch.update(head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                    tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)))
        mem = torch.tensor([float(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)])
        mem = E.all_reduce_(mem, self.student.device, "min").item()
        ch = teacher_choice(arch, gpus=self.world, micro_batch=t.micro_batch, seq_len=t.seq_len,
                            optimizer=self.cfg.optim.name, gpu_mem_gb=mem / 1e9,
                            checkpointing=t.activation_checkpointing, replicas=replicas)
        self._print(f"teacher: {ch['mode']} (auto: q0ds plan --memory puts {ch['replicated_total_bytes'] / 1e9:.1f} GB "
                    f"per GPU with {replicas} replica(s), {ch['zero3_total_bytes'] / 1e9:.1f} GB without, of "
                    f"{mem / 1e9:.1f} GB)")
        return ch["mode"]

    # ------------------------------------------------------------ the loop
    def train(self) -> int:
        err = None
        try:
            self._resume()
        except Exception as e:
            err = e
        self._agree(err)
        if self.rank == 0:      # after resume: it cuts metrics.jsonl back to the checkpoint (also a fresh start: 0)
            try:
                self.monitor = Monitor(self.dir, self.cfg.monitor, name=f"{Path(self.cfg.run_dir).name}/base-{self.base:02d}",
                                       config=self.cfg.to_dict(), resume_step=self.step)
            except OSError as e:
                err = self._failure(self.dir / "metrics.jsonl", e)
        self._agree(err)
        try:
            return self._train_loop()
        finally:
            if self.monitor is not None:
                self.monitor.close()

    def _train_loop(self) -> int:
        bar = self._progress()
        while self.step < self.plan.total_steps:
            cyc = self.plan.cycle_at(self.step)
            t0 = time.perf_counter()
            parts = self._train_step(cyc)          # ends in the loss .tolist(): the device work is done
            step_s = time.perf_counter() - t0      # this step only: cycle ends and checkpoints are timed as events
            stop = parts.pop("stop")
            self.step += 1
            tok_s = cyc.batch * self.cfg.train.seq_len / max(1e-9, step_s)
            self._log_step(cyc, dict(parts, step_s=round(step_s, 6), **self.clock.record()), tok_s, bar)
            if self.step == cyc.end_step:
                self._end_cycle(cyc)
            elif self.step % self.cfg.train.ckpt_every == 0:
                self._checkpoint()
            if self.rank == 0:
                crash_if("crash_at_step", self.step)
            if stop:                           # any rank caught a signal: folded into the step's all-reduce
                if self._last_checkpoint != self.step:
                    self._checkpoint()
                self._print(f"pre-empted ({self.signals.caught or 'test'}) at step {self.step}: checkpoint written, exit {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
        err = None
        if self.rank == 0:
            try:
                atomic_write_text(self.dir / "done.json", json.dumps({"steps": self.step, "cycles": len(self.plan.cycles)}))
            except OSError as e:
                err = self._failure(self.dir / "done.json", e)
        self._agree(err)
        if bar:
            bar.close()
        return 0

    def _train_step(self, cyc) -> dict:
        t = self.cfg.train
        self.sched.sync(self.step)
        lr_m, wd_m = self.sched.mults
        per_rank = cyc.batch // self.world
        n_micro = per_rank // t.micro_batch
        start = self.plan.sample_at(self.step) + self.rank * per_rank
        rows = self.data.train_samples(self.cfg.seed, self.base, start, per_rank, t.seq_len)
        distilled = self._distilled(cyc)
        dev = self.student.device
        sums = torch.zeros(5, device=dev)
        self.clock.start()
        for i in range(n_micro):
            w = rows[i * t.micro_batch:(i + 1) * t.micro_batch].to(self.student.device)
            inputs, labels = w[:, :-1], w[:, 1:]
            logits = self.student(input_ids=inputs).logits
            self.clock("fwd")
            if fault("nan_at_step") == self.step:
                logits = logits * float("nan")
            loss, parts = self._loss(logits, inputs, labels, distilled)
            self.clock("loss")
            E.micro_step(self.student, loss, n_micro, last=i == n_micro - 1, clock=self.clock)
            sums[:3] += torch.stack([loss.detach().float(), parts["ce"].float(), parts["kl"].float().to(dev)])
        # The stop flag (SIGUSR1/SIGTERM, or the test fault) rides in the loss all-reduce: one collective and one
        # host sync per step (the .tolist()); it also tells every rank about a NaN.
        stop = self.signals.caught is not None or fault("preempt_at_step") == self.step + 1
        sums[3] = float(stop)
        sums[4] = float(self._pending is not None)     # rank 0's metrics write failed: every rank stops below
        sums = E.all_reduce_(sums, dev)
        norm = getattr(self.student, "q0ds_raw_grad_norm", None)   # Muon + grad_clip: the raw norm (same on all ranks)
        sums = torch.cat([sums, norm.reshape(1).to(dev)]).tolist() if norm is not None else sums.tolist()
        if sums[4] > 0:
            self._agree(None)
        loss, ce, kl = (v / (n_micro * self.world) for v in sums[:3])
        if not math.isfinite(loss) and t.nan_policy == "stop":
            # ZeRO-3 flags the non-finite gradient as overflow and skips the update, so the weights are still good
            raise NonFiniteLoss(f"non-finite loss at step {self.step} (cycle {cyc.index}, base {self.base}); the update "
                                f"was skipped, and the last good checkpoint in {self.ckpt_dir} and all finished snapshots "
                                "are intact. Lower optim.lr or set train.nan_policy=skip, then relaunch to resume")
        return {"lr_mult": lr_m, "wd_mult": wd_m, "loss": loss, "ce": ce, "kl": kl, "distilled": distilled,
                "stop": sums[3] > 0, **({"grad_norm": sums[5]} if norm is not None else {})}

    def _distilled(self, cyc) -> bool:
        """Does this cycle learn from a teacher? (Hook: ensemble_distill.py's teacher is the top-K mixture.)"""
        return self.teacher is not None and cyc.index >= self.cfg.distill.start_cycle

    def _loss(self, logits, inputs, labels, distilled: bool):
        """CE, or chain distillation from the previous snapshot (hook: ensemble_distill.py)."""
        d = self.cfg.distill
        t_logits = None
        if distilled:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=inputs).logits
            self.clock("teacher")
        return distill_loss(logits, t_logits, labels, d.alpha if distilled else 0.0, d.temperature)

    # ------------------------------------------------------------ cycle end: the q0 event order
    def _end_cycle(self, cyc):
        """Each part is timed on its own (an event record's *_s keys), never in the next step's step_s."""
        snap = snapshot_dir(self.dir, cyc.index)
        nxt = cyc.index + 1
        refresh = self.teacher is not None and self.cfg.distill.start_cycle <= nxt < len(self.plan.cycles)
        # a replicated teacher is refreshed inside the snapshot's own gather (engine.consolidated_state_dict)
        replica = self.teacher if refresh and self.teacher_mode == "replicated" else None
        ev, t = {}, _now()
        state = E.consolidated_state_dict(self.student, replica=replica)   # collective
        ev["gather_s"] = _now() - t
        err = None
        if self.rank == 0:                                                 # 1. save first
            t = _now()
            try:
                write_snapshot(snap, state, self.model_config, self.data.tokenizer_dir, self._snapshot_meta(cyc), ev)
            except OSError as e:                                        # WriteFailed included
                err = self._failure(snap, e)
            sleep_if("sleep_in_cycle_end")
            ev["write_s"] = _now() - t - ev.get("hash_s", 0.0)
        self._agree(err)                                                   # (the barrier before scoring)
        t = _now()
        scores = self._score()                                            # 2. score (all ranks)
        val_loss = -scores["val"].double().mean().item()
        if self.rank == 0:
            try:
                write_scores(snap, {k: v.exp() for k, v in scores.items()}, {"val_loss": val_loss})
            except OSError as e:
                err = self._failure(snap, e)
        ev["score_s"] = _now() - t
        if self.rank == 0:
            self._log({"event": "snapshot", "step": self.step, "cycle": cyc.index, "val_loss": val_loss,
                       "epoch": self.plan.epoch_at(self.step), "path": str(snap),
                       **{k: round(v, 6) for k, v in ev.items()}})
        self._agree(err)
        self._print(f"cycle {cyc.index} done: val loss {val_loss:.4f} -> {snap}")
        if refresh:                                                        # 3. teacher <- snapshot
            t = _now()
            if replica is None:
                E.load_weights_inplace(self.teacher, state)
            self.teacher_cycle = cyc.index
            rec = {"event": "teacher", "step": self.step, "cycle": cyc.index, "mode": self.teacher_mode,
                   "refresh_s": round(_now() - t, 6)}          # replicated: 0, the copy was part of gather_s
            if self.cfg.train.verify_teacher:
                rec["max_abs_diff"] = E.max_weight_diff(self.teacher, state)
            self._log(rec)
        del state
        p = self.cfg.perturb
        if p.enabled and nxt < len(self.plan.cycles):                      # 4. perturb the student
            scale = perturb_scale(cyc.index, len(self.plan.cycles), p.start, p.end)
            t = _now()
            rel = E.perturb_(self.student, scale, seed=(self.seed * 1_000_003 + cyc.index) % 2**31)
            self._log({"event": "perturb", "step": self.step, "cycle": cyc.index, "scale": scale, "rel_change": rel,
                       "perturb_s": round(_now() - t, 6)})
        self._checkpoint()                                                 # 5. resume checkpoint

    def _snapshot_meta(self, cyc) -> dict:
        lr_m, wd_m = multipliers(self.step - 1, self.plan, self.cfg.schedule)
        return {"base": self.base, "cycle": cyc.index, "step": self.step, "epoch": self.plan.epoch_at(self.step),
                "tokens_seen": self.plan.sample_at(self.step) * self.cfg.train.seq_len,
                "lr_mult": lr_m, "wd_mult": wd_m, "distilled": self._distilled(cyc),
                "teacher": f"base-{self.base:02d}/cycle-{cyc.index - 1:04d}" if self.teacher_cycle is not None else None,
                "seed": self.seed, "run_config": self.cfg.fingerprint(), "data": self.data.fingerprint,
                "fitness_fingerprint": self.fitness_fingerprint,
                "val_fingerprint": self.val_fingerprint, "dtype": self.cfg.model.dtype,
                "val_loss": None}

    def _score(self) -> dict:
        self.student.eval()
        out = {}
        sets = {"val": self.val, "fitness": self.fitness, "test": self.test}
        for name, wm in sets.items():
            if wm is not None:
                out[name] = token_logprobs(self.student, wm[0], wm[1], self.cfg.eval.batch, self.rank, self.world,
                                           device=self.student.device)
        self.student.train()
        return out

    # ------------------------------------------------------------ checkpoints and resume
    def _client_state(self) -> dict:
        return {"step": self.step, "rng": _rng_state(), "world_size": self.world, "rank": self.rank,
                "config": self.cfg.fingerprint(), "config_dict": self.cfg.to_dict(), "data": self.data.fingerprint, "teacher_cycle": self.teacher_cycle,
                "plan_steps": self.plan.total_steps, "version": 1}

    def _checkpoint(self):
        tag = f"step-{self.step:08d}"
        self._last_checkpoint = self.step
        t = _now()
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        err = self._failure(self.ckpt_dir / tag, E.save_checkpoint(self.student, self.ckpt_dir, tag, self._client_state()))
        try:
            self._agree(err)                                               # every rank wrote its files
            if self.rank == 0:
                crash_if("crash_in_checkpoint", self.step)
                try:
                    atomic_write_text(self.ckpt_dir / tag / COMPLETE, json.dumps({"step": self.step, "world_size": self.world}))
                except OSError as e:
                    err = self._failure(self.ckpt_dir / tag / COMPLETE, e)
                else:
                    _rotate(self.ckpt_dir, self.cfg.train.keep_ckpts)
                    E.drop_universal(self.ckpt_dir)   # a converted copy is not needed once we have our own checkpoint
            self._agree(err)
        except BaseException:
            if self.rank == 0:          # never marked complete: remove it (a relaunch would ignore it anyway)
                shutil.rmtree(self.ckpt_dir / tag, ignore_errors=True)
            raise

        self._log({"event": "checkpoint", "step": self.step, "tag": tag, "checkpoint_s": round(_now() - t, 6)})

    def _intact(self) -> str:
        tag = latest_checkpoint(self.ckpt_dir)
        return (f"the last complete checkpoint {tag} and every finished snapshot are intact" if tag else
                "no checkpoint of this base is complete yet (a relaunch starts it over); finished snapshots are intact")

    def _failure(self, path, exc):
        """EXC (None: nothing failed) as the one-line WriteFailed when it is a failed write, else EXC itself."""
        if exc is None:
            return None
        return write_failure(path, exc, self._intact()) or exc

    def _agree(self, err):
        """Agreement point (engine.agree_error): this rank's error or a pending metrics-write failure."""
        err, self._pending = err or self._pending, None
        E.agree_error(err, self.student.device)

    def _checkpoint_world(self):
        """World size that wrote the newest complete checkpoint (None: fresh start)."""
        tag = latest_checkpoint(self.ckpt_dir)
        return json.loads((self.ckpt_dir / tag / COMPLETE).read_text())["world_size"] if tag else None

    def _resume(self):
        tag = latest_checkpoint(self.ckpt_dir)
        if tag is None:
            return
        marker = json.loads((self.ckpt_dir / tag / COMPLETE).read_text())
        if marker["world_size"] != self.source_world:
            raise ResumeError(f"checkpoint {self.ckpt_dir / tag} appeared while this launch started (world size "
                              f"{marker['world_size']}); is another trainer writing {self.dir}? Relaunch")
        load_dir = self.ckpt_dir
        if marker["world_size"] != self.world:          # DeepSpeed universal checkpoint (engine.to_universal)
            try:
                load_dir = E.to_universal(self.ckpt_dir, tag, marker["world_size"])
            except RuntimeError as e:
                raise ResumeError(str(e)) from e
            self._print(f"checkpoint {tag} came from {marker['world_size']} ranks, this launch has {self.world}: "
                        f"loading it as a universal checkpoint ({load_dir / tag})")
        try:
            cs = E.load_checkpoint(self.student, load_dir, tag)
        except ResumeError:
            raise
        except Exception as e:
            raise ResumeError(f"checkpoint {self.ckpt_dir / tag} could not be loaded ({type(e).__name__}: {e}); "
                              f"delete that dir to fall back to the previous checkpoint") from e
        differs = [what for key, mine, what in (("data", self.data.fingerprint, "prepared data"),
                                                 ("config", self.cfg.fingerprint(), "run config"))
                   if cs.get(key) != mine]
        if differs:
            keys = [k for k in _diff(cs.get("config_dict", {}), self.cfg.to_dict()) if not execution_only(k)]
            raise ResumeError(f"checkpoint {self.ckpt_dir / tag} was written with a different {' and '.join(differs)}"
                              + (f" (changed: {', '.join(keys)})" if keys else "")
                              + "; restore the original or use a new run_dir")
        self.step = self._last_checkpoint = cs["step"]
        _set_rng_state(cs["rng"])
        if marker["world_size"] != self.world:
            # the set of ranks changed, so per-rank generator states cannot carry over (DeepSpeed's universal load
            # hands every rank the client state of source rank 0): each rank starts a fresh stream of its own,
            # deterministic in (seed, rank, step). Dropout masks then differ from an uninterrupted run.
            torch.manual_seed(rank_seed(self.seed, self.rank, self.step))
        self.sched.sync(self.step)
        self.teacher_cycle = cs["teacher_cycle"]
        if self.teacher is not None and self.teacher_cycle is not None:
            self._load_teacher_from_disk(self.teacher_cycle)
        self._print(f"resumed base {self.base} from {tag} (step {self.step}/{self.plan.total_steps})")

    def _load_teacher_from_disk(self, cycle: int):
        from safetensors.torch import load_file
        from .snapshot import verify
        snap = snapshot_dir(self.dir, cycle)
        if self.teacher_mode == "replicated":          # every rank reads the file itself: no collective
            err = None
            if self.rank == 0:
                try:
                    verify(snap)
                except Exception as e:
                    err = e
            self._agree(err)
            E.load_replica_(self.teacher, load_file(snap / "model.safetensors"))
            return
        sd, err = None, None
        if self.rank == 0:
            try:
                verify(snap)
                sd = load_file(snap / "model.safetensors")
            except Exception as e:
                err = e
        self._agree(err)                 # before the collective load: a bad snapshot stops every rank
        E.load_weights_inplace(self.teacher, sd)

    # ------------------------------------------------------------ logging
    def _progress(self):
        if self.rank != 0:
            return None
        from tqdm import tqdm
        return tqdm(total=self.plan.total_steps, initial=self.step, desc=f"base {self.base}", dynamic_ncols=True,
                    disable=os.environ.get("Q0DS_NO_PROGRESS") == "1")

    def _log_step(self, cyc, parts, tok_s, bar):
        lr_m, wd_m = parts["lr_mult"], parts["wd_mult"]
        groups = E.group_values(self.sched, (lr_m, wd_m))   # {matrix|embed|head|scalar: (lr, wd)} of this step
        lr, wd = groups.get("matrix", next(iter(groups.values())))
        rec = {"step": self.step, "epoch": round(self.plan.epoch_at(self.step), 6), "cycle": cyc.index,
               "lr": lr, "wd": wd, **{f"lr_{g}": v[0] for g, v in groups.items()},
               **{f"wd_{g}": v[1] for g, v in groups.items()}, "batch": cyc.batch,
               **parts, "tokens_per_s": round(tok_s, 1)}
        if torch.cuda.is_available():                       # benchmarks/gpu_check.py reads it (rank 0's device)
            rec["peak_gpu_mem_bytes"] = torch.cuda.max_memory_allocated()
            rec["peak_gpu_reserved_bytes"] = torch.cuda.max_memory_reserved()
        if self.rank == 0:
            if self.step % self.cfg.train.log_every == 0 or self.step == cyc.end_step:
                self._log(rec)                               # grad_norm (Muon + grad_clip) rode in the step's .tolist()
            if bar:
                bar.update(1)
                bar.set_postfix(ep=f"{rec['epoch']:.2f}", cyc=cyc.index, loss=f"{parts['loss']:.3f}",
                                kl=f"{parts['kl']:.3f}", tok_s=f"{tok_s:.0f}")

    def _log(self, rec: dict):
        """One record (a step or an event) to every sink of the monitor; rank 0 only."""
        if self.rank != 0:
            return
        try:
            if self.monitor is None:
                self.monitor = Monitor(self.dir, self.cfg.monitor, name=f"base-{self.base:02d}")
            self.monitor.log(rec)
        except OSError as e:             # disk full: reported on every rank at the next agreement point
            self._pending = self._pending or self._failure(self.dir / "metrics.jsonl", e)

    def _print(self, msg: str):
        if self.rank == 0:
            print(f"[q0ds] {msg}", flush=True)


def train_base(cfg: RunConfig, base: int) -> int:
    done = base_dir(cfg, base) / "done.json"
    if done.is_file():                       # before any engine is built: relaunching a finished base is free
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"[q0ds] base {base} already complete ({done})", flush=True)
        return 0
    trainer = BaseTrainer(cfg, base)
    code = trainer.train()
    E.finish()
    return code
