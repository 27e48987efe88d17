"""Token data: `prepare` once, then `PreparedData` feeds every base the same way.

    from q0ds.data import prepare, PreparedData
    prepare("data/pydoc", embedded=True)              # or input="corpus.jsonl" / "shards/" / "book.txt"
    data = PreparedData.open("data/pydoc")
    batch = data.train_samples(seed=0, base=3, start=step * 32, n=32, seq_len=128)  # LongTensor [32, 129]
    windows, mask = data.eval_windows("val", seq_len=128)                             # [n, 129], [n, 128]

A prepared dir holds:
    tokens.bin   every document's token ids back to back, no separators (uint16; uint32 if vocab > 65535)
    docs.npy     int64 offsets [n_docs + 1]: document d is tokens[docs[d]:docs[d + 1]]
    meta.json    vocab, eos/pad ids, splits, token counts, fingerprints, source, the prepare arguments
    tokenizer/   a Hugging Face tokenizer dir (save_pretrained), copied into every snapshot

Documents are stored in shuffled order (np.random.default_rng(seed).permutation), so each split is a
half-open range of document ids in meta["splits"]: fitness = whole documents from the front until
>= fitness_tokens, then validation until >= val_tokens, then train (cut at max_train_tokens, whole
documents). The split does not depend on the base: every base trains on the same documents.
test (test_tokens > 0, optional): whole documents from those that max_train_tokens left over, after train
in tokens.bin, so fitness/val/train and the data fingerprint (over those three) are exactly what they are
without it; a split that no decision reads (the benchmarks report on it only). It needs max_train_tokens.

Inputs (read with `datasets`): .txt/.text/.md files give one document per blank-line-separated block
(this works for a single big file; use JSONL for explicit document boundaries), and so does a file without
an extension when it is UTF-8 text (a non-UTF-8 file is named in the error); .json/.jsonl/.parquet
give one document per row from `text_field`; files may be .gz/.bz2/.xz/.zst compressed; a directory is
read recursively (hidden files skipped, any other file type is an error).

Tokenizer: a local Hugging Face tokenizer dir, or a byte-level BPE trained here on training documents
only. Its token counts are not known before it exists, so the held-out documents are first reserved by
size (_BYTES_PER_TOKEN bytes per requested token), the BPE is trained on the rest, and the exact split is
then made by tokens inside that reserve (reserved documents left over go to train); if the reserve was
too small it is enlarged and the BPE retrained. The tokenizer never sees a fitness or validation document
(it does see train documents later dropped by max_train_tokens).
With a given tokenizer, vocab_size is unused and the split is exact. prepare holds the corpus in memory
(text and uint32 ids); shard corpora larger than RAM.
"""
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .compat import require
from .files import set_default_mode

FORMAT = 1
EOS, PAD = "<|endoftext|>", "<|pad|>"
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_BYTES_PER_TOKEN = 4.5  # a 2k-vocab byte-level BPE on English prose is ~3.6; enlarged on a miss


class DataError(ValueError):
    """A problem with the user's data or a prepared dir; the message names it and says what to do."""


# ---------------------------------------------------------------- prepare
# Named splits for `q0ds prepare --split NAME`. paper: the q0 paper's data (method.md "Scale of the real
# run"): a ~132k-token fitness set of whole documents from the front, 10M validation tokens, 100M training
# tokens, with the GPT-2 tokenizer (pass its local dir as --tokenizer; the 1.8b preset pads its vocab to 50304).
SPLITS = {"paper": {"fitness_tokens": 132_000, "val_tokens": 10_000_000, "max_train_tokens": 100_000_000}}


# Fitness-set size: decided on fitness alone (issue 20): the prior fitted on the first n fitness tokens and scored
# on held-out fitness tokens had the lowest mean loss over 3 seeds at n = 3000 at 32 and 64 epochs (750 to 12000
# tried; best per seed 3000/3000/12000 at 32, 3000 in all at 64; benchmarks/de_honest.py fitness_size_on_fitness,
# from the retention study's populations). Was 6000 (from val).
FITNESS_TOKENS_DEFAULT = 3000


def prepare(out_dir, input=None, embedded=False, tokenizer=None, vocab_size=2048, fitness_tokens=FITNESS_TOKENS_DEFAULT,
            val_tokens=12000, max_train_tokens=None, seed=0, text_field="text", test_tokens=0) -> dict:
    """Read, tokenize, split and write a prepared data dir atomically; returns its meta (see module doc)."""
    out = Path(out_dir)
    _check_target(out)
    if fitness_tokens < 1 or val_tokens < 1:
        raise DataError(f"fitness_tokens ({fitness_tokens}) and val_tokens ({val_tokens}) must be >= 1")
    if tokenizer is None and vocab_size < 258:
        raise DataError(f"vocab_size {vocab_size} is below the 256 byte symbols + 2 special tokens")
    if embedded == (input is not None):
        raise DataError("pass exactly one of --input PATH or --embedded")
    if embedded:
        from q0ds.corpus import embedded_documents, embedded_source, interpreter_note
        docs, source = embedded_documents(), embedded_source()
        note = interpreter_note()
        if note:
            print(f"prepare: {note}", flush=True)
    else:
        docs, source = _read_documents(Path(input), text_field)
    n_read = len(docs)
    docs = [d for d in docs if d.strip()]
    if not docs:
        what = (f"its {n_read} records are all null or blank in field '{text_field}'" if n_read and not embedded
                else "it has no documents")
        raise DataError(f"empty corpus: {source}: {what}; pass --text-field naming the column that holds the "
                        "text, or an input with non-empty documents")
    print(f"prepare: {len(docs)} documents from {source}", flush=True)
    docs = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]

    if tokenizer is not None:
        tok = _load_tokenizer(tokenizer)
        ids = [a for a in _encode(tok, docs) if len(a)]  # a normalizer may empty a document
        split = _split_counts([len(a) for a in ids], fitness_tokens, val_tokens)
    else:
        tok, ids, split = _train_tokenizer_and_encode(docs, vocab_size, fitness_tokens, val_tokens)
    if split is None:
        raise DataError(f"corpus too small: {sum(map(len, ids))} tokens in {len(ids)} documents cannot hold "
                        f"fitness_tokens={fitness_tokens} + val_tokens={val_tokens}; lower them or add data")
    n_fit, n_val = split
    train = ids[n_fit + n_val:]
    test = []
    if test_tokens and max_train_tokens is None:
        raise DataError(f"test_tokens={test_tokens} needs max_train_tokens: the test split is taken from the "
                        "documents the train cut leaves over, so that no other split changes")
    if max_train_tokens is not None:  # whole documents, a prefix of the shuffled train documents
        rest = train
        train = train[:int(np.searchsorted(np.cumsum([len(a) for a in train]), max_train_tokens, side="right"))]
        if test_tokens:
            left = rest[len(train):]
            cum = np.cumsum([len(a) for a in left])
            if not len(left) or cum[-1] < test_tokens:
                raise DataError(f"corpus too small for test_tokens={test_tokens}: the train cut leaves "
                                f"{int(cum[-1]) if len(left) else 0} tokens; lower test_tokens or max_train_tokens")
            test = left[:int(np.searchsorted(cum, test_tokens)) + 1]
    if len(train) < 2:
        raise DataError(f"corpus too small: only {len(train)} training document(s) left after the fitness and "
                        f"validation sets (and max_train_tokens); lower fitness_tokens/val_tokens or add data")
    ids = ids[:n_fit + n_val] + train + test
    bounds = np.cumsum([0, n_fit, n_val, len(train), len(test)]).tolist()
    names = ("fitness", "val", "train") + (("test",) if test else ())
    splits = {name: bounds[i:i + 2] for i, name in enumerate(names)}
    n_tokens = {name: int(sum(len(a) for a in ids[a:b])) for name, (a, b) in splits.items()}
    vocab = len(tok)
    if max(int(a.max()) for a in ids) >= vocab:
        raise DataError(f"tokenizer {tokenizer} produced ids >= its length {vocab}; use a consistent tokenizer")
    dtype = np.dtype(np.uint16 if vocab <= 65535 else np.uint32)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # padding is always masked

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    set_default_mode(tmp)           # mkdtemp's 0700 would keep the data private to its writer
    try:
        tok.save_pretrained(tmp / "tokenizer")
        with open(tmp / "tokens.bin", "wb") as f:
            for a in ids:
                a.astype(dtype).tofile(f)
        np.save(tmp / "docs.npy", np.cumsum([0] + [len(a) for a in ids], dtype=np.int64))
        meta = {"format": FORMAT, "vocab_size": vocab, "eos_id": tok.eos_token_id, "pad_id": pad_id,
                "dtype": dtype.name, "n_docs": len(ids), "splits": splits, "n_tokens": n_tokens,
                "tokenizer": str(Path(tokenizer).resolve()) if tokenizer else f"byte-level BPE, vocab_size={vocab_size}",
                "tokenizer_fingerprint": _tokenizer_fingerprint(tmp / "tokenizer"),
                "data_fingerprint": _data_fingerprint(tmp, dtype.name, splits), "source": source, "seed": seed,
                **({"test_fingerprint": _test_fingerprint(tmp, dtype.name, splits)} if test else {}),
                "args": {"fitness_tokens": fitness_tokens, "val_tokens": val_tokens, **({"test_tokens": test_tokens} if test else {}),
                         "max_train_tokens": max_train_tokens, "text_field": text_field}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"prepare: wrote {out}: vocab {vocab}, tokens {n_tokens}, docs fitness/val/train "
          f"{n_fit}/{n_val}/{len(train)}", flush=True)
    return meta


def _check_target(out: Path) -> None:
    """Refuse early (before any work) to overwrite anything but a previous prepare output or an empty dir."""
    if out.exists() and (not out.is_dir() or any(out.iterdir()) and not (out / "meta.json").exists()):
        raise DataError(f"{out} exists and is not a prepared data dir; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _install(tmp: Path, out: Path) -> None:
    """Rename the finished temp dir into place; a previous output is swapped out, then deleted."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "data")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _builder(path: Path):
    """The `datasets` builder for a file, by extension; a file without one is plain text if it decodes as such."""
    name = path.name.lower()
    for ext in _COMPRESSED:
        name = name.removesuffix(ext)
    suffix = Path(name).suffix
    if suffix == "" and name == path.name.lower():       # no extension at all (and not compressed)
        return "text" if _utf8_error(path) is None else None
    return _BUILDERS.get(suffix)


def _utf8_error(path: Path, chunk=1 << 20):
    """None if the (uncompressed) file is UTF-8 text without NUL bytes, else where and why it is not."""
    import codecs
    dec, offset = codecs.getincrementaldecoder("utf-8")(), 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            try:
                dec.decode(block, final=not block)
            except UnicodeDecodeError as e:
                return f"byte {offset + e.start} is not UTF-8 ({e.reason})"
            nul = block.find(b"\0")
            if nul >= 0:
                return f"byte {offset + nul} is a NUL (binary data)"
            if not block:
                return None
            offset += len(block)


def _read_documents(path: Path, text_field: str):
    if not path.exists():
        raise DataError(f"input {path} does not exist: pass a text/JSONL/Parquet file, a directory of them, or --embedded")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if not files:
        raise DataError(f"empty corpus: input directory {path} has no files")
    groups: dict[str, list[str]] = {}
    for f in files:
        builder = _builder(f)
        if builder is None:
            raise DataError(f"unknown file type: {f}; supported: {' '.join(_BUILDERS)} (optionally "
                            f"{' '.join(_COMPRESSED)} compressed), or UTF-8 text without an extension; rename "
                            "plain-text files to .txt to include them, or move other files out of the input")
        if builder != "parquet" and not f.name.lower().endswith(_COMPRESSED):
            bad = _utf8_error(f)       # `datasets` would name the first file of the group, not the bad one
            if bad:
                raise DataError(f"{f} is not UTF-8 text: {bad}; convert it (e.g. `iconv -f latin1 -t utf-8`) "
                                "or move it out of the input")
        groups.setdefault(builder, []).append(str(f))
    datasets = require("datasets", "data", f"reading {path}")
    docs = []
    with tempfile.TemporaryDirectory() as cache:  # the Arrow cache stays out of ~/.cache and is not reused stale
        for builder, names in sorted(groups.items()):
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            try:
                ds = datasets.load_dataset(builder, data_files=names, split="train", cache_dir=cache, **extra)
            except Exception as e:
                raise DataError(f"could not read {builder} input {names[0]}{' ...' if len(names) > 1 else ''}: {e}") from e
            field = "text" if builder == "text" else text_field
            if field not in ds.column_names:
                raise DataError(f"{names[0]}: no field '{field}' (columns: {ds.column_names}); pass --text-field")
            for value in ds[field]:
                if value is not None and not isinstance(value, str):
                    raise DataError(f"{names[0]}: field '{field}' holds {type(value).__name__}, not text "
                                    f"(columns: {ds.column_names}); pass --text-field naming a string column, or "
                                    f"convert '{field}' to strings")
                docs.append((value or "").strip("\n") if builder == "text" else (value or ""))
    return docs, f"{path.resolve()} ({len(files)} file{'s' * (len(files) > 1)})"


def _load_tokenizer(path):
    """A local Hugging Face tokenizer dir (never downloaded), as DataError if it cannot be loaded."""
    from transformers import AutoTokenizer
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"tokenizer {path} is not a directory: pass a local Hugging Face tokenizer dir")
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise DataError(f"could not load the tokenizer in {path} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                        "pass a dir written by a tokenizer's save_pretrained (its tokenizer.json must be valid "
                        "JSON), or omit --tokenizer to train a byte-level BPE") from e
    if tok.eos_token_id is None:
        raise DataError(f"tokenizer {path} has no eos token; documents are separated by it: set eos_token")
    return tok


def _train_bpe(docs, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   clean_up_tokenization_spaces=False)


def _train_tokenizer_and_encode(docs, vocab_size, fitness_tokens, val_tokens):
    """Reserve held-out documents by size, train the BPE on the rest, split exactly (module doc)."""
    cum_bytes = np.cumsum([len(d.encode()) for d in docs])
    factor = _BYTES_PER_TOKEN
    while True:
        n_reserve = int(np.searchsorted(cum_bytes, factor * (fitness_tokens + val_tokens))) + 1
        if n_reserve > len(docs) - 2:  # the tokenizer and train need at least 2 documents
            raise DataError(f"corpus too small: {int(cum_bytes[-1])} bytes in {len(docs)} documents cannot hold "
                            f"fitness_tokens={fitness_tokens} + val_tokens={val_tokens} plus 2 training documents; "
                            f"lower them or add data")
        print(f"prepare: training byte-level BPE (vocab {vocab_size}) on {len(docs) - n_reserve} documents", flush=True)
        tok = _train_bpe(docs[n_reserve:], vocab_size)
        held = _encode(tok, docs[:n_reserve])
        split = _split_counts([len(a) for a in held], fitness_tokens, val_tokens)
        if split is not None:
            return tok, held + _encode(tok, docs[n_reserve:]), split
        factor *= 1.5


def _encode(tok, docs, batch=256):
    """Token ids per document (no special tokens added), as uint32 arrays, with a progress bar."""
    backend = getattr(tok, "backend_tokenizer", None)  # the raw `tokenizers` object: no max-length warnings
    out = []
    quiet = len(docs) < 2 * batch or os.environ.get("Q0DS_NO_PROGRESS") == "1"
    with tqdm(total=len(docs), desc="tokenize", unit="doc", disable=quiet) as bar:
        for i in range(0, len(docs), batch):
            chunk = docs[i:i + batch]
            ids = ([e.ids for e in backend.encode_batch(chunk, add_special_tokens=False)] if backend is not None
                   else tok(chunk, add_special_tokens=False)["input_ids"])
            out.extend(np.asarray(x, dtype=np.uint32) for x in ids)
            bar.update(len(chunk))
    return out


def _split_counts(lengths, fitness_tokens, val_tokens):
    """(n_fitness_docs, n_val_docs): whole documents from the front until each count is reached, or None."""
    cum = np.cumsum(lengths)
    n_fit = int(np.searchsorted(cum, fitness_tokens)) + 1
    if n_fit > len(cum):
        return None
    end_val = int(np.searchsorted(cum, cum[n_fit - 1] + val_tokens)) + 1
    return None if end_val > len(cum) else (n_fit, end_val - n_fit)


def _sha256_file(path: Path, h):
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def _tokenizer_fingerprint(tok_dir: Path) -> str:
    """sha256 of tokenizer.json (the whole vocabulary and pipeline), else of every saved file."""
    files = [tok_dir / "tokenizer.json"] if (tok_dir / "tokenizer.json").exists() else sorted(
        p for p in tok_dir.iterdir() if p.is_file())
    h = hashlib.sha256()
    for p in files:
        h.update(p.name.encode())
        _sha256_file(p, h)
    return h.hexdigest()


def _data_fingerprint(data_dir: Path, dtype: str, splits: dict) -> str:
    """sha256 of fitness/val/train: their tokens, offsets and ranges (a test split after them is not part of it,
    so adding one leaves every run's data fingerprint as it was; test_fingerprint covers it)."""
    n = splits["train"][1]
    offsets = np.load(data_dir / "docs.npy")
    h = hashlib.sha256(dtype.encode())
    with open(data_dir / "tokens.bin", "rb") as f:
        left = int(offsets[n]) * np.dtype(dtype).itemsize
        while left:
            chunk = f.read(min(left, 1 << 20))
            h.update(chunk)
            left -= len(chunk)
    h.update(offsets[:n + 1].astype("<i8").tobytes())  # the array, not the .npy header
    h.update(json.dumps({k: v for k, v in splits.items() if k != "test"}, sort_keys=True).encode())
    return h.hexdigest()


def _test_fingerprint(data_dir: Path, dtype: str, splits: dict) -> str | None:
    if "test" not in splits:
        return None
    a, b = splits["test"]
    offsets = np.load(data_dir / "docs.npy")
    tokens = np.memmap(data_dir / "tokens.bin", dtype=dtype, mode="r")[offsets[a]:offsets[b]]
    return hashlib.sha256(np.ascontiguousarray(tokens).tobytes() + offsets[a:b + 1].astype("<i8").tobytes()).hexdigest()


# ---------------------------------------------------------------- reading

def _rerun(path) -> str:
    return f"run `q0ds prepare --out {path} ...` (again)"


class PreparedData:
    """A prepared data dir, opened read-only (tokens are memory-mapped, so many processes can share it)."""

    def __init__(self, path: Path, meta: dict, tokens: np.ndarray, offsets: np.ndarray):
        self.path, self.meta, self.tokens, self.offsets = path, meta, tokens, offsets
        self.tokenizer_dir = path / "tokenizer"
        self.vocab_size: int = meta["vocab_size"]
        self.eos_id: int = meta["eos_id"]
        self.pad_id: int = meta["pad_id"]
        self.fingerprint: str = meta["data_fingerprint"]
        self._layouts: dict = {}  # (seed, base, epoch) -> (doc order, start of each doc in the epoch stream)

    @classmethod
    def open(cls, path) -> "PreparedData":
        path = Path(path)
        hint = _rerun(path)
        if not path.is_dir():
            raise DataError(f"prepared data dir {path} does not exist: {hint}")
        for name in ("meta.json", "tokens.bin", "docs.npy", "tokenizer"):
            if not (path / name).exists():
                raise DataError(f"{path / name} is missing: {hint}")
        try:
            meta = json.loads((path / "meta.json").read_text())
            format_ok = meta["format"] == FORMAT and {"fitness", "val", "train"} <= set(meta["splits"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path / 'meta.json'} is unreadable ({e!r}): {hint}") from e
        if not format_ok:
            raise DataError(f"{path / 'meta.json'}: format {meta['format']}, this q0ds reads format {FORMAT}: {hint}")
        dtype = np.dtype(meta["dtype"])
        offsets = np.load(path / "docs.npy")
        n_bytes = (path / "tokens.bin").stat().st_size
        ranges = [meta["splits"][s] for s in ("fitness", "val", "train")]
        if (offsets.shape != (meta["n_docs"] + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) <= 0)
                or n_bytes != offsets[-1] * dtype.itemsize
                or [r[0] for r in ranges] != [0, ranges[0][1], ranges[1][1]]
                or meta["splits"].get("test", [ranges[2][1], ranges[2][1]]) != [ranges[2][1], meta["n_docs"]]):
            raise DataError(f"corrupt prepared data in {path}: tokens.bin ({n_bytes} bytes), docs.npy and meta.json "
                            f"do not match (truncated copy?): {hint}")
        return cls(path, meta, np.memmap(path / "tokens.bin", dtype=dtype, mode="r"), offsets)

    def verify(self) -> None:
        """Recompute both fingerprints (reads every byte: for checks after a copy, not at every start)."""
        now = {"data_fingerprint": _data_fingerprint(self.path, self.meta["dtype"], self.meta["splits"]),
               "tokenizer_fingerprint": _tokenizer_fingerprint(self.tokenizer_dir)}
        if "test" in self.meta["splits"]:
            now["test_fingerprint"] = _test_fingerprint(self.path, self.meta["dtype"], self.meta["splits"])
        bad = [key for key, value in now.items() if value != self.meta[key]]
        if bad:
            raise DataError(f"corrupt prepared data in {self.path}: files do not match {' and '.join(bad)} in "
                            f"meta.json; {_rerun(self.path)}")

    def load_tokenizer(self):
        """The tokenizer the tokens were made with, checked against meta.json."""
        from .files import json_problem
        for name in ("tokenizer.json", "tokenizer_config.json"):
            problem = json_problem(self.tokenizer_dir / name) if (self.tokenizer_dir / name).exists() else None
            if problem:
                raise DataError(f"{self.tokenizer_dir / name} (the tokenizer of prepared data {self.path}) is "
                                f"unusable: {problem}; {_rerun(self.path)} to rewrite it")
        try:
            tok = _load_tokenizer(self.tokenizer_dir)
        except DataError as e:
            raise DataError(f"{e}; the prepared data dir is damaged: {_rerun(self.path)}") from None
        if len(tok) != self.vocab_size:
            raise DataError(f"tokenizer vocab mismatch: {self.tokenizer_dir} has {len(tok)} tokens but the data was "
                            f"prepared with {self.vocab_size}; {_rerun(self.path)}")
        if (_tokenizer_fingerprint(self.tokenizer_dir) != self.meta["tokenizer_fingerprint"]
                or tok.eos_token_id != self.eos_id):
            raise DataError(f"tokenizer fingerprint mismatch: {self.tokenizer_dir} is not the tokenizer the data was "
                            f"prepared with; {_rerun(self.path)}")
        return tok

    def _docs(self, split: str) -> range:
        if split not in self.meta["splits"]:
            raise DataError(f"unknown split {split!r}; one of {list(self.meta['splits'])}")
        return range(*self.meta["splits"][split])

    def windows_per_epoch(self, seq_len: int) -> int:
        """Training windows of seq_len + 1 tokens (stride seq_len) in one epoch of the EOS-joined train docs."""
        docs = self._docs("train")
        total = self.meta["n_tokens"]["train"] + len(docs)  # one EOS after every document
        if (total - 1) // seq_len < 1:
            raise DataError(f"corpus too small for seq_len {seq_len}: the train split has {total} tokens with EOS")
        return (total - 1) // seq_len

    def _layout(self, seed: int, base: int, epoch: int):
        key = (seed, base, epoch)
        if key not in self._layouts:
            docs = self._docs("train")
            order = docs.start + np.random.default_rng([seed, base, epoch]).permutation(len(docs))
            lengths = self.offsets[order + 1] - self.offsets[order] + 1  # + the EOS after each document
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            if len(self._layouts) >= 2:  # a call spans at most an epoch boundary: keep the last two
                self._layouts.pop(next(iter(self._layouts)))
            self._layouts[key] = (order, starts)
        return self._layouts[key]

    def train_samples(self, seed: int, base: int, start: int, n: int, seq_len: int):
        """Samples start .. start+n-1 of base's infinite stream, LongTensor [n, seq_len + 1].

        Sample k is window k % W of epoch k // W (W = windows_per_epoch): the train documents in the order
        np.random.default_rng([seed, base, epoch]).permutation, each followed by EOS, concatenated, and
        window j = stream[j * seq_len : j * seq_len + seq_len + 1] (inputs w[:-1], labels w[1:]). A pure
        function of (seed, base, k), so resuming at any k continues the same stream. The epoch stream is
        never materialized: only its document order and offsets are cached, so memory is O(documents).
        """
        import torch
        windows = self.windows_per_epoch(seq_len)
        k = np.arange(start, start + n, dtype=np.int64)
        out = np.empty((n, seq_len + 1), dtype=np.int64)
        for epoch in np.unique(k // windows):
            rows = k // windows == epoch
            order, starts = self._layout(seed, base, int(epoch))
            pos = (k[rows] % windows)[:, None] * seq_len + np.arange(seq_len + 1)  # stream positions
            i = np.searchsorted(starts, pos, side="right") - 1  # which document holds each position
            doc, within = order[i], pos - starts[i]
            is_eos = within == self.offsets[doc + 1] - self.offsets[doc]
            tokens = self.tokens[np.where(is_eos, 0, self.offsets[doc] + within).ravel()].reshape(pos.shape)
            out[rows] = np.where(is_eos, self.eos_id, tokens)
        return torch.from_numpy(out)

    def eval_windows(self, split: str, seq_len: int):
        """(windows LongTensor [n, seq_len + 1], mask BoolTensor [n, seq_len]) covering a whole split.

        The stream is EOS, doc, EOS, doc, ..., EOS in split order, so every document token and every
        document-ending EOS is a label exactly once (n_tokens + n_docs labels; the leading EOS plays the
        role it has in training, the context of a document's first token). Windows step by seq_len; the
        last one is padded with pad_id, and mask is False where the label is padding.
        """
        import torch
        docs = self._docs(split)
        eos = np.array([self.eos_id], dtype=np.int64)
        parts = [eos]
        for d in docs:
            parts += [self.tokens[self.offsets[d]:self.offsets[d + 1]].astype(np.int64), eos]
        stream = np.concatenate(parts)
        n = -(-(len(stream) - 1) // seq_len)
        padded = np.full(n * seq_len + 1, self.pad_id, dtype=np.int64)
        padded[:len(stream)] = stream
        pos = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
        return torch.from_numpy(padded[pos]), torch.from_numpy(pos[:, 1:] < len(stream))
