"""``metainfluence report RUN``: one run folder (scores files, checkpoints, edits) as report.md/html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import SettingsError
from ..influence.editing import describe_count
from .report import write_report


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _eval_cell(ev: dict | None) -> str:
    if not ev:
        return "-"
    acc, ci = ev.get("accuracy"), ev.get("accuracy_ci95")
    if acc is None or acc != acc:  # regression: no accuracy
        return f"loss {ev.get('loss', float('nan')):.4f}"
    return f"{100 * acc:.2f}% ± {100 * (ci or 0):.2f}"


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
    if not checkpoints and not scores:
        raise SettingsError(f"{d} holds neither an experiment (results.json) nor a run (checkpoints, scores files); "
                            "pass a folder written by `metainfluence experiment`, `train`, `influence` or `edit`")
    secs: list[dict] = []
    rows = []
    for name, rec in sorted(checkpoints.items()):
        metrics = rec.get("metrics") or {}
        ref = rec.get("refine_report") or {}
        rows.append({"checkpoint": name, "kind": rec.get("kind", "?"), "test": _eval_cell((metrics.get("eval") or {}).get("test")),
                     "‖∇F‖ / mean‖g‖": f"{ref['ratio_after']:.2g}" if "ratio_after" in ref else "-",
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
                          "test before": _eval_cell((m.get("eval_before_edit") or {}).get("test")), "test after": _eval_cell((m.get("eval") or {}).get("test"))})
        secs.append({"heading": "Edits (closed-form removal)", "tables": [erows]})
    for name, rec in sorted(scores.items()):
        diag = rec.get("diagnostics") or {}
        solver = diag.get("solver") or {}
        st = diag.get("stationarity") or {}
        infl = (rec.get("settings") or {}).get("influence") or {}
        num = lambda v, fmt: format(v, fmt) if isinstance(v, (int, float)) else "-"
        paragraphs = [
            f"level {rec.get('level')}, method {rec.get('method')}, Hessian {infl.get('hessian', '-')}, solver {solver.get('name', '-')} "
            f"(relative residual {num(solver.get('residual'), '.1e')}), damping {infl.get('damping', '-')}; "
            f"measurement f = {num(rec.get('measurement'), '.4f')}; ‖∇F‖ / mean‖g‖ = {num(st.get('ratio'), '.2g')}.",
        ]
        paragraphs += [f"**warning:** {w}" for w in diag.get("warnings", [])]
        secs.append({"heading": f"Scores: {name}", "paragraphs": paragraphs})
    return write_report(d, f"metainfluence run: {d.name}", secs)
