import math

import pytest
import torch

from tagpr import losses


@pytest.fixture(autouse=True, scope="module")
def float64():
    """Exact arithmetic in the hand-worked cases; restored for the other modules."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def leaf(x):
    return torch.tensor(x, dtype=torch.float64, requires_grad=True)


# ----------------------------------------------------------------------------- SFT


def test_sft_loss_token_mean_and_gradient():
    logp = leaf([[-1.0, -2.0, -3.0], [-4.0, float("-inf"), 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss, m = losses.sft_loss(logp, mask)
    # masked sum −1 −2 −4 = −7 over 3 tokens; the −inf pad never enters
    assert loss.item() == pytest.approx(7 / 3, abs=1e-12) and m["tokens"].item() == 3
    loss.backward()
    assert torch.equal(logp.grad, -mask / 3.0)
    assert losses.sft_loss(logp.detach(), mask, num_tokens=10)[0].item() == pytest.approx(0.7, abs=1e-12)


def test_sft_micro_batches_with_global_denominator():
    torch.manual_seed(0)
    logp = torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).long()
    full = leaf(logp.tolist())
    losses.sft_loss(full, mask)[0].backward()
    parts = leaf(logp.tolist())
    n = mask.sum()
    for sl in (slice(0, 1), slice(1, 4)):  # uneven split: 1 + 3
        losses.sft_loss(parts[sl], mask[sl], num_tokens=n)[0].backward()
    assert torch.allclose(full.grad, parts.grad, atol=1e-15)


# ----------------------------------------------------------------------------- Bradley–Terry


def test_bradley_terry_by_hand():
    loss, m = losses.bradley_terry_loss(torch.zeros(3), torch.zeros(3))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12) and m["accuracy"].item() == 0.5  # equal → log 2
    c, r = leaf([2.0]), leaf([0.0])
    loss, m = losses.bradley_terry_loss(c, r)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-12)  # −log σ(2)
    loss.backward()
    # d/dr_w −log σ(d) = −σ(−d) = −1/(1 + e²); d/dr_l = +σ(−d)
    assert c.grad.item() == pytest.approx(-1 / (1 + math.exp(2)), abs=1e-12)
    assert r.grad.item() == pytest.approx(1 / (1 + math.exp(2)), abs=1e-12)
    assert losses.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=1.0)[0].item() == pytest.approx(
        math.log(1 + math.exp(-1)), abs=1e-12
    )  # −log σ(2 − 1)
    # centering: + 0.01·(2 + 0)² = 0.04
    assert losses.bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), center_coef=0.01)[
        0
    ].item() == pytest.approx(math.log(1 + math.exp(-2)) + 0.04, abs=1e-12)
    _, m = losses.bradley_terry_loss(torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))
    assert m["accuracy"].item() == pytest.approx(0.5) and m["margin"].item() == pytest.approx(0.0)  # (1 + ½ + 0)/3


# ----------------------------------------------------------------------------- advantages


def test_group_advantages():
    adv, m = losses.group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3)
    # group 1: mean 2, unbiased std 1 → (−1, 0, 1)/(1 + 1e-6); group 2 has no variance → exact zeros
    assert adv[:3].tolist() == pytest.approx([-1 / (1 + 1e-6), 0.0, 1 / (1 + 1e-6)], abs=1e-15)
    assert adv[3:].tolist() == [0.0, 0.0, 0.0] and m["zero_variance_frac"].item() == 0.5
    adv, _ = losses.group_advantages(torch.tensor([0.1, 0.1, 0.1]), 3)
    assert adv.tolist() == [0.0, 0.0, 0.0]  # mean of three 0.1s is not exactly 0.1; still exact zeros
    adv, _ = losses.group_advantages(torch.tensor([0.0, 1.0]), 2, eps=0.0)
    assert adv.tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)])  # std([0,1]) = √½ → ±0.5/√½
    adv, _ = losses.group_advantages(torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0]), 3, scale="none")
    assert adv.tolist() == [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        losses.group_advantages(torch.ones(5), 3)


# ----------------------------------------------------------------------------- GSPO


def gspo(logp, old, adv, mask, **kw):
    return losses.gspo_loss(logp, old, torch.tensor(adv), torch.tensor(mask), **kw)


def test_sequence_ratio_from_token_log_ratios():
    old = torch.zeros(1, 3)
    logp = leaf([[0.1, -0.2, 5.0]])  # the third token is padding
    _, m = gspo(logp, old, [1.0], [[1, 1, 0]])
    # mean log-ratio (0.1 − 0.2)/2 = −0.05 → s = e^−0.05
    assert m["ratio_mean"].item() == pytest.approx(math.exp(-0.05), abs=1e-12)


def test_on_policy_ratio_is_one_and_nothing_clips():
    logp = leaf([[-1.0, -2.0], [-0.5, -0.7]])
    loss, m = gspo(logp, logp.detach().clone(), [2.0, -1.0], [[1, 1], [1, 1]])
    # s = 1 → J = Â → loss = −(2 − 1)/2
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)
    assert m["ratio_mean"].item() == 1.0 and m["clip_frac_low"].item() == 0 and m["clip_frac_high"].item() == 0
    loss.backward()
    # unclipped closed form: ∂L/∂logp_t = −Â·s/(|y|·N) = −Â/4
    assert logp.grad.flatten().tolist() == pytest.approx([-0.5, -0.5, 0.25, 0.25], abs=1e-12)


@pytest.mark.parametrize(
    "delta, adv, clipped, side",
    [
        (0.01, 1.0, True, "high"),  # s = e^0.01 > 1 + 4e-4 with Â > 0 → clipped, no gradient
        (-0.01, -1.0, True, "low"),  # s = e^−0.01 < 1 − 3e-4 with Â < 0 → clipped
        (-0.01, 1.0, False, None),  # s below the range but Â > 0: the unclipped (pessimistic) branch
        (0.01, -1.0, False, None),  # s above the range but Â < 0: unclipped
        (2e-4, 1.0, False, None),  # inside (1 − 3e-4, 1 + 4e-4)
    ],
)
def test_clipping_both_sides(delta, adv, clipped, side):
    old = torch.tensor([[-1.0, -2.0, -3.0]])
    logp = leaf((old + delta).tolist())
    loss, m = gspo(logp, old, [adv], [[1, 1, 1]])
    s = math.exp(delta)
    lo, hi = 1 - 3e-4, 1 + 4e-4
    assert loss.item() == pytest.approx(-min(s * adv, min(max(s, lo), hi) * adv), abs=1e-12)
    loss.backward()
    if clipped:
        assert torch.equal(logp.grad, torch.zeros_like(logp))
        assert m[f"clip_frac_{side}"].item() == 1.0
    else:
        # −Â·s·(1/|y|) per token, N = 1
        assert logp.grad.flatten().tolist() == pytest.approx([-adv * s / 3] * 3, abs=1e-12)
        assert m["clip_frac_low"].item() == 0 and m["clip_frac_high"].item() == 0


def random_case(seed, B=6, T=7):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g) * 3
    logp = old + torch.randn(B, T, generator=g) * 2e-3  # ratios around the clip range: some clip, some don't
    mask = torch.rand(B, T, generator=g) > 0.25
    mask[:, 0] = True
    adv = torch.randn(B, generator=g)
    return logp, old, adv, mask


def test_token_and_sequence_forms_agree():
    logp, old, adv, mask = random_case(1)
    grads, values = [], []
    for form in ("token", "sequence"):
        x = leaf(logp.tolist())
        loss, m = losses.gspo_loss(x, old, adv, mask, form=form)
        loss.backward()
        values.append(loss.item())
        grads.append(x.grad)
    assert 0 < m["clip_frac_low"] + m["clip_frac_high"] < 1  # the case exercises both branches
    assert values[0] == pytest.approx(values[1], abs=1e-14)
    assert torch.allclose(grads[0], grads[1], atol=1e-14)


def test_micro_batches_with_global_sequence_count():
    logp, old, adv, mask = random_case(2)
    full = leaf(logp.tolist())
    losses.gspo_loss(full, old, adv, mask)[0].backward()
    parts = leaf(logp.tolist())
    for sl in (slice(0, 2), slice(2, 3), slice(3, 6)):
        losses.gspo_loss(parts[sl], old[sl], adv[sl], mask[sl], num_sequences=6)[0].backward()
    assert torch.allclose(full.grad, parts.grad, atol=1e-15)


def test_padding_never_changes_a_number():
    logp, old, adv, mask = random_case(3)
    pad = torch.tensor([[float("nan"), float("inf"), -1e9]]).expand(6, 3)
    a = leaf(logp.tolist())
    b = leaf(torch.cat([logp, pad], 1).tolist())
    la, ma = losses.gspo_loss(a, old, adv, mask)
    lb, mb = losses.gspo_loss(
        b, torch.cat([old, pad.flip(1)], 1), adv, torch.cat([mask, torch.zeros(6, 3, dtype=bool)], 1)
    )
    # equal up to the summation order of the extra zeros (fp64)
    assert la.item() == pytest.approx(lb.item(), abs=1e-15)
    assert all(ma[k].item() == pytest.approx(mb[k].item(), abs=1e-15) for k in ma)
    la.backward(), lb.backward()
    assert torch.allclose(a.grad, b.grad[:, :7], atol=1e-15) and torch.equal(b.grad[:, 7:], torch.zeros(6, 3))


def test_extreme_log_ratios_stay_finite():
    old = torch.zeros(2, 3)
    logp = leaf([[1000.0, 1000.0, 1000.0], [-1000.0, -1000.0, -1000.0]])
    loss, m = gspo(logp, old, [-1.0, 1.0], [[1, 1, 1], [1, 1, 1]])
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    assert m["ratio_max"].item() == pytest.approx(math.exp(10)) and m["ratio_min"].item() == pytest.approx(
        math.exp(-10)
    )


def test_empty_sequence_contributes_nothing():
    logp = leaf([[-1.0, -1.0], [-2.0, -2.0]])
    loss, _ = gspo(logp, logp.detach(), [1.0, 5.0], [[1, 1], [0, 0]], num_sequences=2)
    assert loss.item() == pytest.approx(-0.5, abs=1e-12)  # only sequence 0: −1/2


def test_k3_kl_term():
    logp = leaf([[-1.0, -1.0]])
    ref = torch.tensor([[-0.5, -1.0]])
    loss, m = gspo(logp, logp.detach(), [0.0], [[1, 1]], ref_logp=ref, kl_coef=0.1)
    # d = ref − logp = (0.5, 0): k3 = e^0.5 − 0.5 − 1 and 0 → sequence mean (e^0.5 − 1.5)/2
    kl = (math.exp(0.5) - 1.5) / 2
    assert m["kl"].item() == pytest.approx(kl, abs=1e-12) and loss.item() == pytest.approx(0.1 * kl, abs=1e-12)


def test_grpo_token_level_variant():
    old = torch.zeros(1, 2)
    logp = leaf([[0.5, -0.05]])
    loss, m = losses.grpo_loss(logp, old, torch.tensor([1.0]), torch.ones(1, 2, dtype=bool))
    # token 1: r = e^0.5 > 1.2 with Â > 0 → clipped to 1.2, no gradient; token 2: r = e^−0.05 unclipped
    assert loss.item() == pytest.approx(-(1.2 + math.exp(-0.05)) / 2, abs=1e-12)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -math.exp(-0.05) / 2], abs=1e-12)
    assert m["clip_frac_high"].item() == 0.5
    # on-policy GRPO and GSPO coincide
    lp, o, adv, mask = random_case(4)
    same = lp.clone()
    assert losses.grpo_loss(same, same, adv, mask)[0].item() == pytest.approx(
        losses.gspo_loss(same, same, adv, mask)[0].item(), abs=1e-14
    )


def test_group_advantages_with_truncated_rollouts_masked():
    """Overlong filtering by hand: [1, 0, (5 truncated), 0] → mean 1/3 and unbiased std √(1/3) over the three
    valid ones; the truncated one gets 0. A group with one valid rollout gets 0; all valid = the plain path."""
    r = torch.tensor([1.0, 0.0, 5.0, 0.0, 2.0, 7.0, 7.0, 7.0])
    valid = torch.tensor([True, True, False, True, True, False, False, False])
    adv, m = losses.group_advantages(r, 4, eps=0.0, valid=valid)
    s = (1 / 3) ** 0.5
    assert torch.allclose(adv, torch.tensor([(2 / 3) / s, (-1 / 3) / s, 0.0, (-1 / 3) / s, 0, 0, 0, 0]), atol=1e-6)
    assert float(m["zero_variance_frac"]) == 0.5 and float(m["valid_frac"]) == 0.5
    plain, _ = losses.group_advantages(r, 4)
    assert torch.equal(losses.group_advantages(r, 4, valid=torch.ones(8, dtype=torch.bool))[0], plain)


# ----------------------------------------------------------------------------- sampler/trainer mismatch


def test_mismatch_weights_token_and_sequence_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, 9.0], [-0.2, -3.0, 0.0, 0.0]], dtype=torch.float64)
    sampler = torch.tensor([[-1.1, -1.0, -1.5, -7.0], [-0.2, -3.4, 0.0, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    # log π_train/π_samp: row 0 [0.1, −1.0, 1.0] (the 4th is padding), row 1 [0, 0.4]
    w, m = losses.mismatch_weights(trainer, sampler, mask, "token", cap=2.0)
    want = [[math.exp(0.1), math.exp(-1.0), 2.0, 1.0], [1.0, math.exp(0.4), 1.0, 1.0]]  # e^1 = 2.72 → cap 2
    assert torch.allclose(w, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    # per sequence, then the mean over the 2 sequences
    assert m["mismatch_log_ratio"].item() == pytest.approx((0.1 / 3 + 0.2) / 2, abs=1e-12)
    assert m["is_capped_frac"].item() == pytest.approx((1 / 3 + 0) / 2, abs=1e-12)
    assert m["is_weight_mean"].item() == pytest.approx(
        ((math.exp(0.1) + math.exp(-1) + 2) / 3 + (1 + math.exp(0.4)) / 2) / 2, abs=1e-12
    )
    # sequence level: the geometric mean of each row's ratios, capped, at every token of the row
    w, m = losses.mismatch_weights(trainer, sampler, mask, "sequence", cap=1.1)
    s0, s1 = math.exp(0.1 / 3), min(math.exp(0.2), 1.1)  # e^0.2 = 1.22 → cap 1.1
    assert torch.allclose(
        w, torch.tensor([[s0, s0, s0, 1.0], [s1, s1, 1.0, 1.0]], dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert m["is_capped_frac"].item() == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError):
        losses.mismatch_weights(trainer, sampler, mask, "tokens", cap=2.0)


@pytest.mark.parametrize("form", ["token", "sequence"])
def test_weights_scale_each_tokens_gradient(form):
    """On policy (s = 1), ∂L/∂logp_t = −Â·w_t/(|y|·N): the weight multiplies each token's term; the sequence form
    takes the row's mean weight, so it equals the token form for sequence-level weights."""
    logp = leaf([[-1.0, -2.0, -0.3], [-0.5, -0.7, 4.0]])
    mask = [[1, 1, 1], [1, 1, 0]]
    w = torch.tensor([[1.5, 1.5, 1.5], [0.5, 0.5, 7.0]], dtype=torch.float64)  # per sequence; the 7 is padding
    loss, _ = gspo(logp, logp.detach().clone(), [2.0, -1.0], mask, weights=w, form=form)
    # J = (2·1.5 + (−1)·0.5)/2 → loss = −1.25
    assert loss.item() == pytest.approx(-1.25, abs=1e-12)
    loss.backward()
    want = [[-2 * 1.5 / 6] * 3, [0.5 / 4, 0.5 / 4, 0.0]]
    assert torch.allclose(logp.grad, torch.tensor(want, dtype=torch.float64), rtol=0, atol=1e-12)
    if form == "token":  # per-token weights differ within a row
        logp.grad = None
        wt = torch.tensor([[1.0, 2.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
        gspo(logp, logp.detach().clone(), [2.0, -1.0], mask, weights=wt)[0].backward()
        want = torch.tensor([[-1 / 3, -2 / 3, 0.0], [0.25, 0.25, 0.0]], dtype=torch.float64)
        assert torch.allclose(logp.grad, want, rtol=0, atol=1e-12)


def test_weights_of_one_change_nothing():
    logp, old, adv, mask = random_case(3)
    a, b = leaf(logp.tolist()), leaf(logp.tolist())
    la, ma = losses.gspo_loss(a, old, adv, mask)
    lb, mb = losses.gspo_loss(b, old, adv, mask, weights=torch.ones_like(old))
    la.backward(), lb.backward()
    assert la.item() == lb.item() and torch.equal(a.grad, b.grad)
