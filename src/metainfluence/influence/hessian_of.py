"""The operator an influence computation uses, built from its settings, and the fingerprint of
what an approximation of that operator (eigenpairs, a curvature sketch) depends on."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SettingsError
from ..io import fingerprint
from ..linalg import apply_block
from ..meta.checkpoint import tensors_fingerprint
from ..meta.curvature import TotalHessian
from ..meta.objective import MetaProblem
from ..tasks.tensors import TaskTensors


def build_hessian(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, settings: Any, kind: str | None = None, **weights) -> TotalHessian:
    precision = getattr(settings, "products", "working")
    product_dtype = torch.float32 if precision == "float32" and lam.dtype != torch.float32 else None
    return TotalHessian(problem, lam, tasks, kind or settings.hessian, fisher_samples=settings.fisher_samples, seed=settings.seed,
                        product_dtype=product_dtype, **weights)


def curvature_fingerprint(op: TotalHessian, ignore_weights: bool = False, as_kind: dict[str, Any] | None = None, **fit: Any) -> str:
    """What an approximation of ``op`` depends on: λ, the pool and its weights, the Hessian kind, the
    problem and the fit settings ``fit`` (damping is applied at solve time and is not part of it).
    ``as_kind`` ({hessian, fisher_samples, seed} of a fit) puts another kind in place of ``op``'s own. The plain
    fingerprint is kept on the operator: a curvature file checked before the passes is checked again at the solve."""
    plain = not ignore_weights and as_kind is None and not fit
    if plain and getattr(op, "_fingerprint", None) is not None:
        return op._fingerprint
    weights = {} if ignore_weights else {k: getattr(op, k) for k in ("w", "v", "u") if getattr(op, k) is not None}
    kind = {"hessian": op.kind, "fisher_samples": op.fisher_samples, "seed": op.seed} if as_kind is None else as_kind
    fisher = {"fisher_samples": kind["fisher_samples"], "seed": kind["seed"]} if kind["hessian"] == "fisher" else {}
    digest = fingerprint({"lam": op.lam, "pool": tensors_fingerprint(op.tasks), "weights": weights, "kind": kind["hessian"],
                          "problem": op.problem.settings_json(), **fisher, "fit": fit}, 32)
    if plain:
        op._fingerprint = digest
    return digest


def effective_damping(op: TotalHessian, settings: Any) -> float:
    """δ itself, or δ × the mean eigenvalue tr(H)/p (Hutchinson, 16 Rademacher probes, cached on the
    operator) so that one damping setting means the same for every Hessian kind and model."""
    if settings.damping_mode == "absolute":
        return settings.damping
    if getattr(op, "_mean_eigenvalue", None) is None:
        g = torch.Generator().manual_seed(settings.seed + 7)
        Z = (torch.randint(0, 2, (op.dim, 16), generator=g) * 2 - 1).to(dtype=op.dtype, device=op.device)
        op._mean_eigenvalue = float((Z * apply_block(op, Z)).sum(0).mean()) / op.dim
    if op._mean_eigenvalue <= 0:
        raise SettingsError(f"relative damping needs a positive mean eigenvalue; this {op.kind} Hessian has trace/p = {op._mean_eigenvalue:.3g} — use absolute damping")
    return settings.damping * op._mean_eigenvalue
