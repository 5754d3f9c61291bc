import json

import pytest

from tagpr import lamp
from tagpr.files import DataError


def write(path, obj):
    path.write_text(json.dumps(obj))
    return path


def q(qid="1", inp="Generate a headline for the following article: x", profile=None, **kw):
    return {"id": qid, "input": inp, "profile": [] if profile is None else profile, **kw}


def test_task_names_and_aliases():
    assert lamp.get_task("LaMP-3").name == "LaMP_3"
    assert lamp.get_task("lamp7").name == "LaMP_7"
    assert lamp.get_task("2n").name == "LaMP_2N"
    assert lamp.get_task("LaMP_2N").official == "LaMP_2"
    with pytest.raises(DataError, match="unknown task 'LaMP_9'.*LaMP_1"):
        lamp.get_task("LaMP_9")


def test_label_sets_and_templates():
    assert lamp.TASKS["LaMP_1"].labels == ("[1]", "[2]")
    assert len(lamp.MOVIE_TAGS) == 15 and len(lamp.NEWS_CATEGORIES) == 15
    assert set(lamp.NEWS_CATEGORIES) == set(lamp.NEWS_CATEGORIES_IN_PROMPT)
    assert lamp.TASKS["LaMP_3"].labels == ("1", "2", "3", "4", "5")
    t = lamp.TASKS["LaMP_2"].template.format(description="D")
    assert t.startswith("Which tag does this movie relate to among the following tags? Just answer with the tag name")
    assert "tags: [sci-fi, based on a book, comedy," in t and t.endswith("true story] description: D")
    assert lamp.task_for_input("LaMP_2", lamp.TASKS["LaMP_2N"].template.format(text="x")).name == "LaMP_2N"
    assert lamp.task_for_input("LaMP_2", t).name == "LaMP_2"


def test_roundtrip_and_empty_profile(tmp_path):
    qs = [
        lamp.Question("7", "Generate a headline for the following article: a", [], None),
        lamp.Question(
            "8",
            "Generate a headline for the following article: b",
            [lamp.Item("p1", {"text": "t", "title": "h"}, "2020-01-02")],
            "u1",
        ),
    ]
    lamp.write_questions(tmp_path / "q.json", qs)
    back = lamp.read_questions(tmp_path / "q.json", "LaMP_4")
    assert back == qs and back[0].profile == []
    lamp.write_outputs(tmp_path / "o.json", "LaMP_4", {"7": "A", "8": "B"})
    assert json.loads((tmp_path / "o.json").read_text()) == {
        "task": "LaMP_4",
        "golds": [{"id": "7", "output": "A"}, {"id": "8", "output": "B"}],
    }
    assert lamp.read_outputs(tmp_path / "o.json") == ("LaMP_4", {"7": "A", "8": "B"})


def test_numbers_become_strings(tmp_path):
    p = write(tmp_path / "q.json", [q(5, "review: x", [{"id": 3, "text": "ok", "score": 4}])])
    (rec,) = lamp.read_questions(p, "LaMP_3")
    assert rec.id == "5" and rec.profile[0]["score"] == "4" and rec.profile[0].id == "3"


@pytest.mark.parametrize(
    "content, message",
    [
        ('[{"id": "1",', r"q\.json: malformed JSON at line 1"),
        ('{"id": "1"}', r"q\.json: expected a JSON list of questions"),
        ('[{"input": "x", "profile": []}]', r"q\.json: record #0: missing field 'id'"),
        ('[{"id": "9", "profile": []}]', r"q\.json: record id=9 \(#0\): missing field 'input'"),
        ('[{"id": "9", "input": "x"}]', r"record id=9 \(#0\): missing field 'profile'"),
        ('[{"id": "9", "input": "x", "profile": {}}]', r"record id=9 \(#0\): field 'profile' must be a list"),
        (
            '[{"id": "9", "input": "x", "profile": [{"id": "a", "text": "t"}]}]',
            r"record id=9 \(#0\): profile\[0\] \(id=a\): missing field 'title' \(required for LaMP_4\)",
        ),
        ('[{"id": "9", "input": "x", "profile": [{"text": "t", "title": "h"}]}]', r"profile\[0\]: missing field 'id'"),
        (
            '[{"id": "9", "input": "x", "profile": []}, {"id": "9", "input": "y", "profile": []}]',
            r"record id=9 \(#1\): duplicate id \(first seen at record #0\)",
        ),
        ('[{"id": "9", "input": null, "profile": []}]', r"record id=9 \(#0\): field 'input': expected a string"),
    ],
)
def test_bad_questions(tmp_path, content, message):
    p = tmp_path / "q.json"
    p.write_text(content)
    with pytest.raises(DataError, match=message):
        lamp.read_questions(p, "LaMP_4")


@pytest.mark.parametrize(
    "obj, message",
    [
        ({"golds": []}, r"missing top-level field 'task'"),
        ({"task": "LaMP_4"}, r"missing top-level field 'golds'"),
        ({"task": "LaMP_4", "golds": [{"id": "1"}]}, r"golds\[0\]: missing field 'output'"),
        (
            {"task": "LaMP_4", "golds": [{"id": "1", "output": "a"}, {"id": "1", "output": "b"}]},
            r"golds\[1\] \(id=1\): duplicate id",
        ),
        ({"task": "LaMP_3", "golds": []}, r"field 'task' is 'LaMP_3' but 'LaMP_4' was expected"),
        ({"task": "LaMP_99", "golds": []}, r"unknown task 'LaMP_99'"),
    ],
)
def test_bad_outputs(tmp_path, obj, message):
    p = write(tmp_path / "o.json", obj)
    with pytest.raises(DataError, match=message):
        lamp.read_outputs(p, "LaMP_4")


def test_prediction_ids_must_match():
    lamp.check_prediction_ids({"1": "a", "2": "b"}, {"2": "x", "1": "y"})
    with pytest.raises(
        DataError,
        match=r"preds\.json: ids do not match g\.json: 1 gold id\(s\) have no prediction "
        r"\(e\.g\. \['2'\]\); 1 prediction id\(s\) are not in the golds \(e\.g\. \['3'\]\)",
    ):
        lamp.check_prediction_ids({"1": "a", "2": "b"}, {"1": "x", "3": "y"}, "preds.json", "g.json")


def test_retrieval_query_per_task():
    inp1 = lamp.TASKS["LaMP_1"].template.format(title="My Paper", ref1="Graph nets", ref2="Speech codecs")
    assert lamp.retrieval_query("LaMP_1", inp1) == "Graph nets Speech codecs"  # not the author's own title
    assert lamp.retrieval_query("LaMP_2", "Which tag ... description: A heist.") == "A heist."
    # the known malformed LaMP-2 dev item (id "110") has no marker: the whole input is the query
    assert lamp.retrieval_query("LaMP_2", "  A heist with no marker ") == "A heist with no marker"
    assert lamp.retrieval_query("LaMP_3", "What is ... review: Great kettle") == "Great kettle"
    assert lamp.retrieval_query("LaMP_4", "Generate a headline for the following article: News here") == "News here"
    assert (
        lamp.retrieval_query("LaMP_5", "Generate a title for the following abstract of a paper: We do X") == "We do X"
    )
    assert (
        lamp.retrieval_query(
            "LaMP_7", "Paraphrase the following tweet without any explanation before or after it: hi: there"
        )
        == "hi: there"
    )  # after the first colon only


def test_item_text_per_task():
    assert lamp.item_text("LaMP_1", lamp.Item("1", {"title": "T", "abstract": "A"})) == "T A"
    assert lamp.item_text("LaMP_2", lamp.Item("1", {"description": "D", "tag": "comedy"})) == "D"
    assert lamp.item_text("LaMP_2N", lamp.Item("1", {"text": "X", "title": "T", "category": "women"})) == "T X"
    assert lamp.item_text("LaMP_4", lamp.Item("1", {"text": "X", "title": "T"})) == "T X"
    assert lamp.item_text("LaMP_7", lamp.Item("1", {"text": "X"})) == "X"


def test_official_augmentation():
    it = lamp.Item
    inp1 = lamp.TASKS["LaMP_1"].template.format(title="P", ref1="R1", ref2="R2")
    got = lamp.augment(
        "LaMP_1", inp1, [it("1", {"title": "A", "abstract": "x"}), it("2", {"title": "B", "abstract": "y"})]
    )
    assert got == (
        'For an author who has written the paper with the title, and "A", and "B" "P", which reference is '
        'related? Just answer with [1] or [2] without explanation. [1]: "R1" [2]: "R2"'
    )
    got = lamp.augment(
        "LaMP_2",
        "Q",
        [it("1", {"description": "d1", "tag": "comedy"}), it("2", {"description": "d2", "tag": "classic"})],
    )
    assert got == 'the tag for the movie: "d1" is "comedy" , and the tag for the movie: "d2" is "classic" . Q'
    assert lamp.augment("LaMP_3", "Q", [it("1", {"text": "ok", "score": "3"})]) == '3 is the score for "ok" . Q'
    assert lamp.augment("LaMP_4", "Q", [it("1", {"text": "t", "title": "h"})]) == '"h" is the title for "t" . Q'
    assert (
        lamp.augment("LaMP_5", "Q", [it("1", {"title": "h", "abstract": "a"})])
        == '"h" is a title for "a" . Following the given patterns Q'
    )
    assert (
        lamp.augment("LaMP_7", "Q", [it("1", {"text": "a"}), it("2", {"text": "b"})])
        == '"a" , and "b"  are written by a person. Following the given patterns Q'
    )
    assert (
        lamp.augment("LaMP_2N", "Q", [it("1", {"text": "t", "title": "x", "category": "sports"})])
        == 'the category for the article: "t" is "sports" . Q'
    )
    assert lamp.augment("LaMP_4", "Q", []) == "Q"  # empty profile: the input unchanged
    assert (
        lamp.augment("LaMP_4", "Q", [it("1", {"text": "long text", "title": "h"})], truncate=lambda s: s[:4])
        == '"h" is the title for "long" . Q'
    )


def test_split_layouts(tmp_path):
    qs = [q("1")]
    # official download layout: <dir>/LaMP_4/dev/dev_questions.json
    d = tmp_path / "official" / "LaMP_4" / "dev"
    d.mkdir(parents=True)
    write(d / "dev_questions.json", qs)
    write(d / "dev_outputs.json", {"task": "LaMP_4", "golds": [{"id": "1", "output": "h"}]})
    s = lamp.load_split(tmp_path / "official", "LaMP_4", "dev")
    assert [x.id for x in s.questions] == ["1"] and s.golds == {"1": "h"}
    # time-based layout
    t = tmp_path / "official" / "time" / "LaMP_4" / "train"
    t.mkdir(parents=True)
    write(t / "train_questions.json", [q("5", user_id="u9")])
    write(t / "train_outputs.json", {"task": "LaMP_4", "golds": [{"id": "5", "output": "h"}]})
    s = lamp.load_split(tmp_path / "official", "LaMP_4", "train", time_based=True)
    assert s.questions[0].user_id == "u9"
    # test split: golds are private, no outputs file is fine
    write(tmp_path / "official" / "LaMP_4" / "test_questions.json", qs)
    assert lamp.load_split(tmp_path / "official", "LaMP_4", "test").golds is None
    with pytest.raises(DataError, match=r"no LaMP_4 train questions under .*tried .*LaMP_4/train/train_questions.json"):
        lamp.load_split(tmp_path / "official", "LaMP_4", "train")
    # golds whose ids differ from the questions'
    write(d / "dev_outputs.json", {"task": "LaMP_4", "golds": [{"id": "2", "output": "h"}]})
    with pytest.raises(DataError, match=r"dev_questions\.json: ids do not match .*dev_outputs\.json"):
        lamp.load_split(tmp_path / "official", "LaMP_4", "dev")
    (d / "dev_outputs.json").unlink()
    with pytest.raises(DataError, match=r"dev_outputs\.json: file not found"):
        lamp.load_split(tmp_path / "official", "LaMP_4", "dev")
