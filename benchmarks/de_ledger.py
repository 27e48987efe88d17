"""The ledger of benchmarks/data_efficiency.py: the evaluated numbers of every finished run, committed with the
results (benchmarks/results/data_efficiency_ledger.json), so that

- the benchmark spans sessions whose work dirs do not survive (a run in the ledger with the same settings is
  finished: it is not trained again), and
- `--report-only` regenerates every table and plot from committed files alone.

A run's entry holds what the report reads from its snapshots' scores (de_eval: a single model's curve, the
pool's ensembles, q0's per-cycle refitted prior, a distillation report), keyed by the call that made it, plus
its settings fingerprint (RunConfig.fingerprint without paths, and the prepared data's fingerprint), its
training process time and the git commit that trained it. A different setting misses the ledger and is
retrained. A run whose files another run still needs (an ablation reference feeding an ensemble distillation
that is not finished) counts as finished only while its files are on disk.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from benchmarks.common import ROOT, write_json
from q0ds.config import EXECUTION_ONLY     # keys that never change a trajectory (distill.teacher_mode, ...)

FORMAT = 1


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def merge_timing(a: dict, b: dict) -> dict:
    """Two copies of one run's job timings ({base: {"seconds", "attempts", "last_rc"}}): per base, the record
    holding more seconds (b's on a tie). Both add up the same base's attempts, and either can be behind: a work
    dir that did not survive, a job file an older version wrote without starting from the ledger's total, or a
    ledger entry made before the job's process exited."""
    out = dict(a)
    for base, rec in b.items():
        if rec["seconds"] >= out.get(base, {"seconds": -1.0})["seconds"]:
            out[base] = rec
    return out


class Ledger:
    def __init__(self, path, data_fingerprint: str):
        self.path = Path(path)
        self.data_fp = data_fingerprint
        self.doc = {"format": FORMAT, "runs": {}, "tuned": None, "sessions": []}
        if self.path.is_file():
            doc = json.loads(self.path.read_text())
            if doc.get("format") != FORMAT:
                raise SystemExit(f"{self.path}: ledger format {doc.get('format')!r}, this code reads {FORMAT}; "
                                 "move it away to start the benchmark afresh")
            self.doc.update(doc)

    def fingerprint(self, run) -> str:
        if run.kind == "distill":
            src = run.depends[0]
            settings = [o for o in run.info["overrides"] if not o.startswith("run_dir=")]    # not the path
            return f"distill:{self.fingerprint(src)}:k{run.info['k']}:{','.join(settings)}"
        return f"{run.cfg.fingerprint(exclude=EXECUTION_ONLY + ('data',))}:{self.data_fp[:16]}"

    def entry(self, run) -> dict | None:
        e = self.doc["runs"].get(run.name)
        return e if e is not None and e.get("fingerprint") == self.fingerprint(run) else None

    def has(self, run) -> bool:
        """The run finished (an entry recorded only partially, e.g. a pool's first members, does not count)."""
        e = self.entry(run)
        return e is not None and e.get("complete", True)

    def get(self, run, key: str):
        e = self.entry(run)
        return None if e is None else e["eval"].get(key)

    def put(self, run, key: str, value, timing: dict | None = None, complete: bool = True) -> None:
        e = self.entry(run)
        if e is None:
            e = self.doc["runs"][run.name] = {"fingerprint": self.fingerprint(run), "kind": run.kind,
                                              "commit": _commit(), "recorded_utc": _now(), "eval": {}}
        e["complete"] = complete or e.get("complete", False)
        e["eval"][key] = value
        if timing:
            e["timing"] = timing
        self.save()

    def timing(self, run) -> dict:
        e = self.entry(run)
        return (e or {}).get("timing") or {}

    def set_timing(self, run, timing: dict) -> None:
        """A job of a recorded run ended: its entry takes the job timing file's totals. (A run can be recorded
        before its process exits, e.g. when a report reads its finished files while a slot frees elsewhere, so
        the timing cannot be taken only when the entry is made.)"""
        e = self.entry(run)
        if e is not None and timing and e.get("timing") != timing:
            e["timing"] = timing
            self.save()

    def save(self) -> None:
        """Merged with the file under a lock: a `--report-only` beside a training benchmark loses no entry."""
        import fcntl
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if self.path.is_file():
                disk = json.loads(self.path.read_text())
                for name, e in disk.get("runs", {}).items():
                    mine = self.doc["runs"].get(name)
                    if mine is None:
                        self.doc["runs"][name] = e
                    elif mine.get("fingerprint") == e.get("fingerprint"):
                        mine["eval"] = {**e.get("eval", {}), **mine["eval"]}
                        if mine.get("timing") or e.get("timing"):
                            mine["timing"] = merge_timing(e.get("timing") or {}, mine.get("timing") or {})
                        mine["complete"] = mine.get("complete", True) or e.get("complete", True)
                self.doc["tuned"] = self.doc.get("tuned") or disk.get("tuned")
                seen = {(x["start"], x["end"]) for x in self.doc["sessions"]}
                self.doc["sessions"] = sorted(self.doc["sessions"] + [x for x in disk.get("sessions", [])
                                                                      if (x["start"], x["end"]) not in seen],
                                              key=lambda x: x["start"])
            self.doc["runs"] = dict(sorted(self.doc["runs"].items()))
            write_json(self.path, self.doc)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
