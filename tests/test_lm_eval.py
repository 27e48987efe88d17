"""lm-evaluation-harness integration (q0ds/lm_eval_adapter.py, q0ds/tasks/): offline, on two tiny random
Qwen3 models that share a byte-level BPE tokenizer (lm-eval.md step 1), plus one with another tokenizer.

- weights (1, 0) reproduce lm_eval's own `hf` model exactly (every request, every metric);
- a 0.5/0.5 mixture runs both shipped tasks and matches an unbatched float64 p-space computation;
- run=RUN, k=K resolves members/weights from prior.json; bad K and mismatched tokenizers fail clearly.
"""
import json
import math
import os
import shutil
import sys

import pytest
import torch

MAXLEN = 128          # forces several rolling windows per q0ds_ppl doc and left-truncation of long MC items


def _tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")


def _model(out, tok, seed):
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    # initializer_range 0.3 (not 0.02): peaked, clearly different members, so a wrong mixing rule
    # (e.g. averaging log-probs) would be far outside the tolerances below.
    cfg = Qwen3Config(vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=16, intermediate_size=128, tie_word_embeddings=False,
                      max_position_embeddings=2048, initializer_range=0.3, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id)
    Qwen3ForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module", autouse=True)
def _fast_lm_eval():
    """These models are tiny: one intra-op thread is faster, and does not stall on a busy 2-core box.
    simple_evaluate() also runs torch's collect_env (`pip list` and more in subprocesses, 2-8 s) on every
    call, for a provenance field no test reads."""
    import lm_eval.evaluator
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
        yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """m1, m2: same tokenizer, seeds 1 and 2; m3: a tokenizer trained on other text."""
    from pydoc_data.topics import topics
    d = tmp_path_factory.mktemp("lm_eval_models")
    texts = [topics[k] for k in sorted(topics)]          # ~465 KB of English prose
    tok = _tokenizer(texts)
    other = _tokenizer([t[::-1] for t in texts[:40]])
    return {"m1": _model(d / "m1", tok, 1), "m2": _model(d / "m2", tok, 2), "m3": _model(d / "m3", other, 3)}


def _eval(lm, tasks, limit):
    from q0ds.lm_eval_adapter import _evaluate
    return _evaluate(lm, tasks, None, limit, log_samples=True, bootstrap_iters=0)


def _resps(res, task):
    """Every request's raw answer, in order: [(loglikelihood, is_greedy)] or [loglikelihood]."""
    return [s["resps"] for s in res["samples"][task]]


# ----------------------------------------------------------------------------------------- shipped tasks
def test_shipped_tasks_load_from_any_cwd(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager
    from q0ds.lm_eval_adapter import SHIPPED_TASKS, TASKS_DIR
    monkeypatch.chdir(tmp_path)                         # relative data paths would break here
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    assert set(SHIPPED_TASKS) <= set(tm.all_tasks)
    tasks = tm.load_task_or_group(list(SHIPPED_TASKS))
    mc, ppl = tasks["q0ds_mc"], tasks["q0ds_ppl"]
    docs = list(mc.test_docs())
    assert len(docs) == 200 and len(list(ppl.test_docs())) == 30
    assert all(len(d["choices"]) == 4 and 0 <= d["label"] < 4 for d in docs)
    assert sorted({d["label"] for d in docs}) == [0, 1, 2, 3]
    assert mc.doc_to_text(docs[0]) == docs[0]["context"]
    shipped = sum(f.stat().st_size for f in TASKS_DIR.glob("*.jsonl"))
    assert shipped < 200_000


def test_shipped_data_matches_generator(tmp_path):
    """The JSONL files are what the generator writes (byte for byte under the recording interpreter)."""
    import hashlib
    from q0ds.tasks import q0ds_taskdata as T
    meta = json.loads((T.HERE / T.META_FILE).read_text())
    for name in (T.MC_FILE, T.PPL_FILE):
        assert hashlib.sha256((T.HERE / name).read_bytes()).hexdigest() == meta[name]["sha256"], name
    if meta["python"] != sys.version.split()[0]:
        pytest.skip(f"docstrings differ across Python versions; data was made with {meta['python']}")
    fresh = T.write(tmp_path)
    assert fresh[T.MC_FILE] == meta[T.MC_FILE] and fresh[T.PPL_FILE] == meta[T.PPL_FILE]


# ----------------------------------------------------------------------------------------- parity with `hf`
def test_weights_1_0_reproduce_hf_exactly(tiny):
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer
    from q0ds.lm_eval_adapter import MixLM, compact_results
    tasks, limit = ["q0ds_mc", "q0ds_ppl"], 6
    hf = _eval(HFLM(pretrained=tiny["m1"], batch_size=4, device="cpu", max_length=MAXLEN), tasks, limit)
    mix = _eval(MixLM(pretrained=f"{tiny['m1']}|{tiny['m2']}", weights="1|0", max_length=MAXLEN), tasks, limit)
    for t in tasks:
        assert _resps(mix, t) == _resps(hf, t), t                       # every request, bit for bit
    assert compact_results(mix) == compact_results(hf)
    tok = AutoTokenizer.from_pretrained(tiny["m1"])                      # several rolling windows per doc
    assert min(len(tok.encode(s["doc"]["text"])) for s in hf["samples"]["q0ds_ppl"]) > MAXLEN


# ----------------------------------------------------------------------------------------- the mixture
def _brute_ll(dirs, weights, ctx, cont):
    """Unbatched float64 log sum_i w_i p_i(cont | ctx), mixing probabilities."""
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([ctx + cont])
    p = 0
    for d, w in zip(dirs, weights):
        m = AutoModelForCausalLM.from_pretrained(d).double().eval()
        with torch.no_grad():
            p = p + w * torch.softmax(m(ids).logits[0].double(), -1)
    rows = p[len(ctx) - 1:len(ctx) - 1 + len(cont)]
    ll = sum(math.log(rows[k, t]) for k, t in enumerate(cont))
    return ll, bool((rows.argmax(-1) == torch.tensor(cont)).all())


def test_mixture_matches_bruteforce(tiny):
    from transformers import AutoTokenizer
    from q0ds.lm_eval_adapter import MixLM, compact_results
    dirs, w = [tiny["m1"], tiny["m2"]], [0.5, 0.5]
    lm = MixLM(pretrained=dirs, weights=w)
    res = _eval(lm, ["q0ds_mc", "q0ds_ppl"], 3)
    metrics = compact_results(res)
    assert 0 <= metrics["q0ds_mc"]["acc"] <= 1 and metrics["q0ds_ppl"]["bits_per_byte"] > 0
    tok = AutoTokenizer.from_pretrained(tiny["m1"])

    # multiple choice: every (context, choice) request of 3 docs
    for s in res["samples"]["q0ds_mc"]:
        for (ctx_s, cont_s), [(ll, greedy)] in zip(s["arguments"], s["resps"]):
            whole, ctx = tok.encode(ctx_s + cont_s), tok.encode(ctx_s)
            ref, ref_greedy = _brute_ll(dirs, w, ctx, whole[len(ctx):])
            assert abs(ll - ref) <= 1e-5 * max(1.0, abs(ref)), (ll, ref)
            assert greedy == ref_greedy
    # perplexity: the shortest doc fits one 2048-token window: context = [BOS]
    s = min(res["samples"]["q0ds_ppl"], key=lambda s: len(s["doc"]["text"]))
    ref, _ = _brute_ll(dirs, w, [tok.bos_token_id], tok.encode(s["doc"]["text"]))
    got = float(s["resps"][0][0])
    assert abs(got - ref) <= 1e-5 * abs(ref), (got, ref)

    # a short request, absolute tolerance; the mixture differs from both members and from log-averaging
    ctx, cont = "Return the number of items", " in the list."
    (ll,) = [r[0] for r in lm.loglikelihood([_Req((ctx, cont))])]
    whole, c = tok.encode(ctx + cont), tok.encode(ctx)
    ref, _ = _brute_ll(dirs, w, c, whole[len(c):])
    assert abs(ll - ref) < 1e-5
    lone = [_brute_ll([d], [1.0], c, whole[len(c):])[0] for d in dirs]
    assert min(abs(ll - x) for x in lone + [sum(lone) / 2]) > 1e-2


class _Req:
    """The part of lm_eval's Instance that LM.loglikelihood reads."""
    def __init__(self, args):
        self.args = args


# ----------------------------------------------------------------------------------------- run=RUN, k=K
@pytest.fixture(scope="module")
def fake_run(tiny, tmp_path_factory):
    from q0ds.prior import PriorFit, write_prior_json
    from q0ds.snapshot import sha256_file
    run = tmp_path_factory.mktemp("lm_eval_run")
    ids = ["base-00/cycle-0000", "base-00/cycle-0001", "base-01/cycle-0000"]
    for mid, src in zip(ids, ["m1", "m2", "m1"]):
        snap = run / "bases" / mid.replace("/", "/snapshots/")
        shutil.copytree(tiny[src], snap)
        (snap / "snapshot.json").write_text(json.dumps({"sha256": sha256_file(snap / "model.safetensors"),
                                                        "scored": True}))
    w = [0.2, 0.5, 0.3]
    fit = PriorFit(logits=[math.log(x) for x in w], weights=w, loss=0.0, history=[], steps=0)
    write_prior_json(run / "prior.json", ids, fit, ks=[1, 2])          # K=3 is not in the table
    return run


def test_run_k_resolution(fake_run):
    from q0ds.lm_eval_adapter import MixLM, resolve_run
    from q0ds.population import PriorError
    ids, dirs, w = resolve_run(fake_run, 1)
    assert ids == ["base-00/cycle-0001"] and w == [1.0]
    assert dirs == [fake_run / "bases/base-00/snapshots/cycle-0001"]
    ids, _, w = resolve_run(fake_run, 2)                          # from the topk table
    assert ids == ["base-00/cycle-0001", "base-01/cycle-0000"] and w == pytest.approx([5 / 8, 3 / 8])
    ids, _, w = resolve_run(fake_run, 3)                          # not in the table: top_k() fallback
    assert ids == ["base-00/cycle-0001", "base-01/cycle-0000", "base-00/cycle-0000"]
    assert w == pytest.approx([0.5, 0.3, 0.2])
    with pytest.raises(PriorError, match="k=4 is out of range.*3 members"):
        resolve_run(fake_run, 4)
    with pytest.raises(PriorError, match="k=0 is out of range"):
        MixLM(run=str(fake_run), k=0)
    with pytest.raises(PriorError, match="prior.json not found"):
        resolve_run(fake_run / "nowhere", 1)
    lm = MixLM(run=str(fake_run), k="2")                          # CLI model_args arrive as strings
    assert lm.member_ids == ["base-00/cycle-0001", "base-01/cycle-0000"]
    assert lm.weights == pytest.approx([5 / 8, 3 / 8])


def test_run_lm_eval_writes_compact_json(fake_run, tiny, tmp_path):
    from q0ds.lm_eval_adapter import MixLM, run_lm_eval, run_lm_eval_hf
    # K=1 is the top member alone: the same numbers as lm_eval's `hf` model on that snapshot
    top = run_lm_eval(fake_run, k=1, tasks=["q0ds_mc", "q0ds_ppl"], limit=2, output=tmp_path / "k1.json")
    hf = run_lm_eval_hf(fake_run / "bases/base-00/snapshots/cycle-0001", ["q0ds_mc", "q0ds_ppl"], limit=2)
    assert top["tasks"] == hf["tasks"] and json.loads((tmp_path / "k1.json").read_text()) == top

    doc = run_lm_eval(fake_run, k=2, tasks="q0ds_mc", limit=4)
    saved = json.loads((fake_run / "lm_eval_k2.json").read_text())
    assert saved == doc
    assert doc["members"] == ["base-00/cycle-0001", "base-01/cycle-0000"] and doc["k"] == 2
    assert set(doc["tasks"]["q0ds_mc"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    assert doc["n_samples"]["q0ds_mc"] == 4
    # the same mixture given as dirs + weights scores identically
    same = MixLM(pretrained=[tiny["m2"], tiny["m1"]], weights=[5, 3])
    assert _resps(_eval(same, ["q0ds_mc"], 4), "q0ds_mc") == \
        _resps(_eval(MixLM(run=str(fake_run), k=2), ["q0ds_mc"], 4), "q0ds_mc")


# ----------------------------------------------------------------------------------------- errors
def test_tokenizer_mismatch_is_a_clear_error(tiny, tmp_path):
    from q0ds.lm_eval_adapter import LMEvalError, MixLM, check_shared_tokenizer
    with pytest.raises(LMEvalError, match="differ in their tokenizer.*share one tokenizer"):
        MixLM(pretrained=[tiny["m1"], tiny["m3"]], weights=[0.5, 0.5])
    wide = tmp_path / "wide"                                      # same tokenizer, other logit width
    shutil.copytree(tiny["m1"], wide)
    cfg = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps(dict(cfg, vocab_size=576)))
    with pytest.raises(LMEvalError, match="differ in their model vocab_size"):
        check_shared_tokenizer([tiny["m1"], wide])
    with pytest.raises(LMEvalError, match="2 members but 1 weights"):
        MixLM(pretrained=[tiny["m1"], tiny["m2"]], weights=[1.0])
    with pytest.raises(LMEvalError, match="either pretrained"):
        MixLM()


def test_generate_until_matches_hf_greedy(tiny):
    from lm_eval.models.huggingface import HFLM
    from q0ds.lm_eval_adapter import MixLM
    reqs = [_Req(("The with statement", {"until": ["\n\n"], "max_gen_toks": 12, "do_sample": False})),
            _Req(("Return a new", {"until": ["."], "max_gen_toks": 8}))]
    hf = HFLM(pretrained=tiny["m1"], batch_size=1, device="cpu")
    mix = MixLM(pretrained=[tiny["m1"], tiny["m2"]], weights=[1, 0])
    assert mix.generate_until(reqs) == hf.generate_until(reqs)
    both = MixLM(pretrained=[tiny["m1"], tiny["m2"]], weights=[0.5, 0.5]).generate_until(reqs)
    assert all(isinstance(s, str) for s in both)


# ----------------------------------------------------------------------------------------- CLIs
@pytest.mark.slow
def test_lm_eval_cli_with_q0mix(tiny, fake_run, tmp_path):
    """`python -m q0ds.lm_eval_adapter` is lm_eval's CLI with q0mix registered; `q0ds lm-eval` wraps run_lm_eval."""
    import subprocess
    from conftest import run_cli
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    p = subprocess.run([sys.executable, "-m", "q0ds.lm_eval_adapter", "--model", "q0mix", "--model_args",
                        f"pretrained={tiny['m1']}|{tiny['m2']},weights=0.5|0.5", "--tasks", "q0ds_mc",
                        "--limit", "4", "--batch_size", "2",                # --include_path: added for us
                        "--output_path", str(tmp_path / "out")],
                       cwd=tmp_path, env=env, text=True, capture_output=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "q0ds_mc" in p.stdout and "acc" in p.stdout
    assert list((tmp_path / "out").rglob("results_*.json"))
    out = tmp_path / "cli.json"
    p = run_cli("lm-eval", "--run", fake_run, "--k", "1", "--tasks", "q0ds_ppl", "--limit", "2", "--output", out)
    assert json.loads(out.read_text())["tasks"]["q0ds_ppl"]["bits_per_byte"] > 0
