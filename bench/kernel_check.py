"""The fused log-prob kernels on a real device, against an fp64 reference: log-probs, entropies and both gradients.

    python bench/kernel_check.py --device cuda                  # Triton compiled for real, bf16 and fp32
    python bench/kernel_check.py --device cpu --n 64 --v 1000   # the same check on a CPU (chunked path; Triton
                                                                # only under TRITON_INTERPRET=1)

The rule is the test suite's (tests/test_logprob.py): in fp32 within 1e-5 (relative to the largest value) of the
fp64 reference; in bf16 no worse than the naive op in bf16 plus 2e-3. Prints one line per (impl, dtype) and exits 1
if any fails. The default shape is a Qwen3-8B micro-batch's head: N=2048 rows, H=4096, V=151936.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tagpr_kernels import logprob as K  # noqa: E402

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-3}


def run(impl, dtype, hidden, weight, targets, g_logp, g_ent):
    h = hidden.clone().to(dtype).requires_grad_()
    w = weight.clone().to(dtype).requires_grad_()
    logp, ent = K.fused_logprobs(h, w, targets, 1.0, impl=impl)
    (logp.double() * g_logp + ent.double() * g_ent).sum().backward()
    return [x.double() for x in (logp, ent, h.grad, w.grad)]


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=151936)
    a = ap.parse_args()
    dev = torch.device(a.device)
    impls = ["chunked"] + (["triton"] if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else [])
    if os.environ.get("TAGPR_CHECK_ARGS") == "1":
        print(f"arguments ok: bench/kernel_check.py {' '.join(sys.argv[1:])} (impls {', '.join(impls)})")
        return 0
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = torch.randn(a.n, a.h, generator=g, device=dev, dtype=torch.float64)
    weight = torch.randn(a.v, a.h, generator=g, device=dev, dtype=torch.float64) * 0.02
    targets = torch.randint(0, a.v, (a.n,), generator=g, device=dev)
    g_logp = torch.randn(a.n, generator=g, device=dev, dtype=torch.float64)
    g_ent = torch.randn(a.n, generator=g, device=dev, dtype=torch.float64)
    data = (hidden, weight, targets, g_logp, g_ent)
    oracle = run("naive", torch.float64, *data)
    failed = 0
    for dtype in (torch.float32, torch.bfloat16):
        naive = run("naive", dtype, *data) if dtype != torch.float32 else None
        for impl in impls:
            got = run(impl, dtype, *data)
            errs = []
            for i, name in enumerate(("logp", "entropy", "d_hidden", "d_weight")):
                e = rel_err(got[i], oracle[i])
                bound = 1e-5 if naive is None else rel_err(naive[i], oracle[i]) + TOL[dtype]
                errs.append(f"{name} {e:.1e} (≤ {bound:.1e})")
                failed += e > bound
            print(f"{impl} {str(dtype).removeprefix('torch.')}: " + ", ".join(errs), flush=True)
            del got
    print(f"shape N={a.n} H={a.h} V={a.v} on {dev}: {'FAILED' if failed else 'all within bounds'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
