"""TagPR's ablations in miniature: Table 1's lower rows, Table 3 and the reward weights, on the same data, the same
SFT policy and the same seeds, scored on held-out test users; one report with every row's paired difference
against full TagPR.

    python scripts/ablate.py                     # every row, 3 seeds, into runs/ablate; rerun to resume
    python scripts/ablate.py --quick             # Table 3 on one task and one seed
    python scripts/ablate.py --rows full,no_tag  # some rows only
    python scripts/ablate.py --seeds 0           # the table of seed 0 alone (rows run seed by seed, so a run
                                                 # stopped early already holds it)
    python scripts/ablate.py --preset qwen3-8b --policy /models/Qwen3-8B \
        --prmu-backbone /models/Skywork-Reward-V2-Qwen3-0.6B --data runs/lamp/data --lamp-dir /data/LaMP
                                                 # the same table on an 8-GPU node (--dry: the commands only)

Rows (`--rows`, names as below; every RL row runs `--rl-steps` GSPO steps from the SFT policy unless it says):
- Table 1: `full` (SFT → PRMU → GSPO: `--guided-steps` guided steps with Eq. 5's reward, then exploratory ones
  with Eq. 11's), `no_sft` (GSPO from the base policy), `no_rl` (the SFT policy itself), `no_tag` (R_tag's
  weight 0), `no_prmu` (no reward model: no R_p), `one_stage` (every step guided).
- Table 3: `no_prmu` (no reward model), `untrained_rm` (PRMU's backbone with a fresh head and fresh user rows:
  `train_prmu --max-steps 0`), `no_ue` (PRMU trained without user embeddings), `full` (PRMU).
- Table 3, question only (extra rows, not in `all`: name them in `--rows`): reward models that do not read the
  profile (`train_prmu --no-profile-in-input`), with user rows (`rm_question_only`, Δ against `full`) and without
  (`rm_question_only_no_ue`, Δ against `rm_question_only`). With the profile in its input a reward model can read
  the user's taste there; without it, only a user's row could carry it. On easy LaMP-2 the pairs' responses
  decide them alone (docs/synthetic.md), so both score as PRMU does and the rows stay out of the default table.
- Weights: `w_format_x0.5`, `w_format_x2`, `w_personal_x0.5`, `w_personal_x2`, `w_tag_x0.5`, `w_tag_x2`: one
  weight of the composite reward halved or doubled around train_rl's default.

The SFT policy's own scores (`no_rl`) come from `full` seed 0's evaluation before its first step (the held-out
samples' generators do not depend on the run's seed, so every row is scored with the same random numbers).
Writes `<run>/report.md` (also `--report`, e.g. docs/ablations/report.md): per task the rows with greedy and
sampled scores, the share of sampled answers that parse and the score among them, and each row's paired
difference against `full` over questions (mean over seeds) with its 95 % bootstrap interval; PRMU's held-out
pair accuracy beside Table 3; the base model, the no-profile floor and the oracle (evaluate.py) for scale; the time
taken.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
from demo import DemoConfig, old_logp_source  # noqa: E402  (scripts/demo.py: the pipeline's settings)

from tagpr import ablation_report, config, hardware, stages  # noqa: E402
from tagpr.config import COUNT, NO_CAP_OR_COUNT, NON_NEGATIVE, POSITIVE  # noqa: E402

DEFAULT_WEIGHTS = {"w_format": 0.5, "w_personal": 0.5, "w_tag": 1.0}  # train_rl.py's defaults


@dataclass(frozen=True)
class Row:
    """One ablation row: where its policy starts, which reward model it has, and its other train_rl flags."""

    name: str
    label: str
    tables: tuple[str, ...]  # "1", "3", "weights"
    policy: str = "sft"  # "sft" or "base"
    prmu: str = "full"  # "full", "no_ue", "untrained" or "none"
    flags: dict = field(default_factory=dict)  # train_rl flags (the stages' names)
    trained: bool = True  # False: the SFT policy's own scores (w/o RL)
    ref: str = "full"  # the row its paired difference is taken against
    in_all: bool = True  # False: run only when --rows names it


def rows_of(a) -> list[Row]:
    full_flags = {"guided_steps": a.guided_steps}
    rows = [
        Row("full", "TagPR (full)", ("1", "3", "3q", "weights"), flags=full_flags),
        Row("no_sft", "w/o SFT", ("1",), policy="base", flags=full_flags),
        Row("no_rl", "w/o RL", ("1",), trained=False),
        Row("no_tag", "w/o Tag (R_tag weight 0)", ("1",), flags={**full_flags, "w_tag": 0.0}),
        Row("no_prmu", "w/o Reward (no PRMU)", ("1", "3"), prmu="none", flags=full_flags),
        Row("one_stage", "One RL stage (guided only)", ("1",), flags={"guided_steps": a.rl_steps}),
        Row("untrained_rm", "Untrained reward model", ("3",), prmu="untrained", flags=full_flags),
        Row("no_ue", "PRMU w/o UE", ("3",), prmu="no_ue", flags=full_flags),
        Row("rm_question_only", "PRMU, question only", ("3q",), prmu="question_only", flags=full_flags, in_all=False),
        Row(
            "rm_question_only_no_ue",
            "PRMU w/o UE, question only",
            ("3q",),
            prmu="question_only_no_ue",
            flags=full_flags,
            ref="rm_question_only",
            in_all=False,
        ),
    ]
    for w, v in DEFAULT_WEIGHTS.items():
        for times in (0.5, 2):
            rows.append(
                Row(
                    f"{w}_x{times:g}",
                    f"{w} × {times:g} ({v * times:g})",
                    ("weights",),
                    flags={**full_flags, w: v * times},
                )
            )
    return rows


def auto_report(quick: bool, rows: str, seeds: list[int]) -> str:
    """Where `--report auto` copies the report: docs/ablations/report.md for the whole table (every row, ≥ 3
    seeds, not --quick), so a subset never stands in for it; else nowhere."""
    return "docs/ablations/report.md" if not quick and rows == "all" and len(seeds) >= 3 else ""


def selected_rows(a) -> list[Row]:
    """The rows `--rows` names ("all": every row but the extra ones), after full and each row's reference, which
    the differences are taken against."""
    every = {r.name: r for r in rows_of(a)}
    names = [n for n, r in every.items() if r.in_all] if a.rows == "all" else [n for n in a.rows.split(",") if n]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise config.ConfigError(f"--rows {a.rows}: unknown {', '.join(unknown)}; expected some of {', '.join(every)}")
    return [every[n] for n in dict.fromkeys(["full", *(x for n in names for x in (every[n].ref, n))])]


QUICK_ROWS = "full,no_prmu,untrained_rm,no_ue"  # Table 3


@dataclass
class AblateConfig(DemoConfig):
    run: str = "runs/ablate"  # the run folder; rerun the same command to resume
    chain_style: Literal["full", "terse", "bound"] = "terse"
    sft_steps: Annotated[int, COUNT] = 48
    rl_steps: Annotated[int, COUNT] = 8
    rl_lr: Annotated[float, POSITIVE] = 1e-4
    eval_questions: Annotated[int, COUNT] = 128
    eval_split: Literal["dev", "test"] = "test"
    eval_samples: Annotated[int, NON_NEGATIVE] = 4
    eval_batch: Annotated[int, NON_NEGATIVE] = 24
    guided_steps: Annotated[int, NO_CAP_OR_COUNT] = -1  # full TagPR's guided GSPO steps, the rest exploratory (-1:
    # half of --rl-steps)
    rows: str = "all"  # the rows to run, comma-separated (names in the docstring), or "all" (all but the
    # question-only reward models)
    quick: bool = False  # Table 3's rows on the first task and the first seed
    report: str = "auto"  # also copy <run>/report.md here; auto: docs/ablations/report.md when every row runs
    # with 3 seeds or more (not --quick, not --rows), else nowhere; empty: nowhere
    data: str = ""  # a build_data.py output to ablate on (e.g. runs/lamp/data, built from a LaMP folder by the
    # README's recipe); empty: synthetic users built into <run>/data
    lamp_dir: str = ""  # the LaMP folder the base model is scored on; empty: <data>/synthetic_lamp
    trainer_preset: Literal["cpu", "qwen3-8b"] = "cpu"  # cpu: the trainers at the settings above, RL under
    # torchrun; qwen3-8b: every trainer under torchrun on --nproc GPUs at its own qwen3-8b preset (sequence length,
    # micro-batches, checkpointing), with the steps, rates and batches above
    prmu_backbone: str = "tiny"  # the reward model's backbone (train_prmu.py --backbone)
    dry: bool = False  # print every stage's command line and run none


# `--preset qwen3-8b`: the same table on a GPU node (not run here: the README's estimate is ~2.4 h a row and seed on
# 8 A100s at these steps). --policy, --prmu-backbone and --data (a LaMP build) are the user's own folders.
PRESETS = {
    "qwen3-8b": dict(
        trainer_preset="qwen3-8b",
        nproc=8,
        precision="bf16",
        k=8,
        sft_steps=1750,  # ~2 epochs of ~56 k chains at 64 a step
        sft_batch=64,
        sft_lr=1e-5,
        sft_train_layers=-1,
        prmu_steps=200,
        rl_steps=64,
        rl_prompts=128,
        rl_group=5,
        rl_lr=1e-6,
        rl_max_new=1024,
        rl_train_layers=-1,
        eval_batch=32,
        trunk_store=False,
        malloc="system",
    )
}
DATA_FILES = ("sft.jsonl", "prp.jsonl", "pqp.jsonl", "rl_prompts.jsonl", "eval_prompts.jsonl", "tags.json")


def check_gpu_setup(a) -> None:
    """--trainer-preset qwen3-8b needs the user's own model folders; --data needs every file the stages read."""
    if a.trainer_preset != "cpu":
        for flag, value, default in (
            ("--policy", a.policy, "smollm2-135m"),
            ("--prmu-backbone", a.prmu_backbone, "tiny"),
        ):
            if value == default:
                raise config.ConfigError(
                    f"{flag} {value}: --trainer-preset {a.trainer_preset} needs a model folder of that size "
                    "(e.g. --policy /models/Qwen3-8B --prmu-backbone /models/Skywork-Reward-V2-Qwen3-0.6B)"
                )
    if a.data:
        missing = [f for f in DATA_FILES if not (Path(a.data) / f).is_file()]
        if missing:
            raise config.ConfigError(
                f"--data {a.data}: no {', '.join(missing)}; build it with `python build_data.py --lamp-dir …` "
                "(eval prompts: --eval-prompts)"
            )
        if not a.lamp_dir and not (Path(a.data) / "synthetic_lamp").is_dir():
            raise config.ConfigError(f"--data {a.data}: give --lamp-dir, the LaMP folder it was built from")


def main(argv=None):
    a, _ = config.parse(AblateConfig, PRESETS, argv, description=__doc__)
    check_gpu_setup(a)
    if a.guided_steps < 0:
        a.guided_steps = a.rl_steps // 2
    if a.guided_steps > a.rl_steps:
        raise config.ConfigError(f"--guided-steps {a.guided_steps}: more than --rl-steps {a.rl_steps}")
    if a.quick:
        a.tasks, a.seeds = a.tasks.split(",")[0], a.seeds.split(",")[0]
        a.rows = QUICK_ROWS if a.rows == "all" else a.rows
    rows = selected_rows(a)
    os.environ.update(stages.malloc_env(a.malloc))
    # on GPUs the trainers resolve the precision on their device; here, on this CPU
    prec = stages.precision(a.precision) if a.trainer_preset == "cpu" else a.precision.replace("auto", "bf16")
    old_logp = old_logp_source(a, prec)
    seeds = [int(s) for s in a.seeds.split(",") if s]
    run_dir = ROOT / a.run
    run_dir.mkdir(parents=True, exist_ok=True)
    logs, sft = run_dir / "logs", run_dir / "sft"
    data = Path(a.data).resolve() if a.data else run_dir / "data"
    timer = stages.Timer(run_dir / "timings.json", dry=a.dry)
    t_start = time.time()
    where = f"CPU: {hardware.describe()}" if a.trainer_preset == "cpu" else f"{a.nproc} GPUs, {a.trainer_preset}"
    print(f"rows: {', '.join(r.name for r in rows)}; seeds {seeds}; {prec} ({where})")

    if not a.data:
        cmd = stages.build_data_cmd(a, data)
        timer.stage("build_data", data / "eval_prompts_swap.jsonl", cmd, logs / "build_data.log")
    timer.stage("train_sft", sft / "model" / "config.json", stages.sft_cmd(a, data, sft, prec), logs / "train_sft.log")
    prmu_extra = {
        "full": (),
        "no_ue": ("--no-use-user-embeddings",),
        "untrained": ("--max-steps", "0"),
        "question_only": ("--no-profile-in-input",),
        "question_only_no_ue": ("--no-profile-in-input", "--no-use-user-embeddings"),
    }
    prmus = {r.prmu for r in rows} - {"none"}
    for kind in sorted(prmus):
        out = run_dir / "prmu" / kind
        cmd = stages.prmu_cmd(a, data, out, *prmu_extra[kind])
        timer.stage(f"train_prmu {kind}", out / "model" / "users.json", cmd, logs / f"train_prmu_{kind}.log")
    trunks = {"sft": run_dir / "eval_trunk_sft", "base": run_dir / "eval_trunk_base"}
    for i, s in enumerate(seeds):  # seed by seed: a run stopped early holds every row of its first seeds
        for r in (r for r in rows if r.trained):
            out = run_dir / "rl" / r.name / f"seed{s}"
            cmd = stages.rl_cmd(
                a,
                sft / "model" if r.policy == "sft" else a.policy,
                run_dir / "prmu" / r.prmu / "model" if r.prmu != "none" else "none",
                data,
                out,
                s,
                prec,
                old_logp,
                eval_before=r.name == "full" and i == 0,  # the SFT policy's row (w/o RL)
                eval_trunk_store=trunks[r.policy] if a.trunk_store else "",
                exploratory_epochs=100,
                eval_swap_prompts="",  # the tables need no swap control: a sixth of the scoring saved
                **r.flags,
            )
            timer.stage(
                f"train_rl {r.name} seed {s}", out / "model" / "config.json", cmd, logs / f"rl_{r.name}_{s}.log"
            )
    for t in trunks.values() if not a.dry else ():
        shutil.rmtree(t, ignore_errors=True)  # derived data: not kept
    cmd = stages.evaluate_base_cmd(a, data, run_dir / "eval" / "base", prec)
    timer.stage("evaluate base", run_dir / "eval" / "base" / "table.md", cmd, logs / "evaluate_base.log")
    if a.dry:
        return
    md = ablation_report.report(run_dir, a, rows, seeds, timer.t, time.time() - t_start, prec)
    report = a.report if a.report != "auto" else auto_report(a.quick, a.rows, seeds)
    if report:
        dest = ROOT / report
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / "report.md", dest)
    print(md + f"\nreport: {run_dir / 'report.md'}")


if __name__ == "__main__":
    config.run(main)
