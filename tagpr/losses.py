"""Losses of the three trainers — pure functions, tensors in, `(loss, metrics)` out.

- `sft_loss`            Eq. 4 of TagPR (arXiv 2509.23140): token-mean NLL of chain + answer.
- `bradley_terry_loss`  Eq. 2: −log σ(r_w − r_l), PRMU's training loss.
- `group_advantages`    the standardised group advantage Â of Eq. 10.
- `gspo_loss`           Eq. 10, GSPO (Zheng et al., arXiv 2507.18071): sequence-level ratio,
                        clipped surrogate, "seq-mean-token-mean".
- `grpo_loss`           the token-level variant (PPO-style per-token ratios), same signature.
- `mismatch_weights`    truncated importance weights π_trainer/π_sampler for a sampler that rounds
                        differently from the trainer (TIS, token or sequence level).

Denominators are arguments: a loss summed over a micro-batch is divided by the count
over the **global** batch (all micro-batches, all ranks), so splitting a batch never
changes a gradient. Metrics are detached 0-dim tensors (the caller reduces and logs them).
Shapes: B sequences, T tokens.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 log-probs lose the small ratios GSPO clips at); fp64 stays fp64."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def sft_loss(
    logp: torch.Tensor, mask: torch.Tensor, num_tokens: int | float | torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """L_SFT = −Σ_{b,t} mask·log π(y_t | x, y_<t) / N_tokens   (Eq. 4, as a token mean).

    logp, mask: (B, T); `num_tokens` = masked tokens in the global batch (default: this one's).
    Positions outside the mask never contribute, whatever `logp` holds there.
    """
    mask = mask.bool()
    tokens = mask.sum()
    denom = tokens.clamp(min=1) if num_tokens is None else num_tokens
    total = torch.where(mask, logp, torch.zeros_like(logp)).sum()  # (,) masked sum; where() keeps −inf pads out
    loss = -total / denom
    return loss, {"loss": loss.detach(), "tokens": tokens.detach()}


def bradley_terry_loss(
    chosen: torch.Tensor,
    rejected: torch.Tensor,
    margin: float = 0.0,
    center_coef: float = 0.0,
    num_pairs: int | float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """L_BT = Σ_i [−log σ(r_w,i − r_l,i − margin) + c·(r_w,i + r_l,i)²] / N_pairs   (Eq. 2).

    chosen, rejected: (B,) scalar logits of the preferred / rejected inputs. The optional
    centering term (c ≈ 0.01) keeps rewards near 0. Metrics: pairwise accuracy (ties
    count ½), mean margin r_w − r_l.
    """
    chosen, rejected = _up(chosen), _up(rejected)
    diff = chosen - rejected  # (B,)
    per_pair = -F.logsigmoid(diff - margin)  # (B,)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen + rejected) ** 2
    denom = max(diff.numel(), 1) if num_pairs is None else num_pairs
    loss = per_pair.sum() / denom
    acc = ((diff > 0).float() + 0.5 * (diff == 0).float()).mean()
    return loss, {"loss": loss.detach(), "accuracy": acc.detach(), "margin": diff.mean().detach()}


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, scale: str = "std", valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, Metrics]:
    """Â_i = (r_i − mean_g) / (std_g + ε) within each group of G consecutive rollouts (Eq. 10).

    rewards: (B,) with B = n_groups·G. std is the unbiased (Bessel) one. A group whose
    rewards are all equal gets exactly 0 (no signal). `scale="none"` returns r − mean_g.
    `valid` (B,) bool: only these rollouts form their group's mean and std, the others get
    Â = 0 (DAPO's overlong filtering: truncated rollouts out of the loss); a group with
    fewer than two valid rollouts, or all of them equal, gets 0.
    Metrics: fraction of zero-variance groups, mean and std of the raw rewards.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    if valid is not None:
        return _masked_group_advantages(rewards, group_size, eps, scale, valid)
    r = _up(rewards).view(-1, group_size)  # (n_groups, G)
    mean = r.mean(dim=1, keepdim=True)  # (n_groups, 1)
    flat = (r == r[:, :1]).all(dim=1, keepdim=True)  # (n_groups, 1) zero-variance groups
    adv = r - mean  # (n_groups, G)
    if scale == "std":
        if group_size < 2:
            raise ValueError("scale='std' needs groups of at least 2 rollouts")
        adv = adv / (r.std(dim=1, unbiased=True, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
    adv = torch.where(flat, torch.zeros_like(adv), adv).view(-1)  # (B,)
    return adv, {
        "zero_variance_frac": flat.float().mean(),
        "reward_mean": r.mean(),
        "reward_std": r.std() if r.numel() > 1 else torch.zeros(()),
    }


def _masked_group_advantages(rewards, group_size, eps, scale, valid) -> tuple[torch.Tensor, Metrics]:
    r = _up(rewards).view(-1, group_size)  # (n_groups, G)
    v = valid.to(torch.bool).view(-1, group_size)  # (n_groups, G)
    n = v.sum(dim=1, keepdim=True)  # (n_groups, 1) valid rollouts per group
    mean = torch.where(v, r, 0.0).sum(dim=1, keepdim=True) / n.clamp(min=1)
    dev = torch.where(v, r - mean, 0.0)  # (n_groups, G)
    flat = (n < 2) | (dev.abs().amax(dim=1, keepdim=True) == 0)  # no signal among the valid ones
    adv = dev
    if scale == "std":
        adv = dev / ((dev**2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1)).sqrt().add(eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; expected 'std' or 'none'")
    adv = torch.where(flat | ~v, torch.zeros_like(adv), adv).view(-1)
    return adv, {
        "zero_variance_frac": flat.float().mean(),
        "reward_mean": r.mean(),
        "reward_std": r.std() if r.numel() > 1 else torch.zeros(()),
        "valid_frac": v.float().mean(),
    }


def _seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's own tokens. x, mask: (B, T) → (B,); 0 for an empty sequence."""
    return torch.where(mask, x, torch.zeros_like(x)).sum(1) / mask.sum(1).clamp(min=1)


def _clip_metrics(
    ratio: torch.Tensor,
    adv: torch.Tensor,
    valid: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> Metrics:
    """Clip fractions count where the clipped branch is active (its gradient is zero):
    low = Â < 0 and ratio < 1 − ε_low, high = Â > 0 and ratio > 1 + ε_high."""
    n = valid.sum().clamp(min=1)
    low = (adv < 0) & (ratio < 1 - clip_low) & valid
    high = (adv > 0) & (ratio > 1 + clip_high) & valid
    r = ratio[valid] if valid.any() else torch.ones(1, device=ratio.device)
    return {
        "clip_frac_low": low.sum() / n,
        "clip_frac_high": high.sum() / n,
        "ratio_mean": r.mean(),
        "ratio_min": r.min(),
        "ratio_max": r.max(),
        "adv_mean": (adv * valid).sum() / n,
    }


def _k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(π‖π_ref) per token, e^(ref−logp) − (ref−logp) − 1, sequence-mean: (B,)."""
    d = torch.where(mask, ref_logp - logp, torch.zeros_like(logp)).clamp(-20, 20)
    return _seq_mean(torch.exp(d) - d - 1, mask)


# How gspo_loss's logged metrics combine over micro-batches and ranks: "sum" (the loss is already divided by the
# global sequence count), "min" / "max", "mean" (each micro-batch weighted by its share of the mini-batch's sequences,
# then summed: a weighted mean). The trainer reduces by this table; it lists nothing twice.
GSPO_REDUCE = {
    "loss": "sum",
    "clip_frac_low": "mean",
    "clip_frac_high": "mean",
    "ratio_mean": "mean",
    "kl": "mean",
    "ratio_min": "min",
    "ratio_max": "max",
    "mismatch_log_ratio": "mean",
    "is_weight_mean": "mean",
    "is_capped_frac": "mean",
}


def mismatch_weights(
    trainer_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    level: str,
    cap: float,
) -> tuple[torch.Tensor, Metrics]:
    """Truncated importance weights for rollouts drawn by a sampler whose probabilities differ from the trainer's
    at the same parameters (another precision, another kernel, another engine):

        token:     w_t = min(π_train(t) / π_samp(t), C)                          (TIS: Yao et al. 2025,
                                                                                  TRL's and verl's token level)
        sequence:  w_i = min(exp((1/|y_i|) Σ_t log π_train(t)/π_samp(t)), C)  at every token of sequence i

    The sequence level takes GSPO's length-normalised (geometric-mean) ratio, so that the weight and the ratio it
    multiplies measure the same thing. Both are detached: the weight corrects which distribution the rollouts came
    from, and carries no gradient. trainer_logp, sampler_logp, mask: (B, T) → weights (B, T) (1 off the mask) and
    metrics, each a mean over the B sequences: `mismatch_log_ratio` (the sequence's mean log π_train/π_samp),
    `is_weight_mean` (its mean weight), `is_capped_frac` (the share of its tokens, or of the sequence, at the cap).
    """
    mask = mask.bool()
    d = torch.where(mask, _up(trainer_logp.detach()) - _up(sampler_logp.detach()), 0.0)  # (B, T) log ratios
    seq = _seq_mean(d, mask)  # (B,)
    if level == "token":
        log_w = d
    elif level == "sequence":
        log_w = seq.unsqueeze(1).expand_as(d)
    else:
        raise ValueError(f"unknown level {level!r}; expected 'token' or 'sequence'")
    capped = log_w > math.log(cap)
    w = torch.where(mask, torch.exp(log_w.clamp(max=math.log(cap))), 1.0)
    valid = mask.any(1)
    n = valid.sum().clamp(min=1)
    per_seq = lambda x: (_seq_mean(x.to(d.dtype), mask) * valid).sum() / n
    metrics = {
        "mismatch_log_ratio": (seq * valid).sum() / n,
        "is_weight_mean": per_seq(w),
        "is_capped_frac": per_seq(capped),
    }
    return w, metrics


def gspo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 3e-4,
    clip_high: float = 4e-4,
    num_sequences: int | float | torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    max_log_ratio: float = 10.0,
    form: str = "token",
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GSPO (Eq. 10):  L = −Σ_i (1/|y_i|) Σ_t min(s_i,t·Â_i, clip(s_i,t, 1−ε_low, 1+ε_high)·Â_i) / N_seq

    with the sequence ratio s_i = exp((1/|y_i|) Σ_t (log π_θ − log π_old)) and, in the
    GSPO-token form, log s_i,t = log π_θ(t) − sg[log π_θ(t)] + sg[log s_i]: its value is
    s_i at every token and its gradient equals the sequence form's when Â is per
    sequence: ∇L = −Â_i·s_i·(1/|y_i|) Σ_t ∇log π_θ(t) / N_seq where unclipped, 0 where clipped.
    `form="sequence"` computes s_i directly (same value, same gradient; for checking).

    logp (B, T) requires grad; old_logp (B, T) and advantages (B,) do not; mask (B, T).
    The mean log-ratio is clamped to ±max_log_ratio before exp. N_seq = `num_sequences`
    (the global count; default B). Optional k3 KL to `ref_logp` with weight `kl_coef`.
    `weights` (B, T), detached (`mismatch_weights`): each token's clipped term is multiplied by its weight, so
    ∇L = −Â_i·s_i·(1/|y_i|) Σ_t w_t·∇log π_θ(t) / N_seq where unclipped; the sequence form takes each sequence's
    mean weight (exact for sequence-level weights).
    """
    mask = mask.bool()
    adv = _up(advantages.detach())  # (B,)
    delta = torch.where(mask, _up(logp) - _up(old_logp.detach()), 0.0)
    log_s = (_seq_mean(delta, mask)).clamp(-max_log_ratio, max_log_ratio)  # (B,) log s_i
    valid = mask.any(1)  # (B,) sequences with tokens
    lo, hi = 1.0 - clip_low, 1.0 + clip_high
    if form == "token":
        lp = torch.where(mask, _up(logp), 0.0)  # (B, T) pads → 0, never NaN grads
        log_st = lp - lp.detach() + log_s.detach().unsqueeze(1)  # (B, T) value log s_i, grad ∇logp_t
        s_t = torch.exp(log_st)  # (B, T)
        a = adv.unsqueeze(1)  # (B, 1)
        obj = torch.minimum(s_t * a, s_t.clamp(lo, hi) * a)  # (B, T)
        if weights is not None:
            obj = obj * _up(weights.detach())
        per_seq = _seq_mean(obj, mask)  # (B,)
    elif form == "sequence":
        s = torch.exp(log_s)  # (B,) carries the gradient
        per_seq = torch.where(valid, torch.minimum(s * adv, s.clamp(lo, hi) * adv), torch.zeros_like(s))
        if weights is not None:
            per_seq = per_seq * _seq_mean(_up(weights.detach()), mask)
    else:
        raise ValueError(f"unknown form {form!r}; expected 'token' or 'sequence'")
    denom = logp.shape[0] if num_sequences is None else num_sequences
    loss = -per_seq.sum() / denom
    metrics = _clip_metrics(torch.exp(log_s.detach()), adv, valid, clip_low, clip_high)
    if ref_logp is not None and kl_coef:
        kl = _k3_kl(torch.where(mask, _up(logp), 0.0), _up(ref_logp.detach()), mask)  # (B,)
        loss = loss + kl_coef * kl.sum() / denom
        metrics["kl"] = (kl.detach() * valid).sum() / valid.sum().clamp(min=1)
    metrics["loss"] = loss.detach()
    return loss, metrics


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    num_sequences: int | float | torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    max_log_ratio: float = 10.0,
) -> tuple[torch.Tensor, Metrics]:
    """Token-level variant of Eq. 10 (GRPO-style): r_t = π_θ(t)/π_old(t) per token, PPO clipping per token,
    L = −Σ_i (1/|y_i|) Σ_t min(r_t·Â_i, clip(r_t, 1−ε_low, 1+ε_high)·Â_i) / N_seq.

    Same arguments as `gspo_loss` (its usual ε are 0.2, hence the defaults). Clip
    metrics here count tokens, not sequences.
    """
    mask = mask.bool()
    adv = _up(advantages.detach()).unsqueeze(1)  # (B, 1)
    delta = torch.where(mask, _up(logp) - _up(old_logp.detach()), 0.0)
    r = torch.exp(delta.clamp(-max_log_ratio, max_log_ratio))  # (B, T)
    obj = torch.minimum(r * adv, r.clamp(1 - clip_low, 1 + clip_high) * adv)  # (B, T)
    denom = logp.shape[0] if num_sequences is None else num_sequences
    loss = -_seq_mean(obj, mask).sum() / denom
    metrics = _clip_metrics(r.detach(), adv.expand_as(r), mask, clip_low, clip_high)
    if ref_logp is not None and kl_coef:
        kl = _k3_kl(torch.where(mask, _up(logp), 0.0), _up(ref_logp.detach()), mask)
        loss = loss + kl_coef * kl.sum() / denom
        metrics["kl"] = kl.detach().mean()
    metrics["loss"] = loss.detach()
    return loss, metrics
