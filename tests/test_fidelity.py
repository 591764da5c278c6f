"""The fidelity experiment (docs/experiments.md, "Fidelity"): leave-one-out and group removals of a real
run re-optimised for real under the proximal objective anchored at the trained λ, against each method."""

from __future__ import annotations

import pytest

from metainfluence.experiments import report_run, run_experiment
from metainfluence.experiments.runner import load_experiment_settings
from metainfluence.errors import SettingsError


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    return out, run_experiment("fidelity", None, True, str(out), log=lambda s: None)


def test_lambda_star_is_the_proximal_minimiser_and_the_control_stays_there(quick):
    _, res = quick
    assert res["proximal"] > 0 and res["refine"]["ratio_after"] <= res["settings"]["fidelity"]["tol_ratio"]
    assert 0 < res["lambda_move"] < 0.5  # λ* moved from λ_t, but stays near it
    # the full-pool control re-optimisation from λ* (same objective, same anchor) does not move f
    assert abs(res["ground_truth"]["f_control"] - res["f_star"]) < 1e-6 * res["f_star"]
    assert len(res["ground_truth"]["loo_tasks"]) == 12 and len(res["ground_truth"]["groups_true_f"]) == 8


def test_task_if_with_the_exact_hessian_predicts_the_proximal_response(quick):
    _, res = quick
    rows = {r["method"]: r for r in res["table"]}
    exact = rows["task-if (exact)"]
    # damped by γ, task-IF is the proximal objective's own derivative: ranks and sizes match re-optimisation
    assert exact["spearman_loo"] >= 0.8 and exact["spearman_groups"] >= 0.7
    assert 0.7 < exact["size_ratio"] < 1.3
    for base in ("direct-if", "loss", "random"):
        assert exact["spearman_loo"] > rows[base]["spearman_loo"], base
    assert rows["task-if (gauss-newton)"]["spearman_loo"] > rows["random"]["spearman_loo"]
    assert all(r["reoptimisation_over_score"] > 0 for r in res["table"])


def test_fidelity_resumes_without_recomputing_and_renders(quick, tmp_path):
    out, res = quick
    again = run_experiment("fidelity", None, True, str(out), log=lambda s: None, resume=True)
    assert again["timings"]["reused"] == ["train", "refine"]
    for a, b in zip(res["table"], again["table"]):
        assert a["method"] == b["method"] and a["spearman_loo"] == b["spearman_loo"]
    md = report_run(out).read_text()
    assert "proximal objective" in md and "task-if (exact)" in md and "spearman_groups" in md
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_fidelity_refuses_bad_settings(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[fidelity]\nhessians = [\"hessian-free\"]\n")
    with pytest.raises(SettingsError, match="hessians"):
        load_experiment_settings("fidelity", str(cfg), quick=True)
    cfg.write_text("[fidelity]\ngroup_fraction = 1.5\n")
    with pytest.raises(SettingsError, match="group_fraction"):
        load_experiment_settings("fidelity", str(cfg), quick=True)


def test_max_minutes_cuts_fidelity_into_pieces_that_resume_to_the_same_table(quick, tmp_path):
    from metainfluence.errors import BudgetStop

    _, full = quick
    out, stops = tmp_path / "pieces", []
    for _ in range(30):
        try:
            res = run_experiment("fidelity", None, True, str(out), log=lambda s: None, resume=bool(stops), max_minutes=1e-9)
            break
        except BudgetStop as exc:
            stops.append(str(exc))
    assert any("proximal refine" in s for s in stops) and any("ground truth" in s for s in stops) and len(stops) >= 4
    assert [r["spearman_loo"] for r in res["table"]] == [r["spearman_loo"] for r in full["table"]]


def test_a_run_recorded_before_a_settings_field_existed_still_resumes(quick, tmp_path):
    """An experiment folder written by a version without a field added since (at its default) resumes:
    neither the stage record nor the ground-truth manifests count the missing default as a difference."""
    import hashlib
    import json
    import shutil

    out, res = quick
    old = tmp_path / "old"
    shutil.copytree(out, old)
    stages = json.loads((old / "stages.json").read_text())
    del stages["run"]["refine"]["proximal"]  # as written before refine.proximal existed
    (old / "stages.json").write_text(json.dumps(stages))
    for d in ("groundtruth_loo", "groundtruth_groups"):
        m = json.loads((old / d / "manifest.json").read_text())
        del m["settings"]["refine"]["proximal"]
        m["key"] = hashlib.sha256(json.dumps(m["settings"], sort_keys=True, default=str).encode()).hexdigest()[:16]
        (old / d / "manifest.json").write_text(json.dumps(m))
    again = run_experiment("fidelity", None, True, str(old), log=lambda s: None, resume=True)
    assert again["timings"]["loo_s"] < 0.5 * res["timings"]["loo_s"] + 0.05  # units reused, not re-optimised
    assert [r["spearman_loo"] for r in again["table"]] == [r["spearman_loo"] for r in res["table"]]
    stages["run"]["refine"]["proximal"] = 0.5  # a real difference is still refused
    (old / "stages.json").write_text(json.dumps(stages))
    with pytest.raises(SettingsError, match=r"other settings \(run\.refine\.proximal differ"):
        run_experiment("fidelity", None, True, str(old), log=lambda s: None, resume=True)
