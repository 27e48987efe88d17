"""Tests for q0ds.plan: budget rules, allocations, plots, parameter counts, memory and time estimates."""
import json
import math
from pathlib import Path

import pytest
import torch

from q0ds.plan import (ARCH, MEASURED, Allocation, _lr_mult, activation_bytes, alternatives, bases_for,
                       format_memory_plan, lr_curve, memory_plan, param_breakdown, param_count,
                       plan_budget, plot_allocation, time_plan)

BUDGETS = [0.5, 1, 3, 4, 8, 12, 16, 32, 50, 64, 100, 128, 129, 200, 256, 300, 400, 512, 960]


@pytest.mark.parametrize("epochs, bases", [(1, 1), (64, 1), (128, 1), (129, 2), (200, 2), (256, 2),
                                           (257, 3), (400, 3), (512, 3), (960, 4)])
def test_one_more_base_per_doubling(epochs, bases):
    assert bases_for(epochs) == bases
    assert plan_budget(epochs).bases == bases


@pytest.mark.parametrize("epochs", BUDGETS)
@pytest.mark.parametrize("schedule", ["uniform", "packed"])
def test_total_equals_budget_and_lengths_are_sane(epochs, schedule):
    a = plan_budget(epochs, schedule=schedule)
    assert math.isclose(a.total_epochs, epochs, rel_tol=1e-12)
    assert a.cycles == len(a.cycle_epochs) >= (2 if schedule == "packed" else 1)
    assert all(x > 0 for x in a.cycle_epochs)
    if schedule == "uniform":                                     # 1 epoch up to 64 per base, 2 above, rounded
        e, L = epochs / a.bases, a.cycle_epochs[0]
        target = 1.0 if e <= 64 else 2.0
        assert max(a.cycle_epochs) - min(a.cycle_epochs) < 1e-12
        assert (L == e < target) or abs(L - target) <= target / (2 * a.cycles) + 1e-12, (e, L)
    else:
        assert max(a.cycle_epochs[1:]) <= 2.0 + 1e-12              # never longer than the ref-code cycle
        assert epochs < 1 or min(a.cycle_epochs[1:]) >= 0.25 - 1e-12
        assert a.cycle_epochs[0] <= 8.0 + 1e-12
    ov = a.run_overrides()
    assert ov["bases"] == a.bases and ov["schedule.cycles"] == a.cycles
    lens = ov["schedule.cycle_epochs"]
    assert math.isclose(a.bases * (sum(lens) if isinstance(lens, list) else lens * a.cycles), epochs,
                        rel_tol=1e-8)
    for b in alternatives(epochs):
        assert math.isclose(b.total_epochs, epochs, rel_tol=1e-12)


def test_uniform_cycles_by_default_and_the_packed_rule_on_request():
    """Issue 14: the packed rule lost to uniform 1-epoch cycles at 16 and 32 epochs (3 seeds), so the default
    is uniform cycles: 1 epoch up to 64 epochs per base, 2 above (the reference's length)."""
    for e, n, length in ((8, 8, 1.0), (16, 16, 1.0), (64, 64, 1.0), (100, 50, 2.0), (0.5, 1, 0.5)):
        a = plan_budget(e)
        assert a.bases == 1 and a.cycles == n and set(a.cycle_epochs) == {length}, (e, a.cycle_epochs)
    assert plan_budget(8).run_overrides() == {"bases": 1, "schedule.cycles": 8, "schedule.cycle_epochs": 1.0}
    assert plan_budget(200).bases == 2 and plan_budget(200).cycle_epochs == (2.0,) * 50
    a = plan_budget(8, schedule="packed")
    assert a.bases == 1 and list(a.cycle_epochs) == [4.0, 1.0, 1.0, 1.0, 1.0]
    assert a.run_overrides() == {"bases": 1, "schedule.cycles": 5,
                                 "schedule.cycle_epochs": [4.0, 1.0, 1.0, 1.0, 1.0]}
    for e in (1, 2, 4, 8, 16):                         # half the budget warm, then >= 4 short cycles
        lens = plan_budget(e, schedule="packed").cycle_epochs
        assert lens[0] == e / 2 and all(x < lens[0] for x in lens[1:])
        ends = [sum(lens[:i + 1]) for i in range(len(lens))]
        assert all(x >= e / 2 for x in ends)           # every snapshot lands in the second half
    big = plan_budget(64, schedule="packed").cycle_epochs
    assert big[0] == 8 and set(big[1:]) == {2.0} and len(big) == 29
    with pytest.raises(ValueError, match="schedule"):
        plan_budget(8, schedule="warm")


def test_waves_overrides_and_alternatives():
    a = plan_budget(400, nodes=2)
    assert a.bases == 3 and a.waves == 2 and "2 wave(s)" in a.summary()
    assert plan_budget(400, nodes=4).waves == 1 and "1 node(s) idle" in plan_budget(400, nodes=4).summary()
    assert plan_budget(400).waves == 1
    assert a.override_args() == ["bases=3", "schedule.cycles=67", f"schedule.cycle_epochs={round(400 / 3 / 67, 9)!r}"]
    assert plan_budget(60, bases=3).bases == 3
    alts = alternatives(8)
    names = [x.name for x in alts]
    assert "1base-uniform-2ep" in names and "many-bases" in names and "packed" in names
    ref = next(x for x in alts if x.name == "1base-uniform-2ep")
    assert ref.run_overrides()["schedule.cycle_epochs"] == 2.0 and ref.cycles == 4
    keys = {(x.bases, x.cycle_epochs) for x in alts}
    assert len(keys) == len(alts) and (1, plan_budget(8).cycle_epochs) not in keys
    with pytest.raises(ValueError, match="epochs"):
        plan_budget(0)
    with pytest.raises(AssertionError):
        Allocation("bad", 10.0, 1, (4.0, 4.0))


def test_lr_curve_and_plot(tmp_path):
    assert _lr_mult(0, 10) == 1.0
    assert math.isclose(_lr_mult(5, 10), 0.08 + 0.92 * 0.5)
    xs, ys, ends = lr_curve(plan_budget(8, schedule="packed"))
    assert ends == [4.0, 5.0, 6.0, 7.0, 8.0] and max(ys) == 1.0 and min(ys) > 0.08
    assert xs == sorted(xs) and xs[-1] == 8.0
    path = tmp_path / "alloc.png"
    plot_allocation(plan_budget(400, nodes=2), path)
    assert path.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ parameter counts and memory


def hf_model(name, meta=False):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    if meta:
        with torch.device("meta"):
            return Qwen3ForCausalLM(Qwen3Config(**ARCH[name]))
    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(**ARCH[name]))


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_param_count_matches_transformers(name):
    from deepspeed.runtime.zero.stage3 import model_to_params
    m = hf_model(name)
    assert param_count(name) == sum(p.numel() for p in m.parameters())
    total, largest = model_to_params(m)                   # DeepSpeed's own count of the same model
    assert (total, largest) == (param_count(name), param_breakdown(name)["largest_layer"])


def test_param_count_1_8b():
    n = param_count("1.8b")
    assert n == 1_747_584_512 and round(n / 1e9, 3) == 1.748
    m = hf_model("1.8b", meta=True)
    assert n == sum(p.numel() for p in m.parameters())
    pb = param_breakdown("1.8b")
    assert pb["largest_layer"] == 50304 * 2048 and pb["matrices"] == 30 * (4 * 2048 * 2048 + 3 * 2048 * 5632)


def test_memory_plan_1_8b_model_states_and_deepspeed_crosscheck():
    N, g = 1_747_584_512, 8
    d = memory_plan("1.8b", gpus=g, micro_batch=8, seq_len=2048, optimizer="adamw", teacher=True, teacher_mode="zero3")
    assert d["estimate"] is True and d["params"] == N and d["assumptions"]
    b = d["bytes"]
    assert d["student_model_states_bytes"] == pytest.approx((2 + 4 + 8 + 4) * N / g, abs=4)   # fp32 grad partitions
    assert b["teacher bf16 params"] == math.ceil(2 * N / g)
    assert b["gathered params (<= stage3_max_live_parameters 1e+09 x 2 B)"] == 2 * 10 ** 9
    assert b["activations"] == math.ceil(30 * 2048 * 8 * (MEASURED["c_h"] * 2048 + MEASURED["c_I"] * 5632))
    assert b["bf16 logits x 3 (incl. their grad)"] == 2048 * 8 * 50304 * 2 * 3
    # the gradient bucket DeepSpeed allocates whole at start-up: the shipped config's reduce_bucket_size x bf16
    import hjson
    from pathlib import Path
    zc = hjson.loads((Path(__file__).resolve().parent.parent / "ds_configs/zero3_bf16.hjson").read_text())
    rbs = float(zc["zero_optimization"]["reduce_bucket_size"])
    assert zc["zero_optimization"]["contiguous_gradients"] is True
    assert b[f"gradient bucket (reduce_bucket_size {rbs:g} x 2 B)"] == int(rbs * 2)     # AdamW: bf16 communication
    assert memory_plan("1.8b", optimizer="muon", deepspeed_check=False)["bytes"][
        f"gradient bucket (reduce_bucket_size {rbs:g} x 4 B)"] == int(rbs * 4)           # Muon: fp32 (engine.py)
    assert zc["data_types"]["grad_accum_dtype"] == "fp32"
    assert d["total_bytes"] == sum(b.values())
    # DeepSpeed's estimator: 4 x largest layer + 18 B/param / gpus; ours counts the same 18 B/param (bf16
    # params 2, fp32 master 4, Adam m+v 8, fp32 grad partitions 4) and the same 4 x largest layer
    ds = d["deepspeed"]
    assert ds["gpu_bytes"] == int(4 * 50304 * 2048 + 18 * N / g)
    assert ds["ratio"] == pytest.approx(1.0, rel=1e-6)
    muon = memory_plan("1.8b", optimizer="muon", deepspeed_check=False)
    pb = param_breakdown("1.8b")
    assert muon["bytes"]["optimizer states (muon)"] == math.ceil((4 * pb["matrices"] + 8 * (N - pb["matrices"])) / g)
    assert "deepspeed" not in muon


def test_memory_plan_fit_and_options():
    d = memory_plan("1.8b", deepspeed_check=False)
    mb = d["max_micro_batch"]
    assert d["fits"] and mb >= 8
    assert memory_plan("1.8b", micro_batch=mb, deepspeed_check=False)["fits"]
    assert not memory_plan("1.8b", micro_batch=mb + 1, deepspeed_check=False)["fits"]
    ck = activation_bytes("1.8b", 8, 2048, checkpointing=True)
    assert ck == math.ceil(MEASURED["ckpt_per_h"] * 2048 * 2048 * 8 * 30
                           + 2048 * 8 * (MEASURED["c_h"] * 2048 + MEASURED["c_I"] * 5632))
    assert abs(activation_bytes("1.8b", 1, 2048, flash=False) - activation_bytes("1.8b", 1, 2048)
               - 30 * 5 * 16 * 2048 ** 2) <= 1
    no_teacher = memory_plan("1.8b", teacher=False, deepspeed_check=False)
    assert no_teacher["bytes"]["teacher bf16 params"] == 0 and "bf16 logits x 2 (incl. their grad)" in no_teacher["bytes"]
    with pytest.raises(ValueError, match="optimizer"):
        memory_plan(optimizer="sgd")
    with pytest.raises(ValueError, match="unknown model preset"):
        memory_plan("7b")
    text = format_memory_plan(d, time_plan())
    assert "ESTIMATE" in text and "total" in text and "assumptions" in text


def test_time_plan():
    t = time_plan("1.8b", gpus=8, tokens_per_step=524288, gpu="h100", mfu=0.4, teacher=False)
    pb = param_breakdown("1.8b")
    n_mm = pb["matrices"] + pb["lm_head"]
    fpt = 6 * n_mm + 12 * 30 * 2048 * 2048
    assert t["estimate"] is True and t["flops_per_token"] == fpt
    assert t["step_time_s"] == pytest.approx(524288 * fpt / (8 * 989e12 * 0.4))
    assert t["tokens_per_s"] == pytest.approx(524288 / t["step_time_s"])
    with_teacher = time_plan("1.8b", teacher=True)
    assert with_teacher["flops_per_token"] == pytest.approx(fpt * 4 / 3)
    m = time_plan("1.8b", step_time_s=with_teacher["step_time_s"])
    assert m["implied_mfu"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="gpu"):
        time_plan(gpu="tpu")


# ---------------------------------------------------------------- issue 13: the plan against the measurement
PROBE = Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "memory_probe.json"


def test_plan_constants_are_the_stored_measurement():
    """MEASURED must be what benchmarks/memory_probe.py last wrote (rerun it and copy, or this fails)."""
    r = json.loads(PROBE.read_text())
    assert MEASURED["c_h"] == pytest.approx(r["fit"]["c_h"]) and MEASURED["c_I"] == pytest.approx(r["fit"]["c_I"])
    assert MEASURED["date_utc"] == r["date_utc"] and MEASURED["versions"] == r["versions"]
    h = r["arch"]["hidden_size"]
    assert MEASURED["ckpt_per_h"] == pytest.approx(r["activation_bytes_per_token_per_layer_checkpointing"] / h)
    chunk = r["loss"]["peaks"]["chunked-distilled"]
    assert MEASURED["loss_chunk_bytes"] == chunk["peak_over_inputs_bytes"] - chunk["grad_bytes"]
    # the plan's per-layer activations reproduce every measured point at the real widths (2 seqs, half FFN)
    arch = dict(ARCH["1.8b"], num_hidden_layers=1)
    for seq, v in r["activation_bytes_per_token_per_layer"].items():
        assert activation_bytes(arch, 1, int(seq)) == pytest.approx(v * int(seq), rel=0.02)
    half = dict(arch, intermediate_size=arch["intermediate_size"] // 2)
    assert activation_bytes(half, 1, 128) == pytest.approx(r["activation_bytes_per_token_per_layer_half_ffn"] * 128, rel=0.02)


def test_plan_activations_match_a_fresh_measurement_at_other_widths():
    """The fitted c_h h + c_I I carries to widths it was not fitted on (tiny Qwen3 layers, measured now)."""
    import sys
    sys.path.insert(0, str(PROBE.parent.parent))
    from memory_probe import saved_bytes_per_layer
    for arch in (dict(hidden_size=256, num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                      intermediate_size=704, vocab_size=512),
                 dict(hidden_size=128, num_attention_heads=2, num_key_value_heads=2, head_dim=64,
                      intermediate_size=512, vocab_size=512)):
        got = saved_bytes_per_layer(arch, 64, layers=1)
        planned = activation_bytes(dict(arch, num_hidden_layers=1), 1, 64)
        assert planned == pytest.approx(got * 64, rel=0.05), (arch, got, planned / 64)
        ck = saved_bytes_per_layer(arch, 64, layers=2, checkpointing=True)
        assert ck == pytest.approx(MEASURED["ckpt_per_h"] * arch["hidden_size"], rel=0.05)


def test_cpu_rank_memory_terms_and_bad_dtype():
    from q0ds.plan import ARCH, cpu_rank_memory, param_breakdown
    arch = dict(ARCH["1.8b"], num_hidden_layers=1)
    d = cpu_rank_memory(arch, world=2, micro_batch=1, seq_len=2048, dtype_bytes=4, baseline_bytes=123)
    N = param_breakdown(arch)["total"]
    assert d["total_bytes"] == sum(d["bytes"].values()) and d["bytes"]["process baseline (measured)"] == 123
    assert d["bytes"]["params (partition)"] == math.ceil(4 * N / 2)
    assert d["bytes"]["logits x 3"] == 2048 * 50304 * 4 * 3
    # 1 layer: every gradient fits one bucket (N < 5e8), so the bucket's written pages are all N; the largest
    # full gradient is the embedding's / head's
    assert d["bytes"]["gradient bucket (pages written)"] == 4 * N
    assert d["bytes"]["largest full gradient (before the bucket copy)"] == 4 * 50304 * 2048
    small = cpu_rank_memory(arch, world=2, micro_batch=1, seq_len=2048, reduce_bucket_size=1e6)
    assert small["bytes"]["gradient bucket (pages written)"] == 4 * 10 ** 6
    half = cpu_rank_memory(arch, world=2, micro_batch=1, seq_len=2048, dtype_bytes=2)
    assert half["bytes"]["activations"] * 2 == pytest.approx(d["bytes"]["activations"], abs=2)
    with pytest.raises(ValueError, match="dtype_bytes must be 2"):
        cpu_rank_memory(arch, world=2, micro_batch=1, seq_len=2048, dtype_bytes=8)


# ---------------------------------------------------------------- issue 19 section 3: teacher choice and traffic
def test_teacher_choice_replica_memory_and_auto_rule():
    from q0ds.plan import teacher_choice
    N, g = 1_747_584_512, 8
    rep = memory_plan("1.8b", gpus=g, micro_batch=4, optimizer="muon", teacher_mode="replicated", deepspeed_check=False)
    z3 = memory_plan("1.8b", gpus=g, micro_batch=4, optimizer="muon", teacher_mode="zero3", deepspeed_check=False)
    assert rep["bytes"]["teacher bf16 params"] == 2 * N and z3["bytes"]["teacher bf16 params"] == math.ceil(2 * N / g)
    assert rep["total_bytes"] - z3["total_bytes"] == 2 * N - math.ceil(2 * N / g)
    c = teacher_choice("1.8b", gpus=g, micro_batch=4, gpu_mem_gb=80)
    assert c["mode"] == "replicated" and c["replica_extra_bytes"] == 2 * N - math.ceil(2 * N / g)   # 3.06 GB
    assert memory_plan("1.8b", gpus=g, micro_batch=4, optimizer="muon", deepspeed_check=False)["teacher_mode"] == "replicated"
    # a GPU the replicated plan just misses: auto falls back to zero3 (the zero3 plan still fits)
    mid = (rep["total_bytes"] + z3["total_bytes"]) / 2 / 1e9
    c = teacher_choice("1.8b", gpus=g, micro_batch=4, gpu_mem_gb=mid)
    assert c["mode"] == "zero3" and not c["fits_replicated"] and c["fits_zero3"]
    assert teacher_choice("1.8b", gpus=g, micro_batch=4, gpu_mem_gb=mid, mode="replicated")["mode"] == "replicated"
    assert memory_plan("1.8b", teacher=False, deepspeed_check=False)["teacher_mode"] is None
    with pytest.raises(ValueError, match="teacher_mode"):
        teacher_choice(mode="cpu")


def test_traffic_plan_against_hand_computed_values():
    from q0ds.plan import traffic_plan
    N = 1_747_584_512
    t = traffic_plan("1.8b", gpus_per_node=8, link="nvlink-h100", optimizer="muon", teacher_mode="zero3",
                     micro_steps=8)
    # Muon: all-reduce (reduce_scatter false) of N fp32 gradients = 6.99 GB per micro-step
    assert t["grad_bytes_per_micro_step"] == 4 * N and round(4 * N / 1e9, 2) == 6.99
    # ring all-reduce over 8 ranks at 450 GB/s bus bandwidth: 4N * 2 * 7/8 / 450e9 = 27.2 ms
    assert t["grad_s_per_micro_step"] == pytest.approx(4 * N * 1.75 / 450e9) and round(t["grad_s_per_micro_step"], 4) == 0.0272
    # forward + backward gather + the ZeRO-3 teacher's: 3 x 2N bytes, all-gather 7/8 of it
    assert t["gather_bytes_per_micro_step"] == 3 * 2 * N
    assert t["gather_s_per_micro_step"] == pytest.approx(6 * N * 7 / 8 / 450e9)
    assert t["s_per_step"] == pytest.approx(8 * (t["grad_s_per_micro_step"] + t["gather_s_per_micro_step"]))
    ib = traffic_plan("1.8b", 8, "ib-2node-4x200", "muon", teacher_mode="replicated", checkpointing=True)
    assert ib["ranks"] == 16 and ib["busbw_bytes_per_s"] == 100e9
    assert ib["grad_s_per_micro_step"] == pytest.approx(4 * N * 2 * 15 / 16 / 100e9)          # 131 ms
    assert ib["param_gathers_per_micro_step"] == 3                                          # + the recompute
    assert traffic_plan("1.8b", 8, "ib-2node-8x400")["busbw_bytes_per_s"] == 400e9
    adam = traffic_plan("1.8b", 8, "nvlink-h100", "adamw")
    assert adam["grad_collective"] == "reduce-scatter"
    assert adam["grad_s_per_micro_step"] == pytest.approx(2 * N * 7 / 8 / 450e9)
    assert traffic_plan("1.8b", 1, "nvlink-h100")["s_per_micro_step"] == 0.0
    with pytest.raises(ValueError, match="unknown link"):
        traffic_plan(link="ethernet")


def test_recommended_micro_batch_minimises_the_estimated_step():
    from q0ds.plan import LINKS, recommend_micro_batch, traffic_plan
    r = recommend_micro_batch("1.8b", 8, global_batch=256, seq_len=2048, gpu_mem_gb=80, link="nvlink-h100")
    assert r["per_rank_batch"] == 32
    best = r["best"]
    # micro-batch 8 is the largest without checkpointing that fits 80 GB (memory_plan.max_micro_batch)
    assert (best["micro_batch"], best["checkpointing"], best["micro_steps"]) == (8, False, 4)
    assert not any(o["micro_batch"] == 16 and not o["checkpointing"] for o in r["options"])
    assert all(best["step_s"] <= o["step_s"] for o in r["options"])
    tp = time_plan("1.8b", gpus=8, tokens_per_step=256 * 2048, teacher=True)
    tr = traffic_plan("1.8b", 8, "nvlink-h100", "muon", teacher_mode=best["teacher_mode"], micro_steps=4)
    assert best["step_s"] == pytest.approx(tp["step_time_s"] + tr["s_per_step"])
    ck = next(o for o in r["options"] if o["micro_batch"] == 8 and o["checkpointing"])
    assert ck["compute_s"] == pytest.approx(tp["step_time_s"] * (1 + tp["teacher_flops_per_token"] / tp["flops_per_token"]))
    # a slow network favours fewer micro-steps: on 4x200 Gb/s the 1-micro-step checkpointed setting costs less
    # communication than any other
    slow = recommend_micro_batch("1.8b", 8, 256, 2048, gpu_mem_gb=80, link="ib-2node-4x200")
    assert min(o["comm_s"] for o in slow["options"]) == next(o["comm_s"] for o in slow["options"] if o["micro_steps"] == 1)
    assert set(LINKS) == {"nvlink-h100", "ib-2node-8x400", "ib-2node-4x200"}
    with pytest.raises(ValueError, match="does not split"):
        recommend_micro_batch(global_batch=100)


def test_plan_memory_cli_shows_teacher_choice_and_traffic():
    from conftest import run_cli
    out = run_cli("plan", "--memory", "--gpus", "8", "--micro-batch", "4").stdout
    assert "Teacher (distill.teacher_mode): replicated (auto: a full bf16 replica per GPU fits)" in out
    assert "teacher replicated" in out and "replica costs +3.06 GB" in out
    assert "all-reduce of 6.99 GB gradients 27.2 ms" in out and "400 GB/s per node" in out
    assert "recommended: micro_batch 8, activation checkpointing off -> 4 micro-steps/step" in out
    z = run_cli("plan", "--memory", "--teacher-mode", "zero3").stdout
    assert "Teacher (distill.teacher_mode): zero3 (requested zero3)" in z


def test_teacher_choice_counts_each_resident_replica():
    """distill-ensemble keeps up to max_engines members resident: each replica adds one teacher's memory."""
    from q0ds.plan import teacher_choice
    one = teacher_choice("1.8b", gpus=8, micro_batch=4, gpu_mem_gb=80)
    two = teacher_choice("1.8b", gpus=8, micro_batch=4, gpu_mem_gb=80, replicas=2)
    assert one["mode"] == "replicated" and one["replicas"] == 1
    assert two["replicated_total_bytes"] == one["replicated_total_bytes"] + one["replica_extra_bytes"]
    many = teacher_choice("1.8b", gpus=8, micro_batch=4, gpu_mem_gb=80, replicas=64)
    assert many["mode"] == "zero3" and not many["fits_replicated"]
    assert many["zero3_total_bytes"] == one["zero3_total_bytes"]
