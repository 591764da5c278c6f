"""Flat meta-parameter vectors.

Influence needs λ as one vector (solvers, HVPs, parameter changes), while models want a dict of
named tensors for ``torch.func.functional_call``. :class:`ParamSpec` converts between the two with
differentiable views, so every torch.func transform sees through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ParamSpec:
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_module(cls, module: nn.Module) -> "ParamSpec":
        """The module's trainable parameters (``requires_grad``): a frozen layer is a constant of the model, as a
        buffer is, so it is neither meta-learned, adapted nor scored."""
        named = [(n, tuple(p.shape)) for n, p in module.named_parameters() if p.requires_grad]
        return cls(tuple(n for n, _ in named), tuple(s for _, s in named))

    @property
    def numels(self) -> tuple[int, ...]:
        out = []
        for s in self.shapes:
            k = 1
            for d in s:
                k *= d
            out.append(k)
        return tuple(out)

    @property
    def dim(self) -> int:
        return sum(self.numels)

    def flatten(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(flat, self.numels)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes)}

    def to_json(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}
