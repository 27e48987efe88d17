"""Measure the memory constants of `q0ds plan --memory` (issue 13), on CPU, at the real widths.

    .venv/bin/python benchmarks/memory_probe.py              # ~3 min: writes benchmarks/results/memory_probe.json
    .venv/bin/python benchmarks/memory_probe.py --quick      # tiny widths (the test's variant), prints JSON

1. Activations: bytes autograd saves per token per decoder layer (torch.autograd.graph.saved_tensors_hooks; a
   tensor is counted once per storage; parameters are not activations and are skipped), for the Qwen3 layer of
   transformers with SDPA, in the model dtype, at two FFN widths so the plan can write it as c_h h + c_I I, and
   with activation checkpointing on (what stays saved per layer). Measured on a model with the number of layers
   reduced (the count is per layer), at two sequence lengths (it must be linear in tokens: SDPA keeps no s^2).
2. The loss: peak resident memory (VmHWM of a fresh process, reset through /proc/self/clear_refs just before
   the loss, minus the RSS at that point) of forward + backward of the distillation loss on [1, seq, vocab] student and teacher
   logits, for the unchunked reference (q0ds.distill.reference_loss) and the chunked loss, plain CE and
   distilled: how many [tokens, vocab] fp32 copies the loss costs on top of the logits.
The JSON records the date, the versions of torch/transformers/deepspeed and the command; q0ds/plan.py's
MEASURED constants are copied from it and tests/test_plan.py checks the plan against it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

REAL = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, head_dim=128,
            intermediate_size=5632, vocab_size=50304)
QUICK = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
             intermediate_size=176, vocab_size=512)


def _model(arch: dict, layers: int, dtype, checkpointing: bool, dropout: float, device="cpu"):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    cfg = Qwen3Config(**arch, num_hidden_layers=layers, tie_word_embeddings=False, rms_norm_eps=1e-6,
                      max_position_embeddings=4096, attention_dropout=dropout, use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if checkpointing:
        from q0ds.compat import enable_activation_checkpointing
        enable_activation_checkpointing(m, {"use_reentrant": False})
    return m.train()


def saved_bytes_per_layer(arch: dict, seq: int, dtype="bfloat16", checkpointing=False, layers=2, batch=1,
                          dropout=0.0, device="cpu") -> float:
    """Bytes autograd keeps for backward inside the decoder layers, per token per layer (forward only)."""
    import torch
    m = _model(arch, layers, getattr(torch, dtype), checkpointing, dropout, device)
    # storages are identified by their StorageImpl address. Real tensors on CPU: on the meta device SDPA takes
    # the math path (an s^2 term the CPU and CUDA flash kernels do not have), so meta would mis-measure
    params = {p.untyped_storage()._cdata for p in m.parameters()}
    seen, total, inside = set(), [0], [0]

    def pack(t):
        if inside[0]:
            st = t.untyped_storage()
            key = st._cdata
            if key not in params and key not in seen:
                seen.add(key)
                total[0] += st.nbytes()
        return t

    def enter(*_):
        inside[0] += 1

    def leave(*_):
        inside[0] -= 1
    hooks = [h for layer in m.model.layers for h in (layer.register_forward_pre_hook(enter),
                                                     layer.register_forward_hook(leave))]
    dev = next(m.parameters()).device
    # the decoder stack alone, as Qwen3Model.forward calls it (no mask: SDPA runs is_causal; the head is measured
    # with the loss), so only the layers are hooked
    x = torch.zeros((batch, seq, arch["hidden_size"]), dtype=getattr(torch, dtype), device=dev).requires_grad_()
    pos = torch.arange(seq, device=dev)[None].expand(batch, -1)
    rope = m.model.rotary_emb(x, pos)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for layer in m.model.layers:
            x = layer(x, attention_mask=None, position_embeddings=rope, position_ids=pos)
            x = x[0] if isinstance(x, tuple) else x
    for h in hooks:
        h.remove()
    return total[0] / (batch * seq * layers)


def _loss_child(q, seq, V, dtype, variant, chunk_elems):
    import torch
    torch.set_num_threads(1)
    from q0ds.distill import distill_loss, reference_loss
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, seq, V, generator=g).to(getattr(torch, dtype)).requires_grad_()
    t = torch.randn(1, seq, V, generator=g).to(getattr(torch, dtype))
    y = torch.randint(0, V, (1, seq), generator=g)
    rss0 = _rss_now()
    with open("/proc/self/clear_refs", "w") as f:       # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        f.write("5")
    fn = reference_loss if variant.startswith("reference") else distill_loss
    kw = {} if variant.startswith("reference") else {"chunk_elems": chunk_elems}
    loss, _ = fn(s, t if variant.endswith("distilled") else None, y, 0.9, 1.0, **kw)
    loss.backward()
    peak = _hwm()
    q.put({"variant": variant, "peak_over_inputs_bytes": peak - rss0, "rss_before_bytes": rss0,
           "grad_bytes": s.grad.numel() * s.grad.element_size()})


def _hwm() -> int:
    """Peak resident set size (VmHWM) of this process, bytes."""
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmHWM:"))


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def loss_peaks(seq: int, V: int, dtype="float32", chunk_elems=None) -> dict:
    """Peak resident bytes of loss forward + backward above the logits themselves, one fresh process each."""
    ctx = mp.get_context("spawn")
    out = {}
    for variant in ("reference-plain", "chunked-plain", "reference-distilled", "chunked-distilled"):
        q = ctx.Queue()
        p = ctx.Process(target=_loss_child, args=(q, seq, V, dtype, variant, chunk_elems))
        p.start()
        r = q.get(timeout=900)
        p.join()
        r["full_vocab_fp32_copies"] = r["peak_over_inputs_bytes"] / (seq * V * 4)
        out[variant] = r
    return out


def fit_linear(arch, bytes_I1, bytes_I2, I1, I2):
    """bytes per token per layer = c_h * h + c_I * I, from two FFN widths at the same h."""
    c_I = (bytes_I1 - bytes_I2) / (I1 - I2)
    c_h = (bytes_I1 - c_I * I1) / arch["hidden_size"]
    return c_h, c_I


def measure(arch: dict, seqs=(16, 32), dtype="bfloat16", layers=1, loss_seq=2048, loss_dtype="float32") -> dict:
    import torch
    import transformers
    I1, I2 = arch["intermediate_size"], arch["intermediate_size"] // 2
    per = {s: saved_bytes_per_layer(arch, s, dtype, layers=layers) for s in seqs}
    half = saved_bytes_per_layer(dict(arch, intermediate_size=I2), seqs[0], dtype, layers=layers)
    ckpt = saved_bytes_per_layer(arch, seqs[0], dtype, checkpointing=True, layers=layers)
    drop = saved_bytes_per_layer(arch, seqs[0], dtype, layers=layers, dropout=0.1)
    c_h, c_I = fit_linear(arch, per[seqs[0]], half, I1, I2)
    try:
        import deepspeed
        ds_version = deepspeed.__version__
    except Exception as e:                                   # report, the activations do not need it
        ds_version = f"unavailable: {e!r}"
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": ds_version,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "arch": arch, "dtype": dtype, "layers_measured": layers, "attn_implementation": "sdpa",
        "activation_bytes_per_token_per_layer": {str(s): v for s, v in per.items()},
        "activation_bytes_per_token_per_layer_half_ffn": half,
        "activation_bytes_per_token_per_layer_dropout_0.1": drop,
        "activation_bytes_per_token_per_layer_checkpointing": ckpt,
        "fit": {"c_h": c_h, "c_I": c_I, "dtype_bytes": torch.empty((), dtype=getattr(torch, dtype)).element_size(),
                "formula": "bytes/token/layer = c_h * h + c_I * I (model dtype, SDPA, no dropout)"},
        "loss": {"seq": loss_seq, "vocab": arch["vocab_size"], "logits_dtype": loss_dtype,
                 "peaks": loss_peaks(loss_seq, arch["vocab_size"], loss_dtype)},
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny widths, no file written (the test's variant)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_probe.json"))
    args = ap.parse_args(argv)
    if args.quick:
        r = measure(QUICK, seqs=(32, 64), layers=2, loss_seq=64)
    else:
        r = measure(REAL, seqs=(16, 32), layers=1)   # bf16 GEMMs are slow on CPUs without bf16 units: short seqs
        Path(args.out).write_text(json.dumps(r, indent=1) + "\n")
    print(json.dumps(r, indent=1))
    return r


if __name__ == "__main__":
    main()
