"""Our GSPO objective against TRL's own: the same rollouts, old log-probs and advantages through TRL's
`GRPOTrainer._compute_loss` (importance_sampling_level="sequence", loss_type="grpo", beta 0: TRL's GSPO) and
through `tagpr.models.LogprobModel` + `tagpr.losses.gspo_loss`, on the tiny model. Loss and every parameter's
gradient agree to fp32 rounding, at GSPO's ε (3e-4 / 4e-4) and at PPO-like ε (0.2 / 0.28).

Conventions that differ between the two, outside this objective (bench/README.md lists them with the paper's):
- advantage: both (r − mean_g) / (std_g + ε) with Bessel's std; ε is 1e-6 here, 1e-4 in TRL;
- aggregation: both average the per-sequence terms over the sequences of a batch; TRL divides further by its
  gradient-accumulation steps, we by the global mini-batch's sequence count (the same for one micro-batch);
- positions: our log-probs take position ids from the attention mask (left padding starts at 0), TRL's from
  the column index, so rows here have prompts of one length (no left padding), as each side's own batches do.
Skipped with a message when TRL is not installed (`pip install -e .[bench]`; scripts/test.sh installs it).
"""

import os
import tempfile

import pytest
import torch

if os.environ.get("CI") == "true":  # CI installs TRL (scripts/test.sh): there a missing TRL is a failure, not a skip
    import trl
else:
    trl = pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[bench]' (scripts/test.sh does)")

from tagpr import losses  # noqa: E402
from tagpr.models import LogprobModel, load_model  # noqa: E402


@pytest.fixture(scope="module")
def trainer():
    from datasets import Dataset

    lm, tok = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=4,
        num_generations=4,
        importance_sampling_level="sequence",
        loss_type="grpo",
        beta=0.0,
        epsilon=3e-4,
        epsilon_high=4e-4,
        temperature=0.9,
        report_to=[],
        use_cpu=True,
        max_completion_length=8,
        bf16=False,
    )
    tr = trl.GRPOTrainer(
        model=lm,
        reward_funcs=lambda completions, **kw: [0.0] * len(completions),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": ["a b"] * 4}),
        processing_class=tok,
    )
    tr.current_gradient_accumulation_steps = 1  # set by TRL's training loop; one micro-batch here
    return tr, lm


def grads(lm):
    return {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("eps,noise", [((3e-4, 4e-4), 2e-3), ((0.2, 0.28), 1.0)])
def test_gspo_loss_and_gradient_match_trl(trainer, eps, noise):
    tr, lm = trainer
    tr.epsilon_low, tr.epsilon_high = eps
    g = torch.Generator().manual_seed(0)
    B, P, T, V = 8, 5, 6, lm.config.vocab_size
    prompt_ids, completion_ids = torch.randint(3, V, (B, P), generator=g), torch.randint(3, V, (B, T), generator=g)
    pmask, cmask = torch.ones(B, P, dtype=torch.long), torch.ones(B, T, dtype=torch.long)
    cmask[1, 4:] = 0
    cmask[3, 2:] = 0  # shorter responses: right padding, as both sides make it
    x, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([pmask, cmask], 1)
    lm.train()
    with torch.no_grad():
        now = LogprobModel(lm)(x, attn, 0.9)[0][:, P - 1 :]  # (B, T) the completion tokens' log-probs
    old = now + noise * torch.randn(B, T, generator=g)  # a policy that has moved: ratios ≠ 1
    adv = torch.randn(B, generator=g)

    lm.zero_grad()
    theirs = tr._compute_loss(
        lm,
        dict(
            prompt_ids=prompt_ids,
            prompt_mask=pmask,
            completion_ids=completion_ids,
            completion_mask=cmask,
            advantages=adv,
            old_per_token_logps=old,
        ),
    )
    theirs.backward()
    g_theirs = grads(lm)
    lm.zero_grad()
    logp = LogprobModel(lm)(x, attn, 0.9)[0][:, P - 1 :]
    ours, m = losses.gspo_loss(logp, old, adv, cmask, clip_low=eps[0], clip_high=eps[1])
    ours.backward()
    g_ours = grads(lm)

    clipped = float(m["clip_frac_low"] + m["clip_frac_high"])
    assert 0 < clipped < 1, clipped  # some sequences clipped, some not: both branches compared
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=1e-7)
    assert set(g_ours) == set(g_theirs) and len(g_ours) > 10
    scale = max(float(v.abs().max()) for v in g_theirs.values())
    assert scale > 0
    for n in g_theirs:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-6 * scale, msg=n)


@pytest.mark.slow
def test_bench_runs_both_trainers_on_the_same_work(tmp_path, synthetic_dir):
    """bench/vs_trl.py on the tiny policy, 1 seed × 2 rollout batches: both sides run, each batch's reward is the
    mean of its rollouts' rewards, and every rollout's reward is the one `reward_fn` gives its text (the same
    reward on both sides); the table, results.json and the PNG are written."""
    import json
    import sys
    from pathlib import Path

    from tagpr import lamp, prompts
    from tagpr.files import write_jsonl
    from tagpr.records import RLPrompt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import vs_trl

    split = lamp.load_split(synthetic_dir, "LaMP_2", "train")
    data = [
        RLPrompt(q.id, "LaMP_2", q.user_id, prompts.build_prompt("LaMP_2", q, 2), split.golds[q.id])
        for q in split.questions[:8]
    ]
    write_jsonl(tmp_path / "p.jsonl", [r.to_json() for r in data])
    out = tmp_path / "b"
    vs_trl.main(
        [
            "--policy",
            "tiny",
            "--prompts",
            str(tmp_path / "p.jsonl"),
            "--out",
            str(out),
            "--seeds",
            "0",
            "--batches",
            "2",
            "--prompts-per-batch",
            "2",
            "--group",
            "2",
            "--updates",
            "2",
            "--max-new",
            "6",
            "--lr",
            "1e-3",
            "--sides",
            "trl,ours,ours-recompute",
        ]
    )
    res = json.loads((out / "results.json").read_text())
    score = vs_trl.reward_fn(vs_trl.load_vocab(tmp_path / "p.jsonl"))
    trl_rows = [json.loads(line) for line in (out / "trl_seed0" / "batches.jsonl").read_text().splitlines()]
    ours_rolls = [json.loads(line) for line in (out / "ours_seed0" / "rollouts.jsonl").read_text().splitlines()]
    for side, rows in (("trl", trl_rows), ("ours", res["runs"]["ours"]["0"]["rows"])):
        assert [r["batch"] for r in rows] == [1, 2], side
        for r in rows:
            assert 0 < r["generation"] <= r["batch_time"] and r["updates"] > 0, (side, r)
            assert r["samples"] == 4 and 0 < r["gen_tokens"] <= 4 * 6, (side, r)
    for r in trl_rows:
        rolls = r["rollouts"]
        assert len(rolls) == 4 and r["reward"] == pytest.approx(sum(x["reward"] for x in rolls) / 4)
        assert [x["reward"] for x in rolls] == pytest.approx(
            score([x["text"] for x in rolls], [x["gold"] for x in rolls], [x["task"] for x in rolls])
        )
    assert len(ours_rolls) == 8
    assert [x["reward"] for x in ours_rolls] == pytest.approx(
        score([x["text"] for x in ours_rolls], [x["gold"] for x in ours_rolls], [x["task"] for x in ours_rolls])
    )
    for b in (1, 2):
        mine = [x["reward"] for x in ours_rolls if x["step"] == b]
        assert res["runs"]["ours"]["0"]["rows"][b - 1]["reward"] == pytest.approx(sum(mine) / 4)
    assert res["summary"]["trl"]["peak_rss_gib"] > 0.1 and res["summary"]["ours"]["peak_rss_gib"] > 0.1
    table = (out / "results.md").read_text()
    assert "| whole rollout batch (s) |" in table and "| ours / TRL | ours-recompute / TRL |" in table
    cfgs = {d: json.loads((out / f"{d}_seed0" / "config.json").read_text()) for d in ("ours", "ours-recompute")}
    assert cfgs["ours"]["old_logp"] == "sampler" and cfgs["ours-recompute"]["old_logp"] == "recompute"
    assert cfgs["ours"]["minibatch_by"] == cfgs["ours-recompute"]["minibatch_by"] == "group"
    assert res["runs"]["ours-recompute"]["0"]["rows"][0]["reward"] == res["runs"]["ours"]["0"]["rows"][0]["reward"]
    assert (out / "vs_trl.png").stat().st_size > 1000
