"""A head-only inner loop (ANIL, ``InnerSettings.adapt``; meta/inner.py): the same objective, total gradient and
total Hessian as a plain-autograd ANIL written out by hand, and the settings that cannot hold it are refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import directional_derivatives, random_tasks, small_problem
from metainfluence.errors import SettingsError
from metainfluence.influence.instance_if import instance_influence, k_step_response
from metainfluence.influence.results import InfluenceSettings
from metainfluence.meta.inner import AdaptedPart, InnerSettings, adapted_names


def _plain_anil_query_loss(lam, task, steps, lr):
    """An independent ANIL on the tanh MLP 4 → 8 → 3 in plain torch.autograd: the body (first layer) stays at λ,
    the head (second layer) takes ``steps`` gradient steps on the support loss, differentiated through."""
    W1, b1, W2, b2 = torch.split(lam, [32, 8, 24, 3])
    W1, W2 = W1.view(8, 4), W2.view(3, 8)
    head = lambda x, W2, b2: torch.tanh(x @ W1.T + b1) @ W2.T + b2
    for _ in range(steps):
        support = F.cross_entropy(head(task.xs, W2, b2), task.ys)
        gW, gb = torch.autograd.grad(support, (W2, b2), create_graph=True)
        W2, b2 = W2 - lr * gW, b2 - lr * gb
    return F.cross_entropy(head(task.xq, W2, b2), task.yq), (W2, b2)


@pytest.mark.parametrize("steps", [1, 2])
def test_head_only_adaptation_equals_a_plain_autograd_anil(steps):
    problem, lam = small_problem(steps=steps, lr=0.4, adapt="head", weight_decay=0.0)
    assert adapted_names(problem.spec, "head") == ("net.2.weight", "net.2.bias") and problem.adapted.runs == ((40, 67),)
    tasks = random_tasks(n=3)
    records = problem.records(lam, tasks)
    for i in range(3):
        task = records.row(i)
        x = lam.clone().requires_grad_(True)
        loss, (W2, b2) = _plain_anil_query_loss(x, task, steps, 0.4)
        (want,) = torch.autograd.grad(loss, x)
        theta = problem.adapt(lam, task)
        assert torch.equal(theta[:40], lam[:40])  # the body is shared, not adapted
        torch.testing.assert_close(theta[40:], torch.cat([W2.reshape(-1), b2]).detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(problem.task_total_gradient(lam, task), want, rtol=1e-10, atol=1e-14)
    # vmapped over tasks as in every pass, and against F's central differences
    g = problem.meta_gradient(lam, tasks)
    with torch.no_grad():
        d, fd = directional_derivatives(lambda z: problem.objective(z, tasks), lam)
    torch.testing.assert_close(d @ g, fd, rtol=1e-6, atol=1e-9)
    # the body's gradient carries the head's adaptation: it is not the gradient of the loss without adaptation
    unadapted, _ = small_problem(steps=0, adapt="head", weight_decay=0.0)
    assert (g[:40] - unadapted.meta_gradient(lam, tasks)[:40]).abs().max() > 1e-6


def test_head_only_total_hessian_products_match_differences_of_the_total_gradient():
    problem, lam = small_problem(steps=2, lr=0.4, adapt="head")
    task = problem.records(lam, random_tasks(n=1, seed=5)).row(0)
    d = torch.randn(lam.numel(), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    hv = problem.task_total_hvp(lam, task, d)
    eps = 1e-5
    fd = (problem.task_total_gradient(lam + eps * d, task) - problem.task_total_gradient(lam - eps * d, task)) / (2 * eps)
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)
    # and the ANIL objective is not MAML's: adapting every parameter changes the total gradient
    maml, _ = small_problem(steps=2, lr=0.4)
    assert (maml.task_total_gradient(lam, task) - problem.task_total_gradient(lam, task)).abs().max() > 1e-6


@pytest.mark.parametrize("steps", [1, 3])
def test_the_masked_k_step_response_is_the_transpose_of_the_masked_steps(steps):
    """Two-stage support scores take c = R_Mᵀ b, R_M = α Σ_{j<K} (I − α M A)^j M the response of K steps that move only the
    masked entries; the recursion c ← c + αM(b − Ac) must give it exactly (dense matrices here)."""
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = B @ B.T / 6 + 0.1 * torch.eye(6, dtype=torch.float64)
    m = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.float64)
    M, alpha = torch.diag(m), 0.3
    R = sum(alpha * torch.linalg.matrix_power(torch.eye(6, dtype=torch.float64) - alpha * M @ A, j) @ M for j in range(steps))
    b = torch.randn(6, generator=g, dtype=torch.float64)
    torch.testing.assert_close(k_step_response(lambda z: A @ z, b, alpha, steps, mask=lambda z: m * z), R.T @ b, rtol=1e-13, atol=1e-14)
    R_all = sum(alpha * torch.linalg.matrix_power(torch.eye(6, dtype=torch.float64) - alpha * A, j) for j in range(steps))
    torch.testing.assert_close(k_step_response(lambda z: A @ z, b, alpha, steps), R_all @ b, rtol=1e-13, atol=1e-14)


def test_adapt_settings_name_what_they_adapt_and_refuse_what_cannot_hold():
    problem, _ = small_problem(steps=1, hidden=(5, 4))
    spec = problem.spec
    assert AdaptedPart.of(spec, "all") is None and problem.adapted is None
    assert adapted_names(spec, "head") == ("net.4.weight", "net.4.bias")
    assert adapted_names(spec, "net.0, net.4.bias") == ("net.0.weight", "net.0.bias", "net.4.bias")
    part = AdaptedPart.of(spec, "net.0,net.4.bias")
    assert part.runs == ((0, 25), (spec.dim - 3, spec.dim)) and float(part.mask.sum()) == 28
    flat = torch.arange(spec.dim, dtype=torch.float64)
    h = part.take(flat)
    assert torch.equal(h, torch.cat([flat[:25], flat[-3:]])) and torch.equal(part.put(flat, h), flat)
    assert torch.equal(part.put(flat, -h)[25:-3], flat[25:-3]) and torch.equal(part.params(h)["net.0.weight"], flat[:20].view(5, 4))
    with pytest.raises(SettingsError, match="match no trainable parameter.*net.0.weight"):
        adapted_names(spec, "classifier")
    with pytest.raises(SettingsError, match="needs the unrolled inner solver"):
        InnerSettings(kind="implicit", proximal=1.0, adapt="head").validate()
    with pytest.raises(SettingsError, match="inner adapt must be"):
        InnerSettings(adapt=" ").validate()


def test_two_stage_support_scores_under_a_head_only_loop_and_what_is_refused():
    problem, lam = small_problem(steps=2, lr=0.3, adapt="head", weight_decay=1e-2)
    train, val = random_tasks(n=5, seed=1), random_tasks(n=3, seed=2)
    settings = InfluenceSettings(hessian="gauss-newton", solver="explicit", damping=1e-2, stationarity_warn=1e9, support_method="two-stage")
    res = instance_influence(problem, lam, train, val, "support", settings)
    assert res.scores.shape == (5, 6) and torch.isfinite(res.scores).all() and res.diagnostics["inner_solve_residual"] == 0
    # an EK-FAC inner Hessian spans every parameter: refused for a loop that adapts only the head
    import dataclasses

    with pytest.raises(SettingsError, match="adapts only some"):
        instance_influence(problem, lam, train, val, "support", dataclasses.replace(settings, inner_hessian="ekfac"))
    # one step: the response is α·M exactly, so score_z = −α (M b)ᵀ ∇_θ ℓ(z; θ_k) v_z / (|S| n), with M the head's 0/1
    # mask written out here from the layer sizes (4 → 8 → 3: the head is the last 27 entries)
    from torch.func import jacrev

    from metainfluence.influence.instance_if import _outer_rhs

    one, _ = small_problem(steps=1, lr=0.3, adapt="head", weight_decay=1e-2)
    res = instance_influence(one, lam, train, val, "support", settings)
    m = torch.cat([torch.zeros(40, dtype=torch.float64), torch.ones(27, dtype=torch.float64)])
    records = one.records(lam, train)
    for k in range(5):
        task = records.row(k)
        theta, b = _outer_rhs(one, lam, task, res.extra["s"])
        per_example = jacrev(lambda th: one.example_losses(th, task.xs, task.ys))(theta)
        want = -(per_example @ (0.3 * m * b)) * task.v / task.xs.shape[0] / 5
        torch.testing.assert_close(res.scores[k], want, rtol=1e-10, atol=1e-15)


def test_a_checkpoint_from_before_adapt_existed_resumes_as_maml_only():
    """A checkpoint whose record predates ``adapt`` adapted every parameter: resuming it with a head-only loop is refused."""
    from types import SimpleNamespace

    from metainfluence.errors import CheckpointError
    from metainfluence.meta.train import _same_problem

    maml, _ = small_problem(steps=1)
    anil, _ = small_problem(steps=1, adapt="head")
    record = maml.settings_json()
    assert "adapt" not in record["inner"]  # MAML's record leaves it out, as every record from before the setting
    _same_problem(SimpleNamespace(info={"problem": anil.settings_json()}), anil)
    old = SimpleNamespace(info={"problem": record})
    _same_problem(old, maml)
    with pytest.raises(CheckpointError, match="inner.adapt='all', not 'head'"):
        _same_problem(old, anil)
