"""``metainfluence report RUN``: one run folder (scores files, checkpoints, edits) as report.md/html."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..influence.editing import describe_count
from ..pipeline.describe import read_table, score_key, split_names
from .report import write_report


# instance-IF records its method as LEVEL/HOW; the report says what that means
_METHOD_WORDS = {"support/unrolled": "instance-IF (support examples, differentiated through the unrolled inner steps)",
                 "support/two-stage": "instance-IF (support examples, two-stage: the inner problem's own inverse Hessian)",
                 "query": "instance-IF (query examples)"}

def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _ratio(value: Any) -> str:
    return f"{value:.2g}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def _eval_cell(ev: dict | None) -> str:
    if not ev:
        return "-"
    acc, ci = ev.get("accuracy"), ev.get("accuracy_ci95")
    if acc is None or acc != acc:  # regression: no accuracy
        return f"loss {ev.get('loss', float('nan')):.4f}"
    return f"{100 * acc:.2f}% ± {100 * (ci or 0):.2f}"


def _items_table(csv_path: Path, k: int = 10) -> tuple[list[str], list[dict]] | None:
    """From a scores file's item table (pipeline/describe.py): the k most harmful items by name, and where the pool
    records corrupted items, how many of them rank among as many most harmful ones."""
    rows = read_table(csv_path)
    if not rows:
        return None
    flagged = sum(r["corrupted"] == "yes" for r in rows)
    found = sum(r["corrupted"] == "yes" for r in rows[:flagged])
    text = [f"Every item by name, most harmful first: `{csv_path.name}`."]
    if flagged:
        text.append(f"The pool records {flagged} of the {len(rows)} items as corrupted; {found} of them rank among the {flagged} most "
                    f"harmful (recall {found / flagged:.2f}).")
    files = csv_path.with_name(csv_path.stem + ".files.csv")
    if files.is_file():  # example levels: the files, each one's scores summed over the tasks it appears in
        rows = read_table(files)
        text.append(f"Most harmful files first (`{files.name}`: each file's scores summed over the tasks it appears in).")
        return text, [{**r, "labels": ", ".join(split_names(r["labels"]))} for r in rows[:k]]
    score = score_key(rows[0]) or "score"  # headed by what the score is (describe.score_column)
    keys = [c for c in ("task_id", "example", score, "classes", "file", "label", "true_label", "corrupted") if any(r.get(c) for r in rows[:k])]
    shown = lambda c, v: ", ".join(split_names(v)) if c == "classes" else v  # the names, not their CSV quoting
    return text, [{c: shown(c, r[c]) for c in keys} for r in rows[:k]]


def report_run_folder(run_dir: str | Path) -> Path:
    """Render what a run folder holds: its checkpoints (kind, test accuracy, refine state), every scores
    file (level, method, Hessian, solver residual, stationarity, warnings, most harmful items) and every
    edit (what was removed, accuracy before and after)."""
    d = Path(run_dir)
    files = sorted(p for p in d.glob("*.json") if p.name not in ("settings.json", "summary.json"))
    records = {p.stem: _read(p) for p in files}
    checkpoints = {k: v for k, v in records.items() if v and "metainfluence_record" not in v and v.get("kind") in ("trained", "refined", "edited")}
    checkpoints.update({k: v.get("metainfluence_record", v) for k, v in records.items() if v and isinstance(v.get("metainfluence_record"), dict)})
    scores = {k: v for k, v in records.items() if v and v.get("kind") == "metainfluence.influence"}
    pairwise = {k: v for k, v in records.items() if v and v.get("kind") == "metainfluence.pairwise"}
    if not checkpoints and not scores and not pairwise:
        raise SettingsError(f"{d} holds neither an experiment (results.json) nor a run (checkpoints, scores files); "
                            "pass a folder written by `metainfluence experiment`, `train`, `influence` or `edit`")
    secs: list[dict] = []
    rows = []
    for name, rec in sorted(checkpoints.items()):
        metrics = rec.get("metrics") or {}
        ref = rec.get("refine_report") or {}
        rows.append({"checkpoint": name, "kind": rec.get("kind", "?"), "test": _eval_cell((metrics.get("eval") or {}).get("test")),
                     "‖∇F‖/ḡ₀ (what tol_ratio tests)": _ratio(ref.get("ratio_after_start")),
                     "‖∇F‖ / end mean‖g‖": _ratio(ref.get("ratio_after")),
                     "refine converged": str(ref.get("converged", "-"))})
    if rows:
        secs.append({"heading": "Checkpoints", "tables": [rows]})
    edits = [(n, r) for n, r in sorted(checkpoints.items()) if (r.get("metrics") or {}).get("edit")]
    if edits:
        erows = []
        for name, rec in edits:
            m = rec["metrics"]
            erows.append({"edit": name, "removed": describe_count(m["removed"]) if isinstance(m.get("removed"), dict) else json.dumps(m.get("removed")), "step": m["edit"].get("step", "-"),
                          "hessian": m["edit"].get("hessian", "-"), "residual": f"{m['edit'].get('solver_residual', float('nan')):.1e}",
                          "solve": {True: "converged", False: "STOPPED SHORT"}.get(m["edit"].get("solver_converged"), "-"),
                          "test before": _eval_cell((m.get("eval_before_edit") or {}).get("test")), "test after": _eval_cell((m.get("eval") or {}).get("test")),
                          "removed tasks": ", ".join(map(str, (m.get("removed_tasks") or [])[:10])) + (", …" if len(m.get("removed_tasks") or []) > 10 else "") or "-"})
        secs.append({"heading": "Edits (closed-form removal)", "tables": [erows]})
    for name, rec in sorted(scores.items()):
        diag = rec.get("diagnostics") or {}
        solver = diag.get("solver") or {}
        st = diag.get("stationarity") or {}
        infl = (rec.get("settings") or {}).get("influence") or {}
        num = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else "-"
        paragraphs = [
            f"level {rec.get('level')}, method {_METHOD_WORDS.get(rec.get('method'), rec.get('method'))}, Hessian {infl.get('hessian', '-')}, solver {solver.get('name', '-')} "
            f"(relative residual {num(solver.get('residual'), '.1e')}), damping {infl.get('damping', '-')}; "
            f"measurement f = {num(rec.get('measurement'), '.4f')}; "
            + (f"proximal objective P = F + (γ/2)‖λ − λ₀‖² (γ = {num((diag.get('proximal') or {}).get('gamma'), 'g')}): ‖∇P‖ / mean‖g‖ = "
               f"{num(st.get('ratio'), '.2g')}, F's own ‖∇F‖ / mean‖g‖ = {num((diag.get('stationarity_of_F') or {}).get('ratio'), '.2g')}."
               if diag.get("proximal") else f"‖∇F‖ / mean‖g‖ = {num(st.get('ratio'), '.2g')}."),
        ]
        fid = diag.get("fidelity_check")
        if fid:  # the check the scores carry: re-optimised group removals against the summed scores
            paragraphs.append(f"Fidelity check: {fid.get('removals_done')} removals of {fid.get('group_size')} tasks re-optimised from λ*: Spearman "
                              f"{num(fid.get('spearman'), '.2f')}, relative error {num(fid.get('relative_error'), '.2f')}, sign agreement "
                              f"{num(fid.get('sign_agreement'), '.2f')}.")
        paragraphs += [f"**warning:** {w}" for w in diag.get("warnings", [])]
        if diag.get("coverage"):
            paragraphs.append(f"Coverage: {diag['coverage']}.")
        table = _items_table(d / f"{name}.csv")
        if table:
            paragraphs += table[0]
        secs.append({"heading": f"Scores: {name}", "paragraphs": paragraphs, **({"tables": [table[1]]} if table else {})})
    secs += [_pairwise_section(d, name, rec) for name, rec in sorted(pairwise.items())]
    return write_report(d, f"metainfluence run: {d.name}", secs)


def _pairwise_section(d: Path, name: str, rec: dict[str, Any], k: int = 10) -> dict[str, Any]:
    """A pairwise matrix: what it measures, its solve, and the k pairs (training task, validation task) whose
    removal would raise that task's loss most, i.e. where the training task helps most, and lower it most (harms)."""
    from ..influence.pairwise import PairwiseResult

    diag = rec.get("diagnostics") or {}
    solver = diag.get("solver") or {}
    infl = (rec.get("settings") or {}).get("influence") or {}
    res = PairwiseResult.load(d / name)
    n, m = res.scores.shape
    paragraphs = [rec.get("sign_convention", ""),
                  f"{n} training × {m} validation tasks, measurement {res.measurement}; Hessian {infl.get('hessian', '-')}, solver "
                  f"{solver.get('name', '-')} (relative residual {_ratio(solver.get('residual'))}), damping {infl.get('damping', '-')}.",
                  *[f"**warning:** {w}" for w in diag.get("warnings", [])]]
    flat = res.scores.reshape(-1)
    # for a loss a negative entry is harm; for the margin (higher is better) a positive one
    harm_first = flat.argsort(descending=res.measurement == "margin")[:k].tolist()
    rows = [{"training task": int(res.train_task_ids[i // m]), "validation task": int(res.test_task_ids[i % m]), "score": f"{float(flat[i]):+.4e}"}
            for i in harm_first]
    paragraphs.append(f"The {len(rows)} pairs where the training task harms the validation task most:")
    return {"heading": f"Pairwise: {name}", "paragraphs": paragraphs, "tables": [rows]}
