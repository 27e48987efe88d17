"""Small helpers shared by the benchmark scripts: CPU DeepSpeed env defaults, machine info, stats, JSON."""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# two-sided 95% Student t quantiles t_{0.975, df} (scipy.stats.t.ppf(0.975, df), 6 decimals, so that the
# intervals need no scipy)
T975 = {1: 12.706205, 2: 4.302653, 3: 3.182446, 4: 2.776445, 5: 2.570582, 6: 2.446912, 7: 2.364624, 8: 2.306004,
        9: 2.262157, 10: 2.228139, 11: 2.200985, 12: 2.178813, 13: 2.160369, 14: 2.144787, 15: 2.13145,
        16: 2.119905, 17: 2.109816, 18: 2.100922, 19: 2.093024, 20: 2.085963, 21: 2.079614, 22: 2.073873,
        23: 2.068658, 24: 2.063899, 25: 2.059539, 26: 2.055529, 27: 2.051831, 28: 2.048407, 29: 2.04523,
        30: 2.042272, 40: 2.021075, 60: 2.000298, 120: 1.97993}


def t975(df: int) -> float:
    """t_{0.975, df}; between table rows the row below (a wider interval), beyond 120 the normal 1.96."""
    return T975[max(k for k in T975 if k <= df)] if df <= 120 else 1.96


def ci(xs, single: bool = False) -> dict | None:
    """Mean and 95% t interval over seeds of the non-None values: {mean, lo, hi, n, per_seed}. With fewer than
    2 values: None, or with single=True (one value) the mean with lo = hi = None."""
    import math
    xs = [float(x) for x in xs if x is not None]
    if not xs or (len(xs) < 2 and not single):
        return None
    m = statistics.fmean(xs)
    if len(xs) < 2:
        return {"mean": m, "lo": None, "hi": None, "n": 1, "per_seed": xs}
    h = t975(len(xs) - 1) * statistics.stdev(xs) / math.sqrt(len(xs))
    return {"mean": m, "lo": m - h, "hi": m + h, "n": len(xs), "per_seed": xs}


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
