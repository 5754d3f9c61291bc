"""A forward pass made for sampling GSPO groups, for the Llama family (Llama / SmolLM2, Qwen2, Qwen3).

It runs the model's own modules (embeddings, norms, projections, MLPs, rotary tables)
in a loop of its own, so that two things a generic forward cannot know about are
cheap:

* **Groups share their prompt.** The G rollouts of a prompt attend to one copy of its
  keys/values, not G copies: per prompt and kv head the whole group's queries (G × heads-per-kv-head
  rows) meet the prompt's keys in one matmul, and each row's queries meet the keys it generated itself in
  one batched matmul; one softmax spans both parts, with the prompt's padding as a bias. One buffer for
  the whole group with a mask hiding a row's siblings would be one matmul but G× the FLOPs on the generated
  part; held apart, a decode step's attention takes ~0.7× that time on a CPU (bench/README.md, "the prompt's
  keys shared").
* **The cache never moves.** The buffers are sized for `max_new_tokens` up front (the
  same memory as per-row caches: P per prompt + T per row); a step writes one column per row in
  place and reads the first t + 1.
* **Finished rows leave the step.** `decode_step(active=…)` runs the projections, MLPs and head on the
  rows still generating only (a stopped row's own columns get zeros, which no other row reads). A batch of
  T = 1 samples whose lengths spread from ~60 tokens to the cap then costs what its live rows cost, not the
  slowest row's length times the batch.
* **Groups of different sizes share a step** (`Segments`): e.g. a held-out set's groups of one greedy answer
  and k samples and the profile-swap control's single greedy answers decode in one loop, each run of equal
  sizes with its own prefill and cache; the projections, MLPs and head take all their rows in one matmul
  each, so a step reads the weights once for both sets.
* **A frozen trunk's prompts are computed once** (`TrunkStore`, opt-in): when the bottom layers do not
  change between generations (GSPO with `--train-layers`), the held-out prompts' keys/values in those layers
  and the residual stream above them are kept on disk, and a later prefill of the same prompts runs the top
  layers only.
* **Weights are prepared once per generation** (`Weights`): every projection in the
  compute dtype, so no step casts a weight (bf16 autocast caches its casts only for
  parameters that require grad: the frozen layers of `--train-layers` were cast again
  at every step), and on a CPU q/k/v and gate/up fused into one matmul each (at a
  decode step's 32 rows a GEMM's fixed cost is a large share of it). On a GPU the
  projections are used as they are when their dtype already matches (no copy).
  With `pack` (a CPU whose oneDNN can take the dtype) every weight is also reordered once into oneDNN's
  blocked layout (`_Linear`): F.linear lays its weight out for the GEMM at every call,
  which at a decode step's few rows is a large share of it (bf16 and fp32 alike). In fp32 a GEMM of at most
  `FEW_ROWS` rows (a rollout's decode step: 16 rows a rank in the demo) takes MKL's packed weight instead
  (`few`), made at the first such call: a rollout's decode step ~0.6× F.linear's time on an AVX2 core.

Attention runs in fp32 whatever the projections run in (with `dtype` bf16 the
projections and MLPs take bf16 operands, as under bf16 autocast, ~2.5× faster on a CPU
with AVX512-BF16 and the norm on a GPU). The engine makes its dtype explicit and runs
outside autocast. Grouped-query heads map to kv head `h // (heads / kv_heads)`,
as transformers' `repeat_kv` does. `supported(lm)` says whether a model can take this
path; `tagpr.sampler.generate` falls back to transformers' forward otherwise.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from . import hardware
from .files import atomic_target

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


def _rotary(m, h: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary tables at `pos` in fp32: (cos, sin with its first half negated), so that
    rotate_half(x)·sin = roll(x, D/2)·sin' (see `_rope`)."""
    cos, sin = (c.float() for c in m.rotary_emb(h, position_ids=pos))
    half = sin.shape[-1] // 2
    return cos, torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) as transformers' rotate_half: x·cos + cat(−x₂, x₁)·sin, written as
    x·cos + roll(x, D/2)·sin' (three ops, not six). cos/sin broadcast against x (..., D)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


FEW_ROWS = 32  # a GEMM of at most this many rows takes MKL's packed fp32 weight (`_Linear`)


class _Linear:
    """y = x·Wᵀ + b with W, b in the compute dtype. `pack`: W reordered once into oneDNN's blocked layout
    (CPU only; bf16 results identical to F.linear, fp32 equal up to summation order). `few`: an fp32 GEMM of at most
    `FEW_ROWS` rows (a decode step's) takes W packed by MKL instead, made at the first such call: at 16 rows
    ~1.6× F.linear and ~1.2× oneDNN's layout on an AVX2 core, no faster above 32 (fp32 equal up to summation order)."""

    __slots__ = ("weight", "bias", "dtype", "packed", "plain", "few")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool, few: bool = False):
        self.dtype, self.bias, self.packed = weight.dtype, bias, pack
        few = few and weight.dtype == torch.float32 and weight.device.type == "cpu"  # MKL's packing: fp32 CPU only
        self.plain = weight.contiguous() if few else None  # MKL's call takes the plain weight too
        self.few = None
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None) if pack else weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.plain is not None and 0 < (rows := x.numel() // x.shape[-1]) <= FEW_ROWS:
            if self.few is None:
                self.few = torch.ops.mkl._mkl_reorder_linear_weight(self.plain, FEW_ROWS)
            return torch.ops.mkl._mkl_linear(x, self.few, self.plain, self.bias, rows)
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def _linears(mods, dtype: torch.dtype, fuse: bool, pack: bool, few: bool = False) -> list[_Linear]:
    """One `_Linear` for all of `mods` (their outputs side by side), or one each."""
    bias = lambda m: None if m.bias is None else m.bias.to(dtype)
    weight = lambda m: m.merged_weight() if hasattr(m, "merged_weight") else m.weight  # a LoRA adapter merged
    if not fuse or len(mods) == 1:
        return [_Linear(weight(m).to(dtype), bias(m), pack, few) for m in mods]
    b = None if mods[0].bias is None else torch.cat([m.bias for m in mods]).to(dtype)
    return [_Linear(torch.cat([weight(m) for m in mods]).to(dtype), b, pack, few)]


class Weights:
    """The projections of every layer and the lm_head in the compute dtype, for one generation. `pack`
    (default: on a CPU whose oneDNN can hold `dtype` prepacked, `hardware.can_prepack`) prepacks them, and `few`
    (default: on a CPU whose MKL can pack fp32 weights, `hardware.can_pack_few_rows`) packs them for MKL's GEMM
    at a decode step's few rows (`_Linear`); elsewhere F.linear gives the same numbers (bf16: identical; fp32: up
    to summation order)."""

    def __init__(self, lm, dtype: torch.dtype, fuse: bool, pack: bool | None = None, few: bool | None = None):
        cpu = lm.lm_head.weight.device.type == "cpu"
        if pack is None:
            pack = cpu and hardware.can_prepack(dtype)
        if few is None:
            few = cpu and hardware.can_pack_few_rows(dtype)
        self.dtype, self.packed, self.few = dtype, pack, few
        self.layers = []
        for layer in lm.model.layers:
            a, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                {
                    "qkv": _linears([a.q_proj, a.k_proj, a.v_proj], dtype, fuse, pack, few),
                    "splits": [a.q_proj.out_features, a.k_proj.out_features, a.v_proj.out_features],
                    "o": _linears([a.o_proj], dtype, False, pack, few)[0],
                    "gate_up": _linears([mlp.gate_proj, mlp.up_proj], dtype, fuse, pack, few),
                    "mlp_splits": [mlp.gate_proj.out_features, mlp.up_proj.out_features],
                    "down": _linears([mlp.down_proj], dtype, False, pack, few)[0],
                    "act": mlp.act_fn,
                }
            )
        self.head = _linears([lm.lm_head], dtype, False, pack, few)[0]


def _project(x: torch.Tensor, lins: list[_Linear], splits, joined: bool = False):
    """x through the (fused or separate) projections → one output per original projection, or with
    `joined` their outputs side by side in one tensor."""
    if len(lins) == 1:
        y = lins[0](x)
        return y if joined else list(y.split(splits, dim=-1))
    ys = [lin(x) for lin in lins]
    return torch.cat(ys, dim=-1) if joined else ys


def _qkv(attn, w: dict, x: torch.Tensor, cos, sin, dtype):
    """Projections → (optional Qwen3 q/k norms) → rotary on q and k together, in fp32. x (B, T, hidden);
    cos/sin (B, T, D) from `_rotary`. Returns views q (B, T, H, D), k and v (B, T, KV, D)."""
    B, T, _ = x.shape
    D = attn.head_dim
    H, KV = w["splits"][0] // D, w["splits"][1] // D
    qkv = _project(x.to(dtype), w["qkv"], w["splits"], joined=True).float().view(B, T, H + 2 * KV, D)
    qk = qkv[:, :, : H + KV]
    if hasattr(attn, "q_norm"):
        qk = torch.cat((_norm(attn.q_norm, qk[:, :, :H]), _norm(attn.k_norm, qk[:, :, H:])), dim=2)
    qk = _rope(qk, cos[:, :, None], sin[:, :, None])
    return qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :]


def _attn_out(w: dict, o: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return h + w["o"](o.to(w["o"].dtype))  # fp32 + bf16 adds in fp32


def _mlp_block(layer, w: dict, h: torch.Tensor) -> torch.Tensor:
    x = _norm(layer.post_attention_layernorm, h).to(w["down"].dtype)
    gate, up = _project(x, w["gate_up"], w["mlp_splits"])
    return h + w["down"](w["act"](gate) * up)


class GroupCache:
    """Per layer and prompt: the prompt's P keys (transposed) and values, shared by the group, and each row's own
    generated keys and values, sized for `max_new_tokens` up front; the prompt's padding as a bias."""

    def __init__(
        self,
        prefix: list[tuple[torch.Tensor, torch.Tensor]],
        prompt_mask: torch.Tensor,
        group: int,
        max_new_tokens: int,
        keep: int = 0,
        hidden_size: int = 0,
    ):
        Bp, KV, P, D = prefix[0][0].shape
        G, T = group, max_new_tokens
        self.kt = [k.transpose(-1, -2).contiguous() for k, _ in prefix]  # (B/G, KV, D, P)
        self.v = [v.contiguous() for _, v in prefix]  # (B/G, KV, P, D)
        # zeros: a stopped row's columns are read by that row only, and never NaN
        self.gen_kt = [prefix[0][0].new_zeros(Bp, KV, G, D, T) for _ in prefix]  # row j's keys, transposed
        self.gen_v = [prefix[0][0].new_zeros(Bp, KV, G, T, D) for _ in prefix]
        self.prompt_bias = torch.zeros(prompt_mask.shape, device=prompt_mask.device).masked_fill(
            ~prompt_mask.bool(), float("-inf")
        )  # (B/G, P)
        self.P, self.group, self.T, self.length = P, G, T, 0
        # keep > 0: every step's residual stream after `keep` layers is kept here (B, max_new_tokens, hidden)
        self.keep = keep
        self.kept = self.prompt_bias.new_zeros(Bp * G, T, hidden_size) if keep else None

    @property
    def rows(self) -> int:
        return self.group * self.prompt_bias.shape[0]

    def advance(self) -> None:
        """One decode step written: the next step's keys go into the next column."""
        self.length += 1

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Layer i at step `length`: store k/v (B, KV, D) in the rows' own columns, then attention for
        q (B, H, D). Returns (B, H·D); row b = prompt b // G, head h reads kv head h // (H / KV).

        The group's queries (G × heads-per-kv-head rows) meet the shared prompt keys in one matmul; each row's
        queries meet its own generated keys in a batched one; one softmax spans both parts."""
        B, H, D = q.shape
        G, P, t = self.group, self.P, self.length + 1
        kt, vp, gk, gv = self.kt[i], self.v[i], self.gen_kt[i], self.gen_v[i]
        Bp, KV = kt.shape[:2]
        g = H // KV
        gk[..., t - 1] = k.view(Bp, G, KV, D).transpose(1, 2)
        gv[:, :, :, t - 1] = v.view(Bp, G, KV, D).transpose(1, 2)
        q5 = torch.mul(q.view(Bp, G, KV, g, D).transpose(1, 2), scale)  # (B/G, KV, G, g, D)
        s_p = torch.matmul(q5.reshape(Bp, KV, G * g, D), kt).add_(self.prompt_bias[:, None, None, :])
        s_g = torch.matmul(q5, gk[..., :t])  # (B/G, KV, G, g, t)
        p = torch.softmax(torch.cat((s_p.view(Bp, KV, G, g, P), s_g), dim=-1), dim=-1)
        o = torch.matmul(p[..., :P].reshape(Bp, KV, G * g, P), vp).view(Bp, KV, G, g, D)
        o = o.add_(torch.matmul(p[..., P:], gv[:, :, :, :t]))  # (B/G, KV, G, g, D)
        return o.transpose(1, 2).reshape(B, H * D)


class Segments:
    """Groups of different sizes in one decode loop: consecutive `GroupCache`s, each over its own prompts (prefilled
    apart, each batch left-padded to its own length) and its own group size. A step's projections, MLPs and head
    run once over all their rows, which is where a CPU decode step spends its time at a few dozen rows (the
    weights are read once a step, however many rows); attention runs per segment. E.g. a held-out set's groups
    of one greedy answer and k samples and the profile-swap control's single greedy answers, in one call. Each
    segment keeps its own length: under continuous batching (`sampler.generate(batch_rows=…)`) a segment admitted
    later is at an earlier step than the others."""

    keep, kept = 0, None

    def __init__(self, caches: list[GroupCache]):
        self.caches = caches
        self.bounds = [0]
        for c in caches:
            self.bounds.append(self.bounds[-1] + c.rows)

    @property
    def rows(self) -> int:
        return self.bounds[-1]

    @property
    def length(self) -> int:
        return self.caches[0].length

    def advance(self) -> None:
        for c in self.caches:  # each at its own length: continuous batching admits segments at later steps
            c.advance()

    def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        return torch.cat(
            [c.attend(i, q[a:b], k[a:b], v[a:b], scale) for c, a, b in zip(self.caches, self.bounds, self.bounds[1:])]
        )


class TrunkStore:
    """The prompts' keys/values in a model's bottom `layers` decoder layers, and the residual stream above them,
    kept in `folder` for the next prefill of the same prompts through the same bottom layers.

    GSPO with `--train-layers N` never changes the bottom layers, so every held-out scoring of a run, and of every
    run from the same start policy (the demo's SFT row and its three seeds), prefills the same prompts through the
    same trunk: with a store, the first one computes it and the others run the top N layers only.

    An entry is named by a hash of everything its numbers depend on: the prompt batch (ids, mask, positions), the
    embedding, rotary table and bottom layers' parameters, the compute dtype and weight layout, and torch's version,
    thread count and CPU kernels. So a hit holds what the prefill would compute, bit for bit, and a changed weight
    is a miss, never a stale entry. An entry of the SmolLM2-135M trunk's 26 layers is ~12 MB per 300-token prompt
    (fp32). `hits` / `misses` count the prefills that found / wrote an entry.
    """

    def __init__(self, folder: str | Path, layers: int):
        if layers < 1:
            raise ValueError(f"a trunk store needs at least one bottom layer, not {layers}")
        self.folder, self.layers = Path(folder), layers
        self.hits = self.misses = 0

    def key(self, lm, W: Weights, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> str:
        m = lm.model
        if self.layers >= len(m.layers):
            raise ValueError(f"a trunk of {self.layers} layers leaves none of the model's {len(m.layers)} on top")
        h = hashlib.blake2b(digest_size=20)
        h.update(
            repr(
                (
                    torch.__version__,
                    torch.get_num_threads(),
                    torch.backends.cpu.get_cpu_capability(),
                    str(ids.device),
                    str(W.dtype),
                    W.packed,
                    W.few,
                    self.layers,
                )
            ).encode()
        )

        def add(name: str, t: torch.Tensor) -> None:
            h.update(repr((name, tuple(t.shape), str(t.dtype))).encode())
            # a copy: numpy sharing a parameter's storage would make it unresizable, and FSDP2 frees it on reshard
            h.update(t.detach().to("cpu", copy=True).contiguous().view(torch.uint8).numpy())

        for name, t in (
            ("ids", ids),
            ("mask", mask),
            ("pos", pos),
            ("inv_freq", m.rotary_emb.inv_freq),
            ("embed", m.embed_tokens.weight),
        ):
            add(name, t)
        h.update(repr(getattr(m.rotary_emb, "attention_scaling", None)).encode())
        for i, layer in enumerate(m.layers[: self.layers]):
            h.update(
                repr(
                    (
                        i,
                        layer.self_attn.scaling,
                        layer.input_layernorm.variance_epsilon,
                        layer.post_attention_layernorm.variance_epsilon,
                        type(layer.mlp.act_fn).__name__,
                    )
                ).encode()
            )
            for name, p in layer.named_parameters():
                add(f"{i}.{name}", p)
        return h.hexdigest()

    def path(self, key: str) -> Path:
        return self.folder / f"trunk-{self.layers}-{key}.safetensors"

    def load(self, key: str) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None:
        """→ ([(k, v)] of the bottom layers, the residual stream above them), or None (not there, or unreadable:
        then it is computed and written again)."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            t = load_file(str(path))
            kv = [(t[f"k{i}"], t[f"v{i}"]) for i in range(self.layers)]
            return kv, t["hidden"]
        except Exception as e:  # an entry is derived data: recompute it rather than stop
            warnings.warn(f"{path}: unreadable trunk entry ({e}); computing it again", stacklevel=2)
            return None

    def save(self, key: str, kv: list[tuple[torch.Tensor, torch.Tensor]], hidden: torch.Tensor) -> None:
        tensors = {"hidden": hidden.contiguous()}
        for i, (k, v) in enumerate(kv):
            tensors[f"k{i}"], tensors[f"v{i}"] = k.contiguous(), v.contiguous()
        with atomic_target(self.path(key)) as tmp:
            save_file({n: t.cpu() for n, t in tensors.items()}, tmp)


def prefill(
    lm,
    W: Weights,
    ids: torch.Tensor,
    mask: torch.Tensor,
    pos: torch.Tensor,
    keep: int = 0,
    trunk: TrunkStore | None = None,
):
    """Left-padded prompts (B/G, P) → (last-position logits (B/G, V), [(k, v)] per layer in fp32 (B/G, KV, P, D),
    the residual stream after `keep` layers (B/G, P, hidden) or None when keep = 0). `trunk`: take the bottom
    layers' part from that store when it holds these prompts (and write it there when it does not)."""
    m = lm.model
    start, kv, kept, key = 0, [], None, None
    if trunk is not None:
        if keep:
            raise ValueError("a trunk store and keep_layers together: the kept stream may lie inside the trunk")
        key = trunk.key(lm, W, ids, mask, pos)
        found = trunk.load(key)
        if found is None:
            trunk.misses += 1
        else:
            trunk.hits += 1
            (kv, h), start = found, trunk.layers
            kv, h = [(k.to(ids.device), v.to(ids.device)) for k, v in kv], h.to(ids.device)
    if not start:
        h = m.embed_tokens(ids)
    cos, sin = _rotary(m, h, pos)
    P = ids.shape[1]
    causal = torch.ones(P, P, dtype=torch.bool, device=ids.device).tril()
    allowed = (causal & mask.bool()[:, None, :]) | torch.eye(
        P, dtype=torch.bool, device=ids.device
    )  # pads see themselves
    allowed = allowed[:, None]  # (B/G, 1, P, P)
    for i, (layer, w) in enumerate(zip(m.layers, W.layers)):
        if i < start:
            continue
        a = layer.self_attn
        q, k, v = (t.transpose(1, 2) for t in _qkv(a, w, _norm(layer.input_layernorm, h), cos, sin, W.dtype))
        kv.append((k, v))
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, scale=a.scaling, enable_gqa=k.shape[1] != q.shape[1]
        )
        h = _attn_out(w, o.transpose(1, 2).reshape(h.shape[0], P, -1), h)
        h = _mlp_block(layer, w, h)
        if i + 1 == keep:
            kept = h.clone()
        if key is not None and not start and i + 1 == trunk.layers:
            trunk.save(key, kv, h)
    return W.head(_norm(m.norm, h[:, -1]).to(W.dtype)), kv, kept


def decode_step(
    lm,
    W: Weights,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    cache: GroupCache | Segments,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """tokens, pos (B,) → next-token logits (B, V); appends the step's keys/values to `cache` (and with
    `cache.keep`, the tokens' residual stream after that many layers to `cache.kept`).

    `active` (n,): the rows still generating, in order. Only they go through the projections, the MLPs and the
    head, and the logits are theirs (n, V): once most rows of a batch have stopped, a step costs what its live
    rows cost. A stopped row writes zero keys/values into its own columns, which no other row sees."""
    m = lm.model
    if active is not None:
        tokens, pos = tokens[active], pos[active]
    h = m.embed_tokens(tokens[:, None])  # (n, 1, hidden)
    cos, sin = _rotary(m, h, pos[:, None])
    t, B = cache.length, cache.rows
    for i, (layer, w) in enumerate(zip(m.layers, W.layers)):
        a = layer.self_attn
        q, k, v = (x[:, 0] for x in _qkv(a, w, _norm(layer.input_layernorm, h), cos, sin, W.dtype))
        if active is not None:
            q, k, v = (x.new_zeros((B,) + x.shape[1:]).index_copy_(0, active, x) for x in (q, k, v))
        o = cache.attend(i, q, k, v, a.scaling)
        h = _attn_out(w, (o if active is None else o[active])[:, None], h)
        h = _mlp_block(layer, w, h)
        if i + 1 == cache.keep:
            cache.kept[(slice(None) if active is None else active), t] = h[:, 0]
    cache.advance()
    return W.head(_norm(m.norm, h[:, 0]).to(W.dtype))
