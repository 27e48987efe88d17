"""Model construction from a `transformers` config, so every snapshot is a plain HF model dir.

Presets use Qwen3 (RMSNorm, RoPE, SwiGLU, QK-norm: the q0 paper's architecture). `1.8b` is the paper's
model (30 layers, d 2048, 16 heads of 128, SwiGLU 5632, untied embeddings, vocab 50304: 1.748B params).
Any AutoModelForCausalLM config (a dir or a config.json) works through `model.config_path`.
"""
from __future__ import annotations

from pathlib import Path

import torch

PRESETS = {
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                 head_dim=16, intermediate_size=128),
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                  head_dim=32, intermediate_size=384),
    "1.8b": dict(hidden_size=2048, num_hidden_layers=30, num_attention_heads=16, num_key_value_heads=16,
                 head_dim=128, intermediate_size=5632, vocab_size=50304),
}


class ModelError(ValueError):
    pass


def padded_vocab(n: int, multiple: int = 64) -> int:
    return (n + multiple - 1) // multiple * multiple


def build_config(mcfg, tokenizer_vocab: int, eos_id: int, pad_id: int, max_len: int):
    """A transformers config for the run's model; checks that the vocab covers the tokenizer."""
    from transformers import AutoConfig, Qwen3Config
    if mcfg.config_path:
        p = Path(mcfg.config_path)
        if not p.exists():
            raise ModelError(f"model.config_path {p} not found")
        config = AutoConfig.from_pretrained(p.parent if p.is_file() else p, local_files_only=True,
                                            trust_remote_code=False)
    else:
        kw = dict(PRESETS[mcfg.preset])
        kw.setdefault("vocab_size", padded_vocab(tokenizer_vocab))
        # model.dropout is residual dropout (build_model), as in the reference; no attention-probability dropout
        config = Qwen3Config(**kw, tie_word_embeddings=False, rms_norm_eps=1e-6,
                             max_position_embeddings=max(2048, max_len), attention_dropout=0.0)
    if config.vocab_size < tokenizer_vocab:
        raise ModelError(f"model vocab_size {config.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} tokens; "
                         "use a model config with a larger vocab or a smaller tokenizer")
    config.bos_token_id = config.eos_token_id = eos_id
    config.pad_token_id = pad_id
    config.use_cache = False
    return config


def build_model(config, seed: int, dropout: float = 0.0):
    """Fresh model with a deterministic init from `seed` (the base's seed), with residual dropout `dropout`."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    add_residual_dropout(model, dropout)
    return model


def add_residual_dropout(model, p: float) -> int:
    """Residual dropout as in the reference (slowrun unlimited/train.py): dropout on the attention output
    (after o_proj) and on the MLP output of every decoder layer, before each is added to the residual stream.
    Done with forward hooks, so the module tree, the state dict and the saved config stay plain Qwen3 (a
    snapshot loads in transformers without them, where dropout is off at eval anyway). Active in train mode
    only. Returns the number of hooks added."""
    if p <= 0:
        return 0
    import torch.nn.functional as F

    def hook(module, args, out):
        if not module.training:
            return out
        if isinstance(out, tuple):                       # attention returns (output, weights)
            return (F.dropout(out[0], p, True), *out[1:])
        return F.dropout(out, p, True)
    n = 0
    for layer in getattr(getattr(model, "model", model), "layers", []):
        for sub in (getattr(layer, "self_attn", None), getattr(layer, "mlp", None)):
            if sub is not None:
                sub.register_forward_hook(hook)
                n += 1
    if n == 0:
        raise ModelError(f"model.dropout={p}: found no decoder layers with self_attn/mlp in "
                         f"{type(model).__name__} to apply residual dropout to; set model.dropout=0")
    return n


def param_count(model) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())


def param_group_name(name: str, p) -> str:
    """LR group of a parameter: matrices, embeddings, head, scalars (1-D: norms, biases)."""
    if "embed" in name:
        return "embed"
    if "lm_head" in name:
        return "head"
    shape = getattr(p, "ds_shape", p.shape)
    return "matrix" if len(shape) >= 2 else "scalar"
