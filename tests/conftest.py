"""Shared fixtures: CPU DeepSpeed env, one prepared embedded corpus per session, tiny run configs."""
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")          # before any deepspeed import (deepspeed.md section 12)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("Q0DS_NO_PROGRESS", "1")
ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))

import pytest  # noqa: E402


# ---------------------------------------------------------------- parallel runs (make test: pytest-xdist)
# `make test` runs 2 workers with --dist loadgroup: each test file is one unit of work for one worker (its
# module fixtures run once), the files that read the shared trained run are one unit (it is trained once), and
# the units start longest first, by the per-file times measured in benchmarks/results/suite_durations.json
# (benchmarks/suite_durations.py), so that the two workers finish together.
SHARED_RUN_FILES = ("test_e2e_deepspeed.py", "test_population.py")
DURATIONS = ROOT / "benchmarks" / "results" / "suite_durations.json"


def work_unit(path) -> str:
    return "trained_2rank" if path.name in SHARED_RUN_FILES else path.name


def unit_seconds() -> dict:
    """Measured seconds per work unit (sum of its files' latest totals); {} when there is no record."""
    try:
        files = json.loads(DURATIONS.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return {}
    out: dict = {}
    for name, t in files.items():
        s = t.get("after_s") or t.get("before_s") or 0.0
        unit = work_unit(Path(name))
        out[unit] = out.get(unit, 0.0) + s
    return out


@pytest.hookimpl(tryfirst=True)        # before xdist's own hook, which reads the xdist_group marks into the node ids
def pytest_collection_modifyitems(config, items):
    seconds = unit_seconds()
    for item in items:
        item.add_marker(pytest.mark.xdist_group(work_unit(item.path)))
    items.sort(key=lambda it: -seconds.get(work_unit(it.path), 0.0))      # stable: file order kept within a unit


@pytest.fixture(scope="session")
def embedded_data(tmp_path_factory):
    from q0ds.data import prepare
    out = tmp_path_factory.mktemp("data") / "embedded"
    prepare(out, embedded=True, vocab_size=512, fitness_tokens=2000, val_tokens=3000, max_train_tokens=20000)
    return out


@pytest.fixture
def make_config(embedded_data, tmp_path):
    """tiny preset + overrides -> (config path, RunConfig)."""
    from q0ds.config import load_config, save_config
    from q0ds.presets import preset_config

    def make(*overrides, run="run", name="config.json"):
        cfg = load_config(None, list(overrides), base=preset_config("tiny", data=str(embedded_data), run_dir=str(tmp_path / run)))
        path = tmp_path / name
        save_config(cfg, path)
        return path, cfg
    return make


def run_cli(*args, env=None, timeout=600, check=True):
    """Run `python -m q0ds.cli ...` in a subprocess; returns CompletedProcess (text)."""
    e = dict(os.environ, **(env or {}))
    p = subprocess.run([sys.executable, "-m", "q0ds.cli", *map(str, args)], cwd=ROOT, env=e, text=True,
                       capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"q0ds {' '.join(map(str, args))} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def run_launcher(config, base, *overrides, ranks=2, env=None, timeout=900, check=True):
    """The real `deepspeed` launcher on CPU ranks."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    deepspeed = Path(sys.executable).with_name("deepspeed")
    e = dict(os.environ, **(env or {}))
    cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(port), "launchers/train.py",
           "--config", str(config), "--base", str(base), *overrides]
    LAUNCH_PORTS.add(port)
    p = subprocess.run(cmd, cwd=ROOT, env=e, text=True, capture_output=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-4000:]}\n{p.stderr[-6000:]}")
    # a rank dying at exit ("terminate called without an active exception") must never pass for a clean launch
    assert p.returncode != 0 or "terminate called" not in p.stderr, p.stderr[-3000:]
    left = shm_leftovers({port})
    assert not left, f"the launch left DeepSpeed shm buffers behind: {left}"
    return p


LAUNCH_PORTS: set = set()      # master ports of this session's launches (other sessions may share /dev/shm)


def shm_leftovers(ports) -> list:
    """DeepSpeed shm all-reduce buffers (engine.shm_buffer_path) still in /dev/shm for these master ports."""
    return sorted(str(f) for port in ports for f in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


@pytest.fixture(autouse=True, scope="session")
def _no_shm_left_behind():
    """Every launch of the session must release its /dev/shm buffers (about 69 MB per rank)."""
    yield
    left = shm_leftovers(LAUNCH_PORTS)
    assert not left, f"DeepSpeed shm buffers left in /dev/shm by this test session: {left}"


# ---------------------------------------------------------------- one trained 2-rank run for the whole session
# The end-to-end config: 4 cycles of 3 steps, chain distillation from cycle 2, perturbation, checkpoints every
# 2 steps, the block-triangular batch schedule and residual dropout (exact resume then also needs each rank's
# generator); 2 bases. Tests that only READ a trained 2-rank run use `trained_2rank` (base 0 through the
# launcher on 2 ranks); `trained_population` completes the same run dir with `q0ds run` (base 1 and both
# baselines, 1 rank each, 2 side by side; then prior, eval, report) for the tests that read a population.
# Tests that train their own run of the same config (faults, resumes: base 0 only) compare against it.
E2E_OVERRIDES = ["bases=2", "schedule.cycles=4", "schedule.cycle_steps=3", "distill.start_cycle=2", "train.ckpt_every=2",
                 "train.verify_teacher=true", "train.micro_batch=2", "train.global_batch=8", "train.small_batch=4",
                 "model.dropout=0.1"]


def tree_hashes(root) -> dict:
    """sha256 of every file under `root` (relative path -> hex digest)."""
    import hashlib
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


class Trained2Rank:
    """The shared run: `cfg` (its RunConfig; run dir `cfg.run_dir`), `collectives` (per-rank logs of every tensor
    that reached torch.distributed) and `config(name, *extra)`, which writes a config of the same settings
    (plus `extra`) with its own run dir outside the shared tree -> (path, RunConfig)."""

    def __init__(self, root: Path, runs: Path, data):
        self.root, self.runs, self.data = root, runs, data
        self.collectives = root / "collectives"
        self.hashes: dict = {}

    def check_unchanged(self):
        now = tree_hashes(self.root)
        changed = sorted(k for k in self.hashes.keys() | now.keys() if self.hashes.get(k) != now.get(k))
        assert not changed, f"a test modified the shared trained_2rank run (copy it first): {changed[:10]}"

    def config(self, name, *extra, where=None):
        from q0ds.config import load_config, save_config
        from q0ds.presets import preset_config
        where = where or self.runs
        cfg = load_config(None, E2E_OVERRIDES + list(extra),
                          base=preset_config("tiny", data=str(self.data), run_dir=str(where / name)))
        save_config(cfg, where / f"{name}.json")
        return where / f"{name}.json", cfg


@pytest.fixture(scope="session")
def trained_2rank(tmp_path_factory, embedded_data):
    """One uninterrupted 2-rank ZeRO-3 run through the real `deepspeed` launcher, trained once per session and
    read by every test that needs such a run's outputs; at session end its tree must be unchanged (a test
    that wants to modify it copies it first)."""
    t = Trained2Rank(tmp_path_factory.mktemp("trained-2rank"), tmp_path_factory.mktemp("e2e-runs"), embedded_data)
    path, t.cfg = t.config("straight", where=t.root)
    # every tensor reaching torch.distributed is logged per rank (engine._record_collectives)
    run_launcher(path, 0, env={"Q0DS_RECORD_COLLECTIVES": str(t.collectives)})
    t.path = path
    t.hashes = tree_hashes(t.root)
    yield t
    t.check_unchanged()


@pytest.fixture(scope="session")
def trained_population(trained_2rank):
    """`trained_2rank`'s run dir completed by `q0ds run --parallel 2 --baselines --ensemble-members 2`: base 0
    is already done (done.json), so it trains base 1 and the single and 2-member ensemble baselines, then
    writes prior.json, eval.json and the report. Returns the same object (cfg.run_dir is the population)."""
    t = trained_2rank
    t.check_unchanged()
    p = run_cli("run", "--config", t.path, "--parallel", "2", "--baselines", "--ensemble-members", "2")
    assert "report:" in p.stdout, p.stdout[-2000:]
    t.hashes = tree_hashes(t.root)
    return t


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


@pytest.fixture(autouse=True, scope="module")
def _restore_distributed_env():
    """In-process engine tests (q0ds.engine.setup_distributed) set RANK/MASTER_PORT...; a `q0ds` or `deepspeed`
    subprocess started later would inherit them and try to join that dead rendezvous. Restore per module."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
