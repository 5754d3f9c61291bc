import math

import pytest

from tagpr import rewards, tags

T = (
    "<think>\n<analyze_input> a </analyze_input>\n<examine_examples> b </examine_examples>\n"
    "<make_decision> c </make_decision>\n</think>\n"
)
LOOP = "<think> " + "<analyze_input> x </analyze_input> " * 50 + "</think> a"
WEIRD = ["", "<think>", "</think>", "<<<>>> ???", "<think><a><b></a></b></think>", "\x00\n\t", LOOP]


def test_verifiable_reward_by_task():
    outs = [T + "comedy", T + "Comedy", "comedy", "<think> truncated comedy"]
    assert rewards.verifiable_reward(outs, ["comedy"] * 4, "LaMP_2") == [1.0, 0.0, 1.0, 0.0]
    # LaMP-3: 1 − |ŷ − y|/4 with y = 4: ŷ 3 → 0.75, 5 → 0.75, 4.5 → 0.875, 9 → max(0, −0.25) = 0, unparsable → 0
    outs = [T + "3", T + "5", T + "4.5", T + "9", T + "four", T + "nan"]
    assert rewards.verifiable_reward(outs, ["4"] * 6, "LaMP_3") == [0.75, 0.75, 0.875, 0.0, 0.0, 0.0]
    # generation: (R-1 + R-L)/2; this pair has R-1 = R-L = 2/3 (see test_metrics)
    r = rewards.verifiable_reward([T + "the cat lay on the rug"], ["The cat sat on the mat."], "LaMP_4")
    assert r == [pytest.approx(2 / 3, abs=1e-12)]
    # mixed tasks in one batch
    assert rewards.verifiable_reward([T + "[2]", T + "1"], ["[2]", "5"], ["LaMP_1", "LaMP_3"]) == [1.0, 0.0]


def test_format_reward():
    assert rewards.format_reward([T + "sci-fi", T, "<think></think> x", "sci-fi", "", LOOP]) == [
        1.0,
        0.0,
        0.0,
        0.0,
        0.0,
        1.0,
    ]


def test_repetition_reward():
    r = rewards.repetition_reward(["a b c d e", "x y x y x y x y", "a b", "", None])
    # "a b c d e": 2 distinct 4-grams of 2 → exactly 0 (no repetition), whatever the length
    assert r[0] == 0.0 and rewards.repetition_reward([" ".join(map(str, range(40)))]) == [0.0]
    # 8 tokens → 5 four-grams alternating between 2 distinct ones: (2 − 5)/(5 + ε) = −0.6
    assert r[1] == pytest.approx(-0.6, abs=1e-6)
    assert r[2:] == [0.0, 0.0, 0.0]  # fewer than n tokens: nothing can repeat
    # the tag loop: 153 tokens → 150 four-grams; distinct: the first, the 3 of the cycle, the last two = 6
    assert rewards.repetition_reward([LOOP])[0] == pytest.approx(6 / 150 - 1, abs=1e-6)


def test_tag_reward_penalties():
    two = "<think><analyze_input> a </analyze_input><make_decision> b </make_decision></think> x"
    unknown = T.replace("make_decision", "guess") + "x"
    unclosed = "<think><analyze_input> a </analyze_input>"
    got = rewards.tag_reward([T + "x", two, unknown, unclosed, "hello", LOOP])
    # pass; count −0.25; vocab −0.25; format −0.5 and count −0.25; everything −1; the loop passes every check
    assert got == [0.0, -0.25, -0.25, -0.75, -1.0, 0.0]
    assert rewards.tag_reward([two], min_tags=2) == [0.0]
    assert rewards.tag_reward([T + "x"], vocab=["analyze_input"]) == [-0.25]


def test_composite_and_foundation():
    out = T + "comedy"
    total, parts = rewards.composite_reward([out], ["comedy"], "LaMP_2", personal=[0.8])
    r_rep = parts["repetition"][0]
    assert -1e-6 < r_rep <= 0
    # R_v 1 + λ1·R_f 0.5·1 + R_rep + R_tag 0 + λ2·R_p 0.5·0.8 = 1.9 + R_rep
    assert total[0] == pytest.approx(1.9 + r_rep, abs=1e-12)
    w = rewards.RewardWeights(w_verifiable=2, w_format=0, w_repetition=0, w_tag=0, w_personal=1)
    assert rewards.composite_reward([out], ["comedy"], "LaMP_2", [0.25], w)[0] == [2.25]
    # foundation (Eq. 11): R_v + λ1·R_f + R_rep with the guided stage's λ1, no tag or PRMU term even for broken tags
    broken = [T.replace("make_decision", "guess") + "comedy"]
    f, parts = rewards.foundation_reward(broken, ["comedy"], "LaMP_2")  # λ1 = 0.5: 1 + 0.5·1 + R_rep
    assert f[0] == pytest.approx(1.5 + parts["repetition"][0], abs=1e-12) and parts["tag"] == [0.0]
    f, parts = rewards.foundation_reward(broken, ["comedy"], "LaMP_2", w_format=0.2)  # 1 + 0.2·1 + R_rep
    assert f[0] == pytest.approx(1.2 + parts["repetition"][0], abs=1e-12)
    # non-finite PRMU scores count as 0
    t, parts = rewards.composite_reward([out, out], ["comedy"] * 2, "LaMP_2", [float("nan"), float("inf")])
    assert parts["personal"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        rewards.composite_reward([out], ["comedy"], "LaMP_2", [0.1, 0.2])


@pytest.mark.parametrize(
    "task, gold", [("LaMP_1", "[1]"), ("LaMP_2", "comedy"), ("LaMP_3", "3"), ("LaMP_5", "A title")]
)
def test_garbage_never_nan(task, gold):
    outs = WEIRD + [None]
    total, parts = rewards.composite_reward(outs, [gold] * len(outs), task, [0.5] * len(outs))
    for values in [total, *parts.values()]:
        assert len(values) == len(outs) and all(math.isfinite(v) for v in values)


def test_each_output_is_parsed_once(monkeypatch):
    """composite_reward parses each output once for R_f and R_tag together, and none when given `parsed` (GSPO's
    score phase parses once per step and keeps the result for its metrics); the rewards are the same either way."""
    outs = [T + "comedy", "<think><analyze_input> a </analyze_input></think> comedy", "comedy"]
    expected = rewards.composite_reward(outs, ["comedy"] * 3, "LaMP_2", [0.5] * 3)
    parsed = [tags.parse(o) for o in outs]
    calls = []
    real = tags.parse
    monkeypatch.setattr(tags, "parse", lambda o: calls.append(o) or real(o))
    assert rewards.composite_reward(outs, ["comedy"] * 3, "LaMP_2", [0.5] * 3) == expected
    assert calls == outs
    calls.clear()
    assert rewards.composite_reward(outs, ["comedy"] * 3, "LaMP_2", [0.5] * 3, parsed=parsed) == expected
    assert (
        rewards.foundation_reward(outs, ["comedy"] * 3, "LaMP_2", parsed=parsed)[1]["format"] == expected[1]["format"]
    )
    assert calls == []
    with pytest.raises(ValueError, match="2 parsed outputs for 3 outputs"):
        rewards.composite_reward(outs, ["comedy"] * 3, "LaMP_2", parsed=parsed[:2])
