"""A held-out prefill through all layers against one that finds its frozen trunk in an `engine.TrunkStore`.

    python bench/trunk_store.py                                   # SmolLM2-135M, 32 prompts of 300 random tokens
    python bench/trunk_store.py --model runs/demo/sft/model --prompts runs/demo/data/eval_prompts.jsonl

One process, `--threads` threads: the prefill of `--n` prompts in one batch (as one rank's held-out set) with all
layers, then with a store (the miss: it writes the entry), then again (the hit: the entry read, the top layers
run), then all layers again; and the entry's hash alone. The store's folder is temporary.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagpr import engine, hardware, models  # noqa: E402
from tagpr.records import read_rl_prompts  # noqa: E402
from tagpr.sampler import left_pad  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument(
        "--prompts", default="", help="rl_prompts-format JSONL (its first --n prompts); empty: random tokens"
    )
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=300, help="random prompts' length")
    ap.add_argument("--top", type=int, default=4, help="layers above the trunk (the demo's --train-layers)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    lm, tok = models.load_model(a.model, device="cpu", dtype=torch.float32)
    lm.eval()
    if a.prompts:
        from train_rl import chat_ids

        ids = [chat_ids(tok, p.prompt) for p in read_rl_prompts(a.prompts)[: a.n]]
    else:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(100, lm.config.vocab_size, (a.n, a.tokens), generator=g).tolist()
    ids, mask, pos = left_pad(ids, tok.pad_token_id, "cpu")
    layers = len(lm.model.layers) - a.top
    W = engine.Weights(lm, torch.float32, True)
    print(
        f"{a.model}: {ids.shape[0]} prompts × {ids.shape[1]} tokens, a trunk of {layers} of {len(lm.model.layers)} "
        f"layers, {a.threads} thread(s), CPU: {hardware.describe()}\n"
    )
    print("| prefill | s | s a prompt | / all layers |\n|---|---|---|---|")
    with torch.no_grad(), tempfile.TemporaryDirectory() as d:
        store = engine.TrunkStore(d, layers)
        runs, base = (
            [
                ("all layers", {}),
                ("miss (writes the entry)", {"trunk": store}),
                ("hit (top layers)", {"trunk": store}),
                ("all layers again", {}),
            ],
            None,
        )
        for name, kw in runs:
            t0 = time.perf_counter()
            engine.prefill(lm, W, ids, mask, pos, **kw)
            t = time.perf_counter() - t0
            base = base or t
            print(f"| {name} | {t:.1f} | {t / ids.shape[0]:.2f} | {t / base:.2f} |")
        t0 = time.perf_counter()
        store.key(lm, W, ids, mask, pos)
        print(
            f"\nthe entry's hash alone: {time.perf_counter() - t0:.2f} s; entry: "
            f"{sum(f.stat().st_size for f in Path(d).iterdir()) / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
