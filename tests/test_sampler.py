"""The KV-cache sampler against transformers' generate, and its stopping, masks and sampling rules."""

from types import SimpleNamespace

import pytest
import torch

from tagpr import sampler


def prompts(tok):
    texts = ["Which tag does this movie relate to?", "hi", "Generate a headline for the following article: x y z"]
    return [tok(t)["input_ids"] for t in texts]


def test_greedy_equals_transformers_generate(tiny):
    model, tok = tiny
    ps = prompts(tok)
    ours = sampler.generate(
        model, ps, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=12, greedy=True, tokenizer=tok
    )
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": ps}, return_tensors="pt")
    tok.padding_side = "right"
    ref = model.generate(**batch, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    ref = ref[:, batch["input_ids"].shape[1] :]
    for i in range(len(ps)):
        n = int(ours.lengths[i])
        assert ours.response_ids[i, :n].tolist() == ref[i, :n].tolist()
    # each prompt alone gives the same tokens as in the left-padded batch
    for i, p in enumerate(ps):
        alone = sampler.generate(model, [p], tok.eos_token_id, tok.pad_token_id, 12, greedy=True)
        assert alone.response_ids[0].tolist() == ours.response_ids[i, : alone.response_ids.shape[1]].tolist()


class ScriptedLM(torch.nn.Module):
    """A fake causal LM whose next token per sequence follows a script (for stop logic)."""

    def __init__(self, script, vocab=10):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.step = script, vocab, 0
        self.seen = []

    def forward(self, input_ids, attention_mask, position_ids, use_cache, logits_to_keep=None, past_key_values=None):
        self.seen.append((input_ids.clone(), attention_mask.clone(), position_ids.clone()))
        logits = torch.full((input_ids.shape[0], 1, self.vocab), -1e9)
        for b, seq in enumerate(self.script):
            logits[b, 0, seq[min(self.step, len(seq) - 1)]] = 0.0
        self.step += 1
        return SimpleNamespace(logits=logits, past_key_values="cache")


def test_stops_at_eos_and_masks():
    EOS, PAD = 9, 0
    lm = ScriptedLM([[3, 4, EOS, 5, 5], [3, 3, 3, 3, EOS], [1, 2, 3, 4, 5]])
    r = sampler.generate(lm, [[5, 6], [7], [5, 6, 7]], eos_id=EOS, pad_id=PAD, max_new_tokens=5, greedy=True)
    assert r.response_ids.tolist() == [[3, 4, EOS, PAD, PAD], [3, 3, 3, 3, EOS], [1, 2, 3, 4, 5]]
    assert r.response_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert r.finished.tolist() == [True, True, False] and r.lengths.tolist() == [3, 5, 5]
    ids, attn, pos = lm.seen[0]  # the prefill: left padding, positions counted from each prompt's first token
    assert ids.tolist() == [[PAD, 5, 6], [PAD, PAD, 7], [5, 6, 7]]
    assert attn.tolist() == [[0, 1, 1], [0, 0, 1], [1, 1, 1]] and pos[:, -1].tolist() == [1, 0, 2]
    ids, attn, pos = lm.seen[1]  # the first decode step: one token each, the next position
    assert ids.tolist() == [[3], [3], [1]] and pos.tolist() == [[2], [1], [3]] and attn.shape == (3, 4)
    # everyone done early: the loop stops and the tensors are trimmed
    lm = ScriptedLM([[EOS], [4, EOS]])
    r = sampler.generate(lm, [[1], [1]], eos_id=EOS, pad_id=PAD, max_new_tokens=50, greedy=True)
    assert r.response_ids.tolist() == [[EOS, PAD], [4, EOS]] and len(lm.seen) == 2


def test_top_p_and_temperature():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(4000, 3)
    # top-p 0.6 keeps the smallest prefix whose mass reaches 0.6: tokens 0 and 1, renormalised 5/8 and 3/8
    draws = sampler.sample_next(logits, top_p=0.6, generator=g)
    assert (draws == 2).sum() == 0
    assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    # temperature 2 flattens: p ∝ (0.5, 0.3, 0.2)^(1/2)
    draws = sampler.sample_next(logits, temperature=2.0, generator=g)
    want = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    want = want / want.sum()
    got = torch.bincount(draws, minlength=3).float() / len(draws)
    assert torch.allclose(got, want, atol=0.03)
    assert sampler.sample_next(logits[:2], greedy=True).tolist() == [0, 0]
    # per-row generators (Gumbel-max): the same distribution, with top-p too
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = sampler.sample_next(logits, top_p=0.6, generator=gens)
    assert (draws == 2).sum() == 0 and (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    draws = sampler.sample_next(
        logits, temperature=2.0, generator=[torch.Generator().manual_seed(i) for i in range(4000)]
    )
    assert torch.allclose(torch.bincount(draws, minlength=3).float() / len(draws), want, atol=0.03)
    # u · total at the very top of the CDF (u = 1 − 1e-9 is 1.0 in fp32) finds no entry above it: the clamp lands
    # on the last token, which top-p cut (p 0) — never drawn; the fallback is the most likely token
    edge = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2]]))
    assert sampler.sample_next(edge, top_p=0.6, u=torch.tensor([1 - 1e-9, 0.7])).tolist() == [0, 1]


def test_nucleus_from_a_few_top_tokens_equals_the_full_sort():
    """`nucleus` looks among each row's top 256 (then 4096) tokens before sorting the whole vocabulary;
    the kept tokens and their probabilities must be those of the definition, on rows whose nucleus is
    narrow (peaked), wide (flat: the fallbacks), mixed in one batch, and full of exact ties (bf16 logits)."""

    def reference(p, top_p):  # the definition, one row at a time, in Python
        out = torch.zeros_like(p)
        for i, row in enumerate(p.tolist()):
            vals, before, floor = sorted(row, reverse=True), 0.0, None
            for v in vals:
                if before > top_p:
                    break
                floor, before = v, before + v
            out[i] = torch.tensor([v if v >= floor else 0.0 for v in row], dtype=p.dtype)
        return out

    # by hand: the tie at the cut is kept whole — (0.4, 0.3, 0.3) at top-p 0.45 keeps all three (the mass before
    # the first 0.3 is 0.4); (0.5, 0.3, 0.2) keeps 0.5 alone at 0.45, and two at 0.6 (the mass before 0.2 is 0.8)
    hand = torch.tensor([[0.3, 0.4, 0.3], [0.5, 0.2, 0.3]], dtype=torch.float64)
    assert sampler.nucleus(hand, 0.45).tolist() == [[0.3, 0.4, 0.3], [0.5, 0.0, 0.0]]
    assert sampler.nucleus(hand, 0.6).tolist() == [[0.3, 0.4, 0.3], [0.5, 0.0, 0.3]]
    g = torch.Generator().manual_seed(0)
    V = 6000
    peaked = torch.randn(3, V, generator=g) * 6.0  # nucleus of a few tokens
    middling = torch.randn(2, V, generator=g) * 1.5  # hundreds to thousands of tokens
    flat = torch.randn(2, V, generator=g) * 0.2  # most of the vocabulary
    tied = (torch.randn(3, V, generator=g) * 3.0).bfloat16().double()  # bf16 logits: many equal probabilities
    for rows in (peaked, torch.cat([peaked, middling]), torch.cat([peaked, flat]), tied):
        probs = torch.softmax(rows.double(), -1)  # float64: the reference's Python sums match to ~1e-16
        for top_p in (0.3, 0.9, 0.99):
            got = sampler.nucleus(probs, top_p)
            assert torch.equal(got, reference(probs, top_p)), (rows.shape, top_p)
            assert torch.equal(got, sampler.nucleus(probs, top_p, widths=()))
    # which width was used: the narrow one for peaked rows (no row needs more than 256 tokens), the sort for flat ones
    assert (sampler.nucleus(torch.softmax(peaked.double(), -1), 0.9) > 0).sum(-1).max() < 256
    assert (sampler.nucleus(torch.softmax(flat.double(), -1), 0.9) > 0).sum(-1).min() > 4096


def test_per_row_generators_make_rows_independent_of_the_batch(tiny):
    model, tok = tiny
    ps = prompts(tok)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    together = sampler.generate(model, ps, tok.eos_token_id, tok.pad_token_id, 8, generator=gens([10, 11, 12]))
    alone = sampler.generate(model, ps[1:2], tok.eos_token_id, tok.pad_token_id, 8, generator=gens([11]))
    n = int(alone.lengths[0])
    assert together.response_ids[1, :n].tolist() == alone.response_ids[0, :n].tolist()


def test_group_shares_one_prefill(tiny):
    model, tok = tiny
    ps = prompts(tok)
    shared = sampler.generate(model, ps, tok.eos_token_id, tok.pad_token_id, 10, greedy=True, n_per_prompt=3)
    repeated = sampler.generate(
        model, [p for p in ps for _ in range(3)], tok.eos_token_id, tok.pad_token_id, 10, greedy=True
    )
    assert shared.response_ids.shape[0] == 9 and torch.equal(shared.response_ids, repeated.response_ids)
    assert shared.prompt_ids == repeated.prompt_ids
    # sampled groups differ within a group (the cache is shared, the draws are not)
    s = sampler.generate(
        model,
        ps[:1],
        tok.eos_token_id,
        tok.pad_token_id,
        10,
        n_per_prompt=4,
        generator=torch.Generator().manual_seed(0),
    )
    assert len({tuple(r) for r in s.response_ids.tolist()}) > 1


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    ps = prompts(tok)
    a = sampler.generate(model, ps, tok.eos_token_id, tok.pad_token_id, 8, generator=torch.Generator().manual_seed(1))
    b = sampler.generate(model, ps, tok.eos_token_id, tok.pad_token_id, 8, generator=torch.Generator().manual_seed(1))
    c = sampler.generate(model, ps, tok.eos_token_id, tok.pad_token_id, 8, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.response_ids, b.response_ids) and not torch.equal(a.response_ids, c.response_ids)


def test_kept_hidden_states_equal_the_training_trunk():
    """generate(keep_layers=k) hands back the residual stream after k layers for every prompt and response
    token, laid out like the training batch: it equals `trunk_hidden` of the training path on the same rows
    (fp32), except at a response's last token, which the sampler never feeds back (0 there)."""
    from tagpr.batching import pad_batch
    from tagpr.models import load_model, trunk_hidden

    lm, tok = load_model("tiny", device="cpu")
    prompts = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]]
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    roll = sampler.generate(
        lm,
        prompts,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=7,
        generator=gens,
        n_per_prompt=2,
        keep_layers=2,
    )
    assert roll.prompt_hidden.shape == (3, 5, lm.config.hidden_size)
    seqs = [p + r[:n] for p, r, n in zip(roll.prompt_ids, roll.response_ids.tolist(), roll.lengths.tolist())]
    ids, attn, _ = pad_batch(seqs, seqs, tok.pad_token_id, "cpu")
    kept = roll.kept_rows(ids.shape[1])
    with torch.no_grad():
        want = trunk_hidden(lm, ids, attn, 2)
    for b, s in enumerate(seqs):
        n = len(s) - 1  # the last token: never fed back
        torch.testing.assert_close(kept[b, :n], want[b, :n], atol=1e-5, rtol=1e-5)
        assert kept[b, n:].abs().max() == 0
    assert want.abs().max() > 0.1
    plain = sampler.generate(
        lm,
        prompts,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        max_new_tokens=7,
        generator=[torch.Generator().manual_seed(i) for i in range(6)],
        n_per_prompt=2,
    )
    assert torch.equal(plain.response_ids, roll.response_ids) and plain.kept_rows(4) is None


def test_greedy_and_sampled_rows_from_one_prefill(tiny):
    """greedy per row: in a group of 3, row 0 is the greedy answer (as greedy=True gives it) and rows 1-2 the
    samples their generators give alone; a mixed batch is the two runs stitched together."""
    model, tok = tiny
    ps = prompts(tok)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(9)]
    mixed = sampler.generate(
        model,
        ps,
        tok.eos_token_id,
        tok.pad_token_id,
        10,
        temperature=1.0,
        n_per_prompt=3,
        generator=gens(),
        greedy=[i % 3 == 0 for i in range(9)],
        tokenizer=tok,
    )
    greedy = sampler.generate(model, ps, tok.eos_token_id, tok.pad_token_id, 10, greedy=True, tokenizer=tok)
    sampled = sampler.generate(
        model,
        ps,
        tok.eos_token_id,
        tok.pad_token_id,
        10,
        temperature=1.0,
        n_per_prompt=3,
        generator=gens(),
        tokenizer=tok,
    )
    for i in range(9):
        ref = greedy.texts[i // 3] if i % 3 == 0 else sampled.texts[i]
        assert mixed.texts[i] == ref, i
    assert len({sampled.texts[i] for i in range(9) if i % 3}) > 1  # the sampled rows do sample
    with pytest.raises(ValueError, match="2 greedy flags for 9 rows"):
        sampler.generate(model, ps, tok.eos_token_id, tok.pad_token_id, 4, n_per_prompt=3, greedy=[True, False])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_the_training_models(tiny, temperature):
    """generate(logprobs=True): each generated token's log-prob at the temperature equals transformers' full
    forward + log_softmax(logits / T) on the finished rows (fp32, to summation order), and the training path's
    `LogprobModel`; 0 after a row stopped."""
    from tagpr.batching import pad_batch
    from tagpr.models import LogprobModel

    model, tok = tiny
    ps = prompts(tok)
    roll = sampler.generate(
        model,
        ps,
        tok.eos_token_id,
        tok.pad_token_id,
        9,
        temperature=temperature,
        generator=[torch.Generator().manual_seed(i) for i in range(6)],
        n_per_prompt=2,
        logprobs=True,
    )
    assert roll.logprobs.shape == roll.response_ids.shape and roll.logprobs.dtype == torch.float32
    assert (roll.logprobs * (1 - roll.response_mask)).abs().max() == 0
    seqs = [p + r[:n] for p, r, n in zip(roll.prompt_ids, roll.response_ids.tolist(), roll.lengths.tolist())]
    masks = [[0] * len(p) + [1] * n for p, n in zip(roll.prompt_ids, roll.lengths.tolist())]
    ids, attn, rmask = pad_batch(seqs, masks, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
        want = logits.log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2)
        train = LogprobModel(model)(ids, attn, temperature)[0]
    got = roll.logprobs[roll.response_mask.bool()]
    torch.testing.assert_close(got, want[rmask.bool()], atol=2e-5, rtol=0)
    torch.testing.assert_close(got, train[rmask.bool()], atol=2e-5, rtol=0)
    assert got.min() < -1.0  # a random model: real log-probs, not zeros
    plain = sampler.generate(
        model,
        ps,
        tok.eos_token_id,
        tok.pad_token_id,
        9,
        temperature=temperature,
        generator=[torch.Generator().manual_seed(i) for i in range(6)],
        n_per_prompt=2,
    )
    assert plain.logprobs is None and torch.equal(plain.response_ids, roll.response_ids)


def test_stopped_rows_leave_the_batch_without_changing_the_others(tiny):
    """compact (the default): once rows stop, steps compute only the others. Greedy and sampled rows, tokens and
    log-probs, equal the run that computes every row to the end; rows stopped at several steps and some ran to
    the cap, so the batch did shrink."""
    model, tok = tiny
    ps = prompts(tok)
    eos = list(range(5, tok.vocab_size, 7))  # many stop tokens: rows stop at different steps
    gens = lambda: [torch.Generator().manual_seed(40 + i) for i in range(12)]
    kw = dict(
        eos_id=eos,
        pad_id=tok.pad_token_id,
        max_new_tokens=12,
        temperature=1.0,
        n_per_prompt=4,
        greedy=[i % 4 == 0 for i in range(12)],
        logprobs=True,
    )
    fast = sampler.generate(model, ps, generator=gens(), **kw)
    full = sampler.generate(model, ps, generator=gens(), compact=False, **kw)
    lengths = fast.lengths.tolist()
    assert len(set(lengths)) >= 3 and max(lengths) == 12 and min(lengths) < 6, lengths
    assert torch.equal(fast.response_ids, full.response_ids) and torch.equal(fast.response_mask, full.response_mask)
    torch.testing.assert_close(fast.logprobs, full.logprobs, atol=2e-5, rtol=0)


@pytest.mark.parametrize("path", ["engine", "transformers"])
def test_groups_of_different_sizes_equal_separate_calls(tiny, path):
    """n_per_prompt per prompt: a held-out set's groups (1 greedy + 3 sampled rows) and a control set's single
    greedy rows in one call give, row for row, the tokens and log-probs of the two calls apart; the sizes may
    alternate (three runs), rows stop at different steps, and the counts are checked."""
    from tagpr import engine

    model, tok = tiny
    ps = prompts(tok)
    swap = [p[::-1] for p in ps]
    eos = list(range(5, tok.vocab_size, 7))
    kw = dict(eos_id=eos, pad_id=tok.pad_token_id, max_new_tokens=10, temperature=1.0, logprobs=True)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    flags = [j == 0 for _ in ps for j in range(4)]
    supported = engine.supported
    try:
        if path == "transformers":
            engine.supported = lambda m: False
        held = sampler.generate(model, ps, n_per_prompt=4, greedy=flags, generator=gens(range(12)), **kw)
        ctrl = sampler.generate(model, swap, greedy=True, **kw)
        both = sampler.generate(
            model,
            ps + swap,
            n_per_prompt=[4] * 3 + [1] * 3,
            greedy=flags + [True] * 3,
            generator=gens(list(range(12)) + [99] * 3),
            **kw,
        )
        mixed = sampler.generate(
            model,
            [ps[0], swap[0], ps[1]],
            n_per_prompt=[4, 1, 4],
            greedy=flags[:4] + [True] + flags[4:8],
            generator=gens([0, 1, 2, 3, 99, 4, 5, 6, 7]),
            **kw,
        )
    finally:
        engine.supported = supported
    assert len(set(held.lengths.tolist())) >= 3
    for got, want in (
        (both, [(held, i) for i in range(12)] + [(ctrl, i) for i in range(3)]),
        (mixed, [(held, i) for i in range(4)] + [(ctrl, 0)] + [(held, i) for i in range(4, 8)]),
    ):
        assert got.prompt_ids == [w.prompt_ids[i] for w, i in want]
        for r, (w, i) in enumerate(want):
            n = int(w.lengths[i])
            assert got.lengths[r] == n and got.response_ids[r, :n].tolist() == w.response_ids[i, :n].tolist(), r
            torch.testing.assert_close(got.logprobs[r, :n], w.logprobs[i, :n], atol=2e-5, rtol=0)
    with pytest.raises(ValueError, match="2 counts for 3 prompts"):
        sampler.generate(model, ps, n_per_prompt=[1, 2], **kw)
    with pytest.raises(ValueError, match="keep_layers"):
        sampler.generate(model, ps, n_per_prompt=[1, 2, 2], keep_layers=1, **kw)


@pytest.mark.parametrize("batch_rows, wave", [(5, 1), (9, 1), (12, 2)])
def test_continuous_batching_gives_each_row_the_one_batch_tokens(tiny, batch_rows, wave):
    """batch_rows: at most that many rows decode at once, and stopped rows' room takes the next prompts (their
    prefill) mid-loop. A held-out set's groups (1 greedy + 3 sampled) and single greedy rows, rows stopping at many
    steps: every row's tokens equal the one-batch run's, log-probs to 2e-5, and prompts really joined late."""
    model, tok = tiny
    ps = prompts(tok) + [p[::-1] for p in prompts(tok)] + [p[1:] for p in prompts(tok)]
    sizes = [4, 4, 4, 1, 1, 1, 4, 4, 4]
    eos = list(range(5, tok.vocab_size, 7))
    flags = [j == 0 for G in sizes for j in range(G)]
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(len(flags))]
    kw = dict(eos_id=eos, pad_id=tok.pad_token_id, max_new_tokens=12, temperature=1.0, logprobs=True)
    one = sampler.generate(model, ps, n_per_prompt=sizes, greedy=flags, generator=gens(), **kw)
    calls = []
    prefill = sampler.engine.prefill
    try:
        sampler.engine.prefill = lambda lm, W, ids, *a: calls.append(ids.shape[0]) or prefill(lm, W, ids, *a)
        cont = sampler.generate(
            model, ps, n_per_prompt=sizes, greedy=flags, generator=gens(), batch_rows=batch_rows, **kw
        )
    finally:
        sampler.engine.prefill = prefill
    assert len(calls) >= 4 and sum(calls) == len(ps)  # prompts prefilled in several admissions, each once
    lengths = one.lengths.tolist()
    assert len(set(lengths)) >= 3 and max(lengths) == 12, lengths
    assert cont.prompt_ids == one.prompt_ids
    assert torch.equal(cont.response_ids, one.response_ids) and torch.equal(cont.response_mask, one.response_mask)
    assert torch.equal(cont.finished, one.finished) and cont.texts == one.texts
    torch.testing.assert_close(cont.logprobs, one.logprobs, atol=2e-5, rtol=0)
