"""bench/gpu_check.sh --dry: the prepared GPU check cannot rot. Every part's command runs with its real arguments
under TAGPR_CHECK_ARGS=1, which parses and checks them and exits before any work, so a renamed flag, a value out
of its range or a missing script fails here, on any CPU, long before a GPU is at hand."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PARTS = ["kernel", "logprob", "flash_attn", "sft", "rl", "rollout"]  # their logs in $OUT; model and data in $WORK


@pytest.mark.slow
def test_the_gpu_check_dry_run(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHON": sys.executable}
    p = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--dry"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    summary = (out / "summary.txt").read_text()
    assert p.returncode == 0, summary + p.stderr[-2000:]
    assert summary.rstrip().endswith(f"gpu_check: all parts passed → {out}")
    assert sorted(f.name for f in out.iterdir()) == sorted([f"{x}.log" for x in PARTS] + ["summary.txt"])
    assert len(list(out.iterdir())) <= 8  # what the lent machine's tool brings back
    for name in PARTS:  # each command reached its argument check, and stopped there
        assert "arguments ok" in (out / f"{name}.log").read_text(), name
    for name in ("model", "data"):
        assert "arguments ok" in (work / f"{name}.log").read_text(), name
    assert not (work / "sft").exists() and not (work / "model").exists()  # nothing ran


def test_a_wrong_argument_fails_the_dry_run(tmp_path):
    """The dry run can fail: a flag out of its range under TAGPR_CHECK_ARGS is still an error."""
    env = {**os.environ, "TAGPR_CHECK_ARGS": "1"}
    p = subprocess.run(
        [sys.executable, "train_rl.py", "--max-new-tokens", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2 and p.stderr.strip().endswith("error: --max-new-tokens 0: expected ≥ 1")
