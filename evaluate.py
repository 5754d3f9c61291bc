"""Evaluate any model with any method on LaMP (or synthetic users): official metrics, a table like TagPR's Table 1.

    python evaluate.py --model smollm2-135m --methods zero-shot,rag,rag-r,r2p --limit 24
    python evaluate.py --model runs/default/rl/model --methods tagpr
    python evaluate.py --model runs/default/rl/model --methods tagpr,floor,oracle --samples 2 --swap --limit 64
    python evaluate.py --model runs/default/rl/model --methods tagpr --sweep k          # k ∈ {2, 4, 8, 16, 32}
    python evaluate.py --model runs/default/rl/model --methods tagpr --sweep retriever  # recency, bm25, random, dense
    python evaluate.py --model openai:gpt-4o@https://api.openai.com/v1 --lamp-dir /data/LaMP --methods rag --paper

Writes `<out>/<setting>/<task>/` predictions.json (the official outputs format), golds.json,
traces.jsonl (prompt, full output, answer), scores.json (each question's accuracy, |error| or ROUGE-1),
metrics.json (with `n` and the primary metric's 95 % bootstrap interval); and `<out>/metrics.json`,
`<out>/table.md` (+ `sweep.png` for sweeps). Rerunning resumes: finished (setting, task)
folders are reused and model replies come from `<out>/cache/`.
Methods and how each departs from its paper: `tagpr/evaluation.py`, `tagpr/r2p.py`.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch

from tagpr import config, evaluation, lamp, llm, r2p, synthetic, tags
from tagpr.config import COUNT, NON_NEGATIVE, POSITIVE
from tagpr.files import DataError, atomic_write_text, check_out, write_json
from tagpr.hardware import keep_freed_memory, resolve_precision
from tagpr.models import check_model
from tagpr.retrieval import DenseEncoder

SWEEPS = {"k": [2, 4, 8, 16, 32], "retriever": ["recency", "bm25", "random", "dense"]}


@dataclass
class EvalConfig:
    model: str = "smollm2-135m"  # HF folder, smollm2-135m, tiny, or openai:MODEL@BASE_URL
    methods: str = "zero-shot,rag,rag-r,r2p"  # comma-separated: zero-shot, rag, rag-r, pag, r2p, tagpr, oracle,
    # floor (oracle and floor: synthetic users' latent rules, no model)
    tasks: str = "LaMP_1,LaMP_2,LaMP_3,LaMP_4,LaMP_5,LaMP_7"  # comma-separated task names (LaMP_2N: news)
    split: Literal["train", "dev", "test"] = "dev"  # test golds are private: the paper evaluates on dev
    lamp_dir: str = ""  # empty: runs/default/data/synthetic_lamp if present, else synthetic users
    out: str = ""  # empty: runs/default/eval/<model name>
    limit: Annotated[int, NON_NEGATIVE] = 0  # questions per task (0: all)
    k: Annotated[int, COUNT] = 8  # paper: the 8 most recent items
    retriever: Literal["recency", "bm25", "random", "dense"] = "recency"  # which k profile items a prompt shows
    dense_model: str = ""  # a local encoder folder for --retriever dense
    sweep: Literal["", "k", "retriever"] = ""  # "k": k in 2, 4, 8, 16, 32; "retriever": each retriever
    tags: str = ""  # tags.json for the TagPR prompt; empty: beside the RL prompts, else default
    paper: bool = False  # add the paper's Table 1 rows (quoted, labelled)
    batch_size: Annotated[int, COUNT] = 16  # a local model's prompts per generation batch
    precision: Literal["fp32", "bf16"] = "fp32"  # a local model's matmuls; bf16 (~2× faster) needs AVX512-BF16 / AMX
    max_new_direct: Annotated[int, COUNT] = 48  # new tokens for methods that answer directly
    max_new_reason: Annotated[int, COUNT] = 320  # new tokens for methods that reason first (rag-r, tagpr)
    r2p_candidates: Annotated[int, COUNT] = 3  # R2P: candidate responses before self-referencing
    r2p_chunk: Annotated[int, COUNT] = 48  # R2P: tokens generated between two intervention checks
    r2p_max_tokens: Annotated[int, COUNT] = 384  # R2P: new tokens per candidate at most
    r2p_budget_words: Annotated[int, COUNT] = 180  # R2P: reasoning words before a "too long" intervention
    r2p_interventions: Annotated[int, NON_NEGATIVE] = 3  # corrections per response at most
    api_key_env: str = "OPENAI_API_KEY"  # with openai: the environment variable that holds the key (never logged)
    concurrency: Annotated[int, COUNT] = 16  # with openai: requests in flight at once
    seed: Annotated[int, NON_NEGATIVE] = 0  # sampling (R2P candidates) and the random retriever
    samples: Annotated[int, NON_NEGATIVE] = 0  # also score each model method on k samples per question at --temperature
    # (setting "<method>@sampled": the mean over the k; 0: greedy only)
    temperature: Annotated[float, POSITIVE] = 1.0  # the sampled setting's temperature (the RL rollouts' by default)
    swap: bool = False  # also score each model method with every question shown another user's
    # profile (setting "<method>@swap", greedy): the personalization control
    allow_failures: bool = False  # score a failed model call as unanswered (the table shows n and the failures);
    # without it, any failure stops the run before anything is scored


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.strip("/").split("@")[0]).strip("_")[-60:]


def make_backend(cfg: EvalConfig, cache: Path) -> llm.Backend:
    if cfg.model.startswith("openai:"):
        return llm.from_spec(cfg.model, "model", cache, cfg.api_key_env, cfg.concurrency)
    return llm.HFBackend(
        cfg.model, cache_path=cache / "model.jsonl", batch_size=cfg.batch_size, precision=cfg.precision
    )  # checked by main


def lamp_folder(cfg: EvalConfig) -> Path:
    """--lamp-dir, or the default run's synthetic users (made here, seed 0, when no run has made them)."""
    if cfg.lamp_dir:
        return Path(cfg.lamp_dir)
    lamp_dir = Path("runs/default/data/synthetic_lamp")
    if not (lamp_dir / "LaMP_2" / cfg.split).is_dir():
        lamp_dir = Path("runs/default/eval/synthetic_lamp")
        if not (lamp_dir / "LaMP_2" / cfg.split).is_dir():
            synthetic.generate(lamp_dir, seed=0)
    return lamp_dir


def plan(cfg: EvalConfig, methods: list[str]) -> tuple[list[tuple], DenseEncoder | None]:
    """The settings to score, as (setting name, method, k, retriever, samples, swap): each method at --k and
    --retriever, or at every point of --sweep; with --samples / --swap, a model method's sampled and swapped
    settings too. And the dense encoder, when a setting retrieves with it."""
    for m in methods:
        if m not in evaluation.METHODS:
            raise config.ConfigError(f"--methods: unknown {m!r}; expected one of {', '.join(evaluation.METHODS)}")
    settings = [(m, cfg.k, cfg.retriever) for m in methods]
    if cfg.sweep and (cfg.samples or cfg.swap):
        raise config.ConfigError("--samples and --swap score one setting; run them without --sweep")
    if cfg.sweep:
        if cfg.sweep not in SWEEPS:
            raise config.ConfigError(f"--sweep: expected one of {', '.join(SWEEPS)}")
        settings = [
            (m, x if cfg.sweep == "k" else cfg.k, x if cfg.sweep == "retriever" else cfg.retriever)
            for m in methods
            for x in SWEEPS[cfg.sweep]
        ]
    encoder = None
    if any(r == "dense" for _, _, r in settings):
        if not cfg.dense_model:
            if cfg.sweep != "retriever":
                raise config.ConfigError("--retriever dense needs --dense-model (a local encoder folder)")
            print("no --dense-model: the retriever sweep skips dense")
            settings = [x for x in settings if x[2] != "dense"]
        else:
            encoder = DenseEncoder(cfg.dense_model)
    runs = []
    for method, k, retriever in settings:
        runs.append(
            (
                method if not cfg.sweep else f"{method}@{k if cfg.sweep == 'k' else retriever}",
                method,
                k,
                retriever,
                0,
                False,
            )
        )
        if method not in evaluation.NO_MODEL:
            runs += [(f"{method}@sampled", method, k, retriever, cfg.samples, False)] if cfg.samples else []
            runs += [(f"{method}@swap", method, k, retriever, 0, True)] if cfg.swap else []
    return runs, encoder


def report(cfg: EvalConfig, results: dict[str, dict], lamp_dir: Path, out: Path) -> str:
    """metrics.json, table.md (and sweep.png with --sweep); → the table's markdown."""
    write_json(out / "metrics.json", results)
    pretty = {
        (evaluation.LABELS.get(n.split("@")[0], n) + (f" @ {n.split('@')[1]}" if "@" in n else "")): r
        for n, r in results.items()
    }
    title = (
        f"{cfg.model} on {lamp_dir} ({cfg.split}, k = {cfg.k}, {cfg.retriever}"
        f"{f', first {cfg.limit} questions per task' if cfg.limit else ''})"
    )
    md = evaluation.table(pretty, cfg.paper, title)
    if cfg.sweep:
        xs = [x for x in SWEEPS[cfg.sweep] if any(n.endswith(f"@{x}") for n in results)]
        png = evaluation.sweep_plot(results, xs, cfg.sweep, out / "sweep.png")
        md += f"\n![sweep]({png.name})\n"
    atomic_write_text(out / "table.md", md)
    return md


def main(argv=None) -> dict:
    keep_freed_memory()
    cfg, _ = config.parse(EvalConfig, {}, argv, description=__doc__)
    if not cfg.model.startswith("openai:"):
        resolve_precision(cfg.precision, torch.device("cpu"))  # before any work: a CPU may not take bf16
    t0 = time.time()
    lamp_dir = lamp_folder(cfg)
    out = Path(cfg.out or f"runs/default/eval/{slug(cfg.model)}")
    # every input checked before the first write: the output folder, the methods, the tags, the model folder
    check_out(out)
    methods = [m for m in cfg.methods.split(",") if m]
    runs, encoder = plan(cfg, methods)
    tags_path = Path(cfg.tags) if cfg.tags else Path("runs/default/data/tags.json")
    if cfg.tags and not tags_path.is_file():
        raise DataError(f"--tags {tags_path}: file not found")
    vocab = tags.load_tags(tags_path) if tags_path.is_file() else tags.DEFAULT_TAGS
    if not cfg.model.startswith("openai:") and set(methods) - set(evaluation.NO_MODEL):
        check_model(cfg.model, "--model")
    write_json(out / "config.json", config.to_dict(cfg))
    backend = make_backend(cfg, out / "cache") if set(methods) - set(evaluation.NO_MODEL) else None
    results: dict[str, dict] = {}
    for name, method, k, retriever, samples, swap in runs:
        s = evaluation.Settings(
            k,
            retriever,
            cfg.seed,
            cfg.max_new_direct,
            cfg.max_new_reason,
            vocab,
            r2p.Settings(
                chunk=cfg.r2p_chunk,
                budget_words=cfg.r2p_budget_words,
                candidates=cfg.r2p_candidates,
                max_tokens=cfg.r2p_max_tokens,
                max_interventions=cfg.r2p_interventions,
            ),
            temperature=cfg.temperature if samples else 0.0,
        )
        results[name] = {}
        for task in [t for t in cfg.tasks.split(",") if t]:
            split = lamp.load_split(lamp_dir, task, cfg.split)
            folder = out / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # tagpr@sampled → tagpr_sampled, r2p@16 → r2p_16
            m = evaluation.evaluate_split(
                backend,
                method,
                split,
                folder,
                s,
                limit=cfg.limit,
                encoder=encoder,
                lamp_dir=lamp_dir,
                split_name=cfg.split,
                samples=samples,
                swap=swap,
                allow_failures=cfg.allow_failures,
            )
            results[name][split.task.name] = m
            print(
                json.dumps(
                    {
                        "setting": name,
                        "task": split.task.name,
                        **{k_: [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4) for k_, v in m.items()},
                    }
                )
            )
    print(report(cfg, results, lamp_dir, out))
    print(f"done in {time.time() - t0:.0f}s → {out}")
    return results


if __name__ == "__main__":
    config.run(main)
