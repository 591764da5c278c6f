"""The operator an influence computation uses, built from its settings, and the fingerprint of
what an approximation of that operator (eigenpairs, a curvature sketch) depends on."""

from __future__ import annotations

from typing import Any

import torch

from ..io import fingerprint
from ..meta.checkpoint import tensors_fingerprint
from ..meta.curvature import TotalHessian
from ..meta.objective import MetaProblem
from ..tasks.tensors import TaskTensors


def build_hessian(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, settings: Any, kind: str | None = None, **weights) -> TotalHessian:
    precision = getattr(settings, "products", "working")
    product_dtype = torch.float32 if precision == "float32" and lam.dtype != torch.float32 else None
    return TotalHessian(problem, lam, tasks, kind or settings.hessian, fisher_samples=settings.fisher_samples, seed=settings.seed,
                        product_dtype=product_dtype, **weights)


def curvature_fingerprint(op: TotalHessian, ignore_weights: bool = False, **fit: Any) -> str:
    """What an approximation of ``op`` depends on: λ, the pool and its weights, the Hessian kind, the
    problem and the fit settings ``fit`` (damping is applied at solve time and is not part of it)."""
    weights = {} if ignore_weights else {k: getattr(op, k) for k in ("w", "v", "u") if getattr(op, k) is not None}
    fisher = {"fisher_samples": op.fisher_samples, "seed": op.seed} if op.kind == "fisher" else {}
    return fingerprint({"lam": op.lam, "pool": tensors_fingerprint(op.tasks), "weights": weights, "kind": op.kind,
                        "problem": op.problem.settings_json(), **fisher, "fit": fit}, 32)
