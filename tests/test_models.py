import pytest
import torch

from tagpr import models, tokenizer
from tagpr.files import DataError


def test_tiny_is_deterministic_and_chatml(tiny):
    model, tok = tiny
    again, _ = models.load_model("tiny", device="cpu")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
    other, _ = models.load_model("tiny", device="cpu", seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 5e6
    assert model.config.model_type == "qwen3"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    s = "<think>\n<analyze_input> x </analyze_input>\n</think>\n[1] ünïcode ✓"
    assert tok.decode(tok(s)["input_ids"]) == s  # byte-level: any text round-trips


def test_tiny_tokenizer_training_is_deterministic():
    a = tokenizer._tiny_tokenizer_json.__wrapped__(512)
    b = tokenizer._tiny_tokenizer_json.__wrapped__(512)
    assert a == b


def test_local_folder_reloads_identically(tmp_path, tiny):
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    back, tok2 = models.load_model(tmp_path / "m", device="cpu")
    ids = tok("Generate a headline for the following article: x", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert tok2.eos_token_id == tok.eos_token_id and tok2.pad_token_id == tok.pad_token_id


def test_bad_names_and_devices(tmp_path):
    with pytest.raises(DataError, match="not a model folder"):
        models.load_model(tmp_path / "nothing")
    assert models.attention_implementation("cpu") == "sdpa"
    assert models.default_dtype("cpu") == torch.float32 and models.default_dtype("cuda") == torch.bfloat16


@pytest.mark.slow
def test_smollm2_offline_default(tmp_path_factory, monkeypatch):
    model, tok = models.load_model("smollm2-135m", device="cpu")
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # a plain model: it saves and reloads
    assert 134e6 < sum(p.numel() for p in model.parameters()) < 135e6
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id != tok.eos_token_id
    assert (models.smollm2_path() / "model.safetensors").is_file()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer  # the real pretrained weights, not a random init


def test_split_forward_equals_the_whole(tiny):
    """Frozen trunk once, top layers per update: log-probs, entropies and the top layers' gradients are the
    whole forward's, with right padding; a model whose forward adds position embeddings is refused."""
    lm, _ = tiny
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lm.config.vocab_size, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    n = len(lm.get_decoder().layers)
    top = [p for p in lm.get_decoder().layers[n - 1].parameters()]
    up = torch.randn(3, 16, generator=g)

    def grads(logp, ent):
        gs = torch.autograd.grad((logp * up + 0.3 * ent).sum(), top)
        return logp.detach(), ent.detach(), gs

    whole = grads(*models.token_logprobs(lm, ids, mask, temperature=0.7))
    with torch.no_grad():
        h = models.trunk_hidden(lm, ids, mask, n - 1)
    assert h.shape == (3, 17, lm.config.hidden_size) and not h.requires_grad
    split = grads(*models.token_logprobs(lm, ids, mask, temperature=0.7, start=n - 1, hidden=h))
    for a, b in zip(whole[:2] + whole[2], split[:2] + split[2]):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert (whole[0] - models.token_logprobs(lm, ids, mask)[0]).abs().max() > 1e-3  # the temperature matters
    # `where`: the lm_head on the chosen positions only; the others are 0 and get no gradient
    where = torch.zeros(3, 16, dtype=torch.bool)
    where[:, 6:12] = True
    where[2, 4:] = False
    part = grads(*models.token_logprobs(lm, ids, mask, temperature=0.7, start=n - 1, hidden=h, where=where))
    assert torch.equal(part[0][~where], torch.zeros(int((~where).sum())))
    assert torch.allclose(part[0][where], whole[0][where], rtol=0, atol=1e-6)
    assert torch.allclose(part[1][where], whole[1][where], rtol=0, atol=1e-6)
    masked = grads(*(t * where for t in models.token_logprobs(lm, ids, mask, temperature=0.7)))
    for a, b in zip(part[2], masked[2]):
        assert torch.allclose(a, b, rtol=0, atol=1e-6)
    assert len(lm.get_decoder().layers) == n and not isinstance(lm.get_decoder().norm, torch.nn.Identity)

    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    assert not models.can_split(gpt2)
    with pytest.raises(ValueError, match="gpt2.*two parts"):
        models.trunk_hidden(gpt2, ids % 64, mask, 1)
