"""Dataset lookup by name: ``load_dataset('omniglot', root=...)``."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from .base import ClassDataset
from .digits import load_digits
from .image_folder import load_image_folder
from .mini_imagenet import load_mini_imagenet
from .mnist import load_mnist
from .omniglot import load_omniglot
from .orl import load_orl_faces

# name -> (loader, fixed options); a loader whose first parameter is ``root`` needs a data folder
_LOADERS: dict[str, tuple[Callable[..., ClassDataset], dict[str, Any]]] = {
    "digits": (load_digits, {}),
    "omniglot": (load_omniglot, {}),
    "mnist": (load_mnist, {"fashion": False}),
    "fashion-mnist": (load_mnist, {"fashion": True}),
    "mini-imagenet": (load_mini_imagenet, {}),
    "orl-faces": (load_orl_faces, {}),
    "image-folder": (load_image_folder, {}),
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def _resolve(name: str) -> tuple[str, Callable[..., ClassDataset], dict[str, Any]]:
    """(canonical name, loader, fixed options) of a dataset name or alias."""
    key = str(name).lower().replace("_", "-")
    key = {"fashion": "fashion-mnist", "fashionmnist": "fashion-mnist", "miniimagenet": "mini-imagenet", "orl": "orl-faces", "att-faces": "orl-faces", "orlfaces": "orl-faces", "folder": "image-folder", "imagefolder": "image-folder"}.get(key, key)
    if key not in _LOADERS:
        raise DataError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)} (and, for runs and experiments, sinusoid: "
                        "generated regression tasks)")
    return (key, *_LOADERS[key])


def canonical_name(name: str) -> str:
    """The registry's name of a dataset name or alias (``'orl'`` → ``'orl-faces'``); DataError if unknown."""
    return _resolve(name)[0]


def dataset_options(name: str) -> tuple[str, ...]:
    """The options the loader of dataset ``name`` takes (what ``load_dataset(name, **options)`` accepts),
    e.g. ``split_seed`` only where the split is drawn rather than fixed by the dataset's files."""
    _key, loader, fixed = _resolve(name)
    return tuple(p for p in inspect.signature(loader).parameters if p != "root" and p not in fixed)


def load_dataset(name: str, root: str | os.PathLike | None = None, **options: Any) -> ClassDataset:
    """Load a dataset by name. ``root`` (else $METAINFLUENCE_DATA) is the folder holding the files —
    the dataset's own folder or a parent with ``omniglot/``, ``mnist/``, ``fashion-mnist/``,
    ``mini-imagenet/``, ``orl-faces/`` (or ``att_faces/``) inside; for ``image-folder``, the image folder
    itself. ``options`` go to the loader (e.g. ``image_size``, ``split_seed``; :func:`dataset_options`
    lists them)."""
    key, loader, fixed = _resolve(name)
    params = inspect.signature(loader).parameters
    allowed = dataset_options(key)
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"unknown option(s) {', '.join(unknown)} for dataset {key!r}; allowed: {', '.join(allowed)}")
    if "root" in params:
        if root is None:
            root = os.environ.get("METAINFLUENCE_DATA") or None
        if root is None:
            raise DataError(f"dataset {key!r} needs its files: pass --data-root or set METAINFLUENCE_DATA to the data folder")
        root = Path(root).expanduser()
        if not root.is_dir():
            what = "is a file, not a folder" if root.is_file() else "does not exist"
            raise DataError(f"data root {root.absolute()} {what}; pass --data-root or set METAINFLUENCE_DATA to an existing folder")
        return loader(root, **fixed, **options)
    return loader(**fixed, **options)
