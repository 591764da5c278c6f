"""Scores traced back to the data: which classes a scored task holds, which file a scored example is.

A scores file ranks pool rows; a user asks which of *their* classes and images those are. Beside every
scores file ``STEM.safetensors`` the CLI writes ``STEM.csv``: one row per scored item, most harmful first,
with its task id (and example), score, the task's classes by name, whether the pool recorded it as
corrupted, and for examples the file (where the dataset knows its files), the label used in training and
the true label; for example levels also ``STEM.files.csv``, one row per file with its scores summed over the tasks
it appears in. The CLI's top lists print the same descriptions. The score column's name says what the number is
(:func:`score_column`), so a table read without its scores file still carries its sign and units.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes

COLUMNS = ("rank_harmful_first", "task_id", "set", "example", "score", "classes", "corrupted", "file", "label", "true_label")

# the score column's header by method: what the number is, with its sign and units (docs/method.md §5). Every
# influence method predicts the change of the validation loss when the item is removed (> 0: the item helps);
# the two baselines predict nothing and say what they are instead.
SCORE_COLUMNS = {"loss": "minus_query_loss", "random": "random_order_only"}
PREDICTED_CHANGE = "val_loss_change_if_removed"


def score_column(method: str | None) -> str:
    """The header of the score column of a scores file of ``method`` (file tables prefix it with ``summed_``)."""
    return SCORE_COLUMNS.get(method or "", PREDICTED_CHANGE)


def score_key(row: dict[str, Any]) -> str | None:
    """The header under which a table row holds its score, whichever method's it is (None when it has none)."""
    names = ("score", PREDICTED_CHANGE, *SCORE_COLUMNS.values())
    return next((k for k in row if k in names or (k.startswith("summed_") and k[len("summed_"):] in names)), None)


def score_of(row: dict[str, Any]) -> str:
    """A table row's score, whichever method's header it carries ('' when it has none)."""
    key = score_key(row)
    return row[key] if key is not None else ""


def _class_name(dataset: Any, c: int) -> str:
    names = getattr(dataset, "class_names", None)
    return str(names[c]) if names is not None and 0 <= c < len(names) else str(c)


def _example_name(dataset: Any, example_id: int) -> str:
    names = getattr(dataset, "example_names", None)
    return str(names[example_id]) if names is not None and 0 <= example_id < len(names) else f"example {example_id}"


def join_names(names: Any) -> str:
    """Names joined by ";", a name holding ";" or a double quote quoted CSV-style (quotes doubled), so that the
    list splits back as it was: ``next(csv.reader([field], delimiter=";"))``."""
    return ";".join('"' + n.replace('"', '""') + '"' if ";" in n or '"' in n else n for n in map(str, names))


def item_rows(result: Any, pool: Any, dataset: Any) -> list[dict[str, Any]]:
    """One row per scored item of ``result`` (most harmful first) described through ``pool`` and ``dataset``
    (None for generated pools, e.g. sinusoid: the rows then carry ids and scores only)."""
    classify = dataset is not None and hasattr(pool, "classes")
    row_of = {int(t): r for r, t in enumerate(pool.task_ids.tolist())} if hasattr(pool, "task_ids") else {}
    which = result.level if result.level in ("support", "query") else ""
    # the pool's arrays as lists once: per-row tensor indexing would cost seconds on 10⁵ example rows
    classes = pool.classes.tolist() if classify else []
    if classify and which:
        ids, used, true, bad = (getattr(pool, f"{which}_{k}").tolist() for k in ("ids", "y", "true_y", "corrupted"))
    elif classify:
        corrupted_tasks = pool.corrupted_tasks.tolist()
    scores = result.scores.reshape(-1).tolist()
    rows = []
    order = result.ranking(harmful_first=True)
    for rank, (item, flat) in enumerate(zip(result.items(order), order.tolist()), 1):
        task = item[0]
        row = {"rank_harmful_first": rank, "task_id": task, "set": which, "example": item[1] if len(item) > 1 else "",
               "score": f"{scores[flat]:.6e}", "classes": "", "corrupted": "", "file": "", "label": "", "true_label": ""}
        r = row_of.get(task)
        if classify and r is not None:
            row["classes"] = join_names(_class_name(dataset, c) for c in classes[r])
            if which:
                j = item[1]
                row["file"] = _example_name(dataset, ids[r][j])
                row["label"] = _class_name(dataset, classes[r][used[r][j]])
                row["true_label"] = _class_name(dataset, classes[r][true[r][j]])
                row["corrupted"] = "yes" if bad[r][j] else "no"
            else:
                row["corrupted"] = "yes" if corrupted_tasks[r] else "no"
        rows.append(row)
    return rows


FILE_COLUMNS = ("rank_harmful_first", "file", "summed_score", "appearances", "labels", "true_label", "corrupted")


def file_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Example rows grouped by file, most harmful first. An image drawn into several tasks is several items; removing
    the file removes all of them, and to first order their predicted changes add, so its score is their sum."""
    by_file: dict[str, dict[str, Any]] = {}
    for r in rows:
        if not r.get("file"):
            continue
        f = by_file.setdefault(r["file"], {"file": r["file"], "summed_score": 0.0, "appearances": 0, "labels": set(),
                                           "true_label": r["true_label"], "corrupted": "no"})
        f["summed_score"] += float(r["score"])
        f["appearances"] += 1
        f["labels"].add(r["label"])
        if r["corrupted"] == "yes":
            f["corrupted"] = "yes"
    out = sorted(by_file.values(), key=lambda f: f["summed_score"])
    for rank, f in enumerate(out, 1):
        f.update(rank_harmful_first=rank, summed_score=f"{f['summed_score']:.6e}", labels=join_names(sorted(f["labels"])))
    return out


def coverage(pool: Any, dataset: Any, which: str) -> str:
    """How many of the dataset's examples the ``which`` (support/query) scores cover, and why the others are not scored."""
    if dataset is None or not hasattr(pool, f"{which}_ids"):
        return ""
    scored = len(set(getattr(pool, f"{which}_ids").reshape(-1).tolist()))
    in_train = sum(len(dataset.examples_of(c, "train")) for c in dataset.classes("train"))
    unused = in_train - scored
    return (f"{scored} of the dataset's {dataset.num_examples} examples are scored here ({which} examples of the training pool's tasks); "
            f"{dataset.num_examples - in_train} belong to the validation/test splits and are never scored"
            + (f", and {unused} training example{'s appear' if unused != 1 else ' appears'} in no task of the pool as {which} examples (a larger --train-tasks draws more)"
               if unused > 0 else ""))


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]], score: str) -> Path:
    """The rows under ``columns``, the score column (``score`` / ``summed_score``) headed by ``score``'s meaning."""
    header = {c: c.replace("score", score) for c in columns if c in ("score", "summed_score")}
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([header.get(c, c) for c in columns])
    writer.writerows([r.get(c, "") for c in columns] for r in rows)
    return atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def write_item_table(stem: str | Path, rows: list[dict[str, Any]], method: str | None = None) -> Path:
    """``STEM.csv`` (atomic), the columns of :data:`COLUMNS`, the score column named for ``method``
    (:func:`score_column`); for example-level scores also ``STEM.files.csv``, one row per file (:func:`file_rows`)."""
    files = file_rows(rows)
    if files:
        _write_csv(Path(f"{stem}.files.csv"), FILE_COLUMNS, files, score_column(method))
    return _write_csv(Path(f"{stem}.csv"), COLUMNS, rows, score_column(method))


def read_table(path: str | Path) -> list[dict[str, str]]:
    """The rows of an item or file table written here ([] when there is none)."""
    if not Path(path).is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def split_names(field: str) -> list[str]:
    """The names a :func:`join_names` field holds, as they were ([] for an empty field)."""
    return next(csv.reader([field], delimiter=";")) if field else []


def describe_row(row: dict[str, Any]) -> str:
    """A row in words for the CLI's top lists ('' when it names nothing beyond the ids)."""
    if row.get("file"):
        flip = f", trained as {row['label']} (true: {row['true_label']})" if row["label"] != row["true_label"] else f", class {row['label']}"
        return f"{row['file']}{flip}"
    if row.get("classes"):
        # a name holding ", " is shown in quotes, so that the list still reads as its classes
        names = [f'"{n}"' if "," in n else n for n in split_names(row["classes"])]
        return f"classes {', '.join(names)}" + (" (corrupted in the pool)" if row.get("corrupted") == "yes" else "")
    return ""


def file_relabelled(row: dict[str, Any]) -> list[str]:
    """The labels other than its true one that a file row says the file was trained with ([] when none)."""
    return [n for n in split_names(row.get("labels", "")) if n != row.get("true_label")]
