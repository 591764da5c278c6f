"""Task pools: fixed, finite lists of few-shot tasks with stable ids."""

from .corruption import corrupt_labels
from .pool import TaskPool, build_pool, load_pool
from .tensors import TaskTensors

__all__ = ["TaskPool", "TaskTensors", "build_pool", "corrupt_labels", "load_pool"]
