"""Monitoring: the trainer's records fanned out to metrics.jsonl, TensorBoard and Weights & Biases.

    mon = Monitor(base_dir, cfg.monitor, name="base-00", config=cfg.to_dict(), resume_step=120)
    mon.log({"step": 121, "loss": 3.2, "lr_matrix": 1e-3, ...})      # a step record
    mon.log({"event": "snapshot", "step": 150, "val_loss": 3.4, "path": "..."})
    mon.close()

Only rank 0 builds a Monitor (the trainer calls `log` on rank 0 only). Every numeric (and boolean) key of a
record except `step` becomes a scalar: step records under `train/<key>`, events under `<event>/<key>`, all at
global step `step`; strings (paths) stay in metrics.jsonl only. `monitor.tensorboard` / `monitor.wandb` are
run-config switches; W&B defaults to offline mode (no network; `wandb sync DIR` uploads later).

A resume never duplicates points. metrics.jsonl is cut back to the checkpoint's step (the resumed run re-logs the
rest identically). TensorBoard gets the library's own mechanism: `SummaryWriter(purge_step=resume_step + 1)`
writes a SessionLog.START that makes readers (EventAccumulator, the TensorBoard UI) drop older points at steps
> resume_step. W&B cannot purge points, so the resumed W&B run (same run id) re-logs from resume_step + 1 but
skips the steps W&B already holds: offline, the history rows persisted in the earlier offline-run files of this
id (read back with `wandb_history`); online, W&B's own resume (it ignores steps below the run's current step).
Those points carry the same values (resume is exact). Limitation: wandb-core buffers its offline file, so a
SIGKILLed process can lose the W&B points it had not yet written (a graceful pre-emption loses none);
metrics.jsonl and TensorBoard are complete in every case.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path

from .compat import require
from .config import atomic_write_text

METRICS = "metrics.jsonl"


def scalars(rec: dict) -> dict:
    """The numeric keys of a record under their TensorBoard/W&B tag; `step`, strings and None are left out."""
    prefix = rec.get("event", "train")
    out = {}
    for k, v in rec.items():
        if k in ("step", "event") or v is None or isinstance(v, str):
            continue
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, (int, float)) and math.isfinite(v):
            out[f"{prefix}/{k}"] = float(v)
    return out


def wandb_history(run_file: Path) -> list[dict]:
    """History rows ({"_step": s, tag: value}) of an offline W&B run file. The format is wandb-core's LevelDB log
    framing (wandb 0.31 has no Python reader): a 7-byte header ":W&B" + magic + version, 32 KiB blocks, records
    with a crc32/length/type header (1 full, 2 first, 3 middle, 4 last) whose payloads are wandb_internal_pb2
    Records. A file cut short by a kill ends at its last whole record."""
    import struct
    pb = require("wandb.proto.wandb_internal_pb2", "monitor", "reading a W&B run file")
    data = Path(run_file).read_bytes()
    if data[:4] != b":W&B":
        return []
    rows, buf, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:               # block trailer too short for a header: skip to the next block
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (kind == 0 and length == 0) or pos + 7 + length > len(data):
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(buf)
            buf = b""
            if r.WhichOneof("record_type") == "history":
                rows.append({"_step": r.history.step.num, **{i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                                            for i in r.history.item}})
    return rows


def _record(line: str):
    """A metrics.jsonl line as a dict; None for a blank or torn line (a write cut short by a full disk/kill)."""
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def truncate_metrics(path: Path, step: int):
    """Drop records past `step` (the checkpoint being resumed), and torn lines: the resumed run re-logs them
    identically."""
    if path.is_file():
        keep = [l for l in path.read_text().splitlines() if _record(l) is not None and _record(l).get("step", 0) <= step]
        atomic_write_text(path, "".join(l + "\n" for l in keep))


class Monitor:
    def __init__(self, out_dir: Path, mcfg, name: str, config: dict | None = None, resume_step: int | None = None,
                 jsonl: bool = True):
        self.dir = Path(out_dir)
        self.jsonl = self.dir / METRICS if jsonl else None
        self.skip_until = 0
        if self.jsonl is not None and resume_step is not None:
            truncate_metrics(self.jsonl, resume_step)
        self.tb = self.wb = None
        if mcfg.tensorboard:
            SummaryWriter = _summary_writer()
            self.tb = SummaryWriter(str(self.dir / "tensorboard"),
                                    purge_step=None if resume_step is None else resume_step + 1)
        if mcfg.wandb:
            self.skip_until = max((r["_step"] for f in sorted(self.dir.glob("wandb/offline-run-*/run-*.wandb"))
                                   for r in wandb_history(f)), default=0)
            self.wb = _wandb_run(self.dir, mcfg, name, config)

    def log(self, rec: dict):
        if self.jsonl is not None:
            with open(self.jsonl, "a") as f:
                f.write(json.dumps(rec) + "\n")
        step = int(rec.get("step", 0))
        values = scalars(rec)
        if self.tb is not None:
            for tag, v in values.items():
                self.tb.add_scalar(tag, v, global_step=step)
            self.tb.flush()              # a killed run loses nothing it logged before its checkpoint
        if self.wb is not None and step > self.skip_until and values:
            self.wb.log(values, step=step)

    def close(self):
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wb is not None:
            self.wb.finish()
            self.wb = None


def check_sinks(mcfg):
    """MissingExtra now, on every rank, if a sink the config asks for is not installed (Monitor runs on rank 0 only,
    after the engines are built)."""
    if mcfg.tensorboard:
        _summary_writer()
    if mcfg.wandb:
        require("wandb", "monitor", "monitor.wandb=true")


def _summary_writer():
    """torch.utils.tensorboard.SummaryWriter (it raises ImportError when the tensorboard package is missing)."""
    return require("torch.utils.tensorboard", "monitor", "monitor.tensorboard=true").SummaryWriter


def _wandb_run(out_dir: Path, mcfg, name: str, config: dict | None):
    """One W&B run per base, with an id kept in <dir>/wandb_id so relaunches continue the same run."""
    wandb = require("wandb", "monitor", "monitor.wandb=true")
    id_file = out_dir / "wandb_id"
    if not id_file.is_file():
        atomic_write_text(id_file, uuid.uuid4().hex[:12])
    run_id = id_file.read_text().strip()
    mode = os.environ.get("WANDB_MODE", mcfg.wandb_mode)     # the user's environment wins, as in wandb itself
    kw = {} if mode == "offline" else {"resume": "allow"}    # offline + resume writes an empty run (wandb 0.31)
    return wandb.init(project=mcfg.wandb_project, entity=mcfg.wandb_entity or None, dir=str(out_dir), id=run_id,
                      name=name, mode=mode, config=config, settings=wandb.Settings(silent=True), **kw)


def monitor_config_of(run_dir):
    """The `monitor` section of <run>/config.json (defaults: nothing but metrics.jsonl when absent)."""
    from .config import MonitorConfig, from_dict
    path = Path(run_dir) / "config.json"
    d = json.loads(path.read_text()).get("monitor", {}) if path.is_file() else {}
    return from_dict(MonitorConfig, d, "monitor.")


def log_prior(run_dir, mcfg, prior: dict, curve: dict):
    """After fit-prior: each member's weight (x = member index in prior.json order) and the top-K curve (x = K,
    y = the weighted top-K mixture's NLL on the fitness set), to <run>/tensorboard/prior and a W&B run `prior`
    (its files under <run>/prior-monitor/wandb)."""
    out = Path(run_dir)
    if mcfg.tensorboard:
        SummaryWriter = _summary_writer()
        with SummaryWriter(str(out / "tensorboard" / "prior")) as tb:
            for i, w in enumerate(prior["weights"]):
                tb.add_scalar("prior/weight", float(w), global_step=i)
            for k, nll in curve.items():
                tb.add_scalar("prior/topk_fitness_nll", float(nll), global_step=int(k))
            tb.add_text("prior/members", "  \n".join(f"{i}: {m}" for i, m in enumerate(prior["members"])))
    if mcfg.wandb:
        prior_dir = out / "prior-monitor"
        prior_dir.mkdir(exist_ok=True)
        wb = _wandb_run(prior_dir, mcfg, "prior", {"members": prior["members"], "fit_loss": prior["fit_loss"]})
        wb.define_metric("prior/weight", step_metric="member")           # each curve gets its own x axis
        wb.define_metric("prior/topk_fitness_nll", step_metric="K")
        for i, w in enumerate(prior["weights"]):
            wb.log({"member": i, "prior/weight": float(w)})
        for k, nll in curve.items():
            wb.log({"K": int(k), "prior/topk_fitness_nll": float(nll)})
        wb.finish()
