"""Task pools: fixed, finite lists of few-shot tasks with stable ids."""

from .tensors import TaskTensors

__all__ = ["TaskTensors"]
