"""File modes of what q0ds writes: the usual umask-derived ones, so colleagues on a shared cluster can read
the prepared data and the population (issue 15, item 4).

Atomic writes go through private temp objects: tempfile.mkdtemp makes 0700 dirs, tempfile.mkstemp 0600 files,
and safetensors' save_file (its Rust serializer writes through its own temp file) leaves 0600 files, whatever
the umask. After such a write, `set_default_mode` gives the result the mode a plain open()/mkdir() would have:
0o666 & ~umask for files, 0o777 & ~umask for dirs.
"""
from __future__ import annotations

import errno
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
    import re
    from safetensors import SafetensorError
    from safetensors.torch import save_file
    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as e:          # a full disk: "I/O error: No space left on device (os error 28)"
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e
    set_default_mode(path)


# ---------------------------------------------------------------- temp files of atomic writes
# An atomic write goes through `.<name>.tmp-<host>-<pid>` next to its target. A writer killed by SIGKILL (or a
# node failure) leaves it behind; the next write of the same target removes the ones whose process is gone
# (same host, pid not alive) and any older than a day (another host's). Readers only open exact names.
STALE_SECONDS = 24 * 3600


def temp_name(path) -> Path:
    import socket
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def remove_stale_temps(path) -> list[Path]:
    """Remove leftover temp files of earlier atomic writes of PATH (module note); returns what was removed."""
    import socket
    import time
    path = Path(path)
    host, removed = socket.gethostname(), []
    try:
        candidates = list(path.parent.glob(f".{path.name}.tmp-*"))
    except OSError:
        return removed
    for tmp in candidates:
        owner, _, pid = tmp.name[len(f".{path.name}.tmp-"):].rpartition("-")
        try:
            stale = (owner == host and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid))
                     or time.time() - tmp.stat().st_mtime > STALE_SECONDS)
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def json_problem(path) -> str | None:
    """None if PATH is a file holding valid JSON, else what is wrong with it (one phrase)."""
    import json
    try:
        json.loads(Path(path).read_text())
    except FileNotFoundError:
        return "it is missing"
    except (ValueError, UnicodeDecodeError) as e:
        return f"it is not valid JSON: {e}"
    except OSError as e:
        return f"it cannot be read: {e.strerror}"
    return None


# ---------------------------------------------------------------- failed writes (disk full, quota, I/O errors)
# torch.save (DeepSpeed's TorchCheckpointEngine) reports a full disk as a RuntimeError without an errno:
# "basic_ios::clear: iostream error" or "[enforce fail at inline_container.cc:...] unexpected pos ..." (seen on
# a full tmpfs, tests/test_faults_disk.py); such a RuntimeError counts as a failed write.
_TORCH_WRITE_ERRORS = ("iostream error", "unexpected pos", "file write failed", "PytorchStreamWriter")
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class WriteFailed(OSError):
    """A write of q0ds output failed; the message names the file, the free space and what to do. An OSError
    (with the cause's errno), so code that handles a failed write handles this one too."""

    def __init__(self, message: str, path=None, cause: BaseException | None = None):
        super().__init__(message)
        self.path, self.cause = path, cause
        self.errno = getattr(cause, "errno", None)


def mount_point(path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _size(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def write_failure(path, exc: BaseException, intact: str = "") -> WriteFailed | None:
    """The one-line WriteFailed for a write of PATH that raised EXC, or None when EXC is not a failed write
    (then it is a bug and keeps its traceback). INTACT says what is still good (the caller knows)."""
    import shutil
    if isinstance(exc, WriteFailed):
        path, exc = exc.path, exc.cause
    code = getattr(exc, "errno", None)
    if not isinstance(exc, OSError) and not (isinstance(exc, RuntimeError)
                                             and any(s in str(exc) for s in _TORCH_WRITE_ERRORS)):
        return None
    fs = mount_point(path)
    try:
        du = shutil.disk_usage(fs)
        free, low = f"{_size(du.free)} free of {_size(du.total)} on {fs}", du.free < max(64 * 2**20, du.total // 100)
    except OSError:
        free, low = f"free space on {fs} unknown", False
    if code == errno.ENOSPC or (code is None and low):
        reason = "out of disk space" + ("" if code else f" ({str(exc).splitlines()[0][:100]})")
    elif code == errno.EDQUOT:
        reason = "disk quota exceeded"
    elif isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    else:
        reason = f"the write failed ({str(exc).splitlines()[0][:100]})"
    if code in _NOT_WRITABLE:
        advice = f"make {Path(path).parent} writable and relaunch"
    elif code == errno.EDQUOT:
        advice = f"free space in your quota on {fs} (or raise it) and relaunch"
    else:
        advice = f"free space on {fs} and relaunch"
    return WriteFailed(f"cannot write {path}: {reason} ({free}); {advice}" + (f"; {intact}" if intact else ""),
                       path, exc)
