"""A run's folder: `config.json`, the checkpoint it resumes from, and `metrics.jsonl`, mirrored into TensorBoard
with `--report-to tensorboard`."""

from __future__ import annotations

import json
import os
from pathlib import Path

from . import checkpoint, dist
from .config import ConfigError
from .files import DataError, atomic_write_text, read_text, write_json

REPORT_TO = ("none", "tensorboard")


def tensorboard_writer(log_dir: str | os.PathLike, resume_step: int | None):
    """A TensorBoard event writer; after a resume, events past the resumed step are dropped on reading."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: the `tensorboard` extra
    except ImportError:
        raise ConfigError(
            "--report-to tensorboard needs the tensorboard package: pip install -e '.[tensorboard]'"
        ) from None
    return SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1 if resume_step else None)


class MetricsLog:
    """`metrics.jsonl` (or any JSONL of objects with a `step`), written by rank 0. On resume, lines
    after the resumed step are dropped so the file reads as one uninterrupted run. With `tensorboard`
    (a folder), every number of every row is mirrored as a scalar of the same name at its step, and
    flushed at once, so `tensorboard --logdir` shows the run live."""

    def __init__(
        self, path: str | os.PathLike, resume_step: int | None = None, tensorboard: str | os.PathLike | None = None
    ):
        self.path = Path(path)
        self.main = dist.get().is_main
        self.tb = None
        if not self.main:
            return
        if tensorboard:
            self.tb = tensorboard_writer(tensorboard, resume_step)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.is_file():
            atomic_write_text(self.path, "".join(line + "\n" for line in self.rows_to(resume_step)))

    def rows_to(self, step: int) -> list[str]:
        """The file's lines up to `step`. A torn last line (a run killed during an append) is dropped, and said;
        a malformed line before it is an error naming it."""
        lines = [(n, line) for n, line in enumerate(read_text(self.path).split("\n"), 1) if line.strip()]
        keep = []
        for i, (n, line) in enumerate(lines):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:
                    print(
                        f"{self.path}:{n}: dropped a torn last line ({len(line)} characters) left by an interrupted "
                        "append",
                        flush=True,
                    )
                    break
                raise DataError(f"{self.path}:{n}: malformed JSON (not the last line: not a torn append)") from None
            if row.get("step", 0) <= step:
                keep.append(line)
        return keep

    def write(self, row: dict) -> None:
        self.write_rows([row])

    def write_rows(self, rows: list[dict]) -> None:
        """Several objects (each with its `step`) in one append."""
        if self.main and rows:
            with open(self.path, "a") as f:
                f.write("".join(json.dumps(r) + "\n" for r in rows))
            if self.tb is not None:
                for r in rows:
                    for k, v in r.items():
                        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                            self.tb.add_scalar(k, v, r["step"])
                self.tb.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        """A text panel (markdown) at `step` in TensorBoard; nothing without it."""
        if self.tb is not None:
            self.tb.add_text(tag, text, step)
            self.tb.flush()


def start_run(
    out: Path, resume: str, model, optimizer, resolved: dict, report_to: str = "none"
) -> tuple[int, MetricsLog]:
    """Write `<out>/config.json`, restore the checkpoint `resume` names ("auto": the latest in
    `<out>/ckpt`, "": none, else a path) and open `metrics.jsonl` (mirrored into `<out>/tensorboard`
    with `report_to` "tensorboard"). Returns (start step, log)."""
    ckpt = None
    if resume:
        ckpt = checkpoint.latest(out / "ckpt") if resume == "auto" else Path(resume)
    start = 0
    if ckpt is not None:  # loaded first: a checkpoint refused leaves the run's config.json as it was
        start = checkpoint.load(ckpt, model, optimizer)["step"]
        dist.print0(f"resumed from {ckpt} at step {start}")
    if dist.get().is_main:
        write_json(out / "config.json", resolved)
    return start, MetricsLog(
        out / "metrics.jsonl",
        resume_step=start if ckpt is not None else None,
        tensorboard=out / "tensorboard" if report_to == "tensorboard" else None,
    )
