"""The documentation's promises that a script can check: every relative link in README.md, docs/*.md and
benchmarks/README.md points to a file of the repository; README.md stays a short front door; and the user-facing
prose names no commit (history lives in git, and in the measurement log and the dated decision records)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
LINKED = [README, *DOCS, ROOT / "benchmarks" / "README.md"]
README_MAX_LINES = 220
# Dated records of decisions, written before their runs and kept as they were: they may name commits.
DECISION_RECORDS = {"preregistration.md", "regime-pilot.md", "regime-pilot-2.md", "precision-agreement.md"}

# [text](target) and ![alt](target), with an optional "title"; the target has no spaces.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
# A git commit abbreviated or whole: 7-40 lowercase hex characters standing alone. A run of decimal digits only
# (token counts, parameter counts: 2557632) or of the letters a-f only (English words such as "defaced") is not one:
# git prints lowercase hex, and an abbreviation with no digit or no letter is rare enough to leave to review.
HEX = re.compile(r"\b[0-9a-f]{7,40}\b")


def _prose(text: str) -> str:
    """The Markdown without its fenced code blocks and inline code, where a bracket is not a link."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def _links(path: Path) -> list[str]:
    return LINK.findall(_prose(path.read_text(encoding="utf-8")))


def _commit_like(text: str) -> list[str]:
    return [m for m in HEX.findall(text) if re.search(r"[0-9]", m) and re.search(r"[a-f]", m)]


def test_the_documents_it_checks_exist():
    assert README.exists() and DOCS and (ROOT / "benchmarks" / "README.md").exists()


@pytest.mark.parametrize("path", LINKED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_of_the_repository(path):
    broken = []
    for target in _links(path):
        if re.match(r"^(https?:|mailto:)", target, re.I):
            continue
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not file_part:  # an anchor in the same file
            continue
        resolved = (path.parent / file_part).resolve()
        if not (resolved.is_relative_to(ROOT) and resolved.exists()):
            broken.append(target)
    assert not broken, f"{path.relative_to(ROOT)} links to files that do not exist: {broken}"


def test_the_link_pattern_finds_links_and_skips_code():
    sample = ("See [the rules](docs/preregistration.md#seed-count) and ![a plot](runs/x.png \"t\").\n"
              "`[not](a-link.md)`\n```\n[nor](this.md)\n```\n[web](https://example.org) [mail](mailto:a@b.c)\n")
    assert LINK.findall(_prose(sample)) == ["docs/preregistration.md#seed-count", "runs/x.png",
                                            "https://example.org", "mailto:a@b.c"]


def test_readme_is_a_front_door_of_at_most_220_lines():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; the depth belongs in docs/"


def test_readme_names_no_commit():
    found = _commit_like(README.read_text(encoding="utf-8"))
    assert not found, f"README.md names commits (history belongs in git): {found}"


@pytest.mark.parametrize("path", [p for p in DOCS if p.name not in DECISION_RECORDS],
                         ids=lambda p: p.name)
def test_docs_prose_names_no_commit(path):
    found = _commit_like(path.read_text(encoding="utf-8"))
    assert not found, f"{path.relative_to(ROOT)} names commits (history belongs in git): {found}"


def test_the_commit_pattern():
    assert _commit_like("at 1b0828f and c311b3a, a4372e1a06895dd59430abc244bd461b06052aea") == [
        "1b0828f", "c311b3a", "a4372e1a06895dd59430abc244bd461b06052aea"]
    assert _commit_like("2557632 parameters, defaced, sha256, 2e-3, fp32, seed-300") == []
