"""The entry scripts as a user meets them: `--help` that documents every flag once, from the config dataclass;
bad records refused before any work with `error: <file>:<line>: field …` and no traceback; a prompt file
smaller than one batch."""

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from tagpr import config, lamp, records, synthetic
from tagpr.files import DataError, write_json

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
SCRIPTS = {
    "build_data": "BuildConfig",
    "train_sft": "SFTConfig",
    "train_prmu": "PRMUConfig",
    "train_rl": "RLConfig",
    "evaluate": "EvalConfig",
    "scripts.demo": "DemoConfig",
    "scripts.ablate": "AblateConfig",
}


def script_config(module: str):
    """(the entry script's module, its config dataclass)."""
    sys.path.insert(0, str(ROOT / "scripts"))  # scripts/demo.py imports as demo
    m = importlib.import_module(module.removeprefix("scripts."))
    return m, getattr(m, SCRIPTS[module])


@dataclass
class Example:
    """A docstring is not a help text."""

    lr: float = 1e-5  # learning rate
    mode: Literal["a", "b"] = "a"  # how: "a" one way,
    # "b" the other

    # a section comment (after a blank line): not part of mode's help
    bare: int = 3
    flag: bool = False  # turn it on


def test_field_help_reads_the_comments():
    assert config.field_help(Example) == {
        "lr": "learning rate",
        "mode": 'how: "a" one way, "b" the other',
        "flag": "turn it on",
    }
    ap = config.parser(Example, {})
    text = ap.format_help()
    assert "--mode {a,b}" in text and "(default: 'a')" in text and "--flag, --no-flag" in text
    cfg, _ = config.parse(Example, {}, ["--mode", "b", "--lr", "0.5"])
    assert (cfg.mode, cfg.lr, cfg.bare) == ("b", 0.5, 3)
    with pytest.raises(SystemExit):  # argparse refuses a value off the set
        config.parse(Example, {}, ["--mode", "c"])
    with pytest.raises(config.ConfigError, match="--mode 'c': expected one of a, b"):
        config.parse(Example, {"p": {"mode": "c"}}, ["--preset", "p"])  # a preset's value too


@pytest.mark.parametrize("module", sorted(SCRIPTS))
def test_every_flag_has_a_help_and_its_default_once(module):
    m, cls = script_config(module)
    helps = config.field_help(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if len(helps.get(f, "")) < 8]
    assert not missing, f"{module}: fields without a help comment: {missing}"
    text = config.parser(cls, getattr(m, "PRESETS", {}), m.__doc__).format_help()
    assert "(default: None)" not in text
    flat = " ".join(text.split())
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        assert flag in text, flag
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rng = config._numeric(hints[f.name])[1]
        accepted = f"{rng}; " if rng else ""  # a numeric flag's accepted range, before its default
        shown = f"({accepted}default: {default!r})" if isinstance(default, str) else f"({accepted}default: {default})"
        assert shown in flat, (flag, shown)
        assert rng is None or rng.accepts(default), (flag, "the default is outside its own range")
    assert len(re.findall(r"(?:\(|; )default: ", flat)) == len(fields)  # once each
    assert m.__doc__.strip().splitlines()[0] in text  # the module docstring leads


def test_help_as_a_user_runs_it():
    r = subprocess.run(
        [sys.executable, "train_rl.py", "--help"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    flat = " ".join(r.stdout.split())
    assert "--stratify {none,task,gold}" in flat and "--precision {auto,fp32,bf16}" in flat
    assert '"none": no R_p term' in flat and "(default: 'none')" in flat


def rl_prompt_file(path: Path, **overrides) -> Path:
    """Two synthetic LaMP-2 / LaMP-3 prompts, the first with `overrides`."""
    rows = [
        records.RLPrompt("q1", "LaMP_2", "u1", "Which tag ... description: a ship in space", "sci-fi").to_json(),
        records.RLPrompt("q2", "LaMP_3", "u2", "What is the score ... review: fine", "4").to_json(),
    ]
    rows[0].update(overrides)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_rl(*args, env=None):
    return subprocess.run(
        [sys.executable, "train_rl.py", "--preset", "tiny", *args],
        cwd=ROOT,
        env=env or ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "task,gold,said",
    [
        ("LaMP_2", "not-a-tag", "'not-a-tag' is not a LaMP_2 label (expected one of: sci-fi, based on a book"),
        ("LaMP_3", "7", "'7' is outside the rating range 1-5"),
        ("LaMP_3", "five", "'five' is not a rating (expected a number from 1 to 5)"),
        ("LaMP_9", "x", "field 'task': unknown task 'LaMP_9'"),
    ],
)
def test_bad_rl_prompts_are_refused_by_name(tmp_path, task, gold, said):
    bad = rl_prompt_file(tmp_path / "rl_prompts.jsonl", task=task, gold=gold)
    with pytest.raises(DataError) as e:
        records.read_rl_prompts(bad)
    assert "rl_prompts.jsonl:1: " in str(e.value) and said in str(e.value)
    if task == "LaMP_2":  # and as a user sees it
        r = run_rl("--prompts", str(bad), "--out", str(tmp_path / "out"))
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1].startswith(f"error: {bad}:1: field 'gold': {said}")
        assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
        again = run_rl("--prompts", str(bad), "--out", str(tmp_path / "out"), env={**ENV, "TAGPR_TRACEBACK": "1"})
        assert again.returncode != 0 and "Traceback (most recent call last)" in again.stderr


def test_bad_sft_answers_and_pairs(tmp_path):
    good = {"id": "1", "task": "LaMP_3", "user_id": "u", "prompt": "p", "chain": "<think></think>", "answer": "3"}
    p = tmp_path / "sft.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps({**good, "id": "2", "answer": "0"}) + "\n")
    with pytest.raises(DataError, match=r"sft\.jsonl:2: field 'answer': '0' is outside the rating range 1-5"):
        records.read_sft(p)
    p.write_text(json.dumps({**good, "task": "LaMP_2N", "answer": "comedy"}) + "\n")  # a movie tag on news
    with pytest.raises(DataError, match=r"sft\.jsonl:1: field 'answer': 'comedy' is not a LaMP_2N label"):
        records.read_sft(p)
    p.write_text(json.dumps({**good, "task": "LaMP_4", "answer": "any headline"}) + "\n")  # generation: any text
    assert records.read_sft(p)[0].answer == "any headline"
    q = tmp_path / "pqp.jsonl"
    q.write_text(
        json.dumps(
            {"id": "1", "set": "pqp", "user_id": "u", "task": "LaMP_8", "prompt": "q", "chosen": "a", "rejected": "b"}
        )
        + "\n"
    )
    with pytest.raises(DataError, match=r"pqp\.jsonl:1: field 'task': unknown task 'LaMP_8'"):
        records.read_pairs(q)


def test_lamp_golds_are_checked_against_the_task(tmp_path):
    synthetic.generate(tmp_path, ["LaMP_3"], seed=0, sizes={"train": (2, 1), "dev": (2, 1), "test": (1, 1)})
    golds = tmp_path / "LaMP_3" / "dev" / "dev_outputs.json"
    data = json.loads(golds.read_text())
    first = data["golds"][0]["id"]
    data["golds"][0]["output"] = "9"
    write_json(golds, data)
    with pytest.raises(DataError, match=rf"dev_outputs\.json: id={first}: field 'output': '9' is outside the rating"):
        lamp.load_split(tmp_path, "LaMP_3", "dev")


def test_fit_batch_by_hand():
    import train_rl

    assert train_rl.fit_batch(8, 4, 1) == 4  # enough prompts: the flag
    assert train_rl.fit_batch(3, 4, 1) == 3  # fewer: all of them
    assert train_rl.fit_batch(3, 4, 2) == 2  # ... that 2 ranks share evenly
    with pytest.raises(DataError, match=r"1 prompt\(s\) for 2 ranks: each rank needs at least one"):
        train_rl.fit_batch(1, 4, 2)
    with pytest.raises(config.ConfigError, match="--global-batch 5 must be divisible by the 2 ranks"):
        train_rl.fit_batch(9, 5, 2)


def test_a_prompt_file_smaller_than_one_batch_trains(tmp_path, capsys):
    import train_rl

    small = rl_prompt_file(tmp_path / "rl_prompts.jsonl")  # 2 prompts, --global-batch 4
    train_rl.main(
        [
            "--preset",
            "tiny",
            "--prompts",
            str(small),
            "--out",
            str(tmp_path / "rl"),
            "--max-steps",
            "1",
            "--prmu",
            "none",
        ]
    )
    assert "only 2 prompts: rollout batches of 2 prompts instead of --global-batch 4" in capsys.readouterr().out
    cfg = json.loads((tmp_path / "rl" / "config.json").read_text())
    assert cfg["global_batch"] == 2 and cfg["total_steps"] == 1
    rows = [json.loads(line) for line in (tmp_path / "rl" / "rollouts.jsonl").read_text().splitlines()]
    assert sorted({r["prompt_id"] for r in rows}) == ["q1", "q2"] and len(rows) == 2 * 4  # both prompts × G = 4


def test_bf16_on_a_cpu_without_it_stops_before_any_work(tmp_path):
    r = run_rl("--precision", "bf16", "--out", str(tmp_path / "out"), env={**ENV, "TAGPR_CPU": "plain"})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --precision bf16 needs a CPU with bf16 matmul hardware (AVX512-BF16 or AMX)")
    )
    assert not (tmp_path / "out").exists()
