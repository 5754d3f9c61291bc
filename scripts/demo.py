"""The whole TagPR pipeline on the embedded default, on a CPU: data → SFT → PRMU → GSPO (2 ranks) → evaluation.

    python scripts/demo.py                      # runs/demo; rerun to resume after an interruption
    python scripts/demo.py --seeds 0,1,2        # RL from the same SFT policy with three seeds: mean ± spread

Every stage is one of the project's own commands, run as a subprocess of this interpreter (the RL
stage under `python -m torch.distributed.run --nproc_per_node=2`, torchrun's module: nothing needs to be on PATH); a stage whose export exists is skipped, an interrupted one
resumes from its checkpoints. At the end `<run>/report.md` holds the table on held-out synthetic
users, the reward curve and the data manifest's filter counts; `<run>/timings.json` the time
each stage took. Sizes are chosen to fit a 2-core CPU; they are flags. Each trainer keeps only its
latest checkpoint (`--keep 1`: a run needs ~6 GB of disk instead of ~10). The stages allocate with jemalloc where
the machine has it (`--malloc`; `scripts/demo.sh` installs it as root on Debian/Ubuntu): ~17 % less wall time.
"""
from __future__ import annotations

import ctypes.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tagpr import config, hardware  # noqa: E402  (the repository root first: the demo runs from a checkout)

PY = sys.executable


def malloc_env(choice: str) -> dict[str, str]:
    """Environment that makes the stages allocate with jemalloc, where the machine has it (`auto`, `jemalloc`).

    PyTorch on a CPU frees and re-allocates its activations every step; glibc hands large blocks back to the
    kernel and faults them in again. jemalloc told to keep its pages (`retain`, no decay) took the training
    forward of SmolLM2-135M from 18.0 s to 11.7 s here (8 × 460 tokens, one thread), and the whole demo from
    988 s to 822 s (an RL seed 115 → 87 s, the base model's evaluation 225 → 191 s, SFT 224 → 213 s), with the
    same numbers to the last digit; it costs ~1 GB more resident memory per process.
    """
    if choice == "system":
        return {}
    lib = ctypes.util.find_library("jemalloc")
    if lib is None:
        if choice == "jemalloc":
            raise config.ConfigError("--malloc jemalloc: no libjemalloc on this machine (Debian/Ubuntu: apt install libjemalloc2)")
        return {}
    preload = " ".join(x for x in (os.environ.get("LD_PRELOAD", ""), lib) if x)
    return {"LD_PRELOAD": preload, "MALLOC_CONF": "retain:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"}


def run(cmd: list[str], log: Path) -> None:
    """Run a stage, its output shown and kept in `log`; stop the demo if it fails."""
    print("$", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"})
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
    run: str = "runs/demo"              # the run folder (rerun the same command to resume)
    policy: str = "smollm2-135m"        # the base policy: "smollm2-135m" (offline default), "tiny" or an HF folder
    tasks: str = "LaMP_2,LaMP_3"        # comma-separated synthetic tasks
    k: int = 2                          # profile items in every prompt
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # matmuls of every stage: auto = bf16 where the CPU has
                                        # AVX512-BF16 / AMX, else fp32; bf16 elsewhere stops before any work
    sft_steps: int = 12                 # SFT optimizer steps
    sft_batch: int = 8                  # SFT sequences per step
    sft_lr: float = 1e-4                # SFT learning rate
    prmu_steps: int = 20                # PRMU (tiny backbone) Bradley-Terry steps
    rl_steps: int = 4                   # GSPO steps per seed
    rl_train_layers: int = 4            # RL trains the top N decoder layers (-1: all)
    rl_prompts: int = 4                 # prompts per rollout batch (all ranks)
    rl_group: int = 4                   # rollouts per prompt (G)
    rl_lr: float = 1e-5                 # GSPO learning rate
    rl_max_new: int = 128               # new tokens per rollout at most
    seeds: str = "0,1,2"                # RL seeds, comma-separated: the table shows their mean ± half range
    eval_limit: int = 8                 # dev questions per task
    nproc: int = 2                      # ranks of the RL stage (torch.distributed.run)
    malloc: Literal["auto", "jemalloc", "system"] = "auto"  # the stages' allocator: jemalloc where the machine has
                                        # it (auto), or glibc's (system)


def main(argv=None):
    a, _ = config.parse(DemoConfig, {}, argv, description=__doc__)
    allocator = malloc_env(a.malloc)
    os.environ.update(allocator)  # the stages inherit it
    if a.precision == "auto":
        prec = "bf16" if hardware.bf16_matmul() else "fp32"
    else:
        prec = hardware.resolve_precision(a.precision, torch.device("cpu"))
    print(f"stages allocate with {'jemalloc' if allocator else 'glibc malloc'}; matmuls in {prec} "
          f"(CPU: {hardware.describe()})")
    run_dir = ROOT / a.run
    run_dir.mkdir(parents=True, exist_ok=True)
    logs = run_dir / "logs"
    timer = Timer(run_dir / "timings.json")
    data, sft, prmu = run_dir / "data", run_dir / "sft", run_dir / "prmu"
    seeds = [int(s) for s in a.seeds.split(",") if s]
    t_start = time.time()

    timer.stage("1 build_data", data / "manifest.json",
                [PY, "build_data.py", "--preset", "synthetic", "--out", str(data), "--tasks", a.tasks, "--k", str(a.k),
                 "--instances-per-task", "120", "--chains", "2", "--rl-per-task", "64", "--rl-lamp2", "64"],
                logs / "build_data.log")
    timer.stage("2 train_sft", sft / "model" / "config.json",
                [PY, "train_sft.py", "--model", a.policy, "--sft", str(data / "sft.jsonl"), "--out", str(sft),
                 "--lr", str(a.sft_lr), "--global-batch", str(a.sft_batch), "--micro-batch", "4",
                 "--max-steps", str(a.sft_steps), "--epochs", "10", "--max-len", "1024", "--eval-frac", "0.02",
                 "--eval-every", "1000", "--save-every", "6", "--keep", "1", "--warmup-ratio", "0.1", "--precision", prec],
                logs / "train_sft.log")
    timer.stage("3 train_prmu", prmu / "model" / "users.json",
                [PY, "train_prmu.py", "--preset", "tiny", "--prp", str(data / "prp.jsonl"), "--pqp",
                 str(data / "pqp.jsonl"), "--out", str(prmu), "--max-steps", str(a.prmu_steps), "--epochs", "5",
                 "--save-every", "10"], logs / "train_prmu.log")
    for s in seeds:
        rl = run_dir / f"rl_seed{s}"
        timer.stage(f"4 train_rl seed {s}", rl / "model" / "config.json",
                    [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}", "train_rl.py", "--policy",
                     str(sft / "model"), "--prmu", str(prmu / "model"), "--prompts", str(data / "rl_prompts.jsonl"),
                     "--out", str(rl), "--seed", str(s), "--lr", str(a.rl_lr), "--global-batch", str(a.rl_prompts),
                     "--group", str(a.rl_group), "--mini-batches", "2", "--micro-batch", "8", "--max-new-tokens",
                     str(a.rl_max_new), "--max-steps", str(a.rl_steps), "--guided-epochs", "100",
                     "--save-every", "2", "--keep", "1", "--precision", prec, "--train-layers", str(a.rl_train_layers)],
                    logs / f"train_rl_seed{s}.log")
        if (rl / "metrics.jsonl").is_file():
            subprocess.run([PY, "-m", "tagpr.plot", str(rl / "metrics.jsonl")], cwd=ROOT, check=True,
                           stdout=subprocess.DEVNULL)

    lamp_dir = data / "synthetic_lamp"
    common = ["--lamp-dir", str(lamp_dir), "--tasks", a.tasks, "--limit", str(a.eval_limit), "--k", str(a.k),
              "--tags", str(data / "tags.json")]
    evals = {"base": (a.policy, "zero-shot,rag-r,r2p,oracle"), "sft": (str(sft / "model"), "tagpr")}
    evals.update({f"rl_seed{s}": (str(run_dir / f"rl_seed{s}" / "model"), "tagpr") for s in seeds})
    for name, (model, methods) in evals.items():
        out = run_dir / "eval" / name
        timer.stage(f"5 evaluate {name}", out / "table.md",
                    [PY, "evaluate.py", "--model", model, "--methods", methods, "--out", str(out),
                     "--r2p-candidates", "2", "--r2p-chunk", "96", "--r2p-max-tokens", "192",
                     "--r2p-budget-words", "120", "--r2p-interventions", "1", "--precision", prec, *common], logs / f"evaluate_{name}.log")
    report(run_dir, a, seeds, timer.t, time.time() - t_start, prec)


def report(run_dir: Path, a, seeds, timings: dict, wall: float, prec: str) -> None:
    from tagpr.evaluation import COLUMNS

    res = lambda name: json.loads((run_dir / "eval" / name / "metrics.json").read_text())
    base = res("base")
    rows = [("Base model: zero-shot", base["zero-shot"]), ("Base model: RAG-R", base["rag-r"]),
            ("Base model: R2P", base["r2p"]), ("After SFT (tagged reasoning)", res("sft")["tagpr"])]
    rl = [res(f"rl_seed{s}")["tagpr"] for s in seeds]
    tasks = [t for t in a.tasks.split(",")]
    cols = [c for c in COLUMNS if c[0] in tasks]
    lines = ["| | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, r in rows:
        lines.append(f"| {name} | " + " | ".join(f"{r[t][m]:.3f}" for t, m, _ in cols) + " |")
    cells = []
    for t, m, _ in cols:
        vals = [r[t][m] for r in rl]
        cells.append(f"{statistics.mean(vals):.3f}" + (f" ± {(max(vals) - min(vals)) / 2:.3f}" if len(vals) > 1
                                                       else ""))
    lines.append(f"| After SFT + RL (TagPR), seeds {','.join(map(str, seeds))} | " + " | ".join(cells) + " |")
    lines.append("| Oracle ceiling (latent rule) | " + " | ".join(f"{base['oracle'][t][m]:.3f}" for t, m, _ in cols)
                 + " |")
    table = "\n".join(lines)
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    counts = "\n".join(f"| {k} | {v['in']} | {v['out']} | "
                       + ", ".join(f"{r} {n}" for r, n in v["dropped"].items()) + " |"
                       for k, v in manifest["stages"].items() if isinstance(v, dict) and "in" in v)
    for s in seeds:
        png = run_dir / f"rl_seed{s}" / "metrics.png"
        if png.is_file():
            shutil.copy(png, run_dir / f"reward_seed{s}.png")
    md = (f"# TagPR demo ({a.policy}, synthetic users, {a.tasks})\n\n"
          f"Held-out synthetic users (dev), first {a.eval_limit} questions per task, k = {a.k} most recent items, "
          f"{prec} matmuls. SFT {a.sft_steps} steps × {a.sft_batch}; GSPO {a.rl_steps} steps × "
          f"{a.rl_prompts} prompts × {a.rl_group} rollouts (≤ {a.rl_max_new} tokens), top {a.rl_train_layers} layers, "
          f"lr {a.rl_lr}. "
          f"± is half the range across seeds.\n\n{table}\n\n"
          + "".join(f"![reward curve, seed {s}](reward_seed{s}.png)\n" for s in seeds)
          + f"\n## Data (build_data.py manifest)\n\n| stage | in | out | dropped |\n|---|---|---|---|\n{counts}\n"
          + "\n## Time per stage (s)\n\n" + "\n".join(f"- {k}: {v}" for k, v in timings.items())
          + f"\n- this invocation, wall: {wall:.0f}\n")
    (run_dir / "report.md").write_text(md)
    print("\n" + table + f"\n\nreport: {run_dir / 'report.md'}")


if __name__ == "__main__":
    config.run(main)
