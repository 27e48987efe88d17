"""Muon + gradient clipping at the 1.8B model's matrix shapes (issue 12 section 2), 1 CPU rank, real ZeRO-3.

With train.grad_clip=1.0 the engine's clip is off (it would divide every Muon update by the global norm of
all updates, deepspeed.md pitfall 1) and q0ds clips the raw gradients before Muon. Checked: the applied
matrix step is lr x DeepSpeed's own muon_update of the raw gradient within 1%, the clip really acted (raw
norm >> 1, and the Muon momentum holds the clipped gradient), and the logged raw norm is the true one."""
import copy

import pytest
import torch
from torch import nn

from q0ds import engine as E
from q0ds.config import load_config
from q0ds.presets import preset_config

D, F, V = 2048, 5632, 64          # d_model and SwiGLU width of the 1.8b preset; a small vocab


class Net(nn.Module):
    """Embedding, an MLP pair (5632x2048, 2048x5632), a 2048x2048 projection, a gain vector, an LM head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.up = nn.Linear(D, F, bias=False)
        self.down = nn.Linear(F, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.gain = nn.Parameter(torch.ones(D))
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, ids, labels):
        h = self.embed(ids) * self.gain
        h = h + self.down(torch.relu(self.up(h)))
        h = h + self.o_proj(h)
        # x100: raw gradient norm well above the clip, so the clip has to act
        return 100 * nn.functional.cross_entropy(self.lm_head(h).flatten(0, 1), labels.flatten())


@pytest.mark.slow
def test_muon_matrix_step_is_lr_times_orthogonalised_update_with_clip():
    from deepspeed.runtime.zero.muon.original_muon import muon_update
    E.setup_distributed()
    torch.manual_seed(0)
    cfg = load_config(None, ["optim.name=muon", "optim.muon_lr=0.01", "optim.lr=0.001", "optim.weight_decay=0",
                             "train.grad_clip=1.0", "train.micro_batch=2", "train.global_batch=2"],
                      base=preset_config("tiny", "d", "r"))
    ds = E.student_ds_config(E.load_ds_config(cfg.ds_config), cfg, 1)
    assert ds["gradient_clipping"] == 0.0
    model = Net()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1)
    ref(ids, labels).backward()                                      # the raw gradients, by plain autograd
    raw = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    raw_norm = torch.sqrt(sum(g.pow(2).sum() for g in raw.values())).item()
    assert raw_norm > 10, raw_norm

    eng, sched = E.make_student(model, ds, cfg.optim, lambda s: (1.0, 1.0), grad_clip=cfg.train.grad_clip)
    groups = E.group_values(sched)
    assert groups["matrix"][0] == 0.01 and groups["embed"][0] == 0.001
    before = E.full_fp32_params(eng)
    E.micro_step(eng, eng(ids, labels), 1, last=True)
    after = E.full_fp32_params(eng)

    assert eng.q0ds_raw_grad_norm.item() == pytest.approx(raw_norm, rel=1e-4)
    global_update_sq = 0.0
    for name in ("up.weight", "down.weight", "o_proj.weight"):
        applied = (before[name] - after[name]) / 0.01
        expected = muon_update(raw[name].clone(), torch.zeros_like(raw[name]), beta=0.95)
        rel = ((applied - expected).norm() / expected.norm()).item()
        assert rel < 0.01, (name, rel)
        global_update_sq += expected.pow(2).sum().item()
    # The clip reached Muon's input: momentum after one step = (1 - beta) x clipped gradient.
    opt = eng.optimizer
    mom_sq = sum(opt.optimizer.state[opt.fp32_partitioned_groups_flat[i]]["momentum_buffer"].pow(2).sum().item()
                 for i in range(len(opt.fp16_groups)) if opt.sub_groups_using_muon[i])
    mat_raw = sum(raw[n].pow(2).sum().item() for n in ("up.weight", "down.weight", "o_proj.weight")) ** 0.5
    assert mom_sq ** 0.5 == pytest.approx(0.05 * mat_raw / raw_norm, rel=1e-3)
    # What DeepSpeed's own clip (gradient_clipping=1.0) would have done: every matrix step x 1/||all updates||
    print(f"engine clip would scale each matrix step by {1 / global_update_sq ** 0.5:.4f}; raw norm {raw_norm:.1f}")
