"""Task pools: fixed, finite lists of few-shot tasks with stable ids (classification pools drawn
from a dataset, and generated sinusoid regression pools)."""

from .building import build_pool
from .corruption import corrupt_labels
from .harmful import corrupt_tasks, duplicate_tasks, off_distribution_tasks
from .loading import load_pool
from .pool import TaskPool
from .sinusoid import SinusoidPool, sinusoid_pool
from .tensors import TaskTensors

__all__ = ["SinusoidPool", "TaskPool", "TaskTensors", "build_pool", "corrupt_labels", "corrupt_tasks", "duplicate_tasks", "load_pool", "off_distribution_tasks", "sinusoid_pool"]
