"""Issue 22, faults: a full disk during a 2-rank checkpoint (a real small filesystem: a tmpfs mounted in a private
mount namespace, so nothing outside the test sees it and the real disk is never filled), a relaunch while it
is still full, and the relaunch after space is freed; fit-prior on a full disk; ranks that agree on one
rank's start-up failure (a refused lock, a read-only run dir)."""
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_launcher

CYCLES = ["schedule.cycles=2", "schedule.cycle_steps=2", "train.ckpt_every=100", "distill.enabled=false"]
MiB = 2**20


def _unshare_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    p = subprocess.run(["unshare", "--mount", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt && umount /mnt"],
                       capture_output=True)
    return p.returncode == 0


needs_tmpfs = pytest.mark.skipif(not _unshare_ok(), reason="cannot mount a tmpfs in a private mount namespace")


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot_digests(run) -> dict:
    return {str(p.relative_to(run)): sha(p) for p in sorted(Path(run).glob("bases/*/snapshots/*/*.safetensors"))}


def disk_usage(root) -> int:
    """Bytes ROOT takes on a filesystem with 4 KiB pages (tmpfs charges whole pages)."""
    return sum(-(-p.stat().st_size // 4096) * 4096 for p in Path(root).rglob("*") if p.is_file())


def launcher_cmd(config, port) -> str:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return f'"{deepspeed}" --num_gpus 2 --master_port {port} launchers/train.py --config "{config}" --base 0'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_tmpfs(mount: Path, size: int, script: str, timeout=1500) -> subprocess.CompletedProcess:
    """Run SCRIPT (sh) with a SIZE-byte tmpfs mounted at MOUNT in a private mount namespace."""
    mount.mkdir(parents=True, exist_ok=True)
    full = f'set -u; mount -t tmpfs -o size={size} tmpfs "{mount}" || exit 99\n{script}'
    return subprocess.run(["unshare", "--mount", "sh", "-c", full], cwd=ROOT, text=True, capture_output=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, embedded_data):
    """An undisturbed 2-rank run of 2 cycles (snapshots at steps 2 and 4, a checkpoint at each)."""
    from q0ds.config import load_config, save_config
    from q0ds.presets import preset_config
    root = tmp_path_factory.mktemp("disk")
    cfg = load_config(None, CYCLES, base=preset_config("tiny", data=str(embedded_data), run_dir=str(root / "ref")))
    save_config(cfg, root / "ref.json")
    run_launcher(root / "ref.json", 0)
    return root, Path(cfg.run_dir)


def error_lines(text: str) -> list[str]:
    """`q0ds train (rank R): error: ...` lines (the launcher may interleave the ranks' output mid-line)."""
    import re
    return [m.group(0).rstrip() for m in
            re.finditer(r"q0ds train \(rank \d+\): error: (?:(?!q0ds train \(rank)[^\n])*", text)]


@needs_tmpfs
def test_disk_full_during_checkpoint_then_relaunch_finishes_identically(reference, embedded_data):
    """Before: both ranks ended in raw tracebacks (`basic_ios::clear: iostream error`, `inline_container.cc ...
    unexpected pos`), an incomplete checkpoint dir stayed, and a relaunch on the still-full disk tracebacked
    again. After: on a tmpfs that fills during the step-4 checkpoint, both ranks print the same one line (path,
    free space, what to do, the intact checkpoint), exit 2; no step-4 dir is left; step 2 and snapshot 0 are
    intact; a relaunch while still full is the same clean error; after the filler is deleted the relaunch
    resumes from step 2 and its snapshots are bit-identical to the undisturbed run's."""
    from q0ds.config import load_config, save_config
    from q0ds.presets import preset_config
    root, ref = reference
    ckpts = ref / "bases/base-00/checkpoints"
    last = disk_usage(ckpts / "step-00000004")
    needed = disk_usage(ref) - last + last // 2           # everything up to half of the last checkpoint
    fs = root / "fs"
    cfg = load_config(None, CYCLES, base=preset_config("tiny", data=str(embedded_data), run_dir=str(fs / "run")))
    save_config(cfg, root / "full.json")
    size = 64 * MiB
    filler = size - needed - 8 * 4096                     # the dirs' own pages
    out = root / "after"
    script = f"""
dd if=/dev/zero of="{fs}/filler" bs=4096 count={filler // 4096} status=none
{launcher_cmd(root / "full.json", free_port())} > "{root}/l1.out" 2> "{root}/l1.err"; echo $? > "{root}/rc1"
mkdir -p "{out}/first" && cp -a "{fs}/run/." "{out}/first/"
{launcher_cmd(root / "full.json", free_port())} > "{root}/l2.out" 2> "{root}/l2.err"; echo $? > "{root}/rc2"
rm "{fs}/filler"
{launcher_cmd(root / "full.json", free_port())} > "{root}/l3.out" 2> "{root}/l3.err"; echo $? > "{root}/rc3"
mkdir -p "{out}/final" && cp -a "{fs}/run/." "{out}/final/"
"""
    p = in_tmpfs(fs, size, script)
    assert p.returncode == 0, p.stderr[-3000:]
    logs = {i: (root / f"l{i}.out").read_text() + (root / f"l{i}.err").read_text() for i in (1, 2, 3)}
    rcs = {i: int((root / f"rc{i}").read_text()) for i in (1, 2, 3)}
    for i in (1, 2):                                      # the full-disk launch, and the relaunch still full
        lines = error_lines(logs[i])
        assert rcs[i] == 2 and "Traceback" not in logs[i], logs[i][-6000:]
        assert {l.split(": error: ")[0] for l in lines} == {"q0ds train (rank 0)", "q0ds train (rank 1)"}, lines
        msgs = {l.split(": error: ", 1)[1] for l in lines}
        assert len(msgs) == 1, lines                       # every rank alike
        msg = msgs.pop()
        assert f"cannot write {fs / 'run'}" in msg and "out of disk space" in msg and " free of 64.0 MiB on " in msg
        assert f"free space on {fs} and relaunch" in msg and "checkpoint step-00000002" in msg, msg
        assert "could not be loaded" not in logs[i] and "delete that dir" not in logs[i]
    first = out / "first/bases/base-00"
    assert sorted(d.name for d in (first / "checkpoints").glob("step-*")) == ["step-00000002"], logs[1][-3000:]
    from q0ds.snapshot import verify
    verify(first / "snapshots/cycle-0000")
    ref_digests = snapshot_digests(ref)
    assert {k: v for k, v in snapshot_digests(out / "first").items() if "cycle-0000" in k} == \
        {k: v for k, v in ref_digests.items() if "cycle-0000" in k}
    assert rcs[3] == 0 and "resumed base 0 from step-00000002" in logs[3], logs[3][-6000:]
    assert snapshot_digests(out / "final") == ref_digests
    final = out / "final/bases/base-00"
    steps = [json.loads(l)["step"] for l in (final / "metrics.jsonl").read_text().splitlines() if '"step"' in l
             and '"event"' not in l]
    assert steps == [1, 2, 3, 4]                          # no torn or duplicated metrics line
    assert not list(final.rglob(".*tmp*")), list(final.rglob(".*tmp*"))


@needs_tmpfs
def test_fit_prior_on_a_full_disk(reference, tmp_path):
    """prior.json on a full filesystem (eval.json, report files and config.json take the same atomic write): one line naming the file, the free space and the fix, exit
    2, no temp file left; the run's snapshots are untouched."""
    _, ref = reference
    fs = tmp_path / "fs"
    size = disk_usage(ref / "bases/base-00/snapshots") + 64 * 4096
    script = f"""
mkdir -p "{fs}/run/bases/base-00" && cp -a "{ref}/config.json" "{fs}/run/" && cp -a "{ref}/bases/base-00/snapshots" "{fs}/run/bases/base-00/"
dd if=/dev/zero of="{fs}/filler" bs=4096 status=none 2>/dev/null
"{sys.executable}" -m q0ds.cli fit-prior --run "{fs}/run" > "{tmp_path}/p.out" 2> "{tmp_path}/p.err"; echo $? > "{tmp_path}/rc"
ls -a "{fs}/run" > "{tmp_path}/ls"
"""
    p = in_tmpfs(fs, size, script, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    err = (tmp_path / "p.err").read_text()
    lines = [l for l in err.splitlines() if l.startswith("q0ds fit-prior: error:")]
    assert int((tmp_path / "rc").read_text()) == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"cannot write {fs / 'run' / 'prior.json'}: out of disk space" in lines[0]
    assert f"free space on {fs} and relaunch" in lines[0], lines[0]
    assert (tmp_path / "ls").read_text().split() == [".", "..", "bases", "config.json"]


def test_write_failure_classifies_torch_save_errors(tmp_path):
    """torch.save's full-disk RuntimeErrors (no errno) count as failed writes; a RuntimeError that is not about
    writing stays a bug."""
    import errno
    from q0ds.files import WriteFailed, write_failure
    e = write_failure(tmp_path / "x", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"))
    assert isinstance(e, WriteFailed) and f"cannot write {tmp_path / 'x'}: " in str(e) and "free of" in str(e)
    assert write_failure(tmp_path / "x", RuntimeError("shape mismatch")) is None
    q = write_failure(tmp_path / "x", OSError(errno.EDQUOT, "Disk quota exceeded"), "all good")
    assert "disk quota exceeded" in str(q) and "quota" in str(q).split(";")[1] and str(q).endswith("; all good")
    ro = write_failure(tmp_path / "x", OSError(errno.EROFS, "Read-only file system"))
    assert f"make {tmp_path} writable" in str(ro)


def _rank_lines(p) -> dict:
    out = p.stdout + p.stderr
    return {l.split(": error: ")[0]: l.split(": error: ", 1)[1] for l in error_lines(out)}


def test_refused_lock_stops_every_rank_with_the_same_message(make_config):
    """Before: with the base locked by another trainer, rank 0 printed the refusal but rank 1 went on and died
    on a collective ('Connection closed by peer'). After: both ranks print the refusal, exit 2, no traceback."""
    from test_runlock import hold
    path, cfg = make_config(*CYCLES)
    base = Path(cfg.run_dir) / "bases/base-00"
    base.mkdir(parents=True)
    holder = hold(base)
    try:
        p = run_launcher(path, 0, check=False)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lines = _rank_lines(p)
    assert p.returncode == 2 and "Traceback" not in p.stdout + p.stderr, (p.stdout + p.stderr)[-6000:]
    assert set(lines) == {"q0ds train (rank 0)", "q0ds train (rank 1)"} and len(set(lines.values())) == 1, lines
    assert f"pid {holder.pid}" in lines["q0ds train (rank 0)"]
    assert "Connection closed" not in p.stdout + p.stderr


def test_read_only_run_dir_with_a_checkpoint_blames_no_file(reference, tmp_path):
    """Before: with a read-only run dir that holds a checkpoint, rank 1 blamed the (healthy) checkpoint: 'could
    not be loaded ... Connection closed by peer ... delete that dir'. After: both ranks print the read-only
    message only."""
    from test_user_faults import _read_only_cmd
    _, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "bases/base-00/done.json").unlink(missing_ok=True)
    for d in (run / "bases/base-00/checkpoints").glob("step-00000004"):
        shutil.rmtree(d)
    cfg = json.loads((run / "config.json").read_text())
    cfg["run_dir"] = str(run)
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    (run / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    deepspeed = Path(sys.executable).with_name("deepspeed")
    cmd = _read_only_cmd(run, [str(deepspeed), "--num_gpus", "2", "--master_port", str(free_port()),
                               "launchers/train.py", "--config", str(tmp_path / "c.json"), "--base", "0"])
    p = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=900,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if os.geteuid() != 0:
        run.chmod(0o755)
    lines = _rank_lines(p)
    out = p.stdout + p.stderr
    assert p.returncode == 2 and "Traceback" not in out, out[-6000:]
    assert set(lines) == {"q0ds train (rank 0)", "q0ds train (rank 1)"} and len(set(lines.values())) == 1, lines
    assert "writable" in lines["q0ds train (rank 0)"]
    assert "could not be loaded" not in out and "delete that dir" not in out


def test_resume_drops_a_torn_metrics_line(tmp_path):
    """A metrics line cut short by a full disk (or a kill) used to make the resume's truncate_metrics raise
    JSONDecodeError; now the torn line is dropped with the records past the checkpoint."""
    from q0ds.monitor import truncate_metrics
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(m, 2)
    assert m.read_text() == '{"step": 1}\n{"step": 2}\n'
