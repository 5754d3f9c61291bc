import json

import pytest

from tagpr import tags
from tagpr.files import DataError

GOOD = (
    "<think>\n<analyze_input> asks for a tag </analyze_input>\n<examine_examples> all genre tags "
    "</examine_examples>\n<make_decision> sci-fi </make_decision>\n</think>\nsci-fi"
)


def test_default_vocabulary():
    assert len(tags.DEFAULT_TAGS) == 9 and len(set(tags.DEFAULT_TAGS)) == 9
    assert set(tags.PAPER_TAGS) == {
        "analyze_input",
        "examine_examples",
        "identify_patterns",
        "compare_entities",
        "make_decision",
    }
    assert set(tags.PAPER_TAGS) < set(tags.DEFAULT_TAGS)


def test_parse_well_formed():
    p = tags.parse(GOOD)
    assert p.well_formed and p.errors == []
    assert p.tags == ["analyze_input", "examine_examples", "make_decision"]
    assert p.steps[1].text == "all genre tags" and p.answer == "sci-fi"
    assert tags.check(p, tags.DEFAULT_TAGS, 3) == {"format": True, "vocab": True, "count": True}
    steps = [(s.tag, s.text) for s in p.steps]
    assert tags.parse(tags.render(steps, "sci-fi")).steps == p.steps


@pytest.mark.parametrize(
    "text, error",
    [
        ("", "no <think> block"),
        ("just an answer", "no <think> block"),
        (None, "output is NoneType"),
        ("<think><analyze_input> still thinking", "never closed"),
        ("<think><a> x <b> y </b> </a></think> z", "opened inside <a> (nesting)"),
        ("<think><a> x </b></think> z", "</b> closes <a>"),
        ("<think></a> x</think> z", "</a> closes nothing"),
        ("<think><think> x </think> z", "nested <think>"),
        ("preamble <think><a>x</a></think> z", "text before <think>"),
        ("<think><a> x </think> z", "<a> is never closed"),
    ],
)
def test_parse_never_raises_and_says_why(text, error):
    p = tags.parse(text)
    assert not p.well_formed
    assert any(error in e for e in p.errors), p.errors


def test_checks_vocab_and_count():
    p = tags.parse("<think><analyze_input>a</analyze_input><made_up>b</made_up></think> x")
    assert tags.check(p, tags.DEFAULT_TAGS, 3) == {"format": True, "vocab": False, "count": False}
    assert tags.check(tags.parse("garbage"), tags.DEFAULT_TAGS, 0) == {"format": False, "vocab": False, "count": True}


def test_load_tags(tmp_path):
    (tmp_path / "t.json").write_text(tags.dumps_tags(["a_b", "c"], {"a_b": 3, "c": 1}))
    assert tags.load_tags(tmp_path / "t.json") == ("a_b", "c")
    (tmp_path / "l.json").write_text(json.dumps(["x", "y"]))
    assert tags.load_tags(tmp_path / "l.json") == ("x", "y")
    (tmp_path / "bad.json").write_text(json.dumps({"tags": [{"name": "ok"}, {"name": "not a tag"}]}))
    with pytest.raises(DataError, match=r"bad\.json: tags\[1\]: field 'name'"):
        tags.load_tags(tmp_path / "bad.json")
    (tmp_path / "dup.json").write_text(json.dumps(["x", "x"]))
    with pytest.raises(DataError, match="duplicate"):
        tags.load_tags(tmp_path / "dup.json")
