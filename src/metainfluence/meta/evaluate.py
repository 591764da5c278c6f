"""Meta-test evaluation: adapt to each held-out task's support set, score its query set.

Accuracy and loss are averaged over tasks, with the usual few-shot 95% interval
1.96 · sd / √n (sd the sample standard deviation over tasks, n the number of tasks), as in the
MAML literature's "98.7 ± 0.4%". docs/method.md §10 asks for at least 600 held-out tasks.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass, field

import torch

from ..errors import PoolError
from ..tasks.tensors import TaskTensors
from .objective import MetaProblem

Z95 = 1.96


def interval95(values: torch.Tensor) -> tuple[float, float, float]:
    """(mean, half-width 1.96·sd/√n, sd) of per-task values; sd uses n − 1 (NaN half-width when n < 2)."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    n = v.numel()
    if n == 0:
        raise PoolError("cannot evaluate on zero tasks; build a test pool with at least one task")
    mean = float(v.mean())
    if n < 2:
        return mean, float("nan"), float("nan")
    sd = float(v.std(unbiased=True))
    return mean, Z95 * sd / math.sqrt(n), sd


@dataclass
class EvalResult:
    """Mean query accuracy and loss after adaptation, over ``n_tasks`` tasks, with 95% intervals.

    ``accuracy`` is NaN for regression tasks. ``per_task_accuracy`` / ``per_task_loss`` keep the
    raw per-task values (in task order) so intervals and comparisons can be recomputed.
    """

    accuracy: float
    accuracy_ci95: float
    loss: float
    loss_ci95: float
    n_tasks: int
    accuracy_sd: float = float("nan")
    loss_sd: float = float("nan")
    per_task_accuracy: list[float] = field(default_factory=list, repr=False)
    per_task_loss: list[float] = field(default_factory=list, repr=False)
    chance: float = float("nan")  # 1/N of N-way classification tasks (NaN where unknown)

    @property
    def at_chance(self) -> bool:
        """Accuracy indistinguishable from guessing: within its 95% interval (at least a point) of 1/N."""
        if not self.is_classification or math.isnan(self.chance):
            return False
        margin = max(self.accuracy_ci95 if not math.isnan(self.accuracy_ci95) else 0.0, 0.01)
        return self.accuracy - self.chance <= margin

    @property
    def is_classification(self) -> bool:
        return not math.isnan(self.accuracy)

    def summary(self) -> str:
        loss = f"query loss {self.loss:.4f} ± {self.loss_ci95:.4f}"
        if self.is_classification:
            chance = f"; AT CHANCE (1/{round(1 / self.chance)} = {100 * self.chance:.1f}%): the model has not learned" if self.at_chance else ""
            return f"accuracy {100 * self.accuracy:.2f}% ± {100 * self.accuracy_ci95:.2f}% ({loss}; 95% interval over {self.n_tasks} tasks{chance})"
        return f"{loss} (95% interval over {self.n_tasks} tasks)"

    def to_json(self, per_task: bool = False) -> dict:
        out = {
            "accuracy": self.accuracy,
            "accuracy_ci95": self.accuracy_ci95,
            "accuracy_sd": self.accuracy_sd,
            "loss": self.loss,
            "loss_ci95": self.loss_ci95,
            "loss_sd": self.loss_sd,
            "n_tasks": self.n_tasks,
            "interval": "1.96 * sample sd / sqrt(n_tasks)",
            "chance_accuracy": self.chance,
            "at_chance": self.at_chance,
        }
        if per_task:
            out["per_task_accuracy"] = self.per_task_accuracy
            out["per_task_loss"] = self.per_task_loss
        return out

    @classmethod
    def from_per_task(cls, losses: torch.Tensor, accuracies: torch.Tensor) -> "EvalResult":
        loss, loss_ci, loss_sd = interval95(losses)
        acc_t = torch.as_tensor(accuracies, dtype=torch.float64).reshape(-1)
        if torch.isnan(acc_t).all():
            acc, acc_ci, acc_sd = float("nan"), float("nan"), float("nan")
        else:
            acc, acc_ci, acc_sd = interval95(acc_t)
        return cls(
            accuracy=acc,
            accuracy_ci95=acc_ci,
            loss=loss,
            loss_ci95=loss_ci,
            n_tasks=int(acc_t.numel()),
            accuracy_sd=acc_sd,
            loss_sd=loss_sd,
            per_task_accuracy=[float(a) for a in acc_t],
            per_task_loss=[float(x) for x in torch.as_tensor(losses, dtype=torch.float64).reshape(-1)],
        )


def evaluate(problem: MetaProblem, lam: torch.Tensor, tasks: TaskTensors) -> EvalResult:
    """Adapt λ to each task's support set (``problem.inner``), measure query loss and accuracy.

    The tasks' floating inputs are cast to λ's dtype; the work is vmapped over tasks in chunks of
    ``problem.chunk_size``. Adaptation takes ``problem.inner.eval_steps`` steps where that is set.
    """
    inner = problem.inner.for_evaluation()
    if inner is not problem.inner:
        # a shallow copy shares the model template and only swaps the inner settings
        problem = copy.copy(problem)
        problem.inner = inner
    lam = lam.detach()
    tasks = tasks.to(device=lam.device, dtype=lam.dtype)
    losses, accs = problem.task_metrics(lam, tasks)
    result = EvalResult.from_per_task(losses, accs)
    y = tasks.query_y
    if result.is_classification and not y.is_floating_point() and y.dim() == 2 and y.numel():
        result.chance = 1.0 / (int(y.max()) + 1)  # N-way tasks label their classes 0..N−1
        if result.at_chance:
            warnings.warn(f"accuracy {100 * result.accuracy:.1f}% over {result.n_tasks} tasks is at chance (1/{int(y.max()) + 1}): the model "
                          "has not learned this problem — check that the training loss fell (too few --steps? a --lr or --inner-lr "
                          "too large or too small?); a Conv4 without normalisation may not train at all (--model-norm group or batch)", stacklevel=2)
    return result
