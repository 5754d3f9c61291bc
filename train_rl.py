"""GSPO training of the policy: guided stage (full composite reward) then exploratory stage (TagPR §3.4).

    python train_rl.py --preset tiny
    torchrun --nproc_per_node=2 train_rl.py --preset tiny
    torchrun --nproc_per_node=8 train_rl.py --preset qwen3-8b --policy runs/lamp/sft/model --prmu runs/lamp/prmu/model

One step (`gspo_step`, each phase a function below):
1. `draw_batch`: `global_batch` prompts (tasks mixed), each rank its share; `rollout`: G samples
   each with the KV-cache sampler (one prefill per group; FSDP unsharded once);
2. `score`: rewards through `tagpr.rewards`: guided R = R_v + λ1·R_f + R_rep + R_tag + λ2·R_p (Eq. 5,
   R_p from PRMU's `Scorer`), exploratory R = R_v + λ1·R_f + R_rep (Eq. 11, the same λ1);
3. group advantages (Eq. 10), then `old_logprobs`, recomputed once by the training
   model through the fused log-prob op at the sampling temperature (the first mini-batch's
   come from update 0's own forward: the policy has not moved yet);
4. `update` × `mini_batches` (paper: 4): the rollout batch split into that many optimizer
   updates (over rollouts, or whole groups with `--minibatch-by group`), so GSPO's ratio and
   clipping are live from the second one on;
   `gspo_loss` with ε_low 3e-4 / ε_high 4e-4, optional k3 KL to the frozen start policy;
5. `log_row`: the step's metrics, reduced over ranks as `losses.GSPO_REDUCE` declares.

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
   (said in the log). A prompt whose user PRMU has no row for is scored as its unknown user
   (a trained row; the log counts such prompts).
3. The exploratory stage's R_f weight is the guided stage's λ1 (`--w-format`): Eq. 11 is the
   guided reward without R_tag and R_p.
4. `--overlong mask` (off: paper) takes rollouts cut at `--max-new-tokens` out of the loss and out of
   their group's mean and std (DAPO's overlong filtering), so that "finished" no longer decides the
   advantages when many rollouts run out of tokens.
5. `--temperature`, `--group`, `--lr`, `--train-layers`, `--stratify` change the recipe; their defaults are
   the paper's (the demo's choices and what each was measured to do: docs/rl_experiments.md).
6. `--old-logp sampler` (off: recompute, as the paper and verl do) takes the old log-probs from the
   sampler's own logits instead of a no-grad pass of the training model. In fp32 the two agree to summation
   order; every mini-batch, the first included, then compares with the sampler's numbers (`ratio_min/u0`,
   `ratio_max/u0` show the gap). In bf16 their gap is larger than ε = 3e-4, so it needs departure 7.
7. `--is-correction token|sequence` (off: the paper, which assumes the sampler is the trainer) weights each
   update by the truncated ratio of the trainer's to the sampler's probability of the sampled tokens,
   w = min(π_train/π_samp, `--is-cap`), wherever both exist (`losses.mismatch_weights`): per token, the
   truncated importance sampling (TIS) of Yao et al. 2025, "Your efficient RL framework secretly brings you
   off-policy RL training" (TRL's `vllm_importance_sampling_correction`, verl's rollout correction); per
   sequence, the same at GSPO's length-normalised ratio. The trainer's π_old exists at every update when it is
   recomputed, and at update 0 alone (its own forward) with `--old-logp sampler`; the later mini-batches there
   measure their ratio against the sampler's numbers, unweighted. Logged per update: `mismatch_log_ratio/uK`,
   `is_weight_mean/uK`, `is_capped_frac/uK`.
8. `--dynamic-sampling N` (off: the paper) is DAPO's dynamic sampling (Yu et al. 2025, §3.2): after scoring,
   a group whose verifiable reward R_v is the same on every rollout (all right, all wrong; under
   `--overlong mask` among the finished ones) leaves the batch, and up to N rounds of `global_batch` fresh
   prompts (`extra_batch`) are rolled out and scored until `global_batch` groups vary in R_v; short of that,
   the earliest flat groups fill the batch as before. The rest of the step is unchanged. Its cost is the extra
   rounds' rollouts (`time/refill`); the groups carry the sampler's frozen-trunk states to whichever rank
   trains them (through the CPU), so the trainer recomputes no trunk.
   Logged: `dynamic/informative_first` (the share of the step's own groups that vary), `dynamic/informative`
   (the batch's, after the refill), `dynamic/rounds`, `dynamic/groups_sampled`.

`--eval-prompts FILE --eval-every N` (verl's `val/test_score`) scores held-out prompts
(`build_data.py` writes `eval_prompts.jsonl` from dev users) before training and every N steps:
the task's metric of the greedy answer and the mean over `--eval-samples` samples at the rollout
temperature, as `eval/held_out/<task>/<metric>_greedy|_sampled` in metrics.jsonl, each prompt's
scores in `<out>/held_out_step<N>.json`. `--eval-swap-prompts` (`eval_prompts_swap.jsonl`: the same
questions shown another user's profile) adds `eval/swap/…_greedy`, the personalization control.
It changes no training: a curve of held-out gain against steps from one run. With `--train-layers`,
`--eval-trunk-store DIR` keeps the prompts' keys/values in the frozen layers there (`engine.TrunkStore`): the
same scores, bit for bit, and every later scoring (this run's, or another run's from the same policy, pointed at
the same folder) prefills the top layers only.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from tqdm import tqdm

from tagpr import checkpoint, config, dist, lamp, lora, metrics, prompts, rewards, synthetic, tags
from tagpr import refill as refill_mod
from tagpr.batching import epoch_batches, group_pack, pad_batch, stratified_batches
from tagpr.config import ALL_OR_COUNT, AT_LEAST_ONE, COUNT, FRACTION, NO_CAP_OR_COUNT, NON_NEGATIVE, POSITIVE, TOP_P
from tagpr.engine import TrunkStore
from tagpr.files import DataError, iter_jsonl, write_json
from tagpr.hardware import autocast
from tagpr.loop import (
    accumulate,
    backward,
    begin,
    fsdp_micro_batches,
    lr_at,
    optimizer_step,
    reduce_across_ranks,
    synthetic_fallback,
)
from tagpr.losses import GSPO_REDUCE, group_advantages, gspo_loss, mismatch_weights
from tagpr.models import (
    LogprobModel,
    can_split,
    check_model,
    decoder_layers,
    load_for_sharding,
    load_model,
    load_tokenizer,
    model_config,
    resolve_model_path,
)
from tagpr.prmu import Scorer
from tagpr.records import RLPrompt, read_rl_prompts
from tagpr.runlog import MetricsLog, start_run
from tagpr.sampler import generate


@dataclass
class RLConfig:
    policy: str = "runs/default/sft/model"  # HF folder (the SFT export), "smollm2-135m" or "tiny"
    prompts: str = ""  # rl_prompts.jsonl; empty: <run>/data/rl_prompts.jsonl, else synthetic
    prmu: str = ""  # PRMU export (R_p); empty: <run>/prmu/model if there; "none": no R_p
    # term (the guided reward without λ2·R_p)
    tags: str = ""  # tags.json (R_tag's vocabulary); empty: beside the prompts, else the default
    out: str = "runs/default/rl"  # output folder: config.json, metrics.jsonl, rollouts.jsonl, ckpt/
    lr: Annotated[float, POSITIVE] = 1e-6  # learning rate (paper)
    global_batch: Annotated[int, COUNT] = 128  # prompts per rollout batch (paper)
    group: Annotated[int, COUNT] = 5  # rollouts per prompt (paper)
    mini_batches: Annotated[int, COUNT] = 4  # optimizer updates per rollout batch (paper)
    minibatch_by: Literal["rollout", "group"] = "rollout"  # mini-batches drawn over rollouts (a plain shuffle, as
    # verl and TRL) or over whole groups (each prompt's rollouts in one update: --shared-prompts computes the
    # prompt once for all of them; needs --global-batch ≥ --mini-batches)
    micro_batch: Annotated[int, COUNT] = 8  # sequences per forward/backward on one rank
    guided_epochs: Annotated[int, NON_NEGATIVE] = 13  # epochs of the guided stage (paper)
    exploratory_epochs: Annotated[int, NON_NEGATIVE] = 2  # epochs of the exploratory stage (paper)
    guided_steps: Annotated[int, NO_CAP_OR_COUNT] = -1  # steps of the guided stage, then the exploratory one
    # (short runs: e.g. --guided-steps 4 --max-steps 8 gives 4 of each); -1: --guided-epochs
    max_steps: Annotated[int, NO_CAP_OR_COUNT] = -1  # stop early (quick runs); -1: both stages' epochs
    temperature: Annotated[float, POSITIVE] = 1.0  # sampling temperature of the rollouts (paper)
    top_p: Annotated[float, TOP_P] = 1.0  # nucleus sampling of the rollouts (paper: 1, off)
    stratify: Literal["none", "task", "gold"] = "none"  # rollout batches: "none" a plain shuffle (paper);
    # "task": each task its share of every batch; "gold": each
    # (task, gold answer) its share
    max_new_tokens: Annotated[int, COUNT] = 512  # per rollout; unfinished rollouts are cut here (no answer: R_v 0)
    clip_low: Annotated[float, POSITIVE] = 3e-4  # GSPO ε_low: the ratio is clipped below at 1 - ε_low (paper)
    clip_high: Annotated[float, POSITIVE] = 4e-4  # GSPO ε_high: clipped above at 1 + ε_high (paper)
    kl_coef: Annotated[float, NON_NEGATIVE] = 0.0  # k3 KL to the frozen start policy (paper: none)
    w_format: Annotated[float, NON_NEGATIVE] = 0.5  # λ1, the weight of R_f in both stages (ours; lost from the paper)
    w_personal: Annotated[float, NON_NEGATIVE] = 0.5  # λ2, the weight of R_p (ours; lost from the paper's text)
    w_tag: Annotated[float, NON_NEGATIVE] = 1.0  # the weight of R_tag in the guided reward (paper: 1; 0: "w/o Tag")
    ngram: Annotated[int, COUNT] = 4  # R_rep's n-gram length (paper)
    min_tags: Annotated[int, NON_NEGATIVE] = 3  # R_tag: fewest tags a chain must use (paper)
    warmup_steps: Annotated[int, NON_NEGATIVE] = 0  # linear LR warmup over N optimizer updates (then constant)
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0  # clip the global gradient norm to this (0: no clipping)
    save_every: Annotated[int, COUNT] = 10  # checkpoint every N steps (and at the end)
    rollouts_every: Annotated[int, NON_NEGATIVE] = 1  # every rollout of every Nth step → rollouts.jsonl (0: none)
    keep: Annotated[int, COUNT] = 2  # checkpoints kept (older ones removed after a new one is in place)
    resume: str = "auto"  # "auto": latest checkpoint in <out>/ckpt if any; "": fresh; or a path. A checkpoint
    # holds pickled metadata (torch.distributed.checkpoint), so loading one runs code: resume only your own runs
    seed: Annotated[int, NON_NEGATIVE] = 0  # prompt order and every rollout's sampling
    report_to: Literal["none", "tensorboard"] = "none"  # also log every metrics.jsonl row to <out>/tensorboard,
    # with one prompt's rollouts as text per --rollouts-every step
    synthetic_users: Annotated[int, COUNT] = 100  # without rl_prompts.jsonl: synthetic train users per task
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # forward matmuls, rollouts too: auto = bf16 on CUDA, fp32 on
    # a CPU; bf16 on a CPU needs AVX512-BF16 or AMX (else: stops at once)
    train_layers: Annotated[int, ALL_OR_COUNT] = -1  # train only the top N decoder layers + final norm (-1: all);
    # with --lora-rank: the adapters go into the top N layers only, and nothing else trains
    lora_rank: Annotated[int, NON_NEGATIVE] = 0  # LoRA adapters of rank r instead of full weights (0: off, the paper)
    lora_alpha: Annotated[float, POSITIVE] = 16.0  # LoRA α: the adapters' update is scaled by α / r
    lora_dropout: Annotated[float, FRACTION] = 0.0  # dropout on the adapters' input; GSPO needs 0 (ratio 1 on-policy)
    lora_targets: str = "all"  # projections that get adapters: "all" (q,k,v,o,gate,up,down_proj) or a comma list
    activation_checkpointing: bool = False  # recompute each layer in the update's backward (memory for time)
    shared_prompts: bool = True  # the updates and the old log-probs compute each group's prompt once (one packed row
    # per group, each response attending to the prompt and itself); the same numbers to summation order
    trunk_cache: bool = True  # with train_layers: the frozen layers' output computed once per rollout
    # batch (kept by the sampler where it can), not in every forward
    overlong: Literal["keep", "mask"] = "keep"  # rollouts cut at max_new_tokens: "keep" them in the loss (paper) or
    # "mask" them out of it and out of their group's statistics (DAPO)
    dynamic_sampling: Annotated[int, NON_NEGATIVE] = 0  # DAPO's dynamic sampling: groups whose verifiable reward is
    # the same on every rollout leave the batch, and up to N more rounds of fresh prompts refill it (0: off, paper)
    eval_prompts: str = ""  # held-out prompts (rl_prompts format, with golds) scored greedy and
    # sampled before training and every --eval-every steps; empty: none
    eval_swap_prompts: str = ""  # the same questions shown other users' profiles (build_data's
    # eval_prompts_swap.jsonl), scored greedy alongside: the control
    eval_before: bool = True  # also score them before the first step (the start policy's row)
    eval_every: Annotated[int, NON_NEGATIVE] = 0  # score the held-out prompts every N steps and at the end (0: only
    # before training and at the end, when --eval-prompts is given)
    eval_samples: Annotated[int, NON_NEGATIVE] = 2  # samples per held-out prompt at the rollout temperature (besides
    # greedy)
    max_prompt_len: Annotated[int, NON_NEGATIVE] = 0  # tokens a prompt may have (its chat template included); 0:
    # the policy's context less --max-new-tokens
    long_prompts: Literal["error", "drop"] = "error"  # a prompt over the limit: stop before any work naming it, or
    # leave it out of training and say how many
    eval_batch: Annotated[int, NON_NEGATIVE] = 0  # held-out prompts per wave of the continuous-batching decode on
    # each rank: a wave joins when the rows still decoding leave room within 1.5 waves' rows (0: every prompt at
    # once); bounds the memory of a large held-out set, and in bf16 may change some answers
    eval_trunk_store: str = ""  # with --train-layers: a folder that keeps the held-out prompts' keys/values
    # in the frozen layers, so later scorings (this run's, and other runs' from
    # the same start policy) prefill the top layers only; empty: none
    old_logp: Literal["recompute", "sampler"] = "recompute"  # old log-probs: a no-grad pass of the training model
    # (paper) or the sampler's own; in bf16 only with --is-correction (departure 6)
    is_correction: Literal["none", "token", "sequence"] = "none"  # weight the update by the truncated ratio of
    # trainer to sampler probabilities: per token (TIS) or per sequence (GSPO's geometric mean) (departure 7)
    is_cap: Annotated[float, AT_LEAST_ONE] = 2.0  # --is-correction's cap C on the weight (verl's and ms-swift's
    # default)


PRESETS = {
    "tiny": dict(
        policy="tiny",
        out="runs/tiny/rl",
        lr=1e-4,
        global_batch=4,
        group=4,
        mini_batches=2,
        micro_batch=8,
        guided_epochs=1,
        exploratory_epochs=1,
        max_new_tokens=24,
        save_every=2,
        synthetic_users=4,
        max_steps=4,
    ),
    "smollm2": dict(
        policy="smollm2-135m",
        out="runs/smollm2/rl",
        lr=1e-6,
        global_batch=8,
        group=4,
        mini_batches=2,
        micro_batch=8,
        max_new_tokens=128,
        synthetic_users=20,
    ),
    "qwen3-8b": dict(global_batch=128, group=5, mini_batches=4, micro_batch=4, max_new_tokens=1024, rollouts_every=10),
}


def synthetic_prompts(lamp_dir: Path) -> list[RLPrompt]:
    """Every train question of the synthetic users in `lamp_dir` as an RL prompt (k = 8, recency)."""
    rows = []
    for task in synthetic.SYNTHETIC_TASKS:
        s = lamp.load_split(lamp_dir, task, "train")
        rows += [
            RLPrompt(q.id, s.task.name, q.user_id or q.id, prompts.build_prompt(s.task, q), s.golds[q.id])
            for q in s.questions
        ]
    return rows


def load_prompts(cfg: RLConfig, out: Path) -> list[RLPrompt]:
    path = Path(cfg.prompts) if cfg.prompts else out.parent / "data" / "rl_prompts.jsonl"
    if path.is_file():
        return read_rl_prompts(path)
    if cfg.prompts:
        raise DataError(f"{path}: not found; make it with `python build_data.py`")
    made = synthetic_fallback(
        out.parent / "data" / "rl_prompts_synthetic.jsonl",
        out.parent / "data" / "synthetic_lamp_rl",
        cfg.seed + 1,
        {"train": (cfg.synthetic_users, 1), "dev": (1, 1), "test": (1, 1)},
        synthetic_prompts,
    )
    dist.print0(f"no {path}: training on synthetic users' prompts ({made})")
    return read_rl_prompts(made)


def rollouts_markdown(rows: list[dict]) -> str:
    """One prompt's group of rollouts (rollouts.jsonl rows) as a TensorBoard text panel."""
    head = f"prompt `{rows[0]['prompt_id']}` ({rows[0]['task']}, user `{rows[0]['user_id']}`, gold `{rows[0]['gold']}`)"
    return head + "".join(
        f"\n\n**reward {r['reward']:.3f}, advantage {r['advantage']:+.3f}, {r['tokens']} tokens**"
        f"\n\n    " + r["text"].replace("\n", "\n    ")
        for r in rows
    )


def fit_batch(n_prompts: int, global_batch: int, world_size: int) -> int:
    """Prompts per rollout batch: `global_batch`, or, when the file holds fewer prompts, the most of them that
    the ranks share evenly (said in the log). Errors say what is needed."""
    if global_batch % world_size:
        raise config.ConfigError(f"--global-batch {global_batch} must be divisible by the {world_size} ranks")
    if n_prompts >= global_batch:
        return global_batch
    if n_prompts < world_size:
        raise DataError(
            f"{n_prompts} prompt(s) for {world_size} ranks: each rank needs at least one "
            f"(--global-batch {global_batch} wants {global_batch})"
        )
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


def prompt_limit(cfg: RLConfig, tok) -> int:
    """The most tokens a prompt may have: --max-prompt-len, else the policy's context less --max-new-tokens."""
    if cfg.max_prompt_len:
        return cfg.max_prompt_len
    path = resolve_model_path(cfg.policy)
    context = getattr(model_config(path, tok), "max_position_embeddings", None) or tok.model_max_length
    return context - cfg.max_new_tokens


def fit_prompts(
    cfg: RLConfig, data: list[RLPrompt], eval_sets: dict[str, tuple[list[RLPrompt], int]], tok
) -> list[RLPrompt]:
    """Every prompt's length against the limit, before any work: a training prompt over it stops the run naming
    its file, line and token count (or, with --long-prompts drop, leaves training, counted in the log); a held-out
    prompt over it always stops the run (its score would not be comparable)."""
    limit = prompt_limit(cfg, tok)
    if limit < 1:
        raise config.ConfigError(
            f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in the policy's context"
        )
    files = {
        "train": Path(cfg.prompts) if cfg.prompts else Path(cfg.out).parent / "data" / "rl_prompts.jsonl",
        **{n: Path(f) for n, f in (("held_out", cfg.eval_prompts), ("swap", cfg.eval_swap_prompts)) if f},
    }
    kept = []
    for name, rows in (("train", data), *((n, rows) for n, (rows, _) in eval_sets.items())):
        for p in rows:
            n = len(chat_ids(tok, p.prompt))
            if n <= limit:
                if name == "train":
                    kept.append(p)
                continue
            if name == "train" and cfg.long_prompts == "drop":
                continue
            where = f"{files[name]}:{line_of(files[name], p.id)}" if files[name].is_file() else "synthetic users"
            drop = "; --long-prompts drop leaves such prompts out" if name == "train" else ""
            raise DataError(
                f"{where}: prompt {p.id!r} has {n} tokens, over the limit of {limit} (--max-prompt-len, or the "
                f"policy's context less --max-new-tokens){drop}"
            )
    if len(kept) < len(data):
        dist.print0(f"--long-prompts drop: {len(data) - len(kept)} of {len(data)} prompts over {limit} tokens left out")
        if not kept:
            raise DataError(f"every prompt is over {limit} tokens: nothing to train on")
    return kept


def line_of(path: Path, record_id: str) -> int:
    """The line of a JSONL file that holds the record `record_id` (ids are unique: records._read checks)."""
    return next(n for n, obj in iter_jsonl(path) if obj.get("id") == record_id)


def load_vocab(cfg: RLConfig, out: Path) -> tuple[str, ...]:
    """The tag vocabulary R_tag checks: build_data's `tags.json` beside the prompts, else the default nine."""
    path = (
        Path(cfg.tags) if cfg.tags else (Path(cfg.prompts).parent if cfg.prompts else out.parent / "data") / "tags.json"
    )
    if path.is_file():
        return tags.load_tags(path)
    if cfg.tags:
        raise DataError(f"{path}: not found; `python build_data.py` writes it")
    return tags.DEFAULT_TAGS


def compute_rewards(
    cfg: RLConfig,
    stage: str,
    texts,
    batch: list[RLPrompt],
    scorer,
    vocab=tags.DEFAULT_TAGS,
    parsed: list[tags.Parsed] | None = None,
):
    """Rewards per rollout (rows prompt-major, `group` per prompt) and their components."""
    golds = [p.gold for p in batch for _ in range(cfg.group)]
    tasks = [p.task for p in batch for _ in range(cfg.group)]
    if stage == "exploratory":
        return rewards.foundation_reward(texts, golds, tasks, cfg.ngram, cfg.w_format, parsed)
    personal = None
    if scorer is not None:
        users = [p.user_id for p in batch for _ in range(cfg.group)]
        personal = scorer.score(users, [p.prompt for p in batch for _ in range(cfg.group)], texts).tolist()
    w = rewards.RewardWeights(
        w_format=cfg.w_format, w_tag=cfg.w_tag, w_personal=cfg.w_personal if scorer is not None else 0.0
    )
    return rewards.composite_reward(texts, golds, tasks, personal, w, vocab, cfg.min_tags, cfg.ngram, parsed)


def sequences(roll, device, pad_id):
    """prompt + response rows → input ids, attention mask, response mask aligned with next-token log-probs."""
    seqs, masks = [], []
    for p, r, m in zip(roll.prompt_ids, roll.response_ids.tolist(), roll.response_mask.tolist()):
        n = sum(m)
        seqs.append(p + r[:n])
        masks.append([0] * len(p) + [1] * n)
    return pad_batch(seqs, masks, pad_id, device)


@dataclass
class Run:
    """What every step uses and no step changes: config, models, optimizer, reward model, data, schedule."""

    cfg: RLConfig
    d: dist.Dist
    lm: torch.nn.Module  # the policy (for its config and the export)
    model: torch.nn.Module  # the (FSDP-wrapped) LogprobModel around it
    tok: object
    opt: torch.optim.Optimizer
    ref: torch.nn.Module | None  # the frozen start policy (k3 KL), or None
    scorer: object | None  # PRMU's Scorer (R_p), or None
    vocab: tuple[str, ...]  # R_tag's tags
    precision: str
    frozen: int  # layers below the trained top (their output cached per batch); 0: none
    data: list[RLPrompt]
    strata: list[str] | None
    steps_per_epoch: int
    guided: int  # steps of the guided stage
    updates: int  # optimizer updates in the whole run (the LR schedule's length)
    eval_sets: dict[str, tuple[list[RLPrompt], int]]  # the held-out sets (load_eval_sets)

    @property
    def per_rank(self) -> int:
        return self.cfg.global_batch // self.d.world_size


@dataclass
class Batch:
    """One step's rollout batch on this rank."""

    step: int  # 0-based
    stage: str  # "guided" | "exploratory"
    prompts: list[RLPrompt]  # this rank's share
    first: int  # global row of this rank's first rollout
    round: int = 0  # 0: the step's batch; k > 0: dynamic sampling's k-th refill


@dataclass
class Scores:
    total: list[float]  # reward per rollout (rows prompt-major)
    parts: dict[str, list[float]]  # each reward component per rollout
    adv: torch.Tensor  # (B,) group advantages
    zero_variance_frac: float
    parsed: list[tags.Parsed]  # each rollout's steps and answer (`tags.parse`, once per step)


@dataclass
class Plan:
    """The rollout batch as training rows, its mini-batches and the log-probs computed before any update."""

    x: torch.Tensor  # (B, T) prompt + response ids
    attn: torch.Tensor  # (B, T)
    rmask: torch.Tensor  # (B, T - 1) response tokens of the next-token log-probs
    sizes: list[int]  # each global mini-batch's sequence count
    minis: list[list[int]]  # this rank's rows of each mini-batch
    old: torch.Tensor  # (B, T - 1) old log-probs (recompute: mini-batch 0's come from update 0)
    sampler: torch.Tensor | None  # (B, T - 1) the sampler's log-probs (--old-logp sampler, --is-correction), or None
    trunk: torch.Tensor | None  # (B, T, H) the frozen layers' output, or None
    ref: torch.Tensor | None  # (B, T - 1) reference log-probs, or None

    def logprobs(self, run: Run, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, entropies) of `rows` at the sampling temperature, (len(rows), T − 1), 0 off the responses:
        with `--shared-prompts` from the rows packed by group (`batching.group_pack`), else row by row."""
        cfg = run.cfg
        if not cfg.shared_prompts:
            return run.model(self.x[rows], self.attn[rows], cfg.temperature, **self.top(run, rows))
        pk = group_pack(self.x, self.rmask, rows, cfg.group, run.tok.pad_token_id, self.trunk if run.frozen else None)
        lp, ent = run.model(
            pk.ids, pk.mask, cfg.temperature, position_ids=pk.pos, start=run.frozen, hidden=pk.hidden, pick=pk.pick
        )
        where = self.rmask[rows]
        zeros = lp.new_zeros(where.shape)
        return zeros.masked_scatter(where, lp), zeros.masked_scatter(where, ent)

    def top(self, run: Run, rows: list[int]) -> dict:
        """The model's keyword arguments for `rows`: log-probs at the response tokens only, from the cached trunk
        through the top layers when there is one."""
        return dict(where=self.rmask[rows], **({"start": run.frozen, "hidden": self.trunk[rows]} if run.frozen else {}))


def setup(cfg: RLConfig, preset: str | None, precision: str) -> tuple[Run, dict, int, MetricsLog, MetricsLog | None]:
    """Load prompts, policy (FSDP), reference, PRMU and optimizer; resume. → (run, resolved config, start step,
    metrics log, rollout log)."""
    d = dist.get()
    out = Path(cfg.out)
    check_model(cfg.policy, "--policy")
    adapters = lora.spec_from_flags(cfg)
    if adapters is not None and cfg.lora_dropout > 0:
        raise config.ConfigError(
            f"--lora-dropout {cfg.lora_dropout}: must be 0 in GSPO (dropout would make the rollouts' and the "
            "update's log-probs differ, so the on-policy ratio would not be 1)"
        )
    if cfg.old_logp == "sampler" and precision != "fp32" and cfg.is_correction == "none":
        raise config.ConfigError(
            f"--old-logp sampler needs --precision fp32 (not {precision}) or --is-correction token|sequence: in "
            f"{precision} the sampler's and the training model's log-probs differ by more than the clip range ε"
        )
    data = load_prompts(cfg, out)
    vocab = load_vocab(cfg, out)  # every input read before the model loads and before the first write
    eval_sets = load_eval_sets(cfg)
    data = fit_prompts(cfg, data, eval_sets, load_tokenizer(cfg.policy))
    if cfg.minibatch_by == "group" and fit_batch(len(data), cfg.global_batch, d.world_size) < cfg.mini_batches:
        raise config.ConfigError(
            f"--minibatch-by group: {fit_batch(len(data), cfg.global_batch, d.world_size)} prompts per rollout "
            f"batch cannot fill --mini-batches {cfg.mini_batches} (each update takes whole groups)"
        )
    if d.distributed:
        lm, tok, full = load_for_sharding(cfg.policy, d.is_main, d.device, cfg.seed)
    else:
        (lm, tok), full = load_model(cfg.policy, device="cpu", dtype=torch.float32, seed=cfg.seed), None
    lm.train()
    packed_attention(lm, cfg.shared_prompts)
    trainable, n_params = lora.make_trainable(lm, adapters, cfg.train_layers, cfg.seed, full)
    if adapters is not None and precision == "bf16" and not d.distributed:  # the frozen base at half the memory
        lora.hold_base_in_bf16(lm)
    # the frozen lower layers' output is a constant of the rollout batch: computed once, it feeds the old
    # log-probs and every update (the top layers alone run per update); 0: no cache
    frozen = (
        max(0, len(lm.get_decoder().layers) - cfg.train_layers)
        if cfg.trunk_cache and cfg.train_layers > 0 and can_split(lm)
        else 0
    )
    ref = LogprobModel(load_model(cfg.policy, device=d.device, seed=cfg.seed)[0]).eval() if cfg.kl_coef else None
    model = dist.apply_fsdp(
        LogprobModel(lm), d.device, cfg.activation_checkpointing, full_state=full, from_meta=d.distributed
    )
    del full
    if d.distributed:  # FSDP initialises lazily from the first module called: make it the root, not the sampler's lm
        with torch.no_grad():
            model(
                torch.full((1, 2), tok.pad_token_id, device=d.device),
                torch.ones(1, 2, dtype=torch.long, device=d.device),
            )
    scorer, known = load_scorer(cfg, out, data)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0
    )
    batch = fit_batch(len(data), cfg.global_batch, d.world_size)
    if batch != cfg.global_batch:
        dist.print0(
            f"only {len(data)} prompts: rollout batches of {batch} prompts instead of --global-batch {cfg.global_batch}"
        )
        cfg = dataclasses.replace(cfg, global_batch=batch)
    steps_per_epoch = max(1, len(data) // cfg.global_batch)
    guided = steps_per_epoch * cfg.guided_epochs if cfg.guided_steps < 0 else cfg.guided_steps
    total = guided + steps_per_epoch * cfg.exploratory_epochs
    total = total if cfg.max_steps < 0 else min(total, cfg.max_steps)
    resolved = {
        **config.to_dict(cfg),
        "preset": preset,
        "world_size": d.world_size,
        "total_steps": total,
        "guided_steps": guided,
        "prompts": len(data),
        "prompts_with_trained_user": known,
        "precision": precision,
        "trainable_params": trainable,
        "params": n_params,
    }
    start, log = start_run(out, cfg.resume, model, opt, resolved, cfg.report_to)
    samples = MetricsLog(out / "rollouts.jsonl", resume_step=start or None) if cfg.rollouts_every > 0 else None
    dist.print0(
        f"GSPO {cfg.policy}: {len(data)} prompts, {total} steps ({guided} guided) of {cfg.global_batch} "
        f"prompts × {cfg.group} rollouts, {cfg.mini_batches} updates each, on {d.world_size} rank(s), "
        f"{precision}, {trainable / 1e6:.3g}M of {n_params / 1e6:.1f}M parameters trained"
    )
    dist.print0(f"tag vocabulary: {', '.join(vocab)}")
    run = Run(
        cfg=cfg,
        d=d,
        lm=lm,
        model=model,
        tok=tok,
        opt=opt,
        ref=ref,
        scorer=scorer,
        vocab=vocab,
        precision=precision,
        frozen=frozen,
        data=data,
        strata=prompt_strata(data, cfg.stratify),
        steps_per_epoch=steps_per_epoch,
        guided=guided,
        updates=total * cfg.mini_batches,
        eval_sets=eval_sets,
    )
    return run, resolved, start, log, samples


def packed_attention(lm, shared_prompts: bool) -> None:
    """`--shared-prompts` packs each group into one row under a 4-D mask (a response sees its prompt and itself),
    which flash-attention-2 cannot take (its varlen form keeps each segment to itself): a policy loaded with it
    trains with SDPA instead (on CUDA: its memory-efficient kernel, which takes any mask). The sampler's engine has
    its own attention (SDPA); only its transformers fallback, for models the engine does not cover, follows."""
    if shared_prompts and getattr(lm.config, "_attn_implementation", None) == "flash_attention_2":
        lm.set_attn_implementation("sdpa")
        dist.print0("--shared-prompts: the training forwards use SDPA (a 4-D mask; flash-attention-2 takes none)")


def load_scorer(cfg: RLConfig, out: Path, data: list[RLPrompt]) -> tuple[Scorer | None, int]:
    """PRMU's scorer (None without a model or with --prmu none) and how many prompts' users it has a row for."""
    prmu = cfg.prmu or str(out.parent / "prmu" / "model")
    if cfg.prmu == "none" or not (cfg.prmu or (Path(prmu) / "users.json").is_file()):
        dist.print0(
            f"no PRMU model ({'--prmu none' if cfg.prmu == 'none' else f'nothing in {prmu}'}): the guided "
            "stage's reward has no R_p term; `python train_prmu.py` trains one"
        )
        return None, 0
    scorer = Scorer(prmu, device=dist.get().device)
    known = sum(p.user_id in scorer.users for p in data)
    if not scorer.profile_in_input:  # every prompt must have its profile where the reward model can take it out
        for p in data:
            try:
                prompts.without_profile(p.prompt)
            except ValueError as e:
                raise DataError(
                    f"RL prompt {p.id} (task {p.task}), field prompt: {e}; the reward model in {prmu} "
                    "reads prompts without their profile"
                ) from e
    dist.print0(
        f"R_p from the PRMU reward model in {prmu}: {known} of {len(data)} prompts' users have a trained "
        "embedding, the rest score as PRMU's unknown user"
        + ("" if scorer.profile_in_input else "; it reads each prompt without its profile")
    )
    return scorer, known


def draw_batch(run: Run, step: int) -> Batch:
    """This rank's share of step `step`'s prompts: one shuffle (or stratified draw) per epoch, the same on every
    rank, cut into global batches."""
    cfg = run.cfg
    epoch, pos = divmod(step, run.steps_per_epoch)
    order = (
        stratified_batches(run.strata, cfg.global_batch, epoch, cfg.seed)
        if run.strata
        else epoch_batches([0] * len(run.data), cfg.global_batch, epoch, cfg.seed, group_by_length=False)
    )[pos]
    r, n = run.d.rank, run.per_rank
    return Batch(
        step,
        "guided" if step < run.guided else "exploratory",
        [run.data[i] for i in order[r * n : (r + 1) * n]],
        r * n * cfg.group,
    )


def chat_ids(tok, prompt: str) -> list[int]:
    """A prompt's token ids as the policy sees it: its chat template's user turn, ready for the reply."""
    return tok(prompts.chat(tok, prompt), add_special_tokens=False)["input_ids"]


def rollout(run: Run, batch: Batch):
    """G samples per prompt, one prefill per group. Every rollout has its own generator seeded by (seed, step,
    its row in the global batch), so what it samples depends neither on the number of ranks nor on a resume."""
    cfg, tok = run.cfg, run.tok
    ids = [chat_ids(tok, p.prompt) for p in batch.prompts]
    base = cfg.seed * 1_000_003 + batch.step * 100_003 + batch.first + batch.round * 7_000_000_001
    gens = [torch.Generator(device=run.d.device).manual_seed(base + j) for j in range(len(batch.prompts) * cfg.group)]
    run.model.eval()
    roll = generate(
        run.model,
        ids,
        tok.eos_token_id,
        tok.pad_token_id,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        generator=gens,
        tokenizer=tok,
        n_per_prompt=cfg.group,
        precision=run.precision,
        keep_layers=run.frozen,
        logprobs=cfg.old_logp == "sampler" or cfg.is_correction != "none",
    )
    run.model.train()
    return roll


def score(run: Run, batch: Batch, roll) -> Scores:
    """Rewards (guided: Eq. 5; exploratory: Eq. 11) and group advantages (Eq. 10)."""
    parsed = [tags.parse(t) for t in roll.texts]
    total, parts = compute_rewards(run.cfg, batch.stage, roll.texts, batch.prompts, run.scorer, run.vocab, parsed)
    return scored(run, roll, total, parts, parsed)


def scored(run: Run, roll, total: list[float], parts: dict, parsed: list) -> Scores:
    """Scores from the rollouts' rewards: the group advantages (Eq. 10; `--overlong mask`: finished rows only)."""
    valid = roll.finished.cpu() if run.cfg.overlong == "mask" else None
    adv, m = group_advantages(torch.tensor(total, dtype=torch.float32), run.cfg.group, valid=valid)
    return Scores(total, parts, adv, float(m["zero_variance_frac"]), parsed)


def extra_batch(run: Run, step: int, k: int, seen: set[str]) -> Batch:
    """Dynamic sampling's k-th refill of step `step`: `global_batch` prompts not yet sampled this step, drawn by a
    permutation seeded by (seed, step, k), the same on every rank (prompts repeat only when too few are left);
    each rank its share."""
    cfg = run.cfg
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + k)
    perm = torch.randperm(len(run.data), generator=gen).tolist()
    order = [i for i in perm if run.data[i].id not in seen]
    while len(order) < cfg.global_batch:
        order += perm
    r, n = run.d.rank, run.per_rank
    stage = "guided" if step < run.guided else "exploratory"
    return Batch(step, stage, [run.data[i] for i in order[r * n : (r + 1) * n]], r * n * cfg.group, round=k)


def refill(run: Run, batch: Batch, roll, scores: Scores) -> tuple[Batch, object, Scores, dict]:
    """DAPO's dynamic sampling (`tagpr.refill`): the step's groups whose R_v is flat leave the batch, and rounds of
    fresh prompts (at most --dynamic-sampling) refill it with informative ones. Every rank sees every group (they
    are gathered), so all take the same decisions and 1 rank or N make the same batch; the chosen groups, in the
    order sampled, are dealt out again as the step's batch. → (batch, rollouts, scores, metrics)."""
    cfg, mask = run.cfg, run.cfg.overlong == "mask"

    def gathered(b: Batch, r, sc: Scores) -> list[refill_mod.Group]:
        mine = refill_mod.split_groups(b.prompts, r, sc.total, sc.parts, sc.parsed, mask)
        return [g for rank in dist.gather_objects(mine) for g in rank]

    pool = gathered(batch, roll, scores)
    first = sum(g.informative for g in pool) / len(pool)
    rounds = 0
    while sum(g.informative for g in pool) < cfg.global_batch and rounds < cfg.dynamic_sampling:
        rounds += 1
        extra = extra_batch(run, batch.step, rounds, {g.prompt.id for g in pool})
        r = rollout(run, extra)
        pool += gathered(extra, r, score(run, extra, r))
    picked = refill_mod.choose(pool, cfg.global_batch)
    info = {
        "dynamic/informative_first": first,
        "dynamic/informative": sum(pool[i].informative for i in picked) / len(picked),
        "dynamic/rounds": rounds,
        "dynamic/groups_sampled": len(pool),
    }
    if picked == list(range(cfg.global_batch)):  # the step's own batch: keep its rollouts (and kept hidden states)
        return batch, roll, scores, info
    n = run.per_rank
    groups = [pool[i] for i in picked[run.d.rank * n : (run.d.rank + 1) * n]]
    prompts_, roll, total, parts, parsed = refill_mod.join(groups, run.tok.pad_token_id)
    batch = dataclasses.replace(batch, prompts=prompts_)
    return batch, roll, scored(run, roll, total, parts, parsed), info


def global_minibatches(prompts: int, group: int, n: int, by: str, seed: int) -> list[torch.Tensor]:
    """The rollout batch's global rows (prompt-major: prompt p's rollouts are rows p·group … p·group + group − 1)
    cut into `n` mini-batches from one seeded permutation, the same on every rank: of the rows (`by="rollout"`),
    or of the prompts, each taking its whole group (`"group"`)."""
    gen = torch.Generator().manual_seed(seed)
    if by == "group":
        picks = torch.randperm(prompts, generator=gen).chunk(n)
        return [(p[:, None] * group + torch.arange(group)).flatten() for p in picks]
    return list(torch.randperm(prompts * group, generator=gen).chunk(n))


def old_logprobs(run: Run, batch: Batch, roll) -> Plan:
    """The training rows, the mini-batches, and the log-probs every update compares with, at the sampling
    temperature, by the training model. Mini-batches come from one permutation of the global batch, so 1 rank
    and N ranks make the same updates. Mini-batch 0 takes its old log-probs from update 0's own forward (the
    policy has not moved yet: its ratio is exactly 1); the other rows need one no-grad pass now. With
    `--old-logp sampler` every row's come from the sampler (no pass); with `--is-correction` mini-batch 0's still
    come from update 0's forward."""
    cfg, model, dev = run.cfg, run.model, run.d.device
    x, attn, rmask = sequences(roll, dev, run.tok.pad_token_id)
    chunks = global_minibatches(cfg.global_batch, cfg.group, cfg.mini_batches, cfg.minibatch_by, cfg.seed + batch.step)
    minis = [[int(r) - batch.first for r in mini if batch.first <= int(r) < batch.first + len(x)] for mini in chunks]
    plan = Plan(
        x=x,
        attn=attn,
        rmask=rmask,
        sizes=[len(c) for c in chunks],
        minis=minis,
        old=torch.zeros(len(x), x.shape[1] - 1, device=dev),
        sampler=None,
        trunk=None,
        ref=None,
    )
    kept = roll.kept_rows(x.shape[1]) if run.frozen else None  # the sampler's trunk: no pass of its own
    plan.trunk = kept.to(dev) if kept is not None else None  # (a refilled batch's comes from the CPU)
    with torch.no_grad(), autocast(dev, run.precision):
        if run.frozen and plan.trunk is None:  # the sampler could not keep it (transformers' fallback path)
            plan.trunk = torch.zeros(*x.shape, run.lm.config.hidden_size, device=dev)
            for rows, real in fsdp_micro_batches(list(range(len(x))), cfg.micro_batch):
                h = model(x[rows], attn[rows], upto=run.frozen)
                if real:
                    plan.trunk[rows] = h
        if roll.logprobs is not None:  # the sampler's, in the training rows' layout (both row-major over responses)
            plan.sampler = torch.zeros_like(plan.old)
            plan.sampler[rmask.bool()] = roll.logprobs[roll.response_mask.bool()].to(dev)
            if cfg.old_logp == "sampler":
                plan.old = plan.sampler
        rest = sorted(r for mini in minis[1:] for r in mini) if cfg.old_logp == "recompute" else []
        for rows, real in fsdp_micro_batches(rest, cfg.micro_batch):
            lp = plan.logprobs(run, rows)[0]
            if real:
                plan.old[rows] = lp
        if run.ref is not None:
            plan.ref = torch.cat(
                [
                    run.ref(
                        x[a : a + cfg.micro_batch],
                        attn[a : a + cfg.micro_batch],
                        cfg.temperature,
                        where=rmask[a : a + cfg.micro_batch],
                    )[0]
                    for a in range(0, len(x), cfg.micro_batch)
                ]
            )
    return plan


@dataclass
class Update:
    """What one optimizer update reports, on this rank."""

    stats: dict[str, float]  # GSPO's metrics of this rank's rows, to be reduced as GSPO_REDUCE says
    entropy_sum: float  # the policy's entropy summed over this rank's response tokens
    tokens: float  # this rank's response tokens
    grad_norm: float  # the global gradient norm before clipping


MISMATCH = ("mismatch_log_ratio", "is_weight_mean", "is_capped_frac")  # mismatch_weights' metrics


def corrected(cfg: RLConfig, k: int) -> bool:
    """Whether update k weights by π_train/π_sampler (departure 7): with --is-correction, wherever the trainer's
    old log-probs exist, i.e. every update when they are recomputed, update 0 alone with --old-logp sampler."""
    return cfg.is_correction != "none" and (k == 0 or cfg.old_logp == "recompute")


def update(run: Run, batch: Batch, plan: Plan, scores: Scores, k: int) -> Update:
    """Optimizer update `k` on mini-batch k (GSPO's loss, Eq. 10)."""
    cfg, dev = run.cfg, run.d.device
    stats: dict[str, float] = {}
    ent_sum = ent_n = 0.0
    n_mini = plan.sizes[k]
    mini = sorted(plan.minis[k]) if cfg.shared_prompts else plan.minis[k]  # group-mates in one micro-batch
    for rows, real in fsdp_micro_batches(mini, cfg.micro_batch):
        with autocast(dev, run.precision):
            logp, ent = plan.logprobs(run, rows)
        # update 0's own forward is the trainer's π_old: the paper's path, and --is-correction's in sampler mode
        own = k == 0 and (cfg.old_logp == "recompute" or cfg.is_correction != "none")
        old = logp.detach() if own else plan.old[rows]
        w, mm = None, {}
        if corrected(cfg, k):  # the trainer's and the sampler's log-probs both exist: weight by their truncated ratio
            w, mm = mismatch_weights(old, plan.sampler[rows], plan.rmask[rows], cfg.is_correction, cfg.is_cap)
        loss, m = gspo_loss(
            logp,
            old,
            scores.adv[rows].to(dev),
            plan.rmask[rows],
            clip_low=cfg.clip_low,
            clip_high=cfg.clip_high,
            num_sequences=n_mini,
            ref_logp=plan.ref[rows] if plan.ref is not None else None,
            kl_coef=cfg.kl_coef,
            weights=w,
        )
        m.update(mm)
        backward(loss, real, run.d.world_size)
        if real:
            accumulate(stats, m, GSPO_REDUCE, len(rows) / n_mini)  # weight: this rank's share of the mini-batch
            ent_sum += float((ent.detach() * plan.rmask[rows]).sum())
            ent_n += float(plan.rmask[rows].sum())
    gnorm = optimizer_step(
        run.model,
        run.opt,
        lr_at(batch.step * cfg.mini_batches + k, run.updates, cfg.lr, cfg.warmup_steps, 1.0),
        cfg.grad_clip,
    )
    return Update(stats=stats, entropy_sum=ent_sum, tokens=ent_n, grad_norm=gnorm)


def log_row(
    run: Run, batch: Batch, roll, scores: Scores, updates: list[Update], times: dict[str, float], tokens: float
) -> dict:
    """The step's metrics.jsonl row, every number reduced over all ranks (the same keys on every rank: these are
    collectives). `times`: each phase's seconds (→ `time/<phase>`); `tokens`: this rank's tokens generated in
    `time/rollout` (the step's first round)."""
    cfg = run.cfg
    parsed = scores.parsed
    mean = lambda xs: dist.sum_scalar(sum(xs)) / dist.sum_scalar(len(xs))
    row = {
        "step": batch.step + 1,
        "stage": batch.stage,
        "lr": run.opt.param_groups[0]["lr"],
        "grad_norm": updates[-1].grad_norm,
        "reward": mean(scores.total),
        **{f"reward/{k}": mean(v) for k, v in scores.parts.items()},
        "adv_mean": mean(scores.adv.tolist()),
        "adv_abs_mean": mean(scores.adv.abs().tolist()),
        "zero_variance_frac": dist.sum_scalar(scores.zero_variance_frac) / run.d.world_size,
        "entropy": dist.sum_scalar(sum(u.entropy_sum for u in updates))
        / max(dist.sum_scalar(sum(u.tokens for u in updates)), 1),
        "response_len": mean(roll.lengths.tolist()),
        "finished_frac": mean(roll.finished.float().tolist()),
        "tag_count": mean([len(p.steps) for p in parsed]),
        "tag_valid": mean([float(all(tags.check(p, run.vocab, cfg.min_tags).values())) for p in parsed]),
        "tokens_per_s": dist.sum_scalar(tokens) / times["rollout"],
        **{f"time/{k}": v for k, v in times.items()},
    }
    names = [n for n in GSPO_REDUCE if (n != "kl" or run.ref is not None) and n not in MISMATCH]
    for k, u in enumerate(updates):
        these = names + (list(MISMATCH) if corrected(cfg, k) else [])
        row.update({f"{n}/u{k}": v for n, v in reduce_across_ranks(u.stats, these, GSPO_REDUCE).items()})
    return row


def rollout_rows(run: Run, batch: Batch, roll, scores: Scores, plan: Plan) -> list[dict]:
    """rollouts.jsonl rows of this rank's rollouts: prompt, text, reward and parts, advantage, tokens, mini-batch."""
    mini_of = {j: k for k, mini in enumerate(plan.minis) for j in mini}  # this rank's row → its mini-batch
    tokens = roll.lengths.tolist()
    return [
        {
            "step": batch.step + 1,
            "stage": batch.stage,
            "row": batch.first + j,
            "prompt_id": p.id,
            "user_id": p.user_id,
            "task": p.task,
            "gold": p.gold,
            "text": text,
            "reward": scores.total[j],
            "parts": {k: v[j] for k, v in scores.parts.items()},
            "advantage": float(scores.adv[j]),
            "tokens": int(tokens[j]),
            "finished": bool(roll.finished[j]),
            "mini_batch": mini_of[j],
        }
        for j, text in enumerate(roll.texts)
        for p in [batch.prompts[j // run.cfg.group]]
    ]


def load_eval_sets(cfg: RLConfig) -> dict[str, tuple[list[RLPrompt], int]]:
    """{"held_out": (prompts, samples per prompt), "swap": (prompts, 0)} from --eval-prompts / --eval-swap-prompts."""
    sets = {}
    for name, f, k in (("held_out", cfg.eval_prompts, cfg.eval_samples), ("swap", cfg.eval_swap_prompts, 0)):
        if f and not Path(f).is_file():
            raise DataError(
                f"{f}: not found; `python build_data.py` writes eval_prompts.jsonl and eval_prompts_swap.jsonl"
            )
        if f:
            sets[name] = (read_rl_prompts(f), k)
    return sets


def held_out(
    run: Run, sets: dict[str, tuple[list[RLPrompt], int]], scores_path: Path | None = None
) -> dict[str, float]:
    """Each held-out set's task metric (`metrics.per_question`: accuracy, |error| or ROUGE-1): greedy, and the mean
    over k samples at the rollout temperature where the set has k > 0. Every rank answers its share (the same
    count on each, for FSDP), every set in one `generate` call; the samples' generators are fixed per prompt, so
    every evaluation of a run draws the same noise. Each score comes with its parse split (`metrics.parses`): the
    share of answers that parse, and for the samples the score among parsed answers. `scores_path`: also write
    each prompt's scores and the texts they score there ({set: {id: {greedy, greedy_parsed, sampled, samples,
    samples_parsed, texts}}}: texts[0] the greedy answer, then the samples)."""
    cfg, tok, d = run.cfg, run.tok, run.d
    row: dict[str, float] = {}
    per_prompt: dict[str, dict[str, dict[str, float]]] = {}
    run.model.eval()
    n_layers = len(decoder_layers(run.model))
    store = (
        TrunkStore(cfg.eval_trunk_store, n_layers - cfg.train_layers)
        if cfg.eval_trunk_store and 0 < cfg.train_layers < n_layers
        else None
    )
    # every set's rows in one decode loop (groups of each set's size: `generate`'s n_per_prompt per prompt), so a
    # decode step reads the weights once for the held-out groups and the swap control's greedy rows together
    parts, ids, gens, flags, sizes = {}, [], [], [], []
    for name, (data, k) in sets.items():
        per = -(-len(data) // d.world_size)
        mine = list(range(d.rank * per, min(len(data), (d.rank + 1) * per)))
        p_ids = [chat_ids(tok, data[i].prompt) for i in mine]
        p_ids += [p_ids[-1] if p_ids else chat_ids(tok, data[0].prompt)] * (per - len(mine))  # padding, not scored
        # one prefill per prompt: row 0 of its group greedy, rows 1..k sampled (generators by global prompt index)
        gens += [
            torch.Generator(device=d.device).manual_seed(2_000_003 * (i + 1) + j - 1)
            for i in mine + [len(data)] * (per - len(mine))
            for j in range(k + 1)
        ]
        flags += [j == 0 for _ in p_ids for j in range(k + 1)]
        parts[name] = (mine, len(flags) - len(p_ids) * (k + 1), len(flags))
        ids += p_ids
        sizes += [k + 1] * len(p_ids)
    # continuous batching in waves of --eval-batch prompts: a wave is admitted once the rows still decoding leave room
    # for it within 1.5 waves' rows (the memory bound), so the decode steps stay full while prompts wait; the waves
    # are the chunks the trunk store keys (one call per rank: FSDP's collectives stay in step)
    chunk = cfg.eval_batch or max(1, len(ids))
    most = max((sum(sizes[c : c + chunk]) for c in range(0, len(ids), chunk)), default=1)
    texts = generate(
        run.model,
        ids,
        tok.eos_token_id,
        tok.pad_token_id,
        cfg.max_new_tokens,
        cfg.temperature,
        cfg.top_p,
        greedy=flags,
        generator=gens,
        tokenizer=tok,
        n_per_prompt=sizes,
        precision=run.precision,
        trunk=store,
        batch_rows=most + most // 2,
        wave=chunk,
    ).texts
    for name, (data, k) in sets.items():
        mine, a, b = parts[name]
        greedy = texts[a : b : k + 1]
        sampled = [t for j, t in enumerate(texts[a:b]) if j % (k + 1)] if k else None
        for task in sorted({p.task for p in data}):
            metric = metrics.PRIMARY[lamp.get_task(task).kind]
            key = f"eval/{name}/{task}/{metric}"
            rows = [(j, data[i]) for j, i in enumerate(mine) if data[i].task == task]
            answers = [rewards.extract_answer(greedy[j]) for j, _ in rows]
            g = metrics.per_question(task, [p.gold for _, p in rows], answers)
            g_ok = [metrics.parses(task, x) for x in answers]
            n = dist.sum_scalar(len(rows))
            row[f"{key}_greedy"] = dist.sum_scalar(sum(g)) / n
            row[f"eval/{name}/{task}/parsed_greedy"] = dist.sum_scalar(sum(g_ok)) / n
            mine_scores = {
                p.id: {"greedy": x, "greedy_parsed": ok, "texts": [greedy[j]]} for (j, p), x, ok in zip(rows, g, g_ok)
            }
            if sampled is not None:
                answers = [rewards.extract_answer(sampled[j * k + x]) for j, _ in rows for x in range(k)]
                s = metrics.per_question(task, [p.gold for _, p in rows for _ in range(k)], answers)
                s_ok = [metrics.parses(task, x) for x in answers]
                row[f"{key}_sampled"] = dist.sum_scalar(sum(s)) / (n * k)
                row[f"eval/{name}/{task}/parsed_sampled"] = dist.sum_scalar(sum(s_ok)) / (n * k)
                parsed_n = dist.sum_scalar(sum(s_ok))
                if parsed_n:  # the same on every rank (a reduced count), so every rank joins the collective or none
                    row[f"{key}_sampled_among_parsed"] = (
                        dist.sum_scalar(sum(x for x, ok in zip(s, s_ok) if ok)) / parsed_n
                    )
                for i, (j, p) in enumerate(rows):
                    mine_scores[p.id]["texts"] += sampled[j * k : (j + 1) * k]
                    mine_scores[p.id].update(
                        sampled=sum(s[i * k : (i + 1) * k]) / k,
                        samples=s[i * k : (i + 1) * k],
                        samples_parsed=s_ok[i * k : (i + 1) * k],
                    )
            for part in dist.gather_objects(mine_scores):
                per_prompt.setdefault(name, {}).update(part)
    run.model.train()
    if store is not None:
        dist.print0(
            f"held-out prefills: the bottom {store.layers} layers from {store.folder} "
            f"({store.hits} found, {store.misses} computed and kept)"
        )
    if scores_path is not None and d.is_main:
        write_json(scores_path, per_prompt)
    return row


def gspo_step(run: Run, step: int, keep_rollouts: bool) -> tuple[dict, list[dict]]:
    """One GSPO step: rollout → score → old log-probs → `mini_batches` updates (≥ 2: ratio and clipping live)
    → log. → (metrics row, this rank's rollout rows when `keep_rollouts`)."""
    batch = draw_batch(run, step)
    t0 = time.perf_counter()
    roll = rollout(run, batch)
    t1 = time.perf_counter()
    scores = score(run, batch, roll)
    t2 = time.perf_counter()
    tokens, info = float(roll.lengths.sum()), {}
    if run.cfg.dynamic_sampling:
        batch, roll, scores, info = refill(run, batch, roll, scores)
    t_refill = time.perf_counter()
    plan = old_logprobs(run, batch, roll)
    t3 = time.perf_counter()
    updates = [update(run, batch, plan, scores, k) for k in range(run.cfg.mini_batches)]
    t4 = time.perf_counter()
    times = {"rollout": t1 - t0, "reward": t2 - t1, "old_logp": t3 - t_refill, "update": t4 - t3}
    if run.cfg.dynamic_sampling:
        times["refill"] = t_refill - t2  # the extra rounds' rollouts and rewards, and the gathering
    row = log_row(run, batch, roll, scores, updates, times, tokens) | info
    return row, rollout_rows(run, batch, roll, scores, plan) if keep_rollouts else []


def main(argv=None):
    cfg, preset, d, precision = begin(RLConfig, PRESETS, argv, __doc__)
    run, resolved, step, log, samples = setup(cfg, preset, precision)
    cfg, total = run.cfg, resolved["total_steps"]
    eval_sets = run.eval_sets
    if eval_sets and step == 0 and cfg.eval_before:
        t0 = time.perf_counter()
        before = held_out(run, eval_sets, Path(cfg.out) / "held_out_step0.json")
        log.write({"step": 0, **before, "time/held_out": time.perf_counter() - t0})
        dist.print0("held out, before training: " + ", ".join(f"{k[5:]} {v:.3f}" for k, v in before.items()))
    bar = tqdm(total=total, initial=step, desc="gspo", disable=not d.is_main, dynamic_ncols=True)
    while step < total:
        keep = samples is not None and (step + 1) % cfg.rollouts_every == 0
        row, mine = gspo_step(run, step, keep)
        step += 1
        if keep:
            samples.write_rows([r for part in dist.gather_objects(mine) for r in part])  # global row order
            log.text("rollouts", rollouts_markdown(mine[: cfg.group]), step)
        if eval_sets and ((cfg.eval_every and step % cfg.eval_every == 0) or step == total):
            t0 = time.perf_counter()
            row.update(held_out(run, eval_sets, Path(cfg.out) / f"held_out_step{step}.json"))
            row["time/held_out"] = time.perf_counter() - t0
            dist.print0(
                f"held out, step {step}: "
                + ", ".join(f"{k[5:]} {v:.3f}" for k, v in row.items() if k.startswith("eval/"))
            )
        log.write(row)
        bar.update(1)
        bar.set_postfix(
            stage=row["stage"][0], reward=f"{row['reward']:.3f}", clip=f"{row.get('clip_frac_high/u1', 0):.2f}"
        )
        if step % cfg.save_every == 0 or step == total:
            checkpoint.save(
                Path(cfg.out) / "ckpt",
                step,
                run.model,
                run.opt,
                {"epoch": (step - 1) // run.steps_per_epoch, "stage": row["stage"]},
                resolved,
                cfg.keep,
            )
    bar.close()
    final = checkpoint.export_hf(run.model, run.lm, run.tok, Path(cfg.out) / "model")
    dist.print0(f"exported {final}")
    dist.destroy()


if __name__ == "__main__":
    config.run(main)
    dist.exit_process()
