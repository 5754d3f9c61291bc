"""A decode step's weight GEMMs at a few rows: F.linear, oneDNN's prepacked weight and MKL's packed weight,
side by side.

    python bench/few_rows.py                         # SmolLM2-135M's shapes, 1 thread, fp32, rows 1 … 128
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python bench/few_rows.py
                                                     # the same CPU run as an AVX2-only one

One decode step of SmolLM2-135M multiplies every row by 30 layers' fused q/k/v (960 × 576), o (576 × 576), fused
gate/up (3,072 × 576) and down (576 × 1,536) weights and by the head (49,152 × 576). Each path runs the step's 121
GEMMs for a row count (`tagpr.engine._Linear`'s three forms, the same numbers up to summation order), interleaved,
best of `--repeats`; the table gives ms a step and the ratio to F.linear. The engine takes MKL's form at ≤
`engine.FEW_ROWS` rows (a rollout's 16 rows a rank in the demo) and oneDNN's above (a held-out scoring's 128).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagpr import engine, hardware  # noqa: E402

SHAPES = [(960, 576, 30), (576, 576, 30), (3072, 576, 30), (576, 1536, 30), (49152, 576, 1)]  # (out, in, count)


def step_time(lins: list, rows: int) -> float:
    xs = [torch.randn(rows, k) for _, k, _ in SHAPES]
    t0 = time.perf_counter()
    for (_, _, count), lin, x in zip(SHAPES, lins, xs):
        for _ in range(count):
            lin(x)
    return time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,8,16,32,64,128")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g) / k**0.5 for n, k, _ in SHAPES]
    paths = {"F.linear": [engine._Linear(w, None, pack=False) for w in weights]}
    if hardware.can_prepack(torch.float32):
        paths["oneDNN prepacked"] = [engine._Linear(w, None, pack=True) for w in weights]
    if hardware.can_pack_few_rows(torch.float32):
        paths["MKL packed"] = [engine._Linear(w, None, pack=False, few=True) for w in weights]
    print(
        f"CPU: {hardware.describe()} (ATen {torch.backends.cpu.get_cpu_capability()}), torch {torch.__version__}, "
        f"{a.threads} thread(s), fp32; paths: {', '.join(paths)}"
    )
    print(
        "| rows | "
        + " | ".join(f"{k} (ms a step)" for k in paths)
        + " | "
        + " | ".join(f"{k} × F.linear" for k in list(paths)[1:])
        + " |"
    )
    print("|---" * (2 * len(paths)) + "|")
    cap = engine.FEW_ROWS
    for rows in (int(r) for r in a.rows.split(",")):
        engine.FEW_ROWS = max(cap, rows)  # the MKL form serves only few rows: forced here
        for lins in paths.values():  # warm up (MKL packs at its first call)
            step_time(lins, rows)
        t = {k: [] for k in paths}
        for _ in range(a.repeats):  # interleaved, best of the repeats
            for k, lins in paths.items():
                t[k].append(step_time(lins, rows))
        best = {k: min(v) * 1e3 for k, v in t.items()}
        print(
            f"| {rows} | "
            + " | ".join(f"{best[k]:.0f}" for k in paths)
            + " | "
            + " | ".join(f"{best['F.linear'] / best[k]:.2f}" for k in list(paths)[1:])
            + " |"
        )
    engine.FEW_ROWS = cap


if __name__ == "__main__":
    main()
