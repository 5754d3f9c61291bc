"""The offline default model on held-out synthetic users: zero-shot vs RAG (official prompts).

A first look until `evaluate.py` exists: loads SmolLM2-135M-Instruct (`smollm2-135m`),
answers the first N dev questions of each task greedily, with and without the 8 most
recent profile items, and scores them with the official metrics.
"""
import argparse
import json
import time

import torch

from tagpr import lamp, metrics, retrieval
from tagpr.models import load_model


@torch.no_grad()
def answer(model, tok, prompts, max_new_tokens, batch_size=8):
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), batch_size):
        chats = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + batch_size]]
        batch = tok(chats, return_tensors="pt", padding=True)
        gen = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        out += [tok.decode(g[batch["input_ids"].shape[1]:], skip_special_tokens=True).strip() for g in gen]
    tok.padding_side = "right"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lamp-dir", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="LaMP_2,LaMP_3,LaMP_5")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    t0 = time.time()
    model, tok = load_model(a.model)
    print(f"loaded {a.model} in {time.time() - t0:.1f}s")
    rows = []
    for name in a.tasks.split(","):
        split = lamp.load_split(a.lamp_dir, name, "dev")
        task, qs = split.task, split.questions[:a.n]
        golds = {q.id: split.golds[q.id] for q in qs}
        max_new = 24 if task.is_generation else 8
        for method, k in (("zero-shot", 0), ("RAG", a.k)):
            prompts = [lamp.augment(task, q.input, retrieval.retrieve(task, q, k)) for q in qs]
            preds = dict(zip(golds, answer(model, tok, prompts, max_new)))
            rows.append({"task": task.name, "method": method, **metrics.evaluate(task, golds, preds)})
            print(json.dumps(rows[-1]))
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
