"""What the CLI prints of a result: a scores file's extremes, a pairwise matrix, a fitted curvature."""

from __future__ import annotations


def print_items(result, k: int, stem=None) -> None:
    """The sign convention and the k most harmful and most helpful items of a scores result; with the scores file's
    ``stem``, each item also in the words of its ``STEM.csv`` (classes, file, labels: pipeline/describe.py)."""
    from .influence.results import BASELINE_MEANINGS, SIGN_CONVENTION
    from .pipeline.describe import file_relabelled, score_of, split_names

    words = _item_words(stem)
    order = result.ranking(harmful_first=True)
    if k > order.numel():
        print(f"note: --top {k} is more than the {order.numel()} scored items; showing all of them")
    k = max(0, min(k, order.numel()))
    label = "tasks" if result.level == "task" else f"(task, {result.level} example) pairs"
    print(BASELINE_MEANINGS.get(result.method, (SIGN_CONVENTION,))[0])  # the baselines say what their scores are instead
    for title, idx in (("most harmful", order[:k]), ("most helpful", order.flip(0)[:k])):
        print(f"{title} {label}:")
        for item, i in zip(result.items(idx), idx.tolist()):
            said = words.get(item, "")
            print(f"  {item if len(item) > 1 else item[0]!s:>12}  score {float(result.scores.reshape(-1)[i]):+.4e}" + (f"  {said}" if said else ""))
    files = _top_files(stem, k)
    if files:
        print("most harmful files (each file's scores summed over the tasks it appears in):")
        for f in files:
            other = file_relabelled(f)
            also = "also " if len(other) < len(split_names(f["labels"])) else ""  # its true label was used in some tasks
            flip = f", {also}trained as {', '.join(other)}" if other else ""
            print(f"  {f['file']}  score {float(score_of(f)):+.4e}  in {f['appearances']} task(s), class {f['true_label']}{flip}")
    if result.diagnostics.get("coverage"):
        print(f"note: {result.diagnostics['coverage']}")
    if words:
        print(f"every item by class and file, most harmful first: {stem}.csv" + (f" (per file: {stem}.files.csv)" if files else ""))


def _top_files(stem, k: int) -> list[dict]:
    from .pipeline.describe import read_table

    return read_table(f"{stem}.files.csv")[:max(0, k)] if stem is not None else []


def _item_words(stem) -> dict[tuple, str]:
    """(task_id,) or (task_id, example) → its description, from ``STEM.csv`` ({} when there is none)."""
    from .pipeline.describe import describe_row, read_table

    rows = read_table(f"{stem}.csv") if stem is not None else []
    return {((int(r["task_id"]), int(r["example"])) if r["example"] != "" else (int(r["task_id"]),)): describe_row(r) for r in rows}


def print_inherited(settings) -> None:
    """The Hessian, solver and curvature file an edit of a scores file takes from it, said before the edit runs, so that
    an error about a file the user never named is not a puzzle."""
    file = f" --curvature-file {settings.curvature_file}" if settings.curvature_file else ""
    print(f"edit: --hessian {settings.hessian} --solver {settings.solver}{file} (the scores file's, unless a flag or --config set them)")


def print_edit(removal, diag: dict, before, after, path) -> None:
    """What an edit did: the removal, its solve (and a step that backtracking cut), the test accuracy before and after."""
    short = "" if diag["solver_converged"] else ", stopped short of its tolerance (see the warning)"
    if diag.get("step_length", 1.0) < 1:  # the Newton step raised the reduced objective: only this much of it was kept
        short += f"; backtracking on the reduced objective kept {diag['step_length']:.3g} of the Newton step"
    print(f"removed {removal.describe()} in closed form ({diag['seconds']:.1f} s, solver residual {diag['solver_residual']:.1e}{short})")
    print(f"test before edit: {before.summary()}")
    print(f"test after edit:  {after.summary()}")
    print(f"checkpoint: {path}")


def stop_if_cut_short(diag: dict, stem) -> None:
    """Raise :class:`BudgetStop` (status 3, ``stopped: …``) when ``--max-minutes`` cut the scores' solve short: the
    scores are written but approximate, and a script must be able to tell without reading the JSON."""
    from .errors import BudgetStop

    solver = diag.get("solver") or {}
    if solver.get("stopped_by") == "time":
        raise BudgetStop(f"the solve reached its --max-minutes at relative residual {solver['residual']:.2e}; the scores so far "
                         f"are written to {stem} (approximate, said in their file) — run the same command with --resume {stem} to continue the solve")


def saved_step(args) -> str:
    """For an interrupted train: ' (its checkpoint at step S of T)' from OUT/trained.json, where a checkpoint was written
    (the last periodic one: the steps after it are lost), else ''."""
    import json
    from pathlib import Path

    try:
        info = json.loads((Path(args.out) / "trained.json").read_text())
        return f" (the checkpoint of step {int(info['step'])} of {int(info['settings']['train']['steps'])}; later steps are lost)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return ""


def print_pairs(result, k: int) -> None:
    """The matrix's shape and, for the first k validation tasks, the training task that helps and harms it most."""
    from .influence.pairwise import PAIRWISE_SIGN_CONVENTION

    n, m = result.scores.shape
    print(PAIRWISE_SIGN_CONVENTION)
    print(f"{n} training × {m} validation tasks ({result.measurement}); per validation task, the extreme training tasks:")
    for j in range(min(max(k, 0), m)):
        col = result.scores[:, j]
        lo, hi = int(col.argmin()), int(col.argmax())
        print(f"  {int(result.test_task_ids[j]):>6}  min {int(result.train_task_ids[lo]):>6} ({float(col[lo]):+.3e})"
              f"  max {int(result.train_task_ids[hi]):>6} ({float(col[hi]):+.3e})")


def print_curvature(i: dict, method: str) -> None:
    """A fitted curvature's kind, cost and probe measurements (and a warning when its fast tier is inexact)."""
    floor = f"fit {i['fit_over_floor']:.1f}× the floor (one pass of per-task gradients, {i['floor_seconds']:.2f} s)" if i.get("floor_seconds") else f"fit {i['fit_seconds']:.2f} s"
    if method == "fisher":
        print(f"fisher factor of the total Hessian ({i['factor_rows']} rows of sampled-label total gradients, {i['fisher_samples']} "
              f"per task), measured against the {i['hessian']} total Hessian: {floor}")
        print(f"probe error of H·x: max {max(i['probe_operator_rel_error']):.2g}")
    elif method == "ekfac":
        print(f"EK-FAC of the θ-space Fisher at the adapted parameters ({i['n_kronecker_blocks']} Kronecker blocks, {i['n_diagonal']} diagonal "
              f"parameters, {i['n_tasks_fitted']} tasks), measured against the {i['hessian']} total Hessian: {floor}")
        print(f"smallest eigenvalue {i['eigenvalue_min']:.3g}; probe error of H·x: max {max(i['probe_operator_rel_error']):.2g} "
              "(EK-FAC drops dθ/dλ: a preconditioner for --solver pcg first)")
    else:
        how = f"rank chosen from the spectrum ({i['sketch']['stopped_by']})" if i["sketch"].get("adaptive") else "rank"
        print(f"{i['hessian']} total Hessian, {how} {i['rank']} Nyström sketch ({i['sketch']['products']} products, "
              f"{i['n_tasks_fitted']} tasks): {floor}")
        print(f"eigenvalues {i['eigenvalue_max']:.3g} … {i['eigenvalue_min_kept']:.3g}; probe error of H·x: max {max(i['probe_operator_rel_error']):.2g}")
    print(f"fast-tier solve residual at δ = {i['probe_damping']:g}: max {max(i['probe_solve_residual']):.2g}")
    if max(i["probe_solve_residual"]) > 1e-2:
        print(f"warning: the fast tier (--solver curvature) leaves residuals up to {max(i['probe_solve_residual']):.2g} here; use --solver pcg "
              f"for exact answers{', or a larger --rank' if method == 'nystrom' else ''}")
