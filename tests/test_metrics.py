import json
import math

import pytest

from tagpr import lamp, metrics
from tagpr.files import DataError


def ids(xs):
    return {str(i): x for i, x in enumerate(xs)}


def test_lamp2_invalid_label_is_a_miss_not_a_class():
    golds = ["comedy", "action", "comedy", "sci-fi"]
    preds = ["comedy", "Comedy", "xyz", " sci-fi "]  # "Comedy" and "xyz" are not labels; " sci-fi " strips to one
    m = metrics.evaluate("LaMP_2", ids(golds), ids(preds))
    # correct: #0 and #3 → accuracy 2/4
    assert m["accuracy"] == pytest.approx(0.5, abs=1e-12)
    # per label: comedy tp=1 fn=1 fp=0 → P=1, R=1/2, F=2/3; action F=0; sci-fi F=1; 12 other labels F=0
    # macro over all 15 labels: (2/3 + 0 + 1) / 15 = 1/9
    assert m["f1"] == pytest.approx(1 / 9, abs=1e-12)


def test_lamp1_accuracy_f1():
    m = metrics.evaluate("LaMP_1", ids(["[1]", "[2]", "[2]", "[1]"]), ids(["[1]", "[1]", "[2]", "2"]))
    # [1]: tp=1 fp=1 fn=1 → F=1/2; [2]: tp=1 fp=0 fn=1 → P=1 R=1/2 F=2/3; macro = 7/12
    assert m == pytest.approx({"accuracy": 0.5, "f1": 7 / 12}, abs=1e-12)


def test_lamp3_unparsable_becomes_worst_value():
    golds = ["1", "3", "5", "2"]
    preds = ["2", "abc", "5", "x"]
    # parsed: 2; "abc" with gold 3 → |1-3| = |5-3| → 5; 5; "x" with gold 2 → 5 is farther → 5
    # errors 1, 2, 0, 3 → MAE 6/4; RMSE sqrt((1 + 4 + 0 + 9) / 4)
    m = metrics.evaluate("LaMP_3", ids(golds), ids(preds))
    assert m["MAE"] == pytest.approx(1.5, abs=1e-12)
    assert m["RMSE"] == pytest.approx(math.sqrt(3.5), abs=1e-12)
    assert metrics.parse_rating("nan", 4.0) == 1.0  # non-finite counts as unparsable; gold 4 → 1 is farther
    assert metrics.parse_rating(" 4.5 ", 1.0) == 4.5  # no clipping, no rounding


def test_rouge_known_pairs():
    # gold/pred share "the" ×2, "cat", "on" → 4 of 6 unigrams each side: P = R = F1 = 2/3; LCS "the cat on the" = 4
    m = metrics.evaluate("LaMP_4", {"a": "The cat sat on the mat."}, {"a": "the cat lay on the rug"})
    assert m["rouge-1"] == pytest.approx(2 / 3, abs=1e-12) and m["rouge-L"] == pytest.approx(2 / 3, abs=1e-12)
    # reversed order: every unigram matches (R-1 = 1) but the LCS is 1 token of 4 (R-L = 1/4)
    m = metrics.evaluate("LaMP_5", {"a": "quick brown fox jumps"}, {"a": "jumps fox brown quick"})
    assert m == pytest.approx({"rouge-1": 1.0, "rouge-L": 0.25}, abs=1e-12)
    # no stemming: "running" ≠ "run"
    assert metrics.evaluate("LaMP_7", {"a": "running"}, {"a": "run"})["rouge-1"] == 0.0


def test_rouge_bootstrap_mid_is_seeded_and_near_the_mean():
    golds = {str(i): f"word{i} shared text" for i in range(50)}
    preds = {str(i): f"word{i % 7} shared" for i in range(50)}
    mean = metrics.evaluate("LaMP_4", golds, preds)
    b1 = metrics.evaluate("LaMP_4", golds, preds, bootstrap=500)
    assert b1 == metrics.evaluate("LaMP_4", golds, preds, bootstrap=500)
    assert abs(b1["rouge-1"] - mean["rouge-1"]) < 0.01


def test_news_version_detected_from_golds():
    m = metrics.evaluate("LaMP_2", {"1": "sports", "2": "women"}, {"1": "sports", "2": "crime"})
    assert m["accuracy"] == 0.5


def test_mismatched_ids_and_bad_golds():
    with pytest.raises(DataError, match="have no prediction"):
        metrics.evaluate("LaMP_1", {"1": "[1]"}, {"2": "[1]"})
    with pytest.raises(DataError, match=r"gold output of id=1 is not a LaMP_1 label"):
        metrics.evaluate("LaMP_1", {"1": "[3]"}, {"1": "[1]"})
    with pytest.raises(DataError, match=r"gold output of id=1 is not a number"):
        metrics.evaluate("LaMP_3", {"1": "five"}, {"1": "5"})


def test_cli_prints_official_keys(tmp_path, capsys):
    lamp.write_outputs(tmp_path / "g.json", "LaMP_2", {"1": "comedy", "2": "action"})
    lamp.write_outputs(tmp_path / "p.json", "LaMP_2", {"2": "action", "1": "fantasy"})
    metrics.main(["--task", "LaMP_2", "--golds", str(tmp_path / "g.json"), "--preds", str(tmp_path / "p.json")])
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"accuracy", "f1"} and out["accuracy"] == 0.5
    lamp.write_outputs(tmp_path / "g3.json", "LaMP_3", {"1": "4"})
    lamp.write_outputs(tmp_path / "p3.json", "LaMP_3", {"1": "2"})
    metrics.main(["--golds", str(tmp_path / "g3.json"), "--preds", str(tmp_path / "p3.json")])  # task from the file
    assert json.loads(capsys.readouterr().out) == {"MAE": 2.0, "RMSE": 2.0}


def test_per_question_scores_average_to_the_official_metric():
    from tagpr import lamp

    assert metrics.per_question("LaMP_2", ["comedy", "sci-fi", "action"], ["comedy", "nonsense", "sci-fi"]) == [
        1.0,
        0.0,
        0.0,
    ]
    # an unparsable rating scores the official worst value: |1 − 4| for gold 4
    assert metrics.per_question("LaMP_3", ["4", "2"], ["five", "2.5"]) == [3.0, 0.5]
    golds, preds = ["1", "3", "5", "2"], ["2", "3", "x", "5"]
    assert sum(metrics.per_question("LaMP_3", golds, preds)) / 4 == pytest.approx(
        metrics.evaluate("LaMP_3", dict(enumerate(golds)), dict(enumerate(preds)))["MAE"]
    )
    r1 = metrics.per_question(lamp.get_task("LaMP_4"), ["a b c d"], ["a b"])
    assert r1 == [pytest.approx(2 * 1.0 * 0.5 / 1.5)]  # precision 1, recall 1/2


def test_bootstrap_interval_of_a_mean():
    assert metrics.bootstrap_ci([0.25] * 10) == (0.25, 0.25)
    lo, hi = metrics.bootstrap_ci([0.0, 1.0] * 32)  # mean 0.5, standard error 0.0625: ≈ 0.5 ± 1.96 · 0.0625
    assert 0.35 < lo < 0.40 and 0.60 < hi < 0.65
    assert metrics.bootstrap_ci([0.0, 1.0] * 32, seed=1) != (lo, hi)  # a real resampling, seeded


def test_parses_by_task():
    assert metrics.parses("LaMP_2", "sci-fi") and not metrics.parses("LaMP_2", "Sci-Fi")
    assert not metrics.parses("LaMP_2", "") and not metrics.parses("LaMP_2", None)
    assert metrics.parses("LaMP_3", " 4 ") and metrics.parses("LaMP_3", "3.5")
    assert not metrics.parses("LaMP_3", "four") and not metrics.parses("LaMP_3", "nan")
    assert metrics.parses("LaMP_7", "a tweet") and not metrics.parses("LaMP_7", "  ")


def test_pooled_and_the_ratio_interval_by_hand():
    scores, keep = [[1, 0], [0, 0], [1, 1]], [[True, False], [True, True], [True, True]]
    assert metrics.pooled(scores, keep) == pytest.approx(3 / 5)  # 1 + 0 + 0 + 1 + 1 over 5 kept
    assert metrics.pooled([[1.0]], [[False]]) == 0.0
    # with the mean as its statistic the interval is bootstrap_ci's, draw for draw
    v = [0.0, 1.0, 1.0, 0.0, 1.0, 0.5]
    assert metrics.bootstrap_stat_ci(v, lambda q: sum(q) / len(q)) == metrics.bootstrap_ci(v)
    lo, hi = metrics.bootstrap_stat_ci(list(zip(scores, keep)), lambda q: metrics.pooled(*zip(*q)))
    assert 0.0 <= lo <= 0.6 <= hi <= 1.0 and hi > lo


def test_evaluate_split_reports_the_parse_split_by_hand():
    from tagpr import evaluation, lamp

    # 2 samples of 3 questions: sample 0 scores 1, 0, 1 with q1 unparsed; sample 1 scores 0, 1, 1, all parsed
    m = evaluation.parse_split(lamp.get_task("LaMP_2"), [[1, 0, 1], [0, 1, 1]], [[True, False, True], [True] * 3])
    assert m["parsed"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["accuracy_parsed"] == pytest.approx(4 / 5)  # parsed scores 1 + 1 + 0 + 1 + 1 over 5
    assert m["parsed_ci95"][0] <= m["parsed"] <= m["parsed_ci95"][1]
    assert m["accuracy_parsed_ci95"][0] <= 0.8 <= m["accuracy_parsed_ci95"][1]
    none = evaluation.parse_split(lamp.get_task("LaMP_2"), [[0, 0]], [[False, False]])
    assert none["parsed"] == 0.0 and "accuracy_parsed" not in none
