"""Settings ↔ flags ↔ config files, and the command line (one-line errors, exit status 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from metainfluence.cli import main
from metainfluence.config import apply_overrides, load_settings, read_config_file, settings_from_dict, to_dict
from metainfluence.errors import SettingsError
from metainfluence.meta import RefineWarning, load_checkpoint
from metainfluence.pipeline import RunSettings, run_demo


TINY = [
    "--train-tasks", "12", "--val-tasks", "4", "--test-tasks", "10", "--model-hidden", "16",
    "--model-activation", "tanh", "--steps", "6", "--meta-batch", "4", "--no-progress",
]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    return err[0]


# --------------------------------------------------------------------------- config files
def test_toml_and_yaml_values_override_defaults_and_flags_override_files(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nsteps = 7\nlr = 0.01\n[model]\nhidden = [16, 8]\n[inner]\nlr = 0.1\nfirst_order = true\n[data]\ndata_root = "/x"\n')
    s = load_settings(RunSettings(), toml)
    assert (s.train.steps, s.train.lr, s.model.hidden, s.inner.lr, s.inner.first_order, s.data.data_root) == (7, 0.01, (16, 8), 0.1, True, "/x")
    d = RunSettings()
    assert (s.train.meta_batch, s.data.n_way, s.refine.tol) == (d.train.meta_batch, d.data.n_way, d.refine.tol)
    yml = tmp_path / "run.yaml"
    yml.write_text("train:\n  steps: 9\nrefine:\n  method: gd\n")
    s2 = load_settings(RunSettings(), yml, {"train.steps": 11})
    assert s2.train.steps == 11 and s2.refine.method == "gd"
    # a run's settings.json round-trips through the same path
    js = tmp_path / "settings.json"
    js.write_text(json.dumps(to_dict(s)))
    assert load_settings(RunSettings(), js) == s
    assert settings_from_dict(RunSettings, to_dict(s)) == s


@pytest.mark.parametrize(
    "text, match",
    [
        ("[train]\nstepz = 3\n", "unknown setting 'train.stepz'"),
        ("[trian]\nsteps = 3\n", "unknown setting 'trian"),
        ("[train]\nsteps = 'ten'\n", "train.steps must be an integer"),
        ("[model]\nhidden = 16\n", "model.hidden must be a list"),
        ("steps = 3\n", "unknown setting 'steps'"),
        ("[train\n", "not valid TOML"),
    ],
)
def test_bad_config_files_are_refused_in_one_line(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SettingsError, match=match) as err:
        load_settings(RunSettings(), path)
    assert "\n" not in str(err.value)


def test_unknown_override_key_and_extension_are_refused(tmp_path):
    with pytest.raises(SettingsError, match="unknown setting"):
        apply_overrides(RunSettings(), {"inner.momentum": 0.9})
    (tmp_path / "a.ini").write_text("x")
    with pytest.raises(SettingsError, match="unknown extension"):
        read_config_file(tmp_path / "a.ini")


def test_help_shows_every_fields_help_text(capsys):
    with pytest.raises(SystemExit) as ex:
        main(["demo", "--help"])
    assert ex.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in ("tasks per meta-batch", "inner step size α", "‖∇F‖₂ is at most this", "--refine-history-size", "--inner-first-order"):
        assert text in out


# --------------------------------------------------------------------------- one-line errors
@pytest.mark.parametrize(
    "argv, match",
    [
        (["train", "--stepz", "3"], "unrecognized arguments"),
        (["train", "--steps", "ten"], "--steps expects int"),
        (["train", "--dataset", "nope", "--no-progress"], "unknown dataset"),
        (["train", "--lr", "-1", "--no-progress"], "outer lr must be a positive number"),
        (["evaluate", "--checkpoint", "/nonexistent/ck"], "does not exist"),
        (["refine"], "--checkpoint"),
        (["demo", "--refine-method", "adam"], "invalid choice"),
    ],
)
def test_bad_input_prints_one_line_and_exits_2(argv, match, capsys, tmp_path):
    argv = [a if a != "OUT" else str(tmp_path) for a in argv]
    assert main(argv) == 2
    assert match in _error_line(capsys)


def test_bad_config_key_from_the_command_line(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  stepz: 3\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown setting 'train.stepz'" in _error_line(capsys)


def test_console_script_error_has_no_traceback(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "metainfluence.cli", "evaluate", "--checkpoint", str(tmp_path / "none")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("error: ")
    assert "Traceback" not in proc.stderr


# --------------------------------------------------------------------------- commands end to end
def test_train_refine_evaluate_commands(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    ck = load_checkpoint(out / "trained")
    assert ck.step == 6 and ck.info["settings"]["train"]["steps"] == 6
    assert {"adam.exp_avg", "adam.exp_avg_sq", "adam.step", "sampler"} <= set(ck.state)
    assert ck.info["metrics"]["eval"]["test"]["n_tasks"] == 10
    assert (out / "pools" / "train.json").is_file() and (out / "settings.json").is_file()

    assert main(["refine", "--checkpoint", str(out / "trained"), "--refine-max-iter", "3", "--refine-tol", "1e-12", "--no-progress"]) == 0
    ref = load_checkpoint(out / "refined")
    assert ref.lam.dtype == torch.float64 and ref.info["refine_report"]["iterations"] == 3
    assert ref.info["refine_report"]["objective_after"] < ref.info["refine_report"]["objective_before"]

    # with only the ratio target set, the warning states that target (not "‖∇F‖ ≤ 0"), and the summary gives ‖∇F‖/ḡ₀ — the
    # ratio the iterations print, over the starting mean‖g_i‖ — next to the ratio over the mean measured again at the end
    capsys.readouterr()
    assert main(["refine", "--checkpoint", str(out / "trained"), "--name", "ratio_only", "--refine-max-iter", "3", "--refine-tol", "0",
                 "--refine-tol-ratio", "1e-12", "--no-progress"]) == 0
    printed, err = capsys.readouterr()
    assert "warning: refine did not reach ‖∇F‖/ḡ₀ ≤ 1e-12 (ḡ₀ the starting mean‖g_i‖; ‖∇F‖ ≤ " in err and "‖∇F‖ ≤ 0" not in err
    rep = load_checkpoint(out / "ratio_only").info["refine_report"]
    assert rep["ratio_after_start"] == pytest.approx(rep["grad_norm_after"] / rep["task_grad_norm_before"], rel=1e-12)
    assert f"→ {rep['ratio_after']:.3g} (‖∇F‖/ḡ₀ {rep['ratio_after_start']:.3g} against the starting mean‖g_i‖" in printed

    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(out / "refined.safetensors"), "--json", str(tmp_path / "e.json"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["n_tasks"] == 10 and len(res["per_task_accuracy"]) == 10
    assert abs(res["accuracy"] - ref.info["metrics"]["eval"]["test"]["accuracy"]) < 1e-12
    assert "accuracy" in capsys.readouterr().out

    # resuming a finished run with more steps continues from step 6
    assert main(["train", "--out", str(out), *TINY[:-5], "--steps", "8", "--meta-batch", "4", "--resume", "--no-progress"]) == 0
    assert load_checkpoint(out / "trained").step == 8
    assert "resuming from step 6 of 8" in capsys.readouterr().err
    # ... but not with another objective: steps of two inner loops would be mixed into λ
    files = {p: p.read_bytes() for p in [out / "settings.json", *sorted((out / "pools").iterdir())]}
    assert main(["train", "--out", str(out), *TINY[:-5], "--steps", "9", "--meta-batch", "4", "--resume", "--inner-lr", "0.1", "--no-progress"]) == 2
    assert "trained with inner.lr=0.4, not 0.1" in _error_line(capsys)
    assert main(["train", "--out", str(out), *TINY[:-5], "--steps", "9", "--meta-batch", "4", "--resume", "--inner-adapt", "head", "--no-progress"]) == 2
    assert "trained with inner.adapt='all', not 'head'" in _error_line(capsys)  # MAML steps and ANIL steps are other objectives
    assert load_checkpoint(out / "trained").step == 8
    # ... nor on another pool; a refused resume leaves the run's settings and pool files as they were
    assert main(["train", "--out", str(out), *TINY[:-5], "--steps", "9", "--meta-batch", "4", "--resume", "--train-tasks", "13", "--no-progress"]) == 2
    assert "another train pool" in _error_line(capsys)
    assert {p: p.read_bytes() for p in files} == files and sorted((out / "pools").iterdir()) == sorted(p for p in files if p.parent.name == "pools")


def test_a_time_limited_training_says_stopped_and_its_resumption_completed(tmp_path, capsys, monkeypatch):
    import metainfluence.meta.train as train_module

    out = tmp_path / "run"
    clock = iter(range(0, 10**6, 30))  # every clock reading 30 s later: the 0.2-minute budget ends after the first steps
    monkeypatch.setattr(train_module.time, "perf_counter", lambda: float(next(clock)))
    assert main(["train", "--out", str(out), *TINY[:-5], "--steps", "40", "--meta-batch", "4", "--max-minutes", "0.2", "--no-progress"]) == 3
    first = load_checkpoint(out / "trained")
    assert 0 < first.step < 40 and first.info["history"]["stopped"].startswith("time limit")
    assert "stopped: training reached its time limit" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["train", "--out", str(out), *TINY[:-5], "--steps", "40", "--meta-batch", "4", "--resume", "--no-progress"]) == 0
    done = load_checkpoint(out / "trained")
    assert done.step == 40 and done.info["history"]["stopped"] == "completed"


def test_refine_refuses_a_checkpoint_whose_pool_file_was_swapped(tmp_path, capsys):
    from metainfluence.data import load_dataset
    from metainfluence.tasks import build_pool

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    other = build_pool(load_dataset("digits"), "train", 5, 1, 5, 12, seed=1)
    other.save(out / "pools" / "train")
    capsys.readouterr()
    assert main(["refine", "--checkpoint", str(out / "trained"), "--no-progress"]) == 2
    assert "another train pool" in _error_line(capsys)


def test_run_demo_writes_its_outputs_and_summary(tmp_path):
    s = apply_overrides(RunSettings(), {
        "data.train_tasks": 20, "data.val_tasks": 5, "data.test_tasks": 30, "model.hidden": [16],
        "train.steps": 20, "refine.max_iter": 5, "refine.tol": 1e-12,
    })
    lines: list[str] = []
    with pytest.warns(RefineWarning, match="did not reach"):  # 5 iterations cannot reach 1e-12
        result = run_demo(s, out=tmp_path / "demo", progress=False, log=lines.append, influence_step=False)
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["eval_trained"]["test"]["n_tasks"] == 30
    assert summary["refine"]["objective_after"] < summary["refine"]["objective_before"]
    assert result["refine_report"].iterations == 5
    text = "\n".join(lines)
    assert "after refine" in text and "‖∇F‖" in text and "train pool" in text
    for name in ("trained.safetensors", "refined.safetensors", "refined.json", "settings.json", "pools/test.json"):
        assert (tmp_path / "demo" / name).is_file()


# --------------------------------------------------------------------------- run-folder guards
def test_train_refuses_an_existing_run_and_a_locked_one(tmp_path, capsys):
    import os

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    first = (out / "trained.safetensors").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", str(out), *TINY, "--pool-seed", "3"]) == 2
    assert "already holds a run" in _error_line(capsys) and (out / "trained.safetensors").read_bytes() == first
    # a live process holding the lock keeps a second writer out; a dead one's lock is taken over
    (out / ".metainfluence.lock").write_text(str(os.getppid()))
    assert main(["train", "--out", str(out), *TINY, "--force"]) == 2
    assert "another process" in _error_line(capsys)
    (out / ".metainfluence.lock").write_text("999999999")
    assert main(["train", "--out", str(out), *TINY, "--force", "--pool-seed", "3"]) == 0
    assert (out / "trained.safetensors").read_bytes() != first and not (out / ".metainfluence.lock").exists()


def test_names_stay_inside_out_and_out_is_checked_before_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    assert main(["refine", "--checkpoint", str(out / "trained"), "--name", "../escaped", "--no-progress"]) == 2
    assert "plain file name" in _error_line(capsys) and not (tmp_path / "escaped.json").exists()
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert main(["refine", "--checkpoint", str(out / "trained"), "--out", str(blocker), "--no-progress"]) == 2
    assert "is a file, not a folder" in _error_line(capsys)


def test_evaluate_refuses_a_test_pool_of_another_run(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--out", str(a), *TINY]) == 0
    assert main(["train", "--out", str(b), *TINY, "--pool-seed", "2"]) == 0
    for ext in ("json", "safetensors"):  # the other run's test pool lands in this run's folder
        (a / "pools" / f"test.{ext}").write_bytes((b / "pools" / f"test.{ext}").read_bytes())
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(a / "trained"), "--no-progress"]) == 2
    assert "does not belong to the run" in _error_line(capsys)


def test_absurd_pool_sizes_are_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY, "--train-tasks", "1000000000"]) == 2
    err = _error_line(capsys)
    assert "--train-tasks" in err and "at most" in err and not out.exists()


def test_cli_users_see_no_dependency_deprecation_warnings(tmp_path):
    import os
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "default", "-m", "metainfluence.cli", "train", "--out", str(tmp_path / "run"), *TINY],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "DeprecationWarning" not in proc.stderr and "FutureWarning" not in proc.stderr, proc.stderr


def test_running_out_of_memory_is_one_line_with_the_remedy(monkeypatch, capsys):
    # torch reports a failed allocation as a RuntimeError: the CLI says it in one line; any other RuntimeError is a bug and propagates
    import metainfluence.cli as cli

    def fail(message):
        def command(args):
            raise RuntimeError(message)
        return command

    monkeypatch.setitem(cli.COMMANDS, "evaluate", fail("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to allocate 25088000 bytes"))
    assert cli.main(["evaluate", "--checkpoint", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of memory") and "--pool-chunk" in err[0]
    monkeypatch.setitem(cli.COMMANDS, "evaluate", fail("shape mismatch"))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        cli.main(["evaluate", "--checkpoint", "x"])


def test_an_experiment_refuses_an_out_it_cannot_write_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["experiment", "detection", "--quick", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file, not a folder" in err[0]


def test_a_failed_train_leaves_no_empty_out_folder_and_never_removes_one_that_existed(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    out = tmp_path / "runs" / "new"
    assert main(["train", "--dataset", "omniglot", "--data-root", str(missing), "--out", str(out), *TINY]) == 2
    assert "error:" in capsys.readouterr().err and not out.exists()
    kept = tmp_path / "mine"
    kept.mkdir()
    assert main(["train", "--dataset", "omniglot", "--data-root", str(missing), "--out", str(kept), *TINY]) == 2
    assert kept.is_dir()
    exp = tmp_path / "runs" / "exp"
    assert main(["experiment", "detection", "--quick", "--set", "data.dataset=omniglot", "--data-root", str(missing), "--out", str(exp)]) == 2
    assert "error:" in capsys.readouterr().err and not exp.exists()


def test_experiment_warnings_name_set_keys_where_the_library_names_flags():
    from metainfluence.config import flags_as_set_keys
    from metainfluence.influence import InfluenceSettings

    parts = ((InfluenceSettings, "influence."), (RunSettings, ""))
    said = ("raise --max-iter (now 300) or --damping (now 0.001); use --hessian fisher --solver woodbury, or raise --lissa-batch or "
            "--lissa-repeats; --fisher-samples 2 --seed 0; --refine-method newton; pass --resume, --set data.k_shot=5; raise --refine-max-iter — it")
    assert flags_as_set_keys(said, parts, ("--resume", "--set")) == (
        "raise --set influence.solve.max_iter (now 300) or --set influence.damping (now 0.001); use --set influence.hessian=fisher "
        "--set influence.solver=woodbury, or raise --set influence.solve.lissa_batch or --set influence.solve.lissa_repeats; "
        "--set influence.fisher_samples=2 --set influence.solve.seed=0; --set refine.method=newton; pass --resume, --set data.k_shot=5; "
        "raise --set refine.max_iter — it")
    # every key it writes is one --set accepts
    from metainfluence.config import apply_overrides
    apply_overrides(InfluenceSettings(), {"solve.max_iter": 5, "fisher_samples": 2, "solve.seed": 1, "solve.lissa_batch": 2})
    apply_overrides(RunSettings(), {"refine.method": "newton"})


def test_a_train_interrupted_before_its_first_checkpoint_starts_again_with_or_without_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY]) == 0
    for f in out.glob("trained.*"):  # what an interrupt before the first checkpoint leaves: settings.json and the pools
        f.unlink()
    assert main(["train", "--out", str(out), "--resume", *TINY]) == 0
    assert "interrupted before its first checkpoint; starting it afresh" in capsys.readouterr().out
    for f in out.glob("trained.*"):
        f.unlink()
    assert main(["train", "--out", str(out), *TINY]) == 0 and (out / "trained.safetensors").is_file()  # no --force needed
    assert main(["train", "--out", str(out), *TINY]) == 2  # a run with a checkpoint is still refused
    assert "already holds a run" in capsys.readouterr().err
    # --resume without the first command's flags: the refusal points at the run's own settings
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 2
    assert f"--config {out / 'settings.json'} with --resume" in capsys.readouterr().err


def test_an_interrupted_train_says_which_step_its_kept_checkpoint_holds(tmp_path, capsys, monkeypatch):
    """Ctrl-C keeps the last periodic checkpoint, not the step reached: the message names it."""
    import metainfluence.meta.train as train_module

    out = tmp_path / "run"
    assert main(["train", "--out", str(out), *TINY[:-5], "--steps", "6", "--meta-batch", "4", "--checkpoint-every", "4", "--no-progress"]) == 0
    capsys.readouterr()

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "meta_train", interrupt)
    monkeypatch.setattr("metainfluence.pipeline.stages.meta_train", interrupt)
    code = main(["train", "--out", str(out), *TINY[:-5], "--steps", "9", "--meta-batch", "4", "--resume", "--no-progress"])
    assert code == 130
    err = capsys.readouterr().err
    assert "interrupted; what was saved is kept (the checkpoint of step 6 of 6; later steps are lost)" in err and "--resume" in err
