"""The words around the code: every relative link in the README and docs points at a file that exists, every kept
demo run is in docs/demo's index, and the README's first screen stays a first screen."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def stale_links(md: Path) -> list[str]:
    return [t for t in LINK.findall(md.read_text()) if not re.match(r"[a-z]+:", t) and not (md.parent / t).exists()]


def test_every_relative_link_points_at_a_file(tmp_path):
    planted = tmp_path / "a.md"
    planted.write_text("see [x](missing/report.md) and [y](https://arxiv.org/abs/1) and [z](a.md#top)")
    assert stale_links(planted) == ["missing/report.md"]  # the check can fail
    assert {str(md.relative_to(ROOT)): stale_links(md) for md in markdown_files() if stale_links(md)} == {}


def test_every_demo_run_is_in_the_index():
    index = (ROOT / "docs" / "demo" / "README.md").read_text()
    linked = {str((ROOT / "docs" / "demo" / t).parent.resolve()) for t in LINK.findall(index)}
    runs = {str(p.parent.resolve()) for p in (ROOT / "docs" / "demo").rglob("report.md")}
    assert runs - linked == set()  # no orphan run folder
    assert all((ROOT / "docs" / "demo" / t).exists() for t in LINK.findall(index))


def test_the_readme_first_screen():
    lines = (ROOT / "README.md").read_text().splitlines()
    first_section = next(i for i, line in enumerate(lines) if line.startswith("## "))
    assert first_section < 65, first_section
    in_code, long = False, []
    for i, line in enumerate(lines, 1):
        in_code ^= line.startswith("```")
        if not in_code and not line.startswith("|") and len(line) > 120:
            long.append(i)
    assert long == []  # prose wraps at 120 (tables and code blocks may not)
