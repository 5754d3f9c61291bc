"""`python -m tagpr.synthetic --out DIR [--report]`: write synthetic users as LaMP files; with `--report`, print
the floor / profile-identified / oracle table on the dev split."""

from __future__ import annotations

import argparse

from .baselines import measure, report_table
from .rules import DIFFICULTIES, SYNTHETIC_TASKS
from .users import DEFAULT_SIZES, generate


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m tagpr.synthetic",
        description="Synthetic users with latent preferences, written as official LaMP files.",
    )
    p.add_argument("--out", required=True, help="folder to write the LaMP-format files into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", default=",".join(SYNTHETIC_TASKS))
    p.add_argument("--train-users", type=int, default=DEFAULT_SIZES["train"][0])
    p.add_argument("--dev-users", type=int, default=DEFAULT_SIZES["dev"][0])
    p.add_argument("--test-users", type=int, default=DEFAULT_SIZES["test"][0])
    p.add_argument("--questions-per-user", type=int, default=None, help="default: 4 train, 2 dev/test")
    p.add_argument(
        "--difficulty",
        default="hard",
        choices=list(DIFFICULTIES),
        help="hard: latent rules to infer (every task); easy: lexical evidence (LaMP_2, LaMP_3, LaMP_7)",
    )
    p.add_argument("--report", action="store_true", help="measure floor / profile / oracle on dev and print the table")
    a = p.parse_args(argv)
    q = a.questions_per_user
    sizes = {"train": (a.train_users, q or 4), "dev": (a.dev_users, q or 2), "test": (a.test_users, q or 2)}
    result = generate(a.out, [t for t in a.tasks.split(",") if t], a.seed, sizes, a.difficulty)
    print(f"wrote {sum(len(v) for s in result.values() for v in s.values())} questions under {a.out}")
    if a.report:
        table = report_table(measure({t: s["dev"] for t, s in result.items()}))
        print(table)


if __name__ == "__main__":
    main()
