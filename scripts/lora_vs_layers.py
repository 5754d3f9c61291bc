r"""The demo's top-layer training against LoRA adapters on every layer, at about the same wall time (issue 42, item 5).

    python scripts/lora_vs_layers.py --eval-split dev --sft-arms top16:16:0:12:2e-4,lora_1e-3:-1:16:10:1e-3
    python scripts/lora_vs_layers.py --eval-split test --eval-questions 128 --eval-samples 4 --eval-batch 24 \
        --sft-arms top16:16:0:12:2e-4,lora_1e-2:-1:16:10:1e-2 --rl-arms top4:4:0:2:2e-4,lora_1e-3:-1:16:1:1e-3 --seeds 0

(the second is the notebook's l2, issue 42's measured choice: the demo keeps top-layer training; `--eval-batch 24`
keeps 128 questions × 4 samples within 24 GB in fp32, where all at once is killed for memory)

On the demo's data (its defaults: easy LaMP-2 users, full chains; `--tasks`, `--chain-style` etc. as in
scripts/demo.py), each SFT arm `name:layers:rank:steps:lr` (layers -1: all 30; rank 0: the layers' weights, else
LoRA adapters of that rank, alpha 16, on every projection) trains one SFT policy, which train_rl.py then scores on
the held-out users before any step (`--max-steps 0`). Each RL arm (same fields) runs GSPO from the SFT policy of
`--rl-from` (default: the first SFT arm) for every seed. An arm's steps set its wall time: the bench's step times
(bench/README.md, LoRA against top-N) give equal-time step counts. Every arm lives in `<run>/<arm>/` laid out as a
demo run (`data`, `sft`, `rl_seed<N>/held_out_step*.json`), so `scripts/compare_runs.py --a <run>/X --b <run>/Y`
(`--model sft` for the SFT arms) compares two of them paired. `<run>/timings.json` keeps every stage's wall time.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from demo import DemoConfig, old_logp_source  # noqa: E402

from tagpr import config, hardware, stages  # noqa: E402


@dataclass
class CompareArmsConfig(DemoConfig):
    run: str = "runs/lora_vs_layers"  # the folder of every arm; rerun the same command to resume
    sft_arms: str = "top16:16:0:12:2e-4"  # SFT arms, comma-separated name:layers:rank:steps:lr
    rl_arms: str = ""  # GSPO arms from --rl-from's SFT policy, comma-separated name:layers:rank:steps:lr (empty: none)
    rl_from: str = ""  # the SFT arm the GSPO arms start from (empty: the first)


def arms(spec: str, flag: str) -> list[tuple[str, int, int, int, float]]:
    out = []
    for part in filter(None, spec.split(",")):
        fields = part.split(":")
        try:
            name, layers, rank, steps, lr = fields[0], int(fields[1]), int(fields[2]), int(fields[3]), float(fields[4])
        except (IndexError, ValueError):
            raise config.ConfigError(
                f"{flag} {part!r}: expected name:layers:rank:steps:lr, e.g. lora:-1:16:10:1e-3"
            ) from None
        if not name or "/" in name or steps < 1 or lr <= 0 or rank < 0 or (layers < 1 and layers != -1):
            raise config.ConfigError(f"{flag} {part!r}: a name, layers ≥ 1 or -1, rank ≥ 0, steps ≥ 1, lr > 0")
        out.append((name, layers, rank, steps, lr))
    return out


def link(target: Path, at: Path) -> None:
    if not at.exists():
        at.symlink_to(os.path.relpath(target, at.parent))


def main(argv=None):
    a, _ = config.parse(CompareArmsConfig, {}, argv, description=__doc__)
    sft_arms, rl_arms = arms(a.sft_arms, "--sft-arms"), arms(a.rl_arms, "--rl-arms")
    if not sft_arms:
        raise config.ConfigError("--sft-arms: at least one arm")
    start = a.rl_from or sft_arms[0][0]
    if start not in {x[0] for x in sft_arms}:
        raise config.ConfigError(f"--rl-from {start}: not one of --sft-arms' names")
    os.environ.update(stages.malloc_env(a.malloc))
    prec = stages.precision(a.precision)
    run = ROOT / a.run
    data, prmu, logs = run / "data", run / "prmu", run / "logs"
    run.mkdir(parents=True, exist_ok=True)
    timer = stages.Timer(run / "timings.json")
    print(f"{prec} (CPU: {hardware.describe()}); arms: SFT {a.sft_arms}; RL {a.rl_arms or 'none'} from {start}")
    timer.stage("build_data", data / "eval_prompts_swap.jsonl", stages.build_data_cmd(a, data), logs / "build_data.log")
    timer.stage("train_prmu", prmu / "model" / "users.json", stages.prmu_cmd(a, data, prmu), logs / "train_prmu.log")
    seeds = [int(s) for s in a.seeds.split(",") if s]
    for name, layers, rank, steps, lr in sft_arms:
        arm = run / name
        arm.mkdir(exist_ok=True)
        link(data, arm / "data")
        b = dataclasses.replace(a, sft_train_layers=layers, sft_lora_rank=rank, sft_steps=steps, sft_lr=lr)
        timer.stage(f"sft {name}", arm / "sft" / "model" / "config.json", stages.sft_cmd(b, data, arm / "sft", prec),
                    logs / f"sft_{name}.log")  # fmt: skip
        cmd = stages.rl_cmd(a, arm / "sft" / "model", prmu / "model", data, arm / "rl_seed0", 0, prec,
                            old_logp_source(a, prec), max_steps=0, eval_before=True)  # fmt: skip
        timer.stage(f"score sft {name}", arm / "rl_seed0" / "held_out_step0.json", cmd, logs / f"score_{name}.log")
    for name, layers, rank, steps, lr in rl_arms:
        arm = run / f"{start}+{name}"
        arm.mkdir(exist_ok=True)
        link(data, arm / "data")
        b = dataclasses.replace(a, rl_train_layers=layers, rl_lora_rank=rank, rl_steps=steps, rl_lr=lr)
        for s in seeds:
            out = arm / f"rl_seed{s}"
            cmd = stages.rl_cmd(b, run / start / "sft" / "model", prmu / "model", data, out, s, prec,
                                old_logp_source(b, prec), eval_before=False)  # fmt: skip
            timer.stage(f"rl {start}+{name} seed {s}", out / "model" / "config.json", cmd, logs / f"rl_{name}_{s}.log")
        out0 = arm / "rl_seed0"
        if out0.is_dir():  # the SFT policy's scores, for compare_runs (the same generators: no need to score again)
            link(run / start / "rl_seed0" / "held_out_step0.json", out0 / "held_out_step0.json")
    print(f"timings: {run / 'timings.json'}; compare: python scripts/compare_runs.py --a {run}/X --b {run}/Y")


if __name__ == "__main__":
    config.run(main)
