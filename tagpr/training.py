"""What every trainer shares: the LR schedule, batching, the metrics log, parameter counts, resume."""
from __future__ import annotations

import json
import math
import os
import zlib
from pathlib import Path
from typing import Sequence

import torch

from . import checkpoint, dist
from .models import base_model, decoder_layers
from .config import ConfigError
from .files import write_json


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine down to `min_ratio·peak` at `total`."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_batches(lengths: Sequence[int], batch: int, epoch: int, seed: int, group_by_length: bool = True,
                  window: int = 8) -> list[list[int]]:
    """Indices of one epoch, cut into global batches; deterministic in (seed, epoch).

    Length grouping: shuffle, then sort by length inside windows of `window` batches and
    cut, so a batch holds similar lengths (less padding); the batch order is shuffled again.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        w = batch * window
        order = [i for a in range(0, len(order), w) for i in sorted(order[a:a + w], key=lambda i: -lengths[i])]
    batches = [order[a:a + batch] for a in range(0, len(order), batch)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def stratified_batches(keys: Sequence[str], batch: int, epoch: int, seed: int) -> list[list[int]]:
    """Indices of one epoch cut into batches in which every class of `keys` has about its share of the data
    (B·n_c/N of a batch of B, for a class with n_c of the N items).

    Systematic sampling: class c's members, shuffled, sit at positions (i + u_c)/n_c, i = 0 … n_c − 1, with one
    random offset u_c ∈ [0, 1) per class; the epoch is every item sorted by position. Each class is thus spread
    evenly over the epoch: with two classes a full batch holds ⌊B·n_c/N⌋ or ⌈B·n_c/N⌉ of each, with more classes a
    class can miss its share by a little more (under 1.5 for three, ~2 for five, measured). Deterministic in
    (seed, epoch).
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    classes: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        classes.setdefault(k, []).append(i)
    placed = []
    for k in sorted(classes):
        members = [classes[k][j] for j in torch.randperm(len(classes[k]), generator=g).tolist()]
        u, *ties = torch.rand(len(members) + 1, generator=g).tolist()  # the offset, then a tie-break per member
        placed += [((i + u) / len(members), t, m) for i, (m, t) in enumerate(zip(members, ties))]
    order = [m for _, _, m in sorted(placed)]  # ties between classes broken at random
    return [order[a:a + batch] for a in range(0, len(order), batch)]


def pad_batch(seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int, device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad → input_ids (B, T), attention_mask (B, T), loss_mask (B, T − 1) aligned with
    next-token log-probs (position t scores token t + 1)."""
    T = max(2, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    tgt = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, :len(s)] = torch.tensor(s)
        attn[i, :len(s)] = 1
        tgt[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), attn.to(device), tgt[:, 1:].to(device)


def pack_rows(indices: Sequence[int], lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """First-fit decreasing: group sequences into rows of at most `max_len` tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


def packed_batch(rows: Sequence[Sequence[int]], seqs, masks, pad_id: int, device
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of concatenated sequences → input_ids (R, T), position_ids (R, T) restarting at 0 for
    every sequence (transformers then keeps attention inside each one: varlen flash-attention,
    or a block-diagonal mask), loss_mask (R, T − 1). The step from one sequence's last token to
    the next one's first is never a target: every sequence starts with prompt tokens (mask 0)."""
    T = max(2, max(sum(len(seqs[i]) for i in row) for row in rows))
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), T), dtype=torch.long)
    tgt = torch.zeros((len(rows), T), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(seqs[i])
            ids[r, at:at + n] = torch.tensor(seqs[i])
            pos[r, at:at + n] = torch.arange(n)
            tgt[r, at:at + n] = torch.tensor(masks[i], dtype=torch.bool)
            at += n
        pos[r, at:] = torch.arange(T - at)  # the padded tail is its own segment, never a target
    return ids.to(device), pos.to(device), tgt[:, 1:].to(device)


REPORT_TO = ("none", "tensorboard")


def tensorboard_writer(log_dir: str | os.PathLike, resume_step: int | None):
    """A TensorBoard event writer; after a resume, events past the resumed step are dropped on reading."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: the `tensorboard` extra
    except ImportError:
        raise ConfigError("--report-to tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'"
                          ) from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)


class MetricsLog:
    """`metrics.jsonl` (or any JSONL of objects with a `step`), written by rank 0. On resume, lines
    after the resumed step are dropped so the file reads as one uninterrupted run. With `tensorboard`
    (a folder), every number of every row is mirrored as a scalar of the same name at its step, and
    flushed at once, so `tensorboard --logdir` shows the run live."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None,
                 tensorboard: str | os.PathLike | None = None):
        self.path = Path(path)
        self.main = dist.get().is_main
        self.tb = None
        if not self.main:
            return
        if tensorboard:
            self.tb = tensorboard_writer(tensorboard, resume_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in keep))

    def write(self, row: dict) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[dict]) -> None:
        """Several objects (each with its `step`) in one append."""
        if self.main and rows:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
            if self.tb is not None:
                for r in rows:
                    for k, v in r.items():
                        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                            self.tb.add_scalar(k, v, r["step"])
                self.tb.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        """A text panel (markdown) at `step` in TensorBoard; nothing without it."""
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
            self.tb.flush()


def train_top_layers(model, n: int) -> tuple[int, int]:
    """Freeze everything but the top `n` decoder layers and the final norm (n < 0: train everything).

    The embeddings (and an lm_head tied to them) stay frozen; autograd stops below the
    lowest trainable layer, so a step's backward covers only the top. Returns (trainable,
    total) parameter counts.
    """

    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    if n < 0:
        return total, total
    layers = decoder_layers(model)
    if n > len(layers):
        raise ValueError(f"--train-layers {n}: the model has {len(layers)} decoder layers")
    for p in params:
        p.requires_grad_(False)
    keep = layers[len(layers) - n:] if n else []
    norm = getattr(base_model(model), "norm", None)
    for m in keep + ([norm] if norm is not None and n else []):
        for p in m.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in params if p.requires_grad), total




def held_out(record_id: str, frac: float) -> bool:
    """A stable train / held-out split by id: the same records are held out on every run and rank."""
    return zlib.crc32(record_id.encode()) % 10_000 < frac * 10_000


def start_run(out: Path, resume: str, model, optimizer, resolved: dict, report_to: str = "none"
              ) -> tuple[int, MetricsLog]:
    """Write `<out>/config.json`, restore the checkpoint `resume` names ("auto": the latest in
    `<out>/ckpt`, "": none, else a path) and open `metrics.jsonl` (mirrored into `<out>/tensorboard`
    with `report_to` "tensorboard"). Returns (start step, log)."""
    if dist.get().is_main:
        write_json(out / "config.json", resolved)
    ckpt = None
    if resume:
        ckpt = checkpoint.latest(out / "ckpt") if resume == "auto" else Path(resume)
    start = 0
    if ckpt is not None:
        start = checkpoint.load(ckpt, model, optimizer)["step"]
        dist.print0(f"resumed from {ckpt} at step {start}")
    return start, MetricsLog(out / "metrics.jsonl", resume_step=start if ckpt is not None else None,
                             tensorboard=out / "tensorboard" if report_to == "tensorboard" else None)
