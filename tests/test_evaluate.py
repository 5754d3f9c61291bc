"""evaluate.py: R2P's intervention and self-referencing, every method end to end, official scoring of bad answers."""

import json

import pytest

import evaluate
from tagpr import evaluation, lamp, metrics, r2p
from tagpr.files import DataError
from tagpr.llm import Backend, Reply

T2, T3 = lamp.get_task("LaMP_2"), lamp.get_task("LaMP_3")


class Scripted(Backend):
    """A backend whose replies come from a function of the request; records every request."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.seen = fn, []

    def _chat(self, requests):
        self.seen += list(requests)
        self.requests += len(requests)
        return [self.fn(r) for r in requests]


# ----------------------------------------------------------------------------- intervention (pure)


def test_intervention_fires_on_drift_and_not_on_compliant():
    drifting = "<think>\n" + "I love movies, they are fun to watch on weekends with friends. " * 5  # 310 chars
    kind, text = r2p.intervention(drifting, T2, finished=False)
    assert kind == "template" and text.startswith(drifting.rstrip()) and text.endswith("Step 1 - Request:")
    compliant = "<think>\nStep 1 - Request: pick one tag.\nStep 2 - Profile: the user tags by genre, e.g. "
    assert r2p.intervention(compliant, T2, finished=False) is None
    assert (
        r2p.intervention(compliant + "comedy. Step 3 - Response: it is a comedy.\n</think>\ncomedy", T2, finished=True)
        is None
    )
    # a heading out of order (Step 3 before Step 2): back to the next one in order
    kind, text = r2p.intervention("<think>\nStep 1 - Request: x\nStep 3 - Response: y", T2, False)
    assert kind == "template" and text.endswith("Step 2 - Profile:")
    # after that correction the order restarts at the injected heading: following it is compliant
    assert r2p.intervention(text + " the user tags by genre. Step 3 - Response: comedy.", T2, False) is None
    assert r2p.intervention(text + " genre. Step 1 - Request: again", T2, False)[0] == "template"
    # all three headings present but out of order: back to the last step
    assert r2p.intervention("<think>\nStep 2 - Profile: a Step 1 - Request: b Step 3 - Response: c", T2, False)[
        1
    ].endswith("Step 3 - Response:")
    # short text without a heading yet: not drift (the first 240 characters are free)
    assert r2p.intervention("<think>\nLet me see.", T2, False) is None


def test_length_format_and_unclosed_interventions():
    s = r2p.Settings(budget_words=20)
    long = "<think>\nStep 1 - Request: " + "word " * 30
    kind, text = r2p.intervention(long, T2, False, s)
    assert kind == "length" and text.endswith("</think>\n")
    kind, text = r2p.intervention("<think>\nStep 1 - Request: x\n</think>\nI think it is a comedy!", T2, True)
    assert kind == "format" and "I think it is" not in text and text.endswith("</think>\n")
    assert "exactly one of: sci-fi, based on a book" in text
    assert r2p.intervention("<think>\nStep 1 - Request: x\n</think>\n6", T3, True)[0] == "format"
    assert r2p.intervention("<think>\nStep 1 - Request: x\n</think>\n4", T3, True) is None
    # the model stopped inside its reasoning: close it so an answer follows
    assert r2p.intervention("<think>\nStep 1 - Request: x", T3, True)[0] == "unclosed"
    # an unfinished answer is not judged yet
    assert r2p.intervention("<think>\nStep 1 - Request: x\n</think>\nI thi", T2, False) is None


def test_guided_loop_injects_and_continues():
    """Chunk 1 drifts → the template correction is appended → the model continues from it and finishes."""

    def fn(req):
        if req.prefix == "<think>\n":
            return Reply("Movies are great fun and I like them a lot. " * 6, finished=False)
        if req.prefix.endswith("Step 1 - Request:"):
            return Reply(" tag it. Step 2 - Profile: genre. Step 3 - Response: comedy.\n</think>\ncomedy")
        raise AssertionError(req.prefix)

    b = Scripted(fn)
    [trace] = r2p.generate_guided(b, [[{"role": "user", "content": "q"}]], [T2], r2p.Settings(chunk=8))
    assert trace.interventions == ["template"] and trace.text.endswith("</think>\ncomedy")
    assert "I should follow the three steps of the template." in b.seen[1].prefix
    assert len(b.seen) == 2


def test_self_referencing_sees_all_candidates():
    def fn(req):
        content = req.messages[-1]["content"]
        if "candidate responses" in content:
            return Reply(
                "Step 1 - Request: x Step 2 - Profile: y Step 3 - Response: candidates 1 and 3 agree.\n</think>\ncomedy"
            )
        label = ("action", "fantasy", "romance")[req.sample]
        return Reply(f"Step 1 - Request: a Step 2 - Profile: b Step 3 - Response: c\n</think>\n{label}")

    class Batches(Scripted):
        def _chat(self, requests):
            self.calls = getattr(self, "calls", []) + [[r.sample for r in requests]]
            return super()._chat(requests)

    b = Batches(fn)
    [res] = r2p.r2p(b, ["Which tag? description: a film"], [T2], r2p.Settings(candidates=3))
    assert b.calls[0] == [0, 1, 2]  # the candidates are sampled together, in one batch
    final = [r for r in b.seen if "candidate responses" in r.messages[-1]["content"]]
    assert len(final) == 1
    for j in range(3):  # each candidate's full text, numbered
        assert f"Candidate {j + 1}:" in final[0].messages[-1]["content"]
        assert ("action", "fantasy", "romance")[j] in final[0].messages[-1]["content"]
    assert res["answer"] == "comedy" and len(res["candidates"]) == 3
    assert {r.temperature for r in b.seen if r not in final} == {0.7} and final[0].temperature == 0.0

    # two prompts: each result holds its own prompt's candidates, in sample order
    def fn2(req):
        content = req.messages[-1]["content"]
        what = "film" if "a film" in content.split("Here are")[0] else "show"
        return Reply(f"Step 1 - Request: a Step 2 - Profile: b Step 3 - Response: c\n</think>\n{what}{req.sample}")

    two = r2p.r2p(
        Scripted(fn2),
        ["Which tag? description: a film", "Which tag? description: a show"],
        [T2, T2],
        r2p.Settings(candidates=3),
    )
    assert [[c.split("</think>\n")[-1] for c in res["candidates"]] for res in two] == [
        ["film0", "film1", "film2"],
        ["show0", "show1", "show2"],
    ]


# ----------------------------------------------------------------------------- scoring bad answers


def test_invalid_and_missing_predictions_are_scored_officially(synthetic_dir, tmp_path):
    """Garbage, an error (no reply) and a valid answer on LaMP-3: the failed call stops the scoring (never a score
    by default); with allow_failures it scores as unanswered: unparsable → the worst value, never a crash."""
    split = lamp.load_split(synthetic_dir, "LaMP_3", "dev")
    qs = split.questions[:3]

    def fn(req):  # requests come longest first: answer by which question the prompt holds
        content = req.messages[-1]["content"]
        if content.endswith(qs[0].input):
            return Reply("five stars!!")
        return Reply(error="HTTP 500") if content.endswith(qs[1].input) else Reply(split.golds[qs[2].id])

    b = Scripted(fn)
    s = evaluation.Settings()
    with pytest.raises(DataError, match="rag on LaMP_3: 1 of 3 model calls failed"):
        evaluation.evaluate_split(b, "rag", split, tmp_path, s, limit=3)
    assert not (tmp_path / "LaMP_3" / "metrics.json").exists()
    m = evaluation.evaluate_split(b, "rag", split, tmp_path, s, limit=3, allow_failures=True)
    assert m["failures"] == 1
    worst = [max(abs(1 - float(split.golds[q.id])), abs(5 - float(split.golds[q.id]))) for q in qs[:2]]
    assert m["MAE"] == pytest.approx(sum(worst) / 3)
    assert m["RMSE"] == pytest.approx((sum(w * w for w in worst) / 3) ** 0.5)
    traces = [json.loads(line) for line in (tmp_path / "LaMP_3" / "traces.jsonl").read_text().splitlines()]
    assert traces[1]["error"] == "HTTP 500" and traces[1]["answer"] == ""


# ----------------------------------------------------------------------------- every method, end to end


@pytest.mark.slow
def test_every_method_runs_and_the_metrics_cli_agrees(synthetic_dir, tmp_path, capsys):
    out = tmp_path / "ev"
    args = [
        "--model",
        "tiny",
        "--methods",
        ",".join(evaluation.METHODS),
        "--tasks",
        "LaMP_2,LaMP_3,LaMP_5",
        "--limit",
        "2",
        "--lamp-dir",
        str(synthetic_dir),
        "--out",
        str(out),
        "--max-new-reason",
        "16",
        "--max-new-direct",
        "8",
        "--r2p-candidates",
        "2",
        "--r2p-chunk",
        "8",
        "--paper",
    ]
    results = evaluate.main(args)
    assert set(results) == set(evaluation.METHODS)
    assert results["oracle"]["LaMP_3"] == {
        "MAE": 0.0,
        "RMSE": 0.0,
        "MAE_ci95": [0.0, 0.0],
        "n": 2,
        "samples": 1,
        "parsed": 1.0,  # the oracle's ratings all parse, and are all right
        "parsed_ci95": [1.0, 1.0],
        "MAE_parsed": 0.0,
        "MAE_parsed_ci95": [0.0, 0.0],
    }
    table = (out / "table.md").read_text()
    assert "| Oracle (latent rule) |" in table and "*paper Table 1: TagPR*" in table
    for setting, per_task in results.items():
        for task, m in per_task.items():
            d = out / setting / task
            capsys.readouterr()
            metrics.main(["--golds", str(d / "golds.json"), "--preds", str(d / "predictions.json")])
            official = json.loads(capsys.readouterr().out)  # evaluate adds n, samples and the interval
            assert official == {k: m[k] for k in official} and m == json.loads((d / "metrics.json").read_text())
            assert len((d / "traces.jsonl").read_text().splitlines()) == 2
    r2p_trace = json.loads((out / "r2p" / "LaMP_2" / "traces.jsonl").read_text().splitlines()[0])
    assert len(r2p_trace["candidates"]) == 2
    # resume: a deleted result is rebuilt from the reply cache, without generating again
    cache = out / "cache" / "model.jsonl"
    lines = cache.read_text().count("\n")
    (out / "rag-r" / "LaMP_5" / "metrics.json").unlink()
    again = evaluate.main(args)
    assert again == results and cache.read_text().count("\n") == lines


def test_k_sweep_writes_a_table_and_plot(synthetic_dir, tmp_path):
    out = tmp_path / "sweep"
    res = evaluate.main(
        [
            "--model",
            "tiny",
            "--methods",
            "oracle",
            "--tasks",
            "LaMP_2,LaMP_5",
            "--limit",
            "3",
            "--lamp-dir",
            str(synthetic_dir),
            "--out",
            str(out),
            "--sweep",
            "k",
        ]
    )
    assert set(res) == {f"oracle@{k}" for k in (2, 4, 8, 16, 32)}
    assert (out / "sweep.png").stat().st_size > 1000 and "Oracle (latent rule) @ 16" in (out / "table.md").read_text()
    # each setting its own folder (they once shared "oracle/", so a sweep reused its first point's results)
    assert all((out / f"oracle_{k}" / "LaMP_2" / "metrics.json").is_file() for k in (2, 4, 8, 16, 32))


# ----------------------------------------------------------------------------- sampled scores and the swap control


def test_sampled_setting_scores_the_mean_over_samples(synthetic_dir, tmp_path):
    """k = 2 samples: sample 0 always right, sample 1 right on the first question only → 0.75 and 1.0 / 0.5."""
    split = lamp.load_split(synthetic_dir, "LaMP_2", "dev")
    qs = split.questions[:2]
    wrong = next(t for t in T2.labels if t not in {split.golds[q.id] for q in qs})

    def fn(req):
        q = next(q for q in qs if q.input in req.messages[-1]["content"])
        assert req.temperature == 0.7
        right = req.sample == 0 or q is qs[0]
        return Reply(f"<think>x</think>{split.golds[q.id] if right else wrong}")

    b = Scripted(fn)
    m = evaluation.evaluate_split(b, "rag-r", split, tmp_path, evaluation.Settings(temperature=0.7), limit=2, samples=2)
    assert m["accuracy"] == 0.75 and m["n"] == 2 and m["samples"] == 2
    assert sorted(r.sample for r in b.seen) == [0, 0, 1, 1]
    assert json.loads((tmp_path / "LaMP_2" / "scores.json").read_text()) == {qs[0].id: 1.0, qs[1].id: 0.5}
    assert m["accuracy_ci95"] == [0.5, 1.0]  # two questions: the resampled means are 0.5, 0.75 and 1.0
    traces = [json.loads(line) for line in (tmp_path / "LaMP_2" / "traces.jsonl").read_text().splitlines()]
    assert [t["sample"] for t in traces] == [0, 0, 1, 1]


def test_swap_gives_each_question_the_next_users_profile(synthetic_dir):
    split = lamp.load_split(synthetic_dir, "LaMP_2", "dev")
    qs = split.questions[:6]
    users = list(dict.fromkeys(q.user_id for q in qs))
    assert len(users) >= 2
    swapped = lamp.swap_profiles(qs)
    first = {u: next(q for q in qs if q.user_id == u) for u in users}
    for q, s in zip(qs, swapped):
        nxt = users[(users.index(q.user_id) + 1) % len(users)]
        assert (s.id, s.input, s.user_id) == (q.id, q.input, q.user_id)
        assert s.profile == first[nxt].profile and s.profile != q.profile
    with pytest.raises(ValueError, match="at least two users"):
        lamp.swap_profiles([q for q in qs if q.user_id == users[0]])


def test_swap_setting_shows_another_profile_to_a_copying_model(tmp_path):
    """On easy LaMP-2 users a model that copies the tag of the profile item whose genre matches the input's is
    perfect with the user's own profile and falls to near chance under the swap."""
    from tagpr import synthetic

    synthetic.generate(
        tmp_path / "lamp",
        ["LaMP_2"],
        seed=0,
        sizes={"train": (1, 1), "dev": (16, 2), "test": (1, 1)},
        difficulty="easy",
    )
    split = lamp.load_split(tmp_path / "lamp", "LaMP_2", "dev")

    def copy_matching_tag(req):
        text = req.messages[-1]["content"]
        genre = text.rsplit("description: A ", 1)[1].split(" movie:")[0]
        for line in text.split('the tag for the movie: "A ')[1:]:
            if line.startswith(f"{genre} movie:"):
                return Reply(line.split('" is "')[1].split('"')[0])
        return Reply("none")

    s = evaluation.Settings(k=2)
    own = evaluation.evaluate_split(Scripted(copy_matching_tag), "rag", split, tmp_path / "own", s)
    swap = evaluation.evaluate_split(Scripted(copy_matching_tag), "rag", split, tmp_path / "swap", s, swap=True)
    assert own["accuracy"] == 1.0 and own["n"] == 32
    assert swap["accuracy"] < 0.25 and swap["accuracy_ci95"][1] < 0.5
