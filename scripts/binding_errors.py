"""Where easy LaMP-2 and LaMP-3 answers go wrong: each held-out text (greedy and samples) of a demo run's RL seeds,
sorted by what its chain says. An easy rule pairs two keys with two values: "this user rates every <product A> a
and every <product B> b" (LaMP-3), "this user tags <genre A> movies "x" and <genre B> movies "y"" (LaMP-2); a
chain's identify_patterns step states it, and the answer should be the value of the input's key.

    python scripts/binding_errors.py runs/x7_r7_test --seeds 0,1,2      # step 0 (SFT) and the last scored step

Classes: right (with or without a pattern step); wrong with no pattern step; the right pattern stated and the
other key's value answered (a binding error: the chain read the profile and picked the wrong half); the right
pattern and another wrong value; a wrong pattern; a pattern without the input's key. Shares of all texts.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
from pathlib import Path

# per task: the pattern step's rule (key, value, key, value) and the input's key in the prompt
RULES = {
    "LaMP_3": (
        re.compile(r"rates every (.+?) (\d) and every (.+?) (\d)"),
        re.compile(r"review: This (.+?) (?:does|is|came)"),
    ),
    "LaMP_2": (
        re.compile(r'tags (.+?) movies "(.+?)" and (.+?) movies "(.+?)"'),
        re.compile(r"description: An? (.+?) movie:"),
    ),
}


def classify(prompt: str, text: str, gold: str, task: str = "LaMP_3") -> str:
    pattern, key = RULES[task]
    m, inp = pattern.search(text), key.search(prompt)
    answer = text.split("</think>")[-1].strip()
    if answer == gold:
        return "right" if m else "right, no pattern step"
    if not m or not inp:
        return "wrong, no pattern step"
    stated = {m.group(1): m.group(2), m.group(3): m.group(4)}
    product = inp.group(1)
    if product not in stated:
        return "pattern lacks the input's key"
    if stated[product] != gold:
        return "wrong pattern"
    other = [v for k, v in stated.items() if k != product]
    return "binding error (the other key's value)" if other and answer == other[0] else "right pattern, wrong"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a demo run folder (data/eval_prompts.jsonl, rl_seed<N>/held_out_step<K>.json)")
    p.add_argument("--seeds", default="0,1,2", help="RL seeds, comma-separated")
    a = p.parse_args(argv)
    run = Path(a.run)
    prompts = [json.loads(line) for line in (run / "data" / "eval_prompts.jsonl").read_text().splitlines()]
    ev = {r["id"]: r for r in prompts if r["task"] in RULES}
    for task, seed in itertools.product(sorted({r["task"] for r in ev.values()}), a.seeds.split(",")):
        files = sorted(
            (run / f"rl_seed{seed}").glob("held_out_step*.json"),
            key=lambda f: int(f.stem.removeprefix("held_out_step")),
        )
        for f in files[:1] + files[-1:] if len(files) > 1 else files:
            counts = collections.Counter(
                classify(ev[q]["prompt"], t, ev[q]["gold"], task)
                for q, v in json.loads(f.read_text())["held_out"].items()
                if q in ev and ev[q]["task"] == task
                for t in v["texts"]
            )
            n = sum(counts.values())
            shares = ", ".join(f"{k} {c / n:.3f}" for k, c in sorted(counts.items()))
            print(f"{task} seed {seed} {f.stem.removeprefix('held_out_')} ({n} texts): {shares}")


if __name__ == "__main__":
    main()
