"""Train one q0 base under the DeepSpeed launcher.

    deepspeed --num_gpus 8 launchers/train.py --config runs/paper/config.json --base 0 [key=value ...]
    DS_ACCELERATOR=cpu deepspeed --num_gpus 2 launchers/train.py --config tiny.json --base 0   # CPU ranks

Relaunching the same command resumes from the newest complete checkpoint. Exit code 75 means the run was
pre-empted (SIGUSR1/SIGTERM) after writing a checkpoint: relaunch (SLURM requeue) to continue.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--base", type=int, required=True)
    p.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    from q0ds.errors import user_errors
    from q0ds.config import load_config
    from q0ds.trainer import train_base
    try:
        return train_base(load_config(a.config, a.overrides), a.base)
    except user_errors() as e:
        print(f"q0ds train (rank {os.environ.get('RANK', 0)}): error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    code = main()
    from q0ds.engine import exit_process
    exit_process(code)          # not sys.exit: see engine.exit_process ("terminate called without an active exception")
