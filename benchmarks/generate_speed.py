"""Generation speed of the top-K mixture vs K, next to plain transformers `generate` (KV cache) on one member.

    nice -n 5 .venv/bin/python benchmarks/generate_speed.py          # ~3-5 min on 2 shared CPU cores at load 15
    -> benchmarks/results/generate_speed.{json,md,png}

Members: K random-init models of the `small` preset's shape (Qwen3, d 128, 2 layers, vocab 2048, 0.95M params)
saved as real snapshots (write_snapshot) with the embedded corpus' tokenizer; speed does not depend on the
weights' values. Each timed call generates exactly NEW tokens per row after a PROMPT-token prompt (EOS is
disabled on both sides so every call does the same work), greedy, prefill included. All configurations are
timed round-robin in one process (ROUNDS rounds), so machine load hits them alike; the table gives the median
and the minimum. One torch thread: on this shared machine 2 OpenMP threads under load ran tiny forwards 15x
slower than 1. The requirement: a single member (K=1) within 1.2x of HF generate's time, per batch size.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import ROOT, env_defaults, machine_info, median, write_json  # noqa: E402

KS, BATCHES, PROMPT, NEW, ROUNDS = (1, 2, 4, 8), (1, 8), 16, 24, 3
OUT = ROOT / "benchmarks" / "results" / "generate_speed"


def build_members(root: Path, n: int):
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    from q0ds.data import PreparedData, prepare
    from q0ds.model import PRESETS, padded_vocab
    from q0ds.snapshot import snapshot_dir, write_snapshot
    data_dir = root / "data"
    prepare(data_dir, embedded=True, vocab_size=2048, fitness_tokens=2000, val_tokens=2000, max_train_tokens=20000)
    data = PreparedData.open(data_dir)
    mc = Qwen3Config(**PRESETS["small"], vocab_size=padded_vocab(data.vocab_size), tie_word_embeddings=False,
                     max_position_embeddings=2048, eos_token_id=None, pad_token_id=data.pad_id)
    dirs = []
    for i in range(n):
        torch.manual_seed(i)
        d = snapshot_dir(root / "run" / "bases" / f"base-{i:02d}", 0)
        write_snapshot(d, AutoModelForCausalLM.from_config(mc).state_dict(), mc, data.tokenizer_dir, {"base": i})
        dirs.append(d)
    return dirs


def main() -> dict:
    env_defaults()
    import torch
    from q0ds.ensemble import MixtureLM
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build_members(Path(tmp), max(KS))
        mixtures = {k: MixtureLM(dirs[:k], [1.0] * k, device="cpu", seq_len=2048) for k in KS}
        for lm in mixtures.values():
            lm.eos_id = None                      # fixed-length generation: every call does the same work
        hf = mixtures[1].models[0]
        g = torch.Generator().manual_seed(0)
        prompts = {b: torch.randint(2, 2000, (b, PROMPT), generator=g) for b in BATCHES}

        def ours(k, b):
            out = mixtures[k].generate_ids(prompts[b].tolist(), max_new_tokens=NEW, temperature=0, batch=b)
            assert all(len(o) == NEW for o in out)

        def plain(b):
            ids = prompts[b]
            out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False,
                              use_cache=True, pad_token_id=mixtures[1].pad_id)
            assert out.shape == (b, PROMPT + NEW)
        jobs = {f"hf_generate/b{b}": (lambda b=b: plain(b)) for b in BATCHES}
        jobs.update({f"mixture_k{k}/b{b}": (lambda k=k, b=b: ours(k, b)) for k in KS for b in BATCHES})
        for name, fn in jobs.items():             # warm-up
            fn()
            print(f"warm-up {name}", flush=True)
        times = {name: [] for name in jobs}
        for _ in range(ROUNDS):
            for name, fn in jobs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            print(f"round {len(times[name])}: " + ", ".join(f"{n} {t[-1]:.2f}s" for n, t in times.items()), flush=True)
        same = [mixtures[1].generate_ids(prompts[b].tolist(), NEW, 0, batch=b) ==
                hf.generate(input_ids=prompts[b], attention_mask=torch.ones_like(prompts[b]), max_new_tokens=NEW,
                            do_sample=False, pad_token_id=mixtures[1].pad_id)[:, PROMPT:].tolist() for b in BATCHES]
    rows = []
    for name, ts in times.items():
        what, b = name.split("/")
        b = int(b[1:])
        rows.append({"what": what, "k": int(what[9:]) if what.startswith("mixture") else None, "batch": b,
                     "median_s": round(median(ts), 4), "min_s": round(min(ts), 4), "all_s": [round(t, 4) for t in ts],
                     "tokens_per_s_median": round(b * NEW / median(ts), 1)})
    ratio = {f"b{b}": round(next(r["median_s"] for r in rows if r["what"] == "mixture_k1" and r["batch"] == b) /
                            next(r["median_s"] for r in rows if r["what"] == "hf_generate" and r["batch"] == b), 3)
             for b in BATCHES}
    res = {"config": {"model": "small preset shape, random init (0.95M params, vocab 2048)", "ks": KS,
                      "batches": BATCHES, "prompt_tokens": PROMPT, "new_tokens": NEW, "rounds": ROUNDS,
                      "greedy": True, "device": "cpu", "torch_threads": 1},
           "rows": rows, "k1_over_hf_generate_time": ratio, "requirement_k1_within_1.2x": all(v <= 1.2 for v in ratio.values()),
           "k1_greedy_tokens_equal_hf_generate": all(same),
           "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "machine": machine_info()}
    write_json(OUT.with_suffix(".json"), res)
    OUT.with_suffix(".md").write_text(table(res))
    plot(res)
    print(table(res))
    return res


def table(res) -> str:
    c = res["config"]
    lines = [f"Greedy generation, {c['prompt_tokens']}-token prompts + {c['new_tokens']} new tokens, CPU, 1 torch "
             f"thread, {c['model']}; median of {c['rounds']} round-robin calls (load average "
             f"{res['loadavg_before'][0]:.1f} before, {res['loadavg_after'][0]:.1f} after).", "",
             "| | " + " | ".join(f"batch {b} tokens/s" for b in c["batches"]) + " |",
             "|---|" + "---|" * len(c["batches"])]
    for what in ["hf_generate"] + [f"mixture_k{k}" for k in c["ks"]]:
        cells = [next(r for r in res["rows"] if r["what"] == what and r["batch"] == b)["tokens_per_s_median"]
                 for b in c["batches"]]
        label = "transformers generate (1 model)" if what == "hf_generate" else f"q0ds mixture K={what[9:]}"
        lines.append(f"| {label} | " + " | ".join(f"{x:.0f}" for x in cells) + " |")
    lines += ["", "K=1 time / HF generate time: " + ", ".join(f"{b} {v}" for b, v in res["k1_over_hf_generate_time"].items())
              + f" (requirement <= 1.2: {'met' if res['requirement_k1_within_1.2x'] else 'NOT met'}); K=1 greedy tokens "
              f"equal HF generate's: {res['k1_greedy_tokens_equal_hf_generate']}.", ""]
    return "\n".join(lines)


def plot(res):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    c = res["config"]
    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    for i, b in enumerate(c["batches"]):
        ys = [next(r for r in res["rows"] if r["what"] == f"mixture_k{k}" and r["batch"] == b)["tokens_per_s_median"]
              for k in c["ks"]]
        ax.plot(c["ks"], ys, "o-", color=f"C{i}", label=f"mixture, batch {b}")
        hf = next(r for r in res["rows"] if r["what"] == "hf_generate" and r["batch"] == b)["tokens_per_s_median"]
        ax.axhline(hf, color=f"C{i}", ls="--", lw=1, label=f"HF generate (1 model), batch {b}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(c["ks"], [str(k) for k in c["ks"]])
    ax.set_xlabel("K (members)")
    ax.set_ylabel("tokens/s (median)")
    ax.set_title("q0ds generate on CPU: tokens/s vs K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
