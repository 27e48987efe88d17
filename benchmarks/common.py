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
