"""The training loop of one base (one q0 trajectory), with the cycle-end event order in one place.

    for step in resumed_step .. total_steps:
        lr/wd multipliers -> optimizer groups; CE or distillation loss; backward; step
        at a cycle end: 1 save snapshot, 2 score it, 3 teacher <- snapshot, 4 perturb student, 5 checkpoint
    also checkpoint every N steps and on SIGUSR1/SIGTERM (then exit 75 so SLURM requeues)

Run it through `deepspeed --num_gpus N launchers/train.py --config C --base B` or `q0ds train` (1 process).
"""
from __future__ import annotations

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
from .config import ConfigError, RunConfig, atomic_write_text, save_config
from .data import PreparedData
from .distill import distill_loss
from .faults import crash_if, fault
from .model import build_config, build_model
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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])


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


def _write_run_config(cfg: RunConfig):
    """The run dir holds one resolved config; a relaunch with a different one is refused, naming the keys."""
    path = Path(cfg.run_dir) / "config.json"
    if path.is_file():
        old = json.loads(path.read_text())
        diff = _diff(old, cfg.to_dict())
        if diff:
            raise ConfigError(f"{path} was written by a different config (differs in: {', '.join(diff)}); "
                              "use a new run_dir, or restore the original settings to resume")
    else:
        save_config(cfg, path)


def _diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [k for key in sorted(set(a) | set(b)) for k in _diff(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [prefix.rstrip(".")]


class BaseTrainer:
    def __init__(self, cfg: RunConfig, base: int):
        self.cfg, self.base = cfg, base
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated")
        self.rank, self.world, self.local_rank = E.setup_distributed()
        if not torch.cuda.is_available():
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
            # Q0DS_THREADS lets `q0ds run` share the cores between bases trained side by side
            torch.set_num_threads(int(os.environ.get("Q0DS_THREADS", 0)) or max(1, (os.cpu_count() or 1) // local_world))
        cfg.train.check_world(self.world)
        if not 0 <= base < cfg.bases:
            raise ConfigError(f"--base {base} is out of range: the run config has bases={cfg.bases}")
        self.data = PreparedData.open(cfg.data)
        self.tokenizer = self.data.load_tokenizer()
        t = cfg.train
        self.plan = run_plan(cfg, self.data.windows_per_epoch(t.seq_len))
        self.dir = base_dir(cfg, base)
        self.ckpt_dir = self.dir / "checkpoints"
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_run_config(cfg)
        self.model_config = build_config(cfg.model, self.data.vocab_size, self.data.eos_id,
                                         self.data.meta.get("pad_id", self.data.eos_id), t.seq_len)
        self.seed = cfg.seed + base
        ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, self.world)
        student = build_model(self.model_config, self.seed)
        if t.activation_checkpointing:
            # transformers 5.x modeling_utils.PreTrainedModel.activation_checkpointing_enable (the new name of
            # gradient_checkpointing_enable): non-reentrant torch.utils.checkpoint around each decoder layer's
            # __call__, so ZeRO-3's module hooks re-gather the layer's params in the recompute
            student.activation_checkpointing_enable({"use_reentrant": False})
        self.student, self.sched = E.make_student(student, ds, cfg.optim,
                                                  lambda s: multipliers(min(s, self.plan.total_steps - 1), self.plan, cfg.schedule))
        d = cfg.distill
        self.teacher = (E.make_teacher(build_model(self.model_config, self.seed), ds)
                        if d.enabled and d.start_cycle < cfg.schedule.cycles else None)
        self.teacher_cycle = None
        self.val = self.data.eval_windows("val", t.seq_len)
        self.fitness = self.data.eval_windows("fitness", t.seq_len) if cfg.eval.fitness else None
        self.fitness_fingerprint = windows_fingerprint(self.fitness) if self.fitness else None
        self.val_fingerprint = windows_fingerprint(self.val)
        self.signals = _Signals()
        self.step = 0
        self._last_checkpoint = None

    # ------------------------------------------------------------ the loop
    def train(self) -> int:
        self._resume()
        bar = self._progress()
        t_last = time.time()
        while self.step < self.plan.total_steps:
            cyc = self.plan.cycle_at(self.step)
            parts = self._train_step(cyc)
            self.step += 1
            now = time.time()
            tok_s = cyc.batch * self.cfg.train.seq_len / max(1e-9, now - t_last)
            t_last = now
            self._log_step(cyc, parts, tok_s, bar)
            if self.step == cyc.end_step:
                self._end_cycle(cyc)
            elif self.step % self.cfg.train.ckpt_every == 0:
                self._checkpoint()
            if self.rank == 0:
                crash_if("crash_at_step", self.step)
            if E.any_rank(self.signals.caught is not None or fault("preempt_at_step") == self.step):
                if self._last_checkpoint != self.step:
                    self._checkpoint()
                self._print(f"pre-empted ({self.signals.caught or 'test'}) at step {self.step}: checkpoint written, exit {EXIT_PREEMPTED}")
                return EXIT_PREEMPTED
        if self.rank == 0:
            atomic_write_text(self.dir / "done.json", json.dumps({"steps": self.step, "cycles": len(self.plan.cycles)}))
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
        sums = torch.zeros(3, device=self.student.device)
        for i in range(n_micro):
            w = rows[i * t.micro_batch:(i + 1) * t.micro_batch].to(self.student.device)
            inputs, labels = w[:, :-1], w[:, 1:]
            logits = self.student(input_ids=inputs).logits
            if fault("nan_at_step") == self.step:
                logits = logits * float("nan")
            loss, parts = self._loss(logits, inputs, labels, distilled)
            E.micro_step(self.student, loss, n_micro, last=i == n_micro - 1)
            sums += torch.stack([loss.detach().float(), parts["ce"].float(), parts["kl"].float().to(sums.device)])
        if self.world > 1:
            torch.distributed.all_reduce(sums)      # one collective per step; also tells every rank about a NaN
        loss, ce, kl = (sums / (n_micro * self.world)).tolist()
        if not math.isfinite(loss) and t.nan_policy == "stop":
            # ZeRO-3 flags the non-finite gradient as overflow and skips the update, so the weights are still good
            raise NonFiniteLoss(f"non-finite loss at step {self.step} (cycle {cyc.index}, base {self.base}); the update "
                                f"was skipped, and the last good checkpoint in {self.ckpt_dir} and all finished snapshots "
                                "are intact. Lower optim.lr or set train.nan_policy=skip, then relaunch to resume")
        return {"lr_mult": lr_m, "wd_mult": wd_m, "loss": loss, "ce": ce, "kl": kl, "distilled": distilled}

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
        return distill_loss(logits, t_logits, labels, d.alpha if distilled else 0.0, d.temperature)

    # ------------------------------------------------------------ cycle end: the q0 event order
    def _end_cycle(self, cyc):
        snap = snapshot_dir(self.dir, cyc.index)
        state = E.consolidated_state_dict(self.student)                    # collective
        if self.rank == 0:                                                 # 1. save first
            write_snapshot(snap, state, self.model_config, self.data.tokenizer_dir, self._snapshot_meta(cyc))
        E.barrier()
        scores = self._score()                                            # 2. score (all ranks)
        val_loss = -scores["val"].double().mean().item()
        if self.rank == 0:
            write_scores(snap, {k: v.exp() for k, v in scores.items()}, {"val_loss": val_loss})
            self._log({"event": "snapshot", "step": self.step, "cycle": cyc.index, "val_loss": val_loss,
                       "epoch": self.plan.epoch_at(self.step), "path": str(snap)})
        self._print(f"cycle {cyc.index} done: val loss {val_loss:.4f} -> {snap}")
        nxt = cyc.index + 1
        if self.teacher is not None and self.cfg.distill.start_cycle <= nxt < len(self.plan.cycles):
            E.load_weights_inplace(self.teacher, state)                    # 3. teacher <- snapshot
            self.teacher_cycle = cyc.index
            if self.cfg.train.verify_teacher:
                diff = E.max_weight_diff(self.teacher, state)
                self._log({"event": "teacher", "step": self.step, "cycle": cyc.index, "max_abs_diff": diff})
        del state
        p = self.cfg.perturb
        if p.enabled and nxt < len(self.plan.cycles):                      # 4. perturb the student
            scale = perturb_scale(cyc.index, len(self.plan.cycles), p.start, p.end)
            rel = E.perturb_(self.student, scale, seed=(self.seed * 1_000_003 + cyc.index) % 2**31)
            self._log({"event": "perturb", "step": self.step, "cycle": cyc.index, "scale": scale, "rel_change": rel})
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
        sets = {"val": self.val, "fitness": self.fitness}
        for name, wm in sets.items():
            if wm is not None:
                out[name] = token_logprobs(self.student, wm[0], wm[1], self.cfg.eval.batch, self.rank, self.world)
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
        E.save_checkpoint(self.student, self.ckpt_dir, tag, self._client_state())
        E.barrier()
        if self.rank == 0:
            crash_if("crash_in_checkpoint", self.step)
            atomic_write_text(self.ckpt_dir / tag / COMPLETE, json.dumps({"step": self.step, "world_size": self.world}))
            _rotate(self.ckpt_dir, self.cfg.train.keep_ckpts)
        E.barrier()

    def _resume(self):
        tag = latest_checkpoint(self.ckpt_dir)
        if tag is None:
            return
        marker = json.loads((self.ckpt_dir / tag / COMPLETE).read_text())
        if marker["world_size"] != self.world:
            raise ResumeError(f"checkpoint {self.ckpt_dir / tag} was written with world size {marker['world_size']}, "
                              f"this launch has {self.world}; relaunch with {marker['world_size']} ranks or use a new run_dir")
        try:
            cs = E.load_checkpoint(self.student, self.ckpt_dir, tag)
        except ResumeError:
            raise
        except Exception as e:
            raise ResumeError(f"checkpoint {self.ckpt_dir / tag} could not be loaded ({type(e).__name__}: {e}); "
                              f"delete that dir to fall back to the previous checkpoint") from e
        differs = [what for key, mine, what in (("data", self.data.fingerprint, "prepared data"),
                                                 ("config", self.cfg.fingerprint(), "run config"))
                   if cs.get(key) != mine]
        if differs:
            keys = [k for k in _diff(cs.get("config_dict", {}), self.cfg.to_dict()) if k != "run_dir"]
            raise ResumeError(f"checkpoint {self.ckpt_dir / tag} was written with a different {' and '.join(differs)}"
                              + (f" (changed: {', '.join(keys)})" if keys else "")
                              + "; restore the original or use a new run_dir")
        self.step = self._last_checkpoint = cs["step"]
        _set_rng_state(cs["rng"])
        self.sched.sync(self.step)
        self.teacher_cycle = cs["teacher_cycle"]
        if self.teacher is not None and self.teacher_cycle is not None:
            self._load_teacher_from_disk(self.teacher_cycle)
        if self.rank == 0:
            self._truncate_metrics(self.step)
        self._print(f"resumed base {self.base} from {tag} (step {self.step}/{self.plan.total_steps})")

    def _load_teacher_from_disk(self, cycle: int):
        from safetensors.torch import load_file
        from .snapshot import verify
        snap = snapshot_dir(self.dir, cycle)
        sd = None
        if self.rank == 0:
            verify(snap)
            sd = load_file(snap / "model.safetensors")
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
        rec = {"step": self.step, "epoch": round(self.plan.epoch_at(self.step), 6), "cycle": cyc.index,
               "lr": self.sched.base[0][0] * lr_m, "wd": self.sched.base[0][1] * wd_m, "batch": cyc.batch,
               **parts, "tokens_per_s": round(tok_s, 1)}
        if torch.cuda.is_available():                       # benchmarks/gpu_check.py reads it (rank 0's device)
            rec["peak_gpu_mem_bytes"] = torch.cuda.max_memory_allocated()
        if self.rank == 0:
            if self.step % self.cfg.train.log_every == 0 or self.step == cyc.end_step:
                self._log(rec)
            if bar:
                bar.update(1)
                bar.set_postfix(ep=f"{rec['epoch']:.2f}", cyc=cyc.index, loss=f"{parts['loss']:.3f}",
                                kl=f"{parts['kl']:.3f}", tok_s=f"{tok_s:.0f}")

    def _log(self, rec: dict):
        if self.rank != 0:
            return
        with open(self.dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")

    def _truncate_metrics(self, step: int):
        """Drop records past the checkpoint: the resumed run re-logs them identically."""
        path = self.dir / "metrics.jsonl"
        if path.is_file():
            keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
            atomic_write_text(path, "".join(l + "\n" for l in keep))

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
