"""The demo's report from its run folder: per task, the held-out table in the layout of TagPR's Table 1, what it
shows and what not (paired differences against SFT, the spread over seeds, the parse split), the gain against GSPO
steps; the curves.

It reads only files the stages wrote: train_rl's `held_out_step<N>.json` and `metrics.jsonl` per seed (seed 0's
step 0 is the SFT model's row), build_data's `eval_prompts.jsonl` (which task each question is) and manifest, and
evaluate's `eval/base/metrics.json`. Every "gain" is an improvement: RL − SFT for accuracy and ROUGE, SFT − RL for
LaMP-3's MAE (lower is better).
"""

from __future__ import annotations

import json
from pathlib import Path

from . import hardware, lamp, metrics, plot
from .evaluation import LABELS
from .files import atomic_write_text

KINDS = ("greedy", "sampled", "swap")
SIGN = {"classification": 1, "rating": -1, "generation": 1}  # +1 where a higher score is better


def scores_from(path: Path) -> dict[str, dict]:
    """{kind: {question id: score}} from train_rl's held_out_step<N>.json, for the kinds "greedy", "sampled" and,
    where it was scored, "swap" (greedy on the swapped profiles); and "split": {question id: (its samples' scores,
    whether each parsed)} where the file has them."""
    per = json.loads(path.read_text())
    out = {
        "greedy": {i: v["greedy"] for i, v in per["held_out"].items()},
        "sampled": {i: v["sampled"] for i, v in per["held_out"].items()},
    }
    if "swap" in per:  # absent where the run scored no swap control (scripts/ablate.py's rows)
        out["swap"] = {i: v["greedy"] for i, v in per["swap"].items()}
    if all("samples_parsed" in v for v in per["held_out"].values()):
        out["split"] = {i: (v["samples"], v["samples_parsed"]) for i, v in per["held_out"].items()}
    return out


def mean(xs) -> float:
    return sum(xs) / len(xs)


def cell(vals) -> str:
    """A table cell: the mean over questions and its 95 % bootstrap interval."""
    lo, hi = metrics.bootstrap_ci(vals)
    return f"{mean(vals):.3f} [{lo:.3f}, {hi:.3f}]"


def scored_steps(rl_dir: Path) -> set[int]:
    """The steps at which an RL run scored the held-out prompts (its held_out_step<N>.json files)."""
    return {int(p.stem.removeprefix("held_out_step")) for p in rl_dir.glob("held_out_step*.json")}


def held_out_scores(run_dir: Path, seeds) -> tuple[dict, dict, dict]:
    """({kind: {question: score}} of the SFT model (seed 0's step 0), the same of each seed's last evaluation,
    {seed: its last step})."""
    rl = {s: run_dir / f"rl_seed{s}" for s in seeds}
    last = {s: max(scored_steps(d)) for s, d in rl.items()}
    sft = scores_from(rl[seeds[0]] / "held_out_step0.json")
    return sft, {s: scores_from(rl[s] / f"held_out_step{last[s]}.json") for s in seeds}, last


def task_questions(run_dir: Path, ids, default_task: str, data: Path | None = None) -> dict[str, list[str]]:
    """{task: its held-out question ids, sorted}, from the run's data/eval_prompts.jsonl (or `data`'s); every id
    under `default_task` where the file is absent."""
    path = (data or run_dir / "data") / "eval_prompts.jsonl"
    if not path.is_file():
        return {default_task: sorted(ids)}
    task_of = {r["id"]: r["task"] for r in map(json.loads, path.read_text().splitlines()) if r}
    out: dict[str, list[str]] = {}
    for i in sorted(ids):
        out.setdefault(task_of.get(i, default_task), []).append(i)
    return out


def merged_split(models: list[dict], ids) -> dict | None:
    """Several models' (seeds') samples of each question pooled: {question: (scores, parsed)}; None if one lacks
    the split."""
    if not all("split" in m for m in models):
        return None
    return {
        i: ([x for m in models for x in m["split"][i][0]], [x for m in models for x in m["split"][i][1]]) for i in ids
    }


def parsed_share(split: dict, ids) -> list[float]:
    """Each question's share of sampled answers that parse."""
    return [sum(split[i][1]) / len(split[i][1]) for i in ids]


def among_parsed(split: dict, ids) -> float:
    """The score among parsed sampled answers, pooled over the questions `ids`."""
    return metrics.pooled([split[i][0] for i in ids], [split[i][1] for i in ids])


def among_cell(split: dict | None, ids) -> str:
    """A table cell: the score among parsed sampled answers with its interval ("–" if none parsed; empty without
    the split)."""
    if split is None:
        return ""
    if not any(any(split[i][1]) for i in ids):  # no answer parsed: no score among them
        return "–"
    lo, hi = metrics.bootstrap_stat_ci(ids, lambda qs: among_parsed(split, qs))
    return f"{among_parsed(split, ids):.3f} [{lo:.3f}, {hi:.3f}]"


def split_cells(split: dict | None, ids) -> str:
    """Two table cells: the share of sampled answers that parse, and the score among them, with intervals."""
    if split is None:
        return " | "
    return f"{cell(parsed_share(split, ids))} | {among_cell(split, ids)}"


def split_gain(sft: dict, rl: dict, seeds, ids, sign: int = 1) -> dict | None:
    """RL (seeds pooled) against SFT on the sampled score's two parts, paired over questions: the parse share and
    the improvement in the score among parsed answers (`sign` · Δ), each with its 95 % interval; and where an
    unparsed answer scores 0 (accuracy, ROUGE) the sampled gain cut in two exact parts,
    Δ(p·a) = Δp·a_SFT + p_RL·Δa (p: parse share, a: score among parsed)."""
    pooled_rl = merged_split([rl[s] for s in seeds], ids)
    if pooled_rl is None or "split" not in sft:
        return None
    s0 = sft["split"]
    p0, p1 = mean(parsed_share(s0, ids)), mean(parsed_share(pooled_rl, ids))
    a0, a1 = among_parsed(s0, ids), among_parsed(pooled_rl, ids)
    dp = [x - y for x, y in zip(parsed_share(pooled_rl, ids), parsed_share(s0, ids))]
    da = lambda qs: sign * (among_parsed(pooled_rl, qs) - among_parsed(s0, qs))
    among = (sign * (a1 - a0), *metrics.bootstrap_stat_ci(ids, da))
    per_seed = [sign * (among_parsed(rl[s]["split"], ids) - a0) for s in seeds]
    spread = max(per_seed) - min(per_seed)
    return {
        "parsed": (p1 - p0, *metrics.bootstrap_ci(dp)),
        "among": among,
        "among_seeds": per_seed,
        "among_spread": spread,
        "among_clears": among[1] > 0 and among[0] > spread,  # a better decision: interval above 0, gain above spread
        "from_parsing": (p1 - p0) * a0,
        "from_decision": p1 * (a1 - a0),
        "p": (p0, p1),
        "a": (a0, a1),
    }


def base_cell(base: dict, name: str, task: str) -> str:
    """A table cell of evaluate.py's row `name` (base methods, floor, oracle) on `task`, with its interval if any."""
    metric = metrics.PRIMARY[lamp.get_task(task).kind]
    m = base[name][task]
    ci = m.get(f"{metric}_ci95")
    return f"{m[metric]:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else f"{m[metric]:.3f}"


def results_table(a, base: dict, sft: dict, rl: dict, last: dict, seeds, task: str, ids) -> tuple[str, dict]:
    """One task's held-out table (markdown) and the per-question mean over seeds of each kind."""
    metric = metrics.PRIMARY[lamp.get_task(task).kind]

    def row(label, sc):
        cells = " | ".join(cell([sc[k][i] for i in ids]) for k in KINDS)
        return f"| {label} | {cells} | {split_cells(sc.get('split'), ids)} |"

    avg = {k: {i: mean([rl[s][k][i] for s in seeds]) for i in ids} for k in KINDS}
    if (pooled := merged_split([rl[s] for s in seeds], ids)) is not None:
        avg["split"] = pooled
    lines = [
        f"| model (held-out users) | greedy {metric} | sampled {metric} (T = {a.rl_temperature}, mean of "
        f"{a.eval_samples}) | profile-swap control (greedy) | sampled answers that parse | sampled {metric} among "
        "parsed |",
        "|---|---|---|---|---|---|",
        f"| No-profile floor (latent rules, no model) | {base_cell(base, 'floor', task)} | | | | |",
    ]
    lines += [
        f"| Base model: {LABELS.get(m, m)} | {base_cell(base, m, task)} | | | | |"
        for m in a.base_methods.split(",")
        if m
    ]
    lines.append(row("After SFT (tagged reasoning)", sft))
    lines += [row(f"After SFT + RL, seed {s} ({last[s]} steps)", rl[s]) for s in seeds]
    lines.append(row(f"After SFT + RL, mean of seeds {','.join(map(str, seeds))}", avg))
    lines.append(f"| Oracle ceiling (latent rule) | {base_cell(base, 'oracle', task)} | | | | |")
    return "\n".join(lines), avg


def summary_table(a, base: dict, sft: dict, rl: dict, seeds, by_task: dict[str, list[str]]) -> str:
    """Every task side by side in the layout of TagPR's Table 1 (rows: floor, base, SFT, each RL seed, their mean,
    oracle; a column per task), twice: the greedy score, and the sampled score among parsed answers; then the
    paired RL − SFT improvement of each with its 95 % interval (for MAE, SFT − RL) and whether it clears."""
    tasks = list(by_task)
    sign = {t: SIGN[lamp.get_task(t).kind] for t in tasks}
    head = " | ".join(f"{t} {metrics.PRIMARY[lamp.get_task(t).kind]}{' ↓' if sign[t] < 0 else ''}" for t in tasks)
    fixed = [("No-profile floor", "floor")]
    fixed += [(f"Base model: {LABELS.get(m, m)}", m) for m in a.base_methods.split(",") if m]
    avg = {"greedy": {i: mean([rl[s]["greedy"][i] for s in seeds]) for ids in by_task.values() for i in ids}}
    avg["split"] = {t: merged_split([rl[s] for s in seeds], by_task[t]) for t in tasks}
    models = [("After SFT", sft, lambda t: sft.get("split"))]
    models += [(f"After SFT + RL, seed {s}", rl[s], lambda t, s=s: rl[s].get("split")) for s in seeds]
    models.append((f"After SFT + RL, mean of seeds {','.join(map(str, seeds))}", avg, lambda t: avg["split"][t]))

    def table(title: str, model_cell, base_cells: bool, gain_cell) -> str:
        row = lambda label, cells: f"| {label} | " + " | ".join(cells) + " |"
        lines = [row(f"model ({title})", [head]), "|---|" + "---|" * len(tasks)]
        lines += [row(label, [base_cell(base, n, t) if base_cells else "" for t in tasks]) for label, n in fixed]
        lines += [row(label, [model_cell(sc, sp, t) for t in tasks]) for label, sc, sp in models]
        lines.append(row("Oracle ceiling", [base_cell(base, "oracle", t) if base_cells else "" for t in tasks]))
        lines.append(row("RL − SFT, paired (improvement)", [gain_cell(t) for t in tasks]))
        return "\n".join(lines)

    def verdict(gain, lo, hi, ok) -> str:
        return f"{gain:+.3f} [{lo:+.3f}, {hi:+.3f}]{', clears' if ok else ''}"

    def greedy_gain(t) -> str:
        g = rl_gain(sft, rl, seeds, "greedy", by_task[t], sign[t])
        return verdict(g["gain"], g["lo"], g["hi"], g["clears"])

    def among_gain(t) -> str:
        g = split_gain(sft, rl, seeds, by_task[t], sign[t])
        return "" if g is None else verdict(*g["among"], g["among_clears"])

    greedy = table("greedy", lambda sc, sp, t: cell([sc["greedy"][i] for i in by_task[t]]), True, greedy_gain)
    title = f"sampled (T = {a.rl_temperature}, {a.eval_samples} a question), among parsed answers"
    parsed = table(title, lambda sc, sp, t: among_cell(sp(t), by_task[t]), False, among_gain)
    return greedy + "\n\n" + parsed


def rl_gain(sft: dict, rl: dict, seeds, kind: str, ids, sign: int = 1) -> dict:
    """RL against SFT on one kind of score: the mean over seeds' paired improvement (`sign` · (RL − SFT)), its 95 %
    bootstrap interval over questions, each seed's and their spread (max − min); `clears`: the interval above 0
    and the gain above the spread."""
    diff = [sign * (mean([rl[s][kind][i] for s in seeds]) - sft[kind][i]) for i in ids]
    lo, hi = metrics.bootstrap_ci(diff)
    gains = [sign * mean([rl[s][kind][i] - sft[kind][i] for i in ids]) for s in seeds]
    spread = max(gains) - min(gains)
    return {
        "gain": mean(diff),
        "lo": lo,
        "hi": hi,
        "seeds": gains,
        "spread": spread,
        "clears": lo > 0 and mean(diff) > spread,
    }


def claims(a, base: dict, sft: dict, rl: dict, avg: dict, seeds, task: str, ids) -> list[str]:
    """What one task's table shows and what not: SFT against base; RL against SFT (paired interval and seed
    spread); the sampled gain's parse and decision parts; the profile-swap drops."""
    kind = lamp.get_task(task).kind
    metric, sign = metrics.PRIMARY[kind], SIGN[kind]
    out = []
    base_rows = [base[m][task][metric] for m in a.base_methods.split(",") if m]
    base_best = max(base_rows, key=lambda x: sign * x)
    sft_greedy = mean([sft["greedy"][i] for i in ids])
    out.append(
        f"- SFT > base: greedy {metric} {sft_greedy:.3f} against the best base row's {base_best:.3f} "
        f"({'yes' if sign * (sft_greedy - base_best) > 0 else 'no'})."
    )
    for k in ("sampled", "greedy"):
        g = rl_gain(sft, rl, seeds, k, ids, sign)
        out.append(
            f"- SFT + RL > SFT, {k}: gain {g['gain']:+.3f}, 95 % interval of the paired difference "
            f"[{g['lo']:+.3f}, {g['hi']:+.3f}], per seed {', '.join(f'{x:+.3f}' for x in g['seeds'])} (spread "
            f"{g['spread']:.3f}): {'yes' if g['clears'] else 'not shown'} (needs the interval above 0 and the "
            "gain above the spread)."
        )
    if (g := split_gain(sft, rl, seeds, ids, sign)) is not None:
        (dp, plo, phi), (da, alo, ahi) = g["parsed"], g["among"]
        spread = g["among_spread"]
        parts = (
            f" Of the sampled {metric}'s change, {g['from_parsing']:+.3f} is parse rate (Δparsed × SFT's {metric} "
            f"among parsed) and {g['from_decision']:+.3f} decision (RL's parsed share × Δ{metric} among parsed)."
            if kind != "rating"  # an unparsed rating scores the worst error, not 0: the product does not hold
            else ""
        )
        out.append(
            f"- The sampled score's two parts, RL (seeds pooled) against SFT: answers that parse "
            f"{g['p'][0]:.3f} → {g['p'][1]:.3f} ({dp:+.3f} [{plo:+.3f}, {phi:+.3f}]); {metric} among parsed answers "
            f"{g['a'][0]:.3f} → {g['a'][1]:.3f} (gain {da:+.3f} [{alo:+.3f}, {ahi:+.3f}], per seed "
            f"{', '.join(f'{x:+.3f}' for x in g['among_seeds'])}, spread {spread:.3f}).{parts} A better decision "
            f"after RL: {'yes' if g['among_clears'] else 'not shown'} (needs the interval above 0 and the gain "
            "above the spread)."
        )
    for name, sc in (("SFT", sft), ("SFT + RL (mean of seeds)", avg)):
        diff = [sign * (sc["greedy"][i] - sc["swap"][i]) for i in ids]
        lo, hi = metrics.bootstrap_ci(diff)
        out.append(
            f"- Profile swap, {name}: greedy {metric} worsens by {mean(diff):.3f} [{lo:.3f}, {hi:.3f}] when each "
            f"question shows another user's profile ({'personalizes' if lo > 0 else 'not shown'})."
        )
    return out


def gain_curve(run_dir: Path, seeds, ids=None, sign: int = 1) -> str:
    """The held-out gain over SFT at every step that all seeds scored (markdown): sampled and greedy, each with its
    interval, per-seed gains, spread and whether it clears; and the GSPO time to that step (mean over seeds, held-out
    scoring excluded). Where the first "yes" appears is the smallest RL budget that showed the gain. `ids`: the
    questions (default: all); `sign`: -1 where lower is better."""
    rl = {s: run_dir / f"rl_seed{s}" for s in seeds}
    steps = sorted(set.intersection(*(scored_steps(d) for d in rl.values())) - {0})
    sft = scores_from(rl[seeds[0]] / "held_out_step0.json")
    ids = sorted(sft["greedy"]) if ids is None else ids
    rows = {s: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for s, d in rl.items()}
    step_time = lambda r: sum(r.get(f"time/{k}", 0.0) for k in ("rollout", "reward", "refill", "old_logp", "update"))
    lines = [
        "| GSPO steps | GSPO time to it (s, mean of seeds) | sampled gain [95 %] | per seed | spread | clears "
        "| greedy gain [95 %] | per seed | spread | clears |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in steps:
        at = {s: scores_from(rl[s] / f"held_out_step{n}.json") for s in seeds}
        t = mean([sum(step_time(r) for r in rows[s] if 0 < r["step"] <= n) for s in seeds])
        cells = []
        for k in ("sampled", "greedy"):
            g = rl_gain(sft, at, seeds, k, ids, sign)
            cells += [
                f"{g['gain']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}]",
                ", ".join(f"{x:+.3f}" for x in g["seeds"]),
                f"{g['spread']:.3f}",
                "yes" if g["clears"] else "no",
            ]
        lines.append(f"| {n} | {t:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def trained(layers: int, lora_rank: int = 0) -> str:
    """What a stage trains, in words: "top 16 layers", "all layers", "LoRA r = 16 on the top 4 layers"."""
    where = "all layers" if layers < 0 else f"top {layers} layers"
    return f"LoRA r = {lora_rank} on {'the ' if layers > 0 else ''}{where}" if lora_rank else where


def recipe(a, old_logp: str) -> str:
    """The report's recipe line: what SFT and GSPO ran (`a`: DemoConfig; `old_logp`: GSPO's old log-probs)."""
    return (
        f"SFT {a.sft_steps} steps × {a.sft_batch}"
        f" ({trained(a.sft_train_layers, getattr(a, 'sft_lora_rank', 0))}), lr {a.sft_lr}; "
        f"GSPO {a.rl_steps} steps × {a.rl_prompts} prompts × {a.rl_group} "
        f"rollouts (≤ {a.rl_max_new} tokens, T = {a.rl_temperature}, overlong {a.rl_overlong}), "
        f"{trained(a.rl_train_layers, getattr(a, 'rl_lora_rank', 0))}, lr {a.rl_lr}, old log-probs: {old_logp}"
        + (f", dynamic sampling ≤ {a.rl_dynamic_sampling} rounds" if getattr(a, "rl_dynamic_sampling", 0) else "")
        + (f", batches stratified by {a.rl_stratify}" if getattr(a, "rl_stratify", "none") != "none" else "")
        + "."
    )


def report(run_dir: Path, a, seeds, timings: dict, wall: float, prec: str, old_logp: str) -> None:
    """`<run>/report.md`: per task the held-out table (each cell a 95 % bootstrap interval), the claims it supports
    or not and the gain against GSPO steps; the curves over seeds, the data filter counts and the time per stage.
    `a`: the demo's settings (DemoConfig); `prec`: the matmuls' precision; `old_logp`: where GSPO's old log-probs
    came from."""
    sft, rl, last = held_out_scores(run_dir, seeds)
    base = json.loads((run_dir / "eval" / "base" / "metrics.json").read_text())
    by_task = task_questions(run_dir, sft["greedy"], a.tasks.split(",")[0])
    sections, printed = [], []
    if len(by_task) > 1:
        sections.append(
            "## All tasks, in the layout of TagPR's Table 1\n\n"
            + summary_table(a, base, sft, rl, seeds, by_task)
            + '\n\n"clears": the interval above 0 and the gain above the spread of the seeds\' gains. Each '
            "task's section below has the sampled score, the parse split and the profile-swap control.\n"
        )
    for task, ids in by_task.items():
        kind = lamp.get_task(task).kind
        table, avg = results_table(a, base, sft, rl, last, seeds, task, ids)
        said = claims(a, base, sft, rl, avg, seeds, task, ids)
        sections.append(
            f"## {task} ({len(ids)} questions, {metrics.PRIMARY[kind]})\n\n{table}\n\n### What the table shows\n\n"
            + "\n".join(said)
            + "\n\n### Held-out gain over SFT against GSPO steps\n\n"
            + gain_curve(run_dir, seeds, ids, SIGN[kind])
            + "\n"
        )
        printed.append(f"{task}\n{table}\n\n" + "\n".join(said))
    png = plot.seeds_plot(
        {f"seed {s}": run_dir / f"rl_seed{s}" / "metrics.jsonl" for s in seeds}, run_dir / "curves.png"
    )
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    counts = "\n".join(
        f"| {k} | {v['in']} | {v['out']} | " + ", ".join(f"{r} {n}" for r, n in v["dropped"].items()) + " |"
        for k, v in manifest["stages"].items()
        if isinstance(v, dict) and "in" in v
    )
    md = (
        f"# TagPR demo ({a.policy}, synthetic users ({a.difficulty}), {a.tasks})\n\n"
        f"Held-out synthetic users ({getattr(a, 'eval_split', 'dev')}, disjoint from training): the first "
        f"{', '.join(f'{len(q)} {t}' for t, q in by_task.items())} questions, k = "
        f"{a.k} most recent profile items, {a.chain_style} chains, {prec} matmuls; CPU: {hardware.describe()}. "
        f"{recipe(a, old_logp)} "
        "Brackets: 95 % bootstrap intervals over questions. The sampled score is what RL optimises; the "
        "profile-swap column shows each question another held-out user's profile (a model that personalizes "
        "falls towards the floor there). A gain is an improvement: for LaMP-3's MAE, SFT − RL.\n\n"
        + "\n".join(sections)
        + f"\n![held-out scores and training reward over seeds]({png.name})\n"
        + f"\n## Data (build_data.py manifest)\n\n| stage | in | out | dropped |\n|---|---|---|---|\n{counts}\n"
        + "\n## Time per stage (s)\n\n"
        + "\n".join(f"- {k}: {v}" for k, v in timings.items())
        + f"\n- this invocation, wall: {wall:.0f}\n"
    )
    atomic_write_text(run_dir / "report.md", md)
    print("\n" + "\n\n".join(printed) + f"\n\nreport: {run_dir / 'report.md'}")
