"""scripts/ablate.py's report: per task, TagPR's Table 1 rows, Table 3 rows (with PRMU's own held-out pair
accuracy) and the reward-weight rows, each with its paired difference against full TagPR.

It reads only the files the stages wrote: every RL run's last `held_out_step<N>.json` (full seed 0's step 0 is
the SFT policy: the w/o RL row), build_data's `eval_prompts.jsonl` (each question's task) and each reward model's
`metrics.jsonl`. A difference is an improvement over full (`row − full`; for LaMP-3's MAE, `full − row`), per
question the mean over seeds, with its 95 % bootstrap interval over questions, and each seed's own difference of
the sampled score. The paper's claim for every row is that the ablation lowers the score, so a row "reproduces"
where the interval lies below 0 and every seed's difference is below 0 too, goes "the other way" where both lie
above, is "lower (higher), not on every seed" where the interval excludes 0 and a seed disagrees, and is "not
separable at this scale" otherwise.
"""

from __future__ import annotations

import json
from pathlib import Path

from . import demo_report, hardware, lamp, metrics
from .demo_report import among_parsed, mean, merged_split, parsed_share, scored_steps
from .evaluation import LABELS
from .files import atomic_write_text


def row_scores(run_dir: Path, row, seeds) -> dict:
    """{seed: the row's scores ({kind: {question: score}}, "split")} at each run's last evaluation."""
    if not row.trained:  # the SFT policy, scored before full seed 0's first step
        sft = demo_report.scores_from(run_dir / "rl" / "full" / f"seed{seeds[0]}" / "held_out_step0.json")
        return {s: sft for s in seeds}
    out = {}
    for s in seeds:
        d = run_dir / "rl" / row.name / f"seed{s}"
        out[s] = demo_report.scores_from(d / f"held_out_step{max(scored_steps(d))}.json")
    return out


def prmu_accuracy(run_dir: Path, kind: str) -> dict[str, float]:
    """A reward model's last held-out pair accuracies (seen users, unseen users, seen users without their
    embedding); {} for no reward model or one that logged none."""
    path = run_dir / "prmu" / kind / "metrics.jsonl"
    if kind == "none" or not path.is_file():
        return {}
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    last = next((r for r in reversed(rows) if "eval_acc/seen" in r), {})
    return {k: last[f"eval_acc/{k}"] for k in ("seen", "unseen", "seen_no_ue") if f"eval_acc/{k}" in last}


def difference(full: dict, row: dict, seeds, ids, sign: int) -> dict:
    """The row against full on one task's questions: greedy and sampled scores (per question the mean over
    seeds), the share of sampled answers that parse and the score among them (seeds pooled), each as
    (improvement, lo, hi)."""
    out = {}
    for kind in ("greedy", "sampled"):
        d = [sign * (mean([row[s][kind][i] for s in seeds]) - mean([full[s][kind][i] for s in seeds])) for i in ids]
        out[kind] = (mean(d), *metrics.bootstrap_ci(d))
    out["by_seed"] = [
        sign * (mean([row[s]["sampled"][i] for i in ids]) - mean([full[s]["sampled"][i] for i in ids])) for s in seeds
    ]
    fs, rs = merged_split([full[s] for s in seeds], ids), merged_split([row[s] for s in seeds], ids)
    if fs is not None and rs is not None:
        dp = [x - y for x, y in zip(parsed_share(rs, ids), parsed_share(fs, ids))]
        out["parsed"] = (mean(dp), *metrics.bootstrap_ci(dp))
        if any(any(rs[i][1]) for i in ids) and any(any(fs[i][1]) for i in ids):
            da = lambda qs: sign * (among_parsed(rs, qs) - among_parsed(fs, qs))
            out["among"] = (da(ids), *metrics.bootstrap_stat_ci(ids, da))
    return out


def verdict(d: tuple[float, float, float], by_seed: list[float] | None = None) -> str:
    """The row against its reference: the interval over questions, and where given each seed's own difference (a
    row "reproduces" only where every seed agrees with the interval)."""
    _, lo, hi = d
    if hi < 0:
        return "reproduced (lower)" if by_seed is None or all(x < 0 for x in by_seed) else "lower, not on every seed"
    if lo > 0:
        return (
            "the other way (higher)" if by_seed is None or all(x > 0 for x in by_seed) else "higher, not on every seed"
        )
    return "not separable at this scale"


def _fmt(d: tuple[float, float, float] | None) -> str:
    return "–" if d is None else f"{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]"


def _level(row: dict, seeds, ids) -> str:
    """Four cells: greedy and sampled (mean over seeds and questions), parse share and score among parsed."""
    g = mean([mean([row[s]["greedy"][i] for s in seeds]) for i in ids])
    sm = mean([mean([row[s]["sampled"][i] for s in seeds]) for i in ids])
    split = merged_split([row[s] for s in seeds], ids)
    if split is None:
        return f"{g:.3f} | {sm:.3f} | | "
    p = mean(parsed_share(split, ids))
    a = f"{among_parsed(split, ids):.3f}" if any(any(split[i][1]) for i in ids) else "–"
    return f"{g:.3f} | {sm:.3f} | {p:.3f} | {a}"


def table(run_dir: Path, rows, scores: dict, seeds, task: str, ids, which: str) -> str:
    """One table (rows of `which`: "1", "3", "3q" or "weights") of one task, in markdown; each row's Δ is against
    its reference row (full TagPR unless the row names another)."""
    metric = metrics.PRIMARY[lamp.get_task(task).kind]
    sign = demo_report.SIGN[lamp.get_task(task).kind]
    prmu_cols = which in ("3", "3q")
    head = (
        f"| row | greedy {metric} | sampled {metric} | parse share | {metric} among parsed | Δ greedy | Δ sampled "
        f"| Δ parse share | Δ among parsed | Δ sampled by seed | sampled vs full (or the row named) |"
        + (" PRMU pair acc. (seen / unseen / seen w/o UE) |" if prmu_cols else "")
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    labels = {r.name: r.label for r in rows}
    for r in (r for r in rows if which in r.tables):
        sc = scores[r.name]
        if r.name == "full":
            diffs, said = {}, "(reference)"
        else:
            diffs = difference(scores[r.ref], sc, seeds, ids, sign)
            said = verdict(diffs["sampled"], diffs["by_seed"])
            said += "" if r.ref == "full" else f" (Δ vs {labels[r.ref]})"
        cells = " | ".join(
            _fmt(diffs.get(k)) if r.name != "full" else "" for k in ("greedy", "sampled", "parsed", "among")
        )
        cells += " | " + " / ".join(f"{x:+.3f}" for x in diffs.get("by_seed", []))
        line = f"| {r.label} | {_level(sc, seeds, ids)} | {cells} | {said} |"
        if prmu_cols:
            acc = prmu_accuracy(run_dir, r.prmu)
            line += (
                " " + (" / ".join(f"{acc[k]:.3f}" for k in ("seen", "unseen", "seen_no_ue") if k in acc) or "–") + " |"
            )
        lines.append(line)
    return "\n".join(lines)


def report(run_dir: Path, a, rows, seeds, timings: dict, wall: float, prec: str) -> str:
    """Write `<run>/report.md`; return its text."""
    scores = {r.name: row_scores(run_dir, r, seeds) for r in rows}
    first = scores["full"][seeds[0]]
    data = Path(a.data) if getattr(a, "data", "") else None
    by_task = demo_report.task_questions(run_dir, first["greedy"], a.tasks.split(",")[0], data)
    titles = {
        "1": "Table 1: each part of TagPR (the paper: every ablation lowers every task)",
        "3": "Table 3: the reward model (the paper: PRMU > PRMU w/o UE > untrained RM ≈ no RM)",
        "3q": "Table 3 with reward models that read the question without the profile, so only user rows can carry "
        "a user's taste (PRMU w/o UE's Δ is against PRMU, question only)",
        "weights": "The composite reward's weights, each halved and doubled",
    }
    base_path = run_dir / "eval" / "base" / "metrics.json"
    base = json.loads(base_path.read_text()) if base_path.is_file() else {}
    sections = []
    for task, ids in by_task.items():
        metric = metrics.PRIMARY[lamp.get_task(task).kind]
        parts = [f"## {task} ({len(ids)} {a.eval_split} questions, {metric})"]
        scale = [f"{LABELS.get(m, m)} {base[m][task][metric]:.3f}" for m in base if task in base[m]]
        if scale:
            parts.append("For scale (greedy, evaluate.py): " + "; ".join(scale) + ".")
        for which, title in titles.items():
            if any(which in r.tables and r.name != "full" for r in rows):
                parts.append(f"### {title}\n\n{table(run_dir, rows, scores, seeds, task, ids, which)}")
        sections.append("\n\n".join(parts))
    guided = next((r.flags.get("guided_steps") for r in rows if r.name == "full"), None)
    gpu = getattr(a, "trainer_preset", "cpu")
    where = f"CPU: {hardware.describe()}" if gpu == "cpu" else f"{a.nproc} GPUs, the trainers' {gpu} preset"
    md = (
        f"# TagPR ablations ({a.policy}, synthetic users ({a.difficulty}), {a.tasks})\n\n"
        f"Held-out {a.eval_split} users; {prec} matmuls; {where}. Every RL row: GSPO "
        f"{a.rl_steps} steps × {a.rl_prompts} prompts × {a.rl_group} rollouts (≤ {a.rl_max_new} tokens), top "
        f"{a.rl_train_layers} layers, lr {a.rl_lr}, from the same SFT policy ({a.sft_steps} steps) unless the row "
        f"says; full TagPR: {guided} guided steps, then exploratory. Seeds {', '.join(map(str, seeds))}; "
        f"{a.eval_samples} samples a question at T = {a.rl_temperature}. Levels: the mean over seeds; Δ: the row "
        "minus full (for MAE, full minus the row: a positive Δ is always better), per question the mean over "
        "seeds, with its 95 % bootstrap interval over questions. The verdict reads the sampled score, the one RL "
        "optimises: its interval, and each seed's own difference (a row reproduces only where every seed agrees)."
        "\n\n"
        + "\n\n".join(sections)
        + "\n\n## Time (s)\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in timings.items())
        + f"\n- this invocation, wall: {wall:.0f}\n"
    )
    atomic_write_text(run_dir / "report.md", md)
    return md
