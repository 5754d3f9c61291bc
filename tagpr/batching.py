"""Which records make each step's batch, and how they become tensors: epochs cut into (length-grouped or
stratified) batches, the stable held-out split, right padding, and packing into rows."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass
class GroupPack:
    """GSPO rows packed by prompt: one row per group, its prompt once and then each of its responses, each response
    attending to the prompt and to itself only (`mask`), its positions continuing the prompt's (`pos`)."""

    ids: torch.Tensor  # (R, L) token ids, right-padded
    mask: torch.Tensor  # (R, 1, L, L) bool: True where a query (row, dim 2) may attend a key (dim 3)
    pos: torch.Tensor  # (R, L) position ids
    hidden: torch.Tensor | None  # (R, L, H) the frozen trunk's output in the same layout, or None
    pick: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (packed row, packed position, target token) of every
    # scored token, in the order of the unpacked rows' response mask (row-major)


def group_pack(
    x: torch.Tensor, rmask: torch.Tensor, rows: Sequence[int], group: int, pad_id: int, trunk: torch.Tensor | None
) -> GroupPack:
    """Pack `rows` of a GSPO batch (x: (B, T) prompt + response ids, right-padded; rmask: (B, T − 1), position t
    scoring token t + 1; rows prompt-major, `group` per prompt) so that each prompt's tokens appear once.

    A response token's log-prob comes from the hidden state before it: its response's previous token, or, for its
    first token, the prompt's last (shared by the group's responses: its gradient sums over them). The scores equal
    the unpacked rows' to the summation order of attention over the extra masked keys."""
    device = x.device
    by_group: dict[int, list[int]] = {}
    for r in rows:
        by_group.setdefault(r // group, []).append(r)
    packs, picks = [], {}
    for members in by_group.values():
        prompt_len = int(rmask[members[0]].nonzero()[0]) + 1
        ids, pos, src = (
            x[members[0], :prompt_len].tolist(),
            list(range(prompt_len)),
            [(members[0], t) for t in range(prompt_len)],
        )
        spans = []
        for r in members:
            n = int(rmask[r].sum())
            start = len(ids)
            ids += x[r, prompt_len : prompt_len + n].tolist()
            pos += range(prompt_len, prompt_len + n)
            src += [(r, t) for t in range(prompt_len, prompt_len + n)]
            spans.append((start, n))
            # token i of the response is scored from packed position start + i − 1, the first from the prompt's last
            picks[r] = (
                len(packs),
                [prompt_len - 1] + list(range(start, start + n - 1)),
                x[r, prompt_len : prompt_len + n],
            )
        packs.append((ids, pos, src, prompt_len, spans))
    L = max(len(p[0]) for p in packs)
    R = len(packs)
    out_ids = torch.full((R, L), pad_id, dtype=torch.long, device=device)
    out_pos = torch.zeros((R, L), dtype=torch.long, device=device)
    mask = torch.zeros((R, 1, L, L), dtype=torch.bool, device=device)
    causal = torch.ones(L, L, dtype=torch.bool, device=device).tril()
    hidden = None if trunk is None else trunk.new_zeros(R, L, trunk.shape[-1])
    for i, (ids, pos, src, P, spans) in enumerate(packs):
        out_ids[i, : len(ids)] = torch.tensor(ids, device=device)
        out_pos[i, : len(pos)] = torch.tensor(pos, device=device)
        mask[i, 0, :P, :P] = causal[:P, :P]
        for start, n in spans:
            mask[i, 0, start : start + n, :P] = True
            mask[i, 0, start : start + n, start : start + n] = causal[:n, :n]
        pad = torch.arange(len(ids), L, device=device)
        mask[i, 0, pad, pad] = True  # a padding query sees itself: no empty softmax
        if hidden is not None:
            r_idx = torch.tensor([r for r, _ in src], device=device)
            t_idx = torch.tensor([t for _, t in src], device=device)
            hidden[i, : len(src)] = trunk[r_idx, t_idx]
    # the picks in the unpacked rows' order, row by row (that is the response mask's row-major order)
    row_i = torch.cat([torch.full((len(picks[r][1]),), picks[r][0], dtype=torch.long) for r in rows]).to(device)
    pos_i = torch.cat([torch.tensor(picks[r][1], dtype=torch.long) for r in rows]).to(device)
    tgt = torch.cat([picks[r][2] for r in rows]).to(device)
    return GroupPack(out_ids, mask, out_pos, hidden, (row_i, pos_i, tgt))
