"""Tests for q0ds.data and q0ds.corpus: prepare (embedded, JSONL, Parquet, txt, given tokenizer),
the training stream (purity, per-epoch coverage, no held-out leakage), evaluation windows, and errors.

Most stream tests use a synthetic corpus with a word-level tokenizer in which document i is the word
"d<i>" repeated, so every token id names the document it came from.
"""
import collections
import json
import shutil

import numpy as np
import pytest
import torch

from q0ds import data as qd
from q0ds.corpus import embedded_documents
from q0ds.data import FITNESS_TOKENS_DEFAULT, DataError, PreparedData, prepare

N_SYNTH = 60


def synth_len(i):
    return 20 + (i * 7) % 31


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


def word_level_tokenizer(path, n_words=N_SYNTH):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, "<|pad|>": 1, "[UNK]": 2, **{f"d{i}": i + 3 for i in range(n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>",
                            unk_token="[UNK]").save_pretrained(path)
    return path


def english_paragraphs(n, seed=0):
    words = ("the of and a to in is for that with as are on by this be it from or an at which not "
             "function value object class return module list string number call method type error").split()
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=30 + int(rng.integers(30)))).capitalize() + "." for _ in range(n)]


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "data"
    prepare(out, embedded=True)
    return PreparedData.open(out)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    tok = word_level_tokenizer(root / "tok")
    jsonl = write_jsonl(root / "docs.jsonl", [" ".join([f"d{i}"] * synth_len(i)) for i in range(N_SYNTH)])
    prepare(root / "data", input=jsonl, tokenizer=tok, fitness_tokens=100, val_tokens=150, seed=3)
    return PreparedData.open(root / "data")


def doc_id(token):  # synthetic corpus: token id -> source document index
    return int(token) - 3


def split_doc_ids(d, split):
    a, b = d.meta["splits"][split]
    return {doc_id(d.tokens[d.offsets[i]]) for i in range(a, b)}


# ---------------------------------------------------------------- embedded corpus and prepare

def test_embedded_corpus_is_deterministic_and_deduplicated():
    docs = embedded_documents()
    assert docs == embedded_documents()
    assert 80 <= len(docs) <= 200 and all(len(d) >= 300 for d in docs)
    long_paragraphs = [" ".join(p.split()) for d in docs for p in d.split("\n\n") if len(" ".join(p.split())) >= 100]
    assert len(long_paragraphs) == len(set(long_paragraphs))


def test_embedded_prepare_splits(embedded):
    d, meta = embedded, embedded.meta
    ranges = [range(*meta["splits"][s]) for s in ("fitness", "val", "train")]
    ids = [i for r in ranges for i in r]
    assert sorted(ids) == list(range(meta["n_docs"])) and len(ids) == len(set(ids))  # disjoint, complete
    counts = {s: int(sum(d.offsets[i + 1] - d.offsets[i] for i in r)) for s, r in zip(("fitness", "val", "train"), ranges)}
    assert counts == meta["n_tokens"]
    assert counts["fitness"] >= FITNESS_TOKENS_DEFAULT and counts["val"] >= 12000
    assert 55_000 <= counts["train"] <= 110_000  # the size cpu-scale.md asks for
    assert meta["vocab_size"] == 2048 and meta["dtype"] == "uint16"
    assert d.tokens.max() < meta["vocab_size"]


def test_embedded_tokenizer_reloads_offline_and_round_trips(embedded, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = embedded.load_tokenizer()
    assert len(tok) == embedded.vocab_size and tok.eos_token_id == embedded.eos_id
    text = 'def f(x):\n    return {"a": x ,  b}  # é, 你好\n\n\tEnd.'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    first = embedded.tokens[embedded.offsets[0]:embedded.offsets[1]].tolist()
    assert tok(tok.decode(first), add_special_tokens=False)["input_ids"] == first


def test_prepare_is_deterministic(embedded, tmp_path):
    meta = prepare(tmp_path / "again", embedded=True)
    assert meta["data_fingerprint"] == embedded.fingerprint
    assert meta["tokenizer_fingerprint"] == embedded.meta["tokenizer_fingerprint"]
    other = prepare(tmp_path / "seed1", embedded=True, seed=1)
    assert other["data_fingerprint"] != embedded.fingerprint


def test_max_train_tokens_cuts_whole_documents(tmp_path, synth):
    meta = prepare(tmp_path / "cut", input=synth.path.parent / "docs.jsonl", tokenizer=synth.tokenizer_dir,
                   fitness_tokens=100, val_tokens=150, seed=3, max_train_tokens=500)
    assert 500 - 50 <= meta["n_tokens"]["train"] <= 500
    assert meta["splits"]["val"] == synth.meta["splits"]["val"]  # held-out sets do not move


def test_test_split_leaves_other_splits_and_fingerprint_unchanged(tmp_path, synth):
    """The optional test split comes from documents the train cut leaves over: fitness/val/train, their
    windows and the data fingerprint (which every benchmark ledger entry carries) are what they were."""
    kw = dict(input=synth.path.parent / "docs.jsonl", tokenizer=synth.tokenizer_dir, fitness_tokens=100,
              val_tokens=150, seed=3, max_train_tokens=500)
    plain, with_test = prepare(tmp_path / "plain", **kw), prepare(tmp_path / "test", test_tokens=120, **kw)
    assert "test" not in plain["splits"] and with_test["n_tokens"]["test"] >= 120
    assert with_test["data_fingerprint"] == plain["data_fingerprint"]
    a, b = PreparedData.open(tmp_path / "plain"), PreparedData.open(tmp_path / "test")
    for split in ("fitness", "val", "train"):
        assert torch.equal(a.eval_windows(split, 16)[0], b.eval_windows(split, 16)[0]), split
    assert torch.equal(a.train_samples(0, 0, 0, 40, 16), b.train_samples(0, 0, 0, 40, 16))
    held = set().union(*(split_doc_ids(b, s) for s in ("fitness", "val", "train")))
    assert held.isdisjoint(split_doc_ids(b, "test"))
    b.verify()
    with pytest.raises(DataError, match="needs max_train_tokens"):
        prepare(tmp_path / "nocut", **{**kw, "max_train_tokens": None}, test_tokens=10)


# ---------------------------------------------------------------- training stream

def test_train_samples_pure_function_of_position(synth):
    whole = synth.train_samples(seed=0, base=1, start=0, n=10, seq_len=16)
    assert whole.shape == (10, 17) and whole.dtype == torch.int64
    parts = [synth.train_samples(0, 1, 0, 3, 16), synth.train_samples(0, 1, 3, 7, 16)]
    assert (whole == np.concatenate([p.numpy() for p in parts])).all()
    fresh = PreparedData.open(synth.path)  # no cache shared: same result
    w = synth.windows_per_epoch(16)
    across = slice(w - 2, w + 3)  # a call spanning an epoch boundary
    assert (fresh.train_samples(0, 1, w - 2, 5, 16) == synth.train_samples(0, 1, 0, w + 3, 16)[across]).all()


def test_train_samples_order_depends_on_seed_base_epoch(synth):
    w = synth.windows_per_epoch(16)
    ref = synth.train_samples(0, 0, 0, w, 16)
    assert not (ref == synth.train_samples(0, 1, 0, w, 16)).all()  # another base
    assert not (ref == synth.train_samples(1, 0, 0, w, 16)).all()  # another seed
    assert not (ref == synth.train_samples(0, 0, w, w, 16)).all()  # the next epoch


@pytest.mark.parametrize("epoch", [0, 1, 5])
def test_each_epoch_holds_each_train_doc_once_and_nothing_held_out(synth, epoch):
    seq = 16
    w = synth.windows_per_epoch(seq)
    win = synth.train_samples(7, 2, epoch * w, w, seq).numpy()
    assert (win[1:, 0] == win[:-1, -1]).all()  # consecutive windows share one boundary token
    stream = np.concatenate([win[:, :-1].ravel(), win[-1:, -1]])
    train = split_doc_ids(synth, "train")
    runs = [r[r != synth.eos_id] for r in np.split(stream, np.flatnonzero(stream == synth.eos_id))]
    runs = [r for r in runs if len(r)]
    seen = [doc_id(r[0]) for r in runs]
    assert all((r == r[0]).all() for r in runs)  # a document is never interleaved
    assert len(seen) == len(set(seen)) and set(seen) == train  # every train doc once, no held-out doc
    for r in runs[:-1]:
        assert len(r) == synth_len(doc_id(r[0]))  # whole documents ...
    assert len(runs[-1]) <= synth_len(seen[-1])
    dropped = synth.meta["n_tokens"]["train"] + len(train) - len(stream)
    assert 0 <= dropped < seq  # ... except the tail cut by windowing
    total = collections.Counter(stream[stream != synth.eos_id].tolist())
    expected = collections.Counter({i + 3: synth_len(i) for i in train})
    assert sum((expected - total).values()) <= dropped and not (total - expected)


def test_eval_windows_score_every_token_once(synth):
    for split in ("val", "fitness"):
        win, mask = synth.eval_windows(split, seq_len=16)
        a, b = synth.meta["splits"][split]
        assert win.shape[1] == 17 and mask.shape == (win.shape[0], 16)
        assert int(mask.sum()) == synth.meta["n_tokens"][split] + (b - a)
        labels = win[:, 1:][mask].tolist()
        assert collections.Counter(labels) == collections.Counter(
            {synth.eos_id: b - a, **{i + 3: synth_len(i) for i in split_doc_ids(synth, split)}})
        assert (win[:, 1:][~mask] == synth.pad_id).all()
        assert win[0, 0] == synth.eos_id


def test_splits_disjoint_by_content(synth):
    sets = [split_doc_ids(synth, s) for s in ("fitness", "val", "train")]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set().union(*sets) == set(range(N_SYNTH))


# ---------------------------------------------------------------- input formats

def test_parquet_input_with_text_field(tmp_path, synth):
    import pyarrow as pa
    import pyarrow.parquet as pq
    texts = [" ".join([f"d{i}"] * synth_len(i)) for i in range(N_SYNTH)]
    pq.write_table(pa.table({"body": texts, "n": list(range(N_SYNTH))}), tmp_path / "docs.parquet")
    meta = prepare(tmp_path / "pq", input=tmp_path / "docs.parquet", tokenizer=synth.tokenizer_dir,
                   fitness_tokens=100, val_tokens=150, seed=3, text_field="body")
    assert meta["data_fingerprint"] == synth.fingerprint  # same documents, same result as the JSONL
    with pytest.raises(DataError, match="no field 'text'"):
        prepare(tmp_path / "pq2", input=tmp_path / "docs.parquet", tokenizer=synth.tokenizer_dir)


def test_txt_directory_one_document_per_paragraph(tmp_path):
    paras = english_paragraphs(60)
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text("\n\n".join(paras[:30]) + "\n")
    (tmp_path / "in" / "sub" / "b.md").write_text("\n\n".join(paras[30:]))
    (tmp_path / "in" / ".hidden").write_text("ignored")
    meta = prepare(tmp_path / "out", input=tmp_path / "in", vocab_size=400, fitness_tokens=100, val_tokens=200)
    assert meta["n_docs"] == 60 and meta["vocab_size"] <= 400
    d = PreparedData.open(tmp_path / "out")
    tok = d.load_tokenizer()
    decoded = {tok.decode(d.tokens[d.offsets[i]:d.offsets[i + 1]]) for i in range(d.meta["n_docs"])}
    assert decoded == set(paras)


def test_trained_tokenizer_never_sees_held_out_documents(tmp_path):
    rng = np.random.default_rng(0)
    marks = ["".join(rng.choice(list("bcdfghjklmnpqrstvwxz"), size=8)) for _ in range(40)]
    docs = [p + (" " + m) * 20 for p, m in zip(english_paragraphs(40), marks)]  # a unique word per document
    prepare(tmp_path / "out", input=write_jsonl(tmp_path / "m.jsonl", docs), vocab_size=1000,
            fitness_tokens=200, val_tokens=300)
    d = PreparedData.open(tmp_path / "out")
    tok = d.load_tokenizer()
    vocab = tok.get_vocab()
    learned = {}  # split -> [is this document's unique word a single token?]
    for split, (a, b) in d.meta["splits"].items():
        texts = [tok.decode(d.tokens[d.offsets[i]:d.offsets[i + 1]]) for i in range(a, b)]
        learned[split] = [("\u0120" + m in vocab) for t in texts for m in marks if m in t]
    assert not any(learned["fitness"]) and not any(learned["val"])
    assert sum(learned["train"]) >= 0.8 * len(learned["train"])  # the check can see a learned word


def test_given_tokenizer_from_trained_bpe(tmp_path, embedded):
    paras = english_paragraphs(40, seed=1)
    jsonl = write_jsonl(tmp_path / "x.jsonl", paras)
    meta = prepare(tmp_path / "out", input=jsonl, tokenizer=embedded.tokenizer_dir, fitness_tokens=50, val_tokens=100)
    assert meta["vocab_size"] == embedded.vocab_size
    assert meta["tokenizer_fingerprint"] == embedded.meta["tokenizer_fingerprint"]
    d = PreparedData.open(tmp_path / "out")
    d.verify()
    assert d.load_tokenizer().decode(d.tokens[d.offsets[0]:d.offsets[1]]) in paras


# ---------------------------------------------------------------- errors and atomic writes

def test_missing_input(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        prepare(tmp_path / "out", input=tmp_path / "nope.jsonl")
    assert "nope.jsonl" in str(e.value) and not (tmp_path / "out").exists()


def test_empty_corpus(tmp_path):
    jsonl = write_jsonl(tmp_path / "e.jsonl", ["", "   \n", None])
    with pytest.raises(DataError, match="empty corpus"):
        prepare(tmp_path / "out", input=jsonl)


def test_unknown_file_type(tmp_path):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "a.jsonl", english_paragraphs(5))
    (tmp_path / "in" / "table.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unknown file type") as e:
        prepare(tmp_path / "out", input=tmp_path / "in")
    assert "table.csv" in str(e.value)


def test_too_small_for_requested_sets(tmp_path, synth):
    jsonl = synth.path.parent / "docs.jsonl"
    with pytest.raises(DataError, match="too small.*fitness_tokens=100000"):
        prepare(tmp_path / "a", input=jsonl, tokenizer=synth.tokenizer_dir, fitness_tokens=100_000)
    with pytest.raises(DataError, match="too small.*fitness_tokens=100000"):  # trained-tokenizer path
        prepare(tmp_path / "b", input=write_jsonl(tmp_path / "p.jsonl", english_paragraphs(20)), fitness_tokens=100_000)
    with pytest.raises(DataError, match="training document"):  # held-out sets leave < 2 train documents
        prepare(tmp_path / "c", input=jsonl, tokenizer=synth.tokenizer_dir, fitness_tokens=100, val_tokens=150,
                max_train_tokens=30)
    with pytest.raises(DataError, match="too small for seq_len"):
        synth.windows_per_epoch(10**6)


def test_corrupt_and_incomplete_data_detected(tmp_path, synth):
    copy = tmp_path / "copy"
    shutil.copytree(synth.path, copy)
    PreparedData.open(copy).verify()
    with open(copy / "tokens.bin", "r+b") as f:  # same size, one byte changed
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(DataError, match="corrupt prepared data"):
        PreparedData.open(copy).verify()
    with open(copy / "tokens.bin", "r+b") as f:
        f.truncate(20)
    with pytest.raises(DataError, match="corrupt prepared data"):
        PreparedData.open(copy)
    (copy / "meta.json").unlink()
    with pytest.raises(DataError, match="meta.json is missing.*q0ds prepare"):
        PreparedData.open(copy)


def test_tokenizer_vocab_mismatch_detected(tmp_path, synth):
    copy = tmp_path / "copy"
    shutil.copytree(synth.path, copy)
    shutil.rmtree(copy / "tokenizer")
    word_level_tokenizer(copy / "tokenizer", n_words=N_SYNTH + 5)
    with pytest.raises(DataError, match="vocab mismatch"):
        PreparedData.open(copy).load_tokenizer()


def test_failed_prepare_leaves_nothing_and_rerun_replaces(tmp_path, synth, monkeypatch):
    args = dict(input=synth.path.parent / "docs.jsonl", tokenizer=synth.tokenizer_dir, fitness_tokens=100, val_tokens=150)

    def killed(*a, **k):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(qd, "_data_fingerprint", killed)
        with pytest.raises(KeyboardInterrupt):
            prepare(tmp_path / "out", **args)
    assert list(tmp_path.iterdir()) == []  # no output and no temp dir left behind
    first = prepare(tmp_path / "out", **args)
    second = prepare(tmp_path / "out", **args, seed=5)  # a previous prepare output is replaced
    assert PreparedData.open(tmp_path / "out").fingerprint == second["data_fingerprint"] != first["data_fingerprint"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a prepared data dir"):
        prepare(tmp_path / "other", **args)
