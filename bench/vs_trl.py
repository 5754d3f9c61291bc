"""Our GSPO (`train_rl.py`) and TRL's (`GRPOTrainer`, importance_sampling_level="sequence") side by side, on the
same work: the same policy folder, the same prompts, the same reward function, the same settings.

    python bench/vs_trl.py                          # the demo's SFT model and RL prompts; 3 seeds × 3 rollout batches
    python bench/vs_trl.py --seeds 0 --batches 2    # a quick look
    python bench/vs_trl.py --sides trl,ours-recompute,ours-sampler   # both ways of ours beside TRL

The work: a rollout batch of `--prompts-per-batch` prompts × `--group` samples (T = `--temperature`, at most
`--max-new` tokens), scored by TagPR's guided reward without PRMU (R_v + λ1·R_f + R_rep + R_tag, `tagpr.rewards
.composite_reward` on both sides), then `--updates` optimizer steps on equal shares of it (TRL:
`steps_per_generation`; ours: `--mini-batches`), GSPO's ε 3e-4 / 4e-4, no KL, AdamW (β 0.9 / 0.95, no weight
decay), constant LR, gradient clip 1, fp32, the whole model trained, one process. The old log-probs: TRL
recomputes them with a forward pass; ours takes the sampler's own by default (`--old-logp sampler`, exact to fp32
summation order), or recomputes them too with `--old-logp recompute`. Ours draws its mini-batches as whole
groups (`--minibatch-by group`, so its shared-prompt updates compute each prompt once per update; TRL shuffles
rollouts). Each trainer runs as its own
child process, one after the other (its peak resident memory is the child's `ru_maxrss`).

Per rollout batch it records the mean reward, the time of each phase (generation; reward + old log-probs; the
updates; the whole batch) and the generated tokens. It prints the side-by-side table (`results.md`), writes every
number (`results.json`) and both reward curves, mean and range over seeds (`vs_trl.png`), into `--out`. TRL is a
bench dependency (`pip install -e '.[bench]'`), never a runtime one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagpr import config, rewards, tags  # noqa: E402  (the repository root first: the bench runs from a checkout)
from tagpr.files import atomic_write_text, write_json  # noqa: E402
from tagpr.records import read_rl_prompts  # noqa: E402


@dataclass
class BenchConfig:
    policy: str = "runs/demo/sft/model"  # the policy both trainers start from (an HF folder)
    prompts: str = "runs/demo/data/rl_prompts.jsonl"  # RL prompts with golds; tags.json beside it is R_tag's vocabulary
    out: str = "runs/vs_trl"  # results.json, results.md, vs_trl.png, each run's folder
    seeds: str = "0,1,2"  # seeds, comma-separated: each trainer runs once per seed
    batches: int = 3  # rollout batches per run
    prompts_per_batch: int = 8  # prompts per rollout batch
    group: int = 4  # samples per prompt (G)
    updates: int = 4  # optimizer steps per rollout batch, on equal shares of it
    lr: float = 2e-5  # learning rate (constant)
    clip_low: float = 3e-4  # GSPO ε_low
    clip_high: float = 4e-4  # GSPO ε_high
    temperature: float = 1.0  # sampling temperature
    max_new: int = 128  # new tokens per sample at most
    sides: str = "trl,ours"  # which trainers to run (comma-separated): trl; ours (old log-probs as --old-logp);
    # ours-recompute and ours-sampler (both ways, in one run)
    old_logp: str = "sampler"  # side "ours": old log-probs from the sampler (fp32) or "recompute" (a pass)
    minibatch_by: str = "group"  # ours: mini-batches of whole groups (the prompt computed once per group's
    # update) or "rollout" (a plain shuffle, as TRL)
    side: str = ""  # internal: run one trainer in this process ("trl")
    seed: int = 0  # internal: the seed of that run


def reward_fn(vocab):
    """TagPR's guided reward without PRMU, as `train_rl.compute_rewards` gives it with `--prmu none`."""
    weights = rewards.RewardWeights(w_format=0.5, w_personal=0.0)
    return lambda texts, golds, tasks: rewards.composite_reward(texts, golds, tasks, None, weights, vocab, 3, 4)[0]


def load_vocab(prompts: Path):
    path = prompts.parent / "tags.json"
    return tags.load_tags(path) if path.is_file() else tags.DEFAULT_TAGS


# ----------------------------------------------------------------------------- TRL, in its own process


def trl_run(a: BenchConfig, out: Path) -> None:
    """One TRL run; writes <out>/batches.jsonl (one row per rollout batch)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from tagpr.models import load_model

    torch.manual_seed(a.seed)
    data = read_rl_prompts(a.prompts)
    score = reward_fn(load_vocab(Path(a.prompts)))
    lm, tok = load_model(a.policy, device="cpu", dtype=torch.float32, seed=a.seed)  # "tiny": train_rl's weights
    ds = Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": p.prompt}] for p in data],
            "gold": [p.gold for p in data],
            "task": [p.task for p in data],
        }
    )
    n = a.prompts_per_batch * a.group
    args = trl.GRPOConfig(
        output_dir=str(out / "trl_out"),
        use_cpu=True,
        bf16=False,
        seed=a.seed,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        max_steps=a.batches * a.updates,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        per_device_train_batch_size=n // a.updates,
        gradient_accumulation_steps=1,
        steps_per_generation=a.updates,
        num_generations=a.group,
        max_completion_length=a.max_new,
        temperature=a.temperature,
        top_p=1.0,
        top_k=0,
        importance_sampling_level="sequence",
        loss_type="grpo",
        beta=0.0,
        epsilon=a.clip_low,
        epsilon_high=a.clip_high,
        scale_rewards="group",
        mask_truncated_completions=False,
        activation_checkpointing=False,
        disable_dropout=True,
    )
    rows: list[dict] = []

    def reward(prompts, completions, completion_ids, gold, task, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        r = score(texts, gold, task)
        rows[-1].update(
            reward=sum(r) / len(r),
            tokens=sum(len(c) for c in completion_ids),
            n=len(r),
            samples=[{"text": t, "gold": g, "task": k, "reward": x} for t, g, k, x in zip(texts, gold, task, r)],
        )
        return r

    tr = trl.GRPOTrainer(model=lm, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok)
    gen, prep = tr._generate, tr._generate_and_score_completions

    def timed_prep(*args_, **kw):
        rows.append({"t_start": time.perf_counter(), "t_gen": 0.0})
        res = prep(*args_, **kw)
        rows[-1]["t_prep"] = time.perf_counter() - rows[-1]["t_start"]
        return res

    def timed_gen(*args_, **kw):
        t0 = time.perf_counter()
        res = gen(*args_, **kw)
        rows[-1]["t_gen"] += time.perf_counter() - t0
        return res

    class StepEnd(TrainerCallback):
        def on_step_end(self, args_, state, control, **kw):
            if state.global_step % a.updates == 0:  # the batch's last update
                rows[-1]["t_batch"] = time.perf_counter() - rows[-1]["t_start"]

    tr._generate, tr._generate_and_score_completions = timed_gen, timed_prep
    tr.add_callback(StepEnd())
    tr.train()
    with open(out / "batches.jsonl", "w") as f:
        for i, r in enumerate(rows):
            f.write(
                json.dumps(
                    {
                        "batch": i + 1,
                        "reward": r["reward"],
                        "generation": r["t_gen"],
                        "score_and_old_logp": r["t_prep"] - r["t_gen"],
                        "updates": r["t_batch"] - r["t_prep"],
                        "batch_time": r["t_batch"],
                        "gen_tokens": r["tokens"],
                        "samples": r["n"],
                        "rollouts": r["samples"],
                    }
                )
                + "\n"
            )


# ----------------------------------------------------------------------------- the two sides as child processes


def child(cmd: list[str], log: Path) -> float:
    """Run `cmd` (output to `log`); → its peak resident memory in GiB. Stops the bench if it fails."""
    with open(log, "w") as f:
        p = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"},
        )
        _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"failed: {' '.join(cmd)}; log: {log}")
    return usage.ru_maxrss / 2**20  # KiB → GiB


def run_trl(a: BenchConfig, seed: int, out: Path) -> tuple[list[dict], float]:
    out.mkdir(parents=True, exist_ok=True)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in asdict(a).items() if k not in ("side", "seed", "out")]
    mem = child([sys.executable, __file__, *argv, "--side=trl", f"--seed={seed}", f"--out={out}"], out / "log.txt")
    rows = [json.loads(line) for line in (out / "batches.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "rollouts"} for r in rows], mem  # the texts stay in batches.jsonl


def run_ours(a: BenchConfig, seed: int, out: Path, old_logp: str) -> tuple[list[dict], float]:
    out.mkdir(parents=True, exist_ok=True)
    mem = child(
        [
            sys.executable,
            "train_rl.py",
            "--policy",
            a.policy,
            "--prompts",
            a.prompts,
            "--prmu",
            "none",
            "--out",
            str(out),
            "--resume",
            "",
            "--seed",
            str(seed),
            "--precision",
            "fp32",
            "--train-layers",
            "-1",
            "--global-batch",
            str(a.prompts_per_batch),
            "--group",
            str(a.group),
            "--mini-batches",
            str(a.updates),
            "--micro-batch",
            str(a.prompts_per_batch * a.group // a.updates),
            "--max-new-tokens",
            str(a.max_new),
            "--temperature",
            str(a.temperature),
            "--lr",
            str(a.lr),
            "--clip-low",
            str(a.clip_low),
            "--clip-high",
            str(a.clip_high),
            "--warmup-steps",
            "0",
            "--max-steps",
            str(a.batches),
            "--guided-epochs",
            "1000",
            "--overlong",
            "keep",
            "--save-every",
            "100000",
            "--rollouts-every",
            "1",
            "--old-logp",
            old_logp,
            "--minibatch-by",
            a.minibatch_by,
        ],
        out / "log.txt",
    )
    rows = []
    for line in (out / "metrics.jsonl").read_text().splitlines():
        m = json.loads(line)
        if "reward" not in m:
            continue
        t = {k: m[f"time/{k}"] for k in ("rollout", "reward", "old_logp", "update")}
        rows.append(
            {
                "batch": m["step"],
                "reward": m["reward"],
                "generation": t["rollout"],
                "score_and_old_logp": t["reward"] + t["old_logp"],
                "updates": t["update"],
                "batch_time": sum(t.values()),
                "gen_tokens": m["response_len"] * a.prompts_per_batch * a.group,
                "samples": a.prompts_per_batch * a.group,
            }
        )
    return rows, mem


# ----------------------------------------------------------------------------- the report

PHASES = [
    ("generation", "generation"),
    ("score_and_old_logp", "reward + old log-probs"),
    ("updates", "the updates"),
    ("batch_time", "whole rollout batch"),
]


def summarize(runs: dict[str, dict[int, dict]], a: BenchConfig) -> tuple[str, dict]:
    """The markdown table and the numbers it holds. Times: mean over seeds of the batches after the first
    (the first carries one-off costs on both sides: allocator warm-up, TRL's first generate)."""
    sides = list(runs)
    mine = [s for s in sides if s != "trl"] if "trl" in sides else []  # the sides with a ratio to TRL's
    steady = lambda side, key: [r[key] for s in runs[side].values() for r in s["rows"][1:] or s["rows"]]
    mean = lambda xs: sum(xs) / len(xs)
    num: dict = {side: {} for side in sides}
    for side in sides:
        for key, _ in PHASES:
            num[side][key] = mean(steady(side, key))
        num[side]["tokens_per_s"] = sum(steady(side, "gen_tokens")) / sum(steady(side, "generation"))
        num[side]["mean_length"] = sum(steady(side, "gen_tokens")) / sum(steady(side, "samples"))
        num[side]["peak_rss_gib"] = max(s["peak_rss_gib"] for s in runs[side].values())
        curve = [[s["rows"][b]["reward"] for s in runs[side].values()] for b in range(a.batches)]
        num[side]["reward"] = [{"mean": mean(c), "min": min(c), "max": max(c)} for c in curve]
    lines = [
        f"| per rollout batch ({a.prompts_per_batch} prompts × {a.group}, ≤ {a.max_new} tokens, {a.updates} "
        f"updates; mean of batches 2–{a.batches} over seeds {a.seeds}) | "
        + " | ".join(sides)
        + "".join(f" | {s} / TRL" for s in mine)
        + " |",
        "|---|" + "---|" * (len(sides) + len(mine)),
    ]
    ratio = lambda key: "".join(f" | {num[s][key] / num['trl'][key]:.2f}" for s in mine) + " |"
    for key, label in PHASES:
        lines.append(f"| {label} (s) | " + " | ".join(f"{num[s][key]:.1f}" for s in sides) + ratio(key))
    lines.append(
        "| generated tokens / s | " + " | ".join(f"{num[s]['tokens_per_s']:.0f}" for s in sides) + ratio("tokens_per_s")
    )
    lines.append(
        "| mean completion length (tokens) | "
        + " | ".join(f"{num[s]['mean_length']:.1f}" for s in sides)
        + ratio("mean_length")
    )
    lines.append(
        "| peak resident memory (GiB) | "
        + " | ".join(f"{num[s]['peak_rss_gib']:.2f}" for s in sides)
        + ratio("peak_rss_gib")
    )
    lines += [
        "",
        "| rollout batch | " + " | ".join(f"{s} reward: mean [min, max] over seeds" for s in sides) + " |",
        "|---|" + "---|" * len(sides),
    ]
    for b in range(a.batches):
        lines.append(
            f"| {b + 1} | "
            + " | ".join("{mean:.3f} [{min:.3f}, {max:.3f}]".format(**num[s]["reward"][b]) for s in sides)
            + " |"
        )
    return "\n".join(lines) + "\n", num


def plot(num: dict, a: BenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = list(range(1, a.batches + 1))
    for side, color in zip(num, ("tab:orange", "tab:blue", "tab:green", "tab:red")):
        c = num[side]["reward"]
        ax.plot(x, [r["mean"] for r in c], "o-", color=color, label=f"{side} (mean of seeds {a.seeds})")
        ax.fill_between(x, [r["min"] for r in c], [r["max"] for r in c], color=color, alpha=0.2)
    ax.set_xticks(x)
    ax.set_xlabel(f"rollout batch ({a.updates} updates each)")
    ax.set_ylabel("mean reward of the batch")
    ax.set_title("GSPO: TRL GRPOTrainer vs train_rl.py (range over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    a, _ = config.parse(BenchConfig, {}, argv, description=__doc__)
    out = Path(a.out)
    if a.side == "trl":
        return trl_run(a, out)
    for what, path in (("--policy", Path(a.policy) / "config.json"), ("--prompts", Path(a.prompts))):
        if not path.is_file() and not (what == "--policy" and a.policy in ("tiny", "smollm2-135m")):
            raise config.ConfigError(f"{what}: {path} not found (run `bash scripts/demo.sh` first, or pass {what})")
    if (a.prompts_per_batch * a.group) % a.updates:
        raise config.ConfigError(
            f"--updates {a.updates} must divide the rollout batch ({a.prompts_per_batch} × {a.group})"
        )
    seeds = [int(s) for s in a.seeds.split(",") if s]
    unknown = [s for s in a.sides.split(",") if s and s not in ("trl", "ours", "ours-recompute", "ours-sampler")]
    if unknown or a.old_logp not in ("sampler", "recompute") or a.minibatch_by not in ("group", "rollout"):
        raise config.ConfigError(
            f"--sides {a.sides!r} / --old-logp {a.old_logp!r} / --minibatch-by {a.minibatch_by!r}: sides are trl, "
            "ours, ours-recompute, ours-sampler; old log-probs sampler or recompute; mini-batches group or rollout"
        )
    runs: dict[str, dict[int, dict]] = {}
    for side in [s for s in a.sides.split(",") if s]:
        for seed in seeds:
            t0 = time.time()
            where = out / f"{side}_seed{seed}"
            if side == "trl":
                rows, mem = run_trl(a, seed, where)
            else:
                rows, mem = run_ours(a, seed, where, side.removeprefix("ours-") if "-" in side else a.old_logp)
            runs.setdefault(side, {})[seed] = {"rows": rows, "peak_rss_gib": mem, "wall_s": time.time() - t0}
            print(
                f"{side} seed {seed}: {time.time() - t0:.0f} s, rewards "
                + " ".join(f"{r['reward']:.3f}" for r in rows),
                flush=True,
            )
    table, num = summarize(runs, a)
    cpu = (
        sorted(set(open("/proc/cpuinfo").read().split()) & {"avx2", "avx512_bf16", "amx_bf16"})
        if Path("/proc/cpuinfo").is_file()
        else []
    )
    write_json(out / "results.json", {"config": asdict(a), "cpu_flags": cpu, "runs": runs, "summary": num})
    atomic_write_text(out / "results.md", table)
    plot(num, a, out / "vs_trl.png")
    print(f"CPU flags: {', '.join(cpu)}\n\n{table}\n→ {out / 'results.md'}, {out / 'vs_trl.png'}")


if __name__ == "__main__":
    config.run(main)
