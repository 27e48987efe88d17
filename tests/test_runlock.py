"""One writer per base (q0ds/runlock.py): a second trainer is refused naming the holder; a killed holder's lock
is released by the kernel."""
import os
import signal
import socket
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli

HOLD = "import sys, time; from q0ds.runlock import BaseLock; l = BaseLock(sys.argv[1]); print('locked', flush=True); time.sleep(600)"


def hold(directory):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(directory)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.stdout.readline().strip() == "locked"
    return p


def test_second_writer_refused_then_lock_released_by_kill(tmp_path):
    from q0ds.runlock import BaseLock, LockError
    holder = hold(tmp_path)
    try:
        with pytest.raises(LockError) as e:
            BaseLock(tmp_path)
        msg = str(e.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "started 20" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = BaseLock(tmp_path)                     # kill -9 released it; the stale file does not block
    assert f'"pid": {os.getpid()}' in (tmp_path / "writer.lock").read_text()
    lock.release()
    BaseLock(tmp_path).release()


def test_lock_off_fallback(tmp_path, monkeypatch):
    from q0ds.runlock import BaseLock
    a = BaseLock(tmp_path)
    monkeypatch.setenv("Q0DS_LOCK", "off")
    b = BaseLock(tmp_path)                        # documented escape hatch for filesystems without flock
    assert b.fd is None
    a.release()


def test_second_trainer_refused_before_writing(make_config):
    from pathlib import Path
    from q0ds.runlock import BaseLock
    path, cfg = make_config()
    base = Path(cfg.run_dir) / "bases/base-00"
    base.mkdir(parents=True)
    lock = BaseLock(base)                         # "the first trainer"
    try:
        p = run_cli("train", "--config", path, "--base", "0", check=False, timeout=300)
    finally:
        lock.release()
    assert p.returncode == 2, p.stderr[-2000:]
    assert f"pid {os.getpid()}" in p.stderr and "already being trained" in p.stderr
    assert sorted(os.listdir(base)) == ["writer.lock"] and not (Path(cfg.run_dir) / "config.json").exists()
