"""A model folder of a real architecture's shape with random weights, for timing where the weights cannot travel.

    python bench/random_model.py --out /tmp/smollm2_shape     # SmolLM2-135M's shape (Llama, 30 layers, V = 49152)

The lent GPU machine has no network and takes at most 64 MiB of files along, less than SmolLM2's weights; speed
does not depend on the weights' values, so bench/gpu_check.sh times SFT, GSPO and rollouts on this folder. The
tokenizer is the tiny model's (its 2,048 ids are a subset of the vocabulary). Deterministic by --seed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import AutoModelForCausalLM, LlamaConfig  # noqa: E402

from tagpr.tokenizer import tiny_tokenizer  # noqa: E402

SHAPES = {
    # SmolLM2-135M-Instruct's config.json
    "smollm2-135m": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    if os.environ.get("TAGPR_CHECK_ARGS") == "1":
        print(f"arguments ok: bench/random_model.py {' '.join(sys.argv[1:])}")
        return
    tok = tiny_tokenizer()
    cfg = LlamaConfig(**SHAPES[a.shape], pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(a.out)
    tok.save_pretrained(a.out)
    print(f"{a.shape} shape, random weights ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M) → {a.out}")


if __name__ == "__main__":
    main()
