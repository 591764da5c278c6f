"""meta stage: the bilevel objective, meta-training, the refine stage, evaluation and checkpoints."""

from .checkpoint import Checkpoint, load_checkpoint, pool_fingerprint, pool_record, save_checkpoint, tensors_fingerprint
from .evaluate import EvalResult, evaluate, interval95
from .models import MLP, Conv4, ModelSettings, build_model
from .objective import InnerSettings, MetaProblem
from .params import ParamSpec
from .refine import RefineReport, RefineSettings, RefineWarning, mean_task_gradient_norm, refine
from .train import TrainHistory, TrainSettings, batch_schedule, meta_train

__all__ = [
    "Checkpoint",
    "Conv4",
    "EvalResult",
    "InnerSettings",
    "MLP",
    "MetaProblem",
    "ModelSettings",
    "ParamSpec",
    "RefineReport",
    "RefineSettings",
    "RefineWarning",
    "TrainHistory",
    "TrainSettings",
    "batch_schedule",
    "build_model",
    "evaluate",
    "interval95",
    "load_checkpoint",
    "mean_task_gradient_norm",
    "meta_train",
    "pool_fingerprint",
    "pool_record",
    "refine",
    "save_checkpoint",
    "tensors_fingerprint",
]
