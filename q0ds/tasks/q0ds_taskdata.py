"""Data for the shipped lm-evaluation-harness tasks `q0ds_mc` and `q0ds_ppl` (offline, deterministic).

Source text: docstrings of ~120 pure CPython standard-library modules (module, public class and public
function docstrings). It is English technical prose from the same domain as the embedded training corpus
(CPython's `pydoc_data.topics`, see q0ds/corpus.py) but a different text, and every sentence or paragraph
that also occurs in that corpus is dropped, so neither task rewards memorising the embedded corpus.

- q0ds_mc (multiple_choice, acc / acc_norm): "which sentence comes next". The context is one or more
  consecutive sentences of a docstring paragraph (<= 300 chars); the right choice is the sentence that
  follows it; the 3 distractors are sentences from docstrings of *other* modules, with lengths drawn
  so that the answer is no more likely than a distractor to be the shortest, longest or middle choice
  (length gives little away). Choice order is shuffled. 200 items.
- q0ds_ppl (loglikelihood_rolling, word_perplexity / byte_perplexity / bits_per_byte): 30 whole docstrings
  of 600 to 2500 characters.

The JSONL files next to this module are the shipped data; `load_mc` / `load_ppl` read them (the YAMLs call
them with `custom_dataset: !function q0ds_taskdata.load_mc`, which lm_eval resolves next to the YAML, so
the tasks load whatever the CWD). Docstrings differ between Python versions, so regenerating with another
interpreter gives other (equally valid) items; the shipped files were made with the interpreter recorded in
`q0ds_taskdata_meta.json`. Regenerate with

    python -m q0ds.tasks.q0ds_taskdata [OUT_DIR]      # default: this directory

Everything is seeded (SEED); the same interpreter always writes byte-identical files.
"""
from __future__ import annotations

import bisect
import hashlib
import importlib
import inspect
import json
import math
import random
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MC_FILE, PPL_FILE, META_FILE = "q0ds_mc.jsonl", "q0ds_ppl.jsonl", "q0ds_taskdata_meta.json"
SEED = 1234
N_MC, N_PPL = 200, 30
PPL_CHARS = (600, 2500)
SENT_CHARS = (30, 220)
CONTEXT_CHARS = 300
MAX_PER_MODULE = 4          # MC items per module, so no single module dominates

MODULES = """abc argparse ast asyncio base64 bisect bz2 calendar cmd codecs collections colorsys configparser
contextlib copy csv dataclasses datetime decimal difflib dis email enum filecmp fileinput fnmatch fractions
ftplib functools getopt getpass gettext glob gzip hashlib heapq hmac html http imaplib inspect io ipaddress
itertools json keyword linecache locale logging lzma mailbox mimetypes numbers operator optparse os pathlib
pickle pkgutil platform plistlib poplib pprint profile pstats queue quopri random re reprlib sched secrets
selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string struct
subprocess symtable sysconfig tabnanny tarfile tempfile textwrap threading timeit token tokenize trace
traceback types typing unittest urllib uuid warnings wave weakref zipfile zipimport zoneinfo""".split()

_ABBREV = re.compile(r"(\b(e\.g|i\.e|etc|vs|cf|Mr|Dr|No|approx)\.|\b[A-Z]\.)$")
_SENT_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


# ----------------------------------------------------------------------------------- loading (used by lm_eval)
def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _as_dataset(rows: list[dict]):
    import datasets
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def load_mc(**kwargs):
    """custom_dataset hook for q0ds_mc (lm_eval passes task metadata as kwargs; they are ignored)."""
    return _as_dataset(_read_jsonl(HERE / MC_FILE))


def load_ppl(**kwargs):
    """custom_dataset hook for q0ds_ppl."""
    return _as_dataset(_read_jsonl(HERE / PPL_FILE))


# ----------------------------------------------------------------------------------- generation
def _norm(s: str) -> str:
    return " ".join(s.split())


def _docstrings() -> list[tuple[str, str]]:
    """(source, cleaned docstring) in a fixed order, read in a fresh isolated interpreter: libraries
    imported by the caller can monkeypatch stdlib functions (torch et al. replace inspect.getfile, for
    one), which would change the items."""
    p = subprocess.run([sys.executable, "-I", str(Path(__file__).resolve()), "--docstrings"],
                       capture_output=True, text=True, check=True, encoding="utf-8")
    return [tuple(x) for x in json.loads(p.stdout)]


def _docstrings_here() -> list[tuple[str, str]]:
    """_docstrings() in this interpreter: module list order, then attribute name."""
    out = []
    for m in MODULES:
        try:
            mod = importlib.import_module(m)
        except ImportError:          # e.g. a Python built without sqlite3/ssl
            continue
        items = [(m, inspect.getdoc(mod))]
        for name, obj in sorted(vars(mod).items()):
            if not name.startswith("_") and (inspect.isclass(obj) or inspect.isfunction(obj)) \
                    and getattr(obj, "__module__", None) == m:
                items.append((f"{m}.{name}", inspect.getdoc(obj)))
        seen = set()
        for src, doc in items:
            doc = (doc or "").strip()
            if doc and doc not in seen:           # inherited/aliased objects repeat docstrings
                seen.add(doc)
                out.append((src, doc))
    return out


def _prose_paragraphs(doc: str) -> list[str]:
    """Paragraphs of running prose, whitespace-collapsed; code, lists, tables and doctests are skipped."""
    out = []
    for p in re.split(r"\n\s*\n", doc):
        lines = p.split("\n")
        if any(l[:1].isspace() or l.lstrip()[:1] in "-*|+>:" or re.match(r"\s*\d+[.)]\s", l) for l in lines):
            continue
        if ">>>" in p or p.rstrip().endswith("::"):
            continue
        out.append(_norm(p))
    return out


def _sentences(paragraph: str) -> list[str]:
    parts, out = _SENT_END.split(paragraph), []
    for s in parts:                               # re-join splits after abbreviations ("e.g. Foo")
        if out and _ABBREV.search(out[-1]):
            out[-1] += " " + s
        else:
            out.append(s)
    return out


def _good_sentence(s: str) -> bool:
    if not (SENT_CHARS[0] <= len(s) <= SENT_CHARS[1]) or not s[0].isupper() or not s.endswith("."):
        return False
    chars = s.replace(" ", "")
    return sum(c.isalpha() for c in chars) >= 0.75 * len(chars) and s.count("(") == s.count(")")


def _corpus_text() -> str:
    from q0ds.corpus import embedded_documents
    return _norm("\n".join(embedded_documents()))


def _distractors(rng, pool, lengths, ans, mod, ctx, n=3, spread=0.3):
    """n sentences from other modules whose lengths look like draws from the same distribution as the
    answer's: a centre c = len(answer) * e^u, then each distractor near c * e^v (u, v ~ U(-spread, spread)),
    so the answer is as likely as any distractor to be the shortest or the longest choice."""
    out, centre = [], len(ans) * math.exp(rng.uniform(-spread, spread))
    for _ in range(20 * n):
        i = bisect.bisect_left(lengths, centre * math.exp(rng.uniform(-spread, spread)))
        _, m, s = pool[rng.randrange(max(0, i - 4), min(len(pool), i + 4))]   # one of the 8 nearest
        if m != mod and s != ans and s not in out and s not in ctx:
            out.append(s)
            if len(out) == n:
                return out
    return None


def build(seed: int = SEED, n_mc: int = N_MC, n_ppl: int = N_PPL) -> tuple[list[dict], list[dict]]:
    """(mc_rows, ppl_rows), deterministic for a given interpreter."""
    rng = random.Random(seed)
    corpus = _corpus_text()
    docs = _docstrings()

    # sentences of prose paragraphs, grouped per paragraph; anything seen in the training corpus is dropped
    paragraphs = []                      # (module, source, [sentences])
    for src, doc in docs:
        for p in _prose_paragraphs(doc):
            sents = [s for s in _sentences(p) if s not in corpus]
            paragraphs.append((src.split(".")[0], src, sents))
    pool = sorted({(len(s), mod, s) for mod, _, sents in paragraphs for s in sents if _good_sentence(s)})
    lengths = [n for n, _, _ in pool]

    # candidate items: a sentence that follows 1+ sentences of the same paragraph
    cands, seen_answers = [], set()
    for mod, src, sents in paragraphs:
        for i in range(1, len(sents)):
            ans = sents[i]
            if not _good_sentence(ans) or ans in seen_answers:
                continue
            ctx = sents[i - 1]
            j = i - 2
            while j >= 0 and len(sents[j]) + 1 + len(ctx) <= CONTEXT_CHARS:
                ctx, j = sents[j] + " " + ctx, j - 1
            if len(ctx) > CONTEXT_CHARS or len(ctx) < 20:
                continue
            seen_answers.add(ans)
            cands.append((mod, src, ctx, ans))
    rng.shuffle(cands)

    mc, per_module = [], {}
    for mod, src, ctx, ans in cands:
        if per_module.get(mod, 0) >= MAX_PER_MODULE:
            continue
        others = _distractors(rng, pool, lengths, ans, mod, ctx)
        if others is None:
            continue
        choices = others + [ans]
        rng.shuffle(choices)
        mc.append({"id": len(mc), "source": src, "context": ctx, "choices": choices,
                   "label": choices.index(ans)})
        per_module[mod] = per_module.get(mod, 0) + 1
        if len(mc) == n_mc:
            break

    # perplexity documents: whole docstrings, none of whose paragraphs occur in the training corpus
    ppl_cands = [(src, doc) for src, doc in docs if PPL_CHARS[0] <= len(doc) <= PPL_CHARS[1]
                 and not any(len(_norm(p)) >= 40 and _norm(p) in corpus for p in re.split(r"\n\s*\n", doc))]
    # a random stream of its own, so that changes to the MC items do not reshuffle the PPL documents
    picked = random.Random(seed + 1).sample(ppl_cands, min(n_ppl, len(ppl_cands)))
    ppl = [{"id": i, "source": src, "text": doc} for i, (src, doc) in enumerate(picked)]
    return mc, ppl


def write(out_dir=HERE, seed: int = SEED) -> dict:
    """Generate and write the two JSONL files plus a small meta file; returns the meta dict."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mc, ppl = build(seed)
    meta = {"python": sys.version.split()[0], "seed": seed, "n_mc": len(mc), "n_ppl": len(ppl),
            "source": "docstrings of CPython stdlib modules (PSF License), minus text found in q0ds's "
                      "embedded corpus"}
    for name, rows in ((MC_FILE, mc), (PPL_FILE, ppl)):
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        (out_dir / name).write_bytes(data)
        meta[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    return meta


if __name__ == "__main__":
    if sys.argv[1:] == ["--docstrings"]:
        sys.stdout.write(json.dumps(_docstrings_here()))
    else:
        print(json.dumps(write(sys.argv[1] if len(sys.argv) > 1 else HERE), indent=1))
