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


def test_bytes_that_are_not_utf8_name_the_file_line_and_byte(tmp_path):
    from tagpr.files import DataError, iter_jsonl, read_json

    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"id": "a"}\n{"id": "b\xe9"}\n')
    with pytest.raises(DataError, match=r"p.jsonl:2: not UTF-8 \(byte 0xe9 at column 10\)$"):
        list(iter_jsonl(bad))
    (tmp_path / "t.json").write_bytes(b'{\n "a":\n "\xff"}')
    with pytest.raises(DataError, match=r"t.json:3: not UTF-8 \(byte 0xff at column 3\)$"):
        read_json(tmp_path / "t.json")


def test_a_torn_last_line_of_the_metrics_log_is_dropped_and_said(tmp_path, capsys):
    from tagpr.files import DataError
    from tagpr.runlog import MetricsLog

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')  # killed mid-append
    MetricsLog(log, resume_step=2).write({"step": 3, "loss": 1.0})
    assert log.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.0}\n'
    assert "metrics.jsonl:3: dropped a torn last line (15 characters)" in capsys.readouterr().out
    log.write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')  # a broken line in the middle is not a torn append
    with pytest.raises(DataError, match="metrics.jsonl:2: malformed JSON"):
        MetricsLog(log, resume_step=3)


def test_a_prompt_file_that_is_not_utf8_as_a_user_sees_it(tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_bytes(b'{"id": "x\x80"}\n')
    out = tmp_path / "out"
    p = subprocess.run(
        [sys.executable, "train_sft.py", "--preset", "tiny", "--sft", str(bad), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == f"error: {bad}:1: not UTF-8 (byte 0x80 at column 10)"
    assert not out.exists()
