"""Regenerate the key table of docs/configuration.md from q0ds/config.py's dataclasses.

    python docs/gen_config_reference.py           # rewrite the block between the config-keys markers
    python docs/gen_config_reference.py --check   # exit 1 if the block is stale (tests/test_docs.py does this)

Each key's meaning is its inline comment in config.py; keys without one take theirs from MEANINGS below.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from q0ds.config import RunConfig  # noqa: E402

DOC = ROOT / "docs" / "configuration.md"
BEGIN, END = "<!-- config-keys -->", "<!-- /config-keys -->"

# Keys whose field in config.py carries no inline comment.
MEANINGS = {
    "run_dir": "run directory: resolved config, bases/, prior.json, eval.json, report ([cluster.md](cluster.md#run-directory))",
    "seed": "run seed; each base derives its own streams from (seed, base): initialisation, data order, dropout, perturbation noise",
    "bases": "number of q0 trajectories (bases) in the population",
    "ds_config": "DeepSpeed engine config (HJSON); q0ds fills in the batch keys, clipping and optimizer hyperparameters",
    "train.seq_len": "tokens per training sequence",
    "train.log_every": "optimizer steps between step records in metrics.jsonl",
    "train.keep_ckpts": "resume checkpoints kept per base (older ones are deleted after a complete new one)",
    "optim.betas": "AdamW betas (Muon's auxiliary AdamW too)",
    "optim.eps": "AdamW epsilon",
    "optim.muon_momentum": "Muon momentum",
    "schedule.cycles": "cycles per base; one snapshot at the end of each",
    "schedule.lr_floor": "LR multiplier at the bottom of each sawtooth cycle (peak = 1)",
    "schedule.wd_floor": "WD multiplier at the LR peak (WD runs in anti-phase: 1 at the LR floor)",
    "schedule.warmup_steps": "linear LR warmup steps at the start of the run",
    "distill.enabled": "chain distillation on/off (off: plain CE in every cycle)",
    "distill.alpha": "weight of the KL term: loss = (1 - alpha) CE + alpha T^2 KL",
    "distill.temperature": "softmax temperature T of teacher and student in the KL term",
    "perturb.enabled": "perturb the student's weights after each cycle end (not after the last)",
    "perturb.end": "noise scale x std(param) at the end of the cosine (the last cycle)",
    "monitor.wandb_project": "W&B project name",
}


def _comments(cls) -> dict:
    """field name -> its inline comment in the class source."""
    out = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+):\s*[^=]+=.*?#\s*(.+)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _default(f):
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return json.dumps(value)


def config_keys(cls=RunConfig, prefix="") -> list:
    """[(dotted key, type name, default as JSON, meaning)] for every leaf key, in declaration order."""
    rows, comments = [], _comments(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            rows += config_keys(f.default_factory, key + ".")
            continue
        tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append((key, tp.replace("typing.", ""), _default(f), comments.get(f.name) or MEANINGS.get(key, "")))
    return rows


def _cell(text: str) -> str:
    """A table cell: `|` would split it; `<` outside code spans would start an HTML tag."""
    parts = text.replace("|", "/").split("`")
    return "`".join(p if i % 2 else p.replace("<", "&lt;") for i, p in enumerate(parts))


def render() -> str:
    lines = [BEGIN, "| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, meaning in config_keys():
        lines.append(f"| `{key}` | {tp} | `{default}` | {_cell(meaning)} |")
    lines.append(END)
    return "\n".join(lines)


def current_block(text: str) -> str:
    start, end = text.index(BEGIN), text.index(END) + len(END)
    return text[start:end]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true")
    a = p.parse_args()
    text = DOC.read_text()
    new = render()
    if a.check:
        if current_block(text) != new:
            print(f"{DOC} is stale: run `python docs/gen_config_reference.py`", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text.replace(current_block(text), new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
