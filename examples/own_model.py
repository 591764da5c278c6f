"""Influence of tasks on your own model, loss and tasks (the README's API example).

    python examples/own_model.py
"""

import torch
from torch import nn

import metainfluence as mi

torch.manual_seed(0)

# 1. Your tasks: stacked tensors shaped (tasks × examples × ...). Here: 40 toy 3-way tasks.
def make_tasks(n, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n, 3, 2, generator=g)            # 3 class centres per task
    ys = torch.arange(3).repeat(2).expand(n, -1)           # 2 support examples per class
    yq = torch.arange(3).repeat(5).expand(n, -1)           # 5 query examples per class
    xs = centres.gather(1, ys[..., None].expand(-1, -1, 2)) + 0.3 * torch.randn(n, 6, 2, generator=g)
    xq = centres.gather(1, yq[..., None].expand(-1, -1, 2)) + 0.3 * torch.randn(n, 15, 2, generator=g)
    return mi.TaskTensors(xs.double(), ys.clone(), xq.double(), yq.clone())

train, val = make_tasks(40, seed=1), make_tasks(20, seed=2)
train.query_y[:4] = (train.query_y[:4] + 1) % 3             # corrupt the first 4 tasks' query labels

# 2. Your model (any nn.Module; only its parameter shapes are used) and per-example loss.
model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 3)).double()
problem = mi.MetaProblem(model, loss="cross_entropy",
                         inner=mi.InnerSettings(kind="unrolled", steps=1, lr=0.5), weight_decay=1e-2)

# 3. Meta-train, then refine to a stationary point (influence assumes ∇F(λ*) = 0, docs/method.md §2).
lam = problem.init_params(torch.float64).requires_grad_(True)
opt = torch.optim.Adam([lam], lr=0.02)
for _ in range(300):
    _, lam.grad = problem.value_and_gradient(lam.detach(), train)
    opt.step()
lam, report = mi.refine(problem, lam.detach(), train, mi.RefineSettings(tol=0, tol_ratio=1e-6))  # ‖∇F‖ / mean‖g_i‖ ≤ 1e-6

# 4. Task-IF: predicted change of the validation loss when each task is removed.
result = mi.task_influence(problem, lam, train, val, mi.InfluenceSettings(hessian="exact", solver="cg", damping=1e-3))
harmful = result.ranking(harmful_first=True)[:4]
print("most harmful tasks:", sorted(harmful.tolist()), "(corrupted: [0, 1, 2, 3])")
print("stationarity ‖∇F‖ / mean‖g_i‖ =", f"{result.diagnostics['stationarity']['ratio']:.1e}")

# 5. Remove them in closed form — no retraining.
# The edit is a Newton step on the objective without them; its exact Hessian is often indefinite at λ*
# (λ* minimises the full objective, not the reduced one), so use the positive semi-definite Gauss–Newton one.
edited = mi.edit_model(problem, lam, train, mi.Removal(tasks=harmful.tolist()), mi.InfluenceSettings(hessian="gauss-newton"))
before = problem.task_losses(lam, val).mean().item()
after = problem.task_losses(edited.lam, val).mean().item()
print(f"validation loss {before:.4f} → {after:.4f} after the edit")
