"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO", §3.2): a group whose verifiable reward is the same on every
rollout (all right or all wrong) says nothing about the decision, so it leaves the rollout batch and fresh
prompts, sampled in more rounds, take its place until the batch holds `global_batch` groups that do.

The pieces here are the ones that need no model: cutting a scored rollout batch into `Group`s (picklable, so
the ranks can trade them), telling which are informative, choosing the batch, and joining the chosen groups back
into the sampler's `Rollouts` layout. `train_rl.refill` runs the rounds.

What is informative: the verifiable reward R_v (accuracy, or the generation metric) takes at least two values
among the group's rollouts that count (all of them; with `--overlong mask` the finished ones, of which there
must be two). The composite reward's other terms (R_p, R_rep, R_tag) differ between almost any two texts, so
a group that is flat in R_v still has advantages there: dynamic sampling drops them with the group, as DAPO does
with everything but its accuracy reward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tagpr.records import RLPrompt
from tagpr.sampler import Rollouts


@dataclass
class Group:
    """One prompt's G rollouts and their scores: what a step needs of them after scoring."""

    prompt: RLPrompt
    prompt_ids: list[int]
    responses: list[list[int]]  # each rollout's generated tokens (EOS included where reached)
    texts: list[str]
    finished: list[bool]
    logprobs: list[list[float]] | None  # the sampler's log-prob of each generated token, or None
    # the sampler's kept residual stream (`keep_layers`), on the CPU so ranks can trade it: the prompt's
    # (len(prompt_ids), hidden) and each response's (its length, hidden); None when none was kept
    prompt_hidden: torch.Tensor | None
    response_hidden: list[torch.Tensor] | None
    total: list[float]  # each rollout's reward
    parts: dict[str, list[float]]  # each reward component per rollout
    parsed: list  # each rollout's tags.Parsed
    informative: bool


def informative(verifiable: list[float], finished: list[bool], mask_overlong: bool) -> bool:
    """True if R_v takes two or more values among the rollouts that count (under `mask_overlong`, the finished
    ones, at least two of them)."""
    vals = [v for v, f in zip(verifiable, finished) if f or not mask_overlong]
    return len(vals) >= 2 and max(vals) != min(vals)


def split_groups(
    prompts: list[RLPrompt], roll: Rollouts, total: list[float], parts: dict, parsed: list, mask_overlong: bool
) -> list[Group]:
    """A scored rollout batch (rows prompt-major, `len(roll.texts) / len(prompts)` a group) → its groups."""
    G = len(roll.texts) // len(prompts)
    lengths = roll.response_mask.sum(1).tolist()
    ids = roll.response_ids.tolist()
    lp = roll.logprobs.tolist() if roll.logprobs is not None else None
    fin = [bool(f) for f in roll.finished.tolist()]
    kept = roll.prompt_hidden is not None and roll.response_hidden is not None
    out = []
    for p, prompt in enumerate(prompts):
        rows = range(p * G, (p + 1) * G)
        n_prompt = len(roll.prompt_ids[p * G])
        out.append(
            Group(
                prompt=prompt,
                prompt_ids=list(roll.prompt_ids[p * G]),
                responses=[ids[j][: lengths[j]] for j in rows],
                texts=[roll.texts[j] for j in rows],
                finished=[fin[j] for j in rows],
                logprobs=[lp[j][: lengths[j]] for j in rows] if lp is not None else None,
                prompt_hidden=roll.prompt_hidden[p, roll.prompt_hidden.shape[1] - n_prompt :].cpu() if kept else None,
                response_hidden=[roll.response_hidden[j, : lengths[j]].cpu() for j in rows] if kept else None,
                total=[total[j] for j in rows],
                parts={k: [v[j] for j in rows] for k, v in parts.items()},
                parsed=[parsed[j] for j in rows],
                informative=informative([parts["verifiable"][j] for j in rows], [fin[j] for j in rows], mask_overlong),
            )
        )
    return out


def choose(pool: list[Group], n: int) -> list[int]:
    """Indices into `pool` (every group sampled this step, in the order sampled) of the batch: the first `n`
    informative groups; short of `n`, the earliest others fill it (as without dynamic sampling), and the batch
    keeps the order sampled."""
    picked = [i for i, g in enumerate(pool) if g.informative][:n]
    if len(picked) < n:
        taken = set(picked)
        picked += [i for i in range(len(pool)) if i not in taken][: n - len(picked)]
    return sorted(picked)


def join(groups: list[Group], pad_id: int) -> tuple[list[RLPrompt], Rollouts, list[float], dict, list]:
    """Groups → (prompts, Rollouts, rewards, reward parts, parsed), rows prompt-major as the sampler lays them
    out, responses right-padded with `pad_id`; the sampler's kept hidden states (when every group has them) in
    its layout too, prompts left-padded and responses right-padded with zeros, so the trainer needs no pass of
    its own for the frozen trunk."""
    rows = [(g, j) for g in groups for j in range(len(g.texts))]
    T = max((len(g.responses[j]) for g, j in rows), default=0)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    lp = torch.zeros(len(rows), T) if groups and groups[0].logprobs is not None else None
    for b, (g, j) in enumerate(rows):
        n = len(g.responses[j])
        ids[b, :n] = torch.tensor(g.responses[j], dtype=torch.long)
        mask[b, :n] = 1
        if lp is not None:
            lp[b, :n] = torch.tensor(g.logprobs[j])
    roll = Rollouts(
        prompt_ids=[list(g.prompt_ids) for g, _ in rows],
        response_ids=ids,
        response_mask=mask,
        texts=[g.texts[j] for g, j in rows],
        finished=torch.tensor([g.finished[j] for g, j in rows], dtype=torch.bool),
        logprobs=lp,
    )
    prompt_hidden = response_hidden = None
    if groups and all(g.prompt_hidden is not None for g in groups):
        P, H = max(len(g.prompt_ids) for g in groups), groups[0].prompt_hidden.shape[-1]
        like = groups[0].prompt_hidden
        prompt_hidden = like.new_zeros(len(groups), P, H)
        response_hidden = like.new_zeros(len(rows), T, H)
        for p, g in enumerate(groups):
            prompt_hidden[p, P - len(g.prompt_ids) :] = g.prompt_hidden
        for b, (g, j) in enumerate(rows):
            response_hidden[b, : len(g.responses[j])] = g.response_hidden[j]
    roll.prompt_hidden, roll.response_hidden = prompt_hidden, response_hidden
    parts = {k: [v for g in groups for v in g.parts[k]] for k in (groups[0].parts if groups else {})}
    return (
        [g.prompt for g in groups],
        roll,
        [v for g in groups for v in g.total],
        parts,
        [p for g in groups for p in g.parsed],
    )
