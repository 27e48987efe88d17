"""`q0ds` console script. Subcommands:

    q0ds prepare --embedded --out data/embedded            tokenise a corpus (or --input PATH)
    q0ds init-config --preset tiny --data DATA --run RUN --out CONFIG.json [key=value ...]
    q0ds train --config CONFIG --base 0 [--device auto] [key=value ...]  one base, 1 process (no launcher)
    q0ds run --config CONFIG                               all bases, then prior, eval and report
    q0ds fit-prior --run RUN | eval --run RUN [--k 1,2,4] | report --run RUN
    q0ds rescore --run RUN [--member base-00/cycle-0003]   score snapshots whose score files are missing
    q0ds generate --run RUN --k 4 --prompt TEXT [--prompt TEXT2 | --prompts-file F] [--batch 8 --device auto]
    q0ds generate --mixture DIR --prompt TEXT               the same from an exported mixture
    q0ds export-mixture --run RUN --k 4 --out DIR           one dir: members/, tokenizer/, mixture.json
    q0ds plan --epochs 64 | plan --memory --model 1.8b --gpus 8
    q0ds demo [--out runs/demo]
    q0ds config-get --config CONFIG KEY                    print a resolved config value (SLURM scripts)

User errors (missing files, bad config, corrupt snapshots...) print one clear line and exit 2, no traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading


from .errors import user_errors

_user_errors = user_errors         # the former private name (launchers on older checkouts import it)


# Fitness-set floor (issue 20, decided on fitness alone): with 750 fitness tokens the learned prior scored worse
# than the uniform mixture on held-out fitness tokens at 32 and 64 epochs in every seed; from 1500 up it did not
# at 64 epochs (benchmarks/de_honest.py fitness_size_on_fitness). Below this `prepare` warns. The default size
# is q0ds.data.FITNESS_TOKENS_DEFAULT.
FITNESS_TOKENS_MIN = 1500


def cmd_prepare(a):
    from .data import FITNESS_TOKENS_DEFAULT, SPLITS, DataError, prepare
    sizes = {"fitness_tokens": FITNESS_TOKENS_DEFAULT, "val_tokens": 12000, "max_train_tokens": None}
    if a.split:
        given = [f"--{k.replace('_', '-')}" for k in sizes if getattr(a, k) is not None]
        if given:
            raise DataError(f"--split {a.split} sets the split sizes; drop {', '.join(given)} or drop --split")
        if not a.tokenizer:
            raise DataError(f"--split {a.split} is the paper's data, which uses the GPT-2 tokenizer: pass its local "
                            "dir as --tokenizer (e.g. a save_pretrained copy of `gpt2`)")
        sizes.update(SPLITS[a.split])
    for k in sizes:
        if getattr(a, k) is not None:
            sizes[k] = getattr(a, k)
    a.fitness_tokens, a.val_tokens, a.max_train_tokens = sizes["fitness_tokens"], sizes["val_tokens"], sizes["max_train_tokens"]
    if a.fitness_tokens < FITNESS_TOKENS_MIN:
        print(f"warning: --fitness-tokens {a.fitness_tokens} is below {FITNESS_TOKENS_MIN}: the learned prior is fit "
              "on this set, and fitted on 750 tokens it scored worse than the uniform mixture on held-out fitness "
              "tokens at 32 and 64 epochs in every seed (benchmarks/results/data_efficiency_honest.md, defaults)",
              file=sys.stderr)
    meta = prepare(a.out, input=a.input, embedded=a.embedded, tokenizer=a.tokenizer, vocab_size=a.vocab_size,
                   fitness_tokens=a.fitness_tokens, val_tokens=a.val_tokens, max_train_tokens=a.max_train_tokens,
                   seed=a.seed, text_field=a.text_field, test_tokens=a.test_tokens)
    print(json.dumps({k: meta[k] for k in ("vocab_size", "n_tokens", "n_docs") if k in meta}))
    return 0


def cmd_init_config(a):
    from .config import load_config, save_config
    from .presets import preset_config
    cfg = load_config(None, a.overrides, base=preset_config(a.preset, data=a.data, run_dir=a.run))
    save_config(cfg, a.out)
    print(a.out)
    return 0


def cmd_train(a):
    from .devices import pin_ds_accelerator
    pin_ds_accelerator(a.device)            # before DeepSpeed is imported; cpu only when asked or without a GPU
    from .config import load_config
    from .trainer import train_base
    return train_base(load_config(a.config, a.overrides), a.base)


def cmd_config_get(a):
    from .config import get_key, load_config
    v = get_key(load_config(a.config, a.overrides), a.key)
    print(json.dumps(v) if not isinstance(v, str) else v)
    return 0


def cmd_fit_prior(a):
    from .population import fit_prior_run
    fit_prior_run(a.run, steps=a.steps, lr=a.lr)
    return 0


def cmd_rescore(a):
    from .population import rescore_run
    rescore_run(a.run, members=a.member, device=a.device)
    return 0


def cmd_eval(a):
    from .population import eval_run
    eval_run(a.run, ks=[int(k) for k in a.k.split(",")] if a.k else None, device=a.device)
    return 0


def cmd_report(a):
    from .report import write_report
    print(write_report(a.run))
    return 0


def cmd_generate(a):
    from pathlib import Path
    from .config import ConfigError
    from .devices import resolve_device
    from .ensemble import MixtureLM
    prompts = list(a.prompt or [])
    if a.prompts_file:
        path = Path(a.prompts_file)
        if not path.is_file():
            raise ConfigError(f"--prompts-file {path} not found: give a text file with one prompt per line")
        prompts += [line for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompt: give --prompt TEXT (repeatable) or --prompts-file FILE (one prompt a line)")
    if a.batch < 1 or a.max_new_tokens < 0:
        raise ConfigError(f"--batch {a.batch} must be >= 1 and --max-new-tokens {a.max_new_tokens} >= 0")
    device = resolve_device(a.device)              # before any loading: a bad --device fails at once
    if a.mixture:
        lm = MixtureLM.from_pretrained(a.mixture, device=device)
    else:
        lm = MixtureLM.from_run(a.run, k=a.k, device=device)
    texts = lm.generate(prompts, max_new_tokens=a.max_new_tokens, temperature=a.temperature, seed=a.seed,
                        batch=a.batch)
    for t in texts:
        print(t)
    n, dt = lm.last_stats["new_tokens"], lm.last_stats["seconds"]
    print(f"[q0ds] {len(prompts)} prompt(s), K={len(lm.models)} on {lm.device}: {n} new tokens in "
          f"{dt:.2f} s ({n / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def cmd_export_mixture(a):
    from .ensemble import export_mixture, run_members
    from pathlib import Path
    dirs, weights, ids, seq_len = run_members(a.run, a.k)
    out = export_mixture(dirs, weights, ids, dirs[0], seq_len, {"run": str(Path(a.run).resolve()), "k": a.k}, a.out)
    print(out)
    return 0


def cmd_run(a):
    from .runner import run_all
    return run_all(a.config, a.overrides, parallel=a.parallel, ranks=a.ranks, baselines=a.baselines,
                   ensemble_members=a.ensemble_members)


def cmd_demo(a):
    from .demo import demo
    return demo(a.out, quick=a.quick)


def cmd_plan(a):
    from . import plan
    if a.memory:
        mem = plan.memory_plan(model=a.model, gpus=a.gpus, micro_batch=a.micro_batch, seq_len=a.seq_len,
                               optimizer=a.optimizer, checkpointing=a.checkpointing, gpu_mem_gb=a.gpu_mem_gb,
                               teacher_mode=a.teacher_mode)
        print(plan.format_memory_plan(mem, plan.time_plan(model=a.model, gpus=a.gpus, seq_len=a.seq_len)))
        print(plan.format_teacher_choice(plan.teacher_choice(a.model, a.gpus, a.micro_batch, a.seq_len, a.optimizer,
                                                             a.gpu_mem_gb, a.checkpointing, a.teacher_mode)))
        print(plan.format_traffic(a.model, a.gpus, a.global_batch, a.seq_len, a.optimizer, a.gpu_mem_gb, a.teacher_mode))
        return 0
    alloc = plan.plan_budget(a.epochs, nodes=a.nodes, schedule=a.schedule)
    print(json.dumps(alloc.to_dict(), indent=2, default=str))
    if a.plot:
        plan.plot_allocation(alloc, a.plot)
        print(f"plot: {a.plot}")
    return 0


def cmd_lm_eval(a):
    from .lm_eval_adapter import run_lm_eval
    print(json.dumps(run_lm_eval(a.run, k=a.k, tasks=a.tasks.split(","), include_path=a.include_path,
                                 limit=a.limit, output=a.output), indent=2))
    return 0


def cmd_distill_ensemble(a):
    from .ensemble_distill import distill_ensemble
    return distill_ensemble(a.run, k=a.k, overrides=a.overrides, device=a.device)


DEVICE_HELP = "auto (default: the GPU if torch sees one, else the CPU), cpu, cuda or cuda:N"


def build_parser() -> argparse.ArgumentParser:
    from .data import FITNESS_TOKENS_DEFAULT
    from .presets import PRESETS
    p = argparse.ArgumentParser(prog="q0ds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("prepare", help="tokenise a corpus into a prepared data dir")
    s.add_argument("--input", help="text/JSONL/Parquet file or directory")
    s.add_argument("--embedded", action="store_true", help="use the built-in corpus (CPython's docs topics)")
    s.add_argument("--out", required=True)
    s.add_argument("--tokenizer", help="local HF tokenizer dir; default: train a byte-level BPE")
    s.add_argument("--vocab-size", type=int, default=2048)
    s.add_argument("--split", choices=["paper"], help="named split sizes: paper = 132k fitness / 10M val / 100M "
                   "train tokens (the q0 paper; needs --tokenizer with GPT-2's)")
    s.add_argument("--fitness-tokens", type=int, default=None,
                   help=f"default {FITNESS_TOKENS_DEFAULT} (decided on fitness: docs/results-data-efficiency.md)")
    s.add_argument("--val-tokens", type=int, default=None, help="default 12000")
    s.add_argument("--max-train-tokens", type=int, default=None)
    s.add_argument("--test-tokens", type=int, default=0, help="a test split from the documents --max-train-tokens "
                   "leaves over (no other split changes); scored with every snapshot, read by no decision")
    s.add_argument("--text-field", default="text")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("init-config", help="write a complete run config from a preset")
    s.add_argument("--preset", default="tiny", help="a preset of q0ds/presets.py: " + " | ".join(PRESETS))
    s.add_argument("--data", required=True)
    s.add_argument("--run", required=True, help="run dir")
    s.add_argument("--out", required=True)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_init_config)

    for name, fn, hlp in (("train", cmd_train, "train one base in this process (1 rank, no launcher)"),
                          ("config-get", cmd_config_get, "print one resolved config value")):
        s = sub.add_parser(name, help=hlp)
        s.add_argument("--config", required=True)
        if name == "train":
            s.add_argument("--base", type=int, default=0)
            s.add_argument("--device", default="auto", help="auto (default), cpu or cuda: cpu sets DS_ACCELERATOR=cpu")
        else:
            s.add_argument("key")
        s.add_argument("overrides", nargs="*")
        s.set_defaults(fn=fn)

    s = sub.add_parser("run", help="all bases on this machine, then prior, eval, report")
    s.add_argument("--config", required=True)
    s.add_argument("--parallel", type=int, default=1, help="bases trained side by side")
    s.add_argument("--ranks", type=int, default=1, help="DeepSpeed ranks per base")
    s.add_argument("--baselines", action="store_true", help="also train the single-model and ensemble baselines")
    s.add_argument("--ensemble-members", type=int, default=4)
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("fit-prior", help="fit the learned prior from stored fitness scores")
    s.add_argument("--run", required=True)
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--lr", type=float, default=0.5)
    s.set_defaults(fn=cmd_fit_prior)

    s = sub.add_parser("rescore", help="score snapshots on the fitness and val sets from their weights")
    s.add_argument("--run", required=True)
    s.add_argument("--member", action="append", help="base-XX/cycle-XXXX (repeatable); default: every "
                   "snapshot missing a score file")
    s.add_argument("--device", default="auto", help=DEVICE_HELP)
    s.set_defaults(fn=cmd_rescore)

    s = sub.add_parser("eval", help="validation loss of the top-K mixtures")
    s.add_argument("--run", required=True)
    s.add_argument("--k", default=None, help="comma-separated K values (default 1,2,4,...,M)")
    s.add_argument("--device", default="auto", help="for snapshots scored from their weights: " + DEVICE_HELP)
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("report", help="report.md, report.json and plots")
    s.add_argument("--run", required=True)
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("generate", help="sample from the top-K mixture (batched, KV-cached)")
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run dir: its top-K members by the prior")
    src.add_argument("--mixture", help="a dir written by `q0ds export-mixture`")
    s.add_argument("--k", type=int, default=4, help="with --run (default 4)")
    s.add_argument("--prompt", action="append", help="repeatable")
    s.add_argument("--prompts-file", help="one prompt per line (blank lines skipped)")
    s.add_argument("--batch", type=int, default=8, help="prompts per batch (default 8)")
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--device", default="auto", help="auto (cuda if present, else cpu) | cpu | cuda | cuda:N")
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("export-mixture", help="write the top-K mixture as one dir (members, tokenizer, weights)")
    s.add_argument("--run", required=True)
    s.add_argument("--k", type=int, default=4)
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_export_mixture)

    s = sub.add_parser("plan", help="budget planner, or GPU memory plan with --memory")
    s.add_argument("--epochs", type=float, default=64)
    s.add_argument("--nodes", type=int, default=None)
    s.add_argument("--schedule", default="uniform", choices=("uniform", "packed"),
                   help="uniform cycles (default; measured best) or the previous packed rule (q0ds/plan.py)")
    s.add_argument("--plot", default=None)
    s.add_argument("--memory", action="store_true")
    s.add_argument("--model", default="1.8b")
    s.add_argument("--gpus", type=int, default=8)
    s.add_argument("--micro-batch", type=int, default=4)
    s.add_argument("--seq-len", type=int, default=2048)
    s.add_argument("--optimizer", default="muon", choices=("muon", "adamw"),
                   help="the 1.8b preset's is muon (default); adamw for ds_configs' AdamW-only setting")
    s.add_argument("--checkpointing", action="store_true",
                   help="plan with activation checkpointing (run config train.activation_checkpointing=true)")
    s.add_argument("--gpu-mem-gb", type=float, default=80)
    s.add_argument("--global-batch", type=int, default=256, help="sequences per optimizer step (1.8b preset: 256)")
    s.add_argument("--teacher-mode", default="auto", choices=("auto", "replicated", "zero3"),
                   help="run config distill.teacher_mode: auto = a bf16 replica per GPU when it fits")
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("lm-eval", help="downstream tasks with lm-evaluation-harness on the top-K mixture")
    s.add_argument("--run", required=True)
    s.add_argument("--k", type=int, default=4)
    s.add_argument("--tasks", required=True)
    s.add_argument("--include-path", default=None)
    s.add_argument("--limit", type=int, default=None)
    s.add_argument("--output", default=None)
    s.set_defaults(fn=cmd_lm_eval)

    s = sub.add_parser("distill-ensemble", help="distil the top-K mixture into one model")
    s.add_argument("--run", required=True)
    s.add_argument("--k", type=int, default=4)
    s.add_argument("--device", default="auto", help="in-process runs: auto (default), cpu or cuda (DS_ACCELERATOR)")
    s.add_argument("overrides", nargs="*")
    s.set_defaults(fn=cmd_distill_ensemble)

    s = sub.add_parser("demo", help="the main job on the embedded corpus, end to end")
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--quick", action="store_true", help="smaller budget (CI smoke)")
    s.set_defaults(fn=cmd_demo)
    return p


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every `finally`/`except BaseException` removes its temp
    files (an atomic write's, prepare's temp dir). `q0ds train` installs its own handler (checkpoint, exit 75)."""


def _terminate(signum, frame):
    raise Terminated(signal.Signals(signum).name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.fn(args) or 0
    except user_errors() as e:
        print(f"q0ds {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as e:
        name = str(e) or "SIGINT"
        print(f"q0ds {args.cmd}: stopped by {name}; files being written were not installed and their temp "
              "files were removed", file=sys.stderr)
        return 128 + getattr(signal, name, signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
