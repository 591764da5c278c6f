"""Models used functionally: their parameters live in a flat λ, the module is only a template.

Normalisation matters for influence (docs/method.md §1.4): batch statistics make one example's loss depend on
the whole batch, so ``norm='group'`` or ``'none'`` is preferred for instance-level influence runs (batch statistics are
per task, so task-level removal stays exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SettingsError


# relu is piecewise linear: its derivative jumps, so θ(λ) = λ − α∇L_S(λ) and the MAML meta-objective jump where
# a pre-activation crosses 0 (measured on a Conv4 pool: a step of 1e-5 along −∇F raised F by 129× the decrease
# the gradient predicts; benchmarks/smoothness_scan.py); the others are smooth, so F is twice differentiable
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "softplus": nn.Softplus, "silu": nn.SiLU, "gelu": nn.GELU}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise SettingsError(f"unknown activation {name!r}; use one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


@dataclass
class ModelSettings:
    kind: str = field(default="mlp", metadata={"help": "model family: mlp | conv4"})
    hidden: tuple[int, ...] = field(default=(64, 64), metadata={"help": "MLP hidden widths"})
    width: int = field(default=32, metadata={"help": "Conv4 filters per block"})
    norm: str = field(default="none", metadata={"help": "Conv4 normalisation: none | group | batch (batch statistics)"})
    groups: int = field(default=4, metadata={"help": "groups for norm=group"})
    pool: str = field(default="max", metadata={"help": "Conv4 downsampling: max (conv stride 1 + 2×2 max-pool) | stride (stride-2 convs, no pooling, as Finn et al.'s Omniglot model: about 4× fewer conv operations)", "choices": ("max", "stride")})
    activation: str = field(default="relu", metadata={"help": "MLP activation: relu | tanh | softplus | silu | gelu (the smooth ones: exact finite-difference checks)", "choices": tuple(ACTIVATIONS)})
    conv_activation: str = field(default="relu", metadata={"help": "Conv4 activation: relu | silu | gelu | softplus | tanh. With relu the second-order meta-objective is discontinuous (the inner step's gradient jumps where a pre-activation crosses 0), so refine cannot reach a tight ‖∇F‖; a smooth one makes F twice differentiable (docs/training.md)", "choices": tuple(ACTIVATIONS)})

    def validate(self) -> None:
        """Refuse unknown choices before any data is loaded (the model itself is built later)."""
        if self.kind not in ("mlp", "conv4"):
            raise SettingsError(f"unknown model kind {self.kind!r}; use mlp or conv4")
        if self.norm not in ("none", "group", "batch"):
            raise SettingsError(f"unknown norm {self.norm!r}; use none, group or batch")
        if self.pool not in ("max", "stride"):
            raise SettingsError(f"unknown Conv4 pool {self.pool!r}; use max or stride")
        for name in (self.activation, self.conv_activation):
            _activation(name)  # refuses an unknown name
        if self.width < 1 or self.groups < 1:
            raise SettingsError(f"width and groups must be ≥ 1, got {self.width} and {self.groups}")


class MLP(nn.Module):
    """Fully connected network (ReLU by default); flattens its input."""

    def __init__(self, in_features: int, out_features: int, hidden: tuple[int, ...] = (40, 40), activation: str = "relu"):
        super().__init__()
        dims = (in_features, *hidden)
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), _activation(activation)]
        layers.append(nn.Linear(dims[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class TaskBatchNorm(nn.Module):
    """Batch norm on the batch's own statistics (no running buffers), as in MAML's transductive setting: the
    function of ``nn.BatchNorm2d(width, track_running_stats=False)`` with the same parameters, written in plain
    tensor operations. Why not the native kernel: torch (2.13) differentiates it wrongly beyond second order, which
    MAML's inner step reaches — Hessian products through the inner step 15–37% off central differences, the gradient
    of a vmapped batch up to 1% off (benchmarks/batchnorm_derivatives.py); every derivative of this one is right
    (tests/test_smooth_conv4.py)."""

    def __init__(self, width: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        var = (x - mean).square().mean(dim=(0, 2, 3), keepdim=True)  # biased, as batch norm normalises
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


class PlainLayerNorm(nn.Module):
    """``nn.LayerNorm`` (the same function, arguments and parameter names) in plain tensor operations. Why: torch's
    native layer-norm kernel is differentiated wrongly beyond second order (the same fault as batch norm's), which the
    exact total Hessian through an inner step reaches; this one's matches central differences (tests/test_hessians.py)."""

    def __init__(self, normalized_shape: int | tuple[int, ...], eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(self.normalized_shape)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(self.normalized_shape)) if elementwise_affine and bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        var = (x - mean).square().mean(dim=dims, keepdim=True)  # biased, as layer norm normalises
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


def _norm(kind: str, width: int, groups: int) -> nn.Module:
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        return nn.GroupNorm(min(groups, width), width)
    if kind == "batch":
        return TaskBatchNorm(width)
    raise SettingsError(f"unknown norm {kind!r}; use none, group or batch")


class Conv4(nn.Module):
    """The standard four-block few-shot CNN: [conv3×3 → norm → ReLU → max-pool 2] × 4 → linear
    (``activation`` replaces the ReLU; a smooth one makes the second-order meta-objective twice differentiable).

    ``pool='stride'`` replaces each conv + max-pool by a stride-2 conv (padding 1), as in Finn et al.'s
    Omniglot model: the side shrinks s → ⌈s/2⌉ (28 → 14 → 7 → 4 → 2) instead of ⌊s/2⌋ (28 → 1), and each
    conv is evaluated at the output resolution only, so the same parameters cost about 4× fewer operations.
    """

    def __init__(self, in_channels: int, image_size: int, out_features: int, width: int = 64, norm: str = "none", groups: int = 4,
                 pool: str = "max", activation: str = "relu"):
        super().__init__()
        if pool not in ("max", "stride"):
            raise SettingsError(f"unknown Conv4 pool {pool!r}; use max or stride")
        blocks: list[nn.Module] = []
        c, s = in_channels, image_size
        for _ in range(4):
            if pool == "max" and s < 2:  # a stride-2 conv maps any side ≥ 1 to ⌈s/2⌉ ≥ 1
                raise SettingsError(f"images of {image_size}px are too small for Conv4 with max-pooling (four 2× poolings need at least 16px); use --image-size 16 or more where the dataset resizes, --model-pool stride, or the mlp model")
            if pool == "max":
                blocks += [nn.Conv2d(c, width, 3, padding=1), _norm(norm, width, groups), _activation(activation), nn.MaxPool2d(2)]
                s = s // 2
            else:
                blocks += [nn.Conv2d(c, width, 3, stride=2, padding=1), _norm(norm, width, groups), _activation(activation)]
                s = (s + 1) // 2
            c = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(width * s * s, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def build_model(settings: ModelSettings, input_shape: tuple[int, ...], out_features: int) -> nn.Module:
    """Build the model template for inputs of ``input_shape`` (one example, e.g. (C, H, W))."""
    if settings.kind == "mlp":
        n_in = 1
        for d in input_shape:
            n_in *= d
        return MLP(n_in, out_features, tuple(settings.hidden), settings.activation)
    if settings.kind == "conv4":
        if len(input_shape) != 3:
            raise SettingsError(f"conv4 needs image inputs (C, H, W), got shape {tuple(input_shape)}; use the mlp model")
        return Conv4(input_shape[0], input_shape[-1], out_features, settings.width, settings.norm, settings.groups, settings.pool,
                     settings.conv_activation)
    raise SettingsError(f"unknown model kind {settings.kind!r}; use mlp or conv4")
