"""Plot a trainer's `metrics.jsonl`: reward components and clip fractions per step.

python -m tagpr.plot runs/tiny/rl/metrics.jsonl            # → runs/tiny/rl/metrics.png
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from .files import DataError, iter_jsonl


def plot(metrics: str | Path, out: str | Path | None = None) -> Path:
    rows = [r for _, r in iter_jsonl(metrics)]
    if not rows:
        raise DataError(f"{metrics}: no rows")
    steps = [r["step"] for r in rows]
    rewards = sorted({k for r in rows for k in r if k == "reward" or k.startswith("reward/")})
    clips = sorted({k for r in rows for k in r if k.startswith("clip_frac")})
    fig, axes = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for k in rewards:
        axes[0].plot(steps, [r.get(k, float("nan")) for r in rows], label=k, lw=2.5 if k == "reward" else 1.2)
    axes[0].set_ylabel("reward (batch mean)")
    axes[0].legend(fontsize=8, ncol=3)
    for k in clips:
        axes[1].plot(steps, [r.get(k, float("nan")) for r in rows], label=k, lw=1.2)
    axes[1].set_ylabel("clip fraction")
    axes[1].set_xlabel("step")
    if clips:
        axes[1].legend(fontsize=8, ncol=2)
    guided = [r["step"] for r in rows if r.get("stage") == "guided"]
    if guided and len(guided) < len(rows):
        for ax in axes:
            ax.axvline(max(guided) + 0.5, color="gray", ls="--", lw=1)
        axes[0].text(max(guided) + 0.6, axes[0].get_ylim()[1], "exploratory →", va="top", fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else Path(metrics).with_suffix(".png")
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def seeds_plot(runs: dict[str, str | Path], out: str | Path) -> Path:
    """Runs of the same recipe with different seeds ({label: metrics.jsonl}), mean and range over them per step:
    the training reward on top, the held-out scores (`train_rl.py --eval-prompts`) below."""
    rows = {name: [r for _, r in iter_jsonl(path)] for name, path in runs.items()}
    fig, axes = plt.subplots(2, 1, figsize=(8, 7))
    panels = [
        (axes[0], ["reward", "reward/verifiable"], "training reward (batch mean)"),
        (
            axes[1],
            sorted({k for rs in rows.values() for r in rs for k in r if k.startswith("eval/")}),
            "held-out score",
        ),
    ]
    for ax, keys, label in panels:
        for key in keys:
            steps = sorted({r["step"] for rs in rows.values() for r in rs if key in r})
            # a seed without a row at a step (e.g. step 0, scored once for all seeds: the same start policy) is left
            # out of that step's mean and range
            vals = [[r[key] for rs in rows.values() for r in rs if r["step"] == s and key in r] for s in steps]
            mean = [sum(v) / len(v) for v in vals]
            (line,) = ax.plot(
                steps, mean, marker="o" if label == "held-out score" else None, label=key.replace("eval/", "")
            )
            ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2)
        ax.set_ylabel(label)
        ax.set_xlabel("GSPO step")
        ax.legend(fontsize=7)
    fig.suptitle(f"mean and range over {len(runs)} seeds ({', '.join(runs)})", fontsize=9)
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def panels_plot(panels: list[tuple[str, dict[str, list]]], xs: Sequence, xlabel: str, out: str | Path) -> Path:
    """One panel per (title, {line label: y per x}) side by side, every line against the same `xs` (a sweep)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
    for ax, (title, lines) in zip(axes[0], panels):
        for label, ys in lines.items():
            ax.plot([str(x) for x in xs], ys, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("metrics")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    print(plot(a.metrics, a.out))


if __name__ == "__main__":
    main()
