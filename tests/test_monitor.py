"""Monitoring (q0ds/monitor.py): TensorBoard event files and offline W&B runs are read back and compared with
metrics.jsonl, through a SIGKILL + resume (no duplicated points), and fit-prior's weights and top-K curve."""
import json
from pathlib import Path

import pytest

from conftest import read_jsonl, run_cli
from q0ds.monitor import wandb_history


def test_scalars_forward_every_numeric_key():
    from q0ds.monitor import scalars
    rec = {"step": 7, "epoch": 0.5, "lr_matrix": 1e-3, "wd_embed": 0.7, "loss": 3.0, "distilled": True, "batch": 8}
    assert scalars(rec) == {"train/epoch": 0.5, "train/lr_matrix": 1e-3, "train/wd_embed": 0.7, "train/loss": 3.0,
                            "train/distilled": 1.0, "train/batch": 8.0}
    ev = {"event": "snapshot", "step": 3, "cycle": 0, "val_loss": 4.2, "path": "/x", "teacher": None}
    assert scalars(ev) == {"snapshot/cycle": 0.0, "snapshot/val_loss": 4.2}


def tb_scalars(logdir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(records) -> dict:
    from q0ds.monitor import scalars
    out = {}
    for r in records:
        for tag, v in scalars(r).items():
            out.setdefault(tag, []).append((r["step"], v))
    return out


@pytest.mark.slow
def test_tensorboard_and_offline_wandb_match_metrics_through_a_kill(make_config):
    path, cfg = make_config("schedule.cycles=2", "schedule.cycle_steps=3", "train.ckpt_every=2", "distill.start_cycle=1",
                            "train.verify_teacher=true", "monitor.tensorboard=true", "monitor.wandb=true")
    base = Path(cfg.run_dir) / "bases/base-00"
    killed = run_cli("train", "--config", path, "--base", "0", env={"Q0DS_FAULT": "crash_at_step=5"}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert max(r["step"] for r in read_jsonl(base / "metrics.jsonl")) == 5        # step 5 logged, checkpoint at 4
    run_cli("train", "--config", path, "--base", "0")                              # resumes from step 4
    recs = read_jsonl(base / "metrics.jsonl")
    steps = [r["step"] for r in recs if "event" not in r]
    assert steps == list(range(1, 7)), "metrics.jsonl must hold each step once"
    want = expected(recs)
    assert {"train/loss", "train/kl", "train/lr", "train/batch", "train/tokens_per_s", "snapshot/val_loss",
            "teacher/max_abs_diff", "perturb/scale"} <= set(want)

    # TensorBoard: two event files (killed run + resumed run); the reader drops the killed run's step 5 (purge_step)
    assert len(list((base / "tensorboard").glob("events.out.tfevents.*"))) == 2
    got = tb_scalars(base / "tensorboard")
    assert set(got) == set(want)
    for tag, pts in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in pts], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in pts], rel=1e-6), tag

    # W&B offline: two offline runs with one id; no point twice, every value as in metrics.jsonl, and everything
    # after the resumed checkpoint present (wandb-core may lose what it had buffered when the first run was killed)
    runs = sorted((base / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and len({r.name for r in runs}) == 1, runs
    union: dict = {}
    for run in runs:
        for row in wandb_history(run):
            for tag, v in row.items():
                if not tag.startswith("_"):
                    union.setdefault(tag, []).append((row["_step"], v))
    assert set(union) <= set(want) and {"train/loss", "snapshot/val_loss"} <= set(union)
    for tag, pts in union.items():
        steps = [s for s, _ in pts]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated points {steps}"
        ref = dict(want[tag])
        assert [v for _, v in sorted(pts)] == pytest.approx([ref[s] for s in sorted(steps)], rel=1e-6), tag
    assert [s for s, _ in union["train/loss"] if s > 4] == [5, 6]
    # fit-prior: the member weights and the top-K curve
    run_cli("fit-prior", "--run", cfg.run_dir)
    prior = json.loads((Path(cfg.run_dir) / "prior.json").read_text())
    got = tb_scalars(Path(cfg.run_dir) / "tensorboard" / "prior")
    assert [v for _, v in got["prior/weight"]] == pytest.approx(prior["weights"], rel=1e-6)
    assert [s for s, _ in got["prior/topk_fitness_nll"]] == [int(k) for k in prior["topk"]]
    assert got["prior/topk_fitness_nll"][-1][1] == pytest.approx(prior["fit_loss"], rel=1e-4)   # K = M: the fit
    (wb,) = (Path(cfg.run_dir) / "prior-monitor" / "wandb").glob("offline-run-*/run-*.wandb")
    rows = wandb_history(wb)
    assert [r["prior/weight"] for r in rows if "prior/weight" in r] == pytest.approx(prior["weights"])
    assert [r["K"] for r in rows if "prior/topk_fitness_nll" in r] == [int(k) for k in prior["topk"]]
    assert [r["prior/topk_fitness_nll"] for r in rows if "K" in r] == pytest.approx(
        [v for _, v in got["prior/topk_fitness_nll"]], rel=1e-6)


def test_monitor_switches_do_not_change_the_run(make_config):
    from q0ds.trainer import _write_run_config
    _, cfg = make_config()
    _, on = make_config("monitor.tensorboard=true", "monitor.wandb=true")
    assert on.fingerprint() == cfg.fingerprint()
    _write_run_config(cfg)
    _write_run_config(on)                          # a relaunch that turns monitoring on is not "a different config"
