"""Newton-Schulz in the half precisions a GPU uses, run on CPU: how far DeepSpeed's fp16 Gram iteration (and the bf16
standard one) lands from the same iteration in fp32, on the 1.8b preset's matrix shapes scaled down 8x.

    python benchmarks/ns_fp16.py            # ~1 min on 2 cores -> benchmarks/results/ns_fp16.json
    python benchmarks/ns_fp16.py --scale 1  # the full 2048 x 5632 shapes (fp16 matmuls are slow on CPU: many minutes)

On CUDA DeepSpeed 0.19.8 runs `muon_update` with ns_method="gram" in fp16 and "standard" in bf16
(runtime/zero/muon/original_muon.py:37-47 ns_compute_dtype); on this CPU accelerator is_fp16_supported() is falsy,
so the CPU tests take the fp32 path. Here ns_compute_dtype is replaced to force each dtype on the uncompiled
functions. What CPU cannot tell: the GPU's GEMM accumulation (fp32 in cuBLAS by default, but torch allows
reduced-precision reductions for fp16) and Triton's fused kernels; the per-op rounding of inputs and outputs to
fp16/bf16 is the same.

Inputs: gradient-like matrices with a power-law spectrum (s_i ~ i^-1, random singular vectors), plus the same
at x1e4 (a loss-scaled fp32 gradient, which fp16 would overflow without the normalisation before the cast).
Per case: relative Frobenius distance to the fp32 result, the output's singular-value range (Muon's quintic
iteration aims at ~[0.7, 1.2], not exactly 1), and finiteness.
"""
from __future__ import annotations

import argparse
import time

from common import ROOT, env_defaults, machine_info, write_json

env_defaults()

import torch  # noqa: E402

SHAPES_1_8B = {"attn q/k/v/o": (2048, 2048), "mlp gate/up": (5632, 2048), "mlp down": (2048, 5632)}


def grad_like(rows, cols, gen, scale=1.0):
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=gen))
    s = 1.0 / torch.arange(1, k + 1, dtype=torch.float32)
    return (u * s) @ v.T * scale


def run_ns(fn_name, g, dtype):
    from deepspeed.runtime.zero.muon import original_muon as om
    fn = getattr(om, fn_name)
    fn = getattr(fn, "_torchdynamo_orig_callable", fn)               # uncompiled, as q0ds runs it without a compiler
    saved = om.ns_compute_dtype
    om.ns_compute_dtype = lambda method="gram": dtype
    try:
        t = time.perf_counter()
        out = fn(g.clone(), steps=5)
        return out.float(), time.perf_counter() - t
    finally:
        om.ns_compute_dtype = saved


def case(name, shape, scale, gen):
    g = grad_like(*shape, gen, scale)
    rows = []
    for method, fn_name, half in (("gram", "zeropower_via_gram_newtonschulz", torch.float16),
                                  ("standard", "zeropower_via_newtonschulz5", torch.bfloat16),
                                  ("gram", "zeropower_via_gram_newtonschulz", torch.bfloat16)):
        ref, t_ref = run_ns(fn_name, g, torch.float32)
        out, t_half = run_ns(fn_name, g, half)
        sv = torch.linalg.svdvals(out)
        sv_ref = torch.linalg.svdvals(ref)
        rows.append({"matrix": name, "shape": list(shape), "input_scale": scale, "method": method,
                     "dtype": str(half).replace("torch.", ""), "finite": bool(torch.isfinite(out).all()),
                     "rel_diff_vs_fp32": ((out - ref).norm() / ref.norm()).item(),
                     "sv_min": sv.min().item(), "sv_max": sv.max().item(), "sv_mean": sv.mean().item(),
                     "fp32_sv_min": sv_ref.min().item(), "fp32_sv_max": sv_ref.max().item(),
                     "seconds_fp32": round(t_ref, 3), "seconds_half": round(t_half, 3)})
        print(f"{name:14s} {str(tuple(shape)):14s} x{scale:<6g} {method:8s} {rows[-1]['dtype']:9s} "
              f"rel {rows[-1]['rel_diff_vs_fp32']:.2e}  sv [{rows[-1]['sv_min']:.3f}, {rows[-1]['sv_max']:.3f}] "
              f"(fp32 [{rows[-1]['fp32_sv_min']:.3f}, {rows[-1]['fp32_sv_max']:.3f}])", flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=8, help="divide the 1.8b shapes by this (default 8)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ns_fp16.json"))
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (r, c) in SHAPES_1_8B.items():
        for scale in (1.0, 1e4):
            rows += case(name, (r // a.scale, c // a.scale), scale, gen)
    worst = max(x["rel_diff_vs_fp32"] for x in rows if x["dtype"] == "float16")
    write_json(a.out, {"what": "Newton-Schulz (5 steps, DeepSpeed 0.19.8 original_muon.py) in fp16/bf16 vs fp32 on CPU",
                       "shape_divisor": a.scale, "cases": rows, "worst_fp16_gram_rel_diff": worst,
                       "all_finite": all(x["finite"] for x in rows), "machine": machine_info()})
    print(f"worst fp16 Gram relative difference {worst:.2e} -> {a.out}")


if __name__ == "__main__":
    main()
