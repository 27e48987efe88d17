"""The README and docs/ stay true to the repository: README under 200 lines, every relative link resolves,
every `make X` the README names is a Makefile target, every run-config key is documented (and the generated
key table of docs/configuration.md matches q0ds/config.py)."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _pages():
    return [README] + DOCS


def _strip_code(text: str) -> str:
    """Markdown without fenced blocks and code spans, where a [x](y) is not a link."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.sub(r"`[^`\n]*`", "", text)


def _anchors(path: Path) -> set:
    """GitHub-style heading anchors of a Markdown file."""
    out = set()
    for line in _strip_code(path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n < 200, f"README.md has {n} lines; move detail to a docs/ page"


def test_docs_pages_exist():
    names = {p.name for p in DOCS}
    for page in ("index.md", "results.md", "cluster.md", "configuration.md", "architecture.md", "development.md"):
        assert page in names, f"docs/{page} is missing"


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in LINK.findall(_strip_code(page.read_text())):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):          # http:, https:, mailto:
                continue
            path, _, anchor = unquote(target).partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_readme_make_targets_exist():
    targets = set(re.findall(r"^([A-Za-z0-9_-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"\bmake ([a-z][a-z0-9-]*)", README.read_text()))
    assert named, "README names no make target"
    missing = sorted(named - targets)
    assert not missing, f"README names make targets the Makefile lacks: {missing}"


def _keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        sub = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(sub):
            yield from _keys(type(sub), prefix + f.name + ".")
        else:
            yield prefix + f.name


def test_every_config_key_is_documented():
    from q0ds.config import RunConfig
    text = (ROOT / "docs" / "configuration.md").read_text()
    keys = list(_keys(RunConfig))
    assert len(keys) > 40
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w.]+)` \|.*\| ([^|]*) \|$", text, flags=re.M)}
    undocumented = [k for k in keys if not rows.get(k, "").strip()]
    assert not undocumented, (f"docs/configuration.md lacks a meaning for {undocumented}: add an inline comment "
                              "in q0ds/config.py (or MEANINGS in docs/gen_config_reference.py) and run "
                              "`python docs/gen_config_reference.py`")


def test_config_reference_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_config_reference.py"), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_suite_durations_table_is_current():
    """docs/test-suite.md's table is benchmarks/results/suite_durations.json as `table --docs` writes it."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "suite_durations.py"), "table", "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
