"""The sampler: batched sampling with a KV cache (rollouts for GSPO, answers for evaluation).

Prompts are left-padded into one batch; the prefill computes logits for the last
position only (no [B, T, V] prompt logits); each decode step feeds one token per
sequence with explicit position ids and the growing attention mask. Sampling divides
the logits by the temperature (the training log-probs use the same scaling), then
applies top-p (nucleus) filtering; `greedy=True` takes the argmax (evaluation).
A sequence stops at its first EOS (kept, mask 1); after that it only receives pad
tokens with mask 0. After the prefill the KV cache moves into buffers sized for the
whole rollout (`preallocate`): each decode step writes its one new key/value in place
instead of concatenating the whole cache again (the concatenation was half of a decode
step's time on a CPU). Under FSDP2 the model is unsharded once for the whole rollout
phase and resharded after (`gathered`), not once per token.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.distributed.fsdp import FSDPModule
from transformers.cache_utils import DynamicLayer

from . import engine
from .hardware import autocast


@dataclass
class Rollouts:
    prompt_ids: list[list[int]]  # the prompts' tokens, unpadded
    response_ids: torch.Tensor  # (B, T) right-padded, EOS included when reached
    response_mask: torch.Tensor  # (B, T) 1 on generated tokens up to and including the first EOS
    texts: list[str]  # decoded responses, EOS and special tokens dropped
    finished: torch.Tensor  # (B,) reached EOS before max_new_tokens
    # with `keep_layers`: the residual stream after that many layers, as the sampler computed it: the prompts'
    # (B/G, P, hidden), left-padded like the prompt batch, and the responses' (B, T, hidden); a response's last
    # token is never fed back, so its row there is 0. None on the transformers fallback path.
    prompt_hidden: torch.Tensor | None = None
    response_hidden: torch.Tensor | None = None
    # with `logprobs=True`: (B, T) fp32 log-probability of each generated token under the full softmax at the
    # sampling temperature (top-p aside: what the training log-probs compute), 0 after the row stopped
    logprobs: torch.Tensor | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask.sum(1)

    def kept_rows(self, T: int) -> torch.Tensor | None:
        """The kept hidden states laid out like the training batch: row b = prompt b then its response
        (up to and including EOS), right-padded with zeros to T: (B, T, hidden). None if none were kept."""
        if self.prompt_hidden is None or self.response_hidden is None:
            return None
        B, G = len(self.prompt_ids), len(self.prompt_ids) // self.prompt_hidden.shape[0]
        P = self.prompt_hidden.shape[1]
        out = self.response_hidden.new_zeros(B, T, self.response_hidden.shape[-1])
        for b, (p, n) in enumerate(zip(self.prompt_ids, self.lengths.tolist())):
            out[b, : len(p)] = self.prompt_hidden[b // G, P - len(p) :]
            out[b, len(p) : len(p) + n] = self.response_hidden[b, :n]
        return out


@contextlib.contextmanager
def gathered(model):
    """Unshard every FSDP2 unit once for a whole generation phase; reshard after. No-op without FSDP."""
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()


class PreallocatedLayer(DynamicLayer):
    """One attention layer's KV cache in a buffer of fixed capacity, filled in place.

    A transformers cache layer: `update` writes the new states after the filled part
    and returns views of everything filled so far (no copy); the sequence length and
    mask sizes are the filled length.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        super().__init__()
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True
        B, H, L, D = keys.shape
        self._k = keys.new_empty(B, H, capacity, D)
        self._v = values.new_empty(B, values.shape[1], capacity, values.shape[-1])
        self._k[:, :, :L] = keys
        self._v[:, :, :L] = values
        self.length = L
        self.keys, self.values = self._k[:, :, :L], self._v[:, :, :L]

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self.length + n > self._k.shape[2]:
            raise RuntimeError(f"KV cache capacity {self._k.shape[2]} exceeded")
        self._k[:, :, self.length : self.length + n] = key_states
        self._v[:, :, self.length : self.length + n] = value_states
        self.length += n
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self._k.shape[2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


def preallocate(cache, extra: int) -> None:
    """Move a transformers DynamicCache filled by a prefill into buffers `extra` tokens longer, in place."""
    for i, layer in enumerate(getattr(cache, "layers", ())):
        cache.layers[i] = PreallocatedLayer(layer.keys, layer.values, layer.keys.shape[-2] + extra)


def uniforms(
    n_rows: int, n: int, generator: torch.Generator | Sequence[torch.Generator] | None = None, device=None
) -> torch.Tensor:
    """(n_rows, n) uniforms in [0, 1): from one generator for all rows, or row i from generator[i] alone."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != n_rows:
            raise ValueError(f"{len(generator)} generators for {n_rows} rows")
        return torch.stack([torch.rand(n, generator=g) for g in generator]).to(device)
    return torch.rand(n_rows, n, generator=generator).to(device)


NUCLEUS_WIDTHS = (256, 4096)  # see `nucleus`; () = always the full sort (bench/rollout.py --top-p compares)


def nucleus(probs: torch.Tensor, top_p: float, widths: Sequence[int] | None = None) -> torch.Tensor:
    """probs (B, V) with every token outside its row's nucleus set to 0. The nucleus: the tokens sorted by
    probability, kept while the mass before them is ≤ `top_p` (the smallest prefix whose mass reaches
    top_p), and every token exactly as probable as the last one kept — so the set does not depend on how
    a sort orders equal probabilities, which bf16 logits produce often.

    A language model's nucleus is usually a few dozen tokens, so it is looked for among each row's
    `widths[0]` most probable tokens first (a partial selection, `topk`; default `NUCLEUS_WIDTHS`), then
    `widths[1]`, and only then in a full sort of the vocabulary, which is most of a CPU decode step's
    time (bench/README.md, top-p). A width is used when, for every row, the mass of its top tokens
    exceeds `top_p`: every token beyond them then has more than `top_p` before it, so the cut-off
    probability, and with it the set, is the one the full sort gives.
    """
    for k in [w for w in (NUCLEUS_WIDTHS if widths is None else widths) if w < probs.shape[-1]]:
        top = probs.topk(k, dim=-1).values  # (B, k), descending
        mass = top.cumsum(-1)
        if bool((mass[:, -1] > top_p).all()):
            break
    else:  # some row's nucleus is wider than every width
        top = probs.sort(dim=-1, descending=True).values  # (B, V)
        mass = top.cumsum(-1)
    floor = top.masked_fill(mass - top > top_p, float("inf")).amin(-1)  # (B,) the last kept probability
    return probs.masked_fill(probs < floor[:, None], 0.0)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool | torch.Tensor = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    u: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits (B, V) → next tokens (B,).

    Inverse-CDF sampling: one uniform u per row (given, or drawn by `uniforms` from
    `generator` — one for the batch, or one per row so that a row's draws never depend
    on which other rows share its batch or rank); the token is the first whose
    cumulative probability exceeds u · total, so a zero-probability token (cut by
    top-p) is never drawn. One uniform per row rather than `multinomial`'s exponential
    draw per vocabulary entry, which was a sixth of a CPU decode step. The fp32 prefix
    sum over 49k entries moves each token's share by ~1e-6 at most. `greedy` a (B,) bool tensor: those rows
    take the argmax, the others sample.
    """
    if isinstance(greedy, torch.Tensor):  # mixed rows (`generate` turns all-or-none flags into a bool)
        if u is None:  # every row's uniform, as if all sampled: a row's draw does not depend on the flags
            u = uniforms(logits.shape[0], 1, generator, logits.device)[:, 0]
        tok = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
        rows, others = greedy.nonzero().squeeze(1), (~greedy).nonzero().squeeze(1)
        if len(others):  # the vocabulary-wide softmax for the sampled rows only
            tok[others] = sample_next(logits[others], temperature, top_p, False, u=u[others])
        if len(rows):  # their argmax in fp32: a bf16 argmax over 49k entries
            tok[rows] = logits[rows].float().argmax(-1)  # is ~2× slower on a CPU
        return tok
    if greedy or temperature == 0:
        return logits.float().argmax(-1)
    x = logits.float()
    probs = torch.softmax(x if temperature == 1.0 else x / temperature, dim=-1)  # (B, V)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    if u is None:
        u = uniforms(probs.shape[0], 1, generator, probs.device)[:, 0]
    cdf = probs.cumsum(-1)
    tok = torch.searchsorted(cdf, (u.to(cdf.dtype) * cdf[:, -1])[:, None], right=True).squeeze(-1)
    tok = tok.clamp(max=probs.shape[1] - 1)
    bad = probs.gather(1, tok[:, None]).squeeze(1) == 0  # u · total rounded to the top
    return torch.where(bad, probs.argmax(-1), tok) if bool(bad.any()) else tok  # (rare: skip the argmax pass)


def chosen_logprobs(logits: torch.Tensor, tok: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits (B, V), the tokens chosen from them (B,) → (B,) fp32 log π(tok) under softmax(logits / T), as
    `LogprobModel` computes it for training (T = 0, greedy: T = 1)."""
    x = logits.float()
    if temperature not in (0.0, 1.0):
        x = x / temperature
    return x.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(x, dim=-1)


class _Transformers:
    """The fallback path for models `tagpr.engine` does not cover: transformers' own forward and cache."""

    prompt_hidden = response_hidden = None  # keeping hidden states is the engine's alone
    compacts = False  # every step computes every row

    def __init__(self, lm, segments, pad_id, max_new_tokens, precision, keep=0, trunk=None):
        prompts = [p for ps, _ in segments for p in ps]
        ids, attn, pos = left_pad(prompts, pad_id, next(lm.parameters()).device)
        self.amp = lambda: autocast(ids.device, precision)  # transformers' forward takes the precision from autocast
        with self.amp():
            res = lm(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        self.lm, self.cache, self.logits = lm, res.past_key_values, res.logits[:, -1]  # (prompts, V)
        self.next_pos = pos[:, -1] + 1
        if len(segments) > 1:  # groups of several sizes: each prompt's rows
            sizes = torch.tensor([G for ps, G in segments for _ in ps], device=ids.device)
            rows = torch.arange(len(prompts), device=ids.device).repeat_interleave(sizes)
            self.cache.batch_select_indices(rows)
            attn = attn[rows]
        elif segments[0][1] > 1:
            self.cache.batch_repeat_interleave(segments[0][1])
            attn = attn.repeat_interleave(segments[0][1], dim=0)
        preallocate(self.cache, max_new_tokens)
        self.attn = torch.cat([attn, attn.new_ones(attn.shape[0], max_new_tokens)], dim=1)
        self.P = ids.shape[1]

    def step(self, tok, pos, t, active=None):
        with self.amp():
            res = self.lm(
                input_ids=tok[:, None],
                attention_mask=self.attn[:, : self.P + t + 1],
                position_ids=pos[:, None],
                past_key_values=self.cache,
                use_cache=True,
            )
        self.cache = res.past_key_values
        return res.logits[:, -1]


class _Engine:
    """`tagpr.engine`: the group's prompt cached once, one shared preallocated buffer per prompt, rotary on q/k
    together. Groups of several sizes: one prefill and cache per run of equal sizes, one decode loop
    (`engine.Segments`)."""

    compacts = True  # a step can compute only the rows still generating

    def __init__(self, lm, segments, pad_id, max_new_tokens, precision, keep=0, trunk=None):
        self.lm = lm
        device = next(lm.parameters()).device
        dtype = torch.bfloat16 if precision == "bf16" else next(lm.parameters()).dtype
        self.weights = engine.Weights(lm, dtype, fuse=device.type == "cpu")
        logits, caches, next_pos = [], [], []
        for prompts, G in segments:
            ids, attn, pos = left_pad(prompts, pad_id, device)
            lg, prefix, self.prompt_hidden = engine.prefill(lm, self.weights, ids, attn, pos, keep, trunk)
            logits.append(lg)
            next_pos.append(pos[:, -1] + 1)
            caches.append(engine.GroupCache(prefix, attn, G, max_new_tokens, keep, lm.config.hidden_size))
        self.logits, self.next_pos = torch.cat(logits), torch.cat(next_pos)
        self.cache = caches[0] if len(caches) == 1 else engine.Segments(caches)
        self.response_hidden = self.cache.kept

    def step(self, tok, pos, t, active=None):
        return engine.decode_step(self.lm, self.weights, tok, pos, self.cache, active)


def left_pad(prompt_ids: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Prompts → ids, attention mask and position ids (B, P), left-padded: every prompt ends at column P − 1,
    and its positions count its own tokens from 0."""
    P = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), P), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros((len(prompt_ids), P), dtype=torch.long, device=device)
    for i, p in enumerate(prompt_ids):
        ids[i, P - len(p) :] = torch.tensor(p, device=device)
        attn[i, P - len(p) :] = 1
    return ids, attn, (attn.cumsum(1) - 1).clamp(min=0)


@torch.no_grad()
def generate(
    model,
    prompt_ids: Sequence[Sequence[int]],
    eos_id: int | Sequence[int],
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool | Sequence[bool] = False,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    tokenizer=None,
    n_per_prompt: int | Sequence[int] = 1,
    precision: str = "fp32",
    keep_layers: int = 0,
    logprobs: bool = False,
    compact: bool = True,
    trunk: engine.TrunkStore | None = None,
    batch_rows: int = 0,
    wave: int = 1,
) -> Rollouts:
    """Sample `n_per_prompt` responses per prompt (a GSPO group), rows prompt-major. `n_per_prompt` may also give
    each prompt its own count (e.g. a held-out set's 1 + k rows and a control set's 1, in one decode loop).

    Each prompt is prefilled once and the group shares its keys/values (see
    `tagpr.engine`; models outside the Llama family take transformers' forward with the
    cache repeated per row). `generator`: one for the batch, or one per output row (see
    `sample_next`). `precision="bf16"` runs the matmuls under bf16 autocast (attention
    and sampling stay fp32). `model` is a transformers causal LM (or an FSDP2-wrapped
    one: it is unsharded once). `keep_layers` > 0: also return the residual stream after
    that many layers (see `Rollouts`; GSPO's frozen-trunk cache takes it from here).
    `greedy`: every row, or one flag per output row (e.g. one greedy answer and k samples
    from one prefill); `generator` then still has one entry per row, greedy rows' unused. `logprobs`: also
    return each token's log-probability at `temperature` (see `Rollouts`; GSPO's `--old-logp sampler`).
    `compact` (the engine's path): once some rows have stopped, a step computes only the others (a batch no
    longer pays for its finished rows until its slowest one stops); their tokens and log-probs are the same
    up to the summation order of a smaller matmul. `trunk` (the engine's path; the fallback ignores it): take the
    prompts' bottom layers from that store, or write them there (`engine.TrunkStore`).
    `batch_rows` > 0 (the engine's path, without `keep_layers`): continuous batching. At most that many rows
    decode at once; when rows stop, the next `wave` waiting prompts, once their groups fit the freed rows, are
    prefilled together and join the next step (`_continuous`; fixed waves keep `trunk`'s keys those of the same
    prompts' chunked calls). Every row's tokens are the one-batch run's for the same per-row generators, up to
    the summation order of other batch shapes (tested). 0: every row from the first step.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, not {precision!r}")
    lm = getattr(model, "lm", model)
    device = next(lm.parameters()).device
    eos = torch.tensor([eos_id] if isinstance(eos_id, int) else list(eos_id), device=device)
    sizes = [n_per_prompt] * len(prompt_ids) if isinstance(n_per_prompt, int) else list(n_per_prompt)
    if len(sizes) != len(prompt_ids) or min(sizes, default=1) < 1:
        raise ValueError(f"n_per_prompt: {len(sizes)} counts for {len(prompt_ids)} prompts, each at least 1")
    # runs of prompts with equal counts: [(prompts, G)]
    segments = [([prompt_ids[p] for p in run], sizes[run[0]]) for run in equal_runs(range(len(sizes)), sizes)]
    if keep_layers and len(segments) > 1:
        raise ValueError("keep_layers needs one group size for every prompt")
    B = sum(sizes)
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, max_new_tokens), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    lp = torch.zeros((B, max_new_tokens), dtype=torch.float32, device=device) if logprobs else None
    if not isinstance(greedy, bool):
        if len(greedy) != B:
            raise ValueError(f"{len(greedy)} greedy flags for {B} rows")
        flags = list(map(bool, greedy))  # one kind for every row: a plain flag, no per-step row selection
        greedy = flags[0] if len(set(flags)) == 1 else torch.tensor(flags, dtype=torch.bool, device=device)
    sampled = temperature != 0 and (isinstance(greedy, torch.Tensor) or not greedy)
    U = uniforms(B, max_new_tokens, generator, device) if sampled else None  # every draw up front
    if batch_rows and B > batch_rows and engine.supported(lm):
        if keep_layers:
            raise ValueError("batch_rows (continuous batching) and keep_layers together are not supported")
        flags = greedy if isinstance(greedy, torch.Tensor) else torch.full((B,), bool(greedy), device=device)
        with gathered(model), torch.autocast(device.type, enabled=False):
            state = (out, mask, done, lp)
            args = (eos, pad_id, temperature, top_p, precision, trunk, batch_rows, wave)
            _continuous(lm, prompt_ids, sizes, state, flags, U, *args)
        return _finish(out, mask, done, lp, prompt_ids, sizes, tokenizer, None, None)
    with gathered(model), torch.autocast(device.type, enabled=False):  # `precision` decides, not a caller's autocast
        runner = (_Engine if engine.supported(lm) else _Transformers)(
            lm, segments, pad_id, max_new_tokens, precision, keep_layers, trunk
        )
        rep = torch.tensor(sizes, device=device)
        logits = runner.logits.repeat_interleave(rep, dim=0) if B > len(sizes) else runner.logits  # (B, V)
        next_pos = runner.next_pos.repeat_interleave(rep)  # (B,)
        # the rows still generating, once some have stopped (None: every row); only they are sampled, and
        # `logits` holds theirs alone: a step's softmax and prefix sum over the vocabulary cost what its
        # live rows cost, not what the batch costs
        live, g = None, greedy  # g: the live rows' greedy flags
        for t in range(max_new_tokens):
            u = (U[:, t] if live is None else U[live, t]) if sampled else None
            picked = sample_next(logits, temperature, top_p, g, u=u)  # (live rows,)
            tok = (
                picked
                if live is None
                else torch.full((B,), pad_id, dtype=picked.dtype, device=device).index_copy_(0, live, picked)
            )
            out[:, t] = tok
            mask[:, t] = (~done).long()
            if lp is not None:
                lp[(slice(None) if live is None else live), t] = chosen_logprobs(logits, picked, temperature)
            done = done | torch.isin(tok, eos)
            stopped = int(done.sum())  # one read of the flags a step
            if stopped == B or t == max_new_tokens - 1:
                break
            if not stopped:
                logits = runner.step(tok, next_pos, t)
            else:
                live = (~done).nonzero().squeeze(1)
                g = greedy[live] if isinstance(greedy, torch.Tensor) else greedy
                logits = (
                    runner.step(tok, next_pos, t, live)
                    if compact and runner.compacts
                    else runner.step(tok, next_pos, t)[live]
                )  # a stopped row's token is pad
            next_pos = next_pos + 1
    return _finish(out, mask, done, lp, prompt_ids, sizes, tokenizer, runner.prompt_hidden, runner.response_hidden)


def _finish(out, mask, done, lp, prompt_ids, sizes, tokenizer, prompt_hidden, response_hidden) -> Rollouts:
    """The decode loop's buffers cut to the longest response, with the texts."""
    B = out.shape[0]
    T = int(mask.sum(1).max().item()) if B else 0
    out, mask = out[:, :T], mask[:, :T]
    lp = lp[:, :T] if lp is not None else None
    texts = []
    if tokenizer is not None:
        texts = [tokenizer.decode(out[i][mask[i].bool()].tolist(), skip_special_tokens=True) for i in range(B)]
    kept = response_hidden[:, :T] if response_hidden is not None else None
    return Rollouts(
        [list(p) for p, G in zip(prompt_ids, sizes) for _ in range(G)], out, mask, texts, done, prompt_hidden, kept, lp
    )


def equal_runs(indices, sizes) -> list[list[int]]:
    """`indices` cut into runs of consecutive ones whose `sizes` are equal (one prefill and cache per run)."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and sizes[runs[-1][0]] == sizes[i]:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _continuous(
    lm, prompt_ids, sizes, state, greedy, U, eos, pad_id, temperature, top_p, precision, trunk, limit, wave
):
    """Continuous batching on the engine's path: prompts wait in order, in waves of `wave`; whenever the rows still
    generating leave room for the next wave's groups (at most `limit` rows; a wave alone is always admitted), its
    prompts are prefilled together, as one segment of `engine.Segments` per run of equal group sizes, and join the
    decode loop at their own step 0. A segment leaves once its rows have stopped. Each row samples with its own
    uniforms at its own step, so its tokens do not depend on what shares its batch. `state`: generate's (out,
    mask, done, logprobs) buffers, filled here."""
    out, mask, done, lp = state
    device = out.device
    T = out.shape[1]
    dtype = torch.bfloat16 if precision == "bf16" else next(lm.parameters()).dtype
    W = engine.Weights(lm, dtype, fuse=device.type == "cpu")
    first = [0]
    for G in sizes:
        first.append(first[-1] + G)
    P = len(prompt_ids)
    waves = [list(range(a, min(P, a + wave))) for a in range(0, P, wave)][::-1]  # popped from the end: in order
    segs: list[dict] = []  # each: cache, rows (global ids), step, logits of its live rows, next positions
    while waves or segs:
        live = sum(int((~done[s["rows"]]).sum()) for s in segs)
        admit = []
        while waves and (live == 0 and not admit or live + sum(sizes[p] for p in admit + waves[-1]) <= limit):
            admit += waves.pop()
        for run in equal_runs(admit, sizes):  # one cache per run of equal group size
            G = sizes[run[0]]
            ids, attn, pos = left_pad([prompt_ids[p] for p in run], pad_id, device)
            lg, prefix, _ = engine.prefill(lm, W, ids, attn, pos, 0, trunk)
            rows = torch.tensor([first[p] + j for p in run for j in range(G)], device=device)
            segs.append(
                dict(
                    cache=engine.GroupCache(prefix, attn, G, T),
                    rows=rows,
                    step=0,
                    logits=lg.repeat_interleave(G, dim=0) if G > 1 else lg,
                    pos=(pos[:, -1] + 1).repeat_interleave(G),
                )
            )
        # one sampling over every live row, each at its own segment's step
        alive = [s["rows"][~done[s["rows"]]] for s in segs]
        live_rows = torch.cat(alive)
        steps = torch.cat([torch.full((len(r),), s["step"], device=device) for s, r in zip(segs, alive)])
        logits = torch.cat([s["logits"] for s in segs])
        u = U[live_rows, steps] if U is not None else None
        g = greedy[live_rows]
        g = bool(g[0]) if bool((g == g[0]).all()) else g
        picked = sample_next(logits, temperature, top_p, g, u=u)
        out[live_rows, steps] = picked
        mask[live_rows, steps] = 1
        if lp is not None:
            lp[live_rows, steps] = chosen_logprobs(logits, picked, temperature)
        done[live_rows] |= torch.isin(picked, eos)
        tok = torch.full((out.shape[0],), pad_id, dtype=torch.long, device=device)
        tok[live_rows] = picked
        # segments whose rows all stopped, or that reached the token cap, leave
        segs = [s for s in segs if not bool(done[s["rows"]].all()) and s["step"] < T - 1]
        if not segs:
            continue
        rows = torch.cat([s["rows"] for s in segs])  # the caches' rows, in order
        active = (~done[rows]).nonzero().squeeze(1)
        pos = torch.cat([s["pos"] for s in segs])
        new = engine.decode_step(lm, W, tok[rows], pos, engine.Segments([s["cache"] for s in segs]), active)
        a = 0
        for s in segs:
            n = int((~done[s["rows"]]).sum())  # this step's stops included
            s["logits"], a = new[a : a + n], a + n
            s["step"] += 1
            s["pos"] = s["pos"] + 1
