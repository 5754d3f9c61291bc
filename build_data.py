"""Build TagPR's training data: tagged reasoning chains (SFT), PRMU preference pairs, RL prompts (TagPR §3.2).

    python build_data.py                                   # offline default: synthetic users, simulated expert
    python build_data.py --lamp-dir /data/LaMP --out runs/lamp/data \\
        --teacher openai:Qwen/Qwen3-235B-A22B-Thinking-2507@http://vllm-host:8000/v1 \\
        --judge openai:gpt-4o@https://api.openai.com/v1 --judge-key-env OPENAI_API_KEY \\
        --tagger openai:gpt-4o@https://api.openai.com/v1 --tagger-key-env OPENAI_API_KEY \\
        --embedder openai:text-embedding-3-small@https://api.openai.com/v1 --embedder-key-env OPENAI_API_KEY

Stages and their counts: `tagpr/datagen.py`. Backends (`openai:MODEL@URL`, `hf:NAME`, `simulated`,
`hashing`): `tagpr/llm.py`. The simulated expert and its mistake rates: `tagpr/expert.py`.
Rerunning the same command resumes: every reply is cached under `<out>/cache/`, so only
what has no answer yet is asked.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from tagpr import config, datagen, lamp, llm, prompts, synthetic
from tagpr.config import COUNT, FRACTION, NON_NEGATIVE, POSITIVE
from tagpr.expert import SimulatedExpert
from tagpr.files import check_out, write_json, write_jsonl
from tagpr.hardware import keep_freed_memory
from tagpr.records import RLPrompt
from tagpr.tags import load_tags

TASKS = "LaMP_1,LaMP_2,LaMP_3,LaMP_4,LaMP_5,LaMP_7"  # the paper's six (LaMP-6 needs a licensed corpus)


@dataclass
class BuildConfig:
    lamp_dir: str = ""  # LaMP folder; empty: synthetic users written to <out>/synthetic_lamp
    out: str = "runs/default/data"  # output folder: the data files, manifest.json, cache/ of every reply
    tasks: str = TASKS  # comma-separated task names
    instances_per_task: Annotated[int, COUNT] = 1000  # LaMP train instances sampled per task (paper)
    chains: Annotated[int, COUNT] = 16  # teacher samples per instance (paper)
    k: Annotated[int, COUNT] = 8  # profile items (paper: 8 most recent)
    retriever: Literal["recency", "bm25", "random"] = "recency"  # which k profile items a prompt shows
    rouge_threshold: Annotated[float, FRACTION] = 0.3  # generation accuracy filter (ours)
    judge_threshold: Annotated[int, NON_NEGATIVE] = 15  # keep composite > 15 (paper)
    n_tags: Annotated[int, COUNT] = 9  # primary tags the free tags are clustered into (paper)
    kmeans_restarts: Annotated[int, COUNT] = 50  # k-means runs from random starts; the best is kept
    min_tags: Annotated[int, NON_NEGATIVE] = 3  # format filter: fewest tags a chain must use (paper)
    rl_per_task: Annotated[int, NON_NEGATIVE] = 1024  # RL prompts per task (paper)
    rl_lamp2: Annotated[int, NON_NEGATIVE] = 3200  # RL prompts for LaMP-2 (paper)
    spot_check: Annotated[int, NON_NEGATIVE] = 20  # chains written to spot_check.md for a person to read
    teacher_temperature: Annotated[float, NON_NEGATIVE] = 1.0  # sampling temperature of the teacher's chains
    max_tokens: Annotated[int, COUNT] = 4096  # per reply of teacher, judge or tagger
    teacher: str = "simulated"  # backend: openai:MODEL@URL (any OpenAI-compatible server) | hf:NAME (a local
    # model folder, smollm2-135m, tiny) | simulated (synthetic users only)
    judge: str = "simulated"  # the judge's backend (same forms as --teacher)
    tagger: str = "simulated"  # the tagger's backend (same forms as --teacher)
    embedder: str = "hashing"  # tag-name embedder: openai:MODEL@URL | hf:NAME | hashing (lexical) | simulated
    teacher_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (never logged)
    judge_key_env: str = "OPENAI_API_KEY"  # the judge's key variable (as --teacher-key-env)
    tagger_key_env: str = "OPENAI_API_KEY"  # the tagger's key variable (as --teacher-key-env)
    embedder_key_env: str = "OPENAI_API_KEY"  # the embedder's key variable (as --teacher-key-env)
    concurrency: Annotated[int, COUNT] = 16  # HTTP requests in flight at once, per backend
    timeout: Annotated[float, POSITIVE] = 600.0  # seconds per HTTP request (long thinking chains)
    retries: Annotated[int, NON_NEGATIVE] = 5  # on 429 / 5xx / timeouts / malformed replies
    backoff: Annotated[float, NON_NEGATIVE] = 2.0  # seconds; doubles per retry, with jitter
    seed: Annotated[int, NON_NEGATIVE] = 0  # instance sampling, teacher sampling, k-means
    synthetic_users: Annotated[int, COUNT] = 150  # synthetic mode: train users per task (4 questions each)
    difficulty: Literal["hard", "easy"] = "hard"  # synthetic mode: "hard" rules (a facet, a bias, a style to infer)
    # or "easy" ones whose evidence is lexical (LaMP_2, LaMP_3, LaMP_7; docs/synthetic.md)
    chain_style: Literal["full", "terse", "bound"] = "full"  # synthetic mode: the simulated teacher's steps, a
    # sentence each ("full"), a one-word opener and the content ("terse": ~half the tokens, every stage that reads or
    # writes chains cheaper), or terse with a decision naming the input's genre / product ("bound"; tagpr/expert.py)
    eval_users: Annotated[int, COUNT] = 60  # synthetic mode: dev and test users per task (2 questions each; the first
    # users of a larger number are the same)
    eval_prompts: Annotated[int, NON_NEGATIVE] = 64  # held-out prompts per task (users disjoint from train) →
    # eval_prompts.jsonl and eval_prompts_swap.jsonl (another user's profile), for train_rl.py --eval-prompts; 0: none
    eval_split: Literal["dev", "test"] = "dev"  # the split the held-out prompts come from: choose recipes on dev,
    # claim on test (LaMP's own test golds are private: synthetic users only)


PRESETS = {
    # the offline default: sizes that build in about a minute on a 2-core CPU
    "synthetic": dict(instances_per_task=200, chains=4, rl_per_task=256, rl_lamp2=256),
    "paper": dict(instances_per_task=1000, chains=16, rl_per_task=1024, rl_lamp2=3200),
    "tiny": dict(
        out="runs/tiny/data",
        instances_per_task=12,
        chains=2,
        rl_per_task=8,
        rl_lamp2=8,
        synthetic_users=6,
        spot_check=4,
    ),
}


def write_eval_prompts(
    lamp_dir, out: Path, tasks: list[str], n: int, k: int, retriever: str, min_tags: int, split_name: str = "dev"
) -> int:
    """The first `n` questions of each task's `split_name` split as RL prompts with golds (the same prompt as
    training, with the built vocabulary), and the same questions each shown another user's profile
    (`lamp.swap_profiles`)."""
    vocab = load_tags(out / "tags.json")
    own, swapped = [], []
    for task in tasks:
        split = lamp.load_split(lamp_dir, task, split_name)
        qs = split.questions[:n]
        for shown, rows in ((qs, own), (lamp.swap_profiles(qs), swapped)):
            rows += [
                RLPrompt(
                    q.id,
                    split.task.name,
                    q.user_id or q.id,
                    prompts.build_prompt(split.task, q, k, retriever, vocab=vocab, min_tags=min_tags),
                    split.golds[q.id],
                ).to_json()
                for q in shown
            ]
    write_jsonl(out / "eval_prompts.jsonl", own)
    write_jsonl(out / "eval_prompts_swap.jsonl", swapped)
    return len(own)


def main(argv=None) -> dict:
    keep_freed_memory()
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, preset = config.parse(BuildConfig, PRESETS, argv, description=__doc__)
    if preset is None and not cfg.lamp_dir:  # synthetic users without a preset: the offline default's sizes
        cfg, preset = config.parse(BuildConfig, PRESETS, ["--preset", "synthetic", *argv])
    out = Path(cfg.out)
    check_out(out)
    t0 = time.time()
    tasks = [t for t in cfg.tasks.split(",") if t]
    expert = None
    lamp_dir = cfg.lamp_dir
    if not lamp_dir:
        lamp_dir = out / "synthetic_lamp"
        if not (lamp_dir / tasks[0] / "train" / "train_questions.json").is_file():
            synthetic.generate(
                lamp_dir,
                tasks,
                cfg.seed,
                {"train": (cfg.synthetic_users, 4), "dev": (cfg.eval_users, 2), "test": (cfg.eval_users, 2)},
                cfg.difficulty,
            )
        print(f"synthetic users (LaMP format) in {lamp_dir}")
    if "simulated" in (cfg.teacher, cfg.judge, cfg.tagger, cfg.embedder):
        expert = SimulatedExpert(lamp_dir, tasks, style=cfg.chain_style)
    cache = out / "cache"
    backends = {
        role: llm.from_spec(
            getattr(cfg, role),
            role,
            cache,
            getattr(cfg, f"{role}_key_env"),
            cfg.concurrency,
            cfg.timeout,
            cfg.retries,
            cfg.backoff,
            expert,
        )
        for role in ("teacher", "judge", "tagger", "embedder")
    }
    for role, b in backends.items():
        print(f"{role}: {b.describe()}")
    write_json(out / "config.json", {**config.to_dict(cfg), "preset": preset})
    s = datagen.Settings(
        tasks=tasks,
        **{
            k: getattr(cfg, k)
            for k in (
                "instances_per_task",
                "chains",
                "k",
                "retriever",
                "rouge_threshold",
                "judge_threshold",
                "n_tags",
                "kmeans_restarts",
                "min_tags",
                "rl_per_task",
                "rl_lamp2",
                "spot_check",
                "teacher_temperature",
                "max_tokens",
                "seed",
            )
        },
    )
    manifest = datagen.build(lamp_dir, out, s, backends)
    if cfg.eval_prompts:
        n = write_eval_prompts(
            lamp_dir, out, tasks, cfg.eval_prompts, cfg.k, cfg.retriever, cfg.min_tags, split_name=cfg.eval_split
        )
        print(
            f"held-out prompts ({cfg.eval_split} users): {n} per file → {out / 'eval_prompts.jsonl'}, "
            f"{out / 'eval_prompts_swap.jsonl'}"
        )
    print(f"done in {time.time() - t0:.0f}s; counts per stage in {out / 'manifest.json'}")
    return manifest


if __name__ == "__main__":
    config.run(main)
