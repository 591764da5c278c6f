"""Task pools: fixed, finite lists of few-shot tasks with stable ids (classification pools drawn
from a dataset, and generated sinusoid regression pools)."""

from .corruption import corrupt_labels
from .loading import load_pool
from .pool import TaskPool, build_pool
from .sinusoid import SinusoidPool, sinusoid_pool
from .tensors import TaskTensors

__all__ = ["SinusoidPool", "TaskPool", "TaskTensors", "build_pool", "corrupt_labels", "load_pool", "sinusoid_pool"]
