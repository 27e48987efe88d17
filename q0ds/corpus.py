"""The embedded default corpus: CPython's English documentation topics.

Every CPython install ships `pydoc_data.topics.topics`, the text behind `help("with")`
etc.: 79 topics, ~465 KB of English reference prose. It needs no download, so `q0ds demo`
runs on any fresh machine through the same prepare path as a cluster corpus
(`q0ds prepare --embedded --out DATA_DIR`).

License: the text is part of the Python documentation, (c) Python Software Foundation,
distributed under the PSF License Agreement (https://docs.python.org/3/license.html).

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
The topics differ between CPython versions; the prepared data's fingerprint records which
text was used, and `source` in meta.json names the Python version.
"""
import re
import sys

MIN_CHARS = 300        # shorter leftovers are headings whose body was a duplicate
DEDUP_MIN_CHARS = 100  # shorter paragraphs ("Note:", version notes) legitimately repeat

_UNDERLINE = re.compile(r"^([=*])\1{2,}$")


def _sections(text: str) -> list[str]:
    """Split one topic before each heading underlined with '=' or '*'."""
    lines = text.strip().split("\n")
    cuts = [i - 1 for i in range(2, len(lines)) if _UNDERLINE.match(lines[i].strip()) and lines[i - 1].strip()]
    bounds = [0] + cuts + [len(lines)]
    return ["\n".join(lines[a:b]).strip() for a, b in zip(bounds, bounds[1:])]


def embedded_documents() -> list[str]:
    """The deduplicated documentation sections, in a fixed order (topic name, then section)."""
    from pydoc_data.topics import topics

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
    v = sys.version_info
    return f"embedded: pydoc_data.topics of CPython {v.major}.{v.minor}.{v.micro} (PSF License), sections deduplicated"
