"""Shared-prompt GSPO rows (`batching.group_pack`): each group's prompt once, each response attending to the prompt
and itself. The per-token log-probs, entropies and gradients equal the unpacked rows' in fp32 to summation order."""

import pytest
import torch

from tagpr.batching import group_pack, pad_batch
from tagpr.models import LogprobModel, trunk_hidden


def gspo_batch(vocab: int, G: int = 3, seed: int = 0):
    """Two prompts (lengths 7 and 4) with G responses each (lengths 1 to 6), rows prompt-major."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, vocab, (7,), generator=g).tolist(), torch.randint(5, vocab, (4,), generator=g).tolist()]
    lengths = [[3, 6, 1], [5, 2, 4]]
    seqs, masks = [], []
    for p, ns in zip(prompts, lengths):
        for n in ns[:G]:
            r = torch.randint(5, vocab, (n,), generator=g).tolist()
            seqs.append(p + r)
            masks.append([0] * len(p) + [1] * n)
    return pad_batch(seqs, masks, 0, "cpu")


def test_pack_layout_by_hand():
    x, _, rmask = gspo_batch(50)
    pk = group_pack(x, rmask, [0, 2, 3, 4], 3, 0, None)  # group 0: rows 0, 2; group 1: rows 3, 4
    # group 0: prompt 7 + responses 3 and 1 → 11 tokens; group 1: prompt 4 + 5 + 2 → 11
    assert pk.ids.shape == (2, 11)
    assert pk.ids[0].tolist() == x[0, :10].tolist() + x[2, 7:8].tolist()
    assert pk.pos[0].tolist() == list(range(10)) + [7]
    assert pk.pos[1].tolist() == list(range(9)) + [4, 5]
    m = pk.mask[0, 0]
    assert m[8].tolist() == [True] * 9 + [False] * 2  # row 0's second token: the prompt and its own first
    assert m[10].tolist() == [True] * 7 + [False] * 3 + [True]  # row 2's only token: the prompt and itself
    # picks: row 0's 3 tokens from packed 6 (the prompt's last), 7, 8; row 2's from 6; rows 3 and 4 in group 1
    rows, pos, tgt = pk.pick
    assert rows.tolist() == [0] * 4 + [1] * 7
    assert pos.tolist() == [6, 7, 8, 6, 3, 4, 5, 6, 7, 3, 9]
    want = torch.cat([x[r, 1:][rmask[r]] for r in (0, 2, 3, 4)])
    assert torch.equal(tgt, want)


@pytest.mark.parametrize("trunk", [0, 1])
def test_packed_logprobs_and_gradients_equal_the_unpacked(tiny, trunk):
    """fp32, the tiny Qwen3: every rollout's token log-probs and entropies, and the gradient of a weighted sum of
    them, packed against unpacked; `trunk` 1: from the frozen first layer's output, top layers only."""
    lm, _ = tiny
    model = LogprobModel(lm).float()
    x, attn, rmask = gspo_batch(lm.config.vocab_size)
    rows = [0, 1, 2, 3, 4, 5]
    coef = torch.linspace(-1, 2, int(rmask.sum()))
    kw = {}
    hidden = None
    if trunk:
        with torch.no_grad():
            hidden = trunk_hidden(lm, x, attn, trunk)
        kw = {"start": trunk, "hidden": hidden}

    def grads(fn):
        model.zero_grad()
        lp, ent = fn()
        (lp * coef).sum().backward()
        return lp.detach(), ent.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads(lambda: [t[rmask] for t in model(x, attn, 1.0, where=rmask, **kw)])
    pk = group_pack(x, rmask, rows, 3, 0, hidden)
    packed = grads(
        lambda: model(pk.ids, pk.mask, 1.0, position_ids=pk.pos, start=trunk, hidden=pk.hidden, pick=pk.pick)
    )
    assert torch.allclose(plain[0], packed[0], atol=1e-5, rtol=0)
    assert torch.allclose(plain[1], packed[1], atol=1e-5, rtol=0)
    assert plain[2].keys() == packed[2].keys() and len(plain[2]) > 0
    for n, g in plain[2].items():
        assert torch.allclose(g, packed[2][n], atol=1e-5, rtol=1e-4), n


def test_a_flash_attention_policy_trains_packed_rows_with_sdpa():
    """flash-attention-2 cannot take group_pack's 4-D mask: train_rl switches such a policy to SDPA when it packs
    (--shared-prompts) and leaves it alone otherwise; an SDPA or eager policy is never touched. (This CPU cannot
    load flash-attn: the tiny model's config carries the name, and set_attn_implementation is recorded.)"""
    import train_rl
    from tagpr.models import load_model

    lm = load_model("tiny", device="cpu")[0]
    calls = []
    lm.set_attn_implementation = calls.append
    for impl, shared, want in [
        ("flash_attention_2", True, ["sdpa"]),
        ("flash_attention_2", False, []),
        ("sdpa", True, []),
        ("eager", True, []),
    ]:
        calls.clear()
        lm.config._attn_implementation = impl
        train_rl.packed_attention(lm, shared)
        assert calls == want, (impl, shared)
