"""Every relative Markdown link in README.md and docs/*.md points to a file that exists, and every ``#anchor``
to a heading of the page it names (GitHub's heading ids). Links with a scheme (https:, mailto:) are not
followed. Links inside code (fenced blocks, inline code) are not links."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    text = re.sub(r"^( *)(`{3,}).*?^\1\2[ \t]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+).*?\1", "", text, flags=re.S)


def anchors(path: Path) -> set[str]:
    """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces to hyphens, repeats -1, -2."""
    seen: dict[str, int] = {}
    ids = set()
    for m in re.finditer(r"^#{1,6} +(.+?) *#* *$", prose_keep_code_text(path.read_text()), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def prose_keep_code_text(text: str) -> str:
    """The text without fenced code blocks (headings keep their inline code's text, backticks dropped)."""
    text = re.sub(r"^( *)(`{3,}).*?^\1\2[ \t]*$", "", text, flags=re.S | re.M)
    return text.replace("`", "")


def links(path: Path) -> list[str]:
    return re.findall(r"\]\(([^()\s]+)\)", prose(path.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, "broken links in " + page.relative_to(ROOT).as_posix() + ":\n" + "\n".join(bad)


def test_docs_pages_are_linked_from_the_readme():
    """Every docs page is reachable from the README."""
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in links(ROOT / "README.md")}
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


def test_anchor_ids_follow_github():
    page = ROOT / "README.md"
    assert {"what-it-computes", "the-op", "the-whole-method-freecure"} <= anchors(page)
