"""The pipeline's stages as subprocesses, shared by scripts/demo.py and scripts/ablate.py.

Every stage is one of the project's own commands, run with this interpreter (the RL stage under
`python -m torch.distributed.run`: nothing needs to be on PATH). `Timer.stage` skips a stage whose export exists
and sums the wall time of interrupted attempts, so rerunning a script resumes it. The `*_cmd` functions build each
stage's command line from the scripts' settings (`a`: a DemoConfig or a subclass).
"""

from __future__ import annotations

import ctypes.util
import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from . import config, hardware

ROOT = Path(__file__).resolve().parents[1]
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


# torchrun's summary of a rank the kernel killed ("exitcode  : -9 (pid: …)  (SIGKILL)"); a lone process's code is -9
KILLED = re.compile(r"exitcode\s*:\s*-9\b")
OOM_HINT = (
    "a process got SIGKILL, on Linux most often the out-of-memory killer (`dmesg | grep -i 'out of memory'`): "
    "a large held-out set decoded at once is the usual cause here, so pass --eval-batch 24 (held-out prompts per "
    "decode wave and rank), or fewer --nproc ranks; rerun the same command to resume"
)


def run(cmd: list[str], log: Path) -> None:
    """Run a stage, its output shown and kept in `log`; stop the script if it fails (with a hint where a process
    was killed, which on Linux is most often the out-of-memory killer)."""
    print("$", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    killed = False
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
            f.flush()  # the log follows the stage as it runs
            killed = killed or bool(KILLED.search(line))
            text = line.rstrip()  # text mode splits at "\r" too: a redrawn bar's frames come as lines
            if text and "%|" not in text:  # progress bars (tqdm's "NN%|███|") go to the log only
                if len(text) > 156:  # wrapped, not cut: the start of a line says what it is
                    text = textwrap.fill(text, 156, subsequent_indent="  ")
                print(textwrap.indent(text, "    "), flush=True)
        if p.wait():
            why = f"; {OOM_HINT}" if killed or p.returncode == -9 else ""
            raise SystemExit(f"stage failed (exit {p.returncode}): {' '.join(cmd)}; log: {log}{why}")


class Timer:
    """Runs the stages, each once, and keeps their wall times in a JSON file."""

    def __init__(self, path: Path, dry: bool = False):
        self.path, self.dry = path, dry  # dry: print each stage's command line, run none
        self.t = json.loads(path.read_text()) if path.is_file() else {}

    def stage(self, name: str, done: Path, cmd: list[str], log: Path) -> None:
        if done.exists():
            print(f"== {name}: done already ({done})")
            return
        print(f"== {name}")
        if self.dry:
            print("$", " ".join(map(str, cmd)), flush=True)
            return
        t0 = time.time()
        run(cmd, log)
        self.t[name] = round(self.t.get(name, 0.0) + time.time() - t0, 1)  # summed over interrupted attempts
        self.path.write_text(json.dumps(self.t, indent=1))


def precision(choice: str) -> str:
    """The stages' matmul precision on this CPU for `--precision choice`: auto → bf16 where the CPU has bf16 matmul
    hardware (AVX512-BF16 or AMX), else fp32; bf16 without that hardware is refused (hardware.resolve_precision)."""
    import torch

    want = ("bf16" if hardware.bf16_matmul() else "fp32") if choice == "auto" else choice
    return hardware.resolve_precision(want, torch.device("cpu"))


def flags(**kw) -> list[str]:
    """--name value pairs (underscores become dashes); True gives --name, False --no-name, None nothing."""
    out = []
    for k, v in kw.items():
        name = k.replace("_", "-")
        if v is None:
            continue
        out += [f"--{name}"] if v is True else [f"--no-{name}"] if v is False else [f"--{name}", str(v)]
    return out


def build_data_cmd(a, data: Path) -> list[str]:
    return [PY, "build_data.py", "--preset", "synthetic", "--out", str(data)] + flags(
        tasks=a.tasks,
        k=a.k,
        difficulty=a.difficulty,
        chain_style=a.chain_style,
        instances_per_task=200,
        chains=2,
        rl_per_task=256,
        rl_lamp2=256,
        eval_prompts=a.eval_questions,
        eval_split=a.eval_split,
        eval_users=a.eval_users,
    )


def gpu_preset(a) -> str:
    """The trainers' own preset when the script runs at a GPU size (`--trainer-preset qwen3-8b`), else ""."""
    p = getattr(a, "trainer_preset", "cpu")
    return "" if p == "cpu" else p


def torchrun(a) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}"]


def sft_cmd(a, data: Path, out: Path, prec: str) -> list[str]:
    if gpu_preset(a):  # under torchrun at the trainer's preset (sequence length, micro-batch, checkpointing)
        return (
            torchrun(a)
            + ["train_sft.py", "--preset", gpu_preset(a)]
            + flags(
                model=a.policy,
                sft=data / "sft.jsonl",
                out=out,
                lr=a.sft_lr,
                global_batch=a.sft_batch,
                max_steps=a.sft_steps,
                precision=prec,
                train_layers=a.sft_train_layers,
                lora_rank=getattr(a, "sft_lora_rank", 0) or None,
            )
        )
    return [PY, "train_sft.py"] + flags(
        model=a.policy,
        sft=data / "sft.jsonl",
        out=out,
        lr=a.sft_lr,
        global_batch=a.sft_batch,
        micro_batch=4,
        max_steps=a.sft_steps,
        epochs=10,
        max_len=1024,
        eval_frac=0.02,
        eval_every=1000,
        save_every=6,
        keep=1,
        warmup_ratio=0.1,
        precision=prec,
        train_layers=a.sft_train_layers,
        lora_rank=getattr(a, "sft_lora_rank", 0) or None,  # off: the flag is left out (the trainer's default)
    )


def prmu_cmd(a, data: Path, out: Path, *extra: str) -> list[str]:
    """PRMU on the tiny backbone, or at a GPU preset on `a.prmu_backbone` under torchrun (`extra`: e.g.
    --no-use-user-embeddings, or --max-steps 0 for an untrained one)."""
    if gpu_preset(a):
        return (
            torchrun(a)
            + ["train_prmu.py", "--preset", gpu_preset(a)]
            + flags(backbone=a.prmu_backbone, prp=data / "prp.jsonl", pqp=data / "pqp.jsonl", out=out)
            + flags(max_steps=a.prmu_steps)
            + list(extra)
        )
    return (
        [PY, "train_prmu.py", "--preset", "tiny"]
        + flags(prp=data / "prp.jsonl", pqp=data / "pqp.jsonl", out=out, max_steps=a.prmu_steps, epochs=5)
        + flags(save_every=10)
        + list(extra)
    )


def rl_cmd(a, policy, prmu, data: Path, out: Path, seed: int, prec: str, old_logp: str, **kw) -> list[str]:
    """GSPO on `a.nproc` ranks from `policy` with the reward model `prmu` ("none": none), scoring the held-out
    prompts; `kw`: more train_rl flags (eval_before, eval_trunk_store, w_tag, guided_steps, ...), which win."""
    base = dict(
        policy=policy,
        prmu=prmu,
        prompts=data / "rl_prompts.jsonl",
        out=out,
        seed=seed,
        lr=a.rl_lr,
        global_batch=a.rl_prompts,
        group=a.rl_group,
        mini_batches=2,
        micro_batch=8,
        max_new_tokens=a.rl_max_new,
        max_steps=a.rl_steps,
        guided_epochs=100,
        temperature=a.rl_temperature,
        overlong=a.rl_overlong,
        old_logp=old_logp,
        eval_prompts=data / "eval_prompts.jsonl",
        eval_swap_prompts=data / "eval_prompts_swap.jsonl",
        eval_samples=a.eval_samples,
        eval_batch=a.eval_batch,
        eval_every=a.rl_eval_every,
        save_every=2,
        keep=1,
        precision=prec,
        train_layers=a.rl_train_layers,
        lora_rank=getattr(a, "rl_lora_rank", 0) or None,
        dynamic_sampling=getattr(a, "rl_dynamic_sampling", 0) or None,
        stratify=None if getattr(a, "rl_stratify", "none") == "none" else a.rl_stratify,
    )
    if gpu_preset(a):  # mini- and micro-batches, sequence lengths and checkpoints from the trainer's preset
        for k in ("mini_batches", "micro_batch", "save_every"):
            del base[k]
        return torchrun(a) + ["train_rl.py", "--preset", gpu_preset(a)] + flags(**{**base, **kw})
    return torchrun(a) + ["train_rl.py"] + flags(**{**base, **kw})


def evaluate_base_cmd(a, data: Path, out: Path, prec: str) -> list[str]:
    """The base model's rows on the held-out users, and on synthetic users (no `a.lamp_dir`) their no-profile floor
    and oracle."""
    lamp_dir = getattr(a, "lamp_dir", "")
    return [PY, "evaluate.py"] + flags(
        model=a.policy,
        methods=a.base_methods if lamp_dir else f"{a.base_methods},floor,oracle",
        out=out,
        lamp_dir=lamp_dir or data / "synthetic_lamp",
        tasks=a.tasks,
        split=a.eval_split,
        limit=a.eval_questions,
        k=a.k,
        tags=data / "tags.json",
        r2p_candidates=2,
        r2p_chunk=96,
        r2p_max_tokens=192,
        r2p_budget_words=120,
        r2p_interventions=1,
        precision=prec,
    )
