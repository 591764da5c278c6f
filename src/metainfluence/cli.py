"""Command line: ``metainfluence demo | train | refine | evaluate | influence | edit | curvature | experiment | report``.

A thin layer (argument parsing and printing) over :mod:`metainfluence.pipeline` and
:mod:`metainfluence.experiments`. Every setting of :class:`~metainfluence.pipeline.RunSettings`
is a flag (``--help`` lists them with their help texts and defaults) and a key of the ``--config``
file (TOML, YAML or JSON; sections ``[data]``, ``[model]``, ``[inner]``, ``[objective]``, ``[train]``,
``[refine]``). Precedence: defaults < config file < flags. A user mistake prints ``error: <one line>``
on stderr and exits with status 2, never a traceback; a spent ``--max-minutes`` prints ``stopped: …`` (status 3)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
from typing import Sequence

from .config import add_settings_arguments, config_sections, flags_as_set_keys, load_settings, namespace_overrides, parse_sets
from .console import print_curvature, print_edit, print_inherited, print_items, print_pairs, saved_step, stop_if_cut_short
from .errors import BudgetStop, MetaInfluenceError, SettingsError
from .progress import counted

EXIT_USER_ERROR = 2
EXIT_BUDGET_STOP = 3  # --max-minutes ran out between stages; --resume continues
HEARTBEAT_S = 60.0  # without bars, a solve or pass that runs this long prints its status once per this many seconds
NO_PROGRESS_HELP = "hide progress bars; a CG solve or pool pass that runs over a minute still prints its status once a minute (for log files)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake becomes one SettingsError line instead of a usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise SettingsError(f"{message} (see '{self.prog} --help')")


def _common(p: argparse.ArgumentParser, threads: int = 0) -> None:
    p.add_argument("--config", metavar="FILE", help="settings file (.toml, .yaml/.yml or .json); one file serves every command, each taking its own sections "
                   "(data, model, inner, objective, train, refine for runs; influence for influence and edit); flags override it")
    p.add_argument("--no-progress", dest="progress", action="store_false", help=NO_PROGRESS_HELP)
    p.add_argument("--threads", type=int, default=threads, metavar="N", help=f"torch CPU threads (0 = torch's default; default: {threads})")


def _data_root(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", dest="data.data_root", metavar="DIR", default=argparse.SUPPRESS,
                   help="folder holding the dataset files (else the recorded one, else $METAINFLUENCE_DATA)")


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import RunSettings, demo_settings

    parser = _Parser(prog="metainfluence", description="Influence functions for meta-learning: meta-train, refine to stationarity, evaluate.",
                     epilog="environment: METAINFLUENCE_DATA = folder of the dataset files (when --data-root is not given); "
                            "METAINFLUENCE_CACHE = cache of decoded datasets (default ~/.cache/metainfluence).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser("demo", help="the whole pipeline on the embedded digits data: pools, meta-train, refine, evaluate", description=(
        "Build train/val/test task pools (embedded digits data by default: no download), meta-train, refine to "
        "stationarity, evaluate on held-out tasks, and print a summary. Outputs go to --out."))
    demo.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    # The demo's tensors are tiny: one thread avoids thread-pool overhead (measured on a busy 2-core
    # machine: 44 s with 1 thread, 285 s with 2).
    _common(demo, threads=1)
    demo.add_argument("--skip-influence", dest="influence_step", action="store_false", help="stop after refine and evaluate (no task-IF, no edit)")
    demo.set_defaults(_dests=add_settings_arguments(demo, RunSettings, defaults=demo_settings()))

    train = sub.add_parser("train", help="build pools and meta-train (Adam on meta-batches); writes OUT/trained", description=(
        "Build the task pools and meta-train λ with Adam on seeded meta-batches; writes pools, a checkpoint every "
        "--checkpoint-every steps (OUT/trained) and evaluates on the val and test pools."))
    train.add_argument("--out", default="runs/train", help="output folder (default: runs/train)")
    train.add_argument("--resume", action="store_true", help="continue from OUT/trained (bit-identical to an uninterrupted run)")
    train.add_argument("--force", action="store_true", help="overwrite the run already in --out (without it an existing run is refused)")
    _common(train)
    train.set_defaults(_dests=add_settings_arguments(train, RunSettings, only=("data", "model", "inner", "objective", "train")))

    ref = sub.add_parser("refine", help="drive the full-pool meta-gradient below a tolerance (docs/method.md §2); writes OUT/refined", description=(
        "Load a trained checkpoint, rebuild its run (refusing a different model or training pool), minimise the "
        "full-pool objective F until ‖∇F‖ ≤ tol, evaluate on the test pool, and write the refined checkpoint."))
    ref.add_argument("--checkpoint", required=True, help="checkpoint to refine (stem, .json or .safetensors), e.g. runs/train/trained")
    ref.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    ref.add_argument("--name", default="refined", help="name of the refined checkpoint in --out (default: refined)")
    _data_root(ref)
    _common(ref)
    ref.set_defaults(_dests=add_settings_arguments(ref, RunSettings, only=("refine", "objective")) + ["data.data_root"])

    ev = sub.add_parser("evaluate", help="meta-test accuracy with a 95%% interval on held-out tasks", description=(
        "Adapt a checkpoint's λ to each held-out task and report mean query accuracy and loss with 95% intervals "
        "(1.96·sd/√n)."))
    ev.add_argument("--checkpoint", required=True, help="checkpoint to evaluate (stem, .json or .safetensors)")
    ev.add_argument("--split", default="test", choices=("test", "val", "train"), help="pool to evaluate on (default: test)")
    ev.add_argument("--tasks", type=int, default=None, help="number of tasks of --split to draw (default: the run's size of that pool, e.g. test_tasks = 600)")
    ev.add_argument("--json", default=None, metavar="FILE", help="also write the result (with per-task values) to this JSON file")
    _data_root(ev)
    _common(ev)
    ev.set_defaults(_dests=["data.data_root"])

    from .influence.results import CURVATURE_METHODS, InfluenceSettings

    inf = sub.add_parser("influence", help="score training tasks or examples: predicted change of the validation loss if removed", description=(
        "Compute task-IF (or instance-IF, or a baseline) for a checkpoint's training pool against the mean query loss of "
        "its validation pool. score > 0: removing the item would raise the validation loss (it helps); score < 0: it harms. "
        "Writes OUT/NAME.safetensors + OUT/NAME.json (settings, sign convention, diagnostics, timings, task ids)."))
    inf.add_argument("--checkpoint", required=True, help="refined checkpoint (stem, .json or .safetensors), e.g. runs/demo/refined")
    inf.add_argument("--level", default="task", choices=("task", "support", "query", "pairwise"),
                     help="score whole tasks, single support / query examples, or every training task on every validation task (pairwise: an n_train × n_val matrix) (default: task)")
    inf.add_argument("--measurement", default=None, choices=("loss", "margin"),
                     help="pairwise only: each validation task's query loss (default) or its mean margin, correct-class logit minus the best other logit")
    inf.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    inf.add_argument("--name", default=None, help="file name stem (default: influence_LEVEL_METHOD)")
    inf.add_argument("--force", action="store_true", help="replace a scores file of that name computed with another method, Hessian or damping")
    inf.add_argument("--top", type=int, default=5, help="how many most harmful / most helpful items to print (default: 5)")
    inf.add_argument("--check", type=int, default=0, metavar="K", help="fidelity check: re-optimise K random groups of tasks removed from λ* and record the Spearman and relative error of the predicted change (default: 0, no check)")
    inf.add_argument("--check-fraction", type=float, default=0.1, help="fraction of the training tasks in each removed group (default: 0.1)")
    inf.add_argument("--check-minutes", type=float, default=10.0, help="time budget of the fidelity check (default: 10)")
    inf.add_argument("--check-measurement", type=int, default=0, metavar="K", help="how much the ranking depends on which validation tasks were drawn: task-IF against both halves of K random halvings of the validation pool, its reliability and the pool size for 0.9 (default: 0, no check)")
    inf.add_argument("--resume", default=None, metavar="SCORES", help="continue the cg/pcg solve of an earlier task-level scores file of this "
                     "checkpoint's pool (one stopped by --max-minutes or --max-iter) from its iterate, under that file's settings (flags may change the "
                     "solver's effort, not its method, Hessian or damping); the new file is complete on its own")
    _data_root(inf)
    _common(inf)
    inf.set_defaults(_dests=add_settings_arguments(inf, InfluenceSettings, dest="influence.", title="influence settings") + ["data.data_root"])

    ed = sub.add_parser("edit", help="remove tasks or examples from a checkpoint in closed form (no retraining)", description=(
        "λ_edit = λ* + (H_R + δI)^{-1} b_R / n with H_R the Hessian of the reduced objective (docs/method.md §9), optionally followed by Newton steps on it. "
        "Remove tasks by id (--remove-tasks) or the top-k most harmful items of a scores file (--scores, --top-k). "
        "Writes OUT/NAME (an ordinary checkpoint) with the test accuracy before and after."))
    ed.add_argument("--checkpoint", required=True, help="refined checkpoint to edit")
    ed.add_argument("--remove-tasks", default=None, help="comma-separated task ids of the training pool to remove")
    ed.add_argument("--scores", default=None, help="scores file of `metainfluence influence` (stem or .json)")
    ed.add_argument("--top-k", type=int, default=None, help="remove the k most harmful items of --scores")
    ed.add_argument("--edit-step", default="reduced", choices=("reduced", "full"), help="Hessian of the closed-form step: reduced (H_R of the objective without the removed items; exact on a quadratic) or full (the paper's full-pool H, the first-order prediction) (default: reduced)")
    ed.add_argument("--newton-steps", type=int, default=0, help="Newton steps on the reduced objective after the closed-form edit (default: 0)")
    ed.add_argument("--out", default=None, help="output folder (default: the checkpoint's folder)")
    ed.add_argument("--name", default="edited", help="name of the edited checkpoint (default: edited)")
    ed.add_argument("--force", action="store_true", help="replace an edited checkpoint of that name that removed other items or used other settings")
    _data_root(ed)
    _common(ed)
    ed.set_defaults(_dests=add_settings_arguments(ed, InfluenceSettings, dest="influence.", title="influence settings (Hessian, solver, damping of the edit)") + ["data.data_root"])

    cv = sub.add_parser("curvature", help="fit a Nyström sketch (or an EK-FAC) of the total Hessian once, for --solver pcg / curvature", description=(
        "Sketch the total Hessian (--hessian gauss-newton or fisher) of a checkpoint's training pool from one block of products "
        "(--method nystrom), or fit an EK-FAC of the Fisher at the adapted parameters (--method ekfac; it drops dθ/dλ, a preconditioner first), "
        "measure it on probe vectors (relative error of H·x, residual of the fast-tier solve at --damping) and its cost as a multiple "
        "of one pass of per-task gradients, and save it as OUT.safetensors + OUT.json with the fingerprint of λ, pool and kind. "
        "Use it with `influence`/`edit` --curvature-file OUT --solver pcg (exact, preconditioned) or --solver curvature (fast)."))
    cv.add_argument("--checkpoint", required=True, help="refined checkpoint (stem, .json or .safetensors)")
    cv.add_argument("--out", required=True, help="output stem of the curvature file, e.g. runs/x/curvature_gn")
    cv.add_argument("--rank", type=_rank, default=50, help="eigenpairs kept, or auto: doubled from 20 until the smallest kept eigenvalue "
                    "is within 10× of --damping + weight decay, at most --max-rank (default: 50)")
    cv.add_argument("--max-rank", type=int, default=400, help="ceiling of --rank auto (default: 400)")
    cv.add_argument("--oversample", type=int, default=10, help="extra sketch columns (default: 10)")
    cv.add_argument("--probes", type=int, default=4, help="probe vectors for the quality report (default: 4)")
    cv.add_argument("--method", default="nystrom", choices=CURVATURE_METHODS, help="nystrom: low-rank sketch of H | ekfac: eigenvalue-corrected "
                    "Kronecker factors of the θ-space Fisher at each task's adapted parameters | fisher: the factor of sampled-label "
                    "total gradients (E = the total Gauss–Newton matrix), inverted exactly by Woodbury | gn-factor: the total Gauss–Newton "
                    "matrix itself as a factor (one row per query example and class; exact, softmax cross-entropy only) (default: nystrom)")
    cv.add_argument("--max-tasks", type=int, default=None, help="fit on a seeded subsample of this many tasks (an unbiased estimate of H; "
                    "the probe report is measured on the whole pool) (default: all)")
    _data_root(cv)
    _common(cv)
    cv.set_defaults(_dests=add_settings_arguments(cv, InfluenceSettings, dest="influence.", title="influence settings (hessian, fisher samples, seed, reference damping)",
                                                  defaults=InfluenceSettings(hessian="gauss-newton"), exclude=("method",)) + ["data.data_root"])

    ex = sub.add_parser("experiment", help="run one of the evidence experiments (docs/method.md §10): detection | removal | estimates | fidelity", description=(
        "Run an experiment of docs/method.md §10 with a config file (configs/*.toml), writing its tables, plots, seeds and timings to --out; "
        "--quick runs a small variant on the embedded digits / sinusoid data. `metainfluence report OUT` renders the results."))
    ex.add_argument("name", help="detection | removal | estimates | fidelity")
    ex.add_argument("--config", default=None, metavar="FILE", help="experiment config (TOML/YAML/JSON), e.g. configs/detection_mnist.toml")
    ex.add_argument("--quick", action="store_true", help="small variant (a few minutes on 2 CPU cores: estimates and removal the longest)")
    ex.add_argument("--out", default=None, help="output folder (default: runs/experiment-NAME)")
    ex.add_argument("--resume", action="store_true", help="reuse what an interrupted run of the same settings left in --out (docs/experiments.md); other pools are refused")
    ex.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="lay a setting over the config's, value as in TOML (e.g. --set data.k_shot=5)")
    ex.add_argument("--max-minutes", type=float, default=0.0, metavar="M", help="detection, removal, fidelity: stop once a saved stage (training + refine, curvature, a method's scores) "
                    "ends past M minutes: `stopped: …`, status 3; --resume continues. A stage in progress finishes (default: 0, no budget)")
    ex.add_argument("--no-progress", dest="progress", action="store_false", help=NO_PROGRESS_HELP)
    ex.add_argument("--threads", type=int, default=1, metavar="N", help="torch CPU threads (default: 1)")
    ex.add_argument("--data-root", default=None, metavar="DIR", help="folder holding the dataset files (same as --set data.data_root=DIR; else $METAINFLUENCE_DATA)")
    ex.set_defaults(_dests=[])

    rp = sub.add_parser("report", help="render an experiment folder as report.md + self-contained report.html")
    rp.add_argument("run_dir", help="a run folder (train / refine / influence / edit outputs) or the output folder of `metainfluence experiment`")
    rp.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    rp.set_defaults(_dests=[])
    return parser


def _sections(args: argparse.Namespace, owned: tuple[str, ...]):
    """The ``--config`` sections this command owns (None without --config); see :func:`config_sections`."""
    import dataclasses as dc

    from .experiments import EXPERIMENTS
    from .pipeline import RunSettings

    if args.config is None:
        return None
    known = [f.name for f in dc.fields(RunSettings)] + ["influence", *EXPERIMENTS]
    return config_sections(args.config, owned, known)


def _run_sections(args: argparse.Namespace):
    import dataclasses as dc

    from .pipeline import RunSettings

    return _sections(args, tuple(f.name for f in dc.fields(RunSettings)))


def _settings(args: argparse.Namespace, defaults=None):
    from .pipeline import RunSettings

    return load_settings(defaults if defaults is not None else RunSettings(), _run_sections(args), namespace_overrides(args, args._dests))


def _influence_settings(args: argparse.Namespace, base=None):
    """``base`` (default InfluenceSettings()), [influence] of --config, then the flags; what ran is recorded in every result."""
    from .influence.results import InfluenceSettings

    section = (_sections(args, ("influence",)) or {}).get("influence", {})
    flags = {k[len("influence."):]: v for k, v in namespace_overrides(args, args._dests).items() if k.startswith("influence.")}
    settings = load_settings(base if base is not None else InfluenceSettings(), section, flags)
    settings.validate()
    if ("curvature_file" in flags or "curvature_file" in section) and settings.solver not in ("pcg", "curvature"):
        raise SettingsError(f"--curvature-file is read by --solver pcg or curvature only (the solver here is {settings.solver}); "
                            "add --solver pcg (exact, preconditioned) or --solver curvature (fast tier), or drop the file")
    return settings


def _data_only(args: argparse.Namespace):
    """Checkpoint overrides for influence/edit: only --data-root applies to the run's settings."""

    def apply(settings):
        root = getattr(args, "data.data_root", None)
        if root is not None:
            settings = dataclasses.replace(settings, data=dataclasses.replace(settings.data, data_root=root))
        return settings

    return apply


def _checkpoint_overrides(args: argparse.Namespace):
    """Apply --config and flags on top of the settings recorded in a checkpoint."""

    def apply(settings):
        return load_settings(settings, _run_sections(args), namespace_overrides(args, args._dests))

    return apply


def _cmd_demo(args: argparse.Namespace) -> int:
    from .pipeline import demo_settings, run_demo

    settings = _settings(args, demo_settings())
    run_demo(settings, out=args.out, progress=args.progress, influence_step=args.influence_step)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .pipeline import train_run

    ctx, lam, history, results = train_run(_settings(args), args.out, resume=args.resume, force=args.force, progress=args.progress)
    print(f"trained {history.steps_done} steps in {history.wall_time_s:.1f} s ({history.tasks_per_second:.0f} tasks/s, {history.stopped})")
    for split, res in results.items():
        print(f"{split}: {res.summary()}")
    print(f"checkpoint: {ctx.out / 'trained.safetensors'}")
    if history.stopped.startswith("time limit"):  # kept on disk; a script tells it from a finished run by the status
        print(f"stopped: training reached its time limit after {history.steps_done} of {ctx.settings.train.steps} steps; run the same "
              "command with --resume to continue", file=sys.stderr)
        return 3
    return 0


def _cmd_refine(args: argparse.Namespace) -> int:
    from .pipeline import refine_checkpoint

    path, report, before, after = refine_checkpoint(args.checkpoint, out=args.out, name=args.name, overrides=_checkpoint_overrides(args), progress=args.progress)
    print(report.summary())
    print(f"test before refine: {before.summary()}")
    print(f"test after refine:  {after.summary()}")
    print(f"checkpoint: {path}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .pipeline import evaluate_checkpoint

    ckpt, result = evaluate_checkpoint(args.checkpoint, split=args.split, tasks=args.tasks, json_path=args.json, overrides=_checkpoint_overrides(args))
    print(f"{ckpt.info.get('kind', 'checkpoint')} λ ({ckpt.path}): {result.summary()}")
    return 0


def _cmd_influence(args: argparse.Namespace) -> int:
    from .evaluation.fidelity import CheckSettings
    from .pipeline import influence_checkpoint, scores
    check = CheckSettings(removals=args.check, fraction=args.check_fraction, max_minutes=args.check_minutes, measurement_splits=args.check_measurement)
    measurement = "margin" if args.measurement == "margin" else None
    result, stem = influence_checkpoint(args.checkpoint, _influence_settings(args, scores.resume_settings(args.resume)), level=args.level, out=args.out, name=args.name,
                                        overrides=_data_only(args), check=check, measurement=measurement, resume=args.resume, force=args.force)
    diag = result.diagnostics
    if "solver" in diag:
        print(f"solver {diag['solver']['name']}: residual {diag['solver']['residual']:.2e}, {counted(diag['solver']['iterations'], 'iteration')}")
    if "stationarity" in diag:
        st = diag["stationarity"]
        print(f"stationarity: ‖∇{'P' if 'objective' in st else 'F'}‖ = {st['grad_norm']:.3g} ({st['ratio']:.2g} of the mean task-gradient norm){', P = ' + st['objective'] if 'objective' in st else ''}")
    if "fidelity_check" in diag:
        fc = diag["fidelity_check"]
        print(f"fidelity check ({fc['removals_done']} removals of {fc['group_size']} tasks, re-optimised from λ*): "
              f"Spearman {fc['spearman']:.2f}, relative error {fc['relative_error']:.2f}, sign agreement {fc['sign_agreement']:.2f}")
    if (r := diag.get("measurement_reliability")):
        print(f"measurement: reliability {r['reliability']:.2f} over {r['splits']} halvings of {r['n_val_tasks']} validation tasks; "
              + (f"about {r['val_tasks_for_target']} give {r['target']:g}" if r.get('val_tasks_for_target') else f"no pool size is predicted to give {r['target']:g} (the halves disagree)"))
    if args.level == "pairwise":
        print_pairs(result, args.top)
    else:
        print_items(result, args.top, stem)
    print(f"scores: {stem}.safetensors (+ .json); {diag['timings_s']['total']:.1f} s")
    stop_if_cut_short(diag, stem)  # --max-minutes ran out: status 3, as train's, with the way to continue
    return 0


def _cmd_edit(args: argparse.Namespace) -> int:
    from .influence.results import InfluenceSettings
    from .pipeline import edit_checkpoint, scores

    # an edit of a scores file's top items inverts the Hessian those scores used (not their --max-minutes), unless --config or a flag says otherwise
    base = scores.scores_settings(args.scores, InfluenceSettings()) if args.scores else None
    settings = _influence_settings(args, base)
    if base is not None:
        print_inherited(settings)
    path, removal, edited, before, after = edit_checkpoint(
        args.checkpoint, settings, remove_tasks=args.remove_tasks, scores=args.scores, top_k=args.top_k,
        newton_steps=args.newton_steps, step=args.edit_step, out=args.out, name=args.name, overrides=_data_only(args), force=args.force)
    print_edit(removal, edited.diagnostics, before, after, path)
    return 0


def _rank(text: str) -> int | str:
    """--rank: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--rank must be a positive integer or auto, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"--rank must be ≥ 1, got {value}")
    return value


def _cmd_curvature(args: argparse.Namespace) -> int:
    import dataclasses as dc

    from .pipeline import curvature_checkpoint

    settings = _influence_settings(args)
    if not any(k == "influence.hessian" for k in namespace_overrides(args, args._dests)):
        # a sketch needs a PSD kind; a fisher factor is measured against the fisher Hessian it is the exact factor of
        settings = dc.replace(settings, hessian="fisher" if args.method == "fisher" else "gauss-newton")
    art, stem = curvature_checkpoint(args.checkpoint, settings, args.out, rank=args.rank, oversample=args.oversample, probes=args.probes,
                                     overrides=_data_only(args), method=args.method, max_tasks=args.max_tasks,
                                     max_rank=args.max_rank)
    print_curvature(art.info, art.method)
    print(f"curvature: {stem}.safetensors (+ .json)")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import EXPERIMENTS, run_experiment
    from .influence import InfluenceSettings
    from .pipeline import RunSettings

    if args.name not in EXPERIMENTS:
        raise SettingsError(f"unknown experiment {args.name!r}; use one of {', '.join(EXPERIMENTS)}")
    out = args.out or f"runs/experiment-{args.name}"
    sets = parse_sets(args.set)
    if args.data_root:
        sets.setdefault("data", {})["data_root"] = args.data_root
    # the library's advice names command flags; here settings are --set keys (the command's own flags excepted)
    parts, own = ((InfluenceSettings, "influence."), (RunSettings, "")), ("--config", "--quick", "--out", "--resume", "--set", "--max-minutes", "--data-root")
    warnings.showwarning = lambda m, *a, **k: _one_line_warning(flags_as_set_keys(str(m), parts, own), *a, **k)
    run_experiment(args.name, args.config, args.quick, out, resume=args.resume, max_minutes=args.max_minutes, sets=sets)
    print(f"results in {out}/; render them with: metainfluence report {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .experiments import report_run

    path = report_run(args.run_dir)
    print(f"report: {path}")
    return 0


COMMANDS = {"demo": _cmd_demo, "train": _cmd_train, "refine": _cmd_refine, "evaluate": _cmd_evaluate,
            "influence": _cmd_influence, "edit": _cmd_edit, "curvature": _cmd_curvature, "experiment": _cmd_experiment, "report": _cmd_report}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error)."""
    args = None
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # named with the command's own help, which lists what it takes
            raise SettingsError(f"unrecognized arguments: {' '.join(extra)} (see 'metainfluence {args.command + ' ' if args.command else ''}--help')")
        if args.command is None:
            parser.print_help()
            return EXIT_USER_ERROR
        if args.threads < 0:
            raise SettingsError(f"--threads must be ≥ 0, got {args.threads}")
        from .allocator import tune_allocator

        tune_allocator()  # large per-chunk buffers are reused, not re-mapped (allocator.py)
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        from .progress import showing

        with warnings.catch_warnings(), showing(getattr(args, "progress", False), heartbeat=HEARTBEAT_S):
            warnings.showwarning = _one_line_warning
            # a dependency's deprecation notices are not the user's business (ours are UserWarnings)
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            return COMMANDS[args.command](args)
    except BudgetStop as exc:  # not an error: the work so far is kept and the message says how to continue
        print(f"stopped: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BUDGET_STOP
    except MetaInfluenceError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        resumable = getattr(args, "command", None) in ("train", "experiment")
        print("error: interrupted" + (f"; what was saved is kept{saved_step(args)}: run the same command with --resume to continue" if resumable else
                                      "; this command wrote nothing (its inputs are unchanged): --max-minutes M stops it with what it "
                                      "reached kept (influence: --resume SCORES continues the solve)"), file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:  # torch reports a failed allocation as a RuntimeError
        text = str(exc)
        if not isinstance(exc, MemoryError) and "allocate" not in text and "out of memory" not in text.lower():
            raise
        print(f"error: out of memory ({' '.join(text.split())[:160]}); process fewer tasks at once (a smaller --pool-chunk "
              "on train or refine, which the checkpoint records), use fewer tasks or fisher draws, or a machine with more memory", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
