"""Synthetic users with latent preferences, written as official LaMP files.

Every user has one latent rule that decides the gold output of all their questions and of every item in their
profile, so the profile reveals the rule and a model that reads it can beat one that does not by a wide margin:

| task | what a user's rule decides | rules |
|---|---|---|
| LaMP_1 | the author's field; the related reference is the one in it (the title is field-neutral) | 8 |
| LaMP_2 | which facet of a movie the user tags: genre, story device or theme (each movie has one of each) | 3 |
| LaMP_3 | a rating bias: harsh (one below the review's sentiment), neutral, generous (one above), in 1..5 | 3 |
| LaMP_4 | headline style, each keeping another slot of the article: wire / question / listicle / opinion | 4 |
| LaMP_5 | paper-title style, each keeping another slot of the abstract: colon / question / towards / on-the | 4 |
| LaMP_7 | tweet voice: plain / hype / abbreviator / terse | 4 |

Files: `<out>/<task>/<split>/<split>_questions.json` and `<split>_outputs.json` (the official formats; questions
carry `user_id` like LaMP's time-based files; users are disjoint across splits), and `<split>_latent.json`: per
question the user's rule and a sentence explaining it, so a rationale can be checked. Deterministic by seed.

The package, one concern a module:
- `rules`: the task generators (the rules a user can hold) and `generator(task, difficulty)`;
- `users`: users drawn from them, written and read as LaMP files;
- `records`: training records from the latent rules (expert chains, SFT records, PRMU's preference pairs);
- `baselines`: the no-profile floor, profile-identified and oracle predictors and their table;
- `__main__`: `python -m tagpr.synthetic --out DIR --report` writes users and measures the three predictors on dev.
"""

from .baselines import floor_answer, measure, predict, report_table
from .records import expert_chain, preference_pairs, sft_records, zlib_index
from .rules import DIFFICULTIES, GENERATORS, SYNTHETIC_TASKS, generator, latent_generator
from .users import (
    DEFAULT_SIZES,
    Example,
    generate,
    generate_split,
    read_latent,
    restore_content,
    vocabulary_text,
    write_split,
)

__all__ = [
    "DEFAULT_SIZES",
    "DIFFICULTIES",
    "GENERATORS",
    "SYNTHETIC_TASKS",
    "Example",
    "expert_chain",
    "floor_answer",
    "generate",
    "generate_split",
    "generator",
    "latent_generator",
    "measure",
    "predict",
    "preference_pairs",
    "read_latent",
    "report_table",
    "restore_content",
    "sft_records",
    "vocabulary_text",
    "write_split",
    "zlib_index",
]
