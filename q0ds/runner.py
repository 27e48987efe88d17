"""All bases of a run on one machine, each through the real `deepspeed` launcher, then prior, eval, report.

    q0ds run --config runs/x/config.json [--parallel 2] [--ranks 1] [--baselines]

Resumable at every stage: a finished base (done.json) is not retrained, an interrupted one resumes from its
checkpoint, and prior/eval/report are cheap to redo. Each base logs to <base>/train.log; one progress bar
follows all of them by reading their metrics.jsonl.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from .compat import repo_file
from .config import ConfigError, RunConfig, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent


class TrainFailed(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plan_of(cfg: RunConfig):
    """The cycle plan of one base of `cfg` on its prepared data."""
    from .data import PreparedData
    from .schedule import run_plan
    return run_plan(cfg, PreparedData.open(cfg.data).windows_per_epoch(cfg.train.seq_len))


def launch_base(config_path, base: int, base_dir: Path, ranks: int = 1, threads: int = 0) -> subprocess.Popen:
    """Start `deepspeed --num_gpus R launchers/train.py --config C --base B` with output to train.log."""
    base_dir.mkdir(parents=True, exist_ok=True)
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(ranks),
           "--master_port", str(_free_port()), str(repo_file("launchers/train.py")),
           "--config", str(config_path), "--base", str(base)]
    env = dict(os.environ, Q0DS_NO_PROGRESS="1")
    if threads:
        env["Q0DS_THREADS"] = str(threads)
    log = open(base_dir / "train.log", "a")
    log.write(f"\n$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT if (ROOT / "launchers").is_dir() else None)


def _steps_done(base_dir: Path) -> int:
    m = base_dir / "metrics.jsonl"
    if not m.is_file():
        return 0
    return sum(1 for line in m.read_text().splitlines() if line.startswith('{"step"'))


def train_bases(config_path, parallel: int = 1, ranks: int = 1, label: str = "q0") -> None:
    """Train every unfinished base of the config, `parallel` at a time, with one combined progress bar."""
    from tqdm import tqdm
    from .trainer import base_dir
    cfg = load_config(config_path)
    todo = [b for b in range(cfg.bases) if not (base_dir(cfg, b) / "done.json").is_file()]
    total = plan_of(cfg).total_steps * cfg.bases
    threads = max(1, (os.cpu_count() or 1) // (parallel * ranks))
    bar = tqdm(total=total, desc=f"{label}: {cfg.bases} base(s)", unit="step", dynamic_ncols=True,
               disable=os.environ.get("Q0DS_NO_PROGRESS") == "1")
    running: dict[int, subprocess.Popen] = {}
    failed = []
    while todo or running:
        while todo and len(running) < parallel:
            b = todo.pop(0)
            running[b] = launch_base(config_path, b, base_dir(cfg, b), ranks, threads)
        time.sleep(0.5)
        for b, proc in list(running.items()):
            if proc.poll() is not None:
                del running[b]
                if proc.returncode != 0:
                    failed.append((b, proc.returncode))
        done = sum(_steps_done(base_dir(cfg, b)) for b in range(cfg.bases))
        if done != bar.n:
            bar.update(done - bar.n)
    bar.close()
    if failed:
        b, code = failed[0]
        log = base_dir(cfg, b) / "train.log"
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise TrainFailed(f"base {b} exited with code {code}{' (pre-empted; rerun to resume)' if code == 75 else ''}; "
                          f"see {log}:\n{tail}")


def baseline_configs(cfg: RunConfig, members: int = 4) -> dict[str, RunConfig]:
    """The two baselines at q0's epoch budget E, on the same model, data and evaluation (method.md):
    a single model with warmup + cosine over E epochs (snapshot every epoch to find its best), and an
    independent ensemble of `members` models, each its own seed, E/members epochs each."""
    plan = plan_of(cfg)
    budget = plan.epoch_at(plan.total_steps) * cfg.bases
    out = {}
    for name, bases, epochs in (("single", 1, budget), ("ensemble", members, budget / members)):
        d = cfg.to_dict()
        cycles = max(1, round(epochs))
        d.update(run_dir=str(Path(cfg.run_dir) / "baselines" / name), bases=bases, seed=cfg.seed + 1000)
        d["schedule"].update(shape="cosine", cycles=cycles, cycle_epochs=epochs / cycles, cycle_steps=0,
                             warmup_steps=10, wd_coupling=False)
        d["train"]["small_batch"] = 0
        d["distill"]["enabled"] = False
        d["perturb"]["enabled"] = False
        out[name] = load_config(None, [], base=d)
    return out


def run_all(config_path, overrides=(), parallel: int = 1, ranks: int = 1, baselines: bool = False,
            ensemble_members: int = 4) -> int:
    from .population import eval_run, fit_prior_run
    from .report import write_report
    from .engine import load_ds_config
    cfg = load_config(config_path, overrides)
    load_ds_config(cfg.ds_config)             # refuse a bad DeepSpeed config before the run dir exists
    run = Path(cfg.run_dir)
    resolved = run / "config.json"
    try:
        run.mkdir(parents=True, exist_ok=True)
        if not resolved.is_file():
            save_config(cfg, resolved)
    except OSError as e:
        raise ConfigError(f"cannot write to the run dir: {e.filename or run}: {e.strerror}; make it writable "
                          "or set `run_dir` to a writable directory") from None
    train_bases(resolved, parallel, ranks)
    if baselines:
        for name, bcfg in baseline_configs(cfg, ensemble_members).items():
            path = Path(bcfg.run_dir) / "config.json"
            if not path.is_file():
                save_config(bcfg, path)
            train_bases(path, parallel, ranks, label=f"baseline {name}")
    fit_prior_run(run)
    eval_run(run)
    print(f"[q0ds] report: {write_report(run)}")
    return 0
