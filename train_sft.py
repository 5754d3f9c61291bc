"""Supervised fine-tuning on tagged reasoning chains (TagPR §3.4, Eq. 4).

    python train_sft.py --preset tiny                          # CPU, seconds
    torchrun --nproc_per_node=2 train_sft.py --preset tiny     # 2 CPU processes (gloo, FSDP2)
    torchrun --nproc_per_node=8 train_sft.py --preset qwen3-8b --model /models/Qwen3-8B --sft runs/x/data/sft.jsonl

Maximises log π(chain, answer | prompt): the loss is the token mean of −log π over the
chain + answer + EOS tokens of the whole global batch (prompt tokens are context only),
through `tagpr_kernels.logprob` (no [N, V] logits). AdamW, linear warmup + cosine decay,
gradient clipping; FSDP2 across ranks; exact resume; HF export in `<out>/model`.

Departures from the paper:
1. Without `sft.jsonl` (from `build_data.py`), the data are synthetic users' expert
   chains written from their latent rules (`tagpr.synthetic.sft_records`), said in the log.
2. Sequences longer than `--max-len` are an error unless `--skip-long` (then counted).
3. Packing (`--pack auto`: on with flash-attention-2) puts several sequences in one row
   with restarting position ids; attention stays inside each sequence, so the loss is
   the same as with padding (tested), with less padding.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from tqdm import tqdm

from tagpr import checkpoint, config, dist, lora, prompts, records, synthetic
from tagpr.batching import epoch_batches, held_out, pack_rows, packed_batch, pad_batch
from tagpr.config import ALL_OR_COUNT, COUNT, FRACTION, NO_CAP_OR_COUNT, NON_NEGATIVE, POSITIVE
from tagpr.files import DataError
from tagpr.hardware import autocast
from tagpr.loop import backward, begin, fsdp_micro_batches, lr_at, optimizer_step, synthetic_fallback
from tagpr.losses import sft_loss
from tagpr.models import (
    LogprobModel,
    attention_implementation,
    check_model,
    load_for_sharding,
    load_model,
)
from tagpr.runlog import start_run


@dataclass
class SFTConfig:
    model: str = "smollm2-135m"  # HF folder, "smollm2-135m" or "tiny"
    sft: str = ""  # sft.jsonl; empty: <run>/data/sft.jsonl, else synthetic expert chains
    out: str = "runs/default/sft"  # output folder: config.json, metrics.jsonl, ckpt/, model/ (the export)
    lr: Annotated[float, POSITIVE] = 1e-5  # peak learning rate (paper)
    global_batch: Annotated[int, COUNT] = 64  # sequences per optimizer step, all ranks (paper)
    micro_batch: Annotated[int, COUNT] = 4  # sequences per forward/backward on one rank
    epochs: Annotated[int, COUNT] = 2  # passes over the chains (paper)
    max_steps: Annotated[int, NO_CAP_OR_COUNT] = -1  # stop early (quick runs); -1: all epochs
    warmup_ratio: Annotated[float, FRACTION] = 0.03  # share of the steps with a linear LR warmup
    min_lr_ratio: Annotated[float, FRACTION] = 0.1  # the cosine schedule ends at this share of --lr
    weight_decay: Annotated[float, NON_NEGATIVE] = 0.0  # AdamW's weight decay
    grad_clip: Annotated[float, NON_NEGATIVE] = 1.0  # clip the global gradient norm to this (0: no clipping)
    max_len: Annotated[int, COUNT] = 2048  # tokens per sequence (prompt + chain + answer)
    skip_long: bool = False  # drop records longer than --max-len (counted) instead of stopping with an error
    group_by_length: bool = True  # batches of similar lengths (less padding); the batch order stays random
    pack: Literal["auto", "on", "off"] = "auto"  # pack sequences into rows of --max-len (auto: when flash-attn is used)
    eval_frac: Annotated[float, FRACTION] = 0.05  # held-out share of the records (by id hash)
    eval_every: Annotated[int, COUNT] = 50  # held-out loss every N steps (and at the end)
    save_every: Annotated[int, COUNT] = 100  # checkpoint every N steps (and at the end)
    keep: Annotated[int, COUNT] = 2  # checkpoints kept (older ones removed after a new one is in place)
    resume: str = "auto"  # "auto": latest checkpoint in <out>/ckpt if any; "": fresh; or a path. A checkpoint
    # holds pickled metadata (torch.distributed.checkpoint), so loading one runs code: resume only your own runs
    seed: Annotated[int, NON_NEGATIVE] = 0  # batch order and the tiny model's weights
    report_to: Literal["none", "tensorboard"] = "none"  # also log every metrics.jsonl row to <out>/tensorboard
    activation_checkpointing: bool = False  # recompute each layer in the backward (memory for time)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # forward matmuls: auto = bf16 on CUDA, fp32 on a CPU; bf16
    # (autocast) on a CPU needs AVX512-BF16 or AMX, else the run stops before any work
    train_layers: Annotated[int, ALL_OR_COUNT] = -1  # train only the top N decoder layers + final norm (-1: all);
    # with --lora-rank: the adapters go into the top N layers only, and nothing else trains
    lora_rank: Annotated[int, NON_NEGATIVE] = 0  # LoRA adapters of rank r instead of full weights (0: off, the paper)
    lora_alpha: Annotated[float, POSITIVE] = 16.0  # LoRA α: the adapters' update is scaled by α / r
    lora_dropout: Annotated[float, FRACTION] = 0.0  # dropout on the adapters' input
    lora_targets: str = "all"  # projections that get adapters: "all" (q,k,v,o,gate,up,down_proj) or a comma list
    synthetic_users: Annotated[int, COUNT] = 200  # when falling back to synthetic users: train users per task


PRESETS = {
    "tiny": dict(
        model="tiny",
        out="runs/tiny/sft",
        lr=2e-3,
        global_batch=16,
        micro_batch=8,
        epochs=3,
        max_len=1024,
        eval_every=20,
        save_every=20,
        synthetic_users=40,
        warmup_ratio=0.05,
    ),
    "smollm2": dict(
        model="smollm2-135m",
        out="runs/smollm2/sft",
        lr=5e-5,
        global_batch=16,
        micro_batch=4,
        epochs=1,
        max_len=1024,
        eval_every=25,
        save_every=25,
        synthetic_users=40,
    ),
    "qwen3-8b": dict(
        global_batch=64, micro_batch=2, max_len=4096, activation_checkpointing=True, eval_every=50, save_every=100
    ),
}


def load_records(cfg: SFTConfig, out: Path) -> list[records.SFTRecord]:
    path = Path(cfg.sft) if cfg.sft else out.parent / "data" / "sft.jsonl"
    if path.is_file():
        return records.read_sft(path)
    if cfg.sft:
        raise DataError(f"{path}: file not found; make it with `python build_data.py`")
    # no data yet: synthetic users' expert chains (written once, by rank 0)
    made = synthetic_fallback(
        out.parent / "data" / "sft_synthetic.jsonl",
        out.parent / "data" / "synthetic_lamp",
        cfg.seed,
        {"train": (cfg.synthetic_users, 2), "dev": (20, 2), "test": (20, 2)},
        synthetic.sft_records,
    )
    dist.print0(f"no {path}: training on synthetic users' expert chains ({made}); `build_data.py` makes real data")
    return records.read_sft(made)


def tokenize(records, tok, cfg: SFTConfig):
    """→ list of (ids, mask) with mask 1 on chain + answer + EOS tokens."""
    out, skipped = [], 0
    for r in records:
        p = tok(prompts.chat(tok, r.prompt), add_special_tokens=False)["input_ids"]
        t = tok(r.target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        if len(p) + len(t) > cfg.max_len:
            if not cfg.skip_long:
                raise DataError(
                    f"record id={r.id} ({r.task}): {len(p) + len(t)} tokens > --max-len {cfg.max_len}; "
                    "raise --max-len or pass --skip-long"
                )
            skipped += 1
            continue
        out.append((p + t, [0] * len(p) + [1] * len(t)))
    return out, skipped


def run_batch(
    model,
    data,
    micro_batches,
    pad_id,
    device,
    num_tokens,
    world,
    train: bool,
    packed: bool = False,
    precision: str = "fp32",
):
    """Forward (+ backward) over this rank's micro-batches; returns the summed loss share.

    A micro-batch is a list of sequence indices, or with `packed` a list of rows of them;
    an empty one runs a dummy sequence with zero loss so FSDP's collectives stay in step."""
    total = 0.0
    seqs, masks = [x[0] for x in data], [x[1] for x in data]
    for mb in micro_batches:
        empty = not mb
        if empty:
            ids, attn, tgt = pad_batch([[pad_id, pad_id]], [[0, 0]], pad_id, device)
            pos = None
        elif packed:
            ids, pos, tgt = packed_batch(mb, seqs, masks, pad_id, device)
            attn = None
        else:
            ids, attn, tgt = pad_batch([seqs[i] for i in mb], [masks[i] for i in mb], pad_id, device)
            pos = None
        with autocast(device, precision):
            logp, _ = model(ids, attn, position_ids=pos, where=tgt)  # (b, T−1), 0 off the targets
        loss, _ = sft_loss(logp, tgt, num_tokens)
        if train:
            loss = backward(loss, not empty, world)
        elif empty:
            loss = loss * 0.0
        total += loss.item()
    return total


def plan_micro_batches(batch, data, cfg, d, packed: bool):
    """This rank's micro-batches of a global batch (of sequences, or with `packed` of packed rows); the same
    count on every rank, an empty one where a rank is short (`run_batch` runs it with zero loss)."""
    mine = batch[d.rank :: d.world_size]
    units = pack_rows(mine, [len(x[0]) for x in data], cfg.max_len) if packed else mine
    return [mb if real else [] for mb, real in fsdp_micro_batches(units, cfg.micro_batch)]


def tokens_in(micro, packed: bool):
    return [i for mb in micro for i in ((j for row in mb for j in row) if packed else mb)]


@dataclass
class Run:
    """Everything an SFT step reads: the config, the ranks, the model (FSDP) and its HF core, the tokenized data."""

    cfg: SFTConfig
    d: dist.Dist
    model: torch.nn.Module  # LogprobModel(lm), sharded
    lm: torch.nn.Module  # the transformers model inside (the export reads it)
    opt: torch.optim.Optimizer
    tok: object
    train: list[tuple]  # (ids, loss mask) per sequence
    evals: list[tuple]
    packed: bool
    precision: str
    steps_per_epoch: int
    total: int
    warmup: int


def setup(cfg: SFTConfig, preset: str | None, precision: str) -> tuple[Run, dict, int, object]:
    """Policy (FSDP; meta on every rank and the weights read once by rank 0 under torchrun), the trained layers,
    records split into train / held-out and tokenized, optimizer; resume. → (run, resolved config, start step,
    metrics log)."""
    d, out = dist.get(), Path(cfg.out)
    check_model(cfg.model, "--model")
    adapters = lora.spec_from_flags(cfg)
    recs = load_records(cfg, out)  # the records checked before the model loads
    if d.distributed:  # meta on every rank, weights read once by rank 0 and broadcast shard by shard
        lm, tok, full = load_for_sharding(cfg.model, d.is_main, d.device, cfg.seed)
    else:
        (lm, tok), full = load_model(cfg.model, device="cpu", dtype=torch.float32, seed=cfg.seed), None
    lm.train()
    trainable, n_params = lora.make_trainable(lm, adapters, cfg.train_layers, cfg.seed, full)
    if adapters is not None and precision == "bf16" and not d.distributed:  # the frozen base at half the memory
        lora.hold_base_in_bf16(lm)
    train, skipped = tokenize([r for r in recs if not held_out(r.id, cfg.eval_frac)], tok, cfg)
    evals, _ = tokenize([r for r in recs if held_out(r.id, cfg.eval_frac)], tok, cfg)
    if not train:
        raise DataError("no training records left")
    steps_per_epoch = math.ceil(len(train) / cfg.global_batch)
    total = steps_per_epoch * cfg.epochs if cfg.max_steps < 0 else min(cfg.max_steps, steps_per_epoch * cfg.epochs)
    packed = cfg.pack == "on" or (cfg.pack == "auto" and attention_implementation(d.device) == "flash_attention_2")
    model = dist.apply_fsdp(
        LogprobModel(lm), d.device, cfg.activation_checkpointing, full_state=full, from_meta=d.distributed
    )
    del full
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
    )
    resolved = {
        **config.to_dict(cfg),
        "preset": preset,
        "world_size": d.world_size,
        "total_steps": total,
        "train_records": len(train),
        "eval_records": len(evals),
        "skipped_long": skipped,
        "packed": packed,
        "precision": precision,
        "trainable_params": trainable,
        "params": n_params,
    }
    start, log = start_run(out, cfg.resume, model, opt, resolved, cfg.report_to)
    dist.print0(
        f"SFT {cfg.model}: {len(train)} train / {len(evals)} eval sequences, {total} steps of "
        f"{cfg.global_batch} on {d.world_size} rank(s), lr {cfg.lr}, {precision}, "
        f"{trainable / 1e6:.3g}M of {n_params / 1e6:.1f}M parameters trained"
    )
    run = Run(
        cfg,
        d,
        model,
        lm,
        opt,
        tok,
        train,
        evals,
        packed,
        precision,
        steps_per_epoch,
        total,
        int(cfg.warmup_ratio * total),
    )
    return run, resolved, start, log


def evaluate(run: Run) -> float:
    """The held-out sequences' loss per target token (all ranks together)."""
    cfg, d, evals = run.cfg, run.d, run.evals
    run.model.eval()
    mine = list(range(d.rank, len(evals), d.world_size))
    n_tok = dist.sum_scalar(sum(sum(evals[i][1]) for i in mine))
    micro = plan_micro_batches(list(range(len(evals))), evals, cfg, d, run.packed)
    with torch.no_grad():
        loss = run_batch(
            run.model, evals, micro, run.tok.pad_token_id, d.device, max(n_tok, 1), 1, False, run.packed, run.precision
        )
    run.model.train()
    return dist.sum_scalar(loss)


def train_step(run: Run, step: int) -> dict:
    """Optimizer step `step` (0-based): the epoch's (length-grouped) batch, this rank's micro-batches, the loss
    per target token of the whole batch, the update. → the metrics row."""
    cfg, d, train = run.cfg, run.d, run.train
    epoch, pos = divmod(step, run.steps_per_epoch)
    batch = epoch_batches([len(x[0]) for x in train], cfg.global_batch, epoch, cfg.seed, cfg.group_by_length)[pos]
    t0 = time.perf_counter()
    micro = plan_micro_batches(batch, train, cfg, d, run.packed)
    mine = tokens_in(micro, run.packed)
    n_tok = dist.sum_scalar(sum(sum(train[i][1]) for i in mine))
    loss = dist.sum_scalar(
        run_batch(
            run.model,
            train,
            micro,
            run.tok.pad_token_id,
            d.device,
            n_tok,
            d.world_size,
            True,
            run.packed,
            run.precision,
        )
    )
    lr = lr_at(step, run.total, cfg.lr, run.warmup, cfg.min_lr_ratio)
    gnorm = optimizer_step(run.model, run.opt, lr, cfg.grad_clip)
    seen = dist.sum_scalar(sum(len(train[i][0]) for i in mine))
    return {
        "step": step + 1,
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "grad_norm": gnorm,
        "target_tokens": n_tok,
        "tokens_per_s": seen / (time.perf_counter() - t0),
        "time/step": time.perf_counter() - t0,
    }


def main(argv=None):
    cfg, preset, d, precision = begin(SFTConfig, PRESETS, argv, __doc__)
    run, resolved, step, log = setup(cfg, preset, precision)
    out = Path(cfg.out)
    bar = tqdm(total=run.total, initial=step, desc="sft", disable=not d.is_main, dynamic_ncols=True)
    while step < run.total:
        row = train_step(run, step)
        step += 1
        if run.evals and (step % cfg.eval_every == 0 or step == run.total):
            row["eval_loss"] = evaluate(run)
        log.write(row)
        bar.update(1)
        bar.set_postfix(
            loss=f"{row['loss']:.3f}",
            lr=f"{row['lr']:.1e}",
            **({"eval": f"{row['eval_loss']:.3f}"} if "eval_loss" in row else {}),
        )
        if step % cfg.save_every == 0 or step == run.total:
            epoch, pos = divmod(step - 1, run.steps_per_epoch)
            checkpoint.save(
                out / "ckpt", step, run.model, run.opt, {"epoch": epoch, "batch_in_epoch": pos + 1}, resolved, cfg.keep
            )
    bar.close()
    dist.print0(f"exported {checkpoint.export_hf(run.model, run.lm, run.tok, out / 'model')}")
    dist.destroy()


if __name__ == "__main__":
    config.run(main)
    dist.exit_process()
