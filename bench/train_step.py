"""Tokens/s and model FLOPs utilisation of one SFT step, against the matmul rate measured in the same run.

    python bench/train_step.py                       # CPU: SmolLM2-135M, fp32, 8 × 256 tokens
    python bench/train_step.py --device cuda --model /models/Qwen3-8B --batch 4 --seq 4096

Model FLOPs per step = 6 · (non-embedding parameters + lm_head) · tokens + causal attention
(6 · layers · seq² · heads · head_dim per sequence, forward + backward) — the usual MFU
count; the fused log-prob op's recomputed lm_head matmul is work we do but do not count.
The rate to compare with: the best of three square matmuls (CPU fp32 1024³–4096³; GPU bf16
4096³–16384³) timed here, in the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagpr.losses import sft_loss  # noqa: E402
from tagpr.models import LogprobModel, load_model  # noqa: E402


def matmul_rate(device, dtype, n, reps=5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def model_flops(lm, batch, seq) -> float:
    cfg = lm.config
    params = sum(p.numel() for p in lm.parameters())  # tied: the embedding is counted once, as the lm_head
    if not getattr(cfg, "tie_word_embeddings", False):
        params -= lm.get_input_embeddings().weight.numel()  # an embedding lookup is not a matmul
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 6 * cfg.num_hidden_layers * seq * seq * cfg.num_attention_heads * head_dim  # QKᵀ and AV, causal ≈ ½ of 2·2
    return 6 * params * batch * seq + batch * attn


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
    dev = torch.device(a.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    # the best of three square sizes: the most favourable rate, so the MFU is not flattered
    rate = max(matmul_rate(dev, dtype, n) for n in ((4096, 8192, 16384) if dev.type == "cuda" else (1024, 2048, 4096)))
    lm, tok = load_model(a.model, device=dev, dtype=torch.float32)
    lm.train()
    model = LogprobModel(lm)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, len(tok), (a.batch, a.seq), device=dev)
    mask = torch.ones(a.batch, a.seq - 1, dtype=torch.bool, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    times = []
    for i in range(a.steps + 1):
        sync()
        t0 = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16, enabled=dev.type == "cuda"):
            logp, _ = model(ids)
        loss, _ = sft_loss(logp, mask)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:  # the first step warms up
            times.append(time.perf_counter() - t0)
    step = min(times)
    flops = model_flops(lm, a.batch, a.seq)
    print(f"{a.model} on {a.device}: {a.batch}×{a.seq} tokens per step")
    print("| matmul rate (measured) | step s | tokens/s | model TFLOP/step | achieved TFLOP/s | MFU vs matmul rate |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {rate / 1e12:.3f} TFLOP/s | {step:.2f} | {a.batch * a.seq / step:.0f} | {flops / 1e12:.3f} | "
        f"{flops / step / 1e12:.3f} | {flops / step / rate:.0%} |"
    )


if __name__ == "__main__":
    main()
