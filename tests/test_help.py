"""Help says what a flag does now: no commit hashes, dates or "before X" in any entry script's `--help` or in a
module docstring (that history lives in docs/rl_experiments.md), and no help text that stops mid-sentence."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tagpr import config

ROOT = Path(__file__).resolve().parents[1]
ENTRY = [
    "build_data.py",
    "train_sft.py",
    "train_prmu.py",
    "train_rl.py",
    "evaluate.py",
    "scripts/demo.py",
    "scripts/serve.py",
    "-m tagpr.synthetic",
]
CONFIGS = {
    "build_data": "BuildConfig",
    "train_sft": "SFTConfig",
    "train_prmu": "PRMUConfig",
    "train_rl": "RLConfig",
    "evaluate": "EvalConfig",
    "demo": "DemoConfig",
}

# a commit hash: 7-40 hex digits with at least one letter and one digit (so "1000000" or "deadbeef" words pass)
HASH = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
HISTORY = re.compile(r"\b(?:before|since|until|after) (?:commit |issue )?(?:#\d+|20\d\d|[0-9a-f]{7,})|\bissue #\d+")
# a help text that stops on a word that cannot end a clause ("… is the recipe before")
DANGLING = re.compile(r"\b(?:the|a|an|is|are|of|and|or|to|before|with|by|from|than|as|at|in|on)[.)]?$", re.IGNORECASE)


def history_in(text: str) -> list[str]:
    """The pieces of `text` that narrate history: hashes, dates, "before <commit>"."""
    return [m.group(0) for rx in (HASH, DATE, HISTORY) for m in rx.finditer(text)]


def test_the_checks_can_fail():
    assert history_in("4 at lr 1e-4 before d28910f") == ["d28910f", "before d28910f"]
    assert history_in("Until 2026-12-02 the keys") == ["2026-12-02"]
    assert history_in("since issue #21's budget") == ["since issue #21"]
    assert history_in("lr 1e-4, 1000000 steps, bf16, fp32, a deadbeef cafe") == []
    assert DANGLING.search("all at --sft-lr 1e-4 is the recipe before")
    assert not DANGLING.search("SFT trains the policy's top N decoder layers (-1: all)")


@pytest.mark.parametrize("script", ENTRY)
def test_help_narrates_no_history(script):
    p = subprocess.run(
        [sys.executable, *script.split(), "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert history_in(p.stdout) == [], script


@pytest.mark.parametrize("module", sorted(CONFIGS))
def test_every_flag_help_ends_a_clause(module):
    sys.path.insert(0, str(ROOT / "scripts"))  # scripts/demo.py imports as demo
    m = __import__(module)
    helps = config.field_help(getattr(m, CONFIGS[module]))
    bad = {name: text for name, text in helps.items() if DANGLING.search(text.strip()) or history_in(text)}
    assert bad == {}


def test_module_docstrings_narrate_no_history():
    files = [
        *ROOT.glob("*.py"),
        *(ROOT / "tagpr").rglob("*.py"),
        *(ROOT / "tagpr_kernels").glob("*.py"),
        *(ROOT / "scripts").glob("*.py"),
        *(ROOT / "bench").glob("*.py"),
    ]
    bad = {}
    for f in files:
        doc = ast.get_docstring(ast.parse(f.read_text())) or ""
        if found := history_in(doc):
            bad[str(f.relative_to(ROOT))] = found
    assert bad == {}
