"""Serving the mixture: the KV-cached, batched, left-padded mixture equals an uncached per-row computation from
the HF members at every position (across the seq_len slide too); K=1 greedy equals transformers' `generate`;
export -> from_pretrained round trip; tampered members and broken tokenizers are refused; the CLI.

Members are random-init Qwen3 models (the `tiny` shape, initializer_range 0.2 so their distributions are far
from uniform) written as real snapshots with write_snapshot: the numerics need weights, not training."""
import json
import shutil

import pytest
import torch

from q0ds.snapshot import SnapshotError

SEQ_LEN = 8
WEIGHTS = [0.5, 0.3, 0.2]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny forwards on a shared 2-core machine: 2 OpenMP threads under load ran 15x slower than 1 (0.39 s vs
    0.025 s per forward at load 15)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def run(tmp_path_factory, embedded_data):
    from transformers import AutoModelForCausalLM, Qwen3Config
    from q0ds.config import load_config, save_config
    from q0ds.data import PreparedData
    from q0ds.model import padded_vocab
    from q0ds.presets import preset_config
    from q0ds.snapshot import snapshot_dir, write_snapshot
    run = tmp_path_factory.mktemp("serve") / "run"
    cfg = load_config(None, [f"train.seq_len={SEQ_LEN}"],
                      base=preset_config("tiny", data=str(embedded_data), run_dir=str(run)))
    save_config(cfg, run / "config.json")
    data = PreparedData.open(cfg.data)
    mc = Qwen3Config(vocab_size=padded_vocab(data.vocab_size), hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=16, intermediate_size=128,
                     max_position_embeddings=2048, tie_word_embeddings=False, initializer_range=0.2,
                     bos_token_id=data.eos_id, eos_token_id=data.eos_id, pad_token_id=data.pad_id)
    ids = []
    for b in range(3):
        torch.manual_seed(b)
        model = AutoModelForCausalLM.from_config(mc)
        write_snapshot(snapshot_dir(run / "bases" / f"base-{b:02d}", 0), model.state_dict(), mc, data.tokenizer_dir,
                       {"base": b, "cycle": 0})
        ids.append(f"base-{b:02d}/cycle-0000")
    (run / "prior.json").write_text(json.dumps({"members": ids, "weights": WEIGHTS, "topk": {}}))
    # an absolute-position model too: with RoPE (Qwen3) a per-row constant offset of the position ids cancels in
    # attention, so only a learned-position model shows a position id counted from the pads instead of the row
    from transformers import GPT2Config
    gc = GPT2Config(vocab_size=mc.vocab_size, n_positions=128, n_embd=64, n_layer=2, n_head=4, initializer_range=0.2,
                    bos_token_id=data.eos_id, eos_token_id=data.eos_id, pad_token_id=data.pad_id)
    torch.manual_seed(9)
    write_snapshot(run / "gpt2" / "snapshots" / "cycle-0000", AutoModelForCausalLM.from_config(gc).state_dict(), gc,
                   data.tokenizer_dir, {"base": 9, "cycle": 0})
    return run


def _reference(models, weights, ctx):
    """log sum_i w_i softmax(model_i(ctx))[-1], one unpadded row, no cache (positions 0..len-1)."""
    ids = torch.tensor([ctx])
    with torch.no_grad():
        lp = torch.stack([torch.log_softmax(m(input_ids=ids).logits[0, -1].float(), -1) + torch.tensor(w).log()
                          for m, w in zip(models, weights)])
    return torch.logsumexp(lp, 0)


def test_cached_batched_mixture_equals_uncached_per_row_at_every_position(run):
    from q0ds.ensemble import MixtureLM
    lm = MixtureLM.from_run(run, k=3, device="cpu")
    assert lm.seq_len == SEQ_LEN and lm.slide_keep == SEQ_LEN // 2 and lm.weights.tolist() == pytest.approx(WEIGHTS)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (3, 6, 2 * SEQ_LEN + 3, 1)]
    new, lps = lm.generate_ids(prompts, max_new_tokens=2 * SEQ_LEN + 2, temperature=1.0, seed=5, batch=3,
                               return_logprobs=True)
    slid = 0
    for prompt, toks, lp in zip(prompts, new, lps):
        assert lp.shape == (len(toks), lm.models[0].config.vocab_size)
        ctx = prompt[-SEQ_LEN:]
        for t, tok in enumerate(toks):
            ref = _reference(lm.models, WEIGHTS, ctx)
            assert (lp[t].exp() - ref.exp()).abs().max() < 1e-6, (len(prompt), t, len(ctx))
            assert (lp[t] - ref).abs().max() < 1e-4
            ctx.append(tok)
            if len(ctx) > SEQ_LEN:
                ctx, slid = ctx[-lm.slide_keep:], slid + 1
        assert len(toks) == 2 * SEQ_LEN + 2 or toks[-1] == lm.eos_id
    assert slid >= 4                   # the slide was exercised (several rows, several times)


@pytest.mark.parametrize("member", ["bases/base-00/snapshots/cycle-0000", "gpt2/snapshots/cycle-0000"])
def test_k1_greedy_equals_transformers_generate_on_a_left_padded_batch(run, member):
    from q0ds.ensemble import MixtureLM
    lm = MixtureLM([run / member], [1.0], device="cpu", seq_len=64)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(2, 500, (n,), generator=g).tolist() for n in (5, 12, 1, 9)]
    ours = lm.generate_ids(prompts, max_new_tokens=24, temperature=0, batch=4)
    ids, mask = lm._left_pad(prompts)
    hf = lm.models[0].generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                               use_cache=True, pad_token_id=lm.pad_id, eos_token_id=lm.eos_id)[:, ids.shape[1]:]
    for row, o in zip(hf.tolist(), ours):
        if lm.eos_id in row:
            row = row[:row.index(lm.eos_id) + 1]
        assert o == row
    assert len({tuple(o) for o in ours}) == 4


def test_export_and_from_pretrained_round_trip_gives_identical_logprobs(run, tmp_path):
    from transformers import AutoModelForCausalLM
    from q0ds.ensemble import FORMAT, MixtureLM
    lm = MixtureLM.from_run(run, k=2, device="cpu")
    out = lm.export(tmp_path / "mix")
    doc = json.loads((out / "mixture.json").read_text())
    assert doc["format"] == FORMAT and doc["version"] == 1 and doc["seq_len"] == SEQ_LEN
    assert [m["path"] for m in doc["members"]] == ["members/base-00_cycle-0000", "members/base-01_cycle-0000"]
    assert doc["weights"] == pytest.approx([0.5 / 0.8, 0.3 / 0.8])
    assert doc["source"] == {"run": str(run.resolve()), "k": 2}
    assert all(m["sha256"] == json.loads((run / "bases" / m["source"].split("/")[0] / "snapshots/cycle-0000/"
                                          "snapshot.json").read_text())["sha256"] for m in doc["members"])
    AutoModelForCausalLM.from_pretrained(out / "members/base-01_cycle-0000")     # plain HF dirs
    back = MixtureLM.from_pretrained(out, device="cpu")
    ids = torch.randint(2, 500, (3, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    assert torch.equal(back.logprobs(ids), lm.logprobs(ids))
    assert back.member_ids == lm.member_ids and back.seq_len == lm.seq_len
    assert back.tokenizer("import os").input_ids == lm.tokenizer("import os").input_ids
    with pytest.raises(SnapshotError, match="not an empty directory"):
        lm.export(out)


def test_a_tampered_member_a_broken_tokenizer_or_a_non_mixture_is_refused(run, tmp_path):
    from q0ds.ensemble import MixtureLM
    out = MixtureLM.from_run(run, k=2, device="cpu").export(tmp_path / "mix")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    victim = bad / "members/base-01_cycle-0000/model.safetensors"
    data = bytearray(victim.read_bytes())
    data[-7] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="base-01_cycle-0000/model.safetensors was modified after export"):
        MixtureLM.from_pretrained(bad)
    shutil.rmtree(bad)
    shutil.copytree(out, bad)
    (bad / "tokenizer/tokenizer.json").write_text('{"version": ')
    with pytest.raises(SnapshotError, match=r"tokenizer/tokenizer.json \(the tokenizer of .*\) is unusable: .*re-export the mixture"):
        MixtureLM.from_pretrained(bad)
    with pytest.raises(SnapshotError, match="mixture.json is missing"):
        MixtureLM.from_pretrained(run)


def q0ds(capsys, *args):
    from q0ds.cli import main
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_cli_generate_and_export_mixture(run, tmp_path, capsys):
    from q0ds.ensemble import MixtureLM
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("def main\n\nclass Foo\n")
    gen = ["--max-new-tokens", 6, "--temperature", 0, "--device", "cpu", "--batch", 2]
    code, out, err = q0ds(capsys, "generate", "--run", run, "--k", 2, "--prompt", "import os",
                          "--prompts-file", prompts, *gen)
    assert code == 0, err
    lm = MixtureLM.from_run(run, k=2, device="cpu")
    assert out == "".join(t + "\n" for t in lm.generate(["import os", "def main", "class Foo"], 6, 0)) and "tokens/s" in err
    code, out, err = q0ds(capsys, "export-mixture", "--run", run, "--k", 2, "--out", tmp_path / "mix")
    assert code == 0 and str(tmp_path / "mix") in out, err
    code, out2, err = q0ds(capsys, "generate", "--mixture", tmp_path / "mix", "--prompt", "import os", *gen)
    assert code == 0 and out2 == lm.generate("import os", 6, 0) + "\n", err
    for bad, msg in (((), "no prompt: give --prompt TEXT"),
                     (("--prompts-file", tmp_path / "nope.txt"), "nope.txt not found"),
                     (("--prompt", "x", "--device", "cuda:7"), "--device cuda:7")):
        code, _, err = q0ds(capsys, "generate", "--run", run, *bad)
        assert code == 2 and msg in err and "Traceback" not in err, err
    code, _, err = q0ds(capsys, "generate", "--mixture", run, "--prompt", "x")
    assert code == 2 and "mixture.json is missing" in err
    code, _, err = q0ds(capsys, "export-mixture", "--run", run, "--k", 2, "--out", tmp_path / "mix")
    assert code == 2 and "not an empty directory" in err
