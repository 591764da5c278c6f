"""Glue between the stages: one :class:`RunSettings` → dataset, task pools, problem → train, refine,
evaluate, influence, edit, on a :class:`RunContext` that owns the run folder (layout in
:mod:`.run`). The CLI (:mod:`metainfluence.cli`) is a thin layer over these functions;
:func:`run_demo` is the README's main command.
"""

from .build import SPLITS, build_pools, build_problem, input_statistics, load_data, pool_tensors, standardize_tensors
from .demo import demo_settings, format_demo_summary, run_demo
from .run import RunContext
from .settings import DataSettings, ObjectiveSettings, RunSettings, stage_settings
from .stages import (
    curvature_checkpoint,
    edit_checkpoint,
    edit_stage,
    evals_json,
    evaluate_checkpoint,
    evaluate_stage,
    influence_checkpoint,
    influence_stage,
    refine_checkpoint,
    refine_stage,
    removal_from_scores,
    removal_from_task_ids,
    train_run,
    train_stage,
)

__all__ = [
    "SPLITS", "curvature_checkpoint", "DataSettings", "ObjectiveSettings", "RunContext", "RunSettings", "build_pools", "build_problem", "demo_settings",
    "edit_checkpoint", "edit_stage", "evals_json", "evaluate_checkpoint", "evaluate_stage", "format_demo_summary", "influence_checkpoint",
    "influence_stage", "input_statistics", "load_data", "pool_tensors", "refine_checkpoint", "refine_stage", "removal_from_scores",
    "removal_from_task_ids", "run_demo", "stage_settings", "standardize_tensors", "train_run", "train_stage",
]
