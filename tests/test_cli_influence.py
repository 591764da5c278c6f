"""The influence and edit commands end to end on the embedded digits data (small pools)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from metainfluence.cli import main
from metainfluence.errors import CheckpointError
from metainfluence.influence.results import InfluenceResult

SMALL = ["--train-tasks", "60", "--val-tasks", "30", "--test-tasks", "60", "--steps", "300", "--meta-batch", "16",
         "--corrupt-tasks", "0.2", "--weight-decay", "0.05", "--no-progress", "--threads", "1"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), *SMALL]) == 0
    return out


def test_demo_finds_the_mislabeled_tasks_and_the_edit_helps(demo_run):
    summary = json.loads((demo_run / "summary.json").read_text())
    inf = summary["influence"]
    assert inf["n_corrupted"] == 12
    # random inspection of 20% of the pool finds 20% of the corrupted tasks on average
    assert inf["recall_at_corrupted_fraction"] >= 0.6
    assert inf["auc"] > 0.8
    assert inf["eval_after_edit"]["val"]["loss"] < inf["eval_before_edit"]["val"]["loss"]
    # the measurement's reliability (method §5.1) is in the summary and the scores file, a warning there when below 0.9
    m = inf["measurement_reliability"]
    assert (m["splits"], m["n_val_tasks"]) == (2, 30) and -1 <= m["reliability"] <= 1 and m["halves_from_scoring_pass"]
    diag = json.loads((demo_run / "task_influence.json").read_text())["diagnostics"]
    assert diag["measurement_reliability"]["reliability"] == m["reliability"]
    assert any("split-half reliability" in w for w in diag.get("warnings", [])) == (m["reliability"] < 0.9)
    # beside the scores, every task by its digit classes, with the pool's corruption record: the demo's recall read from it
    import csv
    with open(demo_run / "task_influence.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 60 and all(set(r["classes"].split(";")) <= set("0123456789") for r in rows)
    assert sum(r["corrupted"] == "yes" for r in rows) == 12
    assert sum(r["corrupted"] == "yes" for r in rows[:inf["removed_tasks"]]) == inf["removed_corrupted"]


def test_influence_command_writes_documented_scores(demo_run, capsys):
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--hessian", "gauss-newton", "--name", "gn", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "HARMS" in printed and "most harmful" in printed
    info = json.loads((demo_run / "gn.json").read_text())
    assert "score > 0" in info["sign_convention"]
    assert info["diagnostics"]["solver"]["residual"] < 1e-5
    res = InfluenceResult.load(demo_run / "gn")
    assert res.scores.shape == (60,)
    assert torch.equal(res.task_ids, torch.arange(60))
    # the Gauss–Newton ranking agrees with the exact one the demo wrote, on the whole pool
    exact = InfluenceResult.load(demo_run / "task_influence")
    from metainfluence.evaluation.metrics import spearman

    assert spearman(res.scores, exact.scores) > 0.8


def test_a_baseline_says_what_its_scores_are_in_print_csv_and_json(demo_run, capsys):
    """The loss baseline predicts no change: the printout, the scores file and the table's score column say what its
    numbers are instead, and a scores file whose sign convention was deleted is refused as damaged."""
    import csv

    from metainfluence.influence.results import BASELINE_MEANINGS

    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--method", "loss", "--name", "lossb", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert BASELINE_MEANINGS["loss"][0] in printed and "score = predicted change" not in printed
    with open(demo_run / "lossb.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert header[4] == "minus_query_loss"
    with open(demo_run / "task_influence.csv", newline="") as fh:
        assert next(csv.reader(fh))[4] == "val_loss_change_if_removed"
    info = json.loads((demo_run / "lossb.json").read_text())
    del info["sign_convention"]
    (demo_run / "lossb.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="lacks sign_convention"):
        InfluenceResult.load(demo_run / "lossb")


def test_edit_command_removes_the_top_k_and_records_it(demo_run, capsys):
    assert main(["edit", "--checkpoint", str(demo_run / "refined"), "--scores", str(demo_run / "task_influence"), "--top-k", "12",
                 "--name", "ed", "--threads", "1"]) == 0
    info = json.loads((demo_run / "ed.json").read_text())
    exact = InfluenceResult.load(demo_run / "task_influence")
    expected = sorted(exact.ranking()[:12].tolist())
    assert sorted(info["metrics"]["removed_tasks"]) == expected
    # the recorded test accuracy is the edited λ's: evaluating the written checkpoint gives it again
    assert main(["evaluate", "--checkpoint", str(demo_run / "ed"), "--json", str(demo_run / "ed_eval.json"), "--threads", "1"]) == 0
    again = json.loads((demo_run / "ed_eval.json").read_text())
    assert again["accuracy"] == pytest.approx(info["metrics"]["eval"]["test"]["accuracy"], abs=1e-12)
    assert info["metrics"]["eval"]["test"]["accuracy"] != info["metrics"]["eval_before_edit"]["test"]["accuracy"] or \
        info["metrics"]["eval"]["test"]["loss"] != info["metrics"]["eval_before_edit"]["test"]["loss"]


def test_an_example_edit_records_which_examples_and_from_what(demo_run, capsys):
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--level", "support", "--hessian", "gauss-newton",
                 "--name", "sup", "--threads", "1"]) == 0
    assert main(["edit", "--checkpoint", str(demo_run / "refined"), "--scores", str(demo_run / "sup"), "--top-k", "5",
                 "--name", "ed_sup", "--threads", "1"]) == 0
    metrics = json.loads((demo_run / "ed_sup.json").read_text())["metrics"]
    scores = InfluenceResult.load(demo_run / "sup")
    assert sorted(map(tuple, metrics["removed_support_examples"])) == sorted(scores.items(scores.ranking()[:5]))
    assert metrics["removed_by"] == {"scores": str(demo_run / "sup"), "top_k": 5} and metrics["removed_tasks"] == []
    assert (demo_run / "sup.files.csv").is_file()  # digits know no file names: the files table names examples by id


def test_edit_refuses_a_scores_file_of_another_pool(demo_run, tmp_path, capsys):
    other = tmp_path / "other"
    assert main(["demo", "--out", str(other), *SMALL, "--pool-seed", "1", "--skip-influence"]) == 0
    code = main(["edit", "--checkpoint", str(other / "refined"), "--scores", str(demo_run / "task_influence"), "--top-k", "3"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another task pool" in err[0]


def test_one_config_file_serves_influence_and_edit(demo_run, tmp_path, capsys):
    # the same file a run and an experiment use: influence and edit take [influence] (main ignored it)
    cfg = tmp_path / "all.toml"
    cfg.write_text('[data]\ndataset = "digits"\n[train]\nsteps = 10\n[influence]\nhessian = "gauss-newton"\ndamping = 0.05\n'
                   '[influence.solve]\nmax_iter = 7\n[removal]\nfraction = 0.3\n')
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--config", str(cfg), "--name", "cfg", "--threads", "1"]) == 0
    ran = json.loads((demo_run / "cfg.json").read_text())["settings"]["influence"]
    assert ran["damping"] == 0.05 and ran["hessian"] == "gauss-newton" and ran["solve"]["max_iter"] == 7
    # flags still win over the file
    assert main(["edit", "--checkpoint", str(demo_run / "refined"), "--config", str(cfg), "--remove-tasks", "3",
                 "--damping", "0.1", "--name", "cfg_ed", "--threads", "1"]) == 0
    metrics = json.loads((demo_run / "cfg_ed.json").read_text())["metrics"]
    assert metrics["edit"]["hessian"] == "gauss-newton" and metrics["edit"]["step"] == "reduced"
    assert metrics["edit_settings"]["influence"]["damping"] == 0.1 and metrics["edit_settings"]["influence"]["solve"]["max_iter"] == 7
    capsys.readouterr()
    bad = tmp_path / "bad.toml"
    bad.write_text('[influnce]\ndamping = 0.05\n')
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown section 'influnce'" in err and "influence" in err.split("sections are")[1]


def test_report_renders_a_run_folder(demo_run, capsys):
    assert main(["report", str(demo_run)]) == 0
    md = (demo_run / "report.md").read_text()
    assert "## Checkpoints" in md and "| refined | refined |" in md
    assert "| ed | 12 tasks |" in md  # the edit's removal in words (the edit test above wrote it)
    assert "| edited | 12 tasks | reduced | gauss-newton |" in md  # the demo's own edit, recorded as `edit` records one
    assert "## Scores: task_influence" in md and "Hessian exact" in md or "Hessian gauss-newton" in md
    assert (demo_run / "report.html").is_file()
    # the scores' items by name, and how many of the pool's corrupted tasks rank among as many most harmful ones
    summary = json.loads((demo_run / "summary.json").read_text())["influence"]
    assert "most harmful first: `task_influence.csv`" in md
    items = md.split("most harmful first: `task_influence.csv`")[1]
    assert "| task_id | val_loss_change_if_removed | classes |" in items.split("##")[0]  # the column named for what it holds
    assert f"records 12 of the 60 items as corrupted; {round(summary['recall_at_corrupted_fraction'] * 12)} of them" in md


def test_influence_check_reoptimises_groups_and_records_the_fidelity(demo_run, capsys):
    from metainfluence.evaluation.groundtruth import validation_loss
    from metainfluence.meta.refine import refine
    from metainfluence.pipeline import RunContext

    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--hessian", "gauss-newton", "--name", "chk",
                 "--check", "3", "--check-fraction", "0.2", "--threads", "1"]) == 0
    assert "fidelity check (3 removals of 12 tasks" in capsys.readouterr().out
    fc = json.loads((demo_run / "chk.json").read_text())["diagnostics"]["fidelity_check"]
    scores = InfluenceResult.load(demo_run / "chk").scores
    group = fc["groups"][0]
    assert fc["predicted"][0] == pytest.approx(float(scores[group].sum()), rel=1e-12)
    # the actual change, recomputed here: re-optimise with and without the group from λ*
    ctx, ckpt = RunContext.from_checkpoint(demo_run / "refined", splits=("train", "val"))
    lam, train, val = ckpt.lam.double(), ctx.tensors["train"].to(dtype=torch.float64), ctx.tensors["val"].to(dtype=torch.float64)
    settings = ctx.settings.refine
    w = torch.ones(len(train), dtype=torch.float64)
    w[group] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the demo's refine budget, as in the check
        full, _ = refine(ctx.problem, lam, train, settings)
        reduced, _ = refine(ctx.problem, lam, train, settings, w=w)
    actual = validation_loss(ctx.problem, reduced, val) - validation_loss(ctx.problem, full, val)
    assert fc["actual"][0] == pytest.approx(actual, rel=1e-6, abs=1e-12)
    warned = json.loads((demo_run / "chk.json").read_text())["diagnostics"].get("warnings", [])
    assert len(fc["groups"]) == fc["removals_done"] == 3 and not any("too few for a Spearman" in w for w in warned)
    # the sizes judged apart from the order: a relative error above 0.5 is said aloud, whatever the Spearman
    p, a = torch.tensor(fc["predicted"], dtype=torch.float64), torch.tensor(fc["actual"], dtype=torch.float64)
    rel = (p - a).norm() / a.norm()
    assert fc["relative_error"] == pytest.approx(float(rel), rel=1e-12)
    assert any("read the scores as a ranking" in w for w in warned) == (fc["relative_error"] > 0.5)


def test_influence_check_with_too_few_groups_says_so(demo_run, capsys):
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--hessian", "gauss-newton", "--name", "chk2",
                 "--check", "2", "--check-fraction", "0.2", "--threads", "1"]) == 0
    assert "re-optimised 2 of 2 groups, too few for a Spearman (it needs 3); ask for --check 3 or more" in capsys.readouterr().err
    warned = json.loads((demo_run / "chk2.json").read_text())["diagnostics"]["warnings"]
    assert any("too few for a Spearman" in w for w in warned) and not any("track re-optimisation weakly" in w for w in warned)
    # --check at another level is refused before any scoring
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--level", "support", "--check", "3", "--name", "chk3"]) == 2
    assert "use it with --level task" in capsys.readouterr().err and not (demo_run / "chk3.json").exists()


def test_influence_pairwise_writes_the_train_by_val_matrix(demo_run, capsys):
    from metainfluence.influence.pairwise import PairwiseResult

    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--level", "pairwise", "--hessian", "gauss-newton",
                 "--rhs-chunk", "15", "--cg-block", "15", "--name", "pw", "--threads", "1"]) == 0
    assert "60 training × 30 validation tasks" in capsys.readouterr().out
    res = PairwiseResult.load(demo_run / "pw")
    assert res.scores.shape == (60, 30) and torch.equal(res.train_task_ids, torch.arange(60))
    # linearity: the mean over validation tasks is the task-level score against the validation pool
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--hessian", "gauss-newton", "--name", "pw_task", "--threads", "1"]) == 0
    task = InfluenceResult.load(demo_run / "pw_task")
    torch.testing.assert_close(res.scores.mean(1), task.scores, rtol=1e-3, atol=1e-4 * float(task.scores.abs().max()))
    info = json.loads((demo_run / "pw.json").read_text())
    assert len(info["diagnostics"]["solver"]["residuals"]) == 30
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--measurement", "margin"]) == 2
    assert "pairwise only" in capsys.readouterr().err
    # without --name, the margin matrix gets a name of its own (it overwrote the loss matrix's)
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--level", "pairwise", "--measurement", "margin", "--hessian",
                 "gauss-newton", "--rhs-chunk", "15", "--cg-block", "15", "--threads", "1"]) == 0
    assert (demo_run / "influence_pairwise_task-if_margin.json").is_file() and not (demo_run / "influence_pairwise_task-if.json").exists()
    # an edit of a pairwise matrix names what it is
    assert main(["edit", "--checkpoint", str(demo_run / "refined"), "--scores", str(demo_run / "pw"), "--top-k", "3", "--out", str(demo_run / "pw_edit")]) == 2
    assert "pairwise" in capsys.readouterr().err
    # the run's report shows the matrices: the most harmful pair of the loss matrix is its most negative entry
    assert main(["report", str(demo_run)]) == 0
    md = (demo_run / "report.md").read_text()
    assert "## Pairwise: pw" in md and "## Pairwise: influence_pairwise_task-if_margin" in md and "60 training × 30 validation tasks" in md
    k, j = divmod(int(res.scores.argmin()), 30)
    section = md.split("## Pairwise: pw")[1]
    assert f"| {int(res.train_task_ids[k])} | {int(res.test_task_ids[j])} | {float(res.scores[k, j]):+.4e} |" in section.split("##")[0]


def test_influence_time_budget_says_so_and_resume_continues_to_the_full_answer(demo_run, capsys):
    base = ["influence", "--checkpoint", str(demo_run / "refined"), "--hessian", "gauss-newton", "--threads", "1", "--tol", "1e-9"]
    assert main([*base, "--name", "full"]) == 0
    full = InfluenceResult.load(demo_run / "full")
    # a budget that runs out at once: unconverged, said aloud (one line on stderr) with the way to continue
    capsys.readouterr()
    assert main([*base, "--max-minutes", "1e-9", "--name", "cut"]) == 3  # written, approximate: status 3 as a time-limited train
    err = capsys.readouterr().err
    assert "warning:" in err and "--max-minutes budget" in err and "--resume" in err
    assert err.strip().splitlines()[-1].startswith("stopped: the solve reached its --max-minutes") and f"--resume {demo_run / 'cut'}" in err
    cut = json.loads((demo_run / "cut.json").read_text())["diagnostics"]
    assert cut["solver"]["stopped_by"] == "time" and not cut["solver"]["converged"] and "--resume" in " ".join(cut["warnings"])
    # three iterations, then continued from that iterate: the full answer, in fewer new iterations
    assert main([*base, "--max-iter", "3", "--name", "part"]) == 0
    assert main([*base, "--resume", str(demo_run / "part"), "--name", "resumed"]) == 0
    resumed = InfluenceResult.load(demo_run / "resumed")
    solver = resumed.diagnostics["solver"]
    assert solver["converged"] and solver["residual"] <= 1e-8
    assert solver["warm_start"]["residual_before"] < 1.0
    assert solver["iterations"] < full.diagnostics["solver"]["iterations"]
    assert resumed.diagnostics["resumed_from"] == str(demo_run / "part")
    torch.testing.assert_close(resumed.scores, full.scores, rtol=1e-6, atol=1e-9 * float(full.scores.abs().max()))
    # a resume of another level or method is refused
    capsys.readouterr()
    assert main([*base, "--resume", str(demo_run / "part"), "--method", "tracin", "--name", "x"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main([*base, "--resume", str(demo_run / "part"), "--level", "query", "--name", "x"]) == 2
    assert "this run asks for --level query" in capsys.readouterr().err  # the level asked for is what is wrong, not the file
    # the file's own settings are what is continued (no flags repeated), and another damping is refused, not obeyed
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--resume", str(demo_run / "part"), "--name", "bare", "--threads", "1"]) == 0
    assert json.loads((demo_run / "bare.json").read_text())["settings"]["influence"]["hessian"] == "gauss-newton"
    assert main([*base, "--resume", str(demo_run / "part"), "--damping", "0.01", "--name", "x"]) == 2
    assert "answers another question: damping 0.001 (asked: 0.01)" in capsys.readouterr().err
    assert main([*base, "--resume", str(demo_run / "full"), "--solver", "woodbury", "--hessian", "fisher", "--name", "x"]) == 2


def test_influence_check_measurement_records_the_reliability_of_the_ranking(demo_run, capsys):
    """--check-measurement K splits the validation pool K times: the recorded split-half correlation is that
    of task-IF scored against each half as its own validation pool (computed here directly), a low
    reliability is a warning in the file with the pool size that would reach 0.9, and other levels are
    refused before any scoring."""
    from metainfluence.config import settings_from_dict
    from metainfluence.influence.reliability import halvings
    from metainfluence.influence.results import InfluenceSettings
    from metainfluence.influence.task_if import task_influence
    from metainfluence.pipeline import RunContext

    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--hessian", "gauss-newton", "--name", "meas",
                 "--check-measurement", "3", "--threads", "1"]) == 0
    assert "measurement: reliability" in capsys.readouterr().out
    saved = json.loads((demo_run / "meas.json").read_text())
    rel = saved["diagnostics"]["measurement_reliability"]
    ctx, ckpt = RunContext.from_checkpoint(demo_run / "refined", splits=("train", "val"))
    assert rel["splits"] == 3 and rel["n_val_tasks"] == len(ctx.tensors["val"]) and -1 <= rel["reliability"] <= 1
    assert rel["halves_from_scoring_pass"]  # the halves' ∇f summed in the scores' own validation pass
    said = [w for w in saved["diagnostics"].get("warnings", []) if "split-half reliability" in w]
    assert bool(said) == (rel["reliability"] < 0.9) and (not said or f"about {rel['val_tasks_for_target']} validation tasks" in said[0])
    used = settings_from_dict(InfluenceSettings, InfluenceResult.load(demo_run / "meas").settings["influence"])
    train, val = ctx.tensors["train"].to(dtype=torch.float64), ctx.tensors["val"].to(dtype=torch.float64)
    a, b = halvings(len(val), 3, seed=0)[0]
    halves = [task_influence(ctx.problem, ckpt.lam.double(), train, val.subset(part), used).scores.double() for part in (a, b)]
    assert rel["split_half_pearson"][0] == pytest.approx(float(torch.corrcoef(torch.stack(halves))[0, 1]), abs=1e-4)
    for bad in (["--method", "tracin", "--check-measurement", "2"], ["--check-measurement", "-1"]):
        assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--name", "meas2", *bad]) == 2
        assert "task-level task-if" in capsys.readouterr().err
    assert not (demo_run / "meas2.json").exists()


def test_edit_of_a_scores_file_inverts_the_hessian_those_scores_used(demo_run, capsys):
    # scores by the fisher Hessian's exact inverse: the edit of their top items takes the same Hessian and solver unless told otherwise
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--hessian", "fisher", "--solver", "woodbury", "--damping", "0.02",
                 "--name", "fi", "--threads", "1"]) == 0
    assert main(["edit", "--checkpoint", str(demo_run / "refined"), "--scores", str(demo_run / "fi"), "--top-k", "5", "--name", "fi_ed",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "edit: reduced step removing 5 tasks (" in printed and "), fisher Hessian, solver woodbury, damping 0.02" in printed
    assert "removed 5 tasks in closed form" in printed
    assert "edit: --hessian fisher --solver woodbury (the scores file's, unless" in printed  # said before the edit runs
    ran = json.loads((demo_run / "fi_ed.json").read_text())["metrics"]["edit_settings"]["influence"]
    assert (ran["hessian"], ran["solver"], ran["damping"]) == ("fisher", "woodbury", 0.02)
    # a flag wins over the scores file
    assert main(["edit", "--checkpoint", str(demo_run / "refined"), "--scores", str(demo_run / "fi"), "--top-k", "5", "--name", "fi_gn",
                 "--hessian", "gauss-newton", "--solver", "cg", "--threads", "1"]) == 0
    ran = json.loads((demo_run / "fi_gn.json").read_text())["metrics"]["edit_settings"]["influence"]
    assert (ran["hessian"], ran["solver"], ran["damping"]) == ("gauss-newton", "cg", 0.02)


def test_an_edit_takes_not_the_scores_time_budget_and_says_when_its_solve_stops_short(demo_run, capsys):
    """A new user's edit inherited the scores' --max-minutes and stopped unconverged without a word: the budget is not
    inherited (the rest of the solve settings are), and an edit whose solve stops short warns on stderr and in its file."""
    from metainfluence.influence.results import InfluenceSettings
    from metainfluence.pipeline.scores import scores_settings

    base = ["--checkpoint", str(demo_run / "refined"), "--threads", "1"]
    assert main(["influence", *base, "--hessian", "gauss-newton", "--tol", "1e-9", "--max-iter", "400", "--max-minutes", "1e-9",
                 "--name", "budget_scores"]) == 3  # the budget ran out: written, status 3
    recorded = InfluenceResult.load(demo_run / "budget_scores").settings["influence"]["solve"]
    assert recorded["max_minutes"] == 1e-9
    inherited = scores_settings(demo_run / "budget_scores", InfluenceSettings())
    assert (inherited.hessian, inherited.solve.tol, inherited.solve.max_iter, inherited.solve.max_minutes) == ("gauss-newton", 1e-9, 400, 0.0)
    capsys.readouterr()
    edit = ["edit", *base, "--scores", str(demo_run / "budget_scores"), "--top-k", "3"]
    assert main([*edit, "--name", "ed_budget"]) == 0
    out, err = capsys.readouterr()
    metrics = json.loads((demo_run / "ed_budget.json").read_text())["metrics"]
    assert metrics["edit_settings"]["influence"]["solve"]["max_minutes"] == 0.0 and metrics["edit"]["solver_converged"]
    assert "edit's" not in err and "stopped short" not in out and "at most" not in out
    # a budget given on the command line is the edit's: it runs out, and the edit says so (stderr, stdout, the file)
    assert main([*edit, "--max-minutes", "1e-9", "--name", "ed_cut"]) == 0
    out, err = capsys.readouterr()
    edit_diag = json.loads((demo_run / "ed_cut.json").read_text())["metrics"]["edit"]
    assert not edit_diag["solver_converged"] and edit_diag["solver_stopped_by"] == "time"
    said = [w for w in edit_diag["warnings"] if w.startswith("the edit's solve (cg) stopped before its tolerance")]
    assert len(said) == 1 and "--max-minutes" in said[0] and "--hessian fisher --solver woodbury" in said[0]
    assert f"relative residual {edit_diag['solver_residual']:.2g} (tol 1e-09)" in said[0]
    assert "warning: the edit's solve (cg) stopped before its tolerance" in err
    assert "at most 1e-09 min" in out and "stopped short of its tolerance (see the warning)" in out


def test_influence_says_before_its_solve_how_stationary_the_checkpoint_is(demo_run, tmp_path):
    from metainfluence.influence.results import InfluenceSettings
    from metainfluence.pipeline import influence_checkpoint

    lines: list[str] = []
    settings = InfluenceSettings(hessian="fisher", solver="woodbury")
    influence_checkpoint(demo_run / "trained", settings, out=tmp_path, name="t", log=lines.append)
    assert any(line.startswith("note: this checkpoint was not refined") for line in lines)
    # the refined checkpoint's report is below the warning threshold: no line; above it (a stricter threshold): a warning first
    lines.clear()
    influence_checkpoint(demo_run / "refined", settings, out=tmp_path, name="r", log=lines.append)
    assert not any("refine stopped at" in line for line in lines)
    lines.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the scores' own stationarity shortfall
        influence_checkpoint(demo_run / "refined", InfluenceSettings(hessian="fisher", solver="woodbury", stationarity_warn=1e-12),
                             out=tmp_path, name="s", log=lines.append)
    notice = [line for line in lines if "refine stopped at" in line]
    assert len(notice) == 1 and notice[0].startswith("warning:") and "refine further" in notice[0]
    assert lines.index(notice[0]) == 1  # right after the pool line, before any solve
    # the fisher Hessian ran here: the remedy is to refine, not "use the positive semi-definite --hessian fisher --solver woodbury"
    assert "--hessian fisher --solver woodbury" not in notice[0] and "the fisher Hessian used here is positive semi-definite" in notice[0]
    from metainfluence.meta.checkpoint import load_checkpoint
    from metainfluence.pipeline.stages import _stationarity_notice

    for hessian, fisher_advised in (("exact", True), ("gamma", True), ("gauss-newton", False), ("fisher", False)):
        said: list[str] = []
        _stationarity_notice(load_checkpoint(demo_run / "refined"), InfluenceSettings(hessian=hessian, stationarity_warn=1e-12), said.append)
        assert len(said) == 1 and ("use the positive semi-definite --hessian fisher --solver woodbury" in said[0]) == fisher_advised, hessian
    # a proximal refine's report is of P, and a refine its time limit stopped is told to take more time
    from types import SimpleNamespace

    ckpt = load_checkpoint(demo_run / "refined")
    report = {**ckpt.info["refine_report"], "proximal": 1.0, "stopped_by": "max_minutes"}
    said = []
    _stationarity_notice(SimpleNamespace(info={**ckpt.info, "refine_report": report}), InfluenceSettings(hessian="fisher", stationarity_warn=1e-12), said.append)
    assert "refine stopped at ‖∇P‖ / mean‖g_i‖" in said[0] and "with a larger --refine-max-minutes" in said[0]


def test_cli_usage_mistakes_name_the_command_and_the_remedy(demo_run, tmp_path, capsys):
    assert main(["refine", "--checkpoint", str(demo_run / "refined"), "--bogus", "1"]) == 2
    assert "unrecognized arguments: --bogus 1 (see 'metainfluence refine --help')" in capsys.readouterr().err
    # a curvature file the solver would not read is refused rather than ignored
    assert main(["influence", "--checkpoint", str(demo_run / "refined"), "--solver", "cg", "--curvature-file", str(tmp_path / "c")]) == 2
    assert "--curvature-file is read by --solver pcg or curvature only" in capsys.readouterr().err
    assert main(["edit", "--checkpoint", str(demo_run / "refined"), "--scores", str(demo_run / "task_influence"), "--top-k", "-3"]) == 2
    assert "choose a k from 1 to 60" in capsys.readouterr().err


def test_a_scores_file_whose_ids_or_scores_were_changed_is_refused(demo_run, tmp_path, capsys):
    # an edit takes the scores' rows as the pool's tasks: ids in another order (or of another pool) and NaN scores are refused
    stem = demo_run / "task_influence"
    fingerprint = json.loads(stem.with_suffix(".json").read_text())["pool_fingerprint"]
    good = InfluenceResult.load(stem)
    for name, change in (("flipped", {"task_ids": good.task_ids.flip(0)}), ("nan", {"scores": good.scores.clone().index_fill_(0, torch.tensor([3]), float("nan"))})):
        bad = InfluenceResult(**{**{k: getattr(good, k) for k in ("level", "method", "scores", "task_ids", "measurement", "settings", "diagnostics",
                                                                    "self_influence", "extra")}, **change})
        bad.save(tmp_path / name, pool_fingerprint=fingerprint)
        assert main(["edit", "--checkpoint", str(demo_run / "refined"), "--scores", str(tmp_path / name), "--top-k", "3", "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("task ids are not this pool's" in err[0] if name == "flipped" else "NaN or infinite" in err[0])


def test_edit_refuses_scores_of_another_model_and_warns_of_scores_of_another_lambda(demo_run, tmp_path, capsys):
    other = tmp_path / "other"  # the same pool, a narrower model
    assert main(["demo", "--out", str(other), *SMALL, "--model-hidden", "16", "--skip-influence"]) == 0
    capsys.readouterr()
    assert main(["edit", "--checkpoint", str(other / "refined"), "--scores", str(demo_run / "task_influence"), "--top-k", "3"]) == 2
    err = capsys.readouterr().err
    assert "was computed for a model of" in err and "recompute the scores for this checkpoint" in err
    # the same model refined further: the scores' λ is not this checkpoint's, said aloud
    assert main(["refine", "--checkpoint", str(demo_run / "refined"), "--out", str(tmp_path), "--name", "again", "--refine-tol", "0",
                 "--refine-tol-ratio", "0", "--refine-max-iter", "2", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["edit", "--checkpoint", str(tmp_path / "again"), "--scores", str(demo_run / "task_influence"), "--top-k", "3",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    assert "was computed at another λ" in capsys.readouterr().err


def test_a_result_of_another_question_is_never_replaced_silently(demo_run, capsys):
    ckpt = str(demo_run / "refined")
    gn = ["influence", "--checkpoint", ckpt, "--hessian", "gauss-newton", "--name", "guarded", "--threads", "1"]
    assert main(gn) == 0
    before = (demo_run / "guarded.safetensors").read_bytes()
    assert main(["influence", "--checkpoint", ckpt, "--hessian", "fisher", "--solver", "woodbury", "--name", "guarded", "--threads", "1"]) == 2
    assert "already holds task-level scores of another hessian" in capsys.readouterr().err
    assert (demo_run / "guarded.safetensors").read_bytes() == before  # untouched
    assert main([*gn, "--max-iter", "500"]) == 0  # the same question more accurately: replaced
    assert main(["influence", "--checkpoint", ckpt, "--name", "refined", "--threads", "1"]) == 2  # a checkpoint's name
    assert "another kind of file (refined)" in capsys.readouterr().err
    edit = ["edit", "--checkpoint", ckpt, "--hessian", "gauss-newton", "--name", "guarded_edit", "--threads", "1"]
    assert main([*edit, "--remove-tasks", "1,2"]) == 0 and main([*edit, "--remove-tasks", "1,2"]) == 0
    assert main([*edit, "--remove-tasks", "3"]) == 2
    assert "already holds an edit of another removed_tasks" in capsys.readouterr().err
    assert main([*edit, "--remove-tasks", "3", "--force"]) == 0
    assert json.loads((demo_run / "guarded_edit.json").read_text())["metrics"]["removed_tasks"] == [3]
