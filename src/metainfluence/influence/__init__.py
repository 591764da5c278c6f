"""The influence stage: total gradients, total-Hessian products, task-IF, instance-IF, editing (solvers live in linalg)."""

from .editing import EditResult, Removal, edit_model, unlearn
from ..meta.curvature import HESSIANS, TotalHessian
from .instance_if import instance_influence
from .pairwise import PairwiseResult, pairwise_influence
from .reliability import measurement_reliability
from .results import METHODS, SIGN_CONVENTION, InfluenceResult, InfluenceSettings
from ..linalg import SolverSettings, solve_ihvp
from .task_if import task_influence, task_parameter_changes

__all__ = ["EditResult", "HESSIANS", "METHODS", "Removal", "SIGN_CONVENTION", "InfluenceResult", "InfluenceSettings",
           "PairwiseResult", "SolverSettings", "TotalHessian", "edit_model", "instance_influence", "measurement_reliability", "pairwise_influence", "solve_ihvp", "task_influence",
           "task_parameter_changes", "unlearn"]
