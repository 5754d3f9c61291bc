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
    with pytest.raises(ValueError, match="LaMP_4 has no 'easy'"):
        synthetic.generator("LaMP_4", "easy")


def test_easy_lamp3_evidence_is_lexical():
    """Easy LaMP-3 users: two products, a rating each; the words are lukewarm whatever the rating; the two most
    recent items show both products, so k = 2 pins the rule; no profile: the median rating."""
    ex = synthetic.generate_split("LaMP_3", "dev", 60, 2, seed=0, difficulty="easy")
    res = synthetic.measure({"LaMP_3": ex}, k=2)["LaMP_3"]
    assert res["oracle"]["MAE"] == res["profile"]["MAE"] == 0.0
    assert res["floor"]["MAE"] > 0.9  # the floor answers 3 for everyone
    gen = synthetic.generator("LaMP_3", "easy")
    product = lambda text: next(p for p in gen.PRODUCTS if text.startswith(f"This {p} "))
    for e in ex:
        mapping = gen.parse(e.rule)
        recent = sorted(e.question.profile, key=lambda it: it.date)[-2:]
        assert {product(it["text"]) for it in recent} == set(mapping)
        assert all(it["score"] == mapping[product(it["text"])] for it in e.question.profile)
        assert e.gold == mapping[e.content["product"]] and f"This {e.content['product']} " in e.question.input
        assert not any(w in e.question.input for ws in gen.SENTIMENT.values() for w in ws)  # words say nothing
    # another user's profile points to another rating for the same product
    assert len({gen.answer(r, {"product": "kettle"}) for r in gen.rules if "kettle" in r}) == 5


def test_easy_lamp7_signature_is_in_every_profile_item():
    """Easy LaMP-7 users: one opening and one sign-off around the input's activity; every profile item carries
    both, so the profile-identified style is the oracle (ROUGE 1.0), and the best single style for everyone is
    far below."""
    ex = synthetic.generate_split("LaMP_7", "dev", 60, 2, seed=0, difficulty="easy")
    res = synthetic.measure({"LaMP_7": ex}, k=2)["LaMP_7"]
    assert res["oracle"]["rouge-1"] == res["profile"]["rouge-1"] == pytest.approx(1.0)
    assert res["floor"]["rouge-1"] < 0.6
    gen = synthetic.generator("LaMP_7", "easy")
    for e in ex:
        opening, sign_off = e.rule.split("|")
        assert e.gold == f"{opening} {e.content['thing']}. {sign_off}" and e.content["thing"] in e.question.input
        assert opening not in e.question.input and sign_off not in e.question.input
        assert all(it["text"].startswith(opening) and it["text"].endswith(sign_off) for it in e.question.profile)
    assert len(gen.rules) == 36


def test_hard_files_do_not_change_with_the_difficulty_knob(tmp_path, synthetic_dir):
    """Latent records carry a difficulty only when it is not the default; hard users are the same as before."""
    synthetic.generate(tmp_path / "easy", ["LaMP_2"], seed=0, sizes=SMALL, difficulty="easy")
    lat = synthetic.read_latent(tmp_path / "easy", "LaMP_2", "dev")
    assert {r["difficulty"] for r in lat.values()} == {"easy"}
    assert all("difficulty" not in r for r in synthetic.read_latent(synthetic_dir, "LaMP_2", "dev").values())
    steps, answer = synthetic.expert_chain("LaMP_2", [], next(iter(lat.values())))
    rule = next(iter(lat.values()))["rule"]
    assert answer in rule and steps[2][1].startswith("This user tags ")
