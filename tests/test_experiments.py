"""The evidence experiments' --quick variants (SPEC §8, §9): run each in tmp_path and check the
content of its results and that its report renders with the figures embedded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from metainfluence.evaluation.experiments import METHODS, report_run, run_experiment
from metainfluence.influence.results import SIGN_CONVENTION


def _check_report(out, names):
    md_path = report_run(out)
    md = md_path.read_text()
    html = (out / "report.html").read_text()
    for name in names:
        assert name in md, name
    assert "data:image/png;base64," in html
    assert "harms" in md  # sign convention stated
    return md


@pytest.mark.slow
def test_detection_quick(tmp_path):
    out = tmp_path / "det"
    res = run_experiment("detection", None, True, str(out), log=lambda s: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["sign_convention"] == SIGN_CONVENTION and saved["seeds"]["train_seed"] == 0
    assert saved["n_corrupted"] == round(0.2 * saved["n_tasks"])
    rows = {r["method"]: r for r in res["detection"]}
    assert set(METHODS) <= set(rows)
    for m, c in res["recall_curves"].items():
        rec = np.asarray(c["recall"])
        assert np.all(np.diff(rec) >= 0) and rec.min() >= 0 and rec[-1] == 1.0 and rec[0] == 0.0, m
    assert rows["task-if"]["recall@1.25rho"] >= rows["random"]["recall@1.25rho"]
    assert rows["task-if"]["auc"] > 0.5
    for r in res["edits"]:
        acc, ci = r["test_acc"]
        assert 0 <= acc <= 1 and 0 < ci < 0.2
    assert {"recall", "accuracy", "harmful_tasks"} <= set(res["figures"])
    _check_report(out, [*METHODS, "task-if (self, fisher)", "oracle"])


@pytest.mark.slow
def test_removal_quick(tmp_path):
    out = tmp_path / "rem"
    res = run_experiment("removal", None, True, str(out), log=lambda s: None)
    rows = res["table"]
    assert {r["method"] for r in rows if r["path"] == "edit"} == set(METHODS)
    for r in rows:
        acc, ci = r["test_acc"]
        assert 0 <= acc <= 1 and 0 < ci < 0.2
        assert r["removed"] in (0, res["removed_per_method"])
    edit = next(r for r in rows if r["method"] == "task-if" and r["path"] == "edit")
    retrain = next(r for r in rows if r["method"] == "task-if" and r["path"] == "retrain")
    assert edit["path_s"] < retrain["path_s"]
    assert res["removed_per_method"] == round(0.4 * res["n_tasks"])
    md = _check_report(out, [*METHODS, "retrain", "EK-FAC IF"])
    assert "0.7804" in md  # the paper's task-IF Omniglot accuracy beside the measured table


@pytest.mark.slow
def test_estimates_quick(tmp_path):
    out = tmp_path / "est"
    res = run_experiment("estimates", None, True, str(out), log=lambda s: None)
    rows = [r for r in res["correlations"] if "spearman" in r]
    get = lambda m, h, s: next(r for r in rows if r["method"] == m and r["hessian"] == h and r["solver"] == s)
    exact = get("task-if", "exact", "explicit")
    assert exact["spearman"] >= 0.6
    assert exact["spearman"] > get("direct-if", "direct", "explicit")["spearman"]
    assert exact["spearman"] > get("tracin", "-", "-")["spearman"]
    assert abs(get("task-if", "exact", "cg")["spearman"] - exact["spearman"]) < 0.05  # solver agrees with the explicit solve
    ops = {r["hessian"]: r for r in res["operator_error"]}
    assert ops["exact"]["rel_fro_error"] == 0.0 and ops["gamma"]["rel_fro_error"] > 0
    # Neumann converges to the explicit solve as the depth grows (at the largest damping)
    d = max(r["damping"] for r in res["neumann_damping_ablation"])
    errs = [r["rel_score_error"] for r in res["neumann_damping_ablation"] if r["solver"] == "neumann" and r["damping"] == d]
    assert errs[-1] <= errs[0]
    _check_report(out, ["task-if", "direct-if", "tracin", "gamma", "Neumann"])
