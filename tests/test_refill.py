"""DAPO's dynamic sampling (`tagpr.refill`, `train_rl --dynamic-sampling`): which groups are informative, which
make the batch, groups back into the sampler's layout, and a run whose batches keep only groups that vary in R_v,
the same on 1 rank and 2."""

import json
import math
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tagpr.records import RLPrompt
from tagpr.refill import Group, choose, informative, join, split_groups
from tagpr.sampler import Rollouts

ROOT = Path(__file__).resolve().parents[1]


def test_informative_by_hand():
    assert not informative([1.0, 1.0, 1.0, 1.0], [True] * 4, False)  # all right
    assert not informative([0.0, 0.0, 0.0, 0.0], [True] * 4, False)  # all wrong
    assert informative([0.0, 1.0, 0.0, 0.0], [True] * 4, False)
    assert informative([0.31, 0.31, 0.30, 0.31], [True] * 4, False)  # ROUGE: any two values
    # --overlong mask: only finished rollouts count, and two of them must
    assert not informative([0.0, 1.0, 1.0, 1.0], [False, True, True, True], True)
    assert informative([0.0, 1.0, 1.0, 1.0], [False, True, True, True], False)
    assert not informative([0.0, 1.0, 0.0, 0.0], [False, True, False, False], True)


def group(name, varies):
    return Group(
        RLPrompt(name, "LaMP_2", "u", "q", "g"), [1], [[2]], ["t"], [True], None, None, None, [0.0], {}, [None], varies
    )


def test_choose_by_hand():
    pool = [group(str(i), v) for i, v in enumerate([False, True, False, True, True, False, True])]
    assert choose(pool, 3) == [1, 3, 4]  # the first three that vary, in the order sampled
    assert choose(pool, 4) == [1, 3, 4, 6]
    assert choose(pool[:4], 4) == [0, 1, 2, 3]  # short of informative groups: the earliest flat ones fill in
    assert choose(pool[:5], 4) == [0, 1, 3, 4]


def test_split_then_join_gives_the_rollouts_back():
    """Two prompts × G = 2, right-padded responses of 3, 1, 2, 0 tokens (pad 9), the sampler's log-probs:
    split into groups and joined back, every field is the sampler's again."""
    roll = Rollouts(
        prompt_ids=[[5, 6], [5, 6], [7], [7]],
        response_ids=torch.tensor([[1, 2, 3], [4, 9, 9], [5, 6, 9], [9, 9, 9]]),
        response_mask=torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]]),
        texts=["a", "b", "c", ""],
        finished=torch.tensor([True, True, False, False]),
        logprobs=torch.tensor([[-1.0, -2.0, -3.0], [-4.0, 0, 0], [-5.0, -6.0, 0], [0, 0, 0]]),
    )
    prompts = [RLPrompt("p", "LaMP_2", "u", "q", "g"), RLPrompt("r", "LaMP_2", "v", "q2", "h")]
    parts = {"verifiable": [1.0, 0.0, 0.0, 0.0], "format": [1.0, 0.5, 0.0, 0.0]}
    groups = split_groups(prompts, roll, [2.0, 0.5, 0.0, 0.0], parts, ["P0", "P1", "P2", "P3"], False)
    assert [g.informative for g in groups] == [True, False]
    assert groups[0].responses == [[1, 2, 3], [4]] and groups[1].logprobs == [[-5.0, -6.0], []]
    ps, back, total, parts2, parsed = join(groups, pad_id=9)
    assert ps == prompts and total == [2.0, 0.5, 0.0, 0.0] and parts2 == parts and parsed == ["P0", "P1", "P2", "P3"]
    assert back.prompt_ids == roll.prompt_ids and back.texts == roll.texts
    for f in ("response_ids", "response_mask", "finished", "logprobs"):
        assert torch.equal(getattr(back, f), getattr(roll, f)), f
    # the sampler's kept hidden states travel with their group: joined back, the training layout is the same
    H = 3
    roll.prompt_hidden = torch.randn(2, 2, H)
    roll.prompt_hidden[1, 0] = 0  # the second prompt is left-padded
    roll.response_hidden = torch.randn(4, 3, H) * roll.response_mask[..., None]
    groups = split_groups(prompts, roll, [2.0, 0.5, 0.0, 0.0], parts, ["P0", "P1", "P2", "P3"], False)
    assert groups[1].prompt_hidden.shape == (1, H) and [h.shape[0] for h in groups[0].response_hidden] == [3, 1]
    _, back, *_ = join(groups, pad_id=9)
    assert torch.equal(back.kept_rows(5), roll.kept_rows(5))
    _, swapped, *_ = join(groups[::-1], pad_id=9)  # the other order: the rows move with their group
    assert torch.equal(swapped.kept_rows(5), roll.kept_rows(5)[[2, 3, 0, 1]])
    # the second group alone: its own width, no sampler log-probs when there were none
    groups[1].logprobs = None
    _, one, *_ = join(groups[1:], pad_id=9)
    assert one.response_ids.tolist() == [[5, 6], [9, 9]] and one.logprobs is None


# A reward the random tiny policy varies on for half the prompts: R_v is 0 for every rollout of a prompt whose id
# hashes even (a flat group), else the parity of the text's length. crc32, not hash(): the ranks must agree.
LAUNCHER = """
import sys, zlib
import train_rl

def toy(cfg, stage, texts, prompts, scorer, vocab, parsed=None):
    G = len(texts) // len(prompts)
    even = [zlib.crc32(prompts[j // G].id.encode()) % 2 == 0 for j in range(len(texts))]
    v = [0.0 if e else float(len(t) % 2) for e, t in zip(even, texts)]
    return [x + 0.01 * len(t) for x, t in zip(v, texts)], {"verifiable": v}

train_rl.compute_rewards = toy
train_rl.main(sys.argv[1:])
"""

ARGS = ["--preset", "tiny", "--max-steps", "3", "--lr", "1e-3", "--global-batch", "4", "--group", "4"]
ARGS += ["--mini-batches", "2", "--synthetic-users", "8", "--save-every", "1", "--keep", "5"]


def launch(tmp_path, name, nproc, *extra):
    (tmp_path / "launch.py").write_text(LAUNCHER)
    cmd = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd += [str(tmp_path / "launch.py"), *ARGS, "--out", str(tmp_path / name), "--resume", "", *extra]
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rollouts = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    return metrics, rollouts


def by_group(rollouts):
    g = defaultdict(list)
    for r in rollouts:
        g[(r["step"], r["prompt_id"])].append(r)
    return g


@pytest.fixture(scope="module")
def off_and_on(tmp_path_factory):
    t = tmp_path_factory.mktemp("refill")
    return launch(t, "off", 1), launch(t, "on", 1, "--dynamic-sampling", "4")


def test_dynamic_sampling_keeps_only_groups_that_vary(off_and_on):
    (m_off, r_off), (m_on, r_on) = off_and_on
    flat = lambda rows: len({r["parts"]["verifiable"] for r in rows}) == 1
    off, on = by_group(r_off), by_group(r_on)
    assert any(flat(rows) for rows in off.values())  # without it, flat groups train
    assert len(on) == len(off) == 3 * 4 and not any(flat(rows) for rows in on.values())
    assert all(r["dynamic/informative"] == 1.0 for r in m_on)
    assert any(r["dynamic/informative_first"] < 1.0 and r["dynamic/rounds"] >= 1 for r in m_on)
    assert all(r["dynamic/groups_sampled"] == 4 * (1 + r["dynamic/rounds"]) for r in m_on)
    assert not any(k.startswith("dynamic/") for k in m_off[0]) and "time/refill" not in m_off[0]
    # the extra rounds' time is its own phase, not the reward's (the toy reward takes microseconds)
    assert all(r["time/refill"] > r["time/reward"] for r in m_on if r["dynamic/rounds"])
    # step 1 (the same start policy): every group of the plain batch that varies is in the refilled batch with
    # the same texts (round 0's generators are the plain run's); the rest came from fresh prompts
    first_off = {p: [x["text"] for x in rows] for (s, p), rows in off.items() if s == 1 and not flat(rows)}
    first_on = {p: [x["text"] for x in rows] for (s, p), rows in on.items() if s == 1}
    assert first_off and all(first_on[p] == texts for p, texts in first_off.items())
    plain = {p for s, p in off if s == 1}
    assert set(first_on) - set(first_off) and not (set(first_on) - set(first_off)) & plain
    # the advantages are Eq. 10's within each kept group, by hand
    for rows in on.values():
        r = [x["reward"] for x in rows]
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
        for x in rows:
            assert x["advantage"] == pytest.approx((x["reward"] - mean) / (std + 1e-6), abs=1e-5)


def test_refilled_batches_train_on_the_samplers_trunk(off_and_on, tmp_path):
    """With --train-layers the refilled groups carry the sampler's frozen-trunk states into the update; they
    must give what running the whole model does (--no-trunk-cache), to fp32 rounding: a layout slip in `join`
    (a prompt padded on the wrong side, a row of another group) changes every log-prob."""
    m_trunk, r_trunk = launch(tmp_path, "trunk", 1, "--dynamic-sampling", "4", "--train-layers", "1")
    m_whole, r_whole = launch(
        tmp_path, "whole", 1, "--dynamic-sampling", "4", "--train-layers", "1", "--no-trunk-cache"
    )
    assert any(r["dynamic/rounds"] >= 1 for r in m_trunk)  # groups really were replaced
    assert [x["text"] for x in r_trunk] == [x["text"] for x in r_whole]
    for a, b in zip(m_trunk, m_whole):
        for k, v in a.items():
            if k.startswith(("loss", "ratio", "grad_norm", "clip")) and isinstance(v, float):
                assert v == pytest.approx(b[k], rel=1e-4, abs=1e-6), k


@pytest.mark.slow
def test_dynamic_sampling_on_two_ranks_equals_one(off_and_on, tmp_path):
    """The refill gathers every rank's groups, so 2 ranks choose, deal out and train on what 1 rank does."""
    _, (m1, r1) = off_and_on
    m2, r2 = launch(tmp_path, "two", 2, "--dynamic-sampling", "4")
    assert [(x["step"], x["row"], x["prompt_id"], x["text"]) for x in r1] == [
        (x["step"], x["row"], x["prompt_id"], x["text"]) for x in r2
    ]
    for a, b in zip(m1, m2):
        for k, v in a.items():
            if isinstance(v, float) and not k.startswith(("time/", "tokens_per_s")):
                assert v == pytest.approx(b[k], rel=1e-4, abs=1e-6), k
