"""The whole TagPR pipeline on the embedded default, on a CPU: data → SFT → PRMU → GSPO (2 ranks, 3 seeds) → evaluation.

    python scripts/demo.py                               # into runs/demo; rerun the same command to resume
    python scripts/demo.py --rl-steps 16 --rl-lr 5e-5    # 16 GSPO steps a seed: a larger sampled gain, ~8x the RL
    python scripts/demo.py --chain-style terse           # shorter chains: cheaper, a less robust RL gain
    python scripts/demo.py --sft-train-layers -1 --sft-lr 1e-4   # SFT of all 30 layers: ~1.7x the SFT time

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

import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tagpr import config, demo_report, hardware  # noqa: E402  (the repository root first: the demo runs from a checkout)
from tagpr.config import ALL_OR_COUNT, COUNT, NON_NEGATIVE, POSITIVE  # noqa: E402

PY = sys.executable


def malloc_env(choice: str) -> dict[str, str]:
    """Environment that makes the stages allocate with jemalloc, where the machine has it (`auto`, `jemalloc`).

    PyTorch on a CPU frees and re-allocates its activations every step; glibc hands large blocks back to the
    kernel and faults them in again, jemalloc told to keep its pages (`retain`, no decay) does not: the same
    numbers, ~17 % less wall time, ~1 GB more resident memory per process (bench/README.md, "Allocator").
    """
    if choice == "system":
        return {}
    lib = ctypes.util.find_library("jemalloc")
    if lib is None:
        if choice == "jemalloc":
            raise config.ConfigError(
                "--malloc jemalloc: no libjemalloc on this machine (Debian/Ubuntu: apt install libjemalloc2)"
            )
        return {}
    preload = " ".join(x for x in (os.environ.get("LD_PRELOAD", ""), lib) if x)
    return {"LD_PRELOAD": preload, "MALLOC_CONF": "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"}


def run(cmd: list[str], log: Path) -> None:
    """Run a stage, its output shown and kept in `log`; stop the demo if it fails."""
    print("$", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"},
        )
        for line in p.stdout:
            f.write(line)
            if "it/s]" not in line and "s/it]" not in line:  # progress bars go to the log only
                print("   ", line.rstrip()[-160:], flush=True)
        if p.wait():
            raise SystemExit(f"stage failed (exit {p.returncode}): {' '.join(cmd)}; log: {log}")


class Timer:
    def __init__(self, path: Path):
        self.path = path
        self.t = json.loads(path.read_text()) if path.is_file() else {}

    def stage(self, name: str, done: Path, cmd: list[str], log: Path) -> None:
        if done.exists():
            print(f"== {name}: done already ({done})")
            return
        print(f"== {name}")
        t0 = time.time()
        run(cmd, log)
        self.t[name] = round(self.t.get(name, 0.0) + time.time() - t0, 1)  # summed over interrupted attempts
        self.path.write_text(json.dumps(self.t, indent=1))


@dataclass
class DemoConfig:
    run: str = "runs/demo"  # the run folder; rerun the same command to resume
    policy: str = "smollm2-135m"  # the base policy: "smollm2-135m" (offline default), "tiny" or an HF folder
    tasks: str = "LaMP_2"  # comma-separated synthetic tasks
    difficulty: Literal["easy", "hard"] = "easy"  # synthetic users' rules (docs/synthetic.md); easy: LaMP_2, 3 and 7
    k: Annotated[int, COUNT] = 2  # profile items in every prompt
    chain_style: Literal["full", "terse"] = "full"  # teacher chains: full (~160 tokens) or terse (~110, cheaper)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # matmuls of every stage; auto: bf16 where the CPU has
    # AVX512-BF16 or AMX, else fp32
    sft_steps: Annotated[int, COUNT] = 12  # SFT optimizer steps
    sft_batch: Annotated[int, COUNT] = 8  # SFT sequences per step
    sft_lr: Annotated[float, POSITIVE] = 2e-4  # SFT learning rate
    sft_train_layers: Annotated[int, ALL_OR_COUNT] = 16  # SFT trains the policy's top N decoder layers (-1: all;
    # SmolLM2 has 30)
    prmu_steps: Annotated[int, COUNT] = 20  # PRMU (tiny backbone) Bradley-Terry steps
    rl_steps: Annotated[int, COUNT] = 2  # GSPO steps per seed
    rl_train_layers: Annotated[int, ALL_OR_COUNT] = 4  # RL trains the top N decoder layers (-1: all)
    rl_prompts: Annotated[int, COUNT] = 8  # prompts per rollout batch (all ranks)
    rl_group: Annotated[int, COUNT] = 4  # rollouts per prompt (G)
    rl_lr: Annotated[float, POSITIVE] = 2e-4  # GSPO learning rate
    rl_temperature: Annotated[float, POSITIVE] = 1.0  # rollout temperature (paper: 1); the sampled score is taken at it
    rl_max_new: Annotated[int, COUNT] = 160  # new tokens per rollout and per held-out answer, at most
    rl_overlong: Literal["keep", "mask"] = "keep"  # rollouts cut at --rl-max-new: in the loss (paper) or out (DAPO)
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


def main(argv=None):
    a, _ = config.parse(DemoConfig, {}, argv, description=__doc__)
    allocator = malloc_env(a.malloc)
    os.environ.update(allocator)  # the stages inherit it
    if a.precision == "auto":
        prec = "bf16" if hardware.bf16_matmul() else "fp32"
    else:
        prec = hardware.resolve_precision(a.precision, torch.device("cpu"))
    print(
        f"stages allocate with {'jemalloc' if allocator else 'glibc malloc'}; matmuls in {prec} "
        f"(CPU: {hardware.describe()})"
    )
    run_dir = ROOT / a.run
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    timer = Timer(run_dir / "timings.json")
    data, sft, prmu = run_dir / "data", run_dir / "sft", run_dir / "prmu"
    seeds = [int(s) for s in a.seeds.split(",") if s]
    old_logp = old_logp_source(a, prec)
    trunk = run_dir / "eval_trunk"  # the held-out prompts' keys/values in the frozen layers, shared by the seeds
    t_start = time.time()

    timer.stage(
        "1 build_data",
        data / "eval_prompts_swap.jsonl",
        [
            PY,
            "build_data.py",
            "--preset",
            "synthetic",
            "--out",
            str(data),
            "--tasks",
            a.tasks,
            "--k",
            str(a.k),
            "--difficulty",
            a.difficulty,
            "--chain-style",
            a.chain_style,
            "--instances-per-task",
            "200",
            "--chains",
            "2",
            "--rl-per-task",
            "256",
            "--rl-lamp2",
            "256",
            "--eval-prompts",
            str(a.eval_questions),
            "--eval-split",
            a.eval_split,
            "--eval-users",
            str(a.eval_users),
        ],
        logs / "build_data.log",
    )
    timer.stage(
        "2 train_sft",
        sft / "model" / "config.json",
        [
            PY,
            "train_sft.py",
            "--model",
            a.policy,
            "--sft",
            str(data / "sft.jsonl"),
            "--out",
            str(sft),
            "--lr",
            str(a.sft_lr),
            "--global-batch",
            str(a.sft_batch),
            "--micro-batch",
            "4",
            "--max-steps",
            str(a.sft_steps),
            "--epochs",
            "10",
            "--max-len",
            "1024",
            "--eval-frac",
            "0.02",
            "--eval-every",
            "1000",
            "--save-every",
            "6",
            "--keep",
            "1",
            "--warmup-ratio",
            "0.1",
            "--precision",
            prec,
            "--train-layers",
            str(a.sft_train_layers),
        ],
        logs / "train_sft.log",
    )
    timer.stage(
        "3 train_prmu",
        prmu / "model" / "users.json",
        [
            PY,
            "train_prmu.py",
            "--preset",
            "tiny",
            "--prp",
            str(data / "prp.jsonl"),
            "--pqp",
            str(data / "pqp.jsonl"),
            "--out",
            str(prmu),
            "--max-steps",
            str(a.prmu_steps),
            "--epochs",
            "5",
            "--save-every",
            "10",
        ],
        logs / "train_prmu.log",
    )
    for i, s in enumerate(seeds):
        rl = run_dir / f"rl_seed{s}"
        timer.stage(
            f"4 train_rl seed {s}",
            rl / "model" / "config.json",
            [
                PY,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc_per_node={a.nproc}",
                "train_rl.py",
                "--policy",
                str(sft / "model"),
                "--prmu",
                str(prmu / "model"),
                "--prompts",
                str(data / "rl_prompts.jsonl"),
                "--out",
                str(rl),
                "--seed",
                str(s),
                "--lr",
                str(a.rl_lr),
                "--global-batch",
                str(a.rl_prompts),
                "--group",
                str(a.rl_group),
                "--mini-batches",
                "2",
                "--micro-batch",
                "8",
                "--max-new-tokens",
                str(a.rl_max_new),
                "--max-steps",
                str(a.rl_steps),
                "--guided-epochs",
                "100",
                "--temperature",
                str(a.rl_temperature),
                "--overlong",
                a.rl_overlong,
                "--old-logp",
                old_logp,
                "--eval-prompts",
                str(data / "eval_prompts.jsonl"),
                "--eval-swap-prompts",
                str(data / "eval_prompts_swap.jsonl"),
                "--eval-samples",
                str(a.eval_samples),
                "--eval-batch",
                str(a.eval_batch),
                "--eval-every",
                str(a.rl_eval_every),
                "--eval-before" if i == 0 else "--no-eval-before",
                "--save-every",
                "2",
                "--keep",
                "1",
                "--precision",
                prec,
                "--train-layers",
                str(a.rl_train_layers),
                "--eval-trunk-store",
                str(trunk) if a.trunk_store else "",
            ],
            logs / f"train_rl_seed{s}.log",
        )
    shutil.rmtree(trunk, ignore_errors=True)  # derived data (~1.6 GB for the demo's 128 prompts): not kept
    lamp_dir = data / "synthetic_lamp"
    timer.stage(
        "5 evaluate base",
        run_dir / "eval" / "base" / "table.md",
        [
            PY,
            "evaluate.py",
            "--model",
            a.policy,
            "--methods",
            f"{a.base_methods},floor,oracle",
            "--out",
            str(run_dir / "eval" / "base"),
            "--lamp-dir",
            str(lamp_dir),
            "--tasks",
            a.tasks,
            "--split",
            a.eval_split,
            "--limit",
            str(a.eval_questions),
            "--k",
            str(a.k),
            "--tags",
            str(data / "tags.json"),
            "--r2p-candidates",
            "2",
            "--r2p-chunk",
            "96",
            "--r2p-max-tokens",
            "192",
            "--r2p-budget-words",
            "120",
            "--r2p-interventions",
            "1",
            "--precision",
            prec,
        ],
        logs / "evaluate_base.log",
    )
    demo_report.report(run_dir, a, seeds, timer.t, time.time() - t_start, prec, old_logp)


if __name__ == "__main__":
    config.run(main)
