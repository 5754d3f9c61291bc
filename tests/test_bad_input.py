"""Every input a user can get wrong ends in one clear line: `error: …` on stderr, exit status 2, no traceback, and
nothing written under --out. Numeric flags first: each has a range, declared once with its config field."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

from tagpr import config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import build_data  # noqa: E402
import evaluate  # noqa: E402
import train_prmu  # noqa: E402
import train_rl  # noqa: E402
import train_sft  # noqa: E402

RL_PROBES = [
    ("--global-batch", "0", "≥ 1"),
    ("--global-batch", "-4", "≥ 1"),
    ("--group", "0", "≥ 1"),
    ("--mini-batches", "0", "≥ 1"),
    ("--micro-batch", "0", "≥ 1"),
    ("--lr", "-1", "> 0"),
    ("--lr", "nan", "a finite number"),
    ("--lr", "inf", "a finite number"),
    ("--temperature", "0", "> 0"),
    ("--temperature", "nan", "a finite number"),
    ("--top-p", "0", "(0, 1]"),
    ("--top-p", "1.5", "(0, 1]"),
    ("--max-new-tokens", "-5", "≥ 1"),
    ("--max-new-tokens", "0", "≥ 1"),
    ("--train-layers", "0", "-1 or ≥ 1"),
    ("--max-steps", "0", "-1 or ≥ 1"),
]


@pytest.mark.parametrize("flag,value,expected", RL_PROBES)
def test_rl_flags_out_of_range(flag, value, expected):
    with pytest.raises(config.ConfigError) as e:
        config.parse(train_rl.RLConfig, train_rl.PRESETS, [flag, value])
    assert str(e.value).startswith(f"{flag} ") and str(e.value).endswith(f": expected {expected}")


@pytest.mark.parametrize(
    "cls,presets,argv,expected",
    [
        (build_data.BuildConfig, build_data.PRESETS, ["--k", "-3"], "--k -3: expected ≥ 1"),
        (train_sft.SFTConfig, train_sft.PRESETS, ["--eval-frac", "1.5"], "--eval-frac 1.5: expected [0, 1]"),
        (train_sft.SFTConfig, train_sft.PRESETS, ["--keep", "0"], "--keep 0: expected ≥ 1"),
        (train_prmu.PRMUConfig, train_prmu.PRESETS, ["--unknown-user-rate", "-0.1"], "expected [0, 1]"),
        (evaluate.EvalConfig, {}, ["--samples", "-1"], "--samples -1: expected ≥ 0"),
        (evaluate.EvalConfig, {}, ["--temperature", "0"], "--temperature 0.0: expected > 0"),
    ],
)
def test_other_scripts_flags_out_of_range(cls, presets, argv, expected):
    with pytest.raises(config.ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        config.parse(cls, presets, argv)


def test_a_preset_is_held_to_the_ranges_too():
    with pytest.raises(config.ConfigError, match="--group 0: expected ≥ 1"):
        config.parse(train_rl.RLConfig, {"bad": {"group": 0}}, ["--preset", "bad"])


def test_range_by_hand():
    r = config.Range(0, 1, hi_open=True)
    assert [r.accepts(x) for x in (-0.1, 0, 0.5, 1)] == [False, True, True, False] and str(r) == "[0, 1)"
    assert str(config.ALL_OR_COUNT) == "-1 or ≥ 1" and config.ALL_OR_COUNT.accepts(-1)
    assert not config.ALL_OR_COUNT.accepts(0) and not config.POSITIVE.accepts(0.0) and config.POSITIVE.accepts(1e-9)
    assert not math.isfinite(float("nan"))


@pytest.mark.parametrize(
    "script,argv,line",
    [
        ("train_rl.py", ["--global-batch", "0"], "error: --global-batch 0: expected ≥ 1"),
        ("train_sft.py", ["--lr", "nan"], "error: --lr nan: expected a finite number"),
        ("build_data.py", ["--k", "-3"], "error: --k -3: expected ≥ 1"),
        ("evaluate.py", ["--temperature", "0"], "error: --temperature 0.0: expected > 0"),
    ],
)
def test_as_a_user_sees_it(tmp_path, script, argv, line):
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, script, *argv, "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == line and "Traceback" not in p.stderr
    assert not out.exists()  # nothing written
