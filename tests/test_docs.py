"""The docs stay true: every Python example of the guides runs, and every relative link resolves.

Each ```python block of ``docs/guide/*.md`` runs alone, in a fresh namespace, in a temporary working
directory (the examples use tiny random-weight models, seconds on CPU). ```bash, ```yaml and
```text blocks are not run. Links are checked in ``README.md``, ``configs/README.md`` and
``docs/**/*.md``: the target file must exist and, for a ``page.md#anchor`` link, the page must have
a heading with that GitHub anchor.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
GUIDES = sorted((ROOT / "docs" / "guide").glob("*.md"))
PAGES = [ROOT / "README.md", ROOT / "configs" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", flags=re.M)


def _python_blocks() -> list:
    params = []
    for page in GUIDES:
        blocks = [code for lang, code in FENCE.findall(page.read_text()) if lang == "python"]
        for i, code in enumerate(blocks):
            params.append(pytest.param(page, code, id=f"{page.name}:{i + 1}"))
    return params


def _prose(text: str) -> str:
    """The page without fenced code blocks and inline code spans (links there are not links)."""
    return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text())):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def test_every_guide_page_has_examples():
    assert GUIDES, "docs/guide/ has no pages"
    for page in GUIDES:
        assert "```python\n" in page.read_text(), f"{page.name} has no Python example"


@pytest.mark.parametrize(("page", "code"), _python_blocks())
def test_guide_example_runs(page, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write (runs/, figures) write here
    monkeypatch.setenv("MPLBACKEND", "Agg")
    torch.manual_seed(0)
    exec(compile(code, str(page), "exec"), {"__name__": f"docs_example_{page.stem}"})


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(_prose(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target} (no heading #{anchor})")
    assert not broken, f"{page.relative_to(ROOT)}: broken links: {broken}"


ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _section(page: Path, heading: str) -> str:
    """The text under the level-2 heading ``## heading`` of ``page``, up to the next one."""
    pattern = rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)"
    found = re.search(pattern, page.read_text(), flags=re.S | re.M)
    assert found, f"{page.name} has no section '## {heading}'"
    return found.group(1)


def test_architecture_training_step_walk_through_runs(tmp_path, monkeypatch):
    """The python block of architecture.md's "One training step" runs as written: a tiny
    RelRegModule's model_step on a SpuriousShapes batch, asserting on its StepOutput."""
    section = _section(ARCHITECTURE, "One training step")
    blocks = [code for lang, code in FENCE.findall(section) if lang == "python"]
    assert len(blocks) == 1, f"expected one python block in that section, got {len(blocks)}"
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    exec(compile(blocks[0], str(ARCHITECTURE), "exec"), {"__name__": "docs_example_architecture"})
