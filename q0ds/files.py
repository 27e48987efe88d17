"""File modes of what q0ds writes: the usual umask-derived ones, so colleagues on a shared cluster can read
the prepared data and the population (issue 15, item 4).

Atomic writes go through private temp objects: tempfile.mkdtemp makes 0700 dirs, tempfile.mkstemp 0600 files,
and safetensors' save_file (its Rust serializer writes through its own temp file) leaves 0600 files, whatever
the umask. After such a write, `set_default_mode` gives the result the mode a plain open()/mkdir() would have:
0o666 & ~umask for files, 0o777 & ~umask for dirs.
"""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status, kernel >= 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)          # elsewhere: the classic set-and-restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def default_mode(directory: bool = False) -> int:
    return (0o777 if directory else 0o666) & ~current_umask()


def set_default_mode(path) -> None:
    """chmod PATH (not recursively) to what open()/mkdir() would have created under the current umask."""
    os.chmod(path, default_mode(os.path.isdir(path)))


def save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file with the umask-derived mode instead of its temp file's 0600."""
    from safetensors.torch import save_file
    save_file(tensors, path, metadata=metadata)
    set_default_mode(path)
