"""Train PRMU, the reward model with user embeddings, with the Bradley–Terry loss (TagPR §3.3, Eq. 2).

    python train_prmu.py --preset tiny
    torchrun --nproc_per_node=2 train_prmu.py --preset tiny
    torchrun --nproc_per_node=8 train_prmu.py --preset qwen3-8b --backbone /models/Skywork-Reward-V2-Qwen3-0.6B

Pairs come from `prp.jsonl` (response made with the profile ≻ without) and `pqp.jsonl`
(correct / higher ROUGE ≻ worse); each is scored as r(user, prompt, response) and the
loss is −log σ(r_chosen − r_rejected) averaged over the global batch of pairs. The
backbone and the user embeddings train jointly, the embeddings with their own learning
rate. Two held-out sets: pairs of users seen in training (`--eval-frac`, by pair id) and every
pair of users held out whole (`--eval-user-frac`, by user id), which the model scores through
the unknown-user row, as RL scores a user PRMU never saw. Each is also scored with every user
replaced by the unknown row ("no_ue": what the model knows without the user). Export:
`<out>/model/{backbone/, user_embeddings.safetensors, users.json, prmu.json}`, read by
`tagpr.prmu.Scorer` (the RL reward).

Departures from the paper:
1. Without the pair files of `build_data.py`, pairs come from synthetic users
   (`tagpr.synthetic.preference_pairs`), said in the log.
2. `--no-use-user-embeddings` trains the "PRMU w/o UE" ablation.
3. Under torchrun every rank loads the (small) backbone on CPU before sharding.
4. Row 0 of the user table, the unknown user, is trained: each training pair's user is replaced
   by it with probability `--unknown-user-rate` (0.1; drawn per pair and epoch from a hash, the
   same on every rank and after a resume), so an unseen user's score comes from a learned row.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from tqdm import tqdm

from tagpr import checkpoint, config, dist, prmu, records, synthetic
from tagpr.batching import epoch_batches, held_out
from tagpr.config import COUNT, FRACTION, NO_CAP_OR_COUNT, NON_NEGATIVE, POSITIVE
from tagpr.files import DataError
from tagpr.loop import backward, begin, fsdp_micro_batches, lr_at, optimizer_step, synthetic_fallback
from tagpr.losses import bradley_terry_loss
from tagpr.models import check_model
from tagpr.prompts import without_profile
from tagpr.runlog import start_run


@dataclass
class PRMUConfig:
    backbone: str = "smollm2-135m"  # reward-model / causal-LM folder, "smollm2-135m" or "tiny"
    prp: str = ""  # prp.jsonl; empty: <run>/data/prp.jsonl (else synthetic pairs)
    pqp: str = ""  # pqp.jsonl; empty: <run>/data/pqp.jsonl (else synthetic pairs)
    out: str = "runs/default/prmu"  # output folder: config.json, metrics.jsonl, ckpt/, model/ (the export)
    use_user_embeddings: bool = True  # the learnable user-embedding token (--no-use-user-embeddings: "w/o UE")
    profile_in_input: bool = True  # the reward model reads the prompt's profile items; --no-profile-in-input: the
    # input and instruction only, so what it knows of a user comes from the user's row (not LaMP-1)
    lr: Annotated[float, POSITIVE] = 1e-5  # the backbone's learning rate
    ue_lr: Annotated[float, POSITIVE] = 1e-3  # the user embeddings' learning rate
    global_batch: Annotated[int, COUNT] = 64  # pairs per optimizer step
    micro_batch: Annotated[int, COUNT] = 4  # pairs per forward/backward on one rank
    epochs: Annotated[int, COUNT] = 1  # passes over the pairs
    max_steps: Annotated[int, NO_CAP_OR_COUNT] = -1  # stop early (quick runs); -1: all epochs
    warmup_ratio: Annotated[float, FRACTION] = 0.03  # share of the steps with a linear LR warmup
    min_lr_ratio: Annotated[float, FRACTION] = 0.1  # the cosine schedule ends at this share of --lr
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0  # AdamW's weight decay
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0  # clip the global gradient norm to this (0: no clipping)
    margin: Annotated[float, NON_NEGATIVE] = 0.0  # Bradley-Terry margin: -log sigmoid(r_chosen - r_rejected - margin)
    center_coef: Annotated[float, NON_NEGATIVE] = 0.0  # + coef * mean((r_chosen + r_rejected)^2), keeps rewards near 0
    # (~0.01)
    max_len: Annotated[int, COUNT] = 2048  # tokens per scored input (user turn + response); longer ones lose their
    # start
    eval_frac: Annotated[float, FRACTION] = 0.1  # held-out share of the seen users' pairs (by pair id hash)
    eval_user_frac: Annotated[float, FRACTION] = 0.1  # held-out share of the users (by user id hash): all their pairs,
    # scored as users PRMU never saw (through the unknown-user row)
    unknown_user_rate: Annotated[float, FRACTION] = 0.1  # each training pair's user replaced by the unknown row with
    # this probability (per epoch), so that row is trained for users PRMU never saw
    eval_every: Annotated[int, COUNT] = 50  # held-out pair accuracy every N steps (and at the end)
    save_every: Annotated[int, COUNT] = 100  # checkpoint every N steps (and at the end)
    keep: Annotated[int, COUNT] = 2  # checkpoints kept (older ones removed after a new one is in place)
    resume: str = "auto"  # "auto": latest checkpoint in <out>/ckpt if any; "": fresh; or a path. A checkpoint
    # holds pickled metadata (torch.distributed.checkpoint), so loading one runs code: resume only your own runs
    seed: Annotated[int, NON_NEGATIVE] = 0  # batch order and the tiny backbone's weights
    report_to: Literal["none", "tensorboard"] = "none"  # also log every metrics.jsonl row to <out>/tensorboard
    synthetic_users: Annotated[int, COUNT] = 200  # when falling back to synthetic users: users per task


PRESETS = {
    "tiny": dict(
        backbone="tiny",
        out="runs/tiny/prmu",
        lr=1e-3,
        ue_lr=1e-2,
        global_batch=16,
        micro_batch=8,
        epochs=1,
        max_len=1024,
        eval_every=20,
        save_every=20,
        synthetic_users=30,
    ),
    "smollm2": dict(
        backbone="smollm2-135m",
        out="runs/smollm2/prmu",
        lr=2e-5,
        ue_lr=1e-3,
        global_batch=16,
        micro_batch=4,
        max_len=1024,
        eval_every=25,
        save_every=25,
        synthetic_users=30,
    ),
    "qwen3-8b": dict(global_batch=64, micro_batch=4, max_len=4096, lr=5e-6, ue_lr=1e-3),
}


def load_pairs(cfg: PRMUConfig, out: Path) -> list[records.Pair]:
    data = out.parent / "data"
    paths = [Path(cfg.prp) if cfg.prp else data / "prp.jsonl", Path(cfg.pqp) if cfg.pqp else data / "pqp.jsonl"]
    if all(p.is_file() for p in paths):
        return records.read_pairs(paths[0]) + records.read_pairs(paths[1])
    if cfg.prp or cfg.pqp:
        missing = [str(p) for p in paths if not p.is_file()]
        raise DataError(f"{', '.join(missing)}: not found; make them with `python build_data.py`")
    made = synthetic_fallback(
        data / "pairs_synthetic.jsonl",
        data / "synthetic_lamp_prmu",
        cfg.seed,
        {"train": (cfg.synthetic_users, 2), "dev": (10, 1), "test": (10, 1)},
        synthetic.preference_pairs,
    )
    dist.print0(f"no {paths[0]} / {paths[1]}: training on synthetic users' pairs ({made})")
    return records.read_pairs(made)


def without_profile_of(p: records.Pair) -> str:
    """The pair's prompt without its profile items (--no-profile-in-input); a prompt that has none to take out is
    an error naming the pair."""
    try:
        return without_profile(p.prompt)
    except ValueError as e:
        raise DataError(f"pair {p.id} (task {p.task}), field prompt: {e}; --no-profile-in-input needs it") from e


def split_pairs(
    pairs: list[records.Pair], eval_frac: float, eval_user_frac: float
) -> tuple[list[records.Pair], list[records.Pair]]:
    """(train, held-out): every pair of a held-out user (by user id hash), and a share of the other users'
    pairs (by pair id hash). Pairs without a user belong to nobody and split by pair id."""
    gone = lambda p: bool(p.user_id) and held_out(f"user:{p.user_id}", eval_user_frac)
    evals = [p for p in pairs if gone(p) or held_out(p.id, eval_frac)]
    return [p for p in pairs if not (gone(p) or held_out(p.id, eval_frac))], evals


def summary(acc: dict) -> str:
    """The held-out accuracies a reader compares: seen / unseen users, each with and without the user."""
    part = lambda who: (
        f"{who} users {acc[f'eval_acc/{who}']:.3f} (as unknown user {acc[f'eval_acc/{who}_no_ue']:.3f})"
        if f"eval_acc/{who}" in acc
        else f"{who} users: none held out"
    )
    return f"{part('seen')}, {part('unseen')}"


def score_pairs(model, encoded, idx, device, pad_id, unknown: set[int] = frozenset()):
    """r(chosen), r(rejected) for pairs `idx`: one forward over 2·b sequences; pairs in `unknown` are scored
    as the unknown user (row 0)."""
    seqs = [encoded[i][0] for i in idx] + [encoded[i][1] for i in idx]
    rows = torch.tensor([prmu.UNKNOWN if i in unknown else encoded[i][2] for i in idx] * 2, device=device)
    ids, mask = prmu.pad_right(seqs, pad_id, device)
    r = model(ids, mask, rows)  # (2b,)
    return r[: len(idx)], r[len(idx) :]


@dataclass
class Run:
    """Everything a PRMU step reads: the config, the ranks, the model and optimizer, the encoded pairs."""

    cfg: PRMUConfig
    d: dist.Dist
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    tok: object
    users: dict[str, int]  # user id → row of the user table (0: the unknown user)
    train: list[records.Pair]
    evals: list[records.Pair]
    train_enc: list[tuple]  # (chosen ids, rejected ids, user row) per pair
    eval_enc: list[tuple]
    steps_per_epoch: int
    total: int
    warmup: int


def setup(cfg: PRMUConfig, preset: str | None) -> tuple[Run, dict, int, object]:
    """Pairs (split into train and held-out), backbone + user table (FSDP), optimizer (the user embeddings with
    their own LR); resume. → (run, resolved config, start step, metrics log)."""
    d, out = dist.get(), Path(cfg.out)
    check_model(cfg.backbone, "--backbone")
    train, evals = split_pairs(load_pairs(cfg, out), cfg.eval_frac, cfg.eval_user_frac)
    users = prmu.user_map([p.user_id for p in train])
    backbone, tok = prmu.load_backbone(cfg.backbone, cfg.seed)
    model = prmu.PRMU(backbone, len(users), cfg.use_user_embeddings)
    enc = prmu.Encoder(tok, cfg.max_len)
    shown = lambda p: p.prompt if cfg.profile_in_input else without_profile_of(p)
    encode = lambda ps: [
        (enc(shown(p), p.chosen), enc(shown(p), p.rejected), users.get(p.user_id, prmu.UNKNOWN)) for p in ps
    ]
    steps_per_epoch = math.ceil(len(train) / cfg.global_batch)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    model.train()
    model = dist.apply_fsdp(model, d.device)
    ue = [p for n, p in model.named_parameters() if n.startswith("user_embeddings")]
    rest = [p for n, p in model.named_parameters() if not n.startswith("user_embeddings")]
    opt = torch.optim.AdamW(
        [{"params": rest, "base_lr": cfg.lr}, {"params": ue, "base_lr": cfg.ue_lr}],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        betas=(0.9, 0.95),
    )
    unseen = sum(p.user_id not in users for p in evals)
    resolved = {
        **config.to_dict(cfg),
        "preset": preset,
        "world_size": d.world_size,
        "total_steps": total,
        "train_pairs": len(train),
        "eval_pairs": len(evals),
        "eval_pairs_unseen_users": unseen,
        "users": len(users),
    }
    start, log = start_run(out, cfg.resume, model, opt, resolved, cfg.report_to)
    dist.print0(
        f"PRMU {cfg.backbone} ({'with' if cfg.use_user_embeddings else 'without'} user embeddings, "
        f"{'' if cfg.profile_in_input else 'no profile in its input, '}"
        f"{len(users)} users): {len(train)} train / {len(evals)} eval pairs ({len(evals) - unseen} of seen "
        f"users, {unseen} of held-out users), {total} steps"
    )
    run = Run(
        cfg,
        d,
        model,
        opt,
        tok,
        users,
        train,
        evals,
        encode(train),
        encode(evals),
        steps_per_epoch,
        total,
        int(cfg.warmup_ratio * total),
    )
    return run, resolved, start, log


def evaluate(run: Run) -> dict:
    """Held-out pairwise accuracy (all ranks together): overall, per set and per task; of seen users (by pair)
    and of held-out users (by user); and those two with every user as the unknown row (`_no_ue`)."""
    cfg, d, model, evals = run.cfg, run.d, run.model, run.evals
    model.eval()
    hits, counts = defaultdict(float), defaultdict(float)
    with torch.no_grad():
        for idx, real in fsdp_micro_batches(list(range(d.rank, len(evals), d.world_size)), cfg.micro_batch):
            rc, rr = score_pairs(model, run.eval_enc, idx, d.device, run.tok.pad_token_id)
            nc, nr = score_pairs(model, run.eval_enc, idx, d.device, run.tok.pad_token_id, unknown=set(idx))
            if not real:
                continue
            for i, c, r, c0, r0 in zip(idx, rc.tolist(), rr.tolist(), nc.tolist(), nr.tolist()):
                who = "seen" if evals[i].user_id in run.users else "unseen"
                for key, (a, b) in (
                    ("all", (c, r)),
                    (f"set/{evals[i].set}", (c, r)),
                    (f"task/{evals[i].task}", (c, r)),
                    (who, (c, r)),
                    (f"{who}_no_ue", (c0, r0)),
                ):
                    hits[key] += float(a > b) + 0.5 * float(a == b)
                    counts[key] += 1
    model.train()
    keys = sorted(dist.broadcast_object(sorted(counts)))  # rank 0's keys: every rank sees every set and task
    return {f"eval_acc/{k}": dist.sum_scalar(hits[k]) / max(dist.sum_scalar(counts[k]), 1) for k in keys}


def train_step(run: Run, step: int) -> dict:
    """Optimizer step `step` (0-based): the epoch's batch of pairs, Bradley-Terry over this rank's share (each
    pair's user dropped to the unknown row at `--unknown-user-rate`), the update. → the metrics row."""
    cfg, d = run.cfg, run.d
    epoch, pos = divmod(step, run.steps_per_epoch)
    lengths = [len(x[0]) + len(x[1]) for x in run.train_enc]
    batch = epoch_batches(lengths, cfg.global_batch, epoch, cfg.seed)[pos]
    t0 = time.perf_counter()
    loss_sum, acc_sum = 0.0, 0.0
    dropped = {i for i in batch if held_out(f"{cfg.seed}:{epoch}:{run.train[i].id}", cfg.unknown_user_rate)}
    for rows, real in fsdp_micro_batches(batch[d.rank :: d.world_size], cfg.micro_batch):
        rc, rr = score_pairs(run.model, run.train_enc, rows, d.device, run.tok.pad_token_id, dropped)
        loss, m = bradley_terry_loss(rc, rr, cfg.margin, cfg.center_coef, num_pairs=len(batch))
        loss_sum += backward(loss, real, d.world_size).item()
        acc_sum += m["accuracy"].item() * len(rows) if real else 0.0
    loss = dist.sum_scalar(loss_sum)
    scale = lr_at(step, run.total, 1.0, run.warmup, cfg.min_lr_ratio)
    gnorm = optimizer_step(run.model, run.opt, [g["base_lr"] * scale for g in run.opt.param_groups], cfg.grad_clip)
    return {
        "step": step + 1,
        "epoch": epoch,
        "loss": loss,
        "train_acc": dist.sum_scalar(acc_sum) / len(batch),
        "lr": cfg.lr * scale,
        "ue_lr": cfg.ue_lr * scale,
        "grad_norm": gnorm,
        "pairs_per_s": len(batch) / (time.perf_counter() - t0),
    }


def main(argv=None):
    cfg, preset, d, _ = begin(PRMUConfig, PRESETS, argv, __doc__)
    run, resolved, step, log = setup(cfg, preset)
    out, last_eval = Path(cfg.out), {}
    bar = tqdm(total=run.total, initial=step, desc="prmu", disable=not d.is_main, dynamic_ncols=True)
    while step < run.total:
        row = train_step(run, step)
        step += 1
        if run.evals and (step % cfg.eval_every == 0 or step == run.total):
            last_eval = evaluate(run)
            row.update(last_eval)
        log.write(row)
        bar.update(1)
        bar.set_postfix(
            loss=f"{row['loss']:.3f}", **({"eval_acc": f"{row['eval_acc/all']:.3f}"} if "eval_acc/all" in row else {})
        )
        if step % cfg.save_every == 0 or step == run.total:
            epoch, pos = divmod(step - 1, run.steps_per_epoch)
            checkpoint.save(
                out / "ckpt", step, run.model, run.opt, {"epoch": epoch, "batch_in_epoch": pos + 1}, resolved, cfg.keep
            )
    bar.close()
    if run.total == 0 and run.evals:  # no step (--max-steps 0: an untrained reward model): its accuracy still
        last_eval = evaluate(run)
        log.write({"step": 0, **last_eval})
    if last_eval:
        dist.print0("held-out pairwise accuracy: " + summary(last_eval))
    full = checkpoint.full_state_dict(run.model)
    if d.is_main:
        saved = prmu.save(run.model, run.tok, run.users, out / "model", full, cfg.max_len, cfg.profile_in_input)
        dist.print0(f"exported {saved}")
    dist.barrier()
    dist.destroy()


if __name__ == "__main__":
    config.run(main)
    dist.exit_process()
