"""Scores traced back to the data: which classes a scored task holds, which file a scored example is.

A scores file ranks pool rows; a user asks which of *their* classes and images those are. Beside every
scores file ``STEM.safetensors`` the CLI writes ``STEM.csv``: one row per scored item, most harmful first,
with its task id (and example), score, the task's classes by name, whether the pool recorded it as
corrupted, and for examples the file (where the dataset knows its files), the label used in training and
the true label. The CLI's top lists print the same descriptions.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes

COLUMNS = ("rank_harmful_first", "task_id", "set", "example", "score", "classes", "corrupted", "file", "label", "true_label")


def _class_name(dataset: Any, c: int) -> str:
    names = getattr(dataset, "class_names", None)
    return str(names[c]) if names is not None and 0 <= c < len(names) else str(c)


def _example_name(dataset: Any, example_id: int) -> str:
    names = getattr(dataset, "example_names", None)
    return str(names[example_id]) if names is not None and 0 <= example_id < len(names) else f"example {example_id}"


def item_rows(result: Any, pool: Any, dataset: Any) -> list[dict[str, Any]]:
    """One row per scored item of ``result`` (most harmful first) described through ``pool`` and ``dataset``
    (None for generated pools, e.g. sinusoid: the rows then carry ids and scores only)."""
    classify = dataset is not None and hasattr(pool, "classes")
    row_of = {int(t): r for r, t in enumerate(pool.task_ids.tolist())} if hasattr(pool, "task_ids") else {}
    which = result.level if result.level in ("support", "query") else ""
    rows = []
    order = result.ranking(harmful_first=True)
    for rank, (item, flat) in enumerate(zip(result.items(order), order.tolist()), 1):
        task = item[0]
        row = {"rank_harmful_first": rank, "task_id": task, "set": which, "example": item[1] if len(item) > 1 else "",
               "score": f"{float(result.scores.reshape(-1)[flat]):.6e}", "classes": "", "corrupted": "", "file": "", "label": "", "true_label": ""}
        r = row_of.get(task)
        if classify and r is not None:
            classes = [int(c) for c in pool.classes[r].tolist()]
            row["classes"] = ";".join(_class_name(dataset, c) for c in classes)
            if which:
                j = item[1]
                ids, used, true, bad = (getattr(pool, f"{which}_{k}") for k in ("ids", "y", "true_y", "corrupted"))
                row["file"] = _example_name(dataset, int(ids[r, j]))
                row["label"] = _class_name(dataset, classes[int(used[r, j])])
                row["true_label"] = _class_name(dataset, classes[int(true[r, j])])
                row["corrupted"] = "yes" if bool(bad[r, j]) else "no"
            else:
                row["corrupted"] = "yes" if bool(pool.corrupted_tasks[r]) else "no"
        rows.append(row)
    return rows


def write_item_table(stem: str | Path, rows: list[dict[str, Any]]) -> Path:
    """``STEM.csv`` (atomic), the columns of :data:`COLUMNS`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_bytes(Path(f"{stem}.csv"), buf.getvalue().encode("utf-8"))


def describe_row(row: dict[str, Any]) -> str:
    """A row in words for the CLI's top lists ('' when it names nothing beyond the ids)."""
    if row.get("file"):
        flip = f", trained as {row['label']} (true: {row['true_label']})" if row["label"] != row["true_label"] else f", class {row['label']}"
        return f"{row['file']}{flip}"
    if row.get("classes"):
        return f"classes {row['classes'].replace(';', ', ')}" + (" (corrupted in the pool)" if row.get("corrupted") == "yes" else "")
    return ""
