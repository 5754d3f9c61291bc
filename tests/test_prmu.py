"""PRMU: user embeddings matter, save → load is exact, unknown / missing users, over-long inputs."""

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tagpr import lamp, prmu, prompts, records
from tagpr.files import DataError, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def opposite_tastes(n_prompts=40, seed=0):
    """Two users, the same prompts: A prefers the enthusiastic reply, B the critical one."""
    rng = random.Random(seed)
    things = [
        "the heist film",
        "a space opera",
        "the romance",
        "this comedy",
        "a war drama",
        "the cartoon",
        "the thriller",
        "a western",
        "the musical",
        "this documentary",
    ]
    pairs = []
    for i in range(n_prompts):
        prompt = f"What does this user think of {rng.choice(things)} number {i}?"
        good, bad = "They loved it, a wonderful film.", "They hated it, a dreadful film."
        pairs.append(records.Pair(f"a{i}", "prp", "A", "LaMP_2", prompt, good, bad))
        pairs.append(records.Pair(f"b{i}", "pqp", "B", "LaMP_2", prompt, bad, good))
    return pairs


def train(tmp, pairs, use_ue, steps=40, extra=()):
    import train_prmu

    write_jsonl(tmp / "prp.jsonl", [p.to_json() for p in pairs if p.set == "prp"])
    write_jsonl(tmp / "pqp.jsonl", [p.to_json() for p in pairs if p.set == "pqp"])
    out = tmp / ("ue" if use_ue else "no_ue")
    train_prmu.main(
        [
            "--preset",
            "tiny",
            "--prp",
            str(tmp / "prp.jsonl"),
            "--pqp",
            str(tmp / "pqp.jsonl"),
            "--out",
            str(out),
            "--max-steps",
            str(steps),
            "--epochs",
            "100",
            "--eval-frac",
            "0.25",
            "--global-batch",
            "16",
            "--micro-batch",
            "16",
            "--lr",
            "1e-3",
            "--ue-lr",
            "3e-2",
            "--eval-every",
            "1000",
            "--save-every",
            "1000",
        ]
        + ([] if use_ue else ["--no-use-user-embeddings"])
        + list(extra)
    )
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1], out


@pytest.mark.slow
def test_user_embeddings_beat_the_ablation(tmp_path):
    pairs = opposite_tastes()
    with_ue, out = train(tmp_path, pairs, True)
    without, _ = train(tmp_path, pairs, False)
    # without a user signal the two users' pairs contradict each other: chance at best
    assert without["eval_acc/all"] <= 0.65, without
    assert with_ue["eval_acc/all"] >= 0.9, with_ue
    assert with_ue["eval_acc/all"] - without["eval_acc/all"] >= 0.3
    # the exported model scores held-out prompts the way each user prefers
    scorer = prmu.Scorer(out / "model")
    good, bad = "They loved it, a wonderful film.", "They hated it, a dreadful film."
    q = "What does this user think of a brand new film?"
    s = scorer.score(["A", "A", "B", "B"], [q] * 4, [good, bad, good, bad])
    assert s[0] > s[1] and s[3] > s[2]


def tastes_and_a_shared_rule(n_prompts=24):
    """Six users on the same prompts. Taste pairs: ann, fay, bob prefer the enthusiastic reply, cat, gus, dan the
    critical one (only the user tells which). Shared pairs: every user prefers a clear reply to garbled text.
    bob and dan are the users `--eval-user-frac 0.25` holds out whole (by their id's hash), one of each taste,
    so a scorer that ignores the user gets exactly half of their taste pairs."""
    taste = {"ann": 1, "fay": 1, "bob": 1, "cat": -1, "gus": -1, "dan": -1}
    good, bad = "They loved it, a wonderful film.", "They hated it, a dreadful film."
    clear, garbled = "A clear reply that answers the question.", "zq xv qq zzv kk qx vvz"
    pairs = []
    for i in range(n_prompts):
        prompt = f"What does this user think of film number {i}?"
        for u, t in taste.items():
            liked = (good, bad) if t > 0 else (bad, good)
            pairs.append(records.Pair(f"{u}{i}-t", "prp", u, "LaMP_2", prompt, *liked))
            pairs.append(records.Pair(f"{u}{i}-s", "pqp", u, "LaMP_2", prompt, clear, garbled))
    return pairs


@pytest.mark.slow
def test_unseen_users_score_like_the_model_without_user_embeddings(tmp_path):
    """Held-out accuracy in three parts (seen users by pair, unseen users by user, each without the user): with
    user embeddings the seen users' pairs beat the w/o-UE model by ≥ 0.15 (taste pairs it cannot tell apart);
    unseen users go through the trained unknown row and keep the shared rule: no worse than w/o UE."""
    import train_prmu

    pairs = tastes_and_a_shared_rule()
    train_pairs, evals = train_prmu.split_pairs(pairs, 0.25, 0.25)
    assert {p.user_id for p in train_pairs} == {"ann", "fay", "cat", "gus"}
    assert {p.user_id for p in evals if p.user_id in ("bob", "dan")} == {"bob", "dan"}
    extra = ["--eval-user-frac", "0.25", "--unknown-user-rate", "0.2"]
    ue, out = train(tmp_path, pairs, True, steps=60, extra=extra)
    no_ue, _ = train(tmp_path, pairs, False, steps=60, extra=extra)
    for m in (ue, no_ue):
        assert {"eval_acc/seen", "eval_acc/unseen", "eval_acc/seen_no_ue", "eval_acc/unseen_no_ue"} <= set(m)
    assert ue["eval_acc/seen"] >= 0.9, ue
    assert ue["eval_acc/seen"] - no_ue["eval_acc/seen"] >= 0.15, (ue, no_ue)
    assert ue["eval_acc/seen_no_ue"] <= ue["eval_acc/seen"] - 0.15  # the user is what it learned
    assert ue["eval_acc/unseen"] >= no_ue["eval_acc/unseen"] - 0.05, (ue, no_ue)
    assert ue["eval_acc/unseen"] >= 0.7  # the shared rule survives
    assert no_ue["eval_acc/unseen"] == no_ue["eval_acc/unseen_no_ue"]  # w/o UE: the user changes nothing
    # and the w/o-UE model earned its number: the shared rule learned (an untrained scorer is at ~0.5), the taste
    # pairs at their user-blind best of one half: 0.5 · 1 + 0.5 · 0.5 = 0.75
    assert no_ue["eval_acc/unseen"] >= 0.7, no_ue
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["eval_pairs_unseen_users"] == 2 * 2 * 24  # bob and dan, every pair


@pytest.fixture(scope="module")
def small_prmu(tmp_path_factory):
    backbone, tok = prmu.load_backbone("tiny", seed=0)
    model = prmu.PRMU(backbone, 2)
    with torch.no_grad():
        model.user_embeddings.weight.normal_(0, 1.0)  # distinct rows, so the user visibly changes the score
    path = prmu.save(model, tok, {"A": 1, "B": 2}, tmp_path_factory.mktemp("prmu") / "model")
    return model.eval(), tok, path


def test_save_load_gives_identical_scores(small_prmu):
    model, tok, path = small_prmu
    scorer = prmu.Scorer(path, max_len=512, batch_size=2)
    prompts = ["Which tag does this movie relate to? description: a robot heist", "short", "x" * 50]
    responses = ["<think><analyze_input>a</analyze_input></think>sci-fi", "comedy", ""]
    got = scorer.logits(["A", "B", "A"], prompts, responses)
    enc = prmu.Encoder(tok, 512)
    ids, mask = prmu.pad_right([enc(p, r) for p, r in zip(prompts, responses)], tok.pad_token_id, "cpu")
    with torch.no_grad():
        want = model(ids, mask, torch.tensor([1, 2, 1]))
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.equal(scorer.score(["A"], prompts[:1], responses[:1]), torch.sigmoid(got[:1]))
    assert torch.isfinite(got).all()  # the empty response scores like any other


def test_unknown_and_missing_users_use_row_zero(small_prmu):
    _, _, path = small_prmu
    scorer = prmu.Scorer(path, max_len=512)
    assert scorer.rows(["A", "B", "nobody", None, ""]) == [1, 2, 0, 0, 0]
    p, r = ["Which tag?"] * 4, ["comedy"] * 4
    s = scorer.logits(["nobody", None, "", "A"], p, r)
    assert s[0] == s[1] == s[2] and s[0] != s[3]
    with pytest.raises(ValueError, match="same length"):
        scorer.logits(["A"], p, r)


def test_over_long_inputs_cut_the_profile_from_the_left(small_prmu):
    _, tok, _ = small_prmu
    enc = prmu.Encoder(tok, 64)
    prompt = " ".join(f"oldest{i}" for i in range(200)) + " QUESTION: which tag?"
    ids = enc(prompt, "comedy")
    assert len(ids) == 64
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>user\n") and "QUESTION: which tag?" in text and "oldest0 " not in text
    assert text.rstrip().endswith("comedy<|im_end|>")
    long_reply = " ".join(["reasoning"] * 300) + " FINAL"
    text = tok.decode(enc("q", long_reply))
    assert "FINAL" in text and len(enc("q", long_reply)) == 64  # the answer at the end survives


def test_pair_files(tmp_path):
    p = tmp_path / "prp.jsonl"
    good = {"id": "1", "set": "prp", "user_id": None, "task": "LaMP_2", "prompt": "q", "chosen": "a", "rejected": "b"}
    p.write_text(json.dumps(good) + "\n")
    assert records.read_pairs(p)[0].user_id == ""  # a missing user id → the unknown user
    assert prmu.user_map(["b", "a", "", "a"]) == {"a": 1, "b": 2}
    p.write_text(json.dumps({**good, "set": "other"}) + "\n")
    with pytest.raises(DataError, match=r"prp\.jsonl:1: field 'set' must be 'prp' or 'pqp'"):
        records.read_pairs(p)
    p.write_text(json.dumps({k: v for k, v in good.items() if k != "rejected"}) + "\n")
    with pytest.raises(DataError, match=r"prp\.jsonl:1: missing field 'rejected'"):
        records.read_pairs(p)


@pytest.mark.slow
def test_two_ranks_run(tmp_path):
    pairs = opposite_tastes(8)
    write_jsonl(tmp_path / "prp.jsonl", [p.to_json() for p in pairs if p.set == "prp"])
    write_jsonl(tmp_path / "pqp.jsonl", [p.to_json() for p in pairs if p.set == "pqp"])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train_prmu.py"),
        "--preset",
        "tiny",
        "--prp",
        str(tmp_path / "prp.jsonl"),
        "--pqp",
        str(tmp_path / "pqp.jsonl"),
        "--out",
        str(tmp_path / "o"),
        "--max-steps",
        "3",
        "--epochs",
        "10",
        "--global-batch",
        "6",
        "--micro-batch",
        "2",
        "--eval-frac",
        "0.25",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "eval_acc/all" in rows[-1]
    assert (tmp_path / "o" / "model" / "user_embeddings.safetensors").is_file()
    # the same run on one rank: the same global batches, so the same losses and accuracies step by step
    script_args = cmd[cmd.index(str(ROOT / "train_prmu.py")) :]
    script_args[script_args.index(str(tmp_path / "o"))] = str(tmp_path / "one")
    one = subprocess.run(
        [sys.executable, *script_args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    rows1 = [json.loads(line) for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows1] == [r["step"] for r in rows]
    for a, b in zip(rows, rows1):
        for k in ("loss", "train_acc") + (("eval_acc/all",) if "eval_acc/all" in a else ()):
            assert a[k] == pytest.approx(b[k], abs=1e-5), (k, a["step"])
    assert rows[0]["loss"] != rows[-1]["loss"]  # the steps did something to compare


def test_the_scorer_reads_at_the_length_it_was_trained_at(small_prmu, tmp_path):
    """The export carries the training `max_len`; RL's Scorer (which passes none) encodes at it: a prompt of
    ~400 tokens is cut to 96 tokens as in training, and scores as the model does on that cut input."""
    model, tok, _ = small_prmu
    path = prmu.save(model, tok, {"A": 1, "B": 2}, tmp_path / "model", max_len=96)
    assert json.loads((path / "prmu.json").read_text())["max_len"] == 96
    scorer = prmu.Scorer(path)
    assert scorer.max_len == 96 and prmu.Scorer(path, max_len=512).max_len == 512  # an explicit one wins
    prompt = " ".join(f"item{i}" for i in range(200)) + " which tag?"
    ids, mask = prmu.pad_right([prmu.Encoder(tok, 96)(prompt, "comedy")], tok.pad_token_id, "cpu")
    assert ids.shape[1] == 96
    with torch.no_grad():
        want = model(ids, mask, torch.tensor([1]))
    torch.testing.assert_close(scorer.logits(["A"], [prompt], ["comedy"]), want, atol=1e-5, rtol=1e-5)
    legacy = json.loads((path / "prmu.json").read_text())
    del legacy["max_len"]
    (path / "prmu.json").write_text(json.dumps(legacy))
    assert prmu.Scorer(path).max_len == 2048  # exports from before: the old default


def test_the_unknown_user_row_is_trained_by_the_dropout(tmp_path):
    """--unknown-user-rate 1: every training pair goes through row 0, so it moves and the users' rows keep their
    initial values exactly (AdamW without decay leaves a row with no gradient alone); rate 0: the reverse."""
    from safetensors.torch import load_file

    import train_prmu

    pairs = opposite_tastes(n_prompts=8)
    write_jsonl(tmp_path / "prp.jsonl", [p.to_json() for p in pairs if p.set == "prp"])
    write_jsonl(tmp_path / "pqp.jsonl", [p.to_json() for p in pairs if p.set == "pqp"])

    def table(name, *extra):
        train_prmu.main(
            [
                "--preset",
                "tiny",
                "--prp",
                str(tmp_path / "prp.jsonl"),
                "--pqp",
                str(tmp_path / "pqp.jsonl"),
                "--out",
                str(tmp_path / name),
                "--eval-frac",
                "0",
                "--eval-user-frac",
                "0",
                "--global-batch",
                "8",
                "--micro-batch",
                "8",
                "--ue-lr",
                "1e-2",
                *extra,
            ]
        )
        return load_file(str(tmp_path / name / "model" / "user_embeddings.safetensors"))["weight"]

    init = table("init", "--max-steps", "0")
    always, never = (table(f"rate{r}", "--max-steps", "3", "--unknown-user-rate", r) for r in ("1", "0"))
    assert init.shape[0] == 3  # unknown, A, B
    assert torch.equal(always[1:], init[1:]) and not torch.equal(always[0], init[0])
    assert torch.equal(never[0], init[0]) and not torch.equal(never[1], init[1]) and not torch.equal(never[2], init[2])


# A Qwen3-style chat template, written for this test: an assistant turn's `<think>…</think>` goes into a reasoning
# slot, and a turn without one gets an empty `<think>\n\n</think>\n\n` (the behaviour of Qwen3's own template).
QWEN3_STYLE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set ns = namespace(reasoning='', content=m.content) -%}"
    "{%- if '</think>' in m.content -%}"
    "{%- set ns.reasoning = m.content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set ns.content = m.content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + ns.reasoning + '\\n</think>\\n\\n' + ns.content + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)


def test_the_input_is_the_backbones_own_rendering():
    """Through a Qwen3-style template, the scored input is exactly the template's rendering of (user turn, the real
    response): one think block holding the tagged reasoning, not an empty one before it."""
    import copy

    from tagpr.models import load_tokenizer

    tok = copy.deepcopy(load_tokenizer("tiny"))
    tok.chat_template = QWEN3_STYLE
    prompt = "Which tag does this movie relate to? description: a robot heist"
    response = "<think>\n<analyze_input>a heist with robots</analyze_input>\n</think>\nsci-fi"
    want = (
        "<|im_start|>user\n" + prompt + "<|im_end|>\n<|im_start|>assistant\n<think>\n"
        "<analyze_input>a heist with robots</analyze_input>\n</think>\n\nsci-fi<|im_end|>\n"
    )
    ids = prmu.Encoder(tok, 512)(prompt, response)
    assert ids == tok(want, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids).count("<think>") == 1
    # cut to fit, the rendering stays the template's: the prompt loses its start, the answer and think block stay
    long_prompt = " ".join(f"item{i}" for i in range(300)) + " " + prompt
    short = prmu.Encoder(tok, 80)(long_prompt, response)
    text = tok.decode(short)
    assert len(short) <= 80 and "item0 " not in text and text.count("<think>") == 1 and "sci-fi" in text


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


@pytest.mark.parametrize("task", [t for t in lamp.TASKS if t != "LaMP_1"])
def test_without_profile_is_the_prompt_built_with_no_items(task):
    """Taking the profile out of a TagPR prompt gives exactly the prompt built from no profile items, also when an
    item's own text holds the augmentation's separators."""
    t = lamp.TASKS[task]
    q = lamp.Question("q1", t.template.format(**{f: f"the {f} of q1. It ends here" for f in _fields(t.template)}))
    items = [lamp.Item(f"i{k}", {f: f'item {k} {f}, and more. "quoted" text' for f in t.item_fields}) for k in range(3)]
    full = prompts.tagpr_prompt(task, q, items)
    bare = prompts.tagpr_prompt(task, q, [])
    assert "item 0" in full and full != bare
    assert prompts.without_profile(full) == bare
    assert prompts.without_profile(bare) == bare  # nothing to take out: unchanged


def test_without_profile_refuses_what_it_cannot_take_apart():
    t = lamp.TASKS["LaMP_1"]
    q = lamp.Question("q1", t.template.format(title="T", ref1="R1", ref2="R2"))
    items = [lamp.Item("i0", {"title": "an older paper", "abstract": "a"})]
    with pytest.raises(ValueError, match="LaMP-2 to LaMP-7"):  # LaMP-1's items sit inside its input
        prompts.without_profile(prompts.tagpr_prompt("LaMP_1", q, items))
    with pytest.raises(ValueError, match="prompt 'What does this user think"):
        prompts.without_profile("What does this user think of the film?")


def test_a_reward_model_without_the_profile_scores_the_question_alone(small_prmu, tmp_path):
    """An export trained with --no-profile-in-input scores a prompt as the same weights score it with its profile
    taken out: what it knows of the user comes from the user's row alone."""
    model, tok, with_profile = small_prmu
    path = prmu.save(model, tok, {"A": 1, "B": 2}, tmp_path / "model", max_len=512, profile_in_input=False)
    assert json.loads((path / "prmu.json").read_text())["profile_in_input"] is False
    t = lamp.TASKS["LaMP_2"]
    q = lamp.Question("q1", t.template.format(description="A robot plans a heist."))
    items = [lamp.Item(f"i{k}", {"description": f"film {k}", "tag": "sci-fi"}) for k in range(2)]
    full = prompts.tagpr_prompt("LaMP_2", q, items)
    reply = ["<think><analyze_input>a</analyze_input></think>sci-fi"] * 2
    blind, sees = prmu.Scorer(path), prmu.Scorer(with_profile, max_len=512)
    assert sees.profile_in_input and not blind.profile_in_input
    got = blind.logits(["A", "B"], [full, full], reply)
    assert torch.allclose(got, sees.logits(["A", "B"], [prompts.without_profile(full)] * 2, reply), atol=1e-6)
    assert not torch.allclose(got, sees.logits(["A", "B"], [full, full], reply), atol=1e-3)
    assert got[0] != got[1]  # the user's row still moves the score
    with pytest.raises(ValueError, match="cannot be taken out"):
        blind.logits(["A"], ["a prompt of no task"], reply[:1])


def test_train_prmu_without_the_profile_records_it_and_names_a_bad_pair(tmp_path):
    """--no-profile-in-input: the export says so (the Scorer follows it); a pair whose prompt has no task's input
    is refused with its id, before any training."""
    t = lamp.TASKS["LaMP_2"]
    pairs = []
    for i in range(8):
        q = lamp.Question(f"q{i}", t.template.format(description=f"film {i}"))
        p = prompts.tagpr_prompt("LaMP_2", q, [lamp.Item("x", {"description": "old", "tag": "comedy"})])
        pairs.append(records.Pair(f"p{i}", "prp" if i % 2 else "pqp", f"u{i % 2}", "LaMP_2", p, "comedy", "action"))
    _, out = train(tmp_path, pairs, True, steps=1, extra=("--no-profile-in-input",))
    assert json.loads((out / "model" / "prmu.json").read_text())["profile_in_input"] is False
    assert json.loads((out / "config.json").read_text())["profile_in_input"] is False
    bad = [*pairs, records.Pair("odd-one", "pqp", "u0", "LaMP_2", "no task's words here", "a", "b")]
    with pytest.raises(DataError, match="pair odd-one .*field prompt"):
        train(tmp_path / "bad", bad, True, steps=1, extra=("--no-profile-in-input",))
