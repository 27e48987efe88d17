"""Planning: how to spend an epoch budget (bases x cycles x cycle length), and GPU memory/time estimates.

Budget rules (method.md, "Budget allocation"). The paper's recipe table is not public. The bases rule is OUR
reading of the authors' thread ("one base up to ~128 epochs, one more per doubling"); the cycle rule is what
benchmarks/data_efficiency.py measured (README, ablations at 32 epochs, 3 seeds):
  1. bases B = 1 if E <= 128, else 1 + ceil(log2(E / 128))   (2 up to 256, 3 up to 512, 4 up to 1024)
  2. every base gets e = E / B epochs (the bases are identical apart from seed and data order).
  3. uniform cycles of 1 epoch while e <= 64 (measured: at 32 epochs 2-epoch cycles were worse by 0.048 +-
     0.028 nats, and the previous rule below by 0.110 +- 0.010; 1-epoch cycles were measured up to 64
     epochs), of 2 epochs above (the reference code's cycle length at 256 epochs; not measured here).
  Example E=8: 8 x [1]; E=64: 64 x [1]; E=200: 2 bases x 50 x [2].
`schedule="packed"` gives the previous rule (our reading of "small budgets want one base with frequent cycles
packed toward the end"), kept to benchmark against: a long "warm" first cycle of min(e / 2, 8) epochs, then
about 4 cycles of clip((e - w) / 4, 0.25, 2) epochs (E=8: [4, 1, 1, 1, 1]). It lost to uniform 1-epoch
cycles at 32 epochs (+0.110 +- 0.010, 3 seeds) and at 16 (benchmarks/results/data_efficiency.json,
planner_vs_uniform).
Cycle lengths are in epochs; the trainer rounds them to optimizer steps. A base runs on one node; with
`nodes` < B the bases run in ceil(B / nodes) waves (wall time ~ waves x one base). Uniform cycles make one
long run give every smaller budget as a prefix; a packed schedule depends on the budget.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

LR_FLOOR = 0.08           # ref-code sawtooth floor (method.md, Primitive 1)


def _lr_mult(s: float, L: float, floor: float = LR_FLOOR) -> float:
    """Private copy of the sawtooth for plotting: floor + (1 - floor) * (1 - s / L), s in [0, L)."""
    return floor + (1.0 - floor) * (1.0 - s / L)


@dataclass(frozen=True)
class Allocation:
    name: str
    budget_epochs: float
    bases: int
    cycle_epochs: tuple          # cycle lengths (epochs) of one base; every base runs the same list
    nodes: int | None = None     # one base per node; fewer nodes than bases -> waves
    rule: str = ""

    def __post_init__(self):
        if abs(self.total_epochs - self.budget_epochs) > 1e-9 * max(1.0, self.budget_epochs):
            raise AssertionError(f"{self.name}: sums to {self.total_epochs} epochs, budget {self.budget_epochs}")

    @property
    def cycles(self) -> int:
        return len(self.cycle_epochs)

    @property
    def epochs_per_base(self) -> float:
        return float(sum(self.cycle_epochs))

    @property
    def total_epochs(self) -> float:
        return self.bases * self.epochs_per_base

    @property
    def waves(self) -> int:
        return 1 if not self.nodes else math.ceil(self.bases / self.nodes)

    @property
    def snapshots(self) -> int:
        return self.bases * self.cycles

    def run_overrides(self) -> dict:
        """Run-config overrides: bases, schedule.cycles, schedule.cycle_epochs (float if uniform)."""
        lens = [round(x, 9) for x in self.cycle_epochs]
        uniform = all(abs(x - lens[0]) < 1e-9 for x in lens)
        return {"bases": self.bases, "schedule.cycles": self.cycles,
                "schedule.cycle_epochs": lens[0] if uniform else lens}

    def override_args(self) -> list[str]:
        """The overrides as `key=value` strings (JSON values) for the CLI."""
        return [f"{k}={json.dumps(v)}" for k, v in self.run_overrides().items()]

    def to_dict(self) -> dict:
        return {"name": self.name, "budget_epochs": self.budget_epochs, "bases": self.bases,
                "cycles": self.cycles, "cycle_epochs": list(self.cycle_epochs),
                "epochs_per_base": self.epochs_per_base, "total_epochs": self.total_epochs,
                "snapshots": self.snapshots, "nodes": self.nodes, "waves": self.waves, "rule": self.rule,
                "overrides": self.run_overrides()}

    def summary(self) -> str:
        shape = " + ".join(f"{n} x {v:g}" if n > 1 else f"{v:g}" for v, n in _runs(self.cycle_epochs))
        s = (f"{self.name}: {self.bases} base(s) x {self.cycles} cycles ({shape} epochs per base) "
             f"= {self.total_epochs:g} epochs, {self.snapshots} snapshots")
        if self.nodes:
            s += f"; {self.nodes} node(s) -> {self.waves} wave(s)"
            if self.nodes > self.bases:
                s += f", {self.nodes - self.bases} node(s) idle"
        return s


def _runs(xs):
    """Run-length encoding: [2, 2, 2] -> [[2, 3]]."""
    out = []
    for x in xs:
        if out and abs(out[-1][0] - x) < 1e-9:
            out[-1][1] += 1
        else:
            out.append([x, 1])
    return out


def bases_for(epochs: float, base_epochs: float = 128.0) -> int:
    """Rule 1: one base up to `base_epochs`, one more per doubling."""
    if epochs <= base_epochs:
        return 1
    return 1 + math.ceil(math.log2(epochs / base_epochs) - 1e-12)


def packed_cycles(e: float, warm_fraction=0.5, warm_epochs_max=8.0, min_after_warm=4,
                  cycle_epochs_min=0.25, cycle_epochs_max=2.0) -> list[float]:
    """The previous rule (schedule="packed"): one long warm cycle, then ~equal short cycles (sum == e)."""
    if e <= 0:
        raise ValueError(f"epochs per base must be > 0, got {e}")
    warm = min(warm_fraction * e, warm_epochs_max)
    rest = e - warm
    target = min(max(rest / min_after_warm, cycle_epochs_min), cycle_epochs_max)
    n = min(max(round(rest / target), math.ceil(rest / cycle_epochs_max - 1e-9)),
            math.floor(rest / cycle_epochs_min + 1e-9))            # keep min <= length <= max
    n = max(1, n)
    return [warm] + [rest / n] * n


def uniform_cycles(e: float, length: float) -> list[float]:
    n = max(1, round(e / length))
    return [e / n] * n


def uniform_length(e: float, short: float = 1.0, long: float = 2.0, long_above: float = 64.0) -> float:
    """Rule 3: the cycle length for e epochs per base."""
    return short if e <= long_above else long


def plan_budget(epochs: float, nodes: int | None = None, *, bases: int | None = None, schedule: str = "uniform",
                base_epochs: float = 128.0, name: str = "planner") -> Allocation:
    """The planner's allocation for a budget of `epochs` (rules in the module docstring)."""
    if not epochs > 0:
        raise ValueError(f"--epochs must be > 0, got {epochs}")
    if nodes is not None and nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    B = bases or bases_for(epochs, base_epochs)
    e = epochs / B
    bases_rule = f"bases: 1 up to {base_epochs:g} epochs, +1 per doubling; per base: "
    if schedule == "uniform":
        lens = uniform_cycles(e, uniform_length(e))
        rule = bases_rule + "uniform 1-epoch cycles up to 64 epochs, 2 above"
    elif schedule == "packed":
        lens = packed_cycles(e)
        rule = bases_rule + "warm cycle min(0.5 x e, 8), then cycles of clip(rest/4, 0.25, 2) epochs"
    else:
        raise ValueError(f"schedule must be 'uniform' or 'packed', got {schedule!r}")
    return Allocation(name, float(epochs), B, tuple(lens), nodes, rule)


def alternatives(epochs: float, nodes: int | None = None) -> list[Allocation]:
    """Other allocations at the same budget, to benchmark the planner's choice against."""
    p = plan_budget(epochs, nodes)
    alts = [
        Allocation("1base-uniform-2ep", epochs, 1, tuple(uniform_cycles(epochs, 2.0)), nodes,
                   "reference schedule: one base, uniform 2-epoch cycles"),
        plan_budget(epochs, nodes, schedule="packed", name="packed"),
        plan_budget(epochs, nodes, bases=4 * p.bases, name="many-bases"),
        plan_budget(epochs, nodes, bases=p.bases + 1, name="planner+1base"),
    ]
    if p.bases > 1:
        alts.append(plan_budget(epochs, nodes, bases=p.bases - 1, name="planner-1base"))
    seen, out = {(p.bases, tuple(round(x, 9) for x in p.cycle_epochs))}, []
    for a in alts:
        key = (a.bases, tuple(round(x, 9) for x in a.cycle_epochs))
        if key not in seen:
            seen.add(key)
            out.append(a)
    return out


def lr_curve(alloc: Allocation, floor: float = LR_FLOOR, dx: float | None = None):
    """(epochs, lr multipliers, cycle-end epochs) of one base, sampled every dx epochs (default 0.01)."""
    dx = dx or min(0.01, min(alloc.cycle_epochs) / 50)
    xs, ys, ends, start = [], [], [], 0.0
    for L in alloc.cycle_epochs:
        n = max(2, int(round(L / dx)))
        for i in range(n):
            xs.append(start + L * i / n)
            ys.append(_lr_mult(L * i / n, L, floor))
        start += L
        xs.append(start)
        ys.append(_lr_mult(L * (n - 1) / n, L, floor))   # the last step's value, held to the cycle end
        ends.append(start)
    return xs, ys, ends


def plot_allocation(alloc: Allocation, path, max_panels: int = 4) -> None:
    """LR sawtooth per base over its epochs, cycle ends (snapshots) marked; PNG via matplotlib Agg."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shown = min(alloc.bases, max_panels)
    fig, axes = plt.subplots(shown, 1, figsize=(9, 1.8 + 1.4 * shown), sharex=True, squeeze=False)
    xs, ys, ends = lr_curve(alloc)
    for b in range(shown):
        ax = axes[b][0]
        ax.plot(xs, ys, lw=1.0, color="C0")
        ax.plot(ends, [LR_FLOOR] * len(ends), "v", color="C3", ms=4, label="snapshot (cycle end)")
        for e in ends:
            ax.axvline(e, color="0.85", lw=0.6, zorder=0)
        wave = f", wave {b // alloc.nodes + 1}" if alloc.nodes else ""
        ax.set_ylabel(f"base {b}{wave}\nLR mult")
        ax.set_ylim(0, 1.08)
    axes[0][0].legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    axes[-1][0].set_xlabel("epoch (within a base)")
    more = f" (first {shown} of {alloc.bases} bases shown; all run the same schedule)" if shown < alloc.bases else ""
    fig.suptitle(alloc.summary() + more, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- GPU memory / time

# --------------------------------------------------------------------------- GPU memory and time
# Keys are transformers `Qwen3Config` kwargs: `Qwen3Config(**ARCH[name])` builds the model.
ARCH = {
    "tiny": dict(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=16, intermediate_size=128, tie_word_embeddings=False),
    "small": dict(vocab_size=2048, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, head_dim=32, intermediate_size=384, tie_word_embeddings=False),
    "1.8b": dict(vocab_size=50304, hidden_size=2048, num_hidden_layers=30, num_attention_heads=16,
                 num_key_value_heads=16, head_dim=128, intermediate_size=5632, tie_word_embeddings=False),
}
PEAK_FLOPS = {"h100": 989e12, "h200": 989e12, "a100": 312e12}     # bf16 dense, per GPU
GB = 1e9


def _arch(model) -> dict:
    if isinstance(model, dict):
        return model
    if model not in ARCH:
        raise ValueError(f"unknown model preset {model!r}; choose one of {', '.join(ARCH)}")
    return ARCH[model]


def param_breakdown(model) -> dict:
    """Parameter counts of a Qwen3ForCausalLM (no biases; RMSNorm per block, QK-norm per head dim)."""
    a = _arch(model)
    V, h, L, I = a["vocab_size"], a["hidden_size"], a["num_hidden_layers"], a["intermediate_size"]
    q = a["num_attention_heads"] * a["head_dim"]
    kv = a["num_key_value_heads"] * a["head_dim"]
    attn, mlp = 2 * h * q + 2 * h * kv, 3 * h * I                 # q,o + k,v ; gate, up, down
    norms = L * (2 * h + 2 * a["head_dim"]) + h                    # 2 RMSNorms + q/k norm per layer, final
    embed, head = V * h, (0 if a.get("tie_word_embeddings", False) else V * h)
    matrices = L * (attn + mlp)                                    # what Muon gets (2-D, not embed/head)
    return {"total": matrices + embed + head + norms, "matrices": matrices, "embedding": embed,
            "lm_head": head, "norms": norms, "per_layer": attn + mlp + 2 * h + 2 * a["head_dim"],
            # DeepSpeed's convention (model_to_params): the largest single module's own parameters
            "largest_layer": max(embed, h * I, h * q, h * kv)}


def param_count(model) -> int:
    return param_breakdown(model)["total"]


# Measured constants (issue 13): copied from benchmarks/results/memory_probe.json, which
# `python benchmarks/memory_probe.py` rewrites; tests/test_plan.py fails when the two disagree.
# Activations: bytes autograd saves per token per Qwen3 decoder layer (transformers, SDPA, bf16, no dropout),
# fitted as c_h * h + c_I * I from two FFN widths at the real hidden size; with activation checkpointing only
# ckpt_per_h * h bytes per token per layer stay saved. Loss: the chunked loss's temporaries (q0ds.distill,
# CHUNK_ELEMS) on top of the logits and their gradient, measured as peak resident bytes.
MEASURED = {
    "source": "benchmarks/results/memory_probe.json",
    "date_utc": "2026-11-29T03:34:08+00:00",
    "versions": {"torch": "2.13.0+cpu", "transformers": "5.23.0", "deepspeed": "0.19.8", "python": "3.11.7"},
    "c_h": 36.34765625,
    "c_I": 8.0,
    "ckpt_per_h": 2.0,
    "loss_chunk_bytes": 334540800,
}


def activation_bytes(model, micro_batch: int, seq_len: int, flash=True, checkpointing=False) -> int:
    """Per-GPU activation memory of one micro batch (bf16), from the measured per-layer constants (MEASURED).

    Per token per layer: c_h h + c_I I bytes (SDPA keeps no s^2 term; without flash/memory-efficient attention
    add the 5as^2b of Korthikanti et al. 2022). With activation checkpointing: ckpt_per_h * h bytes per token
    per layer (the layer inputs) plus one layer's full activations for the recompute.
    """
    a = _arch(model)
    s, b, h = seq_len, micro_batch, a["hidden_size"]
    m = MEASURED
    layer = s * b * (m["c_h"] * h + m["c_I"] * a["intermediate_size"])
    if not flash:
        layer += 5 * a["num_attention_heads"] * s * s * b
    L = a["num_hidden_layers"]
    full = m["ckpt_per_h"] * h * s * b * L + layer if checkpointing else L * layer
    return int(math.ceil(full))


TEACHER_MODES = ("auto", "replicated", "zero3")


def memory_plan(model="1.8b", gpus=8, micro_batch=8, seq_len=2048, optimizer="adamw", teacher=True,
                gpu_mem_gb=80, checkpointing=False, flash=True, max_live_parameters=1e9, reserve_gb=4.0,
                reduce_bucket_size=5e8, deepspeed_check=True, teacher_mode="auto") -> dict:
    """Per-GPU memory ESTIMATE for one base (one node, ZeRO-3 over `gpus`), in bytes.

    reduce_bucket_size: ds_configs/zero3_bf16.hjson's (contiguous_gradients true). DeepSpeed 0.19.8 allocates
    the gradient bucket whole at start-up, `torch.empty(self.reduce_bucket_size, dtype=...)` on the device
    (deepspeed/runtime/zero/stage3.py, DeepSpeedZeroOptimizer_Stage3.__init__, "# IPG"), so on a GPU it is
    resident from the first step. Missing from the plan until the CPU rehearsal measured 1.3x the estimate.

    teacher_mode (run config distill.teacher_mode): "replicated" holds a full bf16 copy of the teacher on every
    GPU (2 N bytes, never gathered), "zero3" partitions it like the student (2 N / gpus, re-gathered on every
    micro-step), "auto" is replicated when the whole plan fits with the replica, else zero3 (teacher_choice)."""
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
    if teacher_mode not in TEACHER_MODES:
        raise ValueError(f"teacher_mode must be one of {', '.join(TEACHER_MODES)}, got {teacher_mode!r}")
    if teacher_mode == "auto":
        teacher_mode = "zero3"
        if teacher:
            rep = memory_plan(model, gpus, micro_batch, seq_len, optimizer, True, gpu_mem_gb, checkpointing, flash,
                              max_live_parameters, reserve_gb, reduce_bucket_size, False, "replicated")
            teacher_mode = "replicated" if rep["fits"] else "zero3"
    a, pb = _arch(model), param_breakdown(model)
    N, V, g = pb["total"], a["vocab_size"], gpus
    opt = 8 * N if optimizer == "adamw" else 4 * pb["matrices"] + 8 * (N - pb["matrices"])
    comm = 4 if optimizer == "muon" else 2    # bucket dtype = communication_data_type: fp32 with Muon (engine.py)
    logit_copies = 3 if teacher else 2       # student logits + their gradient (+ the teacher's logits)
    gathered_key = f"gathered params (<= stage3_max_live_parameters {max_live_parameters:g} x 2 B)"
    parts = {
        "student bf16 params": 2 * N / g,
        "student fp32 master": 4 * N / g,
        f"optimizer states ({optimizer})": opt / g,
        "student fp32 grads (grad_accum_dtype fp32)": 4 * N / g,
        "teacher bf16 params": (2 * N if teacher_mode == "replicated" else 2 * N / g) if teacher else 0,
        gathered_key: min(max_live_parameters, N) * 2,
        f"gradient bucket (reduce_bucket_size {reduce_bucket_size:g} x {comm} B)": reduce_bucket_size * comm,
        "activations": activation_bytes(a, micro_batch, seq_len, flash, checkpointing),
        f"bf16 logits x {logit_copies} (incl. their grad)": seq_len * micro_batch * V * 2 * logit_copies,
        "loss temporaries (chunked, measured)": MEASURED["loss_chunk_bytes"],
        "reserve (CUDA ctx, NCCL, fragmentation)": reserve_gb * GB,
    }
    parts = {k: int(math.ceil(v)) for k, v in parts.items()}
    model_states = sum(list(parts.values())[:4])
    total = sum(parts.values())
    per_sample = (activation_bytes(a, 1, seq_len, flash, checkpointing) + seq_len * V * 2 * logit_copies)
    fixed = total - micro_batch * per_sample
    out = {"estimate": True, "model": model if isinstance(model, str) else "custom", "params": N,
           "largest_layer_params": pb["largest_layer"], "gpus": gpus, "micro_batch": micro_batch,
           "seq_len": seq_len, "optimizer": optimizer, "teacher": teacher,
           "teacher_mode": teacher_mode if teacher else None, "checkpointing": checkpointing,
           "flash": flash, "bytes": parts, "student_model_states_bytes": model_states, "total_bytes": total,
           "gpu_mem_bytes": int(gpu_mem_gb * GB), "fits": total <= gpu_mem_gb * GB,
           "max_micro_batch": max(0, int((gpu_mem_gb * GB - fixed) // per_sample)),
           "assumptions": [
               "ZeRO-3 over the GPUs of one node (one base per node); bf16 params, fp32 master, fp32 gradient "
               "partitions (ds_configs/zero3_bf16.hjson data_types.grad_accum_dtype fp32: stage3.py "
               "grad_partitions_flat_buffer has gradient_accumulation_dtype)",
               "AdamW m,v 8 B/param; Muon: 4 B momentum on 2-D block matrices, AdamW 8 B on the rest",
               ("teacher: a full bf16 replica on every GPU (no gathers), no optimizer state, no grads"
                if teacher_mode == "replicated" else
                "teacher: bf16 params partitioned like the student (re-gathered every micro-step), no optimizer "
                "state, no grads"),
               f"activations: measured {MEASURED['c_h']:g} h + {MEASURED['c_I']:g} I bytes/token/layer "
               f"(transformers Qwen3, SDPA, bf16; {MEASURED['source']}, {MEASURED['date_utc']}); "
               + ("flash/SDPA attention (no s^2 term)" if flash else "no flash attention (5as^2b term)"),
               "logits: bf16 [s, b, V] for the student and its gradient (+ the teacher's when distilling); the "
               "chunked loss (q0ds.distill) adds one chunk of fp32 temporaries (measured)",
               "ZeRO-3 gathered params: bounded by stage3_max_live_parameters (ds_configs/zero3_bf16.hjson: 1e9)",
               "gradient bucket: allocated whole at start-up (stage3.py, contiguous_gradients), reduce_bucket_size "
               "elements of communication_data_type: bf16 with AdamW, fp32 with Muon (q0ds sets it, engine.py)",
               f"GB = 1e9 bytes; {reserve_gb:g} GB reserved for CUDA context, NCCL buffers, fragmentation"]}
    if deepspeed_check:
        out["deepspeed"] = _deepspeed_estimate(N, pb["largest_layer"], gpus)
        if "gpu_bytes" in out["deepspeed"]:
            ours = model_states + pb["largest_layer"] * 2 * 2        # DeepSpeed counts 4 B x the largest layer
            out["deepspeed"].update(ours_comparable_bytes=ours, ratio=ours / out["deepspeed"]["gpu_bytes"])
    return out


def cpu_rank_memory(model, world: int, micro_batch: int, seq_len: int, dtype_bytes: int = 4,
                    optimizer: str = "muon", teacher: bool = True, baseline_bytes: int = 0,
                    max_live_parameters: float = 1e9, reduce_bucket_size: float = 5e8) -> dict:
    """Peak resident bytes ESTIMATE of one CPU rank (ZeRO-3 over `world` ranks, ds_configs/zero3_cpu.hjson), for
    the CPU rehearsal (benchmarks/rehearsal.py). Same terms as memory_plan with the parameter dtype a parameter:
    params, grads and teacher in `dtype_bytes`; DeepSpeed keeps its fp32 partition copy even for an fp32 model
    (deepspeed/runtime/zero/stage3.py DeepSpeedZeroOptimizer_Stage3._create_fp32_partitions); gathered params up
    to stage3_max_live_parameters; activations from the measured bf16 constants scaled by dtype_bytes / 2;
    `baseline_bytes`: the measured resident size of a rank's process before the model (Python, torch, DeepSpeed).
    Gradients: DeepSpeed's bucket is `torch.empty(reduce_bucket_size)` (stage3.py, "# IPG"); on CPU only the pages
    written become resident, i.e. the gradients bucketed before a flush, min(reduce_bucket_size, N); autograd
    first makes each parameter's full gradient and the bucket hook copies it in (stage3.py
    __add_grad_to_ipg_bucket), so the largest parameter's full gradient (the embedding or head) is alive too."""
    if dtype_bytes not in (2, 4):
        raise ValueError(f"dtype_bytes must be 2 (bf16) or 4 (fp32), got {dtype_bytes!r}")
    if optimizer not in ("adamw", "muon"):
        raise ValueError(f"optimizer must be 'adamw' or 'muon', got {optimizer!r}")
    a, pb = _arch(model), param_breakdown(model)
    N, V, g, d = pb["total"], a["vocab_size"], world, dtype_bytes
    opt = 8 * N if optimizer == "adamw" else 4 * pb["matrices"] + 8 * (N - pb["matrices"])
    copies = 3 if teacher else 2
    parts = {
        "params (partition)": d * N / g, "fp32 partition copy": 4 * N / g, f"optimizer states ({optimizer})": opt / g,
        "grads (partition)": 4 * N / g, "teacher params (partition)": d * N / g if teacher else 0,
        "gathered params": min(max_live_parameters, N) * d,
        "gradient bucket (pages written)": min(reduce_bucket_size, N) * d,
        "largest full gradient (before the bucket copy)": pb["largest_layer"] * d,
        "activations": activation_bytes(a, micro_batch, seq_len) * d / 2,
        f"logits x {copies}": seq_len * micro_batch * V * d * copies,
        "loss temporaries (chunked, measured)": MEASURED["loss_chunk_bytes"],
        "process baseline (measured)": baseline_bytes,
    }
    parts = {k: int(math.ceil(v)) for k, v in parts.items()}
    return {"estimate": True, "params": N, "world": world, "micro_batch": micro_batch, "seq_len": seq_len,
            "dtype_bytes": d, "optimizer": optimizer, "teacher": teacher, "bytes": parts,
            "total_bytes": sum(parts.values())}


def _deepspeed_estimate(params: int, largest: int, gpus: int) -> dict:
    """DeepSpeed's own ZeRO-3 model-state estimate, no offload: 4 x largest layer + 18 x params / gpus."""
    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    except Exception as e:                      # deepspeed missing or unusable here: report, don't fail
        return {"error": f"deepspeed estimator unavailable: {e!r}"}
    cpu, gpu, layer = estimate_zero3_model_states_mem_needs(
        params, largest, num_gpus_per_node=gpus, num_nodes=1,
        cpu_offload=False, cpu_offload_params=False, zero_init=True)
    return {"function": "deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs"
                        "(cpu_offload=False, cpu_offload_params=False, zero_init=True)",
            "gpu_bytes": int(gpu), "cpu_bytes": int(cpu), "largest_layer_bytes": int(layer)}


def time_plan(model="1.8b", gpus=8, tokens_per_step=524288, gpu="h100", mfu=0.4, seq_len=2048,
              teacher=True, step_time_s=None, epoch_tokens=100e6) -> dict:
    """Step-time ESTIMATE from FLOPs per token at an assumed MFU (or the MFU a measured step implies)."""
    if gpu not in PEAK_FLOPS:
        raise ValueError(f"unknown gpu {gpu!r}; choose one of {', '.join(PEAK_FLOPS)}")
    a, pb = _arch(model), param_breakdown(model)
    n_mm = pb["matrices"] + pb["lm_head"]                      # matmul params (embedding is a lookup)
    attn = 12 * a["num_hidden_layers"] * a["num_attention_heads"] * a["head_dim"] * seq_len
    student = 6 * n_mm + attn
    teach = (2 * n_mm + attn / 3) if teacher else 0.0            # forward only
    fpt = student + teach
    peak = PEAK_FLOPS[gpu]
    step = tokens_per_step * fpt / (gpus * peak * mfu)
    out = {"estimate": True, "model": model if isinstance(model, str) else "custom", "gpus": gpus,
           "gpu": gpu, "tokens_per_step": tokens_per_step, "flops_per_token": fpt,
           "student_flops_per_token": student, "teacher_flops_per_token": teach,
           "peak_flops_per_gpu": peak, "mfu": mfu, "step_time_s": step,
           "tokens_per_s": tokens_per_step / step, "epoch_s": epoch_tokens / (tokens_per_step / step),
           "assumptions": ["training FLOPs/token = 6 N + 12 L h s (PaLM appendix B; N = matmul params, "
                           "no causal-mask discount)", "teacher forward = 2 N + 4 L h s",
                           f"peak {peak / 1e12:g} TFLOP/s bf16 dense per {gpu}", f"MFU {mfu:g} assumed",
                           "fitness/val scoring and snapshot writes not included"]}
    if step_time_s:
        out["measured_step_time_s"] = step_time_s
        out["implied_mfu"] = tokens_per_step * fpt / (step_time_s * gpus * peak)
    return out


def teacher_choice(model="1.8b", gpus=8, micro_batch=4, seq_len=2048, optimizer="muon", gpu_mem_gb=80,
                   checkpointing=False, mode="auto", replicas=1, **kw) -> dict:
    """The teacher the trainer builds (distill.teacher_mode): `mode` itself unless "auto"; auto is "replicated"
    when memory_plan with `replicas` full bf16 teacher replicas per GPU fits `gpu_mem_gb` (reserve included),
    else "zero3" (replicas > 1: the resident members of `q0ds distill-ensemble`, one extra replica's memory
    each). Returns {mode, requested, replicas, replicated_total_bytes, zero3_total_bytes, replica_extra_bytes,
    fits_*}."""
    if mode not in TEACHER_MODES:
        raise ValueError(f"distill.teacher_mode must be one of {', '.join(TEACHER_MODES)}, got {mode!r}")
    plans = {m: memory_plan(model, gpus, micro_batch, seq_len, optimizer, True, gpu_mem_gb, checkpointing,
                            deepspeed_check=False, teacher_mode=m, **kw) for m in ("replicated", "zero3")}
    extra = plans["replicated"]["total_bytes"] - plans["zero3"]["total_bytes"]
    replicated_total = plans["replicated"]["total_bytes"] + (replicas - 1) * extra
    fits_replicated = replicated_total <= gpu_mem_gb * GB
    chosen = mode if mode != "auto" else ("replicated" if fits_replicated else "zero3")
    return {"mode": chosen, "requested": mode, "replicas": replicas,
            "replicated_total_bytes": replicated_total,
            "zero3_total_bytes": plans["zero3"]["total_bytes"],
            "replica_extra_bytes": extra,
            "fits_replicated": fits_replicated, "fits_zero3": plans["zero3"]["fits"],
            "gpu_mem_bytes": int(gpu_mem_gb * GB)}


# Interconnects for traffic_plan: NCCL *bus* bandwidth (nccl-tests convention: for an all-reduce of S bytes
# over n ranks, t = S * 2(n-1)/n / busbw; all-gather t = S * (n-1)/n / busbw), nominal, per direction.
LINKS = {
    # H100/H200 SXM NVLink 4: 900 GB/s bidirectional per GPU = 450 GB/s per direction; nccl-tests all_reduce
    # busbw on 8x H100 reaches ~360-480 GB/s at large sizes (450 assumed)
    "nvlink-h100": {"busbw": 450e9, "nodes": 1,
                    "what": "1 node, H100/H200 SXM NVLink 4 (450 GB/s per direction per GPU, nominal)"},
    # 2 nodes: an inter-node ring is limited by the NICs; NCCL runs one ring per NIC, so busbw ~ the node's
    # aggregate NIC bandwidth (DGX A100, 8x HDR 200 Gb/s = 200 GB/s: nccl-tests ~185 GB/s measured)
    "ib-2node-8x400": {"busbw": 8 * 400e9 / 8, "nodes": 2,
                       "what": "2 nodes, 8x 400 Gb/s NDR InfiniBand per node (400 GB/s per node, nominal)"},
    "ib-2node-4x200": {"busbw": 4 * 200e9 / 8, "nodes": 2,
                       "what": "2 nodes, 4x 200 Gb/s HDR InfiniBand per node (100 GB/s per node, nominal)"},
}


def traffic_plan(model="1.8b", gpus_per_node=8, link="nvlink-h100", optimizer="muon", comm_bytes=None,
                 teacher_mode="replicated", checkpointing=False, micro_steps=1) -> dict:
    """ZeRO-3 collective traffic of one micro-step and its time on `link` (LINKS), no overlap with compute.

    With Muon, ZeRO-3 needs reduce_scatter: false (deepspeed.md pitfall 2), so every micro-step all-reduces
    the whole gradient, N elements of communication_data_type (fp32 with Muon: engine.student_ds_config; 4 B,
    7.0 GB at 1.8B); AdamW reduce-scatters it (half the ring traffic) in bf16. Parameters are all-gathered in
    bf16 in the forward and again in the backward (and once more in the recompute with activation
    checkpointing); a ZeRO-3 teacher adds one gather per micro-step, a replicated one none."""
    if link not in LINKS:
        raise ValueError(f"unknown link {link!r}; choose one of {', '.join(LINKS)}")
    L = LINKS[link]
    n = gpus_per_node * L["nodes"]
    N = param_count(model)
    cb = comm_bytes or (4 if optimizer == "muon" else 2)
    grad = cb * N
    ring = (n - 1) / n
    grad_factor = 2 * ring if optimizer == "muon" else ring        # all-reduce vs reduce-scatter
    gathers = (3 if checkpointing else 2) + (1 if teacher_mode == "zero3" else 0)
    gather = 2 * N * gathers
    t_grad = grad * grad_factor / L["busbw"] if n > 1 else 0.0
    t_gather = gather * ring / L["busbw"] if n > 1 else 0.0
    return {"estimate": True, "link": link, "link_what": L["what"], "busbw_bytes_per_s": L["busbw"], "ranks": n,
            "params": N, "grad_collective": "all-reduce" if optimizer == "muon" else "reduce-scatter",
            "grad_bytes_per_micro_step": grad, "grad_s_per_micro_step": t_grad,
            "param_gathers_per_micro_step": gathers, "gather_bytes_per_micro_step": gather,
            "gather_s_per_micro_step": t_gather, "s_per_micro_step": t_grad + t_gather,
            "micro_steps": micro_steps, "s_per_step": micro_steps * (t_grad + t_gather)}


def recommend_micro_batch(model="1.8b", gpus_per_node=8, global_batch=256, seq_len=2048, optimizer="muon",
                          gpu_mem_gb=80, link="nvlink-h100", teacher_mode="auto", gpu="h100", mfu=0.4,
                          candidates=(1, 2, 4, 8, 16, 32, 64)) -> dict:
    """The micro-batch / activation-checkpointing setting with the shortest estimated step: per setting that
    fits (memory_plan), compute at `mfu` (time_plan; checkpointing recomputes the forward: + 2 N + 4 L h s
    FLOPs/token) plus micro_steps x traffic_plan's collective time (no overlap assumed: an upper bound).
    Micro-batches must divide the per-rank batch global_batch / ranks. Returns the best and every option."""
    L = LINKS[link]
    ranks = gpus_per_node * L["nodes"]
    if global_batch % ranks:
        raise ValueError(f"global batch {global_batch} does not split over {ranks} ranks")
    per_rank = global_batch // ranks
    tp = time_plan(model, gpus=ranks, tokens_per_step=global_batch * seq_len, gpu=gpu, mfu=mfu, seq_len=seq_len,
                   teacher=True)
    recompute = tp["teacher_flops_per_token"] / tp["flops_per_token"]    # one more forward: same FLOPs as teacher's
    options = []
    for ck in (False, True):
        for mb in candidates:
            if per_rank % mb:
                continue
            mem = memory_plan(model, gpus_per_node * L["nodes"], mb, seq_len, optimizer, True, gpu_mem_gb, ck,
                              deepspeed_check=False, teacher_mode=teacher_mode)
            if not mem["fits"]:
                continue
            steps = per_rank // mb
            tr = traffic_plan(model, gpus_per_node, link, optimizer, teacher_mode=mem["teacher_mode"],
                              checkpointing=ck, micro_steps=steps)
            compute = tp["step_time_s"] * (1 + recompute if ck else 1)
            options.append({"micro_batch": mb, "checkpointing": ck, "micro_steps": steps,
                            "teacher_mode": mem["teacher_mode"], "total_bytes": mem["total_bytes"],
                            "compute_s": compute, "comm_s": tr["s_per_step"], "step_s": compute + tr["s_per_step"]})
    best = min(options, key=lambda o: (o["step_s"], o["micro_steps"])) if options else None
    return {"estimate": True, "link": link, "ranks": ranks, "global_batch": global_batch, "per_rank_batch": per_rank,
            "mfu": mfu, "best": best, "options": options}


def format_traffic(model="1.8b", gpus_per_node=8, global_batch=256, seq_len=2048, optimizer="muon",
                   gpu_mem_gb=80, teacher_mode="auto") -> str:
    """Plain-text gradient/parameter traffic per micro-step on NVLink and 2-node InfiniBand, with the
    recommended micro-batch / checkpointing setting for each."""
    lines = [f"Traffic plan (ESTIMATE, no compute overlap): {model}, {optimizer}, global batch {global_batch} x seq "
             f"{seq_len}; all-reduce t = S 2(n-1)/n / busbw, all-gather t = S (n-1)/n / busbw (nccl-tests bus bw)"]
    for link in LINKS:
        rec = recommend_micro_batch(model, gpus_per_node, global_batch, seq_len, optimizer, gpu_mem_gb, link,
                                    teacher_mode)
        b = rec["best"]
        if b is None:
            lines.append(f"  {LINKS[link]['what']}: no micro-batch fits {gpu_mem_gb:g} GB")
            continue
        tr = traffic_plan(model, gpus_per_node, link, optimizer, teacher_mode=b["teacher_mode"],
                          checkpointing=b["checkpointing"], micro_steps=b["micro_steps"])
        lines += [f"  {LINKS[link]['what']}, {rec['ranks']} ranks, bus bw {LINKS[link]['busbw'] / GB:g} GB/s:",
                  f"    per micro-step: {tr['grad_collective']} of {tr['grad_bytes_per_micro_step'] / GB:.2f} GB "
                  f"gradients {tr['grad_s_per_micro_step'] * 1e3:.1f} ms + {tr['param_gathers_per_micro_step']} "
                  f"bf16 param gathers {tr['gather_bytes_per_micro_step'] / GB:.2f} GB "
                  f"{tr['gather_s_per_micro_step'] * 1e3:.1f} ms",
                  f"    recommended: micro_batch {b['micro_batch']}, activation checkpointing "
                  f"{'on' if b['checkpointing'] else 'off'} -> {b['micro_steps']} micro-steps/step, "
                  f"comm {b['comm_s']:.2f} s + compute {b['compute_s']:.2f} s (MFU {rec['mfu']:g}) per step"]
        others = sorted(rec["options"], key=lambda o: o["step_s"])[1:3]
        for o in others:
            lines.append(f"      vs micro_batch {o['micro_batch']}, checkpointing {'on' if o['checkpointing'] else 'off'}"
                         f": {o['micro_steps']} micro-steps, {o['step_s']:.2f} s/step")
    return "\n".join(lines)


def format_teacher_choice(c: dict) -> str:
    why = (f"requested {c['requested']}" if c["requested"] != "auto" else
           "auto: a full bf16 replica per GPU " + ("fits" if c["fits_replicated"] else "does not fit"))
    return (f"Teacher (distill.teacher_mode): {c['mode']} ({why}); replicated {c['replicated_total_bytes'] / GB:.2f} "
            f"GB/GPU total, zero3 {c['zero3_total_bytes'] / GB:.2f} GB/GPU (replica costs "
            f"{c['replica_extra_bytes'] / GB:+.2f} GB, saves one full bf16 gather per micro-step)")


def format_memory_plan(d: dict, t: dict | None = None) -> str:
    """Plain-text table of a memory_plan() dict (and optionally a time_plan() dict)."""
    lines = [f"Memory plan (ESTIMATE): {d['model']} ({d['params'] / 1e9:.3f}B params), ZeRO-3 over "
             f"{d['gpus']} GPUs, micro batch {d['micro_batch']} x seq {d['seq_len']}, {d['optimizer']}, "
             f"teacher {d['teacher_mode'] if d['teacher'] else 'off'}, "
             f"checkpointing {'on' if d['checkpointing'] else 'off'}",
             f"  {'component':<58}{'GB/GPU':>9}"]
    lines += [f"  {k:<58}{v / GB:>9.2f}" for k, v in d["bytes"].items()]
    verdict = "fits" if d["fits"] else "DOES NOT FIT"
    lines += [f"  {'total':<58}{d['total_bytes'] / GB:>9.2f}  of {d['gpu_mem_bytes'] / GB:g} GB: {verdict}",
              f"  largest micro batch that fits: {d['max_micro_batch']}"]
    ds = d.get("deepspeed")
    if ds and "gpu_bytes" in ds:
        lines.append(f"  DeepSpeed estimator (model states + largest layer): {ds['gpu_bytes'] / GB:.2f} GB; "
                     f"ours comparable {ds['ours_comparable_bytes'] / GB:.2f} GB (ratio {ds['ratio']:.2f})")
    elif ds:
        lines.append(f"  {ds['error']}")
    if t:
        lines.append(f"Time plan (ESTIMATE): {t['flops_per_token'] / 1e9:.1f} GFLOP/token, "
                     f"{t['tokens_per_step']} tokens/step on {t['gpus']} x {t['gpu']} at MFU {t['mfu']:g}: "
                     f"{t['step_time_s']:.2f} s/step, {t['tokens_per_s'] / 1e3:.0f}k tokens/s, "
                     f"{t['epoch_s'] / 60:.1f} min/epoch")
        if "implied_mfu" in t:
            lines.append(f"  measured {t['measured_step_time_s']:.2f} s/step -> MFU {t['implied_mfu']:.3f}")
    lines += ["assumptions:"] + [f"  - {x}" for x in d["assumptions"] + (t["assumptions"] if t else [])]
    return "\n".join(lines)
