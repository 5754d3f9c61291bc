"""The LaMP benchmark: tasks, typed records, official files, templates, label sets,
retrieval queries and the official prompt augmentation.

LaMP (Salemi et al., ACL 2024) ships, per task and split, `{split}_questions.json`
(a list of `{"id", "input", "profile": [item, ...]}`; time-based files add
`"user_id"`) and `{split}_outputs.json` (`{"task": "LaMP_k", "golds": [{"id",
"output"}]}`). Predictions use the outputs format with exactly the gold id set.

Task keys are the official names (`LaMP_1` … `LaMP_7`) plus `LaMP_2N` for the older
news-categorisation version of LaMP-2, whose files also say `"task": "LaMP_2"`.

Departures from the official code, all deliberate:
1. An empty profile leaves the input unchanged for every task (the official code
   does so only for LaMP-1; for the others it would prepend ". ").
2. Per-item truncation is a caller-supplied function (e.g. to N tokens) instead of
   the official budget split across items by a tokenizer.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .files import DataError, read_json, write_json

MOVIE_TAGS = (
    "sci-fi",
    "based on a book",
    "comedy",
    "action",
    "twist ending",
    "dystopia",
    "dark comedy",
    "classic",
    "psychology",
    "fantasy",
    "romance",
    "thought-provoking",
    "social commentary",
    "violence",
    "true story",
)
# Order as in the official evaluator (it differs from the order in the input template).
NEWS_CATEGORIES = (
    "food & drink",
    "sports",
    "education",
    "parents",
    "religion",
    "travel",
    "business",
    "crime",
    "science & technology",
    "culture & arts",
    "entertainment",
    "politics",
    "women",
    "style & beauty",
    "healthy living",
)
NEWS_CATEGORIES_IN_PROMPT = (
    "women",
    "religion",
    "politics",
    "style & beauty",
    "entertainment",
    "culture & arts",
    "sports",
    "science & technology",
    "travel",
    "business",
    "crime",
    "education",
    "healthy living",
    "parents",
    "food & drink",
)


@dataclass(frozen=True)
class Task:
    name: str  # our key, e.g. "LaMP_2N"
    official: str  # the "task" value in outputs files, e.g. "LaMP_2"
    kind: str  # "classification" | "rating" | "generation"
    template: str  # the official input template
    item_fields: tuple[str, ...]  # fields every profile item must carry (besides id)
    corpus_fields: tuple[str, ...]  # joined by a space: the item's retrieval document
    query_marker: str | None  # query = text after this marker; None: LaMP-1's quoted references
    phrase: str  # one retrieved item in the official augmentation
    wrap: str  # how the joined phrases and the input combine
    long_field: str  # the item field a truncation function shortens
    answer_field: str | None  # the item field that holds the user's own "output"
    labels: tuple[str, ...] = ()  # closed label set (classification), official order

    @property
    def is_classification(self) -> bool:
        return self.kind == "classification"

    @property
    def is_generation(self) -> bool:
        return self.kind == "generation"


_MOVIE_TEMPLATE = (
    "Which tag does this movie relate to among the following tags? Just answer with the tag name "
    "without further explanation. tags: [" + ", ".join(MOVIE_TAGS) + "] description: {description}"
)
_NEWS_TEMPLATE = (
    "Which category does this article relate to among the following categories? Just answer with the "
    "category name without further explanation. categories: ["
    + ", ".join(NEWS_CATEGORIES_IN_PROMPT)
    + "] article: {text}"
)

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            "LaMP_1",
            "LaMP_1",
            "classification",
            'For an author who has written the paper with the title "{title}", which reference is related? Just answer '
            'with [1] or [2] without explanation. [1]: "{ref1}" [2]: "{ref2}"',
            ("title", "abstract"),
            ("title", "abstract"),
            None,
            '"{title}"',
            "@after_title",
            "title",
            None,
            labels=("[1]", "[2]"),
        ),
        Task(
            "LaMP_2",
            "LaMP_2",
            "classification",
            _MOVIE_TEMPLATE,
            ("description", "tag"),
            ("description",),
            "description:",
            'the tag for the movie: "{description}" is "{tag}" ',
            "{items}. {input}",
            "description",
            "tag",
            labels=MOVIE_TAGS,
        ),
        Task(
            "LaMP_2N",
            "LaMP_2",
            "classification",
            _NEWS_TEMPLATE,
            ("text", "title", "category"),
            ("title", "text"),
            "article:",
            'the category for the article: "{text}" is "{category}" ',
            "{items}. {input}",
            "text",
            "category",
            labels=NEWS_CATEGORIES,
        ),
        Task(
            "LaMP_3",
            "LaMP_3",
            "rating",
            "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, or 5 without "
            "further explanation. review: {text}",
            ("text", "score"),
            ("text",),
            "review:",
            '{score} is the score for "{text}" ',
            "{items}. {input}",
            "text",
            "score",
            labels=("1", "2", "3", "4", "5"),
        ),
        Task(
            "LaMP_4",
            "LaMP_4",
            "generation",
            "Generate a headline for the following article: {text}",
            ("text", "title"),
            ("title", "text"),
            "article:",
            '"{title}" is the title for "{text}" ',
            "{items}. {input}",
            "text",
            "title",
        ),
        Task(
            "LaMP_5",
            "LaMP_5",
            "generation",
            "Generate a title for the following abstract of a paper: {abstract}",
            ("title", "abstract"),
            ("title", "abstract"),
            "paper:",
            '"{title}" is a title for "{abstract}" ',
            "{items}. Following the given patterns {input}",
            "abstract",
            "title",
        ),
        Task(
            "LaMP_6",
            "LaMP_6",
            "generation",
            "Generate a subject for the following email: {text}",
            ("text", "title"),
            ("text",),
            ":",
            '"{title}" is the title for "{text}" ',
            "{items}. {input}",
            "text",
            "title",
        ),
        Task(
            "LaMP_7",
            "LaMP_7",
            "generation",
            "Paraphrase the following tweet without any explanation before or after it: {text}",
            ("text",),
            ("text",),
            ":",
            '"{text}" ',
            "{items} are written by a person. Following the given patterns {input}",
            "text",
            "text",
        ),
    )
}


def get_task(name: str) -> Task:
    """Look a task up by key, accepting `LaMP_3`, `LaMP-3`, `lamp3` and `3`."""
    key = str(name).strip()
    m = re.fullmatch(r"(?i)(?:lamp[-_ ]?)?(\d)(n?)", key)
    if m:
        key = f"LaMP_{m.group(1)}{m.group(2).upper()}"
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def task_for_input(task: Task | str, text: str) -> Task:
    """LaMP-2 files say "LaMP_2" for both versions: tell them apart by the input."""
    task = get_task(task) if isinstance(task, str) else task
    if task.official == "LaMP_2":
        return TASKS["LaMP_2N"] if text.lstrip().startswith("Which category does this article") else TASKS["LaMP_2"]
    return task


def answer_problem(task: Task, value: str) -> str | None:
    """Why `value` cannot be a gold answer of `task` (None: it can): a classification gold must be one of the
    task's labels, a rating a number from 1 to 5; a generation gold any non-empty text."""
    if task.is_classification:
        if value.strip() not in task.labels:
            return f"{value!r} is not a {task.name} label (expected one of: {', '.join(task.labels)})"
    elif task.kind == "rating":
        try:
            x = float(value)
        except ValueError:
            return f"{value!r} is not a rating (expected a number from 1 to 5)"
        if not 1 <= x <= 5:
            return f"{value!r} is outside the rating range 1-5"
    elif not value.strip():
        return "is empty"
    return None


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class Item:
    """One entry of a user's profile."""

    id: str
    fields: Mapping[str, str]
    date: str | None = None

    def __getitem__(self, key: str) -> str:
        return self.fields[key]

    def to_json(self) -> dict:
        d = {"id": self.id, **self.fields}
        if self.date is not None:
            d["date"] = self.date
        return d


@dataclass
class Question:
    id: str
    input: str
    profile: list[Item] = field(default_factory=list)
    user_id: str | None = None

    def to_json(self) -> dict:
        d = {"id": self.id, "input": self.input, "profile": [p.to_json() for p in self.profile]}
        if self.user_id is not None:
            d["user_id"] = self.user_id
        return d


@dataclass
class Split:
    """A task's split: questions in file order and, except for test, their golds."""

    task: Task
    questions: list[Question]
    golds: dict[str, str] | None = None
    questions_path: Path | None = None
    outputs_path: Path | None = None


def _as_str(value, where: str, path) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{path}: {where}: expected a string, got {type(value).__name__}")
    return value if isinstance(value, str) else (str(int(value)) if float(value).is_integer() else str(value))


def parse_questions(data, task: Task | str, path: str | os.PathLike = "<memory>") -> list[Question]:
    """Validate a decoded `{split}_questions.json` and build typed records."""
    task = get_task(task) if isinstance(task, str) else task
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of questions, got {type(data).__name__}")
    out, seen = [], {}
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record #{i}: expected an object, got {type(rec).__name__}")
        if "id" not in rec:
            raise DataError(f"{path}: record #{i}: missing field 'id'")
        qid = _as_str(rec["id"], f"record #{i}: field 'id'", path)
        where = f"record id={qid} (#{i})"
        for f in ("input", "profile"):
            if f not in rec:
                raise DataError(f"{path}: {where}: missing field '{f}'")
        if qid in seen:
            raise DataError(f"{path}: {where}: duplicate id (first seen at record #{seen[qid]})")
        seen[qid] = i
        text = _as_str(rec["input"], f"{where}: field 'input'", path)
        if not isinstance(rec["profile"], list):
            raise DataError(f"{path}: {where}: field 'profile' must be a list, got {type(rec['profile']).__name__}")
        items = []
        for j, it in enumerate(rec["profile"]):
            iwhere = f"{where}: profile[{j}]"
            if not isinstance(it, dict):
                raise DataError(f"{path}: {iwhere}: expected an object, got {type(it).__name__}")
            if "id" not in it:
                raise DataError(f"{path}: {iwhere}: missing field 'id'")
            iid = _as_str(it["id"], f"{iwhere}: field 'id'", path)
            iwhere = f"{where}: profile[{j}] (id={iid})"
            fields = {}
            for f in task.item_fields:
                if f not in it:
                    raise DataError(f"{path}: {iwhere}: missing field '{f}' (required for {task.name})")
                fields[f] = _as_str(it[f], f"{iwhere}: field '{f}'", path)
            date = _as_str(it["date"], f"{iwhere}: field 'date'", path) if it.get("date") is not None else None
            items.append(Item(iid, fields, date))
        uid = rec.get("user_id")
        out.append(Question(qid, text, items, None if uid is None else _as_str(uid, f"{where}: field 'user_id'", path)))
    return out


def read_questions(path: str | os.PathLike, task: Task | str) -> list[Question]:
    return parse_questions(read_json(path), task, path)


def write_questions(path: str | os.PathLike, questions: Iterable[Question]) -> None:
    write_json(path, [q.to_json() for q in questions])


def read_outputs(path: str | os.PathLike, task: Task | str | None = None) -> tuple[str, dict[str, str]]:
    """Read an outputs / predictions file → (task name in the file, {id: output}) in file order."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected an object with 'task' and 'golds', got {type(data).__name__}")
    for f in ("task", "golds"):
        if f not in data:
            raise DataError(f"{path}: missing top-level field '{f}'")
    if not isinstance(data["golds"], list):
        raise DataError(f"{path}: field 'golds' must be a list")
    name = str(data["task"])
    if task is not None:
        want = (get_task(task) if isinstance(task, str) else task).official
        if get_task(name).official != want:
            raise DataError(f"{path}: field 'task' is {name!r} but {want!r} was expected")
    out: dict[str, str] = {}
    for i, rec in enumerate(data["golds"]):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: golds[{i}]: expected an object, got {type(rec).__name__}")
        for f in ("id", "output"):
            if f not in rec:
                raise DataError(f"{path}: golds[{i}]: missing field '{f}'")
        rid = _as_str(rec["id"], f"golds[{i}]: field 'id'", path)
        if rid in out:
            raise DataError(f"{path}: golds[{i}] (id={rid}): duplicate id")
        if rec["output"] is None:
            raise DataError(f"{path}: golds[{i}] (id={rid}): field 'output' is null")
        out[rid] = _as_str(rec["output"], f"golds[{i}] (id={rid}): field 'output'", path)
    return name, out


def write_outputs(path: str | os.PathLike, task: Task | str, outputs: Mapping[str, str]) -> None:
    official = (get_task(task) if isinstance(task, str) else task).official
    write_json(path, {"task": official, "golds": [{"id": k, "output": v} for k, v in outputs.items()]})


def swap_profiles(questions: Sequence[Question]) -> list[Question]:
    """The profile-swap control: every question keeps its input and gold but shows the profile of another user
    of the same list (users in order of first appearance; user i gets user i + 1's, the last the first's).
    A model that personalizes loses accuracy; one that learned the task's global answer does not."""
    first: dict[str, Question] = {}
    for q in questions:
        first.setdefault(q.user_id or q.id, q)
    users = list(first)
    if len(users) < 2:
        raise ValueError("the profile-swap control needs questions of at least two users")
    other = {u: first[users[(i + 1) % len(users)]].profile for i, u in enumerate(users)}
    return [Question(q.id, q.input, other[q.user_id or q.id], q.user_id) for q in questions]


def check_prediction_ids(
    golds: Mapping[str, str], preds: Mapping[str, str], preds_path="<predictions>", golds_path="<golds>"
) -> None:
    """Predictions must cover exactly the gold ids (the official evaluator's rule)."""
    missing = [k for k in golds if k not in preds]
    extra = [k for k in preds if k not in golds]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} gold id(s) have no prediction (e.g. {missing[:5]})")
        if extra:
            parts.append(f"{len(extra)} prediction id(s) are not in the golds (e.g. {extra[:5]})")
        raise DataError(f"{preds_path}: ids do not match {golds_path}: " + "; ".join(parts))


# ----------------------------------------------------------------------------- folders

SPLITS = ("train", "dev", "test")


def split_files(
    lamp_dir: str | os.PathLike, task: Task | str, split: str, time_based: bool = False
) -> tuple[Path, Path]:
    """Find `{split}_questions.json` / `{split}_outputs.json` under a LaMP folder.

    Accepted layouts (the official download layout first):
    `<dir>/[time/]<task>/<split>/<split>_questions.json`, `<dir>/[time/]<task>/<split>_questions.json`,
    and `<dir>/<split>_questions.json` when `<dir>` is already the task's folder.
    """
    task = get_task(task) if isinstance(task, str) else task
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    root = Path(lamp_dir) / ("time" if time_based else "")
    names = dict.fromkeys([task.name, task.official])
    candidates = [root / n / split for n in names] + [root / n for n in names] + [root]
    for d in candidates:
        q = d / f"{split}_questions.json"
        if q.is_file():
            return q, d / f"{split}_outputs.json"
    tried = ", ".join(str(d / f"{split}_questions.json") for d in candidates)
    raise DataError(
        f"no {task.name} {split} questions under {lamp_dir} (tried {tried}); download LaMP from "
        "https://lamp-benchmark.github.io/download or make synthetic users with "
        "`python -m tagpr.synthetic --out <dir>`"
    )


def load_split(
    lamp_dir: str | os.PathLike,
    task: Task | str,
    split: str,
    time_based: bool = False,
    require_golds: bool | None = None,
) -> Split:
    """Load a split's questions and (except for test, whose golds are private) its golds."""
    task = get_task(task) if isinstance(task, str) else task
    qpath, opath = split_files(lamp_dir, task, split, time_based)
    questions = read_questions(qpath, task)
    if questions and task.official == "LaMP_2":
        task = task_for_input(task, questions[0].input)
    if require_golds is None:
        require_golds = split != "test"
    golds = None
    if opath.is_file():
        _, golds = read_outputs(opath, task)
        check_prediction_ids(golds, {q.id: "" for q in questions}, qpath, opath)
        for q in questions:
            problem = answer_problem(task_for_input(task, q.input), golds[q.id])
            if problem:
                raise DataError(f"{opath}: id={q.id}: field 'output': {problem}")
    elif require_golds:
        raise DataError(f"{opath}: file not found (golds for {task.name} {split})")
    return Split(task, questions, golds, qpath, opath if golds is not None else None)


# ----------------------------------------------------------------------------- retrieval text & prompts


def _quoted(text: str) -> list[str]:
    """The strings between double quotes, in order (the official LaMP-1 query parser)."""
    return re.findall(r'"([^"]*)"', text)


def retrieval_query(task: Task | str, text: str) -> str:
    """The per-task retrieval query taken from a question's input.

    LaMP-1: the two candidate reference titles joined by a space (not the author's own
    title). Others: the text after the task's marker. A missing marker (a known
    malformed LaMP-2 dev item) falls back to the whole input.
    """
    task = get_task(task) if isinstance(task, str) else task
    if task.query_marker is None:
        quoted = _quoted(text)
        return f"{quoted[1]} {quoted[2]}" if len(quoted) >= 3 else text.strip()
    at = text.find(task.query_marker)
    return text.strip() if at < 0 else text[at + len(task.query_marker) :].strip()


def item_text(task: Task | str, item: Item) -> str:
    """The retrieval document of a profile item (the official corpus makers)."""
    task = get_task(task) if isinstance(task, str) else task
    return " ".join(item[f] for f in task.corpus_fields)


def augment(task: Task | str, text: str, items: Iterable[Item], truncate: Callable[[str], str] | None = None) -> str:
    """The official LaMP prompt: retrieved items as phrases joined by ", and ".

    LaMP-1 inserts the titles after the word "title" of the input; LaMP-5 and LaMP-7
    add "Following the given patterns". `truncate` shortens each item's long field.
    """
    task = get_task(task) if isinstance(task, str) else task
    phrases = []
    for it in items:
        fields = dict(it.fields)
        if truncate is not None:
            fields[task.long_field] = truncate(fields[task.long_field])
        phrases.append(task.phrase.format(**fields))
    if not phrases:
        return text
    joined = ", and ".join(phrases)
    if task.wrap == "@after_title":
        at = text.find("title")
        return text if at < 0 else text[: at + 5] + ", and " + joined + text[at + 5 :]
    return task.wrap.format(items=joined, input=text)
