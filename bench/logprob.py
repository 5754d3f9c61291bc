"""Benchmark the fused log-prob op: naive vs chunked vs Triton (vs Liger-Kernel if installed).

    python bench/logprob.py                 # CPU shape (SmolLM2): N=4096, H=576, V=49152, fp32
    python bench/logprob.py --device cuda   # GPU shape (Qwen3-8B): N=8192, H=4096, V=151936, bf16

Work first: forward is 2·N·H·V FLOPs; forward + backward 6·N·H·V for naive autograd
and 8·N·H·V for the fused paths (the backward recomputes the logits). The limit is
the bare lm_head matmuls at the rate this machine measures in the same run
(forward: x·Wᵀ; forward + backward: x·Wᵀ twice, dz·W, dzᵀ·x — the 8·N·H·V of a fused op).

Each (impl, pass) runs in its own subprocess: on CPU the peak extra memory is the
child's peak RSS during the first call minus its RSS once the inputs exist (the bare
matmuls include their [N, V] output); on CUDA it is the allocator's peak minus the
inputs. Times are the best of `--reps` calls after that one. Prints a table with ratios to naive and to the
matmul limit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child(args) -> dict:
    import torch

    from tagpr_kernels.logprob import fused_logprobs

    torch.manual_seed(0)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    n, h, v = args.n, args.h, args.v
    hidden = (torch.randn(n, h, device=dev) * 0.5).to(dtype).requires_grad_(args.backward)
    weight = (torch.randn(v, h, device=dev) * 0.02).to(dtype).requires_grad_(args.backward)
    targets = torch.randint(0, v, (n,), device=dev)
    g = torch.randn(n, device=dev)

    def once():
        if args.impl == "matmul":  # the limit: the four lm_head matmuls of 8·N·H·V (fwd: one)
            z = hidden.detach() @ weight.detach().T
            if args.backward:
                z = hidden.detach() @ weight.detach().T  # the recompute
                hidden.grad = z @ weight.detach()  # dz·W
                weight.grad = z.T @ hidden.detach()  # dzᵀ·x
            return
        if args.impl == "liger":
            from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

            loss = LigerFusedLinearCrossEntropyFunction.apply(hidden, weight, targets)[0]
            if args.backward:
                loss.backward()
            return
        logp, ent = fused_logprobs(hidden, weight, targets, 1.0, impl=args.impl)
        if args.backward:
            (logp * g).sum().add((ent * g).sum()).backward()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    # memory: the first call, from a baseline taken once the inputs exist
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_mb()
    once()  # also the warm-up (Triton compiles here)
    sync()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else _rss_mb() - base
    times = []
    for _ in range(args.reps):
        hidden.grad = weight.grad = None
        sync()
        t0 = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - t0)
    return {"impl": args.impl, "backward": args.backward, "ms": 1000 * min(times), "extra_mb": peak}


def run_child(base_args, impl, backward) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--impl",
        impl,
        "--device",
        base_args.device,
        "--dtype",
        base_args.dtype,
        "--n",
        str(base_args.n),
        "--h",
        str(base_args.h),
        "--v",
        str(base_args.v),
        "--reps",
        str(base_args.reps),
    ] + (["--backward"] if backward else [])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count()))}
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        print(f"  {impl} ({'fwd+bwd' if backward else 'fwd'}) failed: {r.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--n", type=int)
    ap.add_argument("--h", type=int)
    ap.add_argument("--v", type=int)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--impl", default="chunked")
    ap.add_argument("--backward", action="store_true")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if os.environ.get("TAGPR_CHECK_ARGS") == "1":  # bench/gpu_check.sh --dry
        print(f"arguments ok: bench/logprob.py {' '.join(sys.argv[1:])}")
        return
    gpu = a.device.startswith("cuda")
    a.dtype = a.dtype or ("bfloat16" if gpu else "float32")
    a.n, a.h, a.v = a.n or (8192 if gpu else 4096), a.h or (4096 if gpu else 576), a.v or (151936 if gpu else 49152)
    if a.child:
        print(json.dumps(child(a)))
        return
    impls = ["naive", "chunked"] + (["triton"] if gpu else [])
    try:
        import liger_kernel  # noqa: F401

        if gpu:
            impls.append("liger")
    except ImportError:
        pass
    nhv = a.n * a.h * a.v
    print(
        f"shape N={a.n} H={a.h} V={a.v} {a.dtype} on {a.device}; logits alone would be "
        f"{a.n * a.v * 4 / 2**20:.0f} MB in fp32"
    )
    rows = []
    for backward in (False, True):
        limit = run_child(a, "matmul", backward)
        lim_flops = (8 if backward else 2) * nhv
        rate = lim_flops / (limit["ms"] / 1000)
        base = None
        for impl in impls:
            r = run_child(a, impl, backward)
            if r is None:
                continue
            flops = (6 if impl == "naive" else 8) * nhv if backward else 2 * nhv
            if impl == "naive":
                base = r
            rows.append(
                (
                    ("fwd+bwd" if backward else "fwd"),
                    impl,
                    r["ms"],
                    r["extra_mb"],
                    r["ms"] / base["ms"] if base else float("nan"),
                    r["extra_mb"] / base["extra_mb"] if base and base["extra_mb"] > 0 else float("nan"),
                    r["ms"] / limit["ms"],
                    flops / (r["ms"] / 1000) / 1e12,
                )
            )
        rows.append(
            (
                ("fwd+bwd" if backward else "fwd"),
                "bare matmuls",
                limit["ms"],
                limit["extra_mb"],
                float("nan"),
                float("nan"),
                1.0,
                rate / 1e12,
            )
        )
    print("| pass | impl | ms | extra MB | time / naive | memory / naive | time / matmul limit | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for p, impl, ms, mb, tr, mr, lr, tf in rows:
        print(f"| {p} | {impl} | {ms:.0f} | {mb:.0f} | {tr:.2f} | {mr:.3f} | {lr:.2f} | {tf:.3f} |")


if __name__ == "__main__":
    main()
