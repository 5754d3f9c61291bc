"""tagpr.lora: adapters that start as the base model exactly, train alone, merge into the export, and feed the
rollout engine the merged weights; in train_sft and train_rl, exact on 1 and 2 ranks and across a resume."""

import copy
import math

import pytest
import torch
from test_engine import MODELS, left_pad

from tagpr import engine, lora, sampler

SPEC = lora.LoRASpec(rank=4, alpha=8.0)


def adapted(name, spec=SPEC, seed=0):
    lm = copy.deepcopy(MODELS[name])
    lora.add_adapters(lm, spec, seed=seed)
    return lm


def randomize_b(lm, seed=1):
    """B ≠ 0, as after training (B starts at zero, so nothing else shows the adapters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lm.modules():
            if isinstance(m, lora.LoRALinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)


IDS = torch.tensor([[5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16]])


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_zero_b_gives_the_base_logits_exactly(name):
    lm = adapted(name)
    n = sum(isinstance(m, lora.LoRALinear) for m in lm.modules())
    assert n == 3 * 7  # every attention and MLP projection of the 3 layers
    assert any(m.lora_A.abs().sum() > 0 for m in lm.modules() if isinstance(m, lora.LoRALinear))
    with torch.no_grad():
        assert torch.equal(lm(input_ids=IDS).logits, MODELS[name](input_ids=IDS).logits)


def test_the_state_dict_keeps_the_base_names_and_adds_the_adapters():
    lm = adapted("qwen2", lora.LoRASpec(rank=2, targets=("q_proj", "v_proj"), layers=1))
    base = MODELS["qwen2"].state_dict()
    sd = lm.state_dict()
    extra = sorted(set(sd) - set(base))
    assert set(base) <= set(sd)
    assert extra == [f"model.layers.2.self_attn.{p}.{ab}" for p in ("q_proj", "v_proj") for ab in ("lora_A", "lora_B")]
    assert all(torch.equal(sd[k], base[k]) for k in base)
    # only the adapters train: 2 projections × (A 2×96 + B out×2); q out 96, v out 2 kv heads × 16 = 32
    assert [n for n, p in lm.named_parameters() if p.requires_grad] == extra
    assert sum(p.numel() for p in lora.adapter_parameters(lm)) == 2 * 96 + 96 * 2 + 2 * 96 + 32 * 2


def test_initial_a_is_kaiming_uniform_and_seeded():
    """A ~ U(−1/√in, 1/√in) (kaiming_uniform with a = √5, as nn.Linear initialises a weight), the same for one
    seed, another for another; B zero."""
    a, b, c = adapted("llama", seed=0), adapted("llama", seed=0), adapted("llama", seed=1)
    A = lambda m: torch.cat([x.lora_A.flatten() for x in m.modules() if isinstance(x, lora.LoRALinear)])
    bound = 1 / math.sqrt(96)  # every target's input is 96 wide except down_proj's (160)
    q = a.model.layers[0].self_attn.q_proj.lora_A.detach()
    assert q.abs().max() <= bound and q.abs().max() > 0.9 * bound and abs(float(q.mean())) < 0.2 * bound
    d = a.model.layers[0].mlp.down_proj.lora_A.detach()
    assert d.abs().max() <= 1 / math.sqrt(160)
    assert torch.equal(A(a), A(b)) and not torch.equal(A(a), A(c))
    assert all(float(m.lora_B.detach().abs().sum()) == 0 for m in a.modules() if isinstance(m, lora.LoRALinear))


def test_only_the_adapters_get_gradients_and_the_base_stays_bit_equal():
    lm = adapted("qwen3")
    before = {k: v.clone() for k, v in lm.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(lm(input_ids=IDS).logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())
        loss.backward()
        for n, p in lm.named_parameters():
            assert p.requires_grad == ("lora_" in n) and (p.grad is not None) == ("lora_" in n), n
        opt.step()
        opt.zero_grad()
    after = lm.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(float(m.lora_B.detach().abs().sum()) > 0 for m in lm.modules() if isinstance(m, lora.LoRALinear))


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen3"])
def test_the_merged_state_dict_loads_as_the_base_architecture_with_the_adapted_logits(name):
    lm = adapted(name)
    randomize_b(lm)
    merged = lora.merged_state_dict(lm.state_dict(), lora.scalings(lm))
    plain = copy.deepcopy(MODELS[name])
    plain.load_state_dict(merged)  # strict: exactly the base model's keys
    with torch.no_grad():
        want, got, base = lm(input_ids=IDS).logits, plain(input_ids=IDS).logits, MODELS[name](input_ids=IDS).logits
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    assert (base - want).abs().max() > 0.05 * want.abs().max()  # the adapters do change the model
    # W' = W + (α/r)·B A, checked on one projection by hand
    q = lm.model.layers[1].self_attn.q_proj
    w = MODELS[name].model.layers[1].self_attn.q_proj.weight
    assert torch.allclose(merged["model.layers.1.self_attn.q_proj.weight"], w + 2.0 * q.lora_B @ q.lora_A)


def test_the_engine_samples_the_merged_weights():
    """Rollouts through the engine (which reads `merged_weight()`) = transformers' forward through the adapters,
    and = the engine on a plain model holding the merged weights."""
    lm = adapted("llama")
    randomize_b(lm)
    plain = copy.deepcopy(MODELS["llama"])
    plain.load_state_dict(lora.merged_state_dict(lm.state_dict(), lora.scalings(lm)))
    prompts = [[5, 6, 7, 8], [9, 10]]
    ids, mask, pos = left_pad(prompts)
    with torch.no_grad():
        e, _, _ = engine.prefill(lm, engine.Weights(lm, torch.float32, True), ids, mask, pos)
        ref = torch.stack([lm(input_ids=torch.tensor([p])).logits[0, -1] for p in prompts])
    assert (e - ref).abs().max() <= 1e-4 * ref.abs().max()
    a = sampler.generate(lm, prompts, eos_id=-1, pad_id=0, max_new_tokens=8, greedy=True).response_ids
    b = sampler.generate(plain, prompts, eos_id=-1, pad_id=0, max_new_tokens=8, greedy=True).response_ids
    base = sampler.generate(MODELS["llama"], prompts, eos_id=-1, pad_id=0, max_new_tokens=8, greedy=True)
    assert torch.equal(a, b) and not torch.equal(a, base.response_ids)


def test_bad_specs_are_refused():
    with pytest.raises(ValueError, match=r"--lora-targets 'q_proj,qq_proj': qq_proj"):
        lora.parse_targets("q_proj,qq_proj")
    assert lora.parse_targets("all") == lora.ALL_TARGETS
    assert lora.parse_targets(" v_proj, q_proj ") == ("v_proj", "q_proj")
    with pytest.raises(ValueError, match="top 5 layers: the model has 3"):
        adapted("llama", lora.LoRASpec(rank=2, layers=5))
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.add_adapters(adapted("llama"), SPEC, seed=0)
