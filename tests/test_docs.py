"""The documentation stands on its own: every relative link and every cited ``docs/`` path resolves
inside the repository, and the library never imports the built-in world."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rlhf_jax"
DOCS = sorted((ROOT / "docs").glob("*.md"))
# [text](target) in markdown, outside code spans; the target up to a space, ')' or '#'.
LINK = re.compile(r"\[[^\]]*\]\(([^)\s#]+)(?:#[^)]*)?\)")
CITED = re.compile(r"\bdocs/[\w./-]+\.md\b")


def _markdown_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]  # no http:, mailto:


def test_the_documents_exist():
    names = {p.name for p in DOCS}
    assert {"method.md", "instructlang.md", "design.md"} <= names
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


def test_every_relative_link_resolves_inside_the_repository():
    checked = 0
    for doc in [ROOT / "README.md", *DOCS]:
        for target in _markdown_links(doc):
            resolved = (doc.parent / target).resolve()
            assert resolved.is_relative_to(ROOT), f"{doc.name}: {target} leaves the repository"
            assert resolved.exists(), f"{doc.name}: {target} does not exist"
            checked += 1
    assert checked >= 10  # the walker really found the links


def test_every_cited_docs_path_exists():
    files = [
        *PACKAGE.rglob("*.py"),
        *(ROOT / "configs").glob("*.py"),
        *(ROOT / "tests").glob("*.py"),
    ]
    cited = {(f, m) for f in files for m in CITED.findall(f.read_text())}
    assert len(cited) >= 15
    for f, path in cited:
        assert (ROOT / path).exists(), f"{f.relative_to(ROOT)} cites {path}, which does not exist"


def test_every_cited_section_exists():
    # "docs/method.md section 3.7", "docs/method.md 3.7", "docs/instructlang.md section 2" and
    # "docs/method.md check 13" must name a heading (or a check of section 7) that is there.
    section = re.compile(r"docs/(\w+)\.md,? (?:sections? )?(\d+(?:\.\d+)?)")
    check = re.compile(r"docs/method\.md,? (?:section 7, )?checks? (\d+)")
    headings = {
        d.stem: set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)[. ]", d.read_text(), flags=re.M))
        for d in DOCS
    }
    checks = re.search(r"^## 7\..*?^## 8\.", (ROOT / "docs/method.md").read_text(), re.M | re.S)
    n_checks = len(re.findall(r"^\d+\. \*\*", checks.group(0), flags=re.M))
    assert n_checks == 17
    files = [
        *PACKAGE.rglob("*.py"),
        *(ROOT / "configs").glob("*.py"),
        *(ROOT / "tests").glob("*.py"),
    ]
    found = 0
    for f in files:
        text = " ".join(f.read_text().split())  # citations may wrap across lines
        for doc, number in section.findall(text):
            assert number in headings[doc], f"{f.relative_to(ROOT)} cites docs/{doc}.md {number}"
            found += 1
        for number in check.findall(text):
            assert 1 <= int(number) <= n_checks, f"{f.relative_to(ROOT)} cites check {number}"
            found += 1
    assert found >= 30


def test_nothing_points_outside_the_repository():
    # The sources the project was written from are not part of it.
    stale = re.compile(r"\.\./shared|\b(METHOD|INSTRUCTLANG|DESIGN)\.md\b")
    files = [*PACKAGE.rglob("*.py"), ROOT / "README.md", *DOCS, *(ROOT / "configs").glob("*.py")]
    for f in files:
        for lineno, line in enumerate(f.read_text().splitlines(), 1):
            assert not stale.search(line), f"{f.relative_to(ROOT)}:{lineno}: {line.strip()}"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def test_the_library_never_imports_the_world():
    world = PACKAGE / "instructlang"
    library = [p for p in PACKAGE.rglob("*.py") if world not in p.parents and p.name != "cli.py"]
    assert len(library) >= 15
    for path in library:
        bad = {n for n in _imports(path) if "instructlang" in n}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
