"""LoRA against top-N-layer training: peak memory and step time of SFT and GSPO, side by side in one run.

Each configuration is a fresh `train_sft.py` / `train_rl.py` process (one rank), so its peak resident memory
(`ru_maxrss` of the child) is its own. The step time is the median of the steps after the first (which pays
one-off costs), read from the run's metrics.jsonl (`time/step` for SFT, the phases' sum for GSPO).

    python bench/lora.py --sft runs/demo/data/sft.jsonl --prompts runs/demo/data/rl_prompts.jsonl

Prints one Markdown table; bench/README.md holds the measured ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = {  # name → the flags that set what trains
    "top4": ["--train-layers", "4"],
    "top16": ["--train-layers", "16"],
    "all": ["--train-layers", "-1"],
    "lora16-top4": ["--train-layers", "4", "--lora-rank", "16", "--lora-alpha", "32"],
    "lora16-all": ["--train-layers", "-1", "--lora-rank", "16", "--lora-alpha", "32"],
}


def peak_rss_mb_of(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd` in a child; → (its peak RSS in MB, wall seconds). Each call forks a helper so that
    RUSAGE_CHILDREN holds this one command alone."""
    helper = (
        "import resource, subprocess, sys, json;"
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True);"
        "print(json.dumps([r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.stderr[-2000:]]))"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", helper, *cmd], capture_output=True, text=True, check=True)
    rc, kb, err = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{err}")
    return kb / 1024, time.perf_counter() - t0


def step_seconds(metrics: Path, keys: tuple[str, ...]) -> float:
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    times = [sum(r[k] for k in keys if k in r) for r in rows if any(k in r for k in keys)]
    return statistics.median(times[1:] or times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--policy", default="smollm2-135m", help="the model both stages start from")
    ap.add_argument("--sft", required=True, help="sft.jsonl (build_data.py's)")
    ap.add_argument("--prompts", required=True, help="rl_prompts.jsonl (build_data.py's)")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    ap.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated names from: " + ", ".join(CONFIGS))
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.configs.split(","):
            flags = CONFIGS[name]
            common = ["--precision", a.precision, "--max-steps", str(a.steps), "--resume", "", "--seed", "0"]
            sft_out = Path(tmp) / f"sft-{len(rows)}"
            sft_cmd = [sys.executable, str(ROOT / "train_sft.py"), "--model", a.policy, "--sft", a.sft]
            sft_cmd += ["--out", str(sft_out), "--global-batch", "8", "--micro-batch", "4", "--eval-frac", "0"]
            sft_cmd += ["--save-every", "1000", *common, *flags]
            sft_mb, _ = peak_rss_mb_of(sft_cmd)
            sft_s = step_seconds(sft_out / "metrics.jsonl", ("time/step",))
            rl_out = Path(tmp) / f"rl-{len(rows)}"
            rl_cmd = [sys.executable, str(ROOT / "train_rl.py"), "--policy", a.policy, "--prompts", a.prompts]
            rl_cmd += ["--prmu", "none", "--out", str(rl_out), "--global-batch", "8", "--group", "4"]
            rl_cmd += ["--mini-batches", "2", "--micro-batch", "8", "--max-new-tokens", "160", "--lr", "1e-4"]
            rl_cmd += ["--guided-epochs", "100", "--save-every", "1000", "--rollouts-every", "0", *common, *flags]
            rl_mb, _ = peak_rss_mb_of(rl_cmd)
            phases = ("time/rollout", "time/reward", "time/old_logp", "time/update")
            rl_s = step_seconds(rl_out / "metrics.jsonl", phases)
            update = step_seconds(rl_out / "metrics.jsonl", ("time/update", "time/old_logp"))
            trained = json.loads((rl_out / "config.json").read_text())["trainable_params"]
            rows.append((name, trained, sft_s, sft_mb, rl_s, update, rl_mb))
            print(f"{name}: done", file=sys.stderr, flush=True)
    print(f"\n{a.policy}, {a.precision}, one process, {a.steps} steps a run (medians of steps 2…)\n")
    print(
        "| trains | parameters trained | SFT s/step | SFT peak RSS MB | GSPO s/step | of it: old log-probs + update "
        "| GSPO peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, n, ss, sm, rs, up, rm in rows:
        print(f"| {name} | {n / 1e6:.2f}M | {ss:.1f} | {sm:.0f} | {rs:.1f} | {up:.1f} | {rm:.0f} |")


if __name__ == "__main__":
    sys.exit(main())
