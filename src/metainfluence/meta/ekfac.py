"""Fit EK-FAC (linalg/ekfac.py) to the Fisher of the query loss in θ-space (docs/method.md §4).

For every Linear and Conv2d layer: A = E[ã ãᵀ] (layer inputs with a 1 appended for the bias; for
Conv2d the unfolded patches, averaged over spatial positions as in KFC) and S = E[s sᵀ] (gradients of
the per-example loss with respect to the layer's outputs, summed over positions), with labels SAMPLED
from the model's predictive distribution, so that E[g gᵀ] is the Fisher = Gauss–Newton curvature and
not the empirical Fisher. Then the eigenvalue correction Λ = E[(Q_Sᵀ ∇W Q_A)²] from per-example
gradients, which also fixes KFC's scale. Every other parameter (norm-layer affine parameters) gets
the diagonal E[g²] of the same per-example gradients. Expectations are means over tasks × label draws
× query examples: the mean over tasks of the per-task Gauss–Newton matrix of the mean query loss.

Layer inputs and output gradients are captured with forward hooks on the model template while
``MetaProblem.forward`` runs it through ``functional_call`` (eager, one task at a time): the hooks
see the real inputs at θ_i and add a zero tensor to each output whose gradient is s, so no layer
is re-implemented and norm / pooling layers stay exactly what the model does.

``fit_support_ekfac`` fits the same structure to one task's INNER Hessian (two-stage instance-IF,
docs/method.md §7.3): the Gauss–Newton matrix of the support loss with the exact expectation over
labels (the loss's output-Hessian root backpropagated instead of sampled-label gradients), plus γI.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev, vmap

from ..errors import SettingsError
from ..linalg.ekfac import EKFAC, KroneckerBlock
from ..tasks.tensors import TaskTensors
from .curvature import sample_labels
from .models import TaskBatchNorm
from .objective import MetaProblem


def _layers(problem: MetaProblem) -> list[tuple[str, nn.Module]]:
    out = []
    for name, mod in problem.model.named_modules():
        if isinstance(mod, (nn.modules.batchnorm._BatchNorm, TaskBatchNorm)):
            raise SettingsError("EK-FAC needs per-example gradients, which batch statistics couple; use norm=group or none")
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            raise SettingsError("EK-FAC supports Conv2d with groups=1 only")
        if isinstance(mod, (nn.Linear, nn.Conv2d)):
            trainable = [p.requires_grad for p in (mod.weight, mod.bias) if p is not None]
            if all(trainable):
                out.append((name, mod))
            elif any(trainable):
                raise SettingsError(f"layer {name or type(mod).__name__} has a frozen and a trainable parameter; EK-FAC's blocks "
                                    "need both trainable or both frozen (freeze the whole layer, or use another Hessian)")
            # a frozen layer is a constant of the model: no block
    return out


def _layout(problem: MetaProblem, layers) -> tuple[list[Tensor], Tensor]:
    """Flat indices of each layer's row-major [W | b] matrix, and of every other parameter."""
    offsets, start = {}, 0
    for n, k in zip(problem.spec.names, problem.spec.numels):
        offsets[n] = torch.arange(start, start + k)
        start += k
    used, index = set(), []
    for name, mod in layers:
        pre = f"{name}." if name else ""
        w = offsets[pre + "weight"].reshape(mod.weight.shape[0], -1)  # conv: (out, in·kh·kw), unfold's order
        cols = [w]
        used.add(pre + "weight")
        if mod.bias is not None:
            cols.append(offsets[pre + "bias"][:, None])
            used.add(pre + "bias")
        index.append(torch.cat(cols, 1).reshape(-1))
    rest = [offsets[n] for n in problem.spec.names if n not in used]
    return index, torch.cat(rest) if rest else torch.zeros(0, dtype=torch.long)


@contextlib.contextmanager
def _capture(layers) -> Iterator[dict]:
    """While active, every forward through the template stores, per layer, the input ã (B, in₊₁, T)
    and a zero tensor added to the output (whose gradient is s)."""
    store: dict = {}

    def hook(name, mod):
        def fn(module, inputs, output):
            x = inputs[0]
            if isinstance(mod, nn.Conv2d):
                a = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (B, in·kh·kw, T)
            else:
                a = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)  # (B, in, T) with T the extra dims
            if mod.bias is not None:
                a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
            eps = torch.zeros_like(output, requires_grad=True)
            store[name] = (a.detach(), eps)
            return output + eps
        return fn

    handles = [mod.register_forward_hook(hook(name, mod)) for name, mod in layers]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def _statistics(problem: MetaProblem, layers, theta: Tensor, x: Tensor, y: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per layer (ã (B, in₊₁, T), s (B, out, T)) of one forward/backward of Σ_j ℓ(x_j, y_j; θ)."""
    with _capture(layers) as store:
        loss = problem.loss_fn(problem.forward(theta.detach(), x), y).sum()
        eps = [store[name][1] for name, _ in layers]
        grads = torch.autograd.grad(loss, eps)
    return [(store[name][0], g.reshape(g.shape[0], g.shape[1], -1) if g.ndim > 2 else g[:, :, None])
            for (name, _), g in zip(layers, grads)]


def _fit(problem: MetaProblem, draws: list[tuple], shift: float, info: dict | None, stats, diag_grads) -> EKFAC:
    """EK-FAC from per-layer statistics ``stats(layers, *draw)`` → [(ã, s)] and the gradients of the
    non-layer parameters ``diag_grads(*draw)`` → (rows, |diag|), averaged over the examples x of the
    draws (draw[1]); a draw may contribute several pseudo-examples (rows) per example."""
    if not draws:
        raise SettingsError("EK-FAC needs at least one task to fit")
    layers = _layers(problem)
    index, diag_index = _layout(problem, layers)
    theta0 = draws[0][0]
    dtype, device = theta0.dtype, theta0.device
    A = [None] * len(layers)
    S = [None] * len(layers)
    count = 0
    for draw in draws:  # pass 1: the Kronecker factors
        for j, (a, s) in enumerate(stats(layers, *draw)):
            A_j = torch.einsum("bit,bjt->ij", a, a) / a.shape[2]  # mean over positions (KFC)
            S_j = torch.einsum("bit,bjt->ij", s, s)  # sum over positions: ∇W = Σ_t s_t ã_tᵀ
            A[j] = A_j if A[j] is None else A[j] + A_j
            S[j] = S_j if S[j] is None else S[j] + S_j
        count += draw[1].shape[0]
    # eigh of the factors; the correction below makes KFC's scale irrelevant (only the bases are used)
    bases = [(torch.linalg.eigh(S_j / count)[1], torch.linalg.eigh(A_j / count)[1]) for A_j, S_j in zip(A, S)]
    scale = [torch.zeros(qs.shape[0], qa.shape[0], dtype=dtype, device=device) for qs, qa in bases]
    diag = torch.zeros(diag_index.numel(), dtype=dtype, device=device)
    for draw in draws:  # pass 2: the eigenvalue correction from per-example gradients
        for j, (a, s) in enumerate(stats(layers, *draw)):
            qs, qa = bases[j]
            rotated = torch.einsum("bot,bit,op,iq->bpq", s, a, qs, qa)  # Q_Sᵀ ∇W_j Q_A per example
            scale[j] += (rotated ** 2).sum(0)
        if diag_index.numel():
            diag += (diag_grads(*draw)[:, diag_index] ** 2).sum(0)
    blocks = [KroneckerBlock(idx.to(device), qs, qa, sc / count) for idx, (qs, qa), sc in zip(index, bases, scale)]
    return EKFAC(blocks, diag_index.to(device), diag / count, problem.dim, shift, info)


def _cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def fit_ekfac_on(problem: MetaProblem, draws: Iterable[tuple[Tensor, Tensor, Tensor]], shift: float = 0.0,
                 info: dict | None = None) -> EKFAC:
    """EK-FAC of the mean over all examples of the draws (θ, x, y) — labels already drawn — of the
    per-example Fisher g gᵀ, g = ∇_θ ℓ(x_j, y_j; θ)."""
    draws = [(th, _cast(x, th.dtype), y) for th, x, y in draws]
    one = lambda th, xj, yj: problem.loss_fn(problem.forward(th, xj[None]), yj[None]).sum()
    per_example = lambda th, x, y: vmap(grad(one), in_dims=(None, 0, 0))(th.detach(), x, y)
    return _fit(problem, draws, shift, info, lambda layers, th, x, y: _statistics(problem, layers, th, x, y), per_example)


def check_factorable(problem: MetaProblem) -> None:
    """Refuse (SettingsError) a model EK-FAC cannot factor, before any expensive work."""
    _layers(problem)


def _output_hessian_root(problem: MetaProblem, out: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """(B, m, m): per example j, columns r_jc with Σ_c r_jc r_jcᵀ = v_j ∇²_o ℓ(o_j, y_j), the Hessian
    of the loss in the (flattened, m) network outputs — PSD for cross-entropy and squared error;
    rounding negatives are clamped to 0."""
    shape = out.shape[1:]
    f = lambda o, yj: problem.loss_fn(o.reshape(1, *shape), yj[None]).sum()
    H = vmap(hessian(f))(out.detach().flatten(1), y)
    d, U = torch.linalg.eigh(H)
    return U * (d.clamp_min(0) * v[:, None]).sqrt()[:, None, :]


def _gauss_newton_statistics(problem: MetaProblem, layers, theta: Tensor, x: Tensor, y: Tensor, v: Tensor):
    """Per layer (ã, s) with m pseudo-examples per example: s is the backpropagation of r_jc (one
    backward pass per output m), so Σ_{j,c} (s ãᵀ)(s ãᵀ)ᵀ is the exact Gauss–Newton matrix of
    Σ_j v_j ℓ_j layer by layer — no label sampling."""
    with _capture(layers) as store:
        out = problem.forward(theta.detach(), x)
        R = _output_hessian_root(problem, out, y, v)
        eps = [store[name][1] for name, _ in layers]
        flat = out.flatten(1)
        per_c = [torch.autograd.grad((flat * R[:, :, c]).sum(), eps, retain_graph=c + 1 < R.shape[2]) for c in range(R.shape[2])]
    m = R.shape[2]
    stats = []
    for j, (name, _) in enumerate(layers):
        s = torch.cat([g[j].reshape(g[j].shape[0], g[j].shape[1], -1) for g in per_c])  # (m·B, out, T), c-major
        stats.append((store[name][0].repeat(m, 1, 1), s))
    return stats


def _gauss_newton_diag_grads(problem: MetaProblem, theta: Tensor, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """(m·B, p) rows J_jᵀ r_jc, in the c-major order of :func:`_gauss_newton_statistics`."""
    theta = theta.detach()
    out_of = lambda th, xj: problem.forward(th, xj[None]).flatten()
    J = vmap(jacrev(out_of), in_dims=(None, 0))(theta, x)  # (B, m, p)
    R = _output_hessian_root(problem, problem.forward(theta, x), y, v)
    return torch.einsum("bmp,bmc->cbp", J, R).reshape(-1, J.shape[2])


def fit_support_ekfac(problem: MetaProblem, theta: Tensor, x: Tensor, y: Tensor, v: Tensor | None = None) -> EKFAC:
    """EK-FAC of the inner Hessian H_in = ∇²_θ L_S + γI at one task's adapted θ (two-stage
    instance-IF, docs/method.md §7.3): the Gauss–Newton part of L_S = Σ_j v_j ℓ_j / |S| with the
    exact expectation over labels (the loss's output-Hessian root backpropagated, m = number of
    outputs passes), the proximal γ of the inner objective as the shift.

    Why not sampled labels or the true labels: a support set has 5–25 examples, so one label draw
    per example is a noisy Fisher, and the empirical (true-label) Fisher vanishes as the inner loop
    fits the support set while H_in does not; the exact expectation costs m backward passes on
    |S| examples — negligible — and makes EK-FAC exact where K-FAC is (one example, one layer)."""
    v = torch.ones(x.shape[0], dtype=theta.dtype, device=theta.device) if v is None else v.to(theta)
    draws = [(theta.detach(), _cast(x, theta.dtype), y, v)]
    stats = lambda layers, th, x, y, v: _gauss_newton_statistics(problem, layers, th, x, y, v)
    diag_grads = lambda th, x, y, v: _gauss_newton_diag_grads(problem, th, x, y, v)
    return _fit(problem, draws, problem.inner.proximal, {"method": "ekfac", "curvature": "support gauss-newton"}, stats, diag_grads)


def fit_ekfac(problem: MetaProblem, lam: Tensor, tasks: TaskTensors, *, adapt: bool = True, fisher_samples: int = 1,
              seed: int = 0, max_tasks: int | None = None) -> EKFAC:
    """EK-FAC of the Fisher of the query loss at each task's adapted θ_i(λ) (``adapt``) or at λ itself,
    averaged over tasks (a seeded subsample of ``max_tasks``), labels drawn ``fisher_samples`` times
    per task from the model (seed ``seed``). The shift is the objective's weight decay μ."""
    if fisher_samples < 1:
        raise SettingsError(f"fisher_samples must be ≥ 1, got {fisher_samples}")
    t0 = time.perf_counter()
    lam = lam.detach()
    gen = torch.Generator().manual_seed(seed)
    n = len(tasks)
    pick = torch.arange(n)
    if max_tasks is not None and 0 < max_tasks < n:
        pick = torch.sort(torch.randperm(n, generator=gen)[:max_tasks]).values
        tasks = tasks.subset(pick)
    record = problem.records(lam, tasks)
    if adapt:
        thetas = problem.per_task(lambda l, t: problem.adapt(l, t).detach(), lam, tasks)
    else:
        thetas = lam.expand(len(tasks), -1)
    draws = []
    for i in range(len(tasks)):
        with torch.no_grad():
            out = problem.forward(thetas[i], record.xq[i])
        for _ in range(fisher_samples):
            draws.append((thetas[i], record.xq[i], sample_labels(problem, out, gen)))
    info = {"method": "ekfac", "adapted": adapt, "fisher_samples": fisher_samples, "seed": seed,
            "n_tasks_fitted": len(tasks), "max_tasks": max_tasks}
    op = fit_ekfac_on(problem, draws, problem.weight_decay, info)
    op.info["seconds"] = time.perf_counter() - t0
    return op
