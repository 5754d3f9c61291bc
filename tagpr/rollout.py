"""The rollout engine: batched sampling with a KV cache.

Prompts are left-padded into one batch; the prefill computes logits for the last
position only (no [B, T, V] prompt logits); each decode step feeds one token per
sequence with explicit position ids and the growing attention mask. Sampling divides
the logits by the temperature (the training log-probs use the same scaling), then
applies top-p (nucleus) filtering; `greedy=True` takes the argmax (evaluation).
A sequence stops at its first EOS (kept, mask 1); after that it only receives pad
tokens with mask 0. Under FSDP2 the model is unsharded once for the whole rollout
phase and resharded after (`gathered`), not once per token.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]        # the prompts' tokens, unpadded
    response_ids: torch.Tensor         # (B, T) right-padded, EOS included when reached
    response_mask: torch.Tensor        # (B, T) 1 on generated tokens up to and including the first EOS
    texts: list[str]                   # decoded responses, EOS and special tokens dropped
    finished: torch.Tensor             # (B,) reached EOS before max_new_tokens

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)


@contextlib.contextmanager
def gathered(model):
    """Unshard every FSDP2 unit once for a whole generation phase; reshard after. No-op without FSDP."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        FSDPModule = ()
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
                generator: torch.Generator | Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """logits (B, V) → next tokens (B,).

    `generator` may be one generator for the batch (multinomial) or one per row: then
    each row samples by Gumbel-max (argmax of log p + Gumbel noise drawn from its own
    generator — the same distribution), so a row's draws never depend on which other
    rows share its batch or rank.
    """
    if greedy or temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)                # (B, V)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)                   # (B, V)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p                           # keep the smallest prefix ≥ top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    if isinstance(generator, (list, tuple)):
        u = torch.stack([torch.rand(probs.shape[1], generator=g, device=probs.device) for g in generator])  # (B, V)
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-20)))
        return (torch.log(probs) + gumbel).argmax(-1)                           # log 0 = −inf never wins
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model, prompt_ids: Sequence[Sequence[int]], eos_id: int | Sequence[int], pad_id: int,
             max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, greedy: bool = False,
             generator: torch.Generator | Sequence[torch.Generator] | None = None, tokenizer=None,
             n_per_prompt: int = 1) -> Rollouts:
    """Sample `n_per_prompt` responses per prompt (a GSPO group), rows prompt-major.

    Each prompt is prefilled once and its KV cache repeated for the group: the prefill,
    which dominates at LaMP prompt lengths, costs 1/G of sampling the group separately.
    `generator`: one for the batch, or one per output row (see `sample_next`).
    `model` is a transformers causal LM (or an FSDP2-wrapped one: it is unsharded once).
    """
    lm = getattr(model, "lm", model)
    device = next(lm.parameters()).device
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    B = len(prompt_ids) * n_per_prompt
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(prompt_ids), P), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):                                          # left padding
        ids[i, P - len(p):] = torch.tensor(p, device=device)
        attn[i, P - len(p):] = 1
    pos = (attn.cumsum(1) - 1).clamp(min=0)                                     # (B, P) real positions
    G = n_per_prompt
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    with gathered(model):
        res = lm(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits = res.past_key_values, res.logits[:, -1]                  # (B/G, V)
        if G > 1:  # one prefill per prompt, its cache shared by the group
            cache.batch_repeat_interleave(G)
            logits, attn, pos = (x.repeat_interleave(G, dim=0) for x in (logits, attn, pos))
        next_pos = pos[:, -1] + 1                                               # (B,)
        for t in range(max_new_tokens):
            tok = sample_next(logits, temperature, top_p, greedy, generator)    # (B,)
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out[:, t] = tok
            mask[:, t] = (~done).long()
            done = done | torch.isin(tok, eos)
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, attn.new_ones(B, 1)], dim=1)  # finished rows: ignored downstream
            res = lm(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                     past_key_values=cache, use_cache=True)
            cache, logits = res.past_key_values, res.logits[:, -1]
            next_pos = next_pos + 1
    T = int(mask.sum(1).max().item()) if B else 0
    out, mask = out[:, :T], mask[:, :T]
    texts = []
    if tokenizer is not None:
        texts = [tokenizer.decode(out[i][mask[i].bool()].tolist(), skip_special_tokens=True) for i in range(B)]
    return Rollouts([list(p) for p in prompt_ids for _ in range(G)], out, mask, texts, done)
