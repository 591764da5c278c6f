"""metainfluence: which meta-training tasks and examples help or harm a meta-learned model.

The public API, stage by stage (data → task pools → meta-learning → influence → evaluation):

    load_dataset                                data/
    build_pool, corrupt_labels, TaskTensors,    tasks/
    sinusoid_pool
    MetaProblem, InnerSettings, meta_train,     meta/
    refine, evaluate
    task_influence, instance_influence,         influence/
    pairwise_influence, PairwiseResult,
    measurement_reliability,
    edit_model, Removal, unlearn, TotalHessian, solve_ihvp
    leave_one_out, lds_ground_truth, metrics    evaluation/
    SolverSettings, solve_ihvp                  linalg/ (operators and solvers, used by every stage)

Sign convention (docs/method.md §5): a score is the predicted change of the measurement (validation loss) when
the item is removed; positive means the item helps, negative means it harms.
"""

from .data import load_dataset
from .errors import MetaInfluenceError
from .evaluation import metrics
from .evaluation.groundtruth import GroundTruthSettings, lds_ground_truth, leave_one_out
from .influence.editing import EditResult, Removal, edit_model, unlearn
from .meta.curvature import TotalHessian
from .influence.instance_if import instance_influence
from .influence.pairwise import PairwiseResult, pairwise_influence
from .influence.reliability import measurement_reliability
from .influence.results import SIGN_CONVENTION, InfluenceResult, InfluenceSettings

from .influence.task_if import task_influence, task_parameter_changes
from .linalg import SolverSettings, solve_ihvp
from .meta.evaluate import evaluate
from .meta.objective import InnerSettings, MetaProblem
from .meta.refine import RefineSettings, refine
from .meta.train import TrainSettings, meta_train
from .tasks import TaskTensors, build_pool, corrupt_labels, sinusoid_pool

__version__ = "0.1.0"

__all__ = [
    "SIGN_CONVENTION", "EditResult", "GroundTruthSettings", "InfluenceResult", "InfluenceSettings", "InnerSettings",
    "MetaInfluenceError", "MetaProblem", "PairwiseResult", "RefineSettings", "Removal", "SolverSettings", "TaskTensors", "TotalHessian",
    "TrainSettings", "build_pool", "corrupt_labels", "edit_model", "evaluate", "instance_influence", "lds_ground_truth",
    "leave_one_out", "load_dataset", "measurement_reliability", "meta_train", "metrics", "pairwise_influence", "refine", "sinusoid_pool", "solve_ihvp", "task_influence",
    "task_parameter_changes", "unlearn",
]
