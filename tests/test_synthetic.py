import filecmp

import pytest
from conftest import SMALL

from tagpr import lamp, synthetic
from tagpr.files import read_json


def test_deterministic_by_seed(tmp_path, synthetic_dir):
    synthetic.generate(tmp_path / "again", seed=0, sizes=SMALL)
    synthetic.generate(tmp_path / "other", seed=1, sizes=SMALL)
    for task in synthetic.SYNTHETIC_TASKS:
        for split in SMALL:
            f = f"{task}/{split}/{split}_questions.json"
            assert filecmp.cmp(synthetic_dir / f, tmp_path / "again" / f, shallow=False)
            assert not filecmp.cmp(synthetic_dir / f, tmp_path / "other" / f, shallow=False)


@pytest.mark.parametrize("task", synthetic.SYNTHETIC_TASKS)
def test_files_are_official_lamp(synthetic_dir, task):
    users = {}
    for split, (n_users, per_user) in SMALL.items():
        s = lamp.load_split(synthetic_dir, task, split)
        assert len(s.questions) == n_users * per_user and set(s.golds) == {x.id for x in s.questions}
        latent = synthetic.read_latent(synthetic_dir, task, split)
        assert set(latent) == set(s.golds)
        for x in s.questions:
            assert latent[x.id]["user_id"] == x.user_id and latent[x.id]["rule"] in synthetic.GENERATORS[task].rules
            assert len(x.profile) >= 8 and all(it.date for it in x.profile)
        users[split] = {x.user_id for x in s.questions}
        if lamp.TASKS[task].labels:  # every gold is a label
            assert all(g in lamp.TASKS[task].labels for g in s.golds.values())
    assert not (users["train"] & users["dev"]) and not (users["dev"] & users["test"])  # user-based split
    raw = read_json(synthetic_dir / task / "dev" / "dev_outputs.json")
    assert raw["task"] == lamp.TASKS[task].official


def test_profile_reveals_the_rule_by_a_wide_margin():
    """The reference predictors on 60 dev users per task: floor far below, profile = oracle = perfect."""
    examples = {t: synthetic.generate_split(t, "dev", 60, 2, seed=0) for t in synthetic.SYNTHETIC_TASKS}
    res = synthetic.measure(examples)
    for task, rows in res.items():
        kind = lamp.TASKS[task].kind
        key = {"classification": "accuracy", "rating": "MAE", "generation": "rouge-1"}[kind]
        assert rows["oracle"][key] == (0.0 if kind == "rating" else 1.0), task
        assert rows["profile"][key] == rows["oracle"][key], task
        if kind == "rating":
            assert rows["floor"][key] > 0.35, (task, rows["floor"])
        else:
            assert rows["floor"][key] < 0.65, (task, rows["floor"])


def test_rules_decide_golds():
    g = synthetic.GENERATORS
    movie = g["LaMP_2"].content(__import__("random").Random(0))
    assert g["LaMP_2"].answer("genre", movie) in g["LaMP_2"].LENSES["genre"]
    assert g["LaMP_2"].answer("theme", movie) in g["LaMP_2"].LENSES["theme"]
    # LaMP-3: a harsh user rates one notch below the words, clipped at 1
    assert g["LaMP_3"].answer("harsh", {"s": 4, "text": ""}) == "3"
    assert g["LaMP_3"].answer("harsh", {"s": 1, "text": ""}) == "1"
    assert g["LaMP_3"].answer("generous", {"s": 5, "text": ""}) == "5"
    c = {"opener": "I just finished", "thing": "the farmers market", "feeling": "You should come with us next time."}
    assert g["LaMP_7"].answer("abbreviator", c) == "I jst finished da farmers market. u shud cum w uz nxt tym."


def test_easy_lamp2_evidence_is_lexical():
    """Easy LaMP-2 users: two genres, a tag each; the two most recent items show both, so k = 2 pins the rule;
    no profile: a guess among ten tags; another user's profile: that user's tags."""
    ex = synthetic.generate_split("LaMP_2", "dev", 60, 2, seed=0, difficulty="easy")
    res = synthetic.measure({"LaMP_2": ex}, k=2)["LaMP_2"]
    assert res["oracle"]["accuracy"] == res["profile"]["accuracy"] == 1.0
    assert res["floor"]["accuracy"] < 0.2
    gen = synthetic.generator("LaMP_2", "easy")
    for e in ex:
        mapping = gen.parse(e.rule)
        recent = sorted(e.question.profile, key=lambda it: it.date)[-2:]
        assert {it["description"].split(" movie:")[0][2:] for it in recent} == set(mapping)
        assert e.gold == mapping[e.content["genre"]] and e.question.input.count(f"A {e.content['genre']} movie:")
        assert all(it["tag"] == mapping[it["description"].split(" movie:")[0][2:]] for it in e.question.profile)
    with pytest.raises(ValueError, match="LaMP_3 has no 'easy'"):
        synthetic.generator("LaMP_3", "easy")


def test_hard_files_do_not_change_with_the_difficulty_knob(tmp_path, synthetic_dir):
    """Latent records carry a difficulty only when it is not the default; hard users are the same as before."""
    synthetic.generate(tmp_path / "easy", ["LaMP_2"], seed=0, sizes=SMALL, difficulty="easy")
    lat = synthetic.read_latent(tmp_path / "easy", "LaMP_2", "dev")
    assert {r["difficulty"] for r in lat.values()} == {"easy"}
    assert all("difficulty" not in r for r in synthetic.read_latent(synthetic_dir, "LaMP_2", "dev").values())
    steps, answer = synthetic.expert_chain("LaMP_2", [], next(iter(lat.values())))
    rule = next(iter(lat.values()))["rule"]
    assert answer in rule and steps[2][1].startswith("This user tags ")
