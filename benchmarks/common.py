"""Small helpers shared by the benchmark scripts: CPU DeepSpeed env defaults, machine info, stats, JSON."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def env_defaults() -> None:
    """The CPU DeepSpeed environment (deepspeed.md sections 11-12); call before anything imports deepspeed."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))  # shm op: no 45 s JIT
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def machine_info() -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "niceness": os.nice(0) if hasattr(os, "nice") else None}
    try:
        info["cpu_model"] = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu_model"] = platform.processor()
    for mod in ("deepspeed", "transformers"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def median(xs) -> float:
    return float(statistics.median(xs))


def write_json(path, obj) -> None:
    """Atomic: a reader never sees half a result file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def add_data_args(p, override_help: str = "run-config key=value (all runs)") -> None:
    """The prepared-data and job options shared by the resumable benchmarks (data_efficiency, distill_retention):
    the same defaults give the same prepared data, so both benchmarks train on one corpus."""
    p.add_argument("--preset", default=None, help="model/run preset (default small)")
    p.add_argument("--override", dest="overrides", action="append", default=[], help=override_help)
    p.add_argument("--train-tokens", type=int, default=None, help="max train tokens (default 55000)")
    p.add_argument("--fitness-tokens", type=int, default=12000)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--test-tokens", type=int, default=None, help="test split size (default 12000; quick 1000)")
    p.add_argument("--data", default=None, help="use this prepared data dir instead of preparing one")
    p.add_argument("--parallel", type=int, default=2, help="jobs side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
