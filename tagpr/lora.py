"""Low-rank adapters (LoRA, Hu et al. 2021, arXiv 2106.09685), written here: no PEFT.

A target projection `y = x Wᵀ + b` becomes `y = x Wᵀ + b + (α / r) · dropout(x) Aᵀ Bᵀ`, with A (r × in)
Kaiming-uniform like a fresh `nn.Linear` and B (out × r) zero, so an adapted model starts as exactly the base
model. W and b stay frozen; A and B train.

The adapted projection is an `nn.Linear` subclass that keeps its `weight` and `bias` under their own names and
adds `lora_A` and `lora_B` beside them. So:
- the base model's state-dict keys do not change: the frozen weights load, shard (FSDP2 shards the adapters
  with the layer that holds them) and export under the names transformers uses;
- `merged_state_dict` folds every adapter into its weight, `W + (α / r) · B A`, for the Hugging Face export,
  which then loads as a plain model of the base architecture;
- `LoRALinear.merged_weight()` is that same sum for one projection: the rollout engine (`engine.Weights`) reads it, so
  rollouts run the merged weights at the cost of one (out × r)·(r × in) product per projection per rollout
  batch and no extra work per token; the price is memory: one copy of the adapted projections in the sampling
  dtype while a rollout batch runs (Qwen3-8B, bf16: 13.9 GB; the README's one-GPU table counts it). Applying
  A and B inside the engine instead would save that copy and cost two thin matmuls per projection per token.

The initial A's come from a generator seeded by the run's seed, in module order (`initial_state`), on the CPU:
the same values on 1 rank, on 2 ranks (where rank 0 hands them to FSDP with the base weights) and on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError
from .models import decoder_layers, train_top_layers

# every attention and MLP projection of the Llama / Qwen2 / Qwen3 decoder layers the engine supports
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRASpec:
    """What to adapt: rank r (0: no adapters), α (the update is scaled by α / r), dropout on the adapter's input,
    the projection names, and how many decoder layers from the top (-1: all)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    layers: int = -1


def parse_targets(text: str, flag: str = "--lora-targets") -> tuple[str, ...]:
    """ "q_proj,v_proj" → ("q_proj", "v_proj"); "all" → every projection. An unknown name is a ValueError that
    names the flag and the known names."""
    names = ALL_TARGETS if text.strip() == "all" else tuple(t.strip() for t in text.split(",") if t.strip())
    bad = [t for t in names if t not in ALL_TARGETS]
    if bad or not names:
        raise ValueError(f"{flag} {text!r}: {', '.join(bad) or 'no names'}; expected 'all' or some of {ALL_TARGETS}")
    return names


class LoRALinear(nn.Linear):
    """An `nn.Linear` with a low-rank update; `weight` and `bias` are the base projection's own tensors."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        nn.Module.__init__(self)  # not nn.Linear's: the base's tensors are kept, not allocated anew
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.rank, self.scaling = rank, alpha / rank
        dev, dt = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.zeros(rank, self.in_features, device=dev, dtype=dt))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev, dtype=dt))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y + F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (α / r)·B A, outside autograd: what the rollout engine multiplies by."""
        with torch.no_grad():
            return self.weight + (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scaling={self.scaling:g}"


def _targets(model, spec: LoRASpec) -> list[tuple[str, nn.Module, str]]:
    """(qualified name of the projection, its parent, its attribute) for every target, in layer order."""
    layers = decoder_layers(model)
    if spec.layers > len(layers):
        raise ValueError(f"LoRA on the top {spec.layers} layers: the model has {len(layers)} decoder layers")
    chosen = layers if spec.layers < 0 else layers[len(layers) - spec.layers :]
    names = {id(m): n for n, m in model.named_modules()}
    found = []
    for layer in chosen:
        for parent_name, parent in layer.named_modules():
            for attr in spec.targets:
                child = getattr(parent, attr, None)
                if isinstance(child, nn.Linear) and any(c is child for c in parent.children()):
                    prefix = names[id(layer)] + (f".{parent_name}" if parent_name else "")
                    found.append((f"{prefix}.{attr}", parent, attr))
    if not found:
        raise ValueError(f"LoRA: no projection named {', '.join(spec.targets)} in the decoder layers")
    return found


def initial_state(model, spec: LoRASpec, seed: int) -> dict[str, torch.Tensor]:
    """Every adapter's starting values, keyed like `model.state_dict()`: A Kaiming-uniform as `nn.Linear`
    initialises a weight (a = √5, bound 1/√in), drawn in module order from a CPU generator seeded with `seed`;
    B zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, parent, attr in _targets(model, spec):
        lin = getattr(parent, attr)
        a = torch.empty(spec.rank, lin.in_features)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
        out[f"{name}.lora_A"] = a
        out[f"{name}.lora_B"] = torch.zeros(lin.out_features, spec.rank)
    return out


def add_adapters(model, spec: LoRASpec, seed: int | None = None) -> int:
    """Wrap every target projection in place and freeze everything else. `seed`: fill the adapters with
    `initial_state` (leave it None on a meta-device model, whose values FSDP receives from rank 0). → the number
    of trainable (adapter) parameters."""
    if spec.rank < 1:
        raise ValueError(f"LoRA rank {spec.rank}: must be ≥ 1")
    for p in model.parameters():
        p.requires_grad_(False)
    targets = _targets(model, spec)
    for name, parent, attr in targets:
        if isinstance(getattr(parent, attr), LoRALinear):
            raise ValueError(f"{name} already has an adapter")
    for _, parent, attr in targets:
        setattr(parent, attr, LoRALinear(getattr(parent, attr), spec.rank, spec.alpha, spec.dropout))
    if seed is not None:
        values = initial_state(model, spec, seed)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in values.items():
                params[k].copy_(v)
    return sum(p.numel() for p in adapter_parameters(model))


def adapter_parameters(model) -> list[nn.Parameter]:
    """The adapters' tensors (A and B of every adapted projection), in module order."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]


def scalings(model) -> dict[str, float]:
    """{qualified name of each adapted projection, as state dicts spell it: α / r} (activation checkpointing's
    wrapper adds a `_checkpoint_wrapped_module` level to module names that state dicts leave out)."""
    strip = lambda n: n.replace("._checkpoint_wrapped_module", "")
    return {strip(n): m.scaling for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(sd: dict[str, torch.Tensor], scaling: dict[str, float]) -> dict[str, torch.Tensor]:
    """A full state dict with the adapters folded in: `<p>.weight` += α/r · `<p>.lora_B` @ `<p>.lora_A` (in fp32),
    the adapter keys dropped. `scaling` is `scalings(model)` (names without any wrapper
    prefix, like `sd`'s)."""
    out = {k: v for k, v in sd.items() if not k.endswith((".lora_A", ".lora_B"))}
    for name, s in scaling.items():
        w = out[f"{name}.weight"]
        delta = sd[f"{name}.lora_B"].float() @ sd[f"{name}.lora_A"].float()
        out[f"{name}.weight"] = w.float() + delta * s  # fp32, like a full-weight run's export (W may be bf16)
    left = [k for k in sd if k.endswith((".lora_A", ".lora_B")) and k.rsplit(".", 1)[0] not in scaling]
    if left:
        raise ValueError(f"adapters with no scaling: {left[:3]}")
    return out


def spec_from_flags(cfg) -> LoRASpec | None:
    """The trainers' `--lora-rank/--lora-alpha/--lora-dropout/--lora-targets` and `--train-layers` (the adapters go
    into the top N layers; -1: all) → a spec, or None with `--lora-rank 0`. A bad target is a ConfigError naming
    the flag."""
    if cfg.lora_rank == 0:
        return None
    try:
        targets = parse_targets(cfg.lora_targets)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return LoRASpec(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, cfg.train_layers)


def make_trainable(lm, spec: LoRASpec | None, train_layers: int, seed: int, full: dict | None) -> tuple[int, int]:
    """What a trainer trains: without a spec the top `train_layers` layers and the final norm
    (`models.train_top_layers`); with one, the adapters alone. On a meta-device model (FSDP from rank 0's
    weights) the adapters' starting values go into rank 0's `full` state dict; otherwise they are filled here.
    → (trainable, total) parameter counts."""
    if spec is None:
        return train_top_layers(lm, train_layers)
    meta = any(p.is_meta for p in lm.parameters())
    try:
        n = add_adapters(lm, spec, seed=None if meta else seed)
    except ValueError as e:
        raise ConfigError(f"--lora-targets {','.join(spec.targets)} / --train-layers {spec.layers}: {e}") from None
    if full is not None:
        full.update(initial_state(lm, spec, seed))
    return n, sum(p.numel() for p in lm.parameters())


def hold_base_in_bf16(lm) -> int:
    """Keep the frozen projections' weights of the decoder layers in bf16 (a LoRA run under bf16 autocast on one
    process: half the base's memory). Autocast casts an fp32 weight to bf16 at every matmul, so the forward is
    bit for bit the same; norms, embeddings, biases and the adapters stay fp32. → bytes saved."""
    saved = 0
    for layer in decoder_layers(lm):
        for m in layer.modules():
            if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight.dtype == torch.float32:
                m.weight = nn.Parameter(m.weight.detach().to(torch.bfloat16), requires_grad=False)
                saved += m.weight.numel() * 2
    return saved
