"""One writer per base: an exclusive `fcntl.flock` on <base dir>/writer.lock, held by rank 0 for the life of the
trainer process.

The kernel drops the lock when the process exits in any way (kill -9, OOM, node reboot of a local disk), so a
stale lock file never blocks a relaunch: the file stays, the lock does not. The file's content names the holder
(host, pid, start time) for the refusal message. flock works on local disks, on NFSv4 (Linux emulates it with
byte-range locks the server arbitrates), on GPFS, and on Lustre mounted with `-o flock`.

Fallback for filesystems without flock (Lustre `-o noflock`, some FUSE mounts; the kernel answers ENOLCK or
EOPNOTSUPP): the trainer stops with a message; set `Q0DS_LOCK=off` to train without the lock, and make sure
yourself that one trainer at a time writes a base (SLURM: one array task per base, `--dependency=singleton`).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = "writer.lock"


class LockError(RuntimeError):
    """Another process is writing this base, or the filesystem cannot lock; the message says what to do."""


class BaseLock:
    def __init__(self, directory):
        self.path = Path(directory) / LOCK_NAME
        self.fd = None
        if os.environ.get("Q0DS_LOCK", "").lower() == "off":
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise LockError(f"{self.path.parent} is already being trained by another process ({holder}); a second "
                            "writer would duplicate its metrics. Wait for it to finish or stop it, then relaunch "
                            "(a killed holder releases the lock by itself)") from None
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise LockError(f"the filesystem of {self.path} does not support flock ({e.strerror}); set "
                                "Q0DS_LOCK=off to train without the one-writer lock, and make sure only one "
                                "trainer runs per base") from None
            raise
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        self.fd = fd

    def release(self):
        if self.fd is not None:
            os.close(self.fd)          # closing the last descriptor releases the flock
            self.fd = None


def _holder(fd) -> str:
    try:
        h = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"host {h['host']}, pid {h['pid']}, started {h['started']}"
    except (ValueError, KeyError):
        return "holder unknown: it has not written its name yet"
