"""build_data.py: parsers, clustering, every stage through the simulated, openai (loopback server) and hf backends."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from llm_server import Server

import build_data
from tagpr import datagen, lamp, prompts, synthetic, tags
from tagpr.cluster import cluster_tags, kmeans
from tagpr.expert import OPENERS, SYNONYMS, SimulatedExpert
from tagpr.files import DataError
from tagpr.llm import Cache, HashingEmbedder, OpenAIBackend, Request
from tagpr.records import read_pairs, read_rl_prompts, read_sft
from tagpr.tags import load_tags

TASKS = ",".join(synthetic.SYNTHETIC_TASKS)


@pytest.fixture(scope="module")
def lamp_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bd_lamp")
    synthetic.generate(out, seed=3, sizes={"train": (15, 4), "dev": (2, 1), "test": (2, 1)})
    return out


def build(lamp_dir, out, *extra):
    return build_data.main(
        [
            "--lamp-dir",
            str(lamp_dir),
            "--out",
            str(out),
            "--instances-per-task",
            "30",
            "--chains",
            "4",
            "--rl-per-task",
            "20",
            "--rl-lamp2",
            "25",
            "--spot-check",
            "5",
            *extra,
        ]
    )


# ----------------------------------------------------------------------------- parsers


def test_parse_teacher():
    assert datagen.parse_teacher("1. a\n2. b\nAnswer: [2]") == ("1. a\n2. b", "[2]", "")
    # the last Answer line wins; markdown bold and backticks are tolerated
    assert datagen.parse_teacher("Answer: x\n1. think\n**Answer:** `comedy`") == ("Answer: x\n1. think", "comedy", "")
    # a thinking model: the think block is the reasoning
    assert datagen.parse_teacher("<think>step one</think>\nAnswer: 4") == ("step one", "4", "")
    assert datagen.parse_teacher("1. a\n2. b")[2] == "no_answer"
    assert datagen.parse_teacher("1. a\nAnswer:   ")[2] == "empty_answer"
    assert datagen.parse_teacher("Answer: 3")[2] == "no_reasoning"


def test_parse_judge():
    good = '{"logical_consistency": 5, "factual_accuracy": 4, "completeness": 3, "conciseness": 2}'
    assert datagen.parse_judge(good) == {
        "logical_consistency": 5,
        "factual_accuracy": 4,
        "completeness": 3,
        "conciseness": 2,
    }
    assert datagen.parse_judge("<think>hmm</think>" + good)["completeness"] == 3
    assert datagen.parse_judge(good.replace("2}", "6}")) is None  # out of range
    assert datagen.parse_judge('{"logical_consistency": 5}') is None  # missing keys
    assert datagen.parse_judge("looks fine") is None


def test_parse_tagged_and_accuracy():
    p = datagen.parse_tagged("<a> x </a>\n<b> y </b>")
    assert p.well_formed and p.tags == ["a", "b"] and [s.text for s in p.steps] == ["x", "y"]
    assert not datagen.parse_tagged("<a> x </a>\n<b> y").well_formed
    assert datagen.normalise_tag("Analyze-Input ") == "analyze_input"
    t2, t3, t5 = (lamp.get_task(t) for t in ("LaMP_2", "LaMP_3", "LaMP_5"))
    assert datagen.accuracy(t2, [" comedy ", "Comedy", "drama"], ["comedy"] * 3) == [1.0, 0.0, 0.0]
    assert datagen.accuracy(t3, ["4", "4.0"], ["4", "4"]) == [1.0, 0.0]  # exact label, as the official mapping
    # ROUGE-1 F of "a b c" vs "a b d e": 2 shared unigrams, P 2/3, R 2/4 → F = 4/7
    assert datagen.accuracy(t5, ["a b c"], ["a b d e"])[0] == pytest.approx(4 / 7)


# ----------------------------------------------------------------------------- clustering


def test_kmeans_by_hand():
    # 1-D points {0, 1} and {10, 11}: centroids 0.5 and 10.5, inertia 4 · 0.25 = 1
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    labels, c, inertia = kmeans(x, 2, restarts=5, seed=0)
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert sorted(c[:, 0].tolist()) == [0.5, 10.5] and inertia == pytest.approx(1.0)
    # weights pull a centroid: weights 3 and 1 on 0 and 1 → 0.25
    _, c, _ = kmeans(np.array([[0.0], [1.0], [10.0]]), 2, np.array([3.0, 1.0, 1.0]), restarts=5, seed=0)
    assert sorted(c[:, 0].tolist()) == [0.25, 10.0]
    with pytest.raises(ValueError):
        kmeans(x, 5)


def _partition(labels, truth):
    groups = {}
    for label, t in zip(labels, truth):
        groups.setdefault(int(label), set()).add(t)
    return groups


def test_clustering_recovers_planted_groups():
    # 9 random directions in 32-D; 6 noisy members each (noise 0.15 per coordinate vs unit centres)
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(9, 32))
    x = np.concatenate([centres[g] + 0.15 * rng.normal(size=(6, 32)) for g in range(9)])
    truth = np.repeat(np.arange(9), 6)
    labels, _, _ = kmeans(x, 9, restarts=20, seed=0)
    assert all(len(g) == 1 for g in _partition(labels, truth).values()) and len(set(labels)) == 9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustering_recovers_synonym_tag_names(seed):
    """The simulated expert's free tag names (variants of 9 kinds) → exactly the 9 kinds, named by a member."""
    names = [n for syn in SYNONYMS.values() for n in syn]
    counts = {n: 10 * (i % 4 + 1) for i, n in enumerate(names)}
    clusters = cluster_tags(counts, HashingEmbedder().embed(names), k=9, seed=seed)
    kind_of = {n: k for k, syn in SYNONYMS.items() for n in syn}
    assert len(clusters) == 9
    for c in clusters:
        assert len({kind_of[m] for m in c.members}) == 1, c.members
        assert c.name in c.members and c.count == sum(counts[m] for m in c.members)
    assert sorted(kind_of[c.name] for c in clusters) == sorted(SYNONYMS)


# ----------------------------------------------------------------------------- the whole pipeline


def _outputs(out):
    return {f: (out / f).read_text() for f in ("sft.jsonl", "prp.jsonl", "pqp.jsonl", "rl_prompts.jsonl", "tags.json")}


@pytest.fixture(scope="module")
def simulated_run(lamp_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bd_sim")
    return out, build(lamp_dir, out)


def test_every_filter_does_counted_work(simulated_run, lamp_dir):
    out, m = simulated_run
    st = m["stages"]
    for stage in ("2_teacher", "3_accuracy", "4_judge", "5_explore", "6_restrict", "7_pair_tagging"):
        assert st[stage]["in"] == st[stage]["out"] + sum(st[stage]["dropped"].values())
    assert st["2_teacher"]["in"] == 6 * 30 * (4 + 1)
    for stage, reason in [
        ("2_teacher", "no_answer"),
        ("3_accuracy", "wrong_answer"),
        ("3_accuracy", "rouge_below_threshold"),
        ("4_judge", "judge_unparsable"),
        ("4_judge", "composite_at_most_threshold"),
        ("5_explore", "malformed_tags"),
        ("6_restrict", "tag_format"),
        ("6_restrict", "tag_vocab"),
        ("6_restrict", "tag_count"),
    ]:
        assert st[stage]["dropped"].get(reason, 0) > 0, (stage, reason)
    assert st["6_restrict"]["in"] == st["4_judge"]["out"]
    assert m["backends"]["teacher"].startswith("simulated expert")
    # what survived is what the filters promise
    vocab = tags.load_tags(out / "tags.json")
    assert len(vocab) == 9
    sft = read_sft(out / "sft.jsonl")
    assert len(sft) == st["6_restrict"]["out"] == m["stages"]["7_emit"]["sft"]
    golds = {}
    for t in synthetic.SYNTHETIC_TASKS:
        golds.update(lamp.load_split(lamp_dir, t, "train").golds)
    for r in sft:
        parsed = tags.parse(r.target)
        assert all(tags.check(parsed, vocab, 3).values()), r.id
        steps = [s.text for s in parsed.steps]
        assert len(steps) == len(set(steps)), f"{r.id}: a rambling chain survived the judge"
        gold = golds[r.id.rsplit("-c", 1)[0]]
        score = datagen.accuracy(lamp.get_task(r.task), [r.answer], [gold])[0]
        assert score >= 0.3 if lamp.get_task(r.task).is_generation else score == 1.0
        assert all(f"<{t}>" in r.prompt for t in vocab)  # the prompt teaches the derived tags
    assert (out / "spot_check.md").read_text().count("## ") == 5


def test_terse_chains_keep_the_tags_and_answers_in_fewer_words(simulated_run, lamp_dir, tmp_path):
    """--chain-style terse: the same nine tags, each step under a name of its own kind, the same answers to the
    same questions, in under 3/4 of the full chains' characters; the judge and format filters still work."""
    full_out, _ = simulated_run
    m = build(lamp_dir, tmp_path / "terse", "--chain-style", "terse")
    assert m["backends"]["teacher"].startswith("simulated expert (terse chains")
    assert len(tags.load_tags(tmp_path / "terse" / "tags.json")) == 9
    assert m["stages"]["4_judge"]["dropped"].get("composite_at_most_threshold", 0) > 0
    full, terse = read_sft(full_out / "sft.jsonl"), read_sft(tmp_path / "terse" / "sft.jsonl")
    for rows, opener in ((full, OPENERS["full"]), (terse, OPENERS["terse"])):
        for r in rows:
            for step in tags.parse(r.target).steps:
                kind = [k for k, o in opener.items() if step.text.startswith(o)]
                assert len(kind) == 1 and step.tag in SYNONYMS[kind[0]], (r.id, step)
    full_answer = {r.id: r.answer for r in full}
    same = [r for r in terse if r.id in full_answer]
    assert len(same) > len(terse) / 3 and all(r.answer == full_answer[r.id] for r in same)
    mean_len = lambda rows: sum(len(r.target) for r in rows) / len(rows)
    assert mean_len(terse) < 0.75 * mean_len(full)


def test_bound_chains_name_the_inputs_key_at_the_decision(tmp_path):
    """--chain-style bound on easy users: a chain is the terse chain of the same question and draw, but for its
    decision, which names the input's genre (LaMP-2) or product (LaMP-3) and the answer the chain gives
    ("Decision: kettle → 4."); LaMP-7 has no key, so its chains are the terse ones."""
    synthetic.generate(tmp_path, ("LaMP_2", "LaMP_3", "LaMP_7"), seed=3, sizes={"train": (6, 2)}, difficulty="easy")
    terse, bound = (SimulatedExpert(tmp_path, ("LaMP_2", "LaMP_3", "LaMP_7"), style=s) for s in ("terse", "bound"))
    named = 0
    for qid, (task, _q, lat) in bound.questions.items():
        req = [Request([{"role": "user", "content": f"question {qid}"}], meta={"id": qid, "role": "teacher"})]
        a, b = terse.chat(req)[0].text.splitlines(), bound.chat(req)[0].text.splitlines()
        assert len(a) == len(b)
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        c = synthetic.restore_content(lat["content"])
        if task.name == "LaMP_7":
            assert diff == []
            continue
        ((x, y),) = diff
        answer = x.split("Decision: ", 1)[1].rstrip(".")
        key = f"{c['genre']} movie" if task.name == "LaMP_2" else c["product"]
        assert y == x.replace(f"Decision: {answer}.", f"Decision: {key} → {answer}.")
        named += 1
    assert named >= 20


def test_pairs_and_rl_prompts(simulated_run, lamp_dir):
    out, m = simulated_run
    prp, pqp = read_pairs(out / "prp.jsonl"), read_pairs(out / "pqp.jsonl")
    rl = read_rl_prompts(out / "rl_prompts.jsonl")
    assert prp and pqp and {p.set for p in prp} == {"prp"} and {p.set for p in pqp} == {"pqp"}
    for p in prp:  # the rejected response was made without the profile: it says so
        assert "nothing known about the user" in p.rejected and tags.parse(p.chosen).well_formed
    for p in pqp:  # chosen beats rejected on the accuracy score, so their answers differ
        assert tags.parse(p.chosen).answer != tags.parse(p.rejected).answer
    counts = Counter(r.task for r in rl)
    assert counts["LaMP_2"] == 25 and counts["LaMP_1"] == 20
    sft_ids = {r.id.rsplit("-c", 1)[0] for r in read_sft(out / "sft.jsonl")}
    assert not sft_ids & {r.id for r in rl}  # RL prompts are questions the SFT data did not use
    # RL prompts of users PRMU learns (they have pairs) come first, and the manifest counts them
    pair_users = {p.user_id for p in prp + pqp}
    emitted = m["stages"]["7_emit"]["rl_prompts"]
    for task, n in counts.items():
        have = sum(r.user_id in pair_users for r in rl if r.task == task)
        assert emitted[task]["user_has_pairs"] == have > 0, task
        if have < n:  # some prompts lack a pair user: then none with one was left out of the pool
            split = lamp.load_split(lamp_dir, task, "train")
            taken = {r.id for r in rl}
            left = [
                q.id
                for q in split.questions
                if q.profile and q.id not in taken and q.id not in sft_ids and (q.user_id or q.id) in pair_users
            ]
            assert not left, (task, left[:5])


def test_held_out_prompts_and_their_swap_control(simulated_run, lamp_dir):
    """eval_prompts.jsonl: the dev questions (users disjoint from train) with golds, prompted as RL prompts are;
    eval_prompts_swap.jsonl: the same questions and golds, each shown the next dev user's profile."""
    out, _ = simulated_run
    own, swap = read_rl_prompts(out / "eval_prompts.jsonl"), read_rl_prompts(out / "eval_prompts_swap.jsonl")
    train_users = {r.user_id for r in read_rl_prompts(out / "rl_prompts.jsonl")}
    for task in synthetic.SYNTHETIC_TASKS:
        split = lamp.load_split(lamp_dir, task, "dev")
        mine = [r for r in own if r.task == task]
        assert [r.id for r in mine] == [q.id for q in split.questions]  # dev holds 2 users × 1 question here
        assert [r.gold for r in mine] == [split.golds[q.id] for q in split.questions]
        theirs = [r for r in swap if r.task == task]
        assert [(r.id, r.gold) for r in theirs] == [(r.id, r.gold) for r in mine]
        # two users: each question is shown the other's profile (k = 8, the built vocabulary, as RL prompts)
        vocab = load_tags(out / "tags.json")
        q0, q1 = split.questions
        assert mine[0].prompt == prompts.build_prompt(task, q0, 8, vocab=vocab)
        assert (
            theirs[0].prompt
            == prompts.build_prompt(task, lamp.Question(q0.id, q0.input, q1.profile), 8, vocab=vocab)
            != mine[0].prompt
        )
        assert theirs[1].prompt == prompts.build_prompt(
            task, lamp.Question(q1.id, q1.input, q0.profile), 8, vocab=vocab
        )
    assert not train_users & {r.user_id for r in own}


def test_held_out_prompts_from_the_test_split(simulated_run, lamp_dir, tmp_path):
    """--eval-split test: the held-out prompts are the test split's questions (users disjoint from train and dev),
    prompted as the dev ones are."""
    out, _ = simulated_run
    (tmp_path / "tags.json").write_text((out / "tags.json").read_text())
    n = build_data.write_eval_prompts(lamp_dir, tmp_path, ["LaMP_3"], 8, 8, "recency", 3, split_name="test")
    own = read_rl_prompts(tmp_path / "eval_prompts.jsonl")
    test, dev = lamp.load_split(lamp_dir, "LaMP_3", "test"), lamp.load_split(lamp_dir, "LaMP_3", "dev")
    assert n == len(test.questions) and [r.id for r in own] == [q.id for q in test.questions]
    assert [r.gold for r in own] == [test.golds[q.id] for q in test.questions]
    assert not {q.user_id for q in test.questions} & {q.user_id for q in dev.questions}
    assert own[0].prompt == prompts.build_prompt("LaMP_3", test.questions[0], 8, vocab=load_tags(out / "tags.json"))


def test_simulated_expert_refuses_real_data(tmp_path, lamp_dir):
    import shutil

    shutil.copytree(lamp_dir, tmp_path / "lamp")
    for f in (tmp_path / "lamp").rglob("*_latent.json"):
        f.unlink()
    with pytest.raises(DataError, match="only for synthetic users"):
        SimulatedExpert(tmp_path / "lamp", ["LaMP_2"])


def test_openai_backend_faults_resume_and_key(simulated_run, lamp_dir, tmp_path, monkeypatch):
    """Every stage through the OpenAI-compatible client against a loopback server: a 429, a 500, a timeout
    and two malformed replies are retried; the data equal the simulated run's; a rerun asks nothing."""
    sim_out, _ = simulated_run
    monkeypatch.setenv("TAGPR_TEST_KEY", "sk-test-secret-123")
    expert = SimulatedExpert(lamp_dir, synthetic.SYNTHETIC_TASKS)
    with Server(expert, faults=["429", "timeout", "malformed", "500", "no_choices"], delay=1.5) as srv:
        spec = f"openai:sim@{srv.url}"
        args = [f"--{r}={spec}" for r in ("teacher", "judge", "tagger", "embedder")]
        args += [f"--{r}-key-env=TAGPR_TEST_KEY" for r in ("teacher", "judge", "tagger", "embedder")]
        args += ["--timeout", "0.5", "--backoff", "0.01", "--concurrency", "4"]
        out = tmp_path / "api"
        m = build(lamp_dir, out, *args)
        assert srv.served_faults == ["429", "timeout", "malformed", "500", "no_choices"]
        first = srv.requests
        assert (
            first
            == m["calls"]["teacher"]["requests"]
            + m["calls"]["judge"]["requests"]
            + m["calls"]["tagger"]["requests"]
            + m["calls"]["embedder"]["requests"]
        )
        assert sum(c["failures"] for c in m["calls"].values()) == 0
        assert srv.auth_seen == {"Bearer sk-test-secret-123"}
        assert _outputs(out) == _outputs(sim_out)
        # resume: every reply from the cache, no new request
        m2 = build(lamp_dir, out, *args)
        assert srv.requests == first, m2["calls"]
        assert m2["calls"]["teacher"]["requests"] == 0 and m2["calls"]["teacher"]["cache_hits"] == 6 * 30 * 5
        assert _outputs(out) == _outputs(sim_out)
    for f in out.rglob("*"):
        if f.is_file():
            assert "sk-test-secret-123" not in f.read_text(errors="ignore"), f


def test_openai_backend_gives_up_cleanly(tmp_path):
    """A server that always fails: each request becomes a counted failure after the retries, no exception."""
    with Server(None, faults=["500"] * 3 + ["429"] * 3) as srv:
        b = OpenAIBackend("m", srv.url, cache_path=tmp_path / "c.jsonl", retries=2, backoff=0.0, concurrency=1)
        reps = b.chat([Request([{"role": "user", "content": "hi"}]), Request([{"role": "user", "content": "yo"}])])
        assert [bool(r.error) for r in reps] == [True, True] and "gave up after 3 attempts" in reps[0].error
        assert b.failures == 2 and srv.requests == 6 and not (tmp_path / "c.jsonl").exists()


def test_cache_survives_a_torn_line(tmp_path):
    c = Cache(tmp_path / "c.jsonl")
    for i in range(3):
        c.put(f"k{i}", f"text {i}")
    with open(tmp_path / "c.jsonl", "a") as f:
        f.write('{"key": "k3", "te')  # killed mid-write
    again = Cache(tmp_path / "c.jsonl")
    assert again.data == {"k0": ("text 0", True), "k1": ("text 1", True), "k2": ("text 2", True)}


def test_hf_backend_tiny_model(lamp_dir, tmp_path):
    """hf: a tiny random model as the teacher writes garbage: the parser drops all of it, counted, with a clear
    error; the replies are cached (a rerun asks nothing). As the embedder it carries the pipeline to the end."""
    out = tmp_path / "hf"
    args = ["--tasks", "LaMP_2", "--instances-per-task", "3", "--chains", "2", "--max-tokens", "12"]
    with pytest.raises(datagen.NoData, match="manifest.json"):
        build(lamp_dir, out, "--teacher", "hf:tiny", *args)
    m = json.loads((out / "manifest.json").read_text())
    st = m["stages"]["2_teacher"]
    assert st["in"] == 9 and st["out"] + st["dropped"].get("no_answer", 0) == 9
    assert m["calls"]["teacher"] == {"backend": "hf:tiny", "requests": 9, "cache_hits": 0, "failures": 0}
    with pytest.raises(datagen.NoData):
        build(lamp_dir, out, "--teacher", "hf:tiny", *args)
    m = json.loads((out / "manifest.json").read_text())
    assert m["calls"]["teacher"]["requests"] == 0 and m["calls"]["teacher"]["cache_hits"] == 9
    m = build(lamp_dir, tmp_path / "hf_embed", "--embedder", "hf:tiny", "--tasks", "LaMP_2,LaMP_3")
    assert m["backends"]["embedder"] == "hf:tiny" and 1 <= len(m["stages"]["5_explore"]["primary_tags"]) <= 9
    assert m["stages"]["7_emit"]["sft"] > 0


def test_binding_errors_sorts_chains_by_what_they_say(tmp_path):
    """scripts/binding_errors.py: the input's key is read from a real held-out prompt (easy LaMP-2 genre, LaMP-3
    product, whatever the profile items above it say), and chains written by hand in the bound chains' words
    fall into their classes: the other key's value is a binding error, another value a plain miss."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from binding_errors import RULES, classify

    synthetic.generate(tmp_path, ("LaMP_2", "LaMP_3"), seed=5, sizes={"dev": (6, 2)}, difficulty="easy")
    for name in ("LaMP_2", "LaMP_3"):
        split = lamp.load_split(tmp_path, name, "dev")
        latent = {r["id"]: r for r in json.loads((tmp_path / name / "dev" / "dev_latent.json").read_text())}
        for q in split.questions:
            prompt = prompts.build_prompt(split.task, q, 2, "recency")
            key = synthetic.restore_content(latent[q.id]["content"])
            want = key["genre"] if name == "LaMP_2" else key["product"]
            assert RULES[name][1].search(prompt).group(1) == want, (name, q.id)

    def chain(pattern, answer):
        steps = "<analyze_input> Input: x. </analyze_input>\n" + (
            f"<identify_patterns> Pattern: This user {pattern}. </identify_patterns>\n" if pattern else ""
        )
        return f"<think>\n{steps}<decision_making> Decision: {answer}. </decision_making>\n</think>\n{answer}"

    p2 = 'the tag for the movie: "A comedy movie: Bo laughs." is "classic" . description: A comedy movie: Ada runs.'
    rule2 = 'tags action movies "classic" and comedy movies "twist ending"'
    swapped2 = 'tags action movies "twist ending" and comedy movies "classic"'
    cases2 = {
        chain(rule2, "twist ending"): "right",
        chain(None, "twist ending"): "right, no pattern step",
        chain(rule2, "classic"): "binding error (the other key's value)",
        chain(rule2, "violence"): "right pattern, wrong",
        chain(swapped2, "classic"): "wrong pattern",
        chain(None, "classic"): "wrong, no pattern step",
        chain('tags action movies "classic" and drama movies "violence"', "violence"): "pattern lacks the input's key",
    }
    for text, want in cases2.items():
        assert classify(p2, text, "twist ending", "LaMP_2") == want, text
    p3 = "score: 4 ... review: This kettle does what it says."
    rule3 = "rates every kettle 4 and every office chair 1"
    assert classify(p3, chain(rule3, "1"), "4", "LaMP_3") == "binding error (the other key's value)"
    assert classify(p3, chain(rule3, "4"), "4", "LaMP_3") == "right"
    assert classify(p3, chain(rule3, "2"), "4", "LaMP_3") == "right pattern, wrong"
