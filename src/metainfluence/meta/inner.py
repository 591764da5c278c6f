"""The inner loop's settings: how each task adapts its parameters θ_i from λ (docs/method.md §1).

``adapt`` chooses which parameters the inner loop moves. MAML moves all of them; ANIL (Raghu et al., 2020) only
the head, the last layer. Every other parameter is still meta-learned by the outer loop, and is shared by every
task's θ_i. The unrolled step becomes θ ← θ − α M ∇L_in(θ), where M is a 0/1 mask on the flat parameter vector.
The step differentiates the inner objective with respect to the adapted parameters alone, passed to the network
apart from the others, so that its backward pass stops at the head instead of running through the whole network
(a flat vector holding both would make autograd differentiate every layer, to throw the body's part away).
Everything downstream (total gradients, total Hessian products, Gauss–Newton and fisher factors, the edits) is
differentiated through that step, so it uses the same inner loop as training without further changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import SettingsError
from .params import ParamSpec


@dataclass
class InnerSettings:
    kind: str = field(default="unrolled", metadata={"help": "inner solver: unrolled (MAML, exact autodiff) | implicit (iMAML, proximal + IFT)"})
    steps: int = field(default=1, metadata={"help": "inner gradient steps K"})
    lr: float = field(default=0.4, metadata={"help": "inner step size α"})
    first_order: bool = field(default=False, metadata={"help": "first-order MAML (stop gradients through inner gradients); unrolled only"})
    proximal: float = field(default=0.0, metadata={"help": "proximal strength γ of (γ/2)‖θ−λ‖² in the inner objective; implicit needs γ > 0"})
    implicit_cg_steps: int = field(default=30, metadata={"help": "CG iterations for the implicit-function-theorem solve (implicit only)"})
    eval_steps: int = field(default=0, metadata={"help": "inner steps when evaluating (meta-test accuracy) only; 0 = steps. Training, refine and influence always use steps (e.g. 1 in training, 3 at test, as Finn et al.)"})
    adapt: str = field(default="all", metadata={"help": "which parameters the inner loop adapts: all (MAML) | head (ANIL: the model's last layer with parameters) | "
                                                        "comma-separated parameter names or name prefixes (e.g. head.weight,head.bias); the others are "
                                                        "meta-learned and shared by every task. Unrolled only"})

    def for_evaluation(self) -> "InnerSettings":
        """These settings with ``steps`` replaced by ``eval_steps`` (themselves when it is 0)."""
        if not self.eval_steps or self.eval_steps == self.steps:
            return self
        return replace(self, steps=self.eval_steps)

    def validate(self) -> None:
        if self.kind not in ("unrolled", "implicit"):
            raise SettingsError(f"unknown inner solver {self.kind!r}; use unrolled or implicit")
        if self.eval_steps < 0:
            raise SettingsError(f"eval_steps must be ≥ 0 (0 = steps), got {self.eval_steps}")
        if self.steps < 0 or (self.kind == "implicit" and self.steps < 1):
            raise SettingsError(f"inner steps must be ≥ 0 (≥ 1 for implicit), got {self.steps}")
        if self.lr <= 0:
            raise SettingsError(f"inner lr must be positive, got {self.lr}")
        if self.proximal < 0:
            raise SettingsError(f"proximal γ must be ≥ 0, got {self.proximal}")
        if self.kind == "implicit" and self.proximal <= 0:
            raise SettingsError("the implicit inner solver needs a proximal term: set proximal γ > 0 (e.g. 1.0)")
        if self.kind == "implicit" and self.first_order:
            raise SettingsError("first_order applies to the unrolled inner solver only")
        if not isinstance(self.adapt, str) or not self.adapt.strip():
            raise SettingsError(f"inner adapt must be all, head or comma-separated parameter names, got {self.adapt!r}")
        if self.kind == "implicit" and self.adapt.strip() != "all":
            # its derivative γ(∇²L_S + γI)⁻¹ is over every parameter; a partial one would need another solve
            raise SettingsError(f"inner adapt={self.adapt!r} (ANIL-style) needs the unrolled inner solver: the implicit one adapts every "
                                "parameter; use --inner-kind unrolled or --inner-adapt all")


def adapted_names(spec: ParamSpec, adapt: str) -> tuple[str, ...]:
    """The parameter names the inner loop moves under ``adapt`` (all of them for 'all')."""
    adapt = adapt.strip()
    if adapt == "all":
        return spec.names
    if adapt == "head":
        # the last module holding trainable parameters: its parameters share the name up to the last dot
        module = lambda name: name.rsplit(".", 1)[0] if "." in name else ""
        last = module(spec.names[-1])
        return tuple(n for n in spec.names if module(n) == last)
    wanted = [w.strip() for w in adapt.split(",") if w.strip()]
    chosen = tuple(n for n in spec.names if any(n == w or n.startswith(w + ".") for w in wanted))
    unmatched = [w for w in wanted if not any(n == w or n.startswith(w + ".") for n in spec.names)]
    if unmatched or not chosen:
        raise SettingsError(f"inner adapt names {', '.join(unmatched or wanted)} match no trainable parameter of the model; its parameters are "
                            f"{', '.join(spec.names[:12])}{' …' if len(spec.names) > 12 else ''} (use all, head, or these names or their prefixes)")
    return chosen


class AdaptedPart:
    """The entries of flat λ that an ANIL-style inner loop moves (``adapt`` other than 'all'): their ranges, and
    the parameters they hold, so that a step can be taken on them alone."""

    def __init__(self, spec: ParamSpec, adapt: str):
        names = set(adapted_names(spec, adapt))
        self.layout = tuple((n, k, s) for n, k, s in zip(spec.names, spec.numels, spec.shapes) if n in names)
        runs: list[list[int]] = []
        start = 0
        for n, k in zip(spec.names, spec.numels):
            if n in names:
                if runs and runs[-1][1] == start:  # neighbouring parameters make one range
                    runs[-1][1] = start + k
                else:
                    runs.append([start, start + k])
            start += k
        self.runs = tuple((a, b) for a, b in runs)
        # the 0/1 mask M on flat λ (float64), for the formulas that take the step as θ ← θ − αM∇L_in
        self.mask = torch.cat([torch.full((k,), float(n in names), dtype=torch.float64) for n, k in zip(spec.names, spec.numels)])

    @classmethod
    def of(cls, spec: ParamSpec, adapt: str) -> "AdaptedPart | None":
        """The part ``adapt`` names, or None when it names every parameter (MAML)."""
        return None if len(adapted_names(spec, adapt)) == len(spec.names) else cls(spec, adapt)

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """The adapted entries h of a flat vector, in order."""
        return torch.cat([flat[a:b] for a, b in self.runs])

    def put(self, flat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """``flat`` with its adapted entries replaced by ``h``."""
        parts, at, used = [], 0, 0
        for a, b in self.runs:
            parts += [flat[at:a], h[used:used + b - a]]
            at, used = b, used + b - a
        return torch.cat(parts + [flat[at:]])

    def params(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        """The adapted parameters as named tensors (views of ``h``)."""
        parts = torch.split(h, [k for _, k, _ in self.layout])
        return {n: t.view(s) for (n, _, s), t in zip(self.layout, parts)}
