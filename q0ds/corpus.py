"""The embedded default corpus: CPython's English documentation topics.

`pydoc_data.topics.topics` is the text behind `help("with")` etc.: 79 topics, ~465 KB of
English reference prose. The topics change between CPython versions, so the copy from
CPython 3.11.7 is shipped here (q0ds/corpus_data/, xz-compressed JSON, 97 KB) and checked
against its sha256: the README's losses reproduce on any interpreter, and `q0ds demo` runs
on any fresh machine, with no download, through the same prepare path as a cluster corpus
(`q0ds prepare --embedded --out DATA_DIR`).

License: the text is part of the Python documentation, (c) Python Software Foundation,
distributed under the PSF License Agreement; its full text is q0ds/corpus_data/LICENSE-PSF.txt
(https://docs.python.org/3/license.html).

Why the topics are not used as-is (measured on CPython 3.11.7):
- About a quarter of the text is duplicated: big topics embed smaller ones verbatim
  ("specialnames" contains "customization", "attribute-access", ...; "compound" contains
  "try", "with", "function", ...). With whole topics as documents, a held-out topic would
  often be in the training set word for word inside its parent, and validation loss would
  reward memorization. So we split topics into sections at their top-level headings
  (underlines of '=' or '*') and drop any long paragraph already seen (largest section
  first keeps the fullest copy), then drop fragments under MIN_CHARS.
- The result: 117 documents, ~378 KB, ~105k tokens with a 2048-entry byte-level BPE, i.e.
  ~87k training tokens after the default 6k fitness + 12k validation carve-out (the range
  cpu-scale.md found useful). Documents are 300 B to 25 KB instead of up to 62 KB, so the
  fitness/validation sets are several documents each whatever the seed.
`source` in meta.json names the shipped version; prepare also says when the running
interpreter's own topics differ (informational: the shipped copy is what is used).
"""
import hashlib
import json
import lzma
import re
import sys
from pathlib import Path

TOPICS_VERSION = "3.11.7"
TOPICS_FILE = Path(__file__).with_name("corpus_data") / f"pydoc_topics-cpython-{TOPICS_VERSION}.json.xz"
# sha256 of the decompressed JSON (json.dumps(topics, sort_keys=True, ensure_ascii=False, indent=0))
TOPICS_SHA256 = "4717ccc51e2e7bd1eed2feddb0bcb5a7da19a1a923fd2f258cf81e4285e31683"

MIN_CHARS = 300        # shorter leftovers are headings whose body was a duplicate
DEDUP_MIN_CHARS = 100  # shorter paragraphs ("Note:", version notes) legitimately repeat

_UNDERLINE = re.compile(r"^([=*])\1{2,}$")


def _sections(text: str) -> list[str]:
    """Split one topic before each heading underlined with '=' or '*'."""
    lines = text.strip().split("\n")
    cuts = [i - 1 for i in range(2, len(lines)) if _UNDERLINE.match(lines[i].strip()) and lines[i - 1].strip()]
    bounds = [0] + cuts + [len(lines)]
    return ["\n".join(lines[a:b]).strip() for a, b in zip(bounds, bounds[1:])]


def shipped_topics() -> dict[str, str]:
    """The shipped CPython 3.11.7 topics, checked against TOPICS_SHA256."""
    raw = lzma.decompress(TOPICS_FILE.read_bytes())
    digest = hashlib.sha256(raw).hexdigest()
    if digest != TOPICS_SHA256:
        from .data import DataError
        raise DataError(f"{TOPICS_FILE} is corrupt (sha256 {digest[:12]}..., expected {TOPICS_SHA256[:12]}...); "
                        "restore it from the q0ds repository")
    return json.loads(raw)


def interpreter_topics_differ() -> bool:
    """True if this interpreter's pydoc_data.topics is not the shipped text (then `help()` differs, not q0ds)."""
    try:
        from pydoc_data.topics import topics
    except ImportError:               # some distributions split pydoc_data out
        return True
    return topics != shipped_topics()


def embedded_documents() -> list[str]:
    """The deduplicated documentation sections, in a fixed order (topic name, then section)."""
    topics = shipped_topics()
    docs = [s for name in sorted(topics) for s in _sections(topics[name])]
    seen: set[str] = set()
    kept: dict[int, str] = {}
    for i in sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i)):
        paragraphs = []
        for p in re.split(r"\n\s*\n", docs[i]):
            key = " ".join(p.split())
            if len(key) >= DEDUP_MIN_CHARS:
                if key in seen:
                    continue
                seen.add(key)
            paragraphs.append(p)
        kept[i] = "\n\n".join(paragraphs).strip()
    return [kept[i] for i in range(len(docs)) if len(kept[i]) >= MIN_CHARS]


def embedded_source() -> str:
    """A one-line description for meta.json."""
    return (f"embedded: pydoc_data.topics of CPython {TOPICS_VERSION} (PSF License), shipped in q0ds/corpus_data, "
            "sections deduplicated")


def interpreter_note() -> str | None:
    """What to tell the user when the running interpreter's topics differ from the shipped ones."""
    if not interpreter_topics_differ():
        return None
    v = sys.version_info
    return (f"this interpreter (CPython {v.major}.{v.minor}.{v.micro}) has different pydoc topics; the shipped "
            f"CPython {TOPICS_VERSION} copy is used, so results match the README")
