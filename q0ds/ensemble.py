"""Inference with the top-K prior-weighted probability mixture of a run (Python API and `q0ds generate`).

    lm = MixtureLM.from_run("runs/demo", k=4)
    logp = lm.next_token_logprobs(input_ids)       # log sum_i w_i p_i(. | context), [batch, vocab]
    print(lm.generate("The import statement", max_new_tokens=40))

Mixing is in probability space (method.md), never logit averaging. All members share one tokenizer.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from .prior import read_prior_json
from .snapshot import verify


class MixtureLM:
    def __init__(self, snapshot_dirs, weights, device="cpu", seq_len: int | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        if len(snapshot_dirs) != len(weights) or not snapshot_dirs:
            raise ValueError("need one weight per snapshot dir, and at least one")
        for d in snapshot_dirs:
            verify(d)
        self.dirs = [Path(d) for d in snapshot_dirs]
        self.weights = torch.tensor(weights, dtype=torch.float64) / float(sum(weights))
        self.tokenizer = AutoTokenizer.from_pretrained(self.dirs[0], local_files_only=True)
        self.models = [AutoModelForCausalLM.from_pretrained(d, local_files_only=True).to(device).eval() for d in self.dirs]
        vocab = {m.config.vocab_size for m in self.models}
        if len(vocab) != 1:
            raise ValueError(f"members have different vocab sizes {sorted(vocab)}; they cannot be mixed token by token")
        self.device = device
        # the context the members were trained on; position embeddings beyond it exist but were never trained
        self.seq_len = seq_len or self.models[0].config.max_position_embeddings

    @classmethod
    def from_run(cls, run, k: int, device="cpu"):
        from .population import PriorError, topk_weights
        run = Path(run)
        if not (run / "prior.json").is_file():
            raise PriorError(f"{run / 'prior.json'} not found: run `q0ds fit-prior --run {run}` first")
        prior = read_prior_json(run / "prior.json")
        idx, w = topk_weights(prior["weights"], k)
        dirs = [run / "bases" / m.split("/")[0] / "snapshots" / m.split("/")[1] for m in (prior["members"][i] for i in idx)]
        return cls(dirs, w.tolist(), device, seq_len=_trained_seq_len(run))

    @torch.no_grad()
    def logprobs(self, input_ids) -> torch.Tensor:
        """Mixture log-probabilities at every position: [batch, seq, vocab] (float32)."""
        ids = torch.as_tensor(input_ids, device=self.device)
        out = None
        for m, w in zip(self.models, self.weights):
            lp = torch.log_softmax(m(input_ids=ids).logits.float(), -1) + math.log(max(float(w), 1e-300))
            out = lp if out is None else torch.logaddexp(out, lp)
        return out

    def next_token_logprobs(self, input_ids) -> torch.Tensor:
        return self.logprobs(input_ids)[:, -1]

    def generate(self, prompt: str, max_new_tokens: int = 40, temperature: float = 1.0, seed: int = 0) -> str:
        """Sample token by token from the mixture (temperature 0 = greedy)."""
        gen = torch.Generator().manual_seed(seed)
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids
        if ids.shape[1] > self.seq_len:
            print(f"q0ds generate: the prompt has {ids.shape[1]} tokens, more than the trained seq_len "
                  f"{self.seq_len}; the mixture sees only its last {self.seq_len} tokens", file=sys.stderr)
        for _ in range(max_new_tokens):
            lp = self.next_token_logprobs(ids[:, -self.seq_len:])[0].cpu()
            if temperature <= 0:
                nxt = int(lp.argmax())
            else:
                nxt = int(torch.multinomial(torch.softmax(lp / temperature, -1), 1, generator=gen))
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            if nxt == self.tokenizer.eos_token_id:
                break
        return self.tokenizer.decode(ids[0], skip_special_tokens=True)


def _trained_seq_len(run: Path) -> int | None:
    """train.seq_len of the run's resolved config (None if the run dir has no config.json)."""
    path = run / "config.json"
    return json.loads(path.read_text())["train"]["seq_len"] if path.is_file() else None
