"""Part of the DeepSpeed boundary (used only by engine.py): universal checkpoints whose optimizer state is not
only Adam's, i.e. Muon's `momentum_buffer`, for a resume on another number of ranks.

DeepSpeed 0.19.8 knows three per-parameter states in a ZeRO-3 universal checkpoint: fp32, exp_avg, exp_avg_sq.
The converter reads exactly those for every sub-group (checkpoint/ds_to_universal.py:194-198
extract_zero_shards_stage3, :543-550 merge_zero3_slices) and the loader writes exactly those back
(runtime/zero/stage3.py:3653-3718 load_hp_checkpoint_state_from_checkpoint_dir_stage3, which also reads `step`
from state[0]). A Muon sub-group's state is {momentum_buffer}: a flat fp32 partition laid out like the sub-group's
fp32 master (stage3.py:1066-1079 _create_momentum_buffer), so conversion dies with KeyError: 'exp_avg'.

Here the same two converter functions take whatever flat states a sub-group holds, using DeepSpeed's own
fragment writer and merger (dump_param_fragment, _merge_zero_shards), and are swapped into the converter only for
the duration of one conversion; everything else (file discovery, validation, optimizer_state.pt, model-state
copies, latest_universal) is DeepSpeed's. The momentum buffer then sits next to fp32.pt as a parameter-shaped
zero/<param>/momentum_buffer.pt. `load_any_state` replaces the loader on one engine's optimizer: each sub-group
gets fp32 plus the states of its kind (Muon: momentum_buffer; Adam: exp_avg, exp_avg_sq, step), each parameter's
slice cut for this rank by DeepSpeed's own load_hp_checkpoint_state, and every param group its own saved
hyperparameters (DeepSpeed gives all groups group 0's, use_muon included).
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

ADAM_KEYS = ("exp_avg", "exp_avg_sq")
MUON_KEYS = ("momentum_buffer",)


def _extract_any_state(optim_files_grid, param_shapes_grid, dp_degree, temp_dir, indices, exclude_param_names=None):
    """ds_to_universal.extract_zero_shards_stage3 for sub-groups holding any flat states (plain ZeRO-3, tp 1)."""
    from deepspeed.checkpoint import ds_to_universal as U
    tp_index, dp_index = indices
    if tp_index != 0:
        raise NotImplementedError("q0ds converts ZeRO-3 checkpoints without tensor parallelism only")
    exclude = exclude_param_names or set()
    sd = torch.load(optim_files_grid[tp_index][dp_index], map_location="cpu", weights_only=False)
    optim_sd = sd[U.OPTIMIZER_STATE_DICT]
    partition_groups = optim_sd.get("ds_zero_partition_groups") or []
    state = optim_sd[U.OPTIMIZER_STATE_DICT]["state"]
    for idx, shapes in enumerate(param_shapes_grid[tp_index]):
        flat = {"fp32": optim_sd["fp32_flat_groups"][idx]}
        flat.update({k: v for k, v in state.get(idx, {}).items() if k in ADAM_KEYS + MUON_KEYS})
        meta = partition_groups[idx] if idx < len(partition_groups) else {}
        count = meta.get("partition_count", dp_degree)
        part_rank = meta.get("partition_rank", dp_index)
        offset = 0
        for name, shape in shapes.items():
            numel = U._shape_numel(shape)
            part, _ = U._zero_partitioned_param_info(numel, count)
            keep = max(0, min(part, numel - part_rank * part))
            if name not in exclude:
                for key, t in flat.items():
                    U.dump_param_fragment(temp_dir, tp_index, dp_index, key, t, name, offset, keep)
            offset += part


def _merge_any_state(dp_degree, out_dir, slice_dir, name):
    """ds_to_universal.merge_zero3_slices for whichever states were extracted for parameter `name`."""
    from deepspeed.checkpoint import ds_to_universal as U
    keys = sorted({f.name.rsplit(".", 1)[0] for f in (Path(slice_dir) / name / "0").iterdir()})
    for key in keys:
        slices = U._merge_zero_shards(os.path.join(slice_dir, name), key, 1)
        U._save_checkpoint(os.path.join(out_dir, name, f"{key}.pt"), slices[0])


@contextlib.contextmanager
def _any_state_converter():
    from deepspeed.checkpoint import ds_to_universal as U
    saved = U.extract_zero_shards_stage3, U.merge_zero3_slices
    U.extract_zero_shards_stage3, U.merge_zero3_slices = _extract_any_state, _merge_any_state
    try:
        yield U
    finally:
        U.extract_zero_shards_stage3, U.merge_zero3_slices = saved


def convert(src, out):
    """ZeRO-3 checkpoint dir `src` -> universal checkpoint dir `out` (serial: no worker processes)."""
    import argparse
    with _any_state_converter() as U:
        U.main(argparse.Namespace(input_folder=str(src), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=False))


def load_any_state(opt, checkpoint_dir: str):
    """Replacement for DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3 (bound
    to `opt`): fp32 master and each sub-group's own optimizer states from a universal checkpoint."""
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT
    if opt.swap_optimizer or getattr(opt, "save_muon_momentum_buffer_in_memory", False):
        raise NotImplementedError("universal load with optimizer offload / in-memory Muon momentum is not supported")
    zero_dir = os.path.join(checkpoint_dir, "zero")
    optim_sd = torch.load(os.path.join(zero_dir, "optimizer_state.pt"), weights_only=False)
    opt._load_global_state_stage3(optim_sd)
    saved = optim_sd[OPTIMIZER_STATE_DICT]
    step = next((s["step"] for s in saved["state"].values() if "step" in s), None)
    muon = getattr(opt, "sub_groups_using_muon", None) or [False] * len(opt.fp16_groups)
    for i, group in enumerate(opt.fp16_groups):
        fp32 = opt.fp32_partitioned_groups_flat[i]
        for key in ("fp32",) + (MUON_KEYS if muon[i] else ADAM_KEYS):
            flat = torch.zeros_like(fp32)
            offset = 0
            for p in group:
                part = opt.load_hp_checkpoint_state(os.path.join(zero_dir, opt.param_names[p]), key, param=p)
                flat.narrow(0, offset, part.numel()).copy_(part)
                offset += part.numel()
            if key == "fp32":
                fp32.data.copy_(flat)
            else:
                opt.optimizer.state[fp32][key] = flat
        if not muon[i] and step is not None:
            opt.optimizer.state[fp32]["step"] = step.clone() if torch.is_tensor(step) else step
    if len(saved["param_groups"]) != len(opt.optimizer.param_groups):
        raise ValueError(f"universal checkpoint {checkpoint_dir} has {len(saved['param_groups'])} param groups, "
                         f"this engine {len(opt.optimizer.param_groups)}")
    for group, old in zip(opt.optimizer.param_groups, saved["param_groups"]):
        group.update({k: v for k, v in old.items() if k != "params"})
    for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):          # as stage3.py:3707-3718
        if sum(fp32.size()) > 0:
            opt.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
    for i, flat in enumerate(opt.fp16_partitioned_groups_flat):
        for p, q in zip(opt.fp16_partitioned_groups[i], opt.unflatten(flat, opt.fp16_partitioned_groups[i])):
            p.data = q.data


def install_loader(engine):
    """Route this engine's universal optimizer load through load_any_state."""
    opt = engine.optimizer
    opt.load_hp_checkpoint_state_from_checkpoint_dir_stage3 = lambda d: load_any_state(opt, d)


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="ZeRO-3 checkpoint (Adam or Muon state) -> universal checkpoint")
    ap.add_argument("--input_folder", required=True)
    ap.add_argument("--output_folder", required=True)
    a = ap.parse_args()
    convert(a.input_folder, a.output_folder)
