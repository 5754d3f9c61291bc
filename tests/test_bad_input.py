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
    ("--max-steps", "-2", "-1 or ≥ 0"),
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


def user_run(tmp_path, *argv):
    """An entry script as a user runs it: (exit status, the last line of stderr, whether it printed a traceback)."""
    p = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    return p.returncode, last, "Traceback" in p.stderr


class FailingBackend:
    """A model whose every call for the questions in `fail` fails after its retries (as an unreachable server's)."""

    name, model_id = "failing", "failing"

    def __init__(self, fail):
        self.fail = set(fail)

    def chat(self, requests, progress=None):
        from tagpr.llm import Reply

        return [
            Reply(error="connection refused") if any(f in r.messages[-1]["content"] for f in self.fail) else Reply("x")
            for r in requests
        ]


def test_a_failed_model_call_is_never_scored(tmp_path, synthetic_dir):
    from tagpr import evaluation, lamp
    from tagpr.files import DataError

    split = lamp.load_split(synthetic_dir, "LaMP_2", "dev")
    q = split.questions[0]
    settings = evaluation.Settings(k=2, max_new_direct=8)
    with pytest.raises(
        DataError, match=r"zero-shot on LaMP_2: 1 of 2 model calls failed \(first: .*connection refused"
    ):
        evaluation.evaluate_split(FailingBackend([q.input]), "zero-shot", split, tmp_path / "a", settings, limit=2)
    assert not (tmp_path / "a" / "LaMP_2" / "metrics.json").exists()  # nothing scored
    assert (tmp_path / "a" / "LaMP_2" / "traces.jsonl").read_text().count('"connection refused"') == 1
    m = evaluation.evaluate_split(
        FailingBackend([q.input]), "zero-shot", split, tmp_path / "b", settings, limit=2, allow_failures=True
    )
    assert m["failures"] == 1 and m["n"] == 2
    assert evaluation.cell(m, "accuracy").endswith("(n = 2, 1 model calls failed)")


def test_evaluate_refuses_an_unknown_method_and_a_missing_tags_file_before_writing(tmp_path, synthetic_dir):
    out = tmp_path / "out"
    common = ["evaluate.py", "--model", "tiny", "--lamp-dir", str(synthetic_dir), "--out", str(out), "--limit", "1"]
    assert user_run(tmp_path, *common, "--methods", "foo") == (
        2,
        "error: --methods: unknown 'foo'; expected one of zero-shot, rag, rag-r, pag, r2p, tagpr, oracle, floor",
        False,
    )
    code, last, tb = user_run(tmp_path, *common, "--methods", "tagpr", "--tags", str(tmp_path / "none.json"))
    assert (code, last, tb) == (2, f"error: --tags {tmp_path / 'none.json'}: file not found", False)
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """The tiny model saved as an HF folder (safetensors), as train_sft exports one."""
    from tagpr.models import load_model

    out = tmp_path_factory.mktemp("tiny_model")
    model, tok = load_model("tiny", device="cpu")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_a_truncated_or_missing_model_folder_is_refused_before_any_work(tmp_path, tiny_export):
    import shutil

    from tagpr.files import DataError
    from tagpr.models import check_model

    check_model(tiny_export, "--policy")  # a whole export passes
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_export, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        DataError, match=rf"--policy {weights}: {len(data) - 1000} bytes, the header promises {len(data)}"
    ):
        check_model(bad, "--policy")
    with pytest.raises(DataError, match="--model .*nowhere: no such folder"):
        check_model(tmp_path / "nowhere", "--model")
    (bad / "config.json").write_text("{")
    with pytest.raises(DataError, match="config.json: malformed JSON"):
        check_model(bad, "--policy")
    out = tmp_path / "rl"
    code, last, tb = user_run(tmp_path, "train_rl.py", "--preset", "tiny", "--policy", str(bad), "--out", str(out))
    assert code == 2 and last.startswith(f"error: {bad / 'config.json'}: malformed JSON") and not tb
    assert not out.exists()


def test_an_out_that_is_a_file_is_refused(tmp_path):
    f = tmp_path / "taken"
    f.write_text("mine")
    assert user_run(tmp_path, "train_sft.py", "--preset", "tiny", "--out", str(f)) == (
        2,
        f"error: --out {f}: an existing file, not a folder",
        False,
    )
    assert user_run(tmp_path, "build_data.py", "--preset", "tiny", "--out", str(f / "sub"))[1] == (
        f"error: --out {f / 'sub'}: {f} is a file, so no folder can be made under it"
    )
    assert f.read_text() == "mine"  # nothing lost


def test_duplicate_ids_are_refused(tmp_path):
    import json

    row = {"id": "q1", "task": "LaMP_2", "user_id": "u", "prompt": "p", "gold": "comedy"}
    path = tmp_path / "rl_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (row, {**row, "id": "q2"}, {**row, "gold": "horror"})))
    out = tmp_path / "rl"
    code, last, tb = user_run(tmp_path, "train_rl.py", "--preset", "tiny", "--prompts", str(path), "--out", str(out))
    assert (code, last, tb) == (2, f"error: {path}:3: field 'id': 'q1' repeats line 1 (ids must be unique)", False)
    assert not out.exists()


def test_an_rl_prompt_over_the_limit_stops_the_run_or_is_dropped_and_counted(tmp_path):
    """A 200k-character prompt (the issue's probe) is named with its line and token count before the model loads;
    --long-prompts drop leaves it out and says so; a held-out prompt over the limit always stops the run."""
    import json

    rows = [
        {"id": f"q{i}", "task": "LaMP_2", "user_id": "u", "prompt": "Which tag? A movie.", "gold": "comedy"}
        for i in range(4)
    ]
    rows.insert(2, {**rows[0], "id": "huge", "prompt": "word " * 40_000})
    path = tmp_path / "rl_prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rl"
    common = ["train_rl.py", "--preset", "tiny", "--prompts", str(path), "--out", str(out), "--max-steps", "1"]
    code, last, tb = user_run(tmp_path, *common)
    assert code == 2 and not tb and not out.exists()
    assert last.startswith(f"error: {path}:3: prompt 'huge' has ") and "tokens, over the limit of 4072 (" in last
    p = subprocess.run(
        [sys.executable, *common, "--long-prompts", "drop", "--global-batch", "2"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--long-prompts drop: 1 of 5 prompts over 4072 tokens left out" in p.stdout
    assert json.loads((out / "config.json").read_text())["prompts"] == 4
    (tmp_path / "ev.jsonl").write_text(json.dumps({**rows[2], "id": "e1"}) + "\n")
    code, last, _ = user_run(
        tmp_path,
        *common[:-2],
        "--out",
        str(tmp_path / "rl2"),
        "--max-prompt-len",
        "64",
        "--long-prompts",
        "drop",
        "--eval-prompts",
        str(tmp_path / "ev.jsonl"),
    )
    assert code == 2 and last.startswith(f"error: {tmp_path / 'ev.jsonl'}:1: prompt 'e1' has ")
    assert "over the limit of 64" in last and not (tmp_path / "rl2").exists()


def test_a_bad_tags_or_held_out_file_leaves_nothing_behind(tmp_path):
    bad = tmp_path / "ev.jsonl"
    bad.write_text('{"id": "e1", "task": "LaMP_2"}\n')
    out = tmp_path / "rl"
    code, last, tb = user_run(
        tmp_path, "train_rl.py", "--preset", "tiny", "--out", str(out), "--eval-prompts", str(bad)
    )
    assert (code, tb) == (2, False) and last.startswith(f"error: {bad}:1: missing field 'user_id'")
    code, last, tb = user_run(tmp_path, "train_rl.py", "--preset", "tiny", "--out", str(out), "--tags", str(bad))
    assert (code, tb) == (2, False) and last.startswith("error: ") and str(bad) in last
    assert not out.exists()  # no config.json, metrics.jsonl or rollouts.jsonl left behind


def test_an_out_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    """A read-only folder (root writes anyway, so the permission is stubbed to say no, as it says for a user)."""
    import os

    from tagpr.files import DataError, check_out

    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: os.fspath(path) != os.fspath(ro))
    with pytest.raises(DataError, match=rf"--out {ro / 'run'}: {ro} is not writable"):
        check_out(ro / "run")
    check_out(tmp_path / "fine" / "run")  # a writable ancestor passes


def test_train_prmu_refuses_a_bad_pair_file_as_a_user_sees_it(tmp_path):
    import json

    bad = tmp_path / "prp.jsonl"
    row = {"id": "p1", "set": "prp", "user_id": "u", "task": "LaMP_2", "prompt": "p", "chosen": "a", "rejected": "b"}
    bad.write_text(json.dumps(row) + "\n" + json.dumps({**row, "id": "p2", "set": "best"}) + "\n")
    good = tmp_path / "pqp.jsonl"
    good.write_text(json.dumps({**row, "id": "q1", "set": "pqp"}) + "\n")
    out = tmp_path / "prmu"
    argv = ["train_prmu.py", "--preset", "tiny", "--prp", str(bad), "--pqp", str(good), "--out", str(out)]
    code, last, tb = user_run(tmp_path, *argv)
    assert (code, last, tb) == (2, f"error: {bad}:2: field 'set' must be 'prp' or 'pqp', got 'best'", False)
    assert not out.exists()
