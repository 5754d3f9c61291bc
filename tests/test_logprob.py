"""The fused log-prob op against an fp64 oracle (Triton runs under TRITON_INTERPRET=1 on CPU)."""

import pytest
import torch

from tagpr_kernels import logprob as K

SHAPES = [(37, 64, 1000), (128, 96, 4099), (5, 16, 130)]  # N·H·V ≤ 1e8; V never a multiple of the 128 tile
TOL = {
    torch.float32: 2e-5,
    torch.bfloat16: 2e-3,
    torch.float16: 5e-4,
}  # slack over the naive op's own error (the fp32 Σp·z cancellation bug was 4e-4)


def case(n, h, v, seed=0, scale=0.3, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * scale + shift
    targets = torch.randint(0, v, (n,), generator=g)
    g_logp = torch.randn(n, generator=g, dtype=torch.float64)
    g_ent = torch.randn(n, generator=g, dtype=torch.float64)
    return hidden, weight, targets, g_logp, g_ent


def run(impl, dtype, hidden, weight, targets, g_logp, g_ent, tau):
    h = hidden.clone().to(dtype).requires_grad_()
    w = weight.clone().to(dtype).requires_grad_()
    logp, ent = K.fused_logprobs(h, w, targets, tau, impl=impl)
    assert logp.dtype == torch.float32 or impl == "naive"
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()
    return [x.double() for x in (logp, ent, h.grad, w.grad)]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def check(impl, dtype, data, tau, strict=True):
    """fp32 (strict): within 1e-5 of the fp64 oracle. Otherwise: error vs the oracle no worse
    than the naive op's in the same dtype, plus a small tolerance."""
    oracle = run("naive", torch.float64, *data, tau)
    got = run(impl, dtype, *data, tau)
    if dtype == torch.float32 and strict:
        for name, a, b in zip(("logp", "entropy", "d_hidden", "d_weight"), got, oracle):
            assert rel_err(a, b) < 1e-5, (name, rel_err(a, b))
    else:  # no worse than the naive op in the same dtype, plus a small tolerance
        naive = run("naive", dtype, *data, tau)
        for name, a, n, b in zip(("logp", "entropy", "d_hidden", "d_weight"), got, naive, oracle):
            assert rel_err(a, b) <= rel_err(n, b) + TOL[dtype], (name, rel_err(a, b), rel_err(n, b))


@pytest.mark.parametrize("impl", ["chunked", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_against_fp64_oracle(impl, dtype, shape):
    check(impl, dtype, case(*shape), tau=1.0 if shape[0] != 37 else 0.7)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_all_negative_logits(impl):
    # positive hidden, negative weights: every logit is far below 0 (a running max started at 0 would be wrong)
    hidden, weight, targets, gl, ge = case(37, 64, 1000)
    data = (hidden.abs() + 1, -(weight.abs() + 0.3), targets, gl, ge)
    z = data[0] @ data[1].T
    assert z.max() < -20 and z.min() > -200
    # logits this far from 0 lose digits in any fp32 code: judge against naive fp32
    check(impl, torch.float32, data, tau=0.7, strict=False)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_very_peaked_distributions(impl):
    hidden, weight, targets, gl, ge = case(37, 64, 1000, scale=8.0)  # logits spread ~±100: near one-hot
    logp, ent = K.naive_logprobs(hidden, weight, targets)
    assert ent.median() < 0.05  # most rows are nearly one-hot
    check(impl, torch.float32, (hidden, weight, targets, gl, ge), tau=1.0, strict=False)


def test_chunking_inside_the_paths(monkeypatch):
    # several row chunks (chunked path) and several vocab chunks of the fp32 dW buffer (Triton), fp32 and bf16
    monkeypatch.setattr(K, "_CHUNK_BYTES", 7 * 4 * 1000)  # 7 rows per chunk
    monkeypatch.setattr(K, "_DW_CHUNK", 384)  # 3 chunks of W's rows for V = 1000
    data = case(37, 64, 1000, seed=1)
    for impl in ("chunked", "triton"):
        check(impl, torch.float32, data, tau=1.3)
        check(impl, torch.bfloat16, data, tau=1.3)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_one_output_unused_and_strided_gradients(impl):
    hidden, weight, targets, _, _ = case(16, 32, 300)
    up = torch.randn(32, dtype=torch.float32)[::2]  # a non-contiguous upstream gradient
    grads = []
    for i in (impl, "naive"):
        h = hidden.float().clone().requires_grad_()
        w = weight.float().clone().requires_grad_()
        logp, _ = K.fused_logprobs(h, w, targets, impl=i)  # entropy unused
        (logp * up).sum().backward()
        grads.append((h.grad, w.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5) and torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_backward_inside_autocast(impl):
    """`.backward()` called inside a bf16 autocast region: the op stays fp32 both ways (it used to fail on a
    bf16 logit tile meeting fp32 upstream gradients)."""
    hidden, weight, targets, g_logp, _ = case(16, 32, 300, seed=3)
    grads = []
    for cast in (False, True):
        h = hidden.float().clone().requires_grad_()
        w = weight.float().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cast):
            logp, ent = K.fused_logprobs(h, w, targets, impl=impl)
            (logp * g_logp.float() + 0.1 * ent).sum().backward()
        grads.append((logp.detach(), h.grad, w.grad))
    for a, b in zip(*grads):
        assert a.dtype == torch.float32 and torch.allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_no_rows(impl):
    """A rank's empty micro-batch: no rows in, empty outputs, a zero weight gradient (the weight stays in the
    graph, so FSDP's collectives see it on every rank)."""
    w = torch.randn(50, 8).requires_grad_()
    logp, ent = K.fused_logprobs(torch.zeros(0, 8, requires_grad=True), w, torch.zeros(0, dtype=torch.long), impl=impl)
    assert logp.shape == ent.shape == (0,)
    (logp.sum() + ent.sum()).backward()
    assert w.grad is not None and w.grad.abs().max() == 0


def test_leading_dims_dispatch_and_errors(monkeypatch):
    hidden, weight, targets, _, _ = case(12, 16, 50)
    h = hidden.float().view(3, 4, 16)
    logp, ent = K.fused_logprobs(h, weight.float(), targets.view(3, 4))
    assert logp.shape == (3, 4) and ent.shape == (3, 4)
    ref, _ = K.naive_logprobs(hidden.float(), weight.float(), targets)
    assert torch.allclose(logp.view(-1), ref, atol=1e-5)
    assert K.default_impl(torch.device("cpu")) == "chunked"
    monkeypatch.setenv("TAGPR_LOGPROB_IMPL", "triton")
    assert K.default_impl(torch.device("cpu")) == "triton"
    monkeypatch.setenv("TAGPR_LOGPROB_IMPL", "fast")
    with pytest.raises(ValueError, match="TAGPR_LOGPROB_IMPL"):
        K.default_impl(torch.device("cpu"))
    with pytest.raises(ValueError, match="temperature"):
        K.fused_logprobs(hidden.float(), weight.float(), targets, temperature=0.0, impl="chunked")
    with pytest.raises(ValueError, match="disagree"):
        K.fused_logprobs(hidden.float(), weight.float(), targets[:5], impl="chunked")


@pytest.mark.parametrize("impl", ["chunked", "triton"])
def test_training_path_matches_model_logits(tiny, impl):
    """The trainers' log-probs (tagpr.models.token_logprobs) equal log-softmax of the model's own logits."""
    from tagpr.models import token_logprobs

    model, tok = tiny
    texts = ["<think>\n<analyze_input> a </analyze_input>\n</think>\ncomedy", "Five things to know"]
    batch = tok(texts, return_tensors="pt", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    target_mask = mask[:, 1:].bool()
    params = [p for p in model.parameters()]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return [p.grad.clone() for p in params]

    logp, ent = token_logprobs(model, ids, mask, temperature=0.7, impl=impl)
    g1 = grads((logp * target_mask).sum() + 0.1 * (ent * target_mask).sum())
    ref = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / 0.7, -1)
    ref_logp = ref.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ref_ent = -(ref.exp() * ref).sum(-1)
    g2 = grads((ref_logp * target_mask).sum() + 0.1 * (ref_ent * target_mask).sum())
    assert torch.allclose(logp[target_mask], ref_logp[target_mask], atol=1e-5)
    assert torch.allclose(ent[target_mask], ref_ent[target_mask], atol=1e-5)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
