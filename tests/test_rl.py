"""train_rl.py: a step is reproducible, GSPO's ratio and clipping are live after the first update,
and garbage rollouts stay finite."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tagpr.files import DataError, write_jsonl
from tagpr.records import RLPrompt, read_rl_prompts


def run(tmp_path, name, *extra):
    import train_rl

    out = tmp_path / name
    train_rl.main(["--preset", "tiny", "--out", str(out), "--resume", "", *extra])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two identical 2-step runs of the tiny preset: (metrics of a, metrics of b, a's folder)."""
    t = tmp_path_factory.mktemp("rl")
    a = run(t, "a", "--max-steps", "2", "--lr", "1e-3")
    b = run(t, "b", "--max-steps", "2", "--lr", "1e-3")
    return a, b, t / "a"


def test_steps_are_reproducible(runs):
    a, b, _ = runs
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))}
    assert [drop(r) for r in a] == [drop(r) for r in b]


def test_ratio_is_one_then_moves_and_clips(runs):
    a = runs[0]
    for row in a:
        # the first update of a rollout batch is on-policy: every ratio is exactly 1, nothing clips
        assert row["ratio_min/u0"] == row["ratio_max/u0"] == 1.0
        assert row["clip_frac_low/u0"] == row["clip_frac_high/u0"] == 0.0
    # after one update at a large learning rate the ratios move and GSPO's tiny ε clip some sequences
    assert any(r["ratio_min/u1"] != 1.0 or r["ratio_max/u1"] != 1.0 for r in a)
    assert any(r["clip_frac_low/u1"] + r["clip_frac_high/u1"] > 0 for r in a)


def test_garbage_rollouts_are_finite(runs):
    a = runs[0]
    for row in a:  # a random tiny model writes garbage: no tags, no answer
        assert row["tag_valid"] == 0.0 and row["reward/format"] == 0.0
        assert all(math.isfinite(v) for v in row.values() if isinstance(v, float))
        assert row["stage"] == "guided"


def reward_by_hand(text, gold, task, stage, n, w_tag=1.0):
    """Eq. 5 (guided, no PRMU in the tiny preset) or Eq. 11 (exploratory), typed out for what a random tiny model
    writes: no think block (asserted), so the whole text is the answer, R_f = 0, and R_tag = −(0.5 broken format
    + 0.25 no tag from the vocabulary + 0.25 fewer than 3 steps) = −1 in the guided stage (absent in Eq. 11)."""
    from collections import Counter

    from rouge_score import rouge_scorer

    from tagpr import lamp

    assert "<think>" not in text and "</think>" not in text, text  # the branch this reference covers
    answer = text.strip()
    kind = lamp.get_task(task).kind
    if kind == "classification":
        r_v = 1.0 if answer == gold.strip() and answer in lamp.get_task(task).labels else 0.0
    elif kind == "rating":
        try:
            y = float(answer)
            r_v = max(0.0, 1.0 - abs(y - float(gold)) / 4) if math.isfinite(y) else 0.0
        except ValueError:
            r_v = 0.0
    else:  # (ROUGE-1 F + ROUGE-L F) / 2, rouge-score without stemming
        s = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False).score(gold.strip(), answer)
        r_v = (s["rouge1"].fmeasure + s["rougeL"].fmeasure) / 2
    words = text.split()
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    m = sum(grams.values())
    r_rep = (len(grams) - m) / (m + 1e-6) if m else 0.0  # distinct n-grams over all, minus 1 (Eq. 8)
    r_tag = -1.0 * w_tag if stage == "guided" else 0.0  # --w-tag weighs it (Eq. 5's weight 1 by default)
    return r_v + r_rep + r_tag  # + λ1·R_f with R_f = 0


def test_rollout_log_gives_the_step_metrics_by_hand(runs):
    """rollouts.jsonl holds every rollout of every step in global row order. From it, by hand: each reward (the
    logged text scored against the logged gold), each group's advantages (Eq. 10 on the fp32 rewards: Bessel
    std, ε 1e-6, 0 for a flat group), the step's mean reward, mean |advantage| and length, and the first
    update's loss — at ratio exactly 1 every sequence's GSPO term is its advantage, so the loss is −Σ Â over
    the mini-batch's rows with tokens, divided by the mini-batch's size."""
    import statistics
    import struct

    metrics, out = runs[0], runs[2]
    cfg = json.loads((out / "config.json").read_text())
    G, n = cfg["group"], cfg["global_batch"] * cfg["group"]
    logged = [json.loads(line) for line in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(logged) == len(metrics) * n
    assert any(abs(r["advantage"]) > 0.1 for r in logged)  # not a vacuous check: the groups do vary
    for m in metrics:
        rows_ = [r for r in logged if r["step"] == m["step"]]
        assert [r["row"] for r in rows_] == list(range(n)) and {r["stage"] for r in rows_} == {m["stage"]}
        total = [reward_by_hand(r["text"], r["gold"], r["task"], m["stage"], cfg["ngram"]) for r in rows_]
        assert [r["reward"] for r in rows_] == pytest.approx(total, abs=1e-12)
        for g in range(0, n, G):
            rs = [struct.unpack("f", struct.pack("f", r["reward"]))[0] for r in rows_[g : g + G]]  # grouped in fp32
            mu, sd = sum(rs) / G, statistics.stdev(rs)
            want = [0.0] * G if len(set(rs)) == 1 else [(x - mu) / (sd + 1e-6) for x in rs]
            assert [r["advantage"] for r in rows_[g : g + G]] == pytest.approx(want, abs=1e-5)
        assert m["reward"] == pytest.approx(sum(r["reward"] for r in rows_) / n, abs=1e-9)
        assert m["adv_abs_mean"] == pytest.approx(sum(abs(r["advantage"]) for r in rows_) / n, abs=1e-6)
        assert m["response_len"] == pytest.approx(sum(r["tokens"] for r in rows_) / n)
        assert m["finished_frac"] == pytest.approx(sum(r["finished"] for r in rows_) / n)
        first = [r for r in rows_ if r["mini_batch"] == 0]
        assert len(first) == n // cfg["mini_batches"]
        want_loss = -sum(r["advantage"] for r in first if r["tokens"] > 0) / len(first)
        assert m["loss/u0"] == pytest.approx(want_loss, abs=1e-5)


def test_the_tag_reward_weight(tmp_path):
    """--w-tag 0.25: every guided rollout's logged reward is Eq. 5 typed out with R_tag weighed 0.25 (the
    ablation's "w/o Tag" row is --w-tag 0)."""
    run(tmp_path, "w", "--max-steps", "1", "--w-tag", "0.25")
    cfg = json.loads((tmp_path / "w" / "config.json").read_text())
    logged = [json.loads(line) for line in (tmp_path / "w" / "rollouts.jsonl").read_text().splitlines()]
    assert cfg["w_tag"] == 0.25 and {r["stage"] for r in logged} == {"guided"}
    want = [reward_by_hand(r["text"], r["gold"], r["task"], "guided", cfg["ngram"], w_tag=0.25) for r in logged]
    assert [r["reward"] for r in logged] == pytest.approx(want, abs=1e-12)


def test_trunk_cache_changes_nothing(tmp_path):
    """--train-layers 1: the frozen layers' output kept by the sampler (default) or recomputed in every forward
    (--no-trunk-cache): the same samples, rewards and updates up to the sampler's fp32 rounding; only the top
    layer and the final norm move."""
    import torch

    on = run(tmp_path, "on", "--max-steps", "2", "--lr", "1e-3", "--train-layers", "1")
    off = run(tmp_path, "off", "--max-steps", "2", "--lr", "1e-3", "--train-layers", "1", "--no-trunk-cache")
    for x, y in zip(on, off):
        for k, v in x.items():
            if isinstance(v, float) and not k.startswith(("time/", "tokens_per_s")):
                assert v == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
            elif not k.startswith(("time/", "tokens_per_s")):
                assert v == y[k], k
    assert any(r["clip_frac_low/u1"] + r["clip_frac_high/u1"] > 0 for r in on)  # the updates did something
    wa, wb = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert all((wa[k] - wb[k]).abs().max() <= 0.05 * 1e-3 for k in wa)
    start = weights_of("tiny")
    moved = sorted(k for k in wa if not torch.equal(wa[k], start[k]))
    assert moved and all(k.startswith("model.layers.3.") or k == "model.norm.weight" for k in moved), moved


def weights_of(name):
    from tagpr.models import load_model

    return {k: v.detach().clone() for k, v in load_model(name, device="cpu")[0].state_dict().items()}


def test_prompt_file_errors(tmp_path):
    p = tmp_path / "rl_prompts.jsonl"
    p.write_text(json.dumps(RLPrompt("1", "LaMP_2", "u", "q", "comedy").to_json()) + "\n{bad\n")
    with pytest.raises(DataError, match=r"rl_prompts\.jsonl:2: malformed JSON"):
        read_rl_prompts(p)
    p.write_text(json.dumps({"id": "1", "task": "LaMP_2", "user_id": "u", "prompt": "q"}) + "\n")
    with pytest.raises(DataError, match=r"rl_prompts\.jsonl:1: missing field 'gold'"):
        read_rl_prompts(p)


ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
COMMON = ["--preset", "tiny", "--max-steps", "4", "--save-every", "1", "--keep", "5", "--lr", "1e-3"]


def script(out, nproc=1, wait=True, extra=()):
    launch = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
        if nproc > 1
        else [sys.executable]
    )
    cmd = launch + [str(ROOT / "train_rl.py"), *COMMON, "--out", str(out), *extra]
    if not wait:
        return subprocess.Popen(  # its own process group: a kill takes torchrun and every rank
            cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout + r.stderr


def rows(out):
    keep = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))}
    return [keep(json.loads(line)) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(out):
    from safetensors.torch import load_file

    return load_file(str(Path(out) / "model" / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("layers", ["all", "top2"])
def test_one_rank_equals_two_ranks(tmp_path, layers, synthetic_dir):
    """`top2`: the top 2 layers trained, the FSDP-sharded frozen trunk cached per rollout batch on 2 ranks,
    recomputed in every forward on 1; the held-out prompts' frozen layers kept in a trunk store on 2 ranks (the
    FSDP-unsharded weights hashed, then resharded), not on 1. Both also score 5 held-out prompts (2 samples) and 5
    swap prompts at steps 0 and 4: on 2 ranks the second rank's share of each set carries a padding row."""
    ev = eval_prompts(synthetic_dir, 5)
    for name, data in (("ev", ev), ("swap", ev[1:] + ev[:1])):
        write_jsonl(tmp_path / f"{name}.jsonl", [r.to_json() for r in data])
    extra = [
        "--eval-prompts",
        str(tmp_path / "ev.jsonl"),
        "--eval-swap-prompts",
        str(tmp_path / "swap.jsonl"),
        "--eval-every",
        "4",
        "--eval-samples",
        "2",
    ]
    if layers == "top2":
        extra += ["--train-layers", "2"]
    script(tmp_path / "one", extra=extra + (["--no-trunk-cache"] if layers == "top2" else []))
    store = ["--eval-trunk-store", str(tmp_path / "trunk")] if layers == "top2" else []
    script(tmp_path / "two", nproc=2, extra=extra + store)
    a, b = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert [r.get("stage") for r in a] == [r.get("stage") for r in b]
    if layers == "top2":
        assert len(list((tmp_path / "trunk").glob("trunk-2-*.safetensors"))) == 4  # 2 sets × 2 ranks
    assert sorted(k for k in a[0] if k.startswith("eval/")) == sorted(k for k in b[0] if k.startswith("eval/"))
    assert "eval/swap/LaMP_3/MAE_greedy" in b[-1] and "eval/held_out/LaMP_3/MAE_sampled" in b[-1]
    for step in (0, 4):
        one, two = (json.loads((tmp_path / d / f"held_out_step{step}.json").read_text()) for d in ("one", "two"))
        assert one == two and len(two["held_out"]) == len(two["swap"]) == 5
        # the files hold what was generated, and it differs from prompt to prompt: equal files mean equal texts
        assert len({t for x in one["held_out"].values() for t in x["texts"]}) > 5  # the samples, at least
    for x, y in zip(a, b):  # same samples, same rewards, same updates
        for k, v in x.items():
            if isinstance(v, float):
                assert v == pytest.approx(y[k], rel=1e-4, abs=1e-6), k
    la, lb = (
        [json.loads(line) for line in (tmp_path / d / "rollouts.jsonl").read_text().splitlines()]
        for d in ("one", "two")
    )
    assert len(la) == len(lb) > 0  # both ranks' rollouts, gathered in global row order
    for x, y in zip(la, lb):
        assert (x["step"], x["row"], x["text"], x["tokens"], x["mini_batch"]) == (
            y["step"],
            y["row"],
            y["text"],
            y["tokens"],
            y["mini_batch"],
        )
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-9)
    wa, wb = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in wa:
        diff = (wa[k] - wb[k]).abs()  # Adam amplifies reduction-order noise in a few elements (see test_sft)
        assert diff.max() <= 0.05 * 1e-3 and (diff > 1e-5).float().mean() < 1e-3, k


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_kill_and_resume_equals_uninterrupted(tmp_path, nproc):
    """SIGKILL (to the whole process group: under torchrun every rank) once a checkpoint exists, then the same
    command: the same rows, rollout log and weights as a run never interrupted, on 1 rank and on 2 (FSDP2)."""
    from tagpr import checkpoint

    script(tmp_path / "full", nproc=nproc)
    proc = script(tmp_path / "kill", nproc=nproc, wait=False)
    deadline = time.time() + 300
    while checkpoint.latest(tmp_path / "kill" / "ckpt") is None and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoint.latest(tmp_path / "kill" / "ckpt") is not None and not (tmp_path / "kill" / "model").exists()
    resumed = script(tmp_path / "kill", nproc=nproc)
    assert re.search(r"resumed from \S+ at step [1-9]", resumed), resumed[-2000:]  # a resume, not a restart
    assert rows(tmp_path / "kill") == rows(tmp_path / "full")
    # the rollout log too: the killed run's lines past its checkpoint were dropped and written again
    assert (tmp_path / "kill" / "rollouts.jsonl").read_text() == (tmp_path / "full" / "rollouts.jsonl").read_text()
    wa, wb = weights(tmp_path / "full"), weights(tmp_path / "kill")
    assert all(__import__("torch").equal(wa[k], wb[k]) for k in wa)


def test_plot_command(runs, tmp_path):
    from PIL import Image

    from tagpr.plot import plot

    rows_ = runs[0]
    m = tmp_path / "metrics.jsonl"
    # two guided steps and one exploratory step, as a trainer writes them
    m.write_text(
        "".join(
            json.dumps({**r, "step": i + 1, "stage": s}) + "\n"
            for i, (r, s) in enumerate(zip(rows_ + rows_[:1], ["guided", "guided", "exploratory"]))
        )
    )
    png = plot(m)
    assert png == tmp_path / "metrics.png"
    w, h = Image.open(png).size
    assert w > 500 and h > 400


@pytest.mark.slow
def test_rewards_rise_on_a_learnable_task(tmp_path, monkeypatch):
    """GSPO climbs a reward the random tiny policy already varies on: the share of its response's
    characters in a–m (a synthetic task; LaMP rewards are all 0 for a random policy). The climb goes through the
    tied embeddings: training the decoder layers alone (`--train-layers 4`, or LoRA) leaves it flat over 30 steps
    (measured: 0.455 → 0.450; LoRA r 16, lr 3e-3: 0.454 → 0.436), so test_lora compares LoRA's step with the
    full step to first order instead."""
    import train_rl

    def letters(cfg, stage, texts, batch, scorer, vocab, parsed=None):
        r = [sum(c in "abcdefghijklm" for c in t) / max(len(t), 1) for t in texts]
        return r, {"letters": r}

    monkeypatch.setattr(train_rl, "compute_rewards", letters)
    rows_ = run(
        tmp_path,
        "learn",
        "--max-steps",
        "30",
        "--guided-epochs",
        "100",
        "--lr",
        "3e-3",
        "--global-batch",
        "4",
        "--group",
        "8",
        "--mini-batches",
        "2",
        "--max-new-tokens",
        "8",
        "--save-every",
        "1000",
    )
    first = sum(r["reward"] for r in rows_[:5]) / 5
    last = sum(r["reward"] for r in rows_[-5:]) / 5
    assert last > first + 0.15, (first, last)


def test_stratified_batches_give_each_class_its_share():
    """By hand: 8 A + 8 B in batches of 4 alternate, so every batch is 2 + 2; 12 A + 4 B put one B in every
    quarter of the epoch, so every batch is 3 A + 1 B. Random two-class epochs: every full batch holds the floor or
    the ceiling of its share. Always a permutation; deterministic in (seed, epoch)."""
    import random

    from tagpr.batching import stratified_batches

    for keys, want in ((["A"] * 8 + ["B"] * 8, 2), (["B"] * 4 + ["A"] * 12, 3)):
        for epoch in range(5):
            bs = stratified_batches(keys, 4, epoch, seed=7)
            assert sorted(i for b in bs for i in b) == list(range(16))
            assert [sum(keys[i] == "A" for i in b) for b in bs] == [want] * 4
    keys = ["A"] * 8 + ["B"] * 8
    assert stratified_batches(keys, 4, 1, 3) == stratified_batches(keys, 4, 1, 3) != stratified_batches(keys, 4, 2, 3)
    for trial in range(50):
        r = random.Random(trial)
        n, batch = r.randint(10, 200), r.choice([4, 8, 16])
        keys = ["[1]" if r.random() < r.uniform(0.1, 0.9) else "[2]" for _ in range(n)]
        share = batch * keys.count("[1]") / n
        for b in stratified_batches(keys, batch, trial, 0)[: n // batch]:
            assert math.floor(share) <= sum(keys[i] == "[1]" for i in b) <= math.ceil(share)


def test_stratify_gold_balances_the_rollout_batches(tmp_path):
    """--stratify gold: each step's prompts (the rollout log) are the stratified batch of (task, gold) classes."""
    from tagpr.batching import stratified_batches
    from train_rl import prompt_strata

    run(tmp_path, "s", "--max-steps", "2", "--global-batch", "6", "--group", "2", "--stratify", "gold")
    data = read_rl_prompts(tmp_path / "data" / "rl_prompts_synthetic.jsonl")
    logged = [json.loads(line) for line in (tmp_path / "s" / "rollouts.jsonl").read_text().splitlines()]
    keys = prompt_strata(data, "gold")
    assert keys == [f"{p.task}\t{p.gold}" for p in data] and prompt_strata(data, "none") is None
    want = stratified_batches(keys, 6, 0, 0)
    for step in (0, 1):  # logged from 1
        ids = [r["prompt_id"] for r in logged if r["step"] == step + 1][::2]
        assert ids == [data[i].id for i in want[step]]
    with pytest.raises(SystemExit, match="--stratify 'label'"):
        prompt_strata(data, "label")


def eval_prompts(synthetic_dir, n):
    """The first n LaMP-3 dev questions of the synthetic folder as held-out RL prompts (2 profile items each)."""
    from tagpr import lamp, prompts

    split = lamp.load_split(synthetic_dir, "LaMP_3", "dev")
    return [
        RLPrompt(q.id, "LaMP_3", q.user_id, prompts.build_prompt("LaMP_3", q, 2), split.golds[q.id])
        for q in split.questions[:n]
    ]


def cfg_samples(out: Path) -> int:
    """The held-out samples per prompt a run was configured with."""
    return json.loads((out / "config.json").read_text())["eval_samples"]


def test_held_out_scores_are_logged_and_match_an_independent_evaluation(tmp_path, synthetic_dir):
    """--eval-prompts/--eval-every: rows at steps 0 (before training), 2 and 4 carry the held-out metric; the last
    greedy one equals evaluate's path (HFBackend, extract_answer, the official MAE) on the exported model. LaMP-3
    makes it a real number even for a random tiny model: an unparsable rating scores the worst error."""
    from tagpr import llm, metrics, rewards

    ev = eval_prompts(synthetic_dir, 5)
    write_jsonl(tmp_path / "ev.jsonl", [r.to_json() for r in ev])
    write_jsonl(tmp_path / "swap.jsonl", [r.to_json() for r in ev[::-1]])
    rows = run(
        tmp_path,
        "r",
        "--max-steps",
        "4",
        "--eval-prompts",
        str(tmp_path / "ev.jsonl"),
        "--eval-every",
        "2",
        "--eval-swap-prompts",
        str(tmp_path / "swap.jsonl"),
    )
    key = "eval/held_out/LaMP_3/MAE"
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    assert [f"{key}_greedy" in r and f"{key}_sampled" in r for r in rows] == [True, False, True, False, True]
    assert [k for k in rows[0] if k.startswith("eval/swap/")] == [
        "eval/swap/LaMP_3/MAE_greedy",
        "eval/swap/LaMP_3/parsed_greedy",
    ]
    assert all(0.0 <= r[k] <= 4.0 for r in rows for k in r if k.startswith("eval/"))
    # each prompt's scores: their means are the logged metrics (the swap set holds the same prompts: same score)
    per = json.loads((tmp_path / "r" / "held_out_step4.json").read_text())
    assert set(per["held_out"]) == {p.id for p in ev}
    for kind in ("greedy", "sampled"):
        assert sum(x[kind] for x in per["held_out"].values()) / 5 == pytest.approx(rows[-1][f"{key}_{kind}"])
    assert rows[-1]["eval/swap/LaMP_3/MAE_greedy"] == pytest.approx(rows[-1][f"{key}_greedy"])
    # the parse split: the logged shares are the files' flags, recomputed here from the answers' own parse
    flags = [x["samples_parsed"] for x in per["held_out"].values()]
    assert all(len(f) == cfg_samples(tmp_path / "r") for f in flags)
    assert rows[-1]["eval/held_out/LaMP_3/parsed_sampled"] == pytest.approx(sum(map(sum, flags)) / sum(map(len, flags)))
    greedy_flags = [x["greedy_parsed"] for x in per["held_out"].values()]
    assert rows[-1]["eval/held_out/LaMP_3/parsed_greedy"] == pytest.approx(sum(greedy_flags) / 5)
    parsed_scores = [s for x in per["held_out"].values() for s, ok in zip(x["samples"], x["samples_parsed"]) if ok]
    if parsed_scores:  # the score among parsed answers, pooled
        assert rows[-1][f"{key}_sampled_among_parsed"] == pytest.approx(sum(parsed_scores) / len(parsed_scores))
    else:
        assert f"{key}_sampled_among_parsed" not in rows[-1]
    backend = llm.HFBackend(str(tmp_path / "r" / "model"), batch_size=8)
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    replies = backend.chat(
        [llm.Request([{"role": "user", "content": p.prompt}], {}, 0.0, cfg["max_new_tokens"]) for p in ev]
    )
    preds = {p.id: rewards.extract_answer(r.text) for p, r in zip(ev, replies)}
    mae = metrics.evaluate("LaMP_3", {p.id: p.gold for p in ev}, preds)["MAE"]
    assert rows[-1][f"{key}_greedy"] == pytest.approx(mae, abs=1e-9)
    assert [per["held_out"][p.id]["greedy_parsed"] for p in ev] == [metrics.parses("LaMP_3", preds[p.id]) for p in ev]
    # not only the scores (an unparsable rating scores the worst error whatever was written): the texts themselves
    assert [per["held_out"][p.id]["texts"][0] for p in ev] == [r.text for r in replies]
    assert len({r.text for r in replies}) > 1


def test_old_logprobs_from_the_sampler(runs, tmp_path):
    """--old-logp sampler: the same rollouts and rewards as recomputing them; every update compares with the
    sampler's log-probs, so update 0's ratio is 1 to fp32 summation order (not exactly) and nothing clips there;
    the updates match the recomputing run's closely. bf16 is refused before any work."""
    a = runs[0]
    s = run(tmp_path, "s", "--max-steps", "2", "--lr", "1e-3", "--old-logp", "sampler")
    assert len(s) == len(a) == 2
    for x, y in zip(s, a):
        assert x["reward"] == y["reward"] and x["response_len"] == y["response_len"]
        assert abs(x["ratio_min/u0"] - 1) < 1e-5 and abs(x["ratio_max/u0"] - 1) < 1e-5
        assert x["clip_frac_low/u0"] == x["clip_frac_high/u0"] == 0.0
        assert x["time/old_logp"] < y["time/old_logp"]
        for k in ("loss/u0", "loss/u1", "ratio_mean/u1", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-3, abs=1e-6), k
    from tagpr import hardware
    from tagpr.config import ConfigError

    why = "--old-logp sampler needs --precision fp32" if hardware.bf16_matmul() else "needs a CPU with bf16 matmul"
    with pytest.raises(ConfigError, match=why):
        run(tmp_path, "b", "--max-steps", "1", "--old-logp", "sampler", "--precision", "bf16")


def test_global_minibatches_by_hand():
    """3 prompts × 4 rollouts (rows prompt-major) in 2 mini-batches. By rollout: a partition of the 12 rows into
    6 + 6. By group: 2 prompts + 1 prompt, each prompt with its 4 rows {4p, …, 4p + 3}. Both the same for the same
    seed, and another seed draws another split."""
    from train_rl import global_minibatches

    r = [c.tolist() for c in global_minibatches(3, 4, 2, "rollout", 7)]
    assert sorted(r[0] + r[1]) == list(range(12)) and [len(c) for c in r] == [6, 6]
    groups_split = any(len({i // 4 for i in c}) * 4 != len(c) for c in r)
    g = [c.tolist() for c in global_minibatches(3, 4, 2, "group", 7)]
    assert sorted(g[0] + g[1]) == list(range(12)) and [len(c) for c in g] == [8, 4]
    for c in g:
        assert sorted(c) == sorted(4 * p + j for p in {i // 4 for i in c} for j in range(4))
    assert g == [c.tolist() for c in global_minibatches(3, 4, 2, "group", 7)]
    draws = {tuple(c.tolist()) for s in range(6) for c in global_minibatches(3, 4, 2, "group", s)[:1]}
    assert len(draws) > 1
    # over rollouts, a group is split between updates in most draws (12 rows, 6 a mini-batch)
    assert groups_split or any(
        len({i // 4 for i in c}) * 4 != len(c) for s in range(6) for c in global_minibatches(3, 4, 2, "rollout", s)
    )


def test_minibatches_of_whole_groups(runs, tmp_path):
    """--minibatch-by group: every prompt's rollouts land in one mini-batch, 2 whole groups in each of the 2
    updates; the rollouts and rewards are the rollout-mode run's (the split comes after them), the updates differ;
    a rollout batch too small to give every update a group is refused before any work, naming the flag."""
    from tagpr.config import ConfigError

    a = runs[0]
    g = run(tmp_path, "g", "--max-steps", "2", "--lr", "1e-3", "--minibatch-by", "group")
    assert g[0]["reward"] == a[0]["reward"] and g[0]["response_len"] == a[0]["response_len"]
    for x in g:  # update 0: ratio 1 and each group's advantages summing to 0 → a loss of 0 (by hand)
        assert abs(x["ratio_min/u0"] - 1) < 1e-5 and abs(x["ratio_max/u0"] - 1) < 1e-5
        assert abs(x["loss/u0"]) < 1e-6
    assert abs(a[0]["loss/u0"]) > 1e-2  # over rollouts a group is split, and the sum is not 0
    assert g[0]["grad_norm"] != pytest.approx(a[0]["grad_norm"], rel=1e-3)
    rows = [json.loads(line) for line in (tmp_path / "g" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 16
    for step in (1, 2):
        of = {}
        for r in rows:
            if r["step"] == step:
                of.setdefault(r["row"] // 4, set()).add(r["mini_batch"])
        assert len(of) == 4 and all(len(m) == 1 for m in of.values())
        assert sorted(m for ms in of.values() for m in ms) == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="--minibatch-by group: 1 prompts per rollout batch cannot fill"):
        run(tmp_path, "small", "--max-steps", "1", "--global-batch", "1", "--minibatch-by", "group")
    assert not (tmp_path / "small").exists()


def test_mismatch_correction_is_a_no_op_in_fp32(runs, tmp_path):
    """--is-correction in fp32, where the sampler's and the trainer's log-probs agree to summation order: the
    weights are 1 to 1e-5 and the losses and gradient norms are the plain run's to 1e-5. Recomputing, every update
    is weighted; with --old-logp sampler, update 0 alone (the later ones have no trainer π_old to compare)."""
    a = runs[0]
    for name, extra in [
        ("t", ["--is-correction", "token"]),
        ("q", ["--old-logp", "sampler", "--is-correction", "sequence"]),
    ]:
        rows = run(tmp_path, name, "--max-steps", "2", "--lr", "1e-3", *extra)
        for x, y in zip(rows, a, strict=True):
            assert x["reward"] == y["reward"]
            for k in ("loss/u0", "loss/u1", "grad_norm"):
                assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (name, k)
            weighted = ["u0", "u1"] if name == "t" else ["u0"]
            for u in ("u0", "u1"):
                assert (f"is_weight_mean/{u}" in x) == (u in weighted), (name, u)
            for u in weighted:
                assert abs(x[f"mismatch_log_ratio/{u}"]) < 1e-5 and abs(x[f"is_weight_mean/{u}"] - 1) < 1e-5
                assert x[f"is_capped_frac/{u}"] == 0.0
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert (cfg["is_correction"], cfg["is_cap"], cfg["old_logp"]) == ("sequence", 2.0, "sampler")


def test_sampler_logprobs_in_bf16_with_the_correction(tmp_path):
    """bf16 with --old-logp sampler, refused alone, runs with --is-correction; its step stays within 0.5 % of the
    recomputing path's losses and gradient norm (measured on the tiny model: ≤ 0.1 %; its mismatch is ~1e-5)."""
    from tagpr import hardware

    if not hardware.bf16_matmul():
        pytest.skip("needs a CPU with bf16 matmul (AVX512-BF16 or AMX)")
    common = ("--max-steps", "1", "--lr", "1e-3", "--precision", "bf16")
    ref = run(tmp_path, "r", *common)[0]
    for level in ("token", "sequence"):
        x = run(tmp_path, level, *common, "--old-logp", "sampler", "--is-correction", level)[0]
        assert x["reward"] == ref["reward"]
        for k in ("loss/u0", "loss/u1", "grad_norm"):
            assert x[k] == pytest.approx(ref[k], rel=5e-3), (level, k)
        assert 0 < abs(x["mismatch_log_ratio/u0"]) < 1e-3  # bf16: not 0, and small
        assert "mismatch_log_ratio/u1" not in x


def test_eval_trunk_store_changes_no_score(tmp_path, synthetic_dir):
    """--eval-trunk-store with --train-layers 1: the held-out and swap scores of every evaluation equal those of a
    run without it, prompt by prompt; the first evaluation writes one entry per set, the later ones (and another
    run from the same policy, pointed at the same folder) find them."""
    ev = eval_prompts(synthetic_dir, 4)
    write_jsonl(tmp_path / "ev.jsonl", [r.to_json() for r in ev])
    write_jsonl(tmp_path / "swap.jsonl", [r.to_json() for r in ev[::-1]])
    args = [
        "--max-steps",
        "2",
        "--lr",
        "1e-3",
        "--train-layers",
        "1",
        "--eval-prompts",
        str(tmp_path / "ev.jsonl"),
        "--eval-swap-prompts",
        str(tmp_path / "swap.jsonl"),
        "--eval-every",
        "1",
        "--eval-samples",
        "2",
    ]
    store = tmp_path / "trunk"
    plain = run(tmp_path, "plain", *args)
    kept = run(tmp_path, "kept", *args, "--eval-trunk-store", str(store))
    assert len(list(store.glob("trunk-3-*.safetensors"))) == 2  # the tiny model: 4 layers, 3 frozen
    again = run(tmp_path, "again", *args[:2], "--lr", "3e-3", *args[4:], "--eval-trunk-store", str(store))
    assert len(list(store.glob("*"))) == 2  # found, none written
    for step in (0, 1, 2):
        a, b = (json.loads((tmp_path / d / f"held_out_step{step}.json").read_text()) for d in ("plain", "kept"))
        assert a == b and len(a["held_out"]) == len(a["swap"]) == 4
        assert len({t for x in a["held_out"].values() for t in x["texts"]}) > 4  # texts, and they differ
    assert json.loads((tmp_path / "again" / "held_out_step0.json").read_text()) == json.loads(
        (tmp_path / "plain" / "held_out_step0.json").read_text()
    )  # the same start policy
    for x, y in zip(plain, kept):
        assert {k: v for k, v in x.items() if k.startswith("eval/")} == {
            k: v for k, v in y.items() if k.startswith("eval/")
        }
    assert len(again) == 3


def test_held_out_scoring_in_chunks_generates_the_same_texts(tmp_path, synthetic_dir):
    """--eval-batch 2: continuous batching in waves of 2 prompts (the memory bound for a large held-out set; a wave
    joins the decode loop as rows stop): in fp32 every prompt gets the same greedy answer and samples, text for
    text, as in one call, and the same scores."""
    ev = eval_prompts(synthetic_dir, 5)
    write_jsonl(tmp_path / "ev.jsonl", [r.to_json() for r in ev])
    write_jsonl(tmp_path / "swap.jsonl", [r.to_json() for r in ev[::-1]])
    common = ["--max-steps", "1", "--eval-prompts", str(tmp_path / "ev.jsonl"), "--eval-swap-prompts"]
    run(tmp_path, "one", *common, str(tmp_path / "swap.jsonl"))
    run(tmp_path, "chunks", *common, str(tmp_path / "swap.jsonl"), "--eval-batch", "2")
    one, chunks = (json.loads((tmp_path / d / "held_out_step0.json").read_text()) for d in ("one", "chunks"))
    texts = [t for per in one.values() for x in per.values() for t in x["texts"]]
    assert len(texts) == 5 * (1 + cfg_samples(tmp_path / "one")) + 5 and len(set(texts)) > 5  # the answers differ
    assert one == chunks


def test_bf16_gspo_runs_twice_to_the_same_numbers(tmp_path):
    """bf16 autocast is as deterministic as fp32 on one machine: two runs give the same rows and the same weights."""
    import torch

    from tagpr import hardware

    if not hardware.bf16_matmul():
        pytest.skip("bf16 autocast needs a CPU with AVX512-BF16 or AMX (this one has neither, or TAGPR_CPU=plain)")
    a = run(tmp_path, "a", "--max-steps", "2", "--lr", "1e-3", "--precision", "bf16")
    b = run(tmp_path, "b", "--max-steps", "2", "--lr", "1e-3", "--precision", "bf16")
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))}
    assert [drop(r) for r in a] == [drop(r) for r in b] and a[0]["grad_norm"] > 0
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
