"""Collectives stay on the engine's device (issue 12 section 1), generators are per rank (section 5).

On GPUs DeepSpeed's process group is NCCL-only, which rejects CPU tensors; gloo on CPU accepts anything, so
the rule is made structural: only q0ds/engine.py talks to torch.distributed / deepspeed.comm (checked here
on the source), and the 2-rank end-to-end run records the device of every tensor that reaches a collective
(tests/test_e2e_deepspeed.py::test_collectives_use_the_engine_device)."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

Q0DS = Path(__file__).resolve().parent.parent / "q0ds"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
               "broadcast_object_list", "reduce_scatter", "reduce_scatter_tensor", "all_to_all_single", "reduce",
               "gather", "scatter", "barrier", "send", "recv", "isend", "irecv", "new_group"}


def offences(source: str) -> list[str]:
    """Direct uses of torch.distributed / deepspeed.comm in a module: imports of them, any `.distributed`
    attribute (torch.distributed.x), and collectives called on a name bound to either."""
    found, aliases = [], set()
    comm = ("torch.distributed", "deepspeed.comm")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(comm):
                    found.append(f"line {node.lineno}: import {a.name}")
                    aliases.add(a.asname or a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            names = {a.name for a in node.names}
            if mod.startswith(comm) or (mod == "torch" and "distributed" in names) or (mod == "deepspeed" and "comm" in names):
                found.append(f"line {node.lineno}: from {mod} import {', '.join(sorted(names))}")
                aliases |= {a.asname or a.name for a in node.names}
        elif isinstance(node, ast.Attribute) and node.attr == "distributed":
            found.append(f"line {node.lineno}: .distributed")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and isinstance(node.value, ast.Name) \
                and node.value.id in aliases:
            found.append(f"line {node.lineno}: {node.value.id}.{node.attr}")
    return found


def test_only_engine_py_issues_collectives():
    bad = {p.name: offences(p.read_text()) for p in sorted(Q0DS.glob("*.py")) if p.name != "engine.py"}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, f"collectives / torch.distributed outside q0ds/engine.py (use its helpers): {bad}"


def test_the_static_check_can_fail():
    assert offences("import torch\ntorch.distributed.all_reduce(t)\n")
    assert offences("import deepspeed.comm as dist\ndist.barrier()\n")
    assert offences("from torch import distributed as d\n")
    assert not offences("from . import engine as E\nE.all_reduce_(t, dev)\nE.barrier()\nx.gather(-1, i)\n")


def test_helpers_in_one_process_return_on_the_given_device():
    from q0ds import engine as E
    t = torch.tensor([1.0, 2.0])
    assert E.all_reduce_(t, "cpu", "max").tolist() == [1.0, 2.0]
    assert E.all_gather_cat(t, "cpu").tolist() == [1.0, 2.0]
    assert E.broadcast_(t, "cpu").device.type == "cpu"
    assert E.any_rank(True, "cpu") and not E.any_rank(False, "cpu")


def test_rank_seeds_differ_and_rng_state_round_trips(monkeypatch):
    from q0ds import trainer as T
    seeds = {T.rank_seed(s, r) for s in range(3) for r in range(8)}
    assert len(seeds) == 24, "every (base seed, rank) pair must get its own generator seed"
    # The accelerator generator's save/restore path, driven by a CPU generator standing in for CUDA's.
    dev = torch.Generator().manual_seed(5)
    monkeypatch.setattr(T, "_device_rng", lambda: (dev.get_state, dev.set_state))
    state = T._rng_state()
    assert "device" in state
    draws = (torch.rand(3), np.random.rand(), torch.rand(3, generator=dev))
    T._set_rng_state(state)
    again = (torch.rand(3), np.random.rand(), torch.rand(3, generator=dev))
    assert torch.equal(draws[0], again[0]) and draws[1] == again[1] and torch.equal(draws[2], again[2])
    del state["device"]                       # a CPU-written checkpoint resumed where an accelerator RNG exists
    with pytest.raises(T.ResumeError, match="no accelerator RNG state"):
        T._set_rng_state(state)


def test_residual_dropout_hooks_act_in_training_only():
    from q0ds.config import ModelConfig
    from q0ds.model import build_config, build_model
    mc = build_config(ModelConfig(preset="tiny", dropout=0.5), 128, 0, 1, 16)
    assert mc.attention_dropout == 0.0
    model = build_model(mc, 0, dropout=0.5)
    plain = build_model(mc, 0)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    model.eval(), plain.eval()
    assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert model.state_dict().keys() == plain.state_dict().keys()
    model.train()
    assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits)
