"""Optional dependencies (setup.py extras): a missing one is one line naming the extra, exit 2, no traceback.

A package is made "not installed" by a sitecustomize.py on PYTHONPATH that sets sys.modules[name] = None
(import then raises ImportError, as for an absent package), so the ranks the launcher starts see it too.
"""
import os
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_cli, run_launcher


def _env_without(tmp_path, *modules) -> dict:
    site = tmp_path / "site_without"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _one_line(stderr: str, prefix: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.splitlines() if l.startswith(prefix)]
    assert len(lines) == 1, stderr
    return lines[0]


def test_lm_eval_missing(tmp_path):
    p = run_cli("lm-eval", "--run", tmp_path, "--tasks", "q0ds_mc", env=_env_without(tmp_path, "lm_eval"), check=False)
    assert p.returncode == 2, p.stderr
    assert "q0ds lm-eval needs `pip install q0ds[eval]`" in _one_line(p.stderr, "q0ds lm-eval: error:")


def test_datasets_missing(tmp_path):
    doc = tmp_path / "corpus.txt"
    doc.write_text("one paragraph\n\nanother\n")
    p = run_cli("prepare", "--input", doc, "--out", tmp_path / "prepared", env=_env_without(tmp_path, "datasets"),
                check=False)
    assert p.returncode == 2, p.stderr
    assert f"reading {doc} needs `pip install q0ds[data]`" in _one_line(p.stderr, "q0ds prepare: error:")
    assert not (tmp_path / "prepared").exists()


@pytest.mark.parametrize("blocked,flag", [("tensorboard", "monitor.tensorboard=true"), ("wandb", "monitor.wandb=true")])
def test_monitor_sink_missing(monkeypatch, blocked, flag):
    from q0ds.compat import MissingExtra
    from q0ds.config import MonitorConfig
    from q0ds.errors import user_errors
    from q0ds.monitor import check_sinks
    monkeypatch.setitem(sys.modules, blocked, None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    mcfg = MonitorConfig(**{flag.split("=")[0].split(".")[1]: True})
    with pytest.raises(MissingExtra, match=rf"{flag} needs `pip install q0ds\[monitor\]`") as e:
        check_sinks(mcfg)
    assert isinstance(e.value, user_errors())
    check_sinks(MonitorConfig())                       # nothing asked for: nothing imported


def test_train_without_tensorboard_every_rank(make_config, tmp_path):
    """On both ranks, before any engine is built (Monitor itself runs on rank 0 only, after the build)."""
    path, cfg = make_config("schedule.cycles=1", "schedule.cycle_steps=2", "monitor.tensorboard=true")
    p = run_launcher(path, 0, ranks=2, env=_env_without(tmp_path, "tensorboard"), check=False)
    assert p.returncode != 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "Traceback" not in out, out[-3000:]
    # the launcher relays both ranks' stderr; two ranks' lines can land on one output line, so search, not split
    import re
    ranks = re.findall(r"q0ds train \(rank (\d)\): error: monitor\.tensorboard=true needs `pip install q0ds\[monitor\]`",
                       out)
    assert sorted(ranks) == ["0", "1"], out[-3000:]
    assert not (Path(cfg.run_dir) / "bases").exists()
