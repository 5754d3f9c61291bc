"""The training skeleton the trainers share: the start, the LR schedule, FSDP-safe micro-batches, the backward, the
optimizer step, and the reduction of per-micro-batch metrics over ranks.

FSDP's collectives (the all-gathers of a forward, the reduce-scatters of a backward) must run the same number
of times on every rank. A rank with fewer rows than another therefore still runs as many micro-batches: an
empty one runs one row with its loss multiplied by 0 (`fsdp_micro_batches` says which are real). Losses are
divided by global counts (see `tagpr.losses`), and the backward multiplies by the world size because FSDP
averages gradients over ranks: the sum over ranks is what the global denominator asks for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from . import config, dist, synthetic
from .files import check_out, write_jsonl
from .hardware import keep_freed_memory, resolve_precision


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine down to `min_ratio·peak` at `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def begin(cls, presets: dict, argv, doc: str | None):
    """The start of every trainer: the allocator setting, the config from the command line, the process group,
    the precision (checked before any work: a CPU may not take bf16) and the seed. → (cfg, preset, dist, precision)."""
    keep_freed_memory()
    cfg, preset = config.parse(cls, presets, argv, description=doc)
    check_out(cfg.out)
    d = dist.init()
    precision = resolve_precision(getattr(cfg, "precision", "fp32"), d.device)
    torch.manual_seed(cfg.seed)
    return cfg, preset, d, precision


def synthetic_fallback(made: Path, lamp_dir: Path, seed: int, sizes: dict, rows: Callable[[Path], list]) -> Path:
    """A trainer's data when the user gave none: synthetic users generated into `lamp_dir` and `rows(lamp_dir)`
    (records with `to_json`) written to `made`, once, by rank 0 (the other ranks wait). → `made`."""
    if dist.get().is_main and not made.is_file():
        synthetic.generate(lamp_dir, seed=seed, sizes=sizes)
        write_jsonl(made, [r.to_json() for r in rows(lamp_dir)])
    dist.barrier()
    return made


def fsdp_micro_batches(rows: list[int], micro: int) -> Iterator[tuple[list[int], bool]]:
    """(rows to run, real) per micro-batch of `rows`; padded with (`[0]`, False) up to the largest count over the
    ranks, so every rank runs the same number of forwards and backwards."""
    chunks = [rows[a : a + micro] for a in range(0, len(rows), micro)]
    n = int(dist.all_reduce(torch.tensor(len(chunks)), "max").item())
    for chunk in chunks + [[] for _ in range(n - len(chunks))]:
        yield (chunk or [0]), bool(chunk)


def backward(loss: torch.Tensor, real: bool, world_size: int) -> torch.Tensor:
    """The backward of one micro-batch's loss (already divided by the global count); a padding micro-batch's is
    zeroed, so it moves nothing but keeps the collectives in step. → the loss as counted (0 for padding)."""
    if not real:
        loss = loss * 0.0
    (loss * world_size).backward()
    return loss


def grad_norm_and_clip(params, max_norm: float) -> float:
    """The global gradient norm (over shards and ranks), after clipping it to `max_norm` (≤ 0: no clipping)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


def optimizer_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, lr: float | list[float], grad_clip: float
) -> float:
    """Clip, set the learning rate (one value, or one per parameter group), step, zero the gradients. → the
    gradient norm before clipping."""
    gnorm = grad_norm_and_clip(model.parameters(), grad_clip)
    for g, v in zip(opt.param_groups, lr if isinstance(lr, list) else [lr] * len(opt.param_groups)):
        g["lr"] = v
    opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm


def accumulate(stats: dict[str, float], metrics: dict, reduce: dict[str, str], weight: float) -> None:
    """Fold one micro-batch's `metrics` into this rank's `stats`, each as `reduce` declares it: "sum", "min",
    "max", or "mean" (weighted by the micro-batch's share `weight` of the global count). Metrics `reduce` does
    not name are not kept."""
    for key, v in metrics.items():
        how = reduce.get(key)
        if how == "sum":
            stats[key] = stats.get(key, 0.0) + float(v)
        elif how == "mean":
            stats[key] = stats.get(key, 0.0) + weight * float(v)
        elif how == "min":
            stats[key] = min(stats.get(key, math.inf), float(v))
        elif how == "max":
            stats[key] = max(stats.get(key, -math.inf), float(v))


def reduce_across_ranks(stats: dict[str, float], names: list[str], reduce: dict[str, str]) -> dict[str, float]:
    """`names` of every rank's `stats` combined (collectives: call with the same names on every rank): sums and
    weighted means add up; min / max take the extreme (in fp32)."""
    out = {}
    for n in names:
        how = reduce[n]
        if how in ("sum", "mean"):
            out[n] = dist.sum_scalar(stats.get(n, 0.0))
        else:
            start = math.inf if how == "min" else -math.inf
            out[n] = dist.all_reduce(torch.tensor(stats.get(n, start)), how).item()
    return out
