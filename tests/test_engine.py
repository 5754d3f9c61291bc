"""tagpr.engine (group-shared prompt and generated keys in one masked buffer) against transformers' own forward."""

import os
from unittest import mock

import pytest
import torch

from tagpr import engine, hardware, sampler


def llama_and_qwen3():
    """A tiny random Llama (no q/k norms, 3 query heads per kv head), a tiny Qwen3 (q/k norms) and a tiny
    Qwen2 (q/k/v biases)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    common = dict(
        vocab_size=97,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    llama = LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=True)).eval()
    qwen = Qwen3ForCausalLM(Qwen3Config(**common, head_dim=16, tie_word_embeddings=False)).eval()
    qwen2 = Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=False)).eval()
    for m in (llama, qwen, qwen2):  # random weights are small; scale them so attention is far from uniform
        with torch.no_grad():
            for n, p in m.named_parameters():
                if p.dim() == 2:
                    p.mul_(4.0)
                elif n.endswith("bias"):
                    p.normal_(0.0, 0.5)  # visible biases (transformers initialises them to 0)
    return {"llama": llama, "qwen3": qwen, "qwen2": qwen2}


MODELS = llama_and_qwen3()


def left_pad(prompts, pad=0):
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad)
    mask = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        mask[i, P - len(p) :] = 1
    return ids, mask, (mask.cumsum(1) - 1).clamp(min=0)


def reference_logits(lm, prompt, continuation):
    """transformers' forward over one unpadded sequence: logits after each continuation prefix."""
    ids = torch.tensor([prompt + continuation])
    with torch.no_grad():
        logits = lm(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 :]  # (len(continuation) + 1, V)


def machine(probe, *args):
    """Ask the machine itself, whatever TAGPR_CPU forces (these tests call the packed path by name)."""
    with mock.patch.dict(os.environ, {hardware.FORCE_ENV: "auto"}):
        return probe(*args)


PACK = [False, True]  # True where oneDNN can prepack fp32 weights, else the case skips by name
FEW = [False, True]  # True where MKL can pack fp32 weights for few rows, else the case skips by name


def skip_unless_the_machine_can(pack: bool, few: bool) -> None:
    if pack and not machine(hardware.can_prepack, torch.float32):
        pytest.skip(f"oneDNN cannot prepack fp32 weights on this CPU ({machine(hardware.describe)})")
    if few and not machine(hardware.can_pack_few_rows, torch.float32):
        pytest.skip(f"MKL on this build cannot pack fp32 weights for few rows ({machine(hardware.describe)})")


@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("fuse,pack,few", [(True, p, f) for p in PACK for f in FEW] + [(False, False, False)])
@pytest.mark.parametrize("family", ["llama", "qwen3", "qwen2"])
def test_prefill_and_decode_steps_equal_the_full_forward(family, fuse, pack, few, G):
    """Every row's logits at every step = transformers on that row alone (its prompt unpadded + its own tokens):
    left padding, the group's shared buffer and its mask (a row sees none of its siblings' tokens); with the
    weights prepacked for oneDNN or not, and packed by MKL for the decode steps' few rows or not."""
    skip_unless_the_machine_can(pack, few)
    lm = MODELS[family]
    assert engine.supported(lm)
    W = engine.Weights(lm, torch.float32, fuse, pack, few)
    assert len(W.layers[0]["qkv"]) == (1 if fuse else 3)
    assert W.packed == pack and W.head.packed == pack and W.few == few
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (7, 3, 11)]
    steps = 5
    conts = [torch.randint(1, 97, (steps,), generator=g).tolist() for _ in range(len(prompts) * G)]  # per row
    ids, mask, pos = left_pad(prompts)
    with torch.no_grad():
        logits, prefix, _ = engine.prefill(lm, W, ids, mask, pos)
        cache = engine.GroupCache(prefix, mask, G, steps)
        got = [logits.repeat_interleave(G, 0)]
        next_pos = pos[:, -1].repeat_interleave(G) + 1
        for t in range(steps):
            tok = torch.tensor([c[t] for c in conts])
            got.append(engine.decode_step(lm, W, tok, next_pos + t, cache))
    got = torch.stack(got, 1)  # (B, steps + 1, V)
    assert (W.head.few is not None) == few  # ≤ 9 rows a step: MKL's, if asked
    for b in range(len(conts)):
        want = reference_logits(lm, prompts[b // G], conts[b])
        assert want.abs().max() > 1.0  # not a trivially flat model
        torch.testing.assert_close(got[b], want, atol=2e-4, rtol=1e-4)


def test_steps_over_the_rows_still_generating_equal_the_full_forward():
    """`decode_step(active=…)`: rows that stopped leave the batch (whole groups and single rows of a group), and
    every row still generating keeps transformers' logits for its own sequence, and the residual stream kept for
    GSPO's frozen trunk (`keep`) is what the full batch keeps."""
    lm, G, steps = MODELS["llama"], 3, 6
    W = engine.Weights(lm, torch.float32, True, False)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (6, 4)]
    conts = [torch.randint(1, 97, (steps,), generator=g).tolist() for _ in range(len(prompts) * G)]
    stops = {0: 3, 1: 1, 4: 2, 5: 1}  # row → the last step it runs (rows 2 and 3 run all six)
    ids, mask, pos = left_pad(prompts)
    with torch.no_grad():
        logits, prefix, _ = engine.prefill(lm, W, ids, mask, pos, keep=2)
        cache, full = (engine.GroupCache(prefix, mask, G, steps, keep=2, hidden_size=96) for _ in range(2))  # copies
        next_pos = pos[:, -1].repeat_interleave(G) + 1
        got = {b: [logits[b // G]] for b in range(len(conts))}
        for t in range(steps):
            tok = torch.tensor([c[t] for c in conts])
            active = torch.tensor([b for b in range(len(conts)) if stops.get(b, steps) > t])
            out = engine.decode_step(lm, W, tok, next_pos + t, cache, active)
            assert out.shape == (len(active), 97)
            for r, b in enumerate(active.tolist()):
                got[b].append(out[r])
            engine.decode_step(lm, W, tok, next_pos + t, full)
    for b, rows in got.items():
        want = reference_logits(lm, prompts[b // G], conts[b])[: len(rows)]
        assert len(rows) == stops.get(b, steps) + 1
        torch.testing.assert_close(torch.stack(rows), want, atol=2e-4, rtol=1e-4)
        n = stops.get(b, steps)
        torch.testing.assert_close(cache.kept[b, :n], full.kept[b, :n], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepacked_linear_equals_f_linear(dtype):
    """oneDNN's prepacked weight gives F.linear's numbers: identical in bf16, to summation order in fp32; with a
    bias, on 2-D and 3-D inputs, at a decode step's row count and a prefill's."""
    if not machine(hardware.can_prepack, dtype):
        pytest.skip(f"oneDNN on this CPU cannot prepack {dtype} weights ({machine(hardware.describe)})")
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g).to(dtype), torch.randn(40, generator=g).to(dtype)
    for bias in (None, b):
        packed, plain = engine._Linear(w, bias, pack=True), engine._Linear(w, bias, pack=False)
        assert packed.weight.is_mkldnn and not plain.weight.is_mkldnn
        for shape in ((3, 24), (2, 5, 24), (64, 24)):
            x = torch.randn(*shape, generator=g).to(dtype)
            want = torch.nn.functional.linear(x, w, bias)
            got = packed(x)
            assert got.dtype == dtype and got.shape == want.shape
            if dtype == torch.bfloat16:
                assert torch.equal(got, want)
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            assert torch.equal(plain(x), want)


@pytest.mark.parametrize("pack", PACK)
def test_few_row_linear_equals_f_linear(pack):
    """MKL's packed fp32 weight (`few`) gives F.linear's numbers up to summation order, with and without a bias,
    on 2-D and 3-D inputs; it is made at the first call of at most FEW_ROWS rows and used only there: more rows
    take the other path, whose numbers are F.linear's (unpacked: bit for bit)."""
    skip_unless_the_machine_can(pack, True)
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    for bias in (None, b):
        lin = engine._Linear(w, bias, pack=pack, few=True)
        x = torch.randn(engine.FEW_ROWS + 1, 24, generator=g)
        assert torch.equal(lin(x), engine._Linear(w, bias, pack=pack)(x)) and lin.few is None  # 33 rows: not MKL's
        for shape in ((1, 24), (3, 24), (2, 5, 24), (engine.FEW_ROWS, 24), (0, 24)):
            x = torch.randn(*shape, generator=g)
            want = torch.nn.functional.linear(x, w, bias)
            got = lin(x)
            assert got.shape == want.shape and got.dtype == torch.float32
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert lin.few is not None and lin.few.is_mkldnn
    assert engine._Linear(w.bfloat16(), None, pack=False, few=True).plain is None  # fp32 only: bf16 ignores it
    # a wrong packing would show: another weight's packed copy gives other numbers
    lin.few = torch.ops.mkl._mkl_reorder_linear_weight(w.flip(0).contiguous(), engine.FEW_ROWS)
    x = torch.randn(3, 24, generator=g)
    assert (lin(x) - torch.nn.functional.linear(x, w, b)).abs().max() > 1.0


def test_bf16_stays_close_and_matches_autocast():
    """bf16 weights prepared once: within 5 % of fp32, and within bf16 rounding of transformers' own forward under
    bf16 autocast (which casts every weight at every call)."""
    lm = MODELS["llama"]
    ids, mask, pos = left_pad([[5, 6, 7, 8], [9, 10]])
    with torch.no_grad():
        full, _, _ = engine.prefill(lm, engine.Weights(lm, torch.float32, True), ids, mask, pos)
        half, _, _ = engine.prefill(lm, engine.Weights(lm, torch.bfloat16, True), ids, mask, pos)
        with torch.autocast("cpu", torch.bfloat16):
            auto = torch.stack([lm(input_ids=torch.tensor([p])).logits[0, -1] for p in ([5, 6, 7, 8], [9, 10])])
    assert half.dtype == torch.bfloat16
    err = (half.float() - full).abs().max() / full.abs().max()
    assert 0 < err < 0.05  # bf16 matmuls: close, not identical
    assert (half.float() - auto.float()).abs().max() / full.abs().max() < 0.02
    # greedy tokens: bf16 picks fp32's token wherever fp32's top-2 margin is well beyond bf16's logit error δ
    # (δ: bf16 autocast against fp32 along fp32's own path, per step); a row is followed up to its first
    # difference, which must fall where the margin is small (after it the prefixes differ)
    g = torch.Generator().manual_seed(0)
    p = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (3, 4, 5, 6, 7, 8, 5, 4)]
    a = sampler.generate(lm, p, eos_id=-1, pad_id=0, max_new_tokens=12, greedy=True).response_ids
    b = sampler.generate(lm, p, eos_id=-1, pad_id=0, max_new_tokens=12, greedy=True, precision="bf16").response_ids
    assert a.shape == b.shape == (8, 12)
    checked = 0
    for i, prompt in enumerate(p):
        seq = torch.tensor([prompt + a[i].tolist()])
        with torch.no_grad():
            exact = lm(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()
            with torch.autocast("cpu", torch.bfloat16):
                rounded = lm(input_ids=seq).logits[0, len(prompt) - 1 : -1].float()
        top2 = exact.topk(2).values
        margin, delta = top2[:, 0] - top2[:, 1], (rounded - exact).abs().max(-1).values
        for t in range(a.shape[1]):
            if margin[t] > 4 * delta[t]:
                assert b[i, t] == a[i, t], (i, t, float(margin[t]), float(delta[t]))
                checked += 1
            if b[i, t] != a[i, t]:
                break
    assert checked >= 48  # most of the 96 tokens are decided by a clear margin (72 on this model)
    with pytest.raises(ValueError, match="precision"):
        sampler.generate(lm, p, eos_id=-1, pad_id=0, max_new_tokens=2, precision="fp16")


def test_engine_and_transformers_paths_sample_identically():
    """The fallback (transformers' forward, repeated cache) and the engine give the same greedy tokens."""
    lm = MODELS["qwen3"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(1, 97, (n,), generator=g).tolist() for n in (5, 9)]
    fast = sampler.generate(lm, prompts, eos_id=-1, pad_id=0, max_new_tokens=8, greedy=True, n_per_prompt=3)
    engine_supported = engine.supported
    try:
        engine.supported = lambda m: False
        slow = sampler.generate(lm, prompts, eos_id=-1, pad_id=0, max_new_tokens=8, greedy=True, n_per_prompt=3)
    finally:
        engine.supported = engine_supported
    assert torch.equal(fast.response_ids, slow.response_ids)
    # and sampled with per-row generators: identical draws
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(6)]
    fast = sampler.generate(lm, prompts, eos_id=-1, pad_id=0, max_new_tokens=8, generator=gens(), n_per_prompt=3)
    try:
        engine.supported = lambda m: False
        slow = sampler.generate(lm, prompts, eos_id=-1, pad_id=0, max_new_tokens=8, generator=gens(), n_per_prompt=3)
    finally:
        engine.supported = engine_supported
    assert torch.equal(fast.response_ids, slow.response_ids)


def test_unsupported_models_are_recognised():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=50))
    assert not engine.supported(gpt2)
    r = sampler.generate(gpt2, [[1, 2, 3]], eos_id=-1, pad_id=0, max_new_tokens=3, greedy=True)
    assert r.response_ids.shape == (1, 3)


def test_trunk_store_gives_the_prefill_bit_for_bit_and_skips_the_bottom_layers(tmp_path):
    """`engine.TrunkStore`: the first prefill writes the bottom layers' keys/values and residual stream, a second
    one of the same prompts reads them and gives the same logits and keys/values, bit for bit. A change in a top
    layer still finds the entry (and gives that model's own prefill); a change in a bottom layer, or other
    prompts, computes and writes a new one. An entry altered on disk changes the logits: a hit really runs only
    the top layers."""
    import copy

    from safetensors.torch import load_file, save_file

    lm = copy.deepcopy(MODELS["llama"])  # 3 layers: a trunk of 2
    ids, mask, pos = left_pad([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14]])
    W = lambda m: engine.Weights(m, torch.float32, True, False)
    store = engine.TrunkStore(tmp_path, 2)

    def same(a, b):
        return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for p, q in zip(a[1], b[1]) for x, y in zip(p, q))

    with torch.no_grad():
        want = engine.prefill(lm, W(lm), ids, mask, pos)
        first = engine.prefill(lm, W(lm), ids, mask, pos, trunk=store)
        files = sorted(tmp_path.iterdir())
        assert (store.hits, store.misses, len(files)) == (0, 1, 1)
        again = engine.prefill(lm, W(lm), ids, mask, pos, trunk=store)
        assert (store.hits, store.misses) == (1, 1)
        assert same(first, want) and same(again, want) and len(again[1]) == 3

        top = copy.deepcopy(lm)  # RL trained the top layer
        top.model.layers[2].mlp.down_proj.weight.mul_(1.5)
        got = engine.prefill(top, W(top), ids, mask, pos, trunk=store)
        assert (store.hits, len(list(tmp_path.iterdir()))) == (2, 1)
        assert same(got, engine.prefill(top, W(top), ids, mask, pos)) and not torch.equal(got[0], want[0])

        low = copy.deepcopy(lm)
        low.model.layers[1].self_attn.k_proj.weight[0, 0] += 1e-3
        got = engine.prefill(low, W(low), ids, mask, pos, trunk=store)
        assert (store.misses, len(list(tmp_path.iterdir()))) == (2, 2)
        assert same(got, engine.prefill(low, W(low), ids, mask, pos))
        engine.prefill(lm, W(lm), ids[:2], mask[:2], pos[:2], trunk=store)  # other prompts: another entry
        assert (store.misses, len(list(tmp_path.iterdir()))) == (3, 3)

        entry = load_file(str(files[0]))  # alter the stored stream
        entry["hidden"] = entry["hidden"] * 1.01
        save_file(entry, str(files[0]))
        altered = engine.prefill(lm, W(lm), ids, mask, pos, trunk=store)
        assert store.hits == 3 and not torch.equal(altered[0], want[0])
        torch.testing.assert_close(altered[1][0][0], want[1][0][0], atol=0, rtol=0)  # layer 0's keys: as stored

        with pytest.raises(ValueError, match="keep_layers"):
            engine.prefill(lm, W(lm), ids, mask, pos, keep=1, trunk=store)
        with pytest.raises(ValueError, match="none of the model"):
            engine.prefill(lm, W(lm), ids, mask, pos, trunk=engine.TrunkStore(tmp_path, 3))


def test_generate_with_a_trunk_store_draws_the_same_tokens(tmp_path):
    """Through `sampler.generate`: greedy and sampled rows with and without the store, equal token for token."""
    lm = MODELS["llama"]
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    kw = dict(eos_id=-1, pad_id=0, max_new_tokens=6, n_per_prompt=3, greedy=[True, False, False] * 2, logprobs=True)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(6)]
    store = engine.TrunkStore(tmp_path, 1)
    want = sampler.generate(lm, prompts, generator=gens(), **kw)
    for _ in range(2):
        got = sampler.generate(lm, prompts, generator=gens(), trunk=store, **kw)
        assert torch.equal(got.response_ids, want.response_ids) and torch.equal(got.logprobs, want.logprobs)
    assert (store.hits, store.misses) == (1, 1)
