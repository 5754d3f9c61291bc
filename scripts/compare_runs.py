"""Two demo runs scored on the same held-out questions, side by side: run B against run A, paired over questions.

    python scripts/compare_runs.py --a runs/x9_3task_bound_dev --b runs/x11_ds_dev    # RL (seeds pooled) B − A
    python scripts/compare_runs.py --a runs/l_top --b runs/l_lora --model sft         # the SFT models B − A

For each task: the greedy score and the sampled score's two parts (the share of sampled answers that parse, the
score among parsed answers) of each run, and B's improvement over A with its 95 % bootstrap interval over the
questions (for MAE, A − B: lower is better), and each seed's improvement among parsed answers where both runs have
the same seeds. `--model rl` takes each run's seeds at their last scored step (their mean, or their samples pooled);
`--model sft` each run's SFT model (seed 0's step 0). The runs must hold the same question ids (same data): a
comparison across held-out sets is refused. Reads only the demo's files (`tagpr.demo_report`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tagpr import config, lamp, metrics  # noqa: E402
from tagpr.demo_report import (  # noqa: E402
    SIGN,
    among_parsed,
    held_out_scores,
    mean,
    merged_split,
    parsed_share,
    task_questions,
)


@dataclass
class CompareConfig:
    a: str = ""  # run A's folder (the reference)
    b: str = ""  # run B's folder (what is compared with A)
    model: Literal["rl", "sft"] = "rl"  # which model of each run: its RL seeds (pooled) or its SFT model
    seeds: str = ""  # RL seeds, comma-separated (empty: every rl_seed<N> folder both runs have)


def seeds_of(run: Path) -> list[int]:
    return sorted(int(p.name.removeprefix("rl_seed")) for p in run.glob("rl_seed*") if p.name[7:].isdigit())


def models(run: Path, which: str, seeds: list[int]) -> list[dict]:
    """The run's models' {kind: {question: score}}: its SFT model alone, or each RL seed's last scoring."""
    sft, rl, _ = held_out_scores(run, seeds)
    return [sft] if which == "sft" else [rl[s] for s in seeds]


def compare(a_models: list[dict], b_models: list[dict], ids: list[str], sign: int) -> dict:
    """B against A on the questions `ids`, paired: each part's value per run, B's improvement and its interval."""
    out = {}
    g = lambda ms, i: mean([m["greedy"][i] for m in ms])
    diff = [sign * (g(b_models, i) - g(a_models, i)) for i in ids]
    out["greedy"] = (mean([g(a_models, i) for i in ids]), mean([g(b_models, i) for i in ids]), mean(diff))
    out["greedy_ci"] = metrics.bootstrap_ci(diff)
    sa, sb = merged_split(a_models, ids), merged_split(b_models, ids)
    if sa is None or sb is None:
        return out
    pa, pb = parsed_share(sa, ids), parsed_share(sb, ids)
    out["parsed"] = (mean(pa), mean(pb), mean(pb) - mean(pa))
    out["parsed_ci"] = metrics.bootstrap_ci([y - x for x, y in zip(pa, pb)])
    a0, a1 = among_parsed(sa, ids), among_parsed(sb, ids)
    out["among"] = (a0, a1, sign * (a1 - a0))
    out["among_ci"] = metrics.bootstrap_stat_ci(ids, lambda qs: sign * (among_parsed(sb, qs) - among_parsed(sa, qs)))
    if len(a_models) == len(b_models) > 1:
        out["among_seeds"] = [sign * (among_parsed(b["split"], ids) - among_parsed(a["split"], ids))
                              for a, b in zip(a_models, b_models)]  # fmt: skip
    return out


def table(a_run: Path, b_run: Path, which: str, seeds: list[int]) -> str:
    a_models, b_models = models(a_run, which, seeds), models(b_run, which, seeds)
    a_tasks = task_questions(a_run, a_models[0]["greedy"], "LaMP_2")
    b_tasks = task_questions(b_run, b_models[0]["greedy"], "LaMP_2")
    if a_tasks != b_tasks:
        raise config.ConfigError(
            f"{a_run} and {b_run} hold different held-out questions (their data/eval_prompts.jsonl and "
            "held_out_step*.json): a paired comparison needs the same data"
        )
    label = "RL, seeds " + ",".join(map(str, seeds)) if which == "rl" else "SFT"
    lines = [
        f"B = {b_run.name} against A = {a_run.name} ({label}); improvement = B − A (MAE: A − B), paired, 95 %",
        "",
        "| task | greedy A → B | improvement | parse A → B | Δ parse | among parsed A → B | improvement | per seed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, ids in a_tasks.items():
        kind = lamp.get_task(task).kind
        c = compare(a_models, b_models, ids, SIGN[kind])
        name = f"{task} {metrics.PRIMARY[kind]}"
        cells = [f"{c['greedy'][0]:.3f} → {c['greedy'][1]:.3f}", ci(c["greedy"][2], c["greedy_ci"])]
        if "among" in c:
            cells += [f"{c['parsed'][0]:.3f} → {c['parsed'][1]:.3f}", ci(c["parsed"][2], c["parsed_ci"])]
            cells += [f"{c['among'][0]:.3f} → {c['among'][1]:.3f}", ci(c["among"][2], c["among_ci"])]
            cells.append(" / ".join(f"{x:+.3f}" for x in c.get("among_seeds", [])))
        else:
            cells += ["", "", "", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ci(x: float, lo_hi: tuple[float, float]) -> str:
    return f"{x:+.3f} [{lo_hi[0]:+.3f}, {lo_hi[1]:+.3f}]"


def main(argv=None):
    a, _ = config.parse(CompareConfig, {}, argv, description=__doc__)
    if not a.a or not a.b:
        raise config.ConfigError("--a and --b: two run folders expected (A, the reference, and B)")
    a_run, b_run = Path(a.a), Path(a.b)
    for flag, r in (("--a", a_run), ("--b", b_run)):
        if not (r / "rl_seed0" / "held_out_step0.json").is_file():
            raise config.ConfigError(f"{flag} {r}: no demo run there (no rl_seed0/held_out_step0.json)")
    both = sorted(set(seeds_of(a_run)) & set(seeds_of(b_run)))
    seeds = [int(s) for s in a.seeds.split(",") if s] or both
    if a.model == "sft":
        seeds = [0] + [s for s in seeds if s != 0]
    missing = [f"{r}/rl_seed{s}" for r in (a_run, b_run) for s in seeds if not (r / f"rl_seed{s}").is_dir()]
    if missing or not seeds:
        raise config.ConfigError(f"--seeds {a.seeds or 'auto'}: not in both runs: {', '.join(missing) or 'none'}")
    print(table(a_run, b_run, a.model, seeds))


if __name__ == "__main__":
    config.run(main)
