"""Per-test durations of the pytest suite, before and after a change, from pytest's junit XML.

    # measure one side (runs pytest on the given files from --root, samples the load average meanwhile)
    python benchmarks/suite_durations.py measure --label before --root /tmp/old-checkout tests/test_x.py
    python benchmarks/suite_durations.py measure --label after tests/test_x.py
    # two sides measured at the same time write separate files (--out), then
    python benchmarks/suite_durations.py merge /tmp/before.json /tmp/after.json
    # or record an existing junit XML (e.g. of a full idle `make test PYTEST_ARGS=--junitxml=suite.xml`)
    python benchmarks/suite_durations.py parse --label after --workers 2 suite.xml
    python benchmarks/suite_durations.py table          # the runs' wall times and the slowest files, markdown
    python benchmarks/suite_durations.py table --docs   # ... written into docs/test-suite.md (--check: compare)

Each call merges into benchmarks/results/suite_durations.json: per test id `before_s`, `after_s` (junit
`time`: setup + call + teardown, so a shared fixture's cost lands on the first test that uses it) and `load`
(the mean 1-minute load average while that side ran, sampled every 5 s; null for `parse`), plus per-file totals.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "suite_durations.json"


def parse_junit(path) -> dict[str, dict]:
    """{test id: {"s": seconds, "outcome": passed|failed|skipped}} from a pytest junit XML file."""
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        cls, name = case.get("classname", ""), case.get("name", "")
        tid = f"{cls.replace('.', '/')}.py::{name}" if cls else name
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
        out[tid] = {"s": round(float(case.get("time", 0.0)), 2), "outcome": outcome}
    return out


def run_pytest(files, root: Path, xml: Path, extra=()) -> tuple[int, list[float]]:
    """pytest on `files` in `root` with its own code first on PYTHONPATH; returns (exit code, load samples)."""
    env = dict(os.environ, PYTHONPATH=str(root), DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    samples, stop = [], threading.Event()

    def sample():
        while not stop.is_set():
            samples.append(os.getloadavg()[0])
            stop.wait(5.0)
    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                                *extra, *files], cwd=root, env=env)
    finally:
        stop.set()
        t.join()
    return code, samples


def suite_wall_s(path) -> float | None:
    """The whole run's wall time from a junit XML (the testsuite's `time`), None if absent."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    return None if suite is None or suite.get("time") is None else round(float(suite.get("time")), 1)


def merge(label: str, results: dict, load, source: str, out: Path = OUT, rows: dict | None = None,
          runs: list | None = None, extra: dict | None = None) -> dict:
    """Merge one side's results (or, with `rows`/`runs`, another results file's) into `out`; refresh the totals."""
    doc = json.loads(out.read_text()) if out.is_file() else {"tests": {}, "files": {}, "runs": []}
    for tid, r in results.items():
        row = doc["tests"].setdefault(tid, {})
        row[f"{label}_s"] = r["s"]
        row[f"{label}_outcome"] = r["outcome"]
        row.setdefault("load", {})[label] = load
    for tid, r in (rows or {}).items():
        row = doc["tests"].setdefault(tid, {})
        row.update({k: v for k, v in r.items() if k != "load"})
        row.setdefault("load", {}).update(r.get("load", {}))
    files: dict = {}
    for tid, row in doc["tests"].items():
        f = files.setdefault(tid.split("::")[0], {})
        for side in ("before", "after"):
            if f"{side}_s" in row:
                f[f"{side}_s"] = round(f.get(f"{side}_s", 0.0) + row[f"{side}_s"], 2)
    doc["files"] = dict(sorted(files.items()))
    doc["tests"] = dict(sorted(doc["tests"].items()))
    if runs is not None:
        doc["runs"].extend(runs)
    else:
        doc["runs"].append({"label": label, "source": source, "tests": len(results), "load": load,
                            "at": time.strftime("%Y-%m-%dT%H:%M:%S"), **(extra or {})})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return doc


def table(doc: dict, top: int = 15) -> str:
    """Markdown: the runs (wall time, workers) and the `top` files by their before-time, before and after."""
    lines = ["| run | workers | tests | wall | note |", "|---|---|---|---|---|"]
    for r in doc["runs"]:
        if r.get("wall_s"):
            lines.append(f"| {r['label']} | {r.get('workers', 0) or 1} | {r['tests']} | "
                         f"{r['wall_s'] / 60:.1f} min | {r.get('note', '')} |")
    lines += ["", "| file | before (s) | after (s) |", "|---|---|---|"]
    files = sorted(doc["files"].items(), key=lambda kv: -(kv[1].get("before_s") or 0))
    for name, t in files[:top]:
        fmt = lambda v: "" if v is None else f"{v:.0f}"
        lines.append(f"| `{name}` | {fmt(t.get('before_s'))} | {fmt(t.get('after_s'))} |")
    return "\n".join(lines) + "\n"


DOCS = ROOT / "docs" / "test-suite.md"
BEGIN, END = "<!-- suite-durations -->", "<!-- /suite-durations -->"


def docs_with_table(text: str, tab: str) -> str:
    """`text` (docs/test-suite.md) with the block between BEGIN and END replaced by `tab`."""
    head, sep, rest = text.partition(BEGIN)
    _, sep2, tail = rest.partition(END)
    if not (sep and sep2):
        raise SystemExit(f"{DOCS}: the markers {BEGIN} ... {END} are missing; put them where the table goes")
    return f"{head}{BEGIN}\n{tab}{END}{tail}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure", help="run pytest on test files and record their durations")
    m.add_argument("--label", choices=("before", "after"), required=True)
    m.add_argument("--root", default=str(ROOT), help="checkout whose tests/ and q0ds/ are run (default: this one)")
    m.add_argument("-k", default=None, help="pytest -k expression")
    m.add_argument("files", nargs="+")
    p = sub.add_parser("parse", help="record the durations of an existing junit XML")
    p.add_argument("--label", choices=("before", "after"), required=True)
    p.add_argument("--load", type=float, default=None, help="the load average of that run, if known")
    p.add_argument("--workers", type=int, default=0, help="pytest-xdist workers of that run (0: one process)")
    p.add_argument("--note", default="", help="what was measured (commit, machine state)")
    p.add_argument("xml")
    t = sub.add_parser("table", help="print the runs and the slowest files as markdown")
    t.add_argument("--docs", action="store_true", help=f"write it into {DOCS.relative_to(ROOT)}")
    t.add_argument("--check", action="store_true", help=f"exit 1 if {DOCS.relative_to(ROOT)} is not current")
    j = sub.add_parser("merge", help="merge other results files (e.g. sides measured at the same time) into --out")
    j.add_argument("files", nargs="+")
    for s in (m, p, j, sub.choices["table"]):
        s.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    if a.cmd == "table":
        tab = table(json.loads(Path(a.out).read_text()))
        if not (a.docs or a.check):
            print(tab, end="")
            return 0
        text = DOCS.read_text()
        new = docs_with_table(text, tab)
        if a.check:
            if new != text:
                print(f"{DOCS} is not current: run `python benchmarks/suite_durations.py table --docs`", file=sys.stderr)
                return 1
            return 0
        DOCS.write_text(new)
        print(f"table -> {DOCS}")
        return 0
    if a.cmd == "merge":
        for f in a.files:
            other = json.loads(Path(f).read_text())
            merge("", {}, None, f, Path(a.out), rows=other["tests"], runs=other["runs"])
        print(f"merged {len(a.files)} file(s) -> {a.out}")
        return 0
    if a.cmd == "parse":
        res = parse_junit(a.xml)
        merge(a.label, res, a.load, a.xml, Path(a.out),
              extra={"wall_s": suite_wall_s(a.xml), "workers": a.workers, "note": a.note})
        print(f"{len(res)} tests from {a.xml} -> {a.out}")
        return 0
    root = Path(a.root).resolve()
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d) / "junit.xml"
        code, samples = run_pytest(a.files, root, xml, ["-k", a.k] if a.k else [])
        if not xml.is_file():
            print(f"pytest wrote no junit XML (exit {code})", file=sys.stderr)
            return 2
        res = parse_junit(xml)
    load = round(sum(samples) / len(samples), 2) if samples else None
    merge(a.label, res, load, f"{root} {' '.join(a.files)}", Path(a.out))
    total = sum(r["s"] for r in res.values())
    print(f"{a.label}: {len(res)} tests, {total:.0f} s, mean load {load} (pytest exit {code}) -> {a.out}")
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
