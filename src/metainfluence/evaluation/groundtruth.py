"""Ground truth for influence estimates (docs/method.md §10): leave-one-out and LDS by actual re-optimisation.

Removing task k means w_k = 0 with the 1/n normalisation kept (docs/method.md §1), which is exactly what the
influence derivative predicts. Both the control and every reduced run start from λ* and use the
identical refine procedure, so optimiser drift cancels in Δf_k = f(λ_{−k}) − f(λ_ctrl).

Runs are resumable: each finished unit (one left-out task, one subset) is written atomically to
``out_dir`` and skipped when the command is run again with the same settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..config import with_new_defaults
from ..errors import CheckpointError, SettingsError
from ..io import read_json, read_tensors, write_json, write_tensors
from ..meta.checkpoint import lam_digest
from ..meta.objective import MetaProblem
from ..meta.refine import RefineSettings, refine
from ..progress import bar
from ..tasks.tensors import TaskTensors


@dataclass
class GroundTruthSettings:
    n_loo: int = field(default=20, metadata={"help": "tasks left out one at a time (a seeded sample of the pool)"})
    n_subsets: int = field(default=0, metadata={"help": "LDS: random subsets to refine on (0 = skip LDS)"})
    subset_fraction: float = field(default=0.5, metadata={"help": "LDS: fraction α of the pool kept in each subset"})
    seed: int = field(default=0, metadata={"help": "seed of the task sample and the subsets"})
    method: str = field(default="lbfgs", metadata={"help": "re-optimiser: lbfgs (refine stage) | newton (exact-Hessian Newton; small models, converges to the nearby stationary point)"})
    newton_max_iter: int = field(default=40, metadata={"help": "Newton iterations per re-optimisation (method newton)"})
    proximal: float = field(default=0.0, metadata={"help": "re-optimise F_R(λ) + (γ/2)‖λ − λ*‖² instead of F_R (the proximal response of Bae et al. 2022, "
                                                           "what a damped influence function estimates when F is not convex); γ = 0: plain re-optimisation"})

    def validate(self, n: int) -> None:
        if not 0 <= self.n_loo <= n:
            raise SettingsError(f"n_loo = {self.n_loo} but the pool has {n} tasks; choose 0..{n}")
        if self.n_subsets < 0 or not 0 < self.subset_fraction < 1:
            raise SettingsError("LDS needs n_subsets ≥ 0 and 0 < subset_fraction < 1")
        if not (self.proximal >= 0):
            raise SettingsError(f"proximal γ must be ≥ 0, got {self.proximal}")
        if self.method not in ("lbfgs", "newton"):
            raise SettingsError(f"unknown ground-truth method {self.method!r}; use lbfgs or newton")


def reoptimise(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors, settings: GroundTruthSettings,
               refine_settings: RefineSettings, w: torch.Tensor | None = None, anchor: torch.Tensor | None = None) -> tuple[torch.Tensor, float]:
    """Re-optimise F(λ; w) from ``lam`` with the configured method; returns (λ, final ‖∇F‖).
    With ``settings.proximal`` = γ > 0 the objective is F + (γ/2)‖λ − anchor‖² (anchor: ``lam`` by default)."""
    centre = lam if anchor is None else anchor
    if settings.method == "newton":
        from ..meta.newton import newton_refine

        if anchor is not None and settings.proximal:
            raise SettingsError("the newton ground truth centres its proximal term on its starting point; use method lbfgs with an anchor")
        out, rep = newton_refine(problem, lam, tasks, w, tol=refine_settings.tol, max_iter=settings.newton_max_iter, proximal=settings.proximal)
        return out, rep["grad_norm"]
    out, rep = refine(problem, lam, tasks, refine_settings, w=w, proximal=(settings.proximal, centre) if settings.proximal else None)
    return out, rep.grad_norm_after


def validation_loss(problem: MetaProblem, lam: torch.Tensor, val_tasks: TaskTensors) -> float:
    """The default measurement f (docs/method.md §5): mean query loss of the validation pool after adaptation."""
    return float(problem.task_losses(lam.to(val_tasks.query_x.dtype if val_tasks.query_x.is_floating_point() else lam.dtype), val_tasks).mean())


_UNIT_PREFIXES = (".manifest.json.", ".control.", ".loo_", ".subset_")


def _key(settings: Any) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Store:
    """One JSON (+ optional tensors) per finished unit, keyed by a hash of the run's settings."""

    def __init__(self, out_dir: str | Path | None, key: dict[str, Any]):
        self.dir = Path(out_dir) if out_dir else None
        self.key = _key(key)
        if self.dir is not None:
            manifest = self.dir / "manifest.json"
            if manifest.exists():
                old = read_json(manifest, "ground-truth manifest")
                if isinstance(old, dict) and old.get("key") != self.key and \
                        _key(_unit_settings(with_new_defaults(old.get("settings"), key, _DEFAULTS))) == self.key:
                    # written by a version without a since-added default field, or one that keyed the store
                    # by its sample: the units are the same, so the folder is kept and its manifest renewed
                    write_json(manifest, {"key": self.key, "settings": key})
                elif not isinstance(old, dict) or old.get("key") != self.key:
                    raise CheckpointError(f"{self.dir} holds ground truth of other settings; use another --out folder or delete it")
            # A run killed inside an atomic write leaves its temporary file (".NAME.xxxx.tmp"); that
            # unit is redone on resume, so the leftover is removed (one writer per folder).
            if self.dir.is_dir():
                for stale in self.dir.glob(".*.tmp"):
                    if stale.name.startswith(_UNIT_PREFIXES):
                        stale.unlink(missing_ok=True)
            if not manifest.exists():
                write_json(manifest, {"key": self.key, "settings": key})

    def get(self, name: str) -> tuple[dict, dict[str, torch.Tensor]] | None:
        if self.dir is None or not (self.dir / f"{name}.json").exists():
            return None
        info = read_json(self.dir / f"{name}.json", "ground-truth unit")
        tensors = read_tensors(self.dir / f"{name}.safetensors") if (self.dir / f"{name}.safetensors").exists() else {}
        return info, tensors

    def put(self, name: str, info: dict, tensors: dict[str, torch.Tensor] | None = None) -> None:
        if self.dir is None:
            return
        if tensors:
            write_tensors(self.dir / f"{name}.safetensors", tensors)
        write_json(self.dir / f"{name}.json", info)  # written last: marks the unit complete


_DEFAULTS = {"gt": asdict(GroundTruthSettings()), "refine": asdict(RefineSettings())}


def measurement_sha256(val_tasks: TaskTensors) -> str:
    """Fingerprint of the measurement pool (its tensors, dtype-independent): a unit's f holds only for it."""
    h = hashlib.sha256()
    for t in (val_tasks.support_x, val_tasks.support_y, val_tasks.query_x, val_tasks.query_y):
        t = t.detach().cpu()
        h.update((t.float() if t.is_floating_point() else t.long()).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# Fields that choose *which* units a run computes, not what any unit holds: a unit loo_k (task k left out)
# or subset_m (the m-th seeded mask, drawn in sequence) is the same whatever the sample's size, so growing
# a sample (--set detection.loo_tasks=40 after 16) reuses every finished unit instead of refusing the folder.
_SAMPLE_FIELDS = {"loo": ("n_loo", "n_subsets", "subset_fraction", "seed"), "lds": ("n_loo", "n_subsets")}


def _unit_settings(key: Any) -> Any:
    """A store's key without its sample-choosing fields (also applied to manifests written with them)."""
    if not isinstance(key, dict) or key.get("kind") not in _SAMPLE_FIELDS:
        return key
    out = {k: v for k, v in key.items() if k != "sample"}
    if isinstance(out.get("gt"), dict):
        out["gt"] = {k: v for k, v in out["gt"].items() if k not in _SAMPLE_FIELDS[key["kind"]]}
    return out


def _open_store(kind: str, out_dir, problem: MetaProblem, lam_star: torch.Tensor, n: int,
                settings: GroundTruthSettings, refine_settings: RefineSettings, anchor: torch.Tensor | None = None) -> _Store:
    """The resumable store of one ground-truth run, keyed by everything that determines its units' numbers."""
    key = {"kind": kind, "n": n, "gt": asdict(settings), "refine": asdict(refine_settings), "lam_sha256": lam_digest(lam_star),
           "problem": problem.settings_json()}
    if anchor is not None:
        key["anchor_sha256"] = lam_digest(anchor)
    return _Store(out_dir, _unit_settings(key))


def leave_one_out(
    problem: MetaProblem,
    lam_star: torch.Tensor,
    tasks: TaskTensors,
    val_tasks: TaskTensors,
    settings: GroundTruthSettings,
    refine_settings: RefineSettings | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    anchor: torch.Tensor | None = None,
    sample: Sequence[int] | None = None,
) -> dict[str, Any]:
    """True Δf_k and Δλ_k for a seeded sample of tasks, by refining with w_k = 0 (docs/method.md §10).

    ``sample``: the tasks to leave out (distinct pool positions), instead of ``settings.n_loo`` drawn with
    ``settings.seed``; e.g. a sample stratified by corruption. ``anchor``: centre of the proximal term when ``settings.proximal`` > 0 (default ``lam_star``). Anchored at
    the trained λ with λ* the minimiser of F + (γ/2)‖λ − anchor‖², the control stays at λ* and the
    ground truth is the response of that proximal objective (docs/method.md §10)."""
    n = len(tasks)
    settings.validate(n)
    refine_settings = refine_settings or RefineSettings(tol=1e-8, max_iter=500)
    if sample is None:
        gen = torch.Generator().manual_seed(settings.seed)
        sample = torch.randperm(n, generator=gen)[: settings.n_loo].sort().values
    else:
        given = [int(k) for k in sample]
        if len(set(given)) != len(given) or any(not 0 <= k < n for k in given):
            raise SettingsError(f"leave-one-out sample must be distinct task positions in 0..{n - 1}; got {given[:10]}")
        sample = torch.tensor(sorted(given), dtype=torch.long)
    store = _open_store("loo", out_dir, problem, lam_star, n, settings, refine_settings, anchor)
    t0 = time.perf_counter()
    # The re-optimised λ's do not depend on the measurement, f does: units kept under another validation
    # pool (or before the pool was recorded) are re-measured from their kept λ, not re-optimised.
    measured_on = measurement_sha256(val_tasks)
    val_as: dict[torch.dtype, TaskTensors] = {}  # the pool converted once per dtype, not once per unit

    def measure(lam: torch.Tensor) -> float:
        if lam.dtype not in val_as:
            val_as[lam.dtype] = val_tasks.to(dtype=lam.dtype)
        return validation_loss(problem, lam, val_as[lam.dtype])

    def remeasure(name: str, info: dict, lam: torch.Tensor) -> float:
        """f of a kept unit on this pool: as measured, else from its kept λ (then kept under ``f_on``)."""
        if info.get("val_sha256") == measured_on:
            return info["f"]
        f_on = info.get("f_on", {})
        if measured_on not in f_on:
            f_on = {**f_on, measured_on: measure(lam)}
            store.put(name, {**info, "f_on": f_on})  # json only: the next resume on this pool measures nothing
        return f_on[measured_on]

    done = store.get("control")
    computed = int(done is None)
    if done is None:
        lam_ctrl, gn = reoptimise(problem, lam_star, tasks, settings, refine_settings, anchor=anchor)
        f_ctrl = measure(lam_ctrl)
        store.put("control", {"f": f_ctrl, "grad_norm": gn, "val_sha256": measured_on}, {"lam": lam_ctrl})
    else:
        lam_ctrl = done[1]["lam"]
        f_ctrl = remeasure("control", done[0], lam_ctrl)
    deltas_f, deltas_lam, grad_norms, unit_seconds = [], [], [], []
    for j, k in enumerate(bar("leave-one-out", len(sample), "task", iterable=sample.tolist())):
        unit = store.get(f"loo_{k}")
        if unit is None:
            w = torch.ones(n, dtype=torch.float64)
            w[k] = 0
            tu = time.perf_counter()
            lam_k, gn = reoptimise(problem, lam_star, tasks, settings, refine_settings, w, anchor=anchor)
            f_k = measure(lam_k)
            info = {"task": k, "f": f_k, "grad_norm": gn, "seconds": time.perf_counter() - tu, "val_sha256": measured_on}
            store.put(f"loo_{k}", info, {"delta_lam": lam_k - lam_ctrl})
            computed += 1
            dl = lam_k - lam_ctrl
        else:
            info, dl = unit[0], unit[1]["delta_lam"]
            info = {**info, "f": remeasure(f"loo_{k}", info, lam_ctrl + dl)}
        deltas_f.append(info["f"] - f_ctrl)
        unit_seconds.append(info.get("seconds"))  # absent in units written before it was recorded
        deltas_lam.append(dl)
        grad_norms.append(info["grad_norm"])
        if progress:
            progress(f"leave-one-out {j + 1}/{len(sample)}: task {k}, Δf = {info['f'] - f_ctrl:+.3e}")
    return {
        "tasks": sample,
        "true_delta_f": torch.tensor(deltas_f, dtype=torch.float64),
        "true_delta_lam": torch.stack(deltas_lam) if deltas_lam else torch.zeros(0, lam_star.numel()),
        "f_control": f_ctrl,
        "max_grad_norm": max(grad_norms) if grad_norms else 0.0,
        "seconds": time.perf_counter() - t0,
        "unit_seconds": unit_seconds,
        "units_computed": computed,  # 0: every unit came from out_dir
    }


def lds_ground_truth(
    problem: MetaProblem,
    lam_star: torch.Tensor,
    tasks: TaskTensors,
    val_tasks: TaskTensors,
    settings: GroundTruthSettings,
    refine_settings: RefineSettings | None = None,
    out_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
    anchor: torch.Tensor | None = None,
) -> dict[str, Any]:
    """f after refining on M random subsets keeping a fraction α of the tasks (docs/method.md §10)."""
    n = len(tasks)
    settings.validate(n)
    refine_settings = refine_settings or RefineSettings(tol=1e-8, max_iter=500)
    gen = torch.Generator().manual_seed(settings.seed + 1)
    keep = max(1, round(settings.subset_fraction * n))
    masks = torch.zeros(settings.n_subsets, n, dtype=torch.bool)
    for m in range(settings.n_subsets):
        masks[m, torch.randperm(n, generator=gen)[:keep]] = True
    store = _open_store("lds", out_dir, problem, lam_star, n, settings, refine_settings, anchor)
    values, unit_seconds, computed = [], [], 0
    measured_on = measurement_sha256(val_tasks)
    for m in bar("LDS subsets", settings.n_subsets, "subset", iterable=range(settings.n_subsets)):
        unit = store.get(f"subset_{m}")
        if unit is None:
            tu = time.perf_counter()
            lam_m, gn = reoptimise(problem, lam_star, tasks, settings, refine_settings, masks[m].double(), anchor=anchor)
            info = {"f": validation_loss(problem, lam_m, val_tasks.to(dtype=lam_m.dtype)), "grad_norm": gn, "seconds": time.perf_counter() - tu,
                    "val_sha256": measured_on}
            store.put(f"subset_{m}", info)
            computed += 1
        else:
            info = unit[0]
            if info.get("val_sha256", measured_on) != measured_on:  # a subset keeps f only, not its λ: it cannot be re-measured
                raise CheckpointError(f"{out_dir} holds LDS subsets measured on another validation pool; use another --out folder or delete it")
        values.append(info["f"])
        unit_seconds.append(info.get("seconds"))
        if progress:
            progress(f"LDS subset {m + 1}/{settings.n_subsets}: f = {info['f']:.4f}")
    return {"masks": masks, "true_f": torch.tensor(values, dtype=torch.float64), "unit_seconds": unit_seconds, "units_computed": computed}
