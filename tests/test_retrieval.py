import math

import pytest
import torch

from tagpr import lamp, retrieval


def items(*specs):
    return [lamp.Item(str(i), {"text": t, "score": "3"}, d) for i, (t, d) in enumerate(specs)]


def test_recency_newest_first_undated_last_ties_by_file_order():
    its = items(("a", "2020-01-05"), ("b", None), ("c", "2021-03-01"), ("d", "2020-01-05"), ("e", None))
    assert retrieval.recency_order(its) == [2, 3, 0, 4, 1]
    q = lamp.Question("q", "review: x", its)
    assert [i.id for i in retrieval.retrieve("LaMP_3", q, k=2)] == ["2", "3"]
    assert retrieval.retrieve("LaMP_3", q, k=0) == []
    assert retrieval.retrieve("LaMP_3", lamp.Question("q", "review: x", []), k=8) == []


def test_bm25_by_hand():
    docs = ["a b", "a c", "a d"]
    # N = 3, every doc has length 2 = avgdl, so the length norm is k1 = 1.5 and tf = 1 gives idf · 2.5 / 2.5 = idf
    # idf(a) = ln(0.5/3.5) < 0 → floored at 0.25 · mean idf, mean idf = (ln(1/7) + 3 ln(5/3)) / 4
    floor = 0.25 * (math.log(1 / 7) + 3 * math.log(5 / 3)) / 4
    s = retrieval.bm25_scores("a b", docs)
    assert s == pytest.approx([floor + math.log(5 / 3), floor, floor], abs=1e-12)
    # a longer doc gets a larger norm: "b b x y" has tf 2, len 4, avgdl 3
    s = retrieval.bm25_scores("b", ["b b x y", "z w"])
    idf_b = math.log(1.5 / 1.5)  # n = 1 of N = 2 → ln(1) = 0
    assert s == pytest.approx([idf_b * 2 * 2.5 / (2 + 1.5 * (0.25 + 0.75 * 4 / 3)), 0.0], abs=1e-12)
    assert retrieval.bm25_scores("q", []) == []


def test_bm25_retrieve_uses_task_query_and_corpus():
    its = [
        lamp.Item("x", {"title": "cooking pasta", "abstract": "food"}),
        lamp.Item("y", {"title": "graph networks", "abstract": "graph"}),
        lamp.Item("z", {"title": "speech", "abstract": "audio"}),
    ]
    inp = lamp.TASKS["LaMP_1"].template.format(title="graph", ref1="graph kernels", ref2="audio codecs")
    q = lamp.Question("1", inp, its)
    # query = "graph kernels audio codecs"; idf(graph) = idf(audio) = ln(2.5/1.5); avgdl = 8/3
    # y: tf 2, len 3 → 2·2.5 / (2 + 1.5·(0.25 + 0.75·3/(8/3))) = 1.373·idf
    # z: tf 1, len 2 → 2.5 / (1 + 1.5·(0.25 + 0.75·2/(8/3))) = 1.127·idf; x: 0
    assert [i.id for i in retrieval.retrieve("LaMP_1", q, k=2, retriever="bm25")] == ["y", "z"]


def test_random_is_seeded_per_question():
    its = items(*[(str(i), f"2020-01-{i + 1:02d}") for i in range(20)])
    q = lamp.Question("q1", "review: x", its)
    a = retrieval.retrieve("LaMP_3", q, k=5, retriever="random", seed=3)
    assert a == retrieval.retrieve("LaMP_3", q, k=5, retriever="random", seed=3)
    assert len({i.id for i in a}) == 5
    assert a != retrieval.retrieve("LaMP_3", q, k=5, retriever="random", seed=4)
    assert len(retrieval.retrieve("LaMP_3", q, k=50, retriever="random")) == 20
    with pytest.raises(ValueError, match="unknown retriever"):
        retrieval.retrieve("LaMP_3", q, retriever="magic")


def test_dense_mean_pooling_dot_product(tmp_path, tiny):
    model, tok = tiny
    model.model.save_pretrained(tmp_path / "enc")  # the bare encoder (no LM head)
    tok.save_pretrained(tmp_path / "enc")
    enc = retrieval.DenseEncoder(str(tmp_path / "enc"), batch_size=2)
    docs = ["a graph paper", "speech and audio", "cooking", "graph graph"]
    got = enc.scores("graph networks", docs)
    with torch.no_grad():  # independent computation, one text at a time (no padding involved)

        def emb(t):
            ids = tok(t, return_tensors="pt")
            return model.model(**ids).last_hidden_state[0].mean(0)

        want = [float(emb(d) @ emb("graph networks")) for d in docs]
    assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
    q = lamp.Question(
        "1", "review: graph networks", [lamp.Item(str(i), {"text": d, "score": "1"}) for i, d in enumerate(docs)]
    )
    top = retrieval.retrieve("LaMP_3", q, k=2, retriever="dense", encoder=enc)
    assert [i.id for i in top] == [str(i) for i in sorted(range(4), key=lambda i: -want[i])[:2]]
    with pytest.raises(ValueError, match="needs an encoder"):
        retrieval.retrieve("LaMP_3", q, retriever="dense")
