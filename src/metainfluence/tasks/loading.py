"""Loading any saved pool by the ``kind`` recorded in its JSON."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import MetaInfluenceError, PoolError
from ..io import read_json
from .pool import TaskPool
from .sinusoid import KIND as SINUSOID_KIND
from .sinusoid import SinusoidPool
from .storage import _stem

if TYPE_CHECKING:  # pragma: no cover
    from ..data.base import ClassDataset


def load_pool(path_stem: str | os.PathLike, dataset: "ClassDataset | None" = None):
    """Load any saved pool: a :class:`TaskPool` or a sinusoid pool (by the ``kind`` in its JSON)."""
    stem = _stem(path_stem)
    try:
        doc = read_json(stem.with_name(stem.name + ".json"), what="pool definition")
    except MetaInfluenceError as exc:
        raise PoolError(str(exc)) from None
    if isinstance(doc, dict) and doc.get("kind") == SINUSOID_KIND:
        return SinusoidPool.load(stem)
    return TaskPool.load(stem, dataset=dataset)
