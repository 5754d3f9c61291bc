"""Which records make each step's batch, and how they become tensors: epochs cut into (length-grouped or
stratified) batches, the stable held-out split, right padding, and packing into rows."""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch


def epoch_batches(
    lengths: Sequence[int], batch: int, epoch: int, seed: int, group_by_length: bool = True, window: int = 8
) -> list[list[int]]:
    """Indices of one epoch, cut into global batches; deterministic in (seed, epoch).

    Length grouping: shuffle, then sort by length inside windows of `window` batches and
    cut, so a batch holds similar lengths (less padding); the batch order is shuffled again.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if group_by_length:
        w = batch * window
        order = [i for a in range(0, len(order), w) for i in sorted(order[a : a + w], key=lambda i: -lengths[i])]
    batches = [order[a : a + batch] for a in range(0, len(order), batch)]
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
    return [order[a : a + batch] for a in range(0, len(order), batch)]


def held_out(record_id: str, frac: float) -> bool:
    """A stable train / held-out split by id: the same records are held out on every run and rank."""
    return zlib.crc32(record_id.encode()) % 10_000 < frac * 10_000


def pad_batch(
    seqs: Sequence[Sequence[int]], masks: Sequence[Sequence[int]], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad → input_ids (B, T), attention_mask (B, T), loss_mask (B, T − 1) aligned with
    next-token log-probs (position t scores token t + 1)."""
    T = max(2, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    tgt = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        tgt[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
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


def packed_batch(
    rows: Sequence[Sequence[int]], seqs, masks, pad_id: int, device
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
            ids[r, at : at + n] = torch.tensor(seqs[i])
            pos[r, at : at + n] = torch.arange(n)
            tgt[r, at : at + n] = torch.tensor(masks[i], dtype=torch.bool)
            at += n
        pos[r, at:] = torch.arange(T - at)  # the padded tail is its own segment, never a target
    return ids.to(device), pos.to(device), tgt[:, 1:].to(device)
