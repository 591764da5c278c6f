"""The evidence experiments' stages (docs/experiments.md): curvature fits reused and charged, resume and
--max-minutes between saved stages, retraining over seeds, and the ground truth's warnings — each on a small
digits run in tmp_path. (Split from test_experiments.py so that the two files run on two test workers.)"""

from __future__ import annotations

import json

import pytest

from helpers import check_report
from metainfluence.experiments import report_run, run_experiment


def test_detection_with_pcg_fits_one_curvature_at_its_lambda_and_reuses_it(tmp_path):
    out = tmp_path / "det_pcg"
    cfg = tmp_path / "pcg.toml"
    cfg.write_text('[influence]\nsolver = "pcg"\n\n[detection]\nmethods = ["task-if", "random"]\nedit_fractions = [0.25]\nself_influence = false\n')
    res = run_experiment("detection", str(cfg), True, str(out), log=lambda s: None)
    assert (out / "curvature.safetensors").exists() and (out / "curvature.json").exists()
    saved = json.loads((out / "results.json").read_text())
    assert saved["timings"]["curvature_fit_s"] > 0
    assert saved["settings"]["influence"]["curvature_file"] == str(out / "curvature")
    rows = {r["method"]: r for r in res["detection"]}
    assert rows["task-if"]["auc"] > 0.5 and len(res["edits"]) >= 1
    # a run folder moved elsewhere resumes its scores: their recorded curvature file is the folder's own, by its old path
    import shutil

    moved = shutil.move(str(out), str(tmp_path / "moved"))
    lines = []
    again = run_experiment("detection", str(cfg), True, moved, log=lines.append, resume=True)
    assert sum("scores resumed" in ln for ln in lines) == 2, lines
    assert again["detection"] == res["detection"]


def test_a_retraining_is_keyed_by_refine_only_when_it_refines():
    """A resumed removal keeps its retrainings when only [refine] changed and they do not refine; a retraining
    that refines, another seed or another removal is recomputed."""
    import dataclasses

    from metainfluence.experiments.removal import _retrain_key
    from metainfluence.experiments.runner import load_experiment_settings

    run, _, _ = load_experiment_settings("removal", None, True)
    other = dataclasses.replace(run, refine=dataclasses.replace(run.refine, dtype="float32", tol_ratio=3e-5))
    assert _retrain_key([1, 2], run, 0, False) == _retrain_key([1, 2], other, 0, False)
    assert _retrain_key([1, 2], run, 0, True) != _retrain_key([1, 2], other, 0, True)
    assert _retrain_key([1, 2], run, 0, False) != _retrain_key([1, 2], run, 1, False)
    assert _retrain_key([1, 2], run, 0, False) != _retrain_key([1, 3], run, 0, False)
    longer = dataclasses.replace(run, train=dataclasses.replace(run.train, steps=run.train.steps + 1))
    assert _retrain_key([1, 2], run, 0, False) != _retrain_key([1, 2], longer, 0, False)


def test_removal_charges_its_curvature_fit_to_the_edits_that_used_it(tmp_path):
    """The edit-vs-retraining ratio counts the run's curvature fit for task-IF (its scores were solved with it)
    and not for random (ranked without it, and its edit solved by plain CG here). The fisher fit makes the per-task
    gradients in its own pass: task-IF's score reads them (charged that pass) and the ratio counts the pass once."""
    out = tmp_path / "rem_pcg"
    cfg = tmp_path / "pcg.toml"
    cfg.write_text('[influence]\nsolver = "pcg"\ncurvature_fit = "fisher"\n\n[removal]\nmethods = ["task-if", "random"]\ninstance_levels = []\n'
                   'retrain_methods = ["task-if", "random"]\nreoptimise_methods = []\nedit_solver = "cg"\n')
    res = run_experiment("removal", str(cfg), True, str(out), log=lambda s: None)
    fit_s = res["timings"]["curvature_fit_s"]
    info = json.loads((out / "curvature.json").read_text())["info"]
    # charged: the fit (its pass made the per-task gradients too, so no floor pass is timed) and its probe check
    assert fit_s == pytest.approx(info["fit_seconds"] + info["probe_seconds"]) and info["probe_seconds"] > 0
    assert info["task_gradients_kept"] and res["timings"]["curvature_floor_s"] is None
    task_if = res["influence_diagnostics"]["task-if"]
    assert task_if["task_gradients_reused_s"] == info["fit_seconds"] and task_if["seconds"] > info["fit_seconds"]
    for m, charged, in_fit in (("task-if", fit_s, info["fit_seconds"]), ("random", 0.0, 0.0)):
        edit, retrain = (next(r for r in res["table"] if r["method"] == m and r["path"] == p) for p in ("edit", "retrain"))
        sp = res["edit_vs_retrain"][m]
        assert sp["curvature_fit_charged_s"] == charged and sp["task_gradients_in_fit_s"] == in_fit
        assert sp["retrain_over_edit"] == pytest.approx(retrain["path_s"] / (edit["total_s"] + charged - in_fit))
    md = check_report(out, ["task-if", "random"])  # the untimed floor (null) is left out of the report's timings
    assert "curvature_fit_s" in md and "curvature_floor_s" not in md
    # resumed after the fit with task-IF's scores lost: the fit is made again so that its pass serves them, and the
    # pass is still counted once; with every score kept, the fit is resumed from its file
    for f in (out / "scores").glob("task-if.*"):
        f.unlink()
    lines: list[str] = []
    again = run_experiment("removal", str(cfg), True, str(out), log=lines.append, resume=True)
    assert any("fitted again" in ln for ln in lines) and not any("resumed: curvature" in ln for ln in lines)
    task_if, info = again["influence_diagnostics"]["task-if"], json.loads((out / "curvature.json").read_text())["info"]
    assert task_if["task_gradients_reused_s"] == info["fit_seconds"] == again["edit_vs_retrain"]["task-if"]["task_gradients_in_fit_s"]
    lines.clear()
    run_experiment("removal", str(cfg), True, str(out), log=lines.append, resume=True)
    assert any("resumed: curvature" in ln for ln in lines) and not any("fitted again" in ln for ln in lines)
    # every kept edit and retraining says that it was read, not computed
    assert sum("resumed: " in ln and "units/" in ln for ln in lines) == len(list((out / "units").glob("*.json")))


def test_detection_ranks_by_exact_and_fast_tiers_of_one_fisher_curvature(tmp_path):
    """curvature_fit = fisher: one fisher-factor file at λ*; task-if is its preconditioned exact tier,
    task-if-fast its inverse applied directly, direct-if falls back to plain CG (the file is of the total H). The fit's
    pass also made the per-task total gradients: every ranking built on them reads them and is charged that pass."""
    out = tmp_path / "det_fast"
    cfg = tmp_path / "fast.toml"
    cfg.write_text('[influence]\nsolver = "pcg"\ncurvature_fit = "fisher"\nfisher_samples = 8\nproducts = "float32"\n\n'
                   '[detection]\nmethods = ["task-if", "task-if-fast", "direct-if", "tracin", "random"]\nedit_fractions = [0.25]\n'
                   'edit_methods = ["task-if"]\n')
    res = run_experiment("detection", str(cfg), True, str(out), log=lambda s: None)
    info = json.loads((out / "curvature.json").read_text())["info"]
    assert info["method"] == "fisher" and info["task_gradients_kept"] and res["timings"]["curvature_floor_s"] is None
    diag = res["influence_diagnostics"]
    for m in ("task-if", "task-if-fast", "tracin"):
        assert diag[m]["task_gradients_reused_s"] == info["fit_seconds"] and diag[m]["seconds"] >= info["fit_seconds"], m
    assert "task_gradients_reused_s" not in diag["direct-if"]  # its gradients ignore dθ/dλ: its own pass
    assert res["measurement_reliability"]["task_gradients_reused_s"] == info["fit_seconds"]
    assert diag["task-if"]["solver"]["name"] == "pcg" and diag["task-if"]["solver"]["residual"] <= 1e-6
    assert diag["task-if-fast"]["solver"]["name"] == "curvature" and diag["direct-if"]["solver"]["name"] == "cg"
    rows = {r["method"]: r for r in res["detection"]}
    assert {"task-if", "task-if-fast", "task-if (self, fisher)"} <= set(rows)
    assert rows["task-if-fast"]["auc"] > 0.5 and abs(rows["task-if-fast"]["auc"] - rows["task-if"]["auc"]) < 0.15
    assert sorted({r["method"] for r in res["edits"]}) == ["oracle (true corrupted)", "task-if"]  # edit_methods: only these edited


def test_detection_resumes_from_the_stages_it_left_and_refuses_other_settings(tmp_path):
    from metainfluence.errors import SettingsError

    out = tmp_path / "det_resume"
    cfg = tmp_path / "r.toml"
    cfg.write_text('[detection]\nmethods = ["task-if", "tracin"]\nedit_fractions = [0.25]\nself_influence = false\n')
    first = run_experiment("detection", str(cfg), True, str(out), log=lambda s: None)
    assert (out / "refined.safetensors").is_file() and (out / "scores" / "task-if.safetensors").is_file()
    lines = []
    again = run_experiment("detection", str(cfg), True, str(out), log=lines.append, resume=True)
    assert any("resumed: refined" in line for line in lines) and any("scores resumed" in line for line in lines)
    assert again["timings"]["reused"] == ["train", "refine"]
    # the same λ* and scores: the tables agree exactly
    assert [r["auc"] for r in again["detection"]] == [r["auc"] for r in first["detection"]]
    assert again["unedited_test"] == first["unedited_test"]
    # other influence settings: the model stages are reused, the scores recomputed
    cfg.write_text('[influence]\ndamping = 1e-2\n[detection]\nmethods = ["task-if", "tracin"]\nedit_fractions = [0.25]\nself_influence = false\n')
    lines.clear()
    third = run_experiment("detection", str(cfg), True, str(out), log=lines.append, resume=True)
    assert any("resumed: refined" in line for line in lines) and not any("scores resumed" in line for line in lines)
    assert third["influence_diagnostics"]["task-if"]["solver"]["damping"] == 1e-2
    # another pool (ρ_task) is another experiment: refused
    cfg.write_text('[detection]\nmethods = ["task-if", "tracin"]\nedit_fractions = [0.25]\nself_influence = false\nrho_task = 0.3\n')
    with pytest.raises(SettingsError, match=r"other settings \(rho_task differ"):
        run_experiment("detection", str(cfg), True, str(out), log=lambda s: None, resume=True)
    # another experiment's folder, or another command's, is refused before any work (it would start afresh over it)
    with pytest.raises(SettingsError, match="stages of a detection experiment, not removal"):
        run_experiment("removal", None, True, str(out), log=lambda s: None, resume=True)
    train_folder = tmp_path / "a_train_run"
    train_folder.mkdir()
    (train_folder / "settings.json").write_text("{}")
    with pytest.raises(SettingsError, match="no experiment stages .*settings.json"):
        run_experiment("detection", str(cfg), True, str(train_folder), log=lambda s: None, resume=True)
    assert sorted(p.name for p in train_folder.iterdir()) == ["settings.json"]  # nothing written into it


def test_max_minutes_stops_between_saved_stages_and_resume_finishes(tmp_path, capsys):
    """--max-minutes: the budget is checked after each saved stage; the CLI says `stopped:` with status 3,
    and --resume continues from the next stage, recomputing none of the finished ones."""
    from metainfluence.cli import main
    from metainfluence.errors import BudgetStop, SettingsError

    out = tmp_path / "det_budget"
    cfg = tmp_path / "b.toml"
    # edit_fractions = []: only the oracle is edited, so the run has no accuracy curve to draw
    cfg.write_text('[detection]\nmethods = ["task-if", "tracin"]\nedit_fractions = []\nself_influence = false\n')
    rc = main(["experiment", "detection", "--config", str(cfg), "--quick", "--out", str(out), "--max-minutes", "1e-9", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 3 and "stopped: experiment stopped by --max-minutes after training and refine" in err and "--resume" in err
    assert (out / "refined.safetensors").is_file() and not (out / "scores").exists() and not (out / "results.json").exists()
    lines = []
    with pytest.raises(BudgetStop, match="after the task-if scores"):
        run_experiment("detection", str(cfg), True, str(out), log=lines.append, resume=True, max_minutes=1e-9)
    assert any("resumed: refined" in line for line in lines) and (out / "scores" / "task-if.safetensors").is_file()
    assert not (out / "scores" / "tracin.safetensors").exists()
    lines.clear()
    res = run_experiment("detection", str(cfg), True, str(out), log=lines.append, resume=True)
    assert any("task-if   scores resumed" in line for line in lines) and not any("tracin    scores resumed" in line for line in lines)
    assert {r["method"] for r in res["detection"]} == {"task-if", "tracin"} and (out / "results.json").is_file()
    # the run's time is its three pieces', not the last one's
    pieces = res["timings"]["pieces_s"]
    assert len(pieces) == 3 and pieces[-1] == res["timings"]["total_s"] and any("3 pieces" in line for line in lines)
    assert [r["method"] for r in res["edits"]] == ["oracle (true corrupted)"] and "accuracy" not in res["figures"]
    assert report_run(out).is_file()
    with pytest.raises(SettingsError, match="applies to the detection, removal and fidelity"):
        run_experiment("estimates", None, True, str(tmp_path / "est"), log=lambda s: None, max_minutes=1.0)
    with pytest.raises(SettingsError, match="--resume applies to the detection, removal and fidelity"):  # as the docs say
        run_experiment("estimates", None, True, str(tmp_path / "est"), log=lambda s: None, resume=True)


def test_removal_retrains_over_seeds_and_places_the_edit_in_their_spread(tmp_path):
    out = tmp_path / "rem_seeds"
    cfg = tmp_path / "s.toml"
    cfg.write_text('[removal]\nmethods = ["task-if", "random"]\ninstance_levels = ["query"]\nretrain_methods = ["task-if"]\n'
                   'reoptimise_methods = ["task-if"]\nretrain_seeds = [0, 1]\nedit_steps = ["reduced", "full"]\nedit_newton_steps = 1\n')
    res = run_experiment("removal", str(cfg), True, str(out), log=lambda s: None)
    # the variants (full-pool H, edit + Newton) for task-IF only, each placed against the seeds' spread
    paths = {m: [r["path"] for r in res["table"] if r["method"] == m and r["path"].startswith("edit")] for m in ("task-if", "random")}
    assert paths == {"task-if": ["edit", "edit (full H)", "edit + 1 Newton"], "random": ["edit"]}
    variants = {r["path"]: r for r in res["table"] if r["method"] == "task-if" and r["path"].startswith("edit")}
    assert variants["edit"]["step"] == "reduced" and variants["edit (full H)"]["step"] == "full"
    assert all("within_retrain_spread" in r for r in variants.values())
    # each variant row is what edit_model gives for that step and Newton count on the removed tasks
    from metainfluence import Removal, edit_model, evaluate
    from metainfluence.config import settings_from_dict
    from metainfluence.influence.results import InfluenceSettings
    from metainfluence.pipeline import RunContext

    ctx, ckpt = RunContext.from_checkpoint(out / "refined", splits=("train", "test"))
    ids = ctx.pools["train"].task_ids.tolist()
    removal = Removal(tasks=[ids.index(i) for i in res["removed_ids"]["task-if"]])
    infl = settings_from_dict(InfluenceSettings, res["settings"]["influence"])
    train, test = (ctx.tensors[k].to(dtype=ckpt.lam.dtype) for k in ("train", "test"))
    for path, step, newton in (("edit", "reduced", 0), ("edit (full H)", "full", 0), ("edit + 1 Newton", "reduced", 1)):
        ed = edit_model(ctx.problem, ckpt.lam, train, removal, infl, newton_steps=newton, step=step)
        assert evaluate(ctx.problem, ed.lam, test).accuracy == pytest.approx(variants[path]["test_acc"][0], abs=1e-12), path
    reopt = next(r for r in res["table"] if r["method"] == "task-if" and r["path"] == "re-optimise from λ*")
    assert reopt["reduced_grad_after_reoptimise"] < reopt["reduced_grad_after_edit"] < reopt["reduced_grad_at_lam_star"]
    # every edit and retraining is a unit kept in the folder: a resumed run recomputes none of them
    lines = []
    again = run_experiment("removal", str(cfg), True, str(out), log=lines.append, resume=True)
    assert again["table"] == res["table"]  # retraining seconds included: reused, not re-measured
    assert len(list((out / "units").glob("*.json"))) == 3 + 1 + 1 + 1 + 2  # task-IF's edits and re-optimisation, random, query, retrains
    assert any("instance-if (query) scores resumed" in line for line in lines)
    # another edit setting recomputes only the rows it changes
    cfg.write_text(cfg.read_text().replace("edit_newton_steps = 1", "edit_newton_steps = 2"))
    third = run_experiment("removal", str(cfg), True, str(out), log=lambda s: None, resume=True)
    assert [r for r in third["table"] if r["path"] == "retrain"] == [r for r in res["table"] if r["path"] == "retrain"]
    assert any(r["path"] == "edit + 2 Newton" for r in third["table"])
    edit = next(r for r in res["table"] if r["method"] == "task-if" and r["path"] == "edit")
    retrain = next(r for r in res["table"] if r["method"] == "task-if" and r["path"] == "retrain")
    accs = retrain["seed_accuracies"]
    assert retrain["seeds"] == [0, 1] and len(accs) == 2 and len(retrain["seed_seconds"]) == 2
    assert retrain["test_acc"][0] == pytest.approx(sum(accs) / 2)
    assert retrain["edit_within_spread"] == (min(accs) <= edit["test_acc"][0] <= max(accs))
    assert retrain["edit_below_mean_points"] == pytest.approx(100 * (sum(accs) / 2 - edit["test_acc"][0]))
    assert accs[0] != accs[1]  # another seed draws other meta-batches: another training path


def test_set_lays_settings_over_a_config_and_bad_ones_are_refused(capsys):
    from pathlib import Path

    from metainfluence.cli import main
    from metainfluence.config import parse_sets
    from metainfluence.errors import SettingsError
    from metainfluence.experiments import load_experiment_settings

    sets = parse_sets(["data.k_shot=5", "influence.solve.max_iter=7", "removal.edit_steps=[\"full\"]", "data.dataset=mnist"])
    assert sets == {"data": {"k_shot": 5, "dataset": "mnist"}, "influence": {"solve": {"max_iter": 7}}, "removal": {"edit_steps": ["full"]}}
    cfg = Path(__file__).parent.parent / "configs" / "removal_omniglot_conv4.toml"
    run, infl, sec = load_experiment_settings("removal", str(cfg), False, sets)
    assert (run.data.k_shot, run.data.dataset, infl.solve.max_iter, sec.edit_steps) == (5, "mnist", 7, ("full",))
    assert run.model.width == 16 and infl.solver == "pcg"  # the rest from the file
    with pytest.raises(SettingsError, match="SECTION.KEY=VALUE"):
        parse_sets(["k_shot=5"])
    with pytest.raises(SettingsError, match="unknown"):
        load_experiment_settings("removal", None, True, parse_sets(["removal.no_such_key=1"]))
    with pytest.raises(SettingsError, match="edit_steps"):
        load_experiment_settings("removal", None, True, parse_sets(["removal.edit_steps=[\"sideways\"]"]))
    # a misspelt --set over a config file is the flag's mistake, not the file's
    with pytest.raises(SettingsError, match=r"^--set: unknown setting 'no_such_key'"):
        load_experiment_settings("removal", str(cfg), False, parse_sets(["removal.no_such_key=1"]))
    # a config file without the experiment's section runs its defaults: said aloud
    plain = Path(__file__).parent.parent / "configs" / "mnist_conv4.toml"
    with pytest.warns(UserWarning, match=r"has no \[removal\] section"):
        load_experiment_settings("removal", str(plain), False)
    assert main(["experiment", "removal", "--quick", "--set", "data.k_shot", "--out", "/nonexistent/x"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err


def test_detection_warns_when_its_leave_one_out_ground_truth_stops_above_tolerance(tmp_path):
    """An unconverged ground truth is said aloud: a warning in the results, the log and the report."""
    out = tmp_path / "det_loo"
    cfg = tmp_path / "loo.toml"
    cfg.write_text('[detection]\nmethods = ["task-if", "random"]\nedit_fractions = []\nself_influence = false\n'
                   'loo_tasks = 4\nloo_max_iter = 2\nloo_tol_ratio = 1e-9\n')
    lines = []
    res = run_experiment("detection", str(cfg), True, str(out), log=lines.append)
    gt = res["ground_truth"]
    assert len(gt["tasks"]) == 4 and sum(gt["corrupted"]) == 2
    assert gt["max_ratio"] > 2e-9 and gt["warnings"] and "loo_max_iter" in gt["warnings"][0]
    assert any(ln.startswith("warning: leave-one-out") for ln in lines)
    assert "**warning:** leave-one-out" in report_run(out).read_text()


def test_detection_warns_before_float32_leave_one_out_that_cannot_reach_its_tolerance(tmp_path):
    """A float32 refine that stopped above loo_tol_ratio says, before the re-optimisations start, that float32
    ones will not get there and names loo_dtype; with loo_dtype = float64 (same λ*, resumed) they run in float64."""
    out = tmp_path / "det_loo32"
    cfg = tmp_path / "loo32.toml"
    # a small digits run (as --quick's, which keeps its own [refine]), refined in float32
    base = ('[data]\ndataset = "digits"\nn_way = 5\nk_shot = 1\nq_query = 5\ntrain_tasks = 40\nval_tasks = 20\ntest_tasks = 50\n'
            '[model]\nhidden = [16]\nactivation = "tanh"\n[objective]\nweight_decay = 1e-2\n'
            '[train]\nmeta_batch = 10\nsteps = 100\nlr = 5e-3\ncheckpoint_every = 0\n[refine]\ndtype = "float32"\nmax_iter = 50\n'
            '[detection]\nmethods = ["task-if", "random"]\nedit_fractions = []\nself_influence = false\n'
            'reliability_splits = 0\nloo_tasks = 2\nloo_max_iter = 2\nloo_tol_ratio = 1e-9\n')
    cfg.write_text(base)
    lines = []
    res = run_experiment("detection", str(cfg), False, str(out), log=lines.append)
    gt = res["ground_truth"]
    assert res["refine"]["ratio_after"] > 1e-9 and gt["dtype"] == "float32"
    first = next(i for i, ln in enumerate(lines) if "float32 refine stopped" in ln)
    assert "loo_dtype" in lines[first] and first < next(i for i, ln in enumerate(lines) if ln.startswith("  on the sample"))
    assert any("float32 refine stopped" in w for w in gt["warnings"])
    cfg.write_text(base + 'loo_dtype = "float64"\n')
    lines = []
    res64 = run_experiment("detection", str(cfg), False, str(out), log=lines.append, resume=True)
    gt64 = res64["ground_truth"]
    assert gt64["dtype"] == "float64" and not any("float32 refine stopped" in w for w in gt64["warnings"])
    assert res64["refine"]["ratio_after"] == res["refine"]["ratio_after"]  # the same λ*, resumed
