"""GSPO training of the policy: guided stage (full composite reward) then exploratory stage (TagPR §3.4).

    python train_rl.py --preset tiny
    torchrun --nproc_per_node=2 train_rl.py --preset tiny
    torchrun --nproc_per_node=8 train_rl.py --preset qwen3-8b --policy runs/lamp/sft/model --prmu runs/lamp/prmu/model

One step:
1. draw `global_batch` prompts (tasks mixed), each rank its share; sample G rollouts each
   with the KV-cache sampler (one prefill per group; FSDP unsharded once);
2. rewards through `tagpr.rewards`: guided R = R_v + λ1·R_f + R_rep + R_tag + λ2·R_p (Eq. 5,
   R_p from PRMU's `Scorer`), exploratory R = R_v + λ1·R_f + R_rep (Eq. 11, the same λ1);
3. group advantages (Eq. 10), then the old log-probs, recomputed once by the training
   model through the fused log-prob op at the sampling temperature (the first mini-batch's
   come from update 0's own forward: the policy has not moved yet);
4. the rollout batch is split into `mini_batches` (paper: 4) → that many optimizer
   updates, so GSPO's ratio and clipping are live from the second one on;
   `gspo_loss` with ε_low 3e-4 / ε_high 4e-4, optional k3 KL to the frozen start policy.

With `--train-layers N` the lower layers are frozen, so their output (the residual stream
entering layer L − N) is a constant of the rollout batch: the sampler keeps it while it
generates (`generate(keep_layers=…)`; else one no-grad pass computes it), and the old
log-probs and every update run the top N layers only, from it. Old and new log-probs
both come from the same cached trunk, so the ratio is still exactly 1 at update 0; the
trunk carries the sampler's rounding (bf16 projections, fp32 attention), which is below
what bf16 training sees anyway. `--no-trunk-cache` runs the whole model in every forward.

Departures from the paper:
1. Without `rl_prompts.jsonl` (from `build_data.py`), prompts come from synthetic users.
2. Without a PRMU model (`--prmu`, else `<run>/prmu/model`) the guided stage has no R_p term
   (said in the log).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import torch
from tqdm import tqdm

from tagpr import checkpoint, config, dist, lamp, prompts, rewards, synthetic, tags
from tagpr.files import DataError, write_jsonl
from tagpr.hardware import autocast, keep_freed_memory, resolve_precision
from tagpr.losses import group_advantages, gspo_loss
from tagpr.models import LogprobModel, can_split, load_for_sharding, load_model
from tagpr.records import RLPrompt, read_rl_prompts
from tagpr.rollout import generate
from tagpr.training import (MetricsLog, epoch_batches, grad_norm_and_clip, lr_at, pad_batch, start_run,
                            stratified_batches, train_top_layers)


@dataclass
class RLConfig:
    policy: str = "runs/default/sft/model"    # HF folder (the SFT export), "smollm2-135m" or "tiny"
    prompts: str = ""                         # rl_prompts.jsonl; empty: <run>/data/rl_prompts.jsonl, else synthetic
    prmu: str = ""                            # PRMU export (R_p); empty: <run>/prmu/model if there; "none": no R_p
                                              # term (the guided reward without λ2·R_p)
    tags: str = ""                            # tags.json (R_tag's vocabulary); empty: beside the prompts, else the default
    out: str = "runs/default/rl"              # output folder: config.json, metrics.jsonl, rollouts.jsonl, ckpt/
    lr: float = 1e-6                          # learning rate (paper)
    global_batch: int = 128                   # prompts per rollout batch (paper)
    group: int = 5                            # rollouts per prompt (paper)
    mini_batches: int = 4                     # optimizer updates per rollout batch (paper)
    micro_batch: int = 8                      # sequences per forward/backward on one rank
    guided_epochs: int = 13                   # epochs of the guided stage (paper)
    exploratory_epochs: int = 2               # epochs of the exploratory stage (paper)
    max_steps: int = -1                       # stop early (quick runs); -1: both stages' epochs
    temperature: float = 1.0                  # sampling temperature of the rollouts (paper)
    top_p: float = 1.0                        # nucleus sampling of the rollouts (paper: 1, off)
    stratify: Literal["none", "task", "gold"] = "none"  # rollout batches: "none" a plain shuffle (paper);
                                              # "task": each task its share of every batch; "gold": each
                                              # (task, gold answer) its share
    max_new_tokens: int = 512                 # per rollout; unfinished rollouts are cut here (no answer: R_v 0)
    clip_low: float = 3e-4                    # GSPO ε_low: the ratio is clipped below at 1 - ε_low (paper)
    clip_high: float = 4e-4                   # GSPO ε_high: clipped above at 1 + ε_high (paper)
    kl_coef: float = 0.0                      # k3 KL to the frozen start policy (paper: none)
    w_format: float = 0.5                     # λ1, the weight of R_f in both stages (ours; lost from the paper)
    w_personal: float = 0.5                   # λ2, the weight of R_p (ours; lost from the paper's text)
    ngram: int = 4                            # R_rep's n-gram length (paper)
    min_tags: int = 3                         # R_tag: fewest tags a chain must use (paper)
    warmup_steps: int = 0                     # linear LR warmup over N optimizer updates (then constant)
    grad_clip: float = 1.0                    # clip the global gradient norm to this (0: no clipping)
    save_every: int = 10                      # checkpoint every N steps (and at the end)
    rollouts_every: int = 1                   # every rollout of every Nth step → rollouts.jsonl (0: none)
    keep: int = 2                             # checkpoints kept (older ones removed after a new one is in place)
    resume: str = "auto"                      # "auto": latest checkpoint in <out>/ckpt if any; "": fresh; or a path
    seed: int = 0                             # prompt order and every rollout's sampling
    report_to: Literal["none", "tensorboard"] = "none"  # also log every metrics.jsonl row to <out>/tensorboard,
                                              # with one prompt's rollouts as text per --rollouts-every step
    synthetic_users: int = 100                # without rl_prompts.jsonl: synthetic train users per task
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # forward matmuls, rollouts too: auto = bf16 on CUDA, fp32 on
                                              # a CPU; bf16 on a CPU needs AVX512-BF16 or AMX (else: stops at once)
    train_layers: int = -1                    # train only the top N decoder layers + final norm (-1: all)
    trunk_cache: bool = True                  # with train_layers: the frozen layers' output computed once per rollout
                                              # batch (kept by the sampler where it can), not in every forward


PRESETS = {
    "tiny": dict(policy="tiny", out="runs/tiny/rl", lr=1e-4, global_batch=4, group=4, mini_batches=2, micro_batch=8,
                 guided_epochs=1, exploratory_epochs=1, max_new_tokens=24, save_every=2, synthetic_users=4,
                 max_steps=4),
    "smollm2": dict(policy="smollm2-135m", out="runs/smollm2/rl", lr=1e-6, global_batch=8, group=4, mini_batches=2,
                    micro_batch=8, max_new_tokens=128, synthetic_users=20),
    "qwen3-8b": dict(global_batch=128, group=5, mini_batches=4, micro_batch=4, max_new_tokens=1024, rollouts_every=10),
}


def load_prompts(cfg: RLConfig, out: Path) -> list[RLPrompt]:
    path = Path(cfg.prompts) if cfg.prompts else out.parent / "data" / "rl_prompts.jsonl"
    if path.is_file():
        return read_rl_prompts(path)
    if cfg.prompts:
        raise DataError(f"{path}: not found; make it with `python build_data.py`")
    made = out.parent / "data" / "rl_prompts_synthetic.jsonl"
    if dist.get().is_main and not made.is_file():
        lamp_dir = out.parent / "data" / "synthetic_lamp_rl"
        synthetic.generate(lamp_dir, seed=cfg.seed + 1, sizes={"train": (cfg.synthetic_users, 1), "dev": (1, 1),
                                                               "test": (1, 1)})
        rows = []
        for task in synthetic.SYNTHETIC_TASKS:
            s = lamp.load_split(lamp_dir, task, "train")
            rows += [RLPrompt(q.id, s.task.name, q.user_id or q.id, prompts.build_prompt(s.task, q), s.golds[q.id])
                     for q in s.questions]
        write_jsonl(made, [r.to_json() for r in rows])
    dist.barrier()
    dist.print0(f"no {path}: training on synthetic users' prompts ({made})")
    return read_rl_prompts(made)


def rollouts_markdown(rows: list[dict]) -> str:
    """One prompt's group of rollouts (rollouts.jsonl rows) as a TensorBoard text panel."""
    head = f"prompt `{rows[0]['prompt_id']}` ({rows[0]['task']}, user `{rows[0]['user_id']}`, gold `{rows[0]['gold']}`)"
    return head + "".join(f"\n\n**reward {r['reward']:.3f}, advantage {r['advantage']:+.3f}, {r['tokens']} tokens**"
                          f"\n\n    " + r["text"].replace("\n", "\n    ") for r in rows)


def fit_batch(n_prompts: int, global_batch: int, world_size: int) -> int:
    """Prompts per rollout batch: `global_batch`, or, when the file holds fewer prompts, the most of them that
    the ranks share evenly (said in the log). Errors say what is needed."""
    if global_batch % world_size:
        raise config.ConfigError(f"--global-batch {global_batch} must be divisible by the {world_size} ranks")
    if n_prompts >= global_batch:
        return global_batch
    if n_prompts < world_size:
        raise DataError(f"{n_prompts} prompt(s) for {world_size} ranks: each rank needs at least one "
                        f"(--global-batch {global_batch} wants {global_batch})")
    return n_prompts - n_prompts % world_size


def prompt_strata(data: list[RLPrompt], stratify: str) -> list[str] | None:
    """The class of each prompt that `--stratify` balances rollout batches over (None: a plain shuffle)."""
    if stratify == "none":
        return None
    if stratify == "task":
        return [p.task for p in data]
    if stratify == "gold":
        return [f"{p.task}\t{p.gold}" for p in data]
    raise SystemExit(f"--stratify {stratify!r}: expected none, task or gold")


def load_vocab(cfg: RLConfig, out: Path) -> tuple[str, ...]:
    """The tag vocabulary R_tag checks: build_data's `tags.json` beside the prompts, else the default nine."""
    path = Path(cfg.tags) if cfg.tags else (Path(cfg.prompts).parent if cfg.prompts else out.parent / "data") / "tags.json"
    if path.is_file():
        return tags.load_tags(path)
    if cfg.tags:
        raise DataError(f"{path}: not found; `python build_data.py` writes it")
    return tags.DEFAULT_TAGS


def compute_rewards(cfg: RLConfig, stage: str, texts, batch: list[RLPrompt], scorer, vocab=tags.DEFAULT_TAGS):
    """Rewards per rollout (rows prompt-major, `group` per prompt) and their components."""
    golds = [p.gold for p in batch for _ in range(cfg.group)]
    tasks = [p.task for p in batch for _ in range(cfg.group)]
    if stage == "exploratory":
        return rewards.foundation_reward(texts, golds, tasks, cfg.ngram, cfg.w_format)
    personal = None
    if scorer is not None:
        users = [p.user_id for p in batch for _ in range(cfg.group)]
        personal = scorer.score(users, [p.prompt for p in batch for _ in range(cfg.group)], texts).tolist()
    w = rewards.RewardWeights(w_format=cfg.w_format, w_personal=cfg.w_personal if scorer is not None else 0.0)
    return rewards.composite_reward(texts, golds, tasks, personal, w, vocab, cfg.min_tags, cfg.ngram)


def padded_micro_batches(rows: list[int], micro: int) -> list[list[int]]:
    """`rows` in micro-batches, padded with empty ones to the largest count over the ranks (FSDP's collectives)."""
    chunks = [rows[a:a + micro] for a in range(0, len(rows), micro)]
    n = int(dist.all_reduce(torch.tensor(len(chunks)), "max").item())
    return chunks + [[] for _ in range(n - len(chunks))]


def sequences(roll, device, pad_id):
    """prompt + response rows → input ids, attention mask, response mask aligned with next-token log-probs."""
    seqs, masks = [], []
    for p, r, m in zip(roll.prompt_ids, roll.response_ids.tolist(), roll.response_mask.tolist()):
        n = sum(m)
        seqs.append(p + r[:n])
        masks.append([0] * len(p) + [1] * n)
    return pad_batch(seqs, masks, pad_id, device)


def main(argv=None):
    keep_freed_memory()
    cfg, preset = config.parse(RLConfig, PRESETS, argv, description=__doc__)
    d = dist.init()
    precision = resolve_precision(cfg.precision, d.device)  # before any work: a CPU may not take bf16
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    if cfg.policy not in ("tiny", "smollm2-135m") and not (Path(cfg.policy) / "config.json").is_file():
        raise SystemExit(f"{cfg.policy}: no policy folder; run `python train_sft.py` first (or pass --policy)")
    data = load_prompts(cfg, out)
    if d.distributed:
        lm, tok, full = load_for_sharding(cfg.policy, d.is_main, d.device, cfg.seed)
    else:
        (lm, tok), full = load_model(cfg.policy, device="cpu", dtype=torch.float32, seed=cfg.seed), None
    lm.train()
    trainable, n_params = train_top_layers(lm, cfg.train_layers)
    # the frozen lower layers' output is a constant of the rollout batch: computed once, it feeds the old
    # log-probs and every update (the top layers alone run per update); 0: no cache
    frozen = max(0, len(lm.get_decoder().layers) - cfg.train_layers) \
        if cfg.trunk_cache and cfg.train_layers > 0 and can_split(lm) else 0
    ref = None
    if cfg.kl_coef:
        ref = LogprobModel(load_model(cfg.policy, device=d.device, seed=cfg.seed)[0]).eval()
    model = dist.apply_fsdp(LogprobModel(lm), d.device, full_state=full, from_meta=d.distributed)
    del full
    if d.distributed:  # FSDP initialises lazily from the first module called: make it the root, not the sampler's lm
        with torch.no_grad():
            model(torch.full((1, 2), tok.pad_token_id, device=d.device), torch.ones(1, 2, dtype=torch.long,
                                                                                    device=d.device))
    scorer = None
    prmu = cfg.prmu or str(out.parent / "prmu" / "model")
    if cfg.prmu != "none" and (cfg.prmu or (Path(prmu) / "users.json").is_file()):
        from tagpr.prmu import Scorer
        scorer = Scorer(prmu, device=d.device)
        known = sum(p.user_id in scorer.users for p in data)
        dist.print0(f"R_p from the PRMU reward model in {prmu}: {known} of {len(data)} prompts' users have a trained "
                    "embedding, the rest score as PRMU's unknown user")
    else:
        dist.print0(f"no PRMU model ({'--prmu none' if cfg.prmu == 'none' else f'nothing in {prmu}'}): the guided "
                    "stage's reward has no R_p term; `python train_prmu.py` trains one")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    batch = fit_batch(len(data), cfg.global_batch, d.world_size)
    if batch != cfg.global_batch:
        dist.print0(f"only {len(data)} prompts: rollout batches of {batch} prompts instead of --global-batch "
                    f"{cfg.global_batch}")
        cfg = dataclasses.replace(cfg, global_batch=batch)
    per_rank = cfg.global_batch // d.world_size
    steps_per_epoch = max(1, len(data) // cfg.global_batch)
    strata = prompt_strata(data, cfg.stratify)
    guided = steps_per_epoch * cfg.guided_epochs
    total = guided + steps_per_epoch * cfg.exploratory_epochs
    total = total if cfg.max_steps < 0 else min(total, cfg.max_steps)
    updates = total * cfg.mini_batches
    resolved = {**config.to_dict(cfg), "preset": preset, "world_size": d.world_size, "total_steps": total,
                "guided_steps": guided, "prompts": len(data),
                "prompts_with_trained_user": known if scorer is not None else 0, "precision": precision,
                "trainable_params": trainable, "params": n_params}
    start, log = start_run(out, cfg.resume, model, opt, resolved, cfg.report_to)
    samples = MetricsLog(out / "rollouts.jsonl", resume_step=start or None) if cfg.rollouts_every > 0 else None
    dist.print0(f"GSPO {cfg.policy}: {len(data)} prompts, {total} steps ({guided} guided) of {cfg.global_batch} "
                f"prompts × {cfg.group} rollouts, {cfg.mini_batches} updates each, on {d.world_size} rank(s), {precision}, "
                f"{trainable / 1e6:.1f}M of {n_params / 1e6:.1f}M parameters trained")
    vocab = load_vocab(cfg, out)
    dist.print0(f"tag vocabulary: {', '.join(vocab)}")
    bar = tqdm(total=total, initial=start, desc="gspo", disable=not d.is_main, dynamic_ncols=True)
    step = start
    while step < total:
        stage = "guided" if step < guided else "exploratory"
        epoch, pos = divmod(step, steps_per_epoch)
        order = (stratified_batches(strata, cfg.global_batch, epoch, cfg.seed) if strata else
                 epoch_batches([0] * len(data), cfg.global_batch, epoch, cfg.seed, group_by_length=False))[pos]
        batch = [data[i] for i in order[d.rank * per_rank:(d.rank + 1) * per_rank]]
        t0 = time.perf_counter()
        # 1. rollouts; every rollout has its own generator seeded by (seed, step, its row in the global
        #    batch), so what it samples depends neither on the number of ranks nor on a resume
        ids = [tok(prompts.chat(tok, p.prompt), add_special_tokens=False)["input_ids"] for p in batch]
        first = d.rank * per_rank * cfg.group
        gens = [torch.Generator(device=d.device).manual_seed(cfg.seed * 1_000_003 + step * 100_003 + first + j)
                for j in range(per_rank * cfg.group)]
        model.eval()
        roll = generate(model, ids, tok.eos_token_id, tok.pad_token_id, cfg.max_new_tokens, cfg.temperature,
                        cfg.top_p, generator=gens, tokenizer=tok, n_per_prompt=cfg.group, precision=precision,
                        keep_layers=frozen)
        model.train()
        t1 = time.perf_counter()
        # 2. rewards and advantages
        total_r, parts = compute_rewards(cfg, stage, roll.texts, batch, scorer, vocab)
        adv, adv_m = group_advantages(torch.tensor(total_r, dtype=torch.float32), cfg.group)
        t2 = time.perf_counter()
        # 3. old (and reference) log-probs at the sampling temperature, with the training model. Mini-batches
        #    come from one permutation of the global batch, so 1 rank and N ranks make the same updates. The
        #    first mini-batch's rows take their old log-probs from update 0's own forward (the policy has not
        #    moved yet: the ratio is exactly 1 there); the other rows need one no-grad pass now.
        x, attn, rmask = sequences(roll, d.device, tok.pad_token_id)
        n_global = cfg.global_batch * cfg.group
        perm = torch.randperm(n_global, generator=torch.Generator().manual_seed(cfg.seed + step))
        chunks = perm.chunk(cfg.mini_batches)                                   # the global mini-batches
        minis = [[int(r) - first for r in mini if first <= int(r) < first + len(x)] for mini in chunks]  # this rank's
        later = sorted(r for mini in minis[1:] for r in mini)
        old = torch.zeros(len(x), x.shape[1] - 1, device=d.device)
        trunk = roll.kept_rows(x.shape[1]) if frozen else None  # the sampler's: no pass of its own
        with torch.no_grad(), autocast(d.device, precision):
            if frozen and trunk is None:  # the sampler could not keep it (transformers' fallback path)
                trunk = torch.zeros(*x.shape, lm.config.hidden_size, device=d.device)
                for idx in padded_micro_batches(list(range(len(x))), cfg.micro_batch):
                    h = model(x[idx or [0]], attn[idx or [0]], upto=frozen)  # an empty one keeps FSDP in step
                    if idx:
                        trunk[idx] = h
            # the top layers only, when the trunk is cached; log-probs at the response tokens only
            top = lambda rows: dict(where=rmask[rows], **({"start": frozen, "hidden": trunk[rows]} if frozen else {}))
            for idx in padded_micro_batches(later, cfg.micro_batch):
                lp = model(x[idx or [0]], attn[idx or [0]], cfg.temperature, **top(idx or [0]))[0]
                if idx:
                    old[idx] = lp
            ref_lp = (torch.cat([ref(x[a:a + cfg.micro_batch], attn[a:a + cfg.micro_batch], cfg.temperature,
                                     where=rmask[a:a + cfg.micro_batch])[0]
                                 for a in range(0, len(x), cfg.micro_batch)]) if ref is not None else None)
        t3 = time.perf_counter()
        # 4. several updates per rollout batch
        stats: dict[str, float] = {}
        ent_sum = ent_n = 0.0
        for k, mine in enumerate(minis):
            n_mini = len(chunks[k])
            for idx in padded_micro_batches(mine, cfg.micro_batch):
                rows = idx or [0]  # an empty micro-batch runs one row with zero loss: FSDP's collectives stay in step
                with autocast(d.device, precision):
                    logp, ent = model(x[rows], attn[rows], cfg.temperature, **top(rows))
                old_rows = logp.detach() if k == 0 else old[rows]
                loss, m = gspo_loss(logp, old_rows, adv[rows].to(d.device), rmask[rows], cfg.clip_low,
                                    cfg.clip_high, n_mini, ref_lp[rows] if ref_lp is not None else None,
                                    cfg.kl_coef)
                if not idx:
                    loss = loss * 0.0
                (loss * d.world_size).backward()
                if idx:
                    w = len(idx) / n_mini  # metrics: this rank's share of the global mini-batch
                    for key, v in m.items():
                        name = f"{key}/u{k}"
                        if key == "loss":  # already divided by the global mini-batch size: a plain sum
                            stats[name] = stats.get(name, 0.0) + float(v)
                        elif key == "ratio_min":
                            stats[name] = min(stats.get(name, math.inf), float(v))
                        elif key == "ratio_max":
                            stats[name] = max(stats.get(name, -math.inf), float(v))
                        else:
                            stats[name] = stats.get(name, 0.0) + w * float(v)
                    ent_sum += float((ent.detach() * rmask[idx]).sum())
                    ent_n += float(rmask[idx].sum())
            gnorm = grad_norm_and_clip(model.parameters(), cfg.grad_clip)
            u = step * cfg.mini_batches + k
            lr = lr_at(u, updates, cfg.lr, cfg.warmup_steps, 1.0)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.step()
            opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        step += 1
        parsed = [tags.parse(t) for t in roll.texts]
        mean = lambda xs: dist.sum_scalar(sum(xs)) / dist.sum_scalar(len(xs))
        row = {"step": step, "stage": stage, "lr": lr, "grad_norm": gnorm,
               "reward": mean(total_r), **{f"reward/{k}": mean(v) for k, v in parts.items()},
               "adv_mean": mean(adv.tolist()), "adv_abs_mean": mean(adv.abs().tolist()),
               "zero_variance_frac": dist.sum_scalar(float(adv_m["zero_variance_frac"])) / d.world_size,
               "entropy": dist.sum_scalar(ent_sum) / max(dist.sum_scalar(ent_n), 1),
               "response_len": mean(roll.lengths.tolist()), "finished_frac": mean(roll.finished.float().tolist()),
               "tag_count": mean([len(p.steps) for p in parsed]),
               "tag_valid": mean([float(all(tags.check(p, vocab, cfg.min_tags).values())) for p in parsed]),
               "tokens_per_s": dist.sum_scalar(float(roll.lengths.sum())) / (t1 - t0),
               "time/rollout": t1 - t0, "time/reward": t2 - t1, "time/old_logp": t3 - t2, "time/update": t4 - t3}
        for k in range(cfg.mini_batches):  # the same keys on every rank: these are collectives
            for key in ("loss", "clip_frac_low", "clip_frac_high", "ratio_mean") + (("kl",) if ref is not None else ()):
                row[f"{key}/u{k}"] = dist.sum_scalar(stats.get(f"{key}/u{k}", 0.0))
            row[f"ratio_min/u{k}"] = dist.all_reduce(torch.tensor(stats.get(f"ratio_min/u{k}", math.inf)), "min").item()
            row[f"ratio_max/u{k}"] = dist.all_reduce(torch.tensor(stats.get(f"ratio_max/u{k}", -math.inf)), "max").item()
        if samples is not None and step % cfg.rollouts_every == 0:
            mini_of = {j: k for k, mini in enumerate(minis) for j in mini}     # this rank's row → its mini-batch
            tokens = roll.lengths.tolist()
            mine = []
            for j, text in enumerate(roll.texts):
                p = batch[j // cfg.group]
                mine.append({"step": step, "stage": stage, "row": first + j, "prompt_id": p.id, "user_id": p.user_id,
                             "task": p.task, "gold": p.gold, "text": text, "reward": total_r[j],
                             "parts": {k: v[j] for k, v in parts.items()}, "advantage": float(adv[j]),
                             "tokens": int(tokens[j]), "finished": bool(roll.finished[j]), "mini_batch": mini_of[j]})
            samples.write_rows([r for part in dist.gather_objects(mine) for r in part])  # global row order
            log.text("rollouts", rollouts_markdown(mine[:cfg.group]), step)
        log.write(row)
        bar.update(1)
        bar.set_postfix(stage=stage[0], reward=f"{row['reward']:.3f}", clip=f"{row.get('clip_frac_high/u1', 0):.2f}")
        if step % cfg.save_every == 0 or step == total:
            checkpoint.save(out / "ckpt", step, model, opt, {"epoch": epoch, "stage": stage}, resolved, cfg.keep)
    bar.close()
    final = checkpoint.export_hf(model, lm, tok, out / "model")
    dist.print0(f"exported {final}")
    dist.destroy()


if __name__ == "__main__":
    config.run(main)
    dist.exit_process()
