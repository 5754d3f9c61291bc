"""The whole TagPR pipeline on the embedded default, on a CPU: data → SFT → PRMU → GSPO (2 ranks, 3 seeds) → evaluation.

    python scripts/demo.py                               # into runs/demo; rerun the same command to resume
    python scripts/demo.py --rl-steps 16 --rl-lr 5e-5    # 16 GSPO steps a seed: a larger sampled gain, ~8x the RL
    python scripts/demo.py --chain-style terse           # shorter chains: cheaper, a less robust RL gain
    python scripts/demo.py --preset long                 # ~100 min: three kinds, RL moves the decision, test users
    python scripts/demo.py --preset long --eval-split dev    # the same, scored on dev users (choose recipes there)
    python scripts/demo.py --preset long --tasks LaMP_2 --chain-style terse --sft-steps 48 --rl-max-new 160
                                                         # ~45 min: LaMP-2 alone (x5's recipe)
    python scripts/demo.py --sft-train-layers -1 --sft-lr 1e-4   # SFT of all 30 layers: ~1.7x the SFT time
    python scripts/demo.py --sft-train-layers -1 --sft-lora-rank 16      # SFT of LoRA adapters on all 30 layers

Every stage is one of the project's own commands, run as a subprocess of this interpreter (the RL stage under
`python -m torch.distributed.run --nproc_per_node=2`: nothing needs to be on PATH). A stage whose export exists is
skipped; an interrupted one resumes from its checkpoint. The users are synthetic and easy by default
(docs/synthetic.md). The held-out users (`--eval-questions` dev questions) are scored by the RL stage before its
first step (seed 0: the SFT model's row), every `--rl-eval-every` steps and at the end: greedy, sampled at the
rollout temperature, and greedy with another user's profile (the swap control). `evaluate.py` scores the base
model, the no-profile floor and the oracle.

Writes `<run>/report.md` (the table with 95 % bootstrap intervals, the paired gains against SFT and the spread over
seeds, the gain against GSPO steps, the data filter counts), `<run>/curves.png` and `<run>/timings.json`.
Each trainer keeps only its latest checkpoint. The stages allocate with jemalloc where the machine has it
(`--malloc`): ~17 % less wall time.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tagpr import config, demo_report, hardware, stages  # noqa: E402  (the repository root first: the demo runs from a checkout)
from tagpr.config import ALL_OR_COUNT, COUNT, NON_NEGATIVE, POSITIVE  # noqa: E402


@dataclass
class DemoConfig:
    run: str = "runs/demo"  # the run folder; rerun the same command to resume
    policy: str = "smollm2-135m"  # the base policy: "smollm2-135m" (offline default), "tiny" or an HF folder
    tasks: str = "LaMP_2"  # comma-separated synthetic tasks
    difficulty: Literal["easy", "hard"] = "easy"  # synthetic users' rules (docs/synthetic.md); easy: LaMP_2, 3 and 7
    k: Annotated[int, COUNT] = 2  # profile items in every prompt
    chain_style: Literal["full", "terse", "bound"] = "full"  # teacher chains: full (~160 tokens), terse (~110,
    # cheaper) or bound (terse, the decision naming the input's genre / product: docs/synthetic.md)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # matmuls of every stage; auto: bf16 where the CPU has
    # AVX512-BF16 or AMX, else fp32
    sft_steps: Annotated[int, COUNT] = 12  # SFT optimizer steps
    sft_batch: Annotated[int, COUNT] = 8  # SFT sequences per step
    sft_lr: Annotated[float, POSITIVE] = 2e-4  # SFT learning rate
    sft_train_layers: Annotated[int, ALL_OR_COUNT] = 16  # SFT trains the policy's top N decoder layers (-1: all;
    # SmolLM2 has 30)
    sft_lora_rank: Annotated[int, NON_NEGATIVE] = 0  # SFT trains LoRA adapters of this rank on those layers
    # instead of their weights (0: off; train_sft.py --lora-rank, alpha 16, every projection)
    prmu_steps: Annotated[int, COUNT] = 20  # PRMU (tiny backbone) Bradley-Terry steps
    rl_steps: Annotated[int, COUNT] = 2  # GSPO steps per seed
    rl_train_layers: Annotated[int, ALL_OR_COUNT] = 4  # RL trains the top N decoder layers (-1: all)
    rl_lora_rank: Annotated[int, NON_NEGATIVE] = 0  # GSPO trains LoRA adapters of this rank on those layers
    # instead of their weights (0: off; train_rl.py --lora-rank)
    rl_prompts: Annotated[int, COUNT] = 8  # prompts per rollout batch (all ranks)
    rl_group: Annotated[int, COUNT] = 4  # rollouts per prompt (G)
    rl_lr: Annotated[float, POSITIVE] = 2e-4  # GSPO learning rate
    rl_temperature: Annotated[float, POSITIVE] = 1.0  # rollout temperature (paper: 1); the sampled score is taken at it
    rl_max_new: Annotated[int, COUNT] = 160  # new tokens per rollout and per held-out answer, at most
    rl_overlong: Literal["keep", "mask"] = "keep"  # rollouts cut at --rl-max-new: in the loss (paper) or out (DAPO)
    rl_dynamic_sampling: Annotated[int, NON_NEGATIVE] = 0  # DAPO's dynamic sampling: groups whose verifiable reward
    # is flat leave each rollout batch and up to N rounds of fresh prompts refill it (0: off; train_rl.py)
    rl_stratify: Literal["none", "task", "gold"] = "none"  # rollout batches: a plain shuffle, each task its share
    # of every batch, or each (task, gold answer) its share (train_rl.py --stratify)
    rl_old_logp: Literal["auto", "recompute", "sampler"] = "auto"  # GSPO's old log-probs: the sampler's or a
    # no-grad pass; auto: the sampler's in fp32, a pass in bf16 (train_rl.py departure 6)
    rl_eval_every: Annotated[int, NON_NEGATIVE] = 0  # also score the held-out users every N GSPO steps (0: before the
    # first and at the end)
    seeds: str = "0,1,2"  # RL seeds, comma-separated: the table shows each and their mean
    eval_questions: Annotated[int, COUNT] = 64  # held-out questions per task (users disjoint from training)
    eval_split: Literal["dev", "test"] = "dev"  # the held-out users' split: choose recipes on dev, claim on test
    eval_users: Annotated[int, COUNT] = 64  # held-out users per split and task (2 questions each)
    eval_samples: Annotated[int, NON_NEGATIVE] = 2  # samples per held-out question for the sampled score
    eval_batch: Annotated[int, NON_NEGATIVE] = 0  # held-out prompts per decode call and rank (0: all at once; ~32
    # bounds the memory of a large held-out set)
    base_methods: str = "zero-shot"  # the base model's rows (evaluate.py methods, comma-separated)
    nproc: Annotated[int, COUNT] = 2  # ranks of the RL stage
    trunk_store: bool = True  # compute the held-out prompts' frozen-layer keys/values once for all seeds (same scores)
    malloc: Literal["auto", "jemalloc", "system"] = "auto"  # the stages' allocator: jemalloc where the machine has
    # it (auto), or glibc's (system)


def old_logp_source(a: DemoConfig, prec: str) -> str:
    """GSPO's old log-probs (train_rl.py --old-logp): `auto` takes the sampler's in fp32 and recomputes in bf16."""
    return a.rl_old_logp if a.rl_old_logp != "auto" else "sampler" if prec == "fp32" else "recompute"


# `--preset long`: one policy on the three kinds (classification, rating, generation) under which RL moves the
# decision, not only the parse rate (docs/rl_experiments.md: x9 on dev users, x10 on test users): bound chains,
# 12x the SFT, 4x the GSPO steps at half the rate, 256 tokens (LaMP-7's chains reach 227), 128 test questions a task
# x 4 samples; glibc malloc (a long SFT under jemalloc, benches beside it, grew past 20 GB once: the notebook's x6)
PRESETS = {
    "long": dict(
        run="runs/demo_long",
        tasks="LaMP_2,LaMP_3,LaMP_7",
        chain_style="bound",
        sft_steps=144,
        rl_steps=8,
        rl_lr=1e-4,
        rl_max_new=256,
        eval_questions=128,
        eval_split="test",
        eval_samples=4,
        rl_eval_every=8,
        eval_batch=24,
        malloc="system",
    )
}


def main(argv=None):
    a, _ = config.parse(DemoConfig, PRESETS, argv, description=__doc__)
    allocator = stages.malloc_env(a.malloc)
    os.environ.update(allocator)  # the stages inherit it
    prec = stages.precision(a.precision)
    print(
        f"stages allocate with {'jemalloc' if allocator else 'glibc malloc'}; matmuls in {prec} "
        f"(CPU: {hardware.describe()})"
    )
    run_dir = ROOT / a.run
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    timer = stages.Timer(run_dir / "timings.json")
    data, sft, prmu = run_dir / "data", run_dir / "sft", run_dir / "prmu"
    seeds = [int(s) for s in a.seeds.split(",") if s]
    old_logp = old_logp_source(a, prec)
    trunk = run_dir / "eval_trunk"  # the held-out prompts' keys/values in the frozen layers, shared by the seeds
    t_start = time.time()

    timer.stage(
        "1 build_data", data / "eval_prompts_swap.jsonl", stages.build_data_cmd(a, data), logs / "build_data.log"
    )
    timer.stage(
        "2 train_sft", sft / "model" / "config.json", stages.sft_cmd(a, data, sft, prec), logs / "train_sft.log"
    )
    timer.stage("3 train_prmu", prmu / "model" / "users.json", stages.prmu_cmd(a, data, prmu), logs / "train_prmu.log")
    for i, s in enumerate(seeds):
        rl = run_dir / f"rl_seed{s}"
        cmd = stages.rl_cmd(
            a,
            sft / "model",
            prmu / "model",
            data,
            rl,
            s,
            prec,
            old_logp,
            eval_before=i == 0,
            eval_trunk_store=trunk if a.trunk_store else "",
        )
        timer.stage(f"4 train_rl seed {s}", rl / "model" / "config.json", cmd, logs / f"train_rl_seed{s}.log")
    shutil.rmtree(trunk, ignore_errors=True)  # derived data (~1.6 GB for the demo's 128 prompts): not kept
    cmd = stages.evaluate_base_cmd(a, data, run_dir / "eval" / "base", prec)
    timer.stage("5 evaluate base", run_dir / "eval" / "base" / "table.md", cmd, logs / "evaluate_base.log")
    demo_report.report(run_dir, a, seeds, timer.t, time.time() - t_start, prec, old_logp)


if __name__ == "__main__":
    config.run(main)
