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
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed: pip install -e '.[bench]' (scripts/test.sh does)")

from tagpr import losses  # noqa: E402
from tagpr.models import LogprobModel, load_model  # noqa: E402


@pytest.fixture(scope="module")
def trainer():
    from datasets import Dataset

    lm, tok = load_model("tiny", device="cpu", dtype=torch.float32, seed=0)
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=4, num_generations=4,
                          importance_sampling_level="sequence", loss_type="grpo", beta=0.0, epsilon=3e-4,
                          epsilon_high=4e-4, temperature=0.9, report_to=[], use_cpu=True, max_completion_length=8,
                          bf16=False)
    tr = trl.GRPOTrainer(model=lm, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                         train_dataset=Dataset.from_dict({"prompt": ["a b"] * 4}), processing_class=tok)
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
    cmask[3, 2:] = 0                                       # shorter responses: right padding, as both sides make it
    x, attn = torch.cat([prompt_ids, completion_ids], 1), torch.cat([pmask, cmask], 1)
    lm.train()
    with torch.no_grad():
        now = LogprobModel(lm)(x, attn, 0.9)[0][:, P - 1:]           # (B, T) the completion tokens' log-probs
    old = now + noise * torch.randn(B, T, generator=g)              # a policy that has moved: ratios ≠ 1
    adv = torch.randn(B, generator=g)

    lm.zero_grad()
    theirs = tr._compute_loss(lm, dict(prompt_ids=prompt_ids, prompt_mask=pmask, completion_ids=completion_ids,
                                       completion_mask=cmask, advantages=adv, old_per_token_logps=old))
    theirs.backward()
    g_theirs = grads(lm)
    lm.zero_grad()
    logp = LogprobModel(lm)(x, attn, 0.9)[0][:, P - 1:]
    ours, m = losses.gspo_loss(logp, old, adv, cmask, *eps)
    ours.backward()
    g_ours = grads(lm)

    clipped = float(m["clip_frac_low"] + m["clip_frac_high"])
    assert 0 < clipped < 1, clipped                     # some sequences clipped, some not: both branches compared
    assert float(ours.detach()) == pytest.approx(float(theirs.detach()), rel=1e-6, abs=1e-7)
    assert set(g_ours) == set(g_theirs) and len(g_ours) > 10
    scale = max(float(v.abs().max()) for v in g_theirs.values())
    assert scale > 0
    for n in g_theirs:
        torch.testing.assert_close(g_ours[n], g_theirs[n], rtol=1e-4, atol=1e-6 * scale, msg=n)
