"""Plot a trainer's `metrics.jsonl`: reward components and clip fractions per step.

    python -m tagpr.plot runs/tiny/rl/metrics.jsonl            # → runs/tiny/rl/metrics.png
"""
from __future__ import annotations

import argparse
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


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("metrics")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    print(plot(a.metrics, a.out))


if __name__ == "__main__":
    main()
