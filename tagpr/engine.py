"""A forward pass made for sampling GSPO groups, for the Llama family (Llama / SmolLM2, Qwen2, Qwen3).

It runs the model's own modules (embeddings, norms, projections, MLPs, rotary tables)
in a loop of its own, so that two things a generic forward cannot know about are
cheap:

* **Groups share their prompt.** The G rollouts of a prompt attend to one copy of its
  keys/values (the prefix, `[B/G, kv_heads, P, D]`), not G copies: a decode step's
  queries for the whole group (G × heads-per-kv-head rows) meet the prefix in one
  matmul, and only the generated part (`[B, kv_heads, t, D]`) is per row. The two
  score blocks are normalised together in one softmax — the same numbers as
  attention over the concatenated cache ("cascade" attention).
* **The cache never moves.** Generated keys/values go into buffers sized for
  `max_new_tokens` up front; a step writes one column in place.
* **Weights are prepared once per generation** (`Weights`): every projection in the
  compute dtype, so no step casts a weight (bf16 autocast caches its casts only for
  parameters that require grad: the frozen layers of `--train-layers` were cast again
  at every step), and on a CPU q/k/v and gate/up fused into one matmul each (at a
  decode step's 32 rows a GEMM's fixed cost is a large share of it). On a GPU the
  projections are used as they are when their dtype already matches (no copy).

Attention runs in fp32 whatever the projections run in (with `dtype` bf16 the
projections and MLPs take bf16 operands, as under bf16 autocast, ~2.5× faster on a CPU
with AVX512-BF16 and the norm on a GPU). The engine makes its dtype explicit and runs
outside autocast. Grouped-query heads map to kv head `h // (heads / kv_heads)`,
as transformers' `repeat_kv` does. `supported(lm)` says whether a model can take this
path; `tagpr.rollout.generate` falls back to transformers' forward otherwise.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

FAMILIES = ("llama", "qwen2", "qwen3")


def supported(lm) -> bool:
    cfg = getattr(lm, "config", None)
    if getattr(cfg, "model_type", None) not in FAMILIES or not hasattr(getattr(lm, "model", None), "rotary_emb"):
        return False
    return all(t == "full_attention" for t in (getattr(cfg, "layer_types", None) or ["full_attention"]))


def _norm(mod, x: torch.Tensor) -> torch.Tensor:
    """An RMSNorm module of the family as one fused op (transformers' forward takes ~7 small ones): the same
    formula, weight · x / √(mean(x²) + ε), in x's dtype (the fp32 residual stream here)."""
    return F.rms_norm(x, mod.weight.shape, mod.weight.to(x.dtype), mod.variance_epsilon)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, D): rotate pairs (i, i + D/2), as transformers' rotate_half."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _linears(mods, dtype: torch.dtype, fuse: bool) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """[(weight, bias)] in `dtype`: one fused pair for all of `mods` (their outputs side by side), or one each."""
    bias = lambda m: None if m.bias is None else m.bias.to(dtype)
    if not fuse or len(mods) == 1:
        return [(m.weight.to(dtype), bias(m)) for m in mods]
    b = None if mods[0].bias is None else torch.cat([m.bias for m in mods]).to(dtype)
    return [(torch.cat([m.weight for m in mods]).to(dtype), b)]


class Weights:
    """The projections of every layer and the lm_head in the compute dtype, for one generation."""

    def __init__(self, lm, dtype: torch.dtype, fuse: bool):
        self.dtype = dtype
        self.layers = []
        for layer in lm.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append({"qkv": _linears([a.q_proj, a.k_proj, a.v_proj], dtype, fuse),
                                "splits": [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features],
                                "o": _linears([a.o_proj], dtype, False)[0],
                                "gate_up": _linears([mlp.gate_proj, mlp.up_proj], dtype, fuse),
                                "mlp_splits": [mlp.gate_proj.out_features, mlp.up_proj.out_features],
                                "down": _linears([mlp.down_proj], dtype, False)[0], "act": mlp.act_fn})
        self.head = _linears([lm.lm_head], dtype, False)[0]


def _project(x: torch.Tensor, pairs, splits) -> list[torch.Tensor]:
    """x through the (fused or separate) projections → one output per original projection."""
    if len(pairs) == 1:
        return list(F.linear(x, *pairs[0]).split(splits, dim=-1))
    return [F.linear(x, w, b) for w, b in pairs]


def _qkv(attn, w: dict, x: torch.Tensor, cos, sin, dtype):
    """Projections → (optional Qwen3 q/k norms) → rotary (fp32 cos/sin). Returns fp32 q (B, H, T, D), k, v (B, KV, T, D)."""
    B, T, _ = x.shape
    D = attn.head_dim
    q, k, v = (t.reshape(B, T, -1, D) for t in _project(x.to(dtype), w["qkv"], w["splits"]))
    if hasattr(attn, "q_norm"):
        q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
    q, k, v = (t.transpose(1, 2).float() for t in (q, k, v))
    return _rope(q, cos, sin), _rope(k, cos, sin), v


def _attn_out(w: dict, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return h + F.linear(o.to(w["o"][0].dtype), *w["o"]).to(h.dtype)


def _mlp_block(layer, w: dict, h: torch.Tensor) -> torch.Tensor:
    x = _norm(layer.post_attention_layernorm, h).to(w["down"][0].dtype)
    gate, up = _project(x, w["gate_up"], w["mlp_splits"])
    return h + F.linear(w["act"](gate) * up, *w["down"]).to(h.dtype)


class GroupCache:
    """Per layer: the prompts' keys/values once per group, and preallocated buffers for the responses."""

    def __init__(self, prefix: list[tuple[torch.Tensor, torch.Tensor]], prompt_mask: torch.Tensor, group: int,
                 max_new_tokens: int, keep: int = 0, hidden_size: int = 0):
        # [(kᵀ, v)]: kᵀ (B/G, KV, D, P) and v (B/G, KV, P, D), both contiguous, so no step copies them again
        self.prefix = [(k.transpose(-1, -2).contiguous(), v.contiguous()) for k, v in prefix]
        Bp, KV, _, D = prefix[0][0].shape
        B = Bp * group
        self.gen = [(k.new_empty(B, KV, max_new_tokens, D), k.new_empty(B, KV, max_new_tokens, D)) for k, _ in prefix]
        bias = torch.zeros(prompt_mask.shape, dtype=torch.float32, device=prompt_mask.device)
        self.prefix_bias = bias.masked_fill(~prompt_mask.bool(), float("-inf"))[:, None, None, :]  # (B/G, 1, 1, P)
        self.group, self.length = group, 0
        # keep > 0: every step's residual stream after `keep` layers is kept here (B, max_new_tokens, hidden)
        self.keep = keep
        self.kept = bias.new_zeros(B, max_new_tokens, hidden_size) if keep else None


def prefill(lm, W: Weights, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, keep: int = 0):
    """Left-padded prompts (B/G, P) → (last-position logits (B/G, V), [(k, v)] per layer in fp32, the residual
    stream after `keep` layers (B/G, P, hidden) or None when keep = 0)."""
    m = lm.model
    h = m.embed_tokens(ids)
    cos, sin = (c.float() for c in m.rotary_emb(h, position_ids=pos))
    P = ids.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
    allowed = (causal & mask.bool()[:, None, :]) | torch.eye(P, dtype=torch.bool, device=ids.device)  # pads see themselves
    allowed = allowed[:, None]                                                  # (B/G, 1, P, P)
    kv, kept = [], None
    for i, (layer, w) in enumerate(zip(m.layers, W.layers)):
        a = layer.self_attn
        q, k, v = _qkv(a, w, _norm(layer.input_layernorm, h), cos, sin, W.dtype)
        kv.append((k, v))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=a.scaling,
                                           enable_gqa=k.shape[1] != q.shape[1])
        h = _attn_out(w, o.transpose(1, 2).reshape(h.shape[0], P, -1), h)
        h = _mlp_block(layer, w, h)
        if i + 1 == keep:
            kept = h.clone()
    return F.linear(_norm(m.norm, h[:, -1]).to(W.dtype), *W.head), kv, kept


def _cascade(q: torch.Tensor, pkt, pv, gk, gv, bias: torch.Tensor, G: int, scale: float) -> torch.Tensor:
    """One decode step's attention. q (B, H, 1, D); prefix keysᵀ pkt (B/G, KV, D, P) and values pv
    (B/G, KV, P, D); generated gk/gv (B, KV, t, D).

    Returns (B, H·D). Row b = prompt b // G; head h reads kv head h // (H / KV).
    """
    B, H, _, D = q.shape
    Bp, KV, _, P = pkt.shape
    g = H // KV
    qr = q.view(B, KV, g, D)                                                    # (B, KV, g, D)
    qp = q.view(Bp, G, KV, g, D).transpose(1, 2).reshape(Bp, KV, G * g, D)     # the group's queries together
    s_pre = torch.matmul(qp, pkt) * scale + bias                                # (B/G, KV, G·g, P)
    s_pre = s_pre.view(Bp, KV, G, g, P).transpose(1, 2).reshape(B, KV, g, P)
    s_gen = torch.matmul(qr, gk.transpose(-1, -2)) * scale                      # (B, KV, g, t)
    p = torch.softmax(torch.cat([s_pre, s_gen], dim=-1), dim=-1)
    p_pre = p[..., :P].reshape(Bp, G, KV, g, P).transpose(1, 2).reshape(Bp, KV, G * g, P)
    o = torch.matmul(p_pre, pv).view(Bp, KV, G, g, D).transpose(1, 2).reshape(B, KV, g, D)
    o = o + torch.matmul(p[..., P:], gv)
    return o.reshape(B, H * D)


def decode_step(lm, W: Weights, tokens: torch.Tensor, pos: torch.Tensor, cache: GroupCache) -> torch.Tensor:
    """tokens, pos (B,) → next-token logits (B, V); appends the step's keys/values to `cache` (and with
    `cache.keep`, the tokens' residual stream after that many layers to `cache.kept`)."""
    m = lm.model
    h = m.embed_tokens(tokens[:, None])                                         # (B, 1, hidden)
    cos, sin = (c.float() for c in m.rotary_emb(h, position_ids=pos[:, None]))
    t = cache.length
    for i, (layer, w) in enumerate(zip(m.layers, W.layers)):
        a = layer.self_attn
        q, k, v = _qkv(a, w, _norm(layer.input_layernorm, h), cos, sin, W.dtype)
        gk, gv = cache.gen[i]
        gk[:, :, t] = k[:, :, 0]
        gv[:, :, t] = v[:, :, 0]
        pkt, pv = cache.prefix[i]
        o = _cascade(q, pkt, pv, gk[:, :, :t + 1], gv[:, :, :t + 1], cache.prefix_bias, cache.group, a.scaling)
        h = _attn_out(w, o[:, None], h)
        h = _mlp_block(layer, w, h)
        if i + 1 == cache.keep:
            cache.kept[:, t] = h[:, 0]
    cache.length = t + 1
    return F.linear(_norm(m.norm, h[:, 0]).to(W.dtype), *W.head)
