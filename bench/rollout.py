"""Rollout throughput: our KV-cache sampler vs transformers `generate`, side by side, and the limit.

    python bench/rollout.py                    # SmolLM2-135M, batch 32, 64 new tokens, T=1.0, top-p 1.0, CPU
    python bench/rollout.py --top-p 0.9        # + our sampler with the nucleus found by a full vocabulary sort
    python bench/rollout.py --model runs/demo/sft/model --prompts runs/demo/data/eval_prompts.jsonl --eos \
        --batch 160 --group 5 --new 160 --precision bf16
                                               # rows stop at EOS: ours computing only the live rows vs all

Both generate exactly `--new` tokens per sequence (EOS disabled), from the same
left-padded prompts, `--group` rollouts per prompt as in GSPO (`generate` with
`num_return_sequences`, which expands the prompts before its prefill; ours prefills each
prompt once and shares its KV cache), sampling at the same temperature / top-p. The limit per decode
step is the larger of its FLOPs (2 · parameters · batch) at the square-matmul rate and
its weight bytes at the memory bandwidth, both measured in this run. With `--top-p` below 1 a third
engine runs too: ours with `sampler.NUCLEUS_WIDTHS = ()`, i.e. the nucleus from a full sort of the
vocabulary at every step instead of from each row's top 256 / 4096 tokens (the same tokens come out).

With `--eos` the rows stop where the model ends them (a trained policy's real lengths, up to `--new`), and
the side by side is ours (the default: a step computes only the rows still generating) against ours with
`compact=False` (every row to the slowest one's end, as `generate` does). In fp32 both give the same tokens; in
bf16 rows may part (rounding).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tagpr import (  # noqa: E402
    lamp,
    prompts,
    sampler,  # noqa: E402
    synthetic,
)
from tagpr.hardware import keep_freed_memory  # noqa: E402
from tagpr.models import load_model  # noqa: E402
from tagpr.records import read_rl_prompts  # noqa: E402
from tagpr.sampler import generate  # noqa: E402


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def bandwidth(device) -> float:
    a = torch.empty(256 * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        b.copy_(a)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.numel() * 4 / best  # read + write


def matmul_rate(device, dtype=torch.float32, n=2048) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main():
    keep_freed_memory()  # process-wide, so both engines get it
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--k", type=int, default=2, help="profile items in each prompt")
    ap.add_argument("--group", type=int, default=4, help="rollouts per prompt (batch = prompts × group)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each engine, interleaved; the best counts")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument(
        "--prompts",
        default="",
        help="rl_prompts.jsonl-format prompts to use (default: synthetic LaMP-2 dev questions in the plain RAG prompt)",
    )
    ap.add_argument("--eos", action="store_true", help="stop rows at EOS; compare ours with and without compaction")
    ap.add_argument(
        "--held-out",
        type=int,
        default=0,
        metavar="WAVE",
        help="a held-out scoring's workload (--batch rows in groups of 1 greedy + group - 1 samples, stop at EOS): "
        "continuous batching in waves of WAVE prompts against chunked calls of WAVE prompts and HF generate",
    )
    ap.add_argument(
        "--precision",
        choices=("fp32", "bf16"),
        default="fp32",
        help="bf16: both engines under bf16 autocast (weights stay fp32)",
    )
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (a GPU: bench/gpu_check.sh runs it there)")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if os.environ.get("TAGPR_CHECK_ARGS") == "1":  # bench/gpu_check.sh --dry: the arguments, nothing run
        print(f"arguments ok: bench/rollout.py {' '.join(sys.argv[1:])}")
        return
    model, tok = load_model(a.model, device=dev, dtype=torch.float32)
    if a.prompts:
        texts = [prompts.chat(tok, p.prompt) for p in read_rl_prompts(a.prompts)[: a.batch // a.group]]
    else:
        ex = synthetic.generate_split("LaMP_2", "dev", a.batch // a.group, 1, seed=0)
        texts = [prompts.chat(tok, prompts.build_prompt(lamp.TASKS["LaMP_2"], e.question, a.k)) for e in ex]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    n_tokens = a.batch * a.new
    tok.padding_side = "left"
    batch = tok.pad({"input_ids": ids}, return_tensors="pt").to(dev)
    tok.padding_side = "right"
    with torch.autocast(dev.type, torch.bfloat16, enabled=a.precision == "bf16"):  # warm both up (allocator, kernels)
        model.generate(**batch, do_sample=True, max_new_tokens=2, pad_token_id=tok.pad_token_id)
    generate(model, ids, eos_id=-1, pad_id=tok.pad_token_id, max_new_tokens=2, precision=a.precision)

    def ours_once(widths=sampler.NUCLEUS_WIDTHS, compact=True):
        saved, sampler.NUCLEUS_WIDTHS = sampler.NUCLEUS_WIDTHS, widths
        try:
            out = generate(
                model,
                ids,
                eos_id=tok.eos_token_id if a.eos else -1,
                pad_id=tok.pad_token_id,
                max_new_tokens=a.new,
                temperature=1.0,
                top_p=a.top_p,
                generator=[torch.Generator(device=dev).manual_seed(i) for i in range(a.batch)],
                n_per_prompt=a.group,
                precision=a.precision,
                compact=compact,
            )
        finally:
            sampler.NUCLEUS_WIDTHS = saved
        assert a.eos or int(out.lengths.min()) == a.new
        return out

    def hf_once():
        torch.manual_seed(0)
        with torch.autocast(dev.type, torch.bfloat16, enabled=a.precision == "bf16"):
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_p=a.top_p,
                top_k=0,
                max_new_tokens=a.new,
                min_new_tokens=a.new,
                pad_token_id=tok.pad_token_id,
                num_return_sequences=a.group,
            )
        assert out.shape == (a.batch, batch["input_ids"].shape[1] + a.new)

    if a.held_out:
        return held_out(a, model, tok, ids, batch)
    if a.eos:
        return stopping(a, ours_once)
    engines = [("ours", ours_once), ("hf", hf_once)]
    if a.top_p < 1.0:
        engines.append(("sort", lambda: ours_once(widths=())))
        assert torch.equal(ours_once().response_ids, ours_once(widths=()).response_ids), (
            "the windowed nucleus sampled other tokens"
        )
    times = {name: [] for name, _ in engines}
    for _ in range(a.repeats):  # interleaved, so a slow spell of a shared machine hits all
        for name, fn in engines:
            sync(dev)
            t0 = time.perf_counter()
            fn()
            sync(dev)
            times[name].append(time.perf_counter() - t0)
    t_ours, t_hf = min(times["ours"]), min(times["hf"])

    params = sum(p.numel() for p in model.parameters())
    half = a.precision == "bf16"
    rate, bw = matmul_rate(dev, torch.bfloat16 if half else torch.float32), bandwidth(dev)
    step_limit = max(2 * params * a.batch / rate, params * (2 if half else 4) / bw)
    prompt_len = sum(map(len, ids)) / len(ids)
    print(
        f"{a.model}, batch {a.batch} = {a.batch // a.group} prompts × {a.group} rollouts, {a.new} new tokens, "
        f"prompts ~{prompt_len:.0f} tokens, T=1.0 top-p={a.top_p}, {a.precision}, {dev}, best of {a.repeats}"
    )
    print(
        f"measured: matmul {rate / 1e9:.0f} GFLOP/s, memory {bw / 1e9:.1f} GB/s → decode limit "
        f"{a.batch / step_limit:.0f} tokens/s (prefill not included)"
    )
    print("| engine | s | tokens/s | × generate | fraction of the decode limit |")
    print("|---|---|---|---|---|")
    rows = [("transformers generate", t_hf), ("tagpr.sampler", t_ours)]
    if "sort" in times:
        rows.insert(1, ("tagpr.sampler, nucleus by full sort", min(times["sort"])))
    for name, t in rows:
        print(f"| {name} | {t:.1f} | {n_tokens / t:.0f} | {t_hf / t:.2f} | {n_tokens / t * step_limit / a.batch:.0%} |")


def stopping(a, ours_once):
    """--eos: the same rollouts computed over the live rows only and over every row, interleaved."""
    out, full_out = ours_once(), ours_once(compact=False)
    same = torch.equal(out.response_ids, full_out.response_ids)  # False too where the lengths differ
    # fp32: the same tokens; bf16 (AMX above all): a smaller matmul sums in another order, a logit rounds to
    # another bf16 value now and then, and a T = 1 row can take another path from there
    assert same or a.precision == "bf16", "compaction changed the tokens"
    times = {True: [], False: []}
    for _ in range(a.repeats):
        for compact in times:
            sync(a.device)
            t0 = time.perf_counter()
            ours_once(compact=compact)
            sync(a.device)
            times[compact].append(time.perf_counter() - t0)
    n = out.lengths.float()
    print(
        f"{a.model}, batch {a.batch} = {a.batch // a.group} prompts × {a.group} rollouts, stop at EOS, ≤ {a.new} "
        f"new tokens, T=1.0 top-p={a.top_p}, {a.precision}, {a.device}, best of {a.repeats}"
    )
    print(
        f"lengths: mean {n.mean():.1f}, max {int(n.max())}, {int((n == a.new).sum())} of {a.batch} rows cut at "
        f"{a.new}; live rows per step on average {n.sum() / n.max() / a.batch:.0%} of the batch; "
        f"{'the same tokens both ways' if same else 'not the same tokens both ways (bf16 rounding)'}"
    )
    print("| sampler | s | generated tokens/s | × every row |")
    print("|---|---|---|---|")
    full = min(times[False])
    for name, t in (
        ("every row to the end (compact=False)", full),
        ("live rows only (compact, default)", min(times[True])),
    ):
        print(f"| {name} | {t:.1f} | {n.sum() / t:.0f} | {t / full:.2f} |")


def held_out(a, model, tok, ids, batch):
    """--held-out WAVE: each prompt's group is 1 greedy row and group − 1 samples at T = 1, every row stops at EOS
    (≤ --new). Ours in chunks of WAVE prompts (one call each: a chunk waits for its slowest row), ours in one call
    with continuous batching (waves of WAVE admitted as rows stop, within 1.5 waves' rows: train_rl's held-out
    scoring), and HF generate in the same chunks (every row sampled, num_return_sequences). Interleaved; best of
    --repeats; tokens/s counts generated tokens up to each row's EOS."""
    G, wave, n = a.group, a.held_out, len(ids)
    flags = [j == 0 for _ in ids for j in range(G)]
    gens = lambda: [torch.Generator(device=a.device).manual_seed(i) for i in range(n * G)]
    kw = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, max_new_tokens=a.new, temperature=1.0)
    kw.update(n_per_prompt=G, precision=a.precision)

    def chunked():
        outs = []
        g = gens()
        for c in range(0, n, wave):
            r = slice(c * G, (c + wave) * G)
            outs.append(generate(model, ids[c : c + wave], greedy=flags[r], generator=g[r], **kw).lengths)
        return torch.cat(outs)

    def continuous():
        rows = min(n, wave) * G
        return generate(
            model, ids, greedy=flags, generator=gens(), batch_rows=rows + rows // 2, wave=wave, **kw
        ).lengths

    def hf():
        total = 0
        torch.manual_seed(0)
        for c in range(0, n, wave):
            tok.padding_side = "left"
            b = tok.pad({"input_ids": ids[c : c + wave]}, return_tensors="pt").to(a.device)
            tok.padding_side = "right"
            with torch.autocast(torch.device(a.device).type, torch.bfloat16, enabled=a.precision == "bf16"):
                out = model.generate(
                    **b,
                    do_sample=True,
                    temperature=1.0,
                    top_k=0,
                    max_new_tokens=a.new,
                    pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id,
                    num_return_sequences=G,
                )
            gen = out[:, b["input_ids"].shape[1] :]
            ended = (gen == tok.eos_token_id).float().cumsum(1)
            total += int(((ended == 0) | ((ended == 1) & (gen == tok.eos_token_id))).sum())
        return torch.tensor([total])

    same = torch.equal(chunked(), continuous())
    times = {"chunked": [], "continuous": [], "hf": []}
    tokens = {}
    for _ in range(a.repeats):
        for name, fn in (("chunked", chunked), ("continuous", continuous), ("hf", hf)):
            sync(a.device)
            t0 = time.perf_counter()
            tokens[name] = int(fn().sum())
            sync(a.device)
            times[name].append(time.perf_counter() - t0)
    print(
        f"{a.model}, held-out scoring: {n} prompts × (1 greedy + {G - 1} samples), waves / chunks of {wave} prompts, "
        f"stop at EOS, ≤ {a.new} new tokens, T=1.0, {a.precision}, {a.device}, best of {a.repeats}; chunked and "
        f"continuous: {'the same lengths' if same else 'lengths differ (bf16 rounding)'}"
    )
    print("| engine | s | generated tokens | tokens/s | × chunked |")
    print("|---|---|---|---|---|")
    base = min(times["chunked"])
    for name, label in (
        ("hf", "transformers generate, chunks"),
        ("chunked", "tagpr.sampler, chunks (before)"),
        ("continuous", "tagpr.sampler, continuous batching"),
    ):
        t = min(times[name])
        print(f"| {label} | {t:.1f} | {tokens[name]} | {tokens[name] / t:.0f} | {base / t:.2f} |")


if __name__ == "__main__":
    main()
