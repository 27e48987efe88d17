"""One rank of tests/test_universal_muon.py, run under the deepspeed launcher:
    universal_muon_rank.py CONFIG OUT.pt
Builds the base-0 trainer, resumes (a universal conversion when the checkpoint came from another world size),
writes the loaded state to OUT.pt.loaded (rank 0), trains until done or pre-empted (Q0DS_FAULT), and writes the
state the last checkpoint holds to OUT.pt (rank 0): {"step", "fp32": {name: t}, "optim": {name: {key: t}}}."""
import sys

import torch

from q0ds import engine as E
from q0ds.config import load_config
from q0ds.trainer import BaseTrainer


def dump(tr, path):
    state = {"step": tr.step, "fp32": E.full_fp32_params(tr.student), "optim": E.full_optimizer_state(tr.student)}
    if tr.rank == 0:
        torch.save(state, path)


def main(config, out):
    cfg = load_config(config, [])
    tr = BaseTrainer(cfg, 0)
    tr._resume()
    if tr.step > 0:                              # resumed: the state as loaded, before any step
        dump(tr, out + ".loaded")
    code = tr._train_loop()
    dump(tr, out)
    E.finish()
    return code


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    E.exit_process(main(*args))
