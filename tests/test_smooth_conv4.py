"""A smooth Conv4 (``conv_activation``) and the exact Gauss–Newton factor as refine's preconditioner.

With ReLU the second-order meta-objective is discontinuous (θ(λ) = λ − α∇L_S(λ) jumps where a
pre-activation crosses 0), which is why refine stalled on the Conv4 pools (docs/training.md); with a
smooth activation F is twice differentiable, so its gradient matches finite differences and Newton
steps converge. Float64 throughout."""

from __future__ import annotations

import pytest
import torch

from helpers import directional_derivatives
from metainfluence.errors import SettingsError
from metainfluence.meta import RefineSettings, refine
from metainfluence.meta.models import Conv4, ModelSettings, build_model
from metainfluence.meta.objective import InnerSettings, MetaProblem
from metainfluence.tasks.tensors import TaskTensors
from test_refine_newton_cg import warm


def image_tasks(n=4, n_way=3, shot=2, size=16, seed=0) -> TaskTensors:
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, n_way * shot, 1, size, size, generator=g, dtype=torch.float64)
    xq = torch.randn(n, n_way * shot, 1, size, size, generator=g, dtype=torch.float64)
    y = torch.arange(n_way).repeat_interleave(shot).expand(n, -1).clone()
    return TaskTensors(xs, y, xq, y.clone())


def smooth_conv4(activation: str) -> tuple[MetaProblem, torch.Tensor]:
    torch.manual_seed(0)
    # one group: with 2 groups of 2 channels at the 1×1 last block, group norm of 2 numbers is nearly a sign
    # function and central differences lose accuracy (measured 2.6e-7 at ε = 1e-5 against 1.0e-8 here)
    model = Conv4(1, 16, 3, width=4, norm="group", groups=1, pool="stride", activation=activation).double()
    problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=1e-3)
    return problem, problem.init_params(torch.float64)


@pytest.mark.parametrize("activation", ["silu", "gelu", "softplus", "tanh"])
def test_smooth_conv4_meta_gradient_matches_central_differences(activation):
    problem, lam = smooth_conv4(activation)
    tasks = image_tasks()
    g = problem.meta_gradient(lam, tasks)
    d, fd = directional_derivatives(lambda x: problem.value_and_gradient(x, tasks)[0], lam, n_directions=4, eps=1e-5)
    torch.testing.assert_close(d @ g, fd, rtol=1e-6, atol=1e-9)


def test_batch_norm_conv4_value_and_gradient_is_the_gradient_of_its_value():
    """The batch-norm recipe's network: refine and training take ∇F from value_and_gradient, which must be the
    gradient of the F it returns (central differences) and equal to the per-task total gradients' mean. Computed
    as grad of a vmapped sum it was 1% off here and 7.5% on the Omniglot recipe (a torch.func fault with affine
    batch norm under the second-order inner step), so L-BFGS stalled at ‖∇F‖/ḡ ≈ 3.5e-4."""
    torch.manual_seed(0)
    model = Conv4(1, 16, 3, width=4, norm="batch", pool="stride", activation="silu").double()
    problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=1e-3, chunk_size=3)
    lam = problem.init_params(torch.float64)
    tasks = image_tasks(n=5)
    w = torch.rand(5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    value, g = problem.value_and_gradient(lam, tasks, w)
    torch.testing.assert_close(g, problem.meta_gradient(lam, tasks, w), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(value, problem.objective(lam, tasks, w).detach(), rtol=1e-12, atol=0)
    d, fd = directional_derivatives(lambda x: problem.value_and_gradient(x, tasks, w)[0], lam, n_directions=4, eps=1e-5)
    torch.testing.assert_close(d @ g, fd, rtol=1e-6, atol=1e-9)


def test_batch_norm_conv4_hessian_products_match_central_differences_of_the_gradient():
    """The exact tier's products (jvp of the total gradient, one task and vmapped over tasks and directions) through
    batch norm under the second-order inner step. With torch's native batch-norm kernel they were 27–56% off
    central differences (its derivatives beyond second order are wrong); ``TaskBatchNorm`` computes the same
    function (checked against ``nn.BatchNorm2d``) with every derivative right."""
    from metainfluence.meta.curvature import TotalHessian
    from metainfluence.meta.models import TaskBatchNorm

    torch.manual_seed(0)
    native, ours = torch.nn.BatchNorm2d(4, track_running_stats=False).double(), TaskBatchNorm(4).double()
    with torch.no_grad():
        native.weight.uniform_(0.5, 1.5), native.bias.normal_()
    ours.load_state_dict(native.state_dict())
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(ours(x), native(x), rtol=1e-12, atol=1e-12)

    model = Conv4(1, 16, 3, width=2, norm="batch", pool="stride", activation="silu").double()
    problem = MetaProblem(model, "cross_entropy", InnerSettings(steps=1, lr=0.4), weight_decay=1e-3, chunk_size=2)
    lam = problem.init_params(torch.float64)
    tasks = image_tasks(n=3)
    V = torch.randn(lam.numel(), 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    eps = 1e-6  # this tiny network's batch norm is strongly curved: the differences' error is 1.2e-4 at ε = 1e-5, 1.2e-6 here
    fd = torch.stack([(problem.meta_gradient(lam + eps * v, tasks) - problem.meta_gradient(lam - eps * v, tasks)) / (2 * eps)
                      for v in V.T], 1)
    H = TotalHessian(problem, lam, tasks, "exact")
    rel = lambda a, b: float((a - b).norm() / b.norm())
    assert rel(H.matmat(V), fd) < 1e-5 and rel(H.matvec(V[:, 0]), fd[:, 0]) < 1e-5


def test_a_model_with_torchs_native_batch_norm_is_warned_about_and_ours_is_not():
    import warnings

    native = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2, track_running_stats=False), torch.nn.Flatten(),
                                 torch.nn.LazyLinear(3))
    native(torch.zeros(2, 1, 5, 5))
    with pytest.warns(UserWarning, match="TaskBatchNorm"):
        MetaProblem(native, "cross_entropy", InnerSettings(steps=1, lr=0.4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MetaProblem(Conv4(1, 8, 3, width=2, norm="batch", pool="stride"), "cross_entropy", InnerSettings(steps=1, lr=0.4))


def test_conv_activation_is_built_and_validated():
    m = build_model(ModelSettings(kind="conv4", width=4, pool="stride", conv_activation="silu"), (1, 8, 8), 3)
    assert sum(isinstance(x, torch.nn.SiLU) for x in m.modules()) == 4
    assert not any(isinstance(x, torch.nn.ReLU) for x in m.modules())
    # the default stays ReLU, so checkpoints written before the option rebuild the same network
    assert sum(isinstance(x, torch.nn.ReLU) for x in build_model(ModelSettings(kind="conv4", width=4, pool="stride"), (1, 8, 8), 3).modules()) == 4
    with pytest.raises(SettingsError, match="unknown activation 'swish'"):
        ModelSettings(kind="conv4", conv_activation="swish").validate()


def test_gn_factor_preconditioner_leaves_gauss_newton_steps_one_or_two_cg_iterations():
    problem, tasks, lam = warm()  # the Newton–CG tests' warm start: L-BFGS to ratio 1e-3 on teacher tasks
    common = dict(method="newton-cg", newton_hessian="gauss-newton", tol=0, tol_ratio=1e-5, max_iter=200, newton_cg_iters=200)
    x0, rep0 = refine(problem, lam, tasks, RefineSettings(**common, precondition="none"))
    x1, rep1 = refine(problem, lam, tasks, RefineSettings(**common, precondition="gn-factor", precondition_refit=1))
    assert rep0.converged and rep1.converged
    # the same minimum whatever the preconditioner
    assert float((x1 - x0).norm()) <= 1e-3 * float(x0.norm())  # both stop at ratio 1e-5: measured 2.5e-5 apart
    # refitted at every step, the factor is H_GN + μI exactly: every solve, accepted or rejected, stops after one
    # PCG iteration (measured: 118 iterations for 79 steps and 39 rejected trial steps; 591 unpreconditioned)
    assert rep1.cg_iterations <= rep1.iterations + rep1.preconditioner["rejected_steps"] + 2
    assert rep1.cg_iterations <= 0.3 * rep0.cg_iterations
    assert len(rep1.preconditioner["fits"]) == rep1.iterations
