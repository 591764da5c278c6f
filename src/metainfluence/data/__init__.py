"""Datasets: one :class:`ClassDataset` interface, loaders for digits, Omniglot, MNIST,
Fashion-MNIST, Mini-ImageNet, ORL faces and your own image folders, and a registry by name.
(Sinusoid regression pools are generated, not loaded: see :mod:`metainfluence.tasks.sinusoid`.)"""

from .base import SPLITS, ClassDataset, default_cache_dir
from .digits import load_digits
from .image_folder import load_image_folder
from .mini_imagenet import load_mini_imagenet, read_split_csvs
from .mnist import load_mnist, read_idx
from .omniglot import load_omniglot, read_split_file, resize_ink
from .orl import load_orl_faces, read_pgm
from .omniglot_download import download_omniglot, safe_extract_zip
from .registry import DATASETS, load_dataset

__all__ = [
    "SPLITS",
    "ClassDataset",
    "DATASETS",
    "default_cache_dir",
    "download_omniglot",
    "load_dataset",
    "load_digits",
    "load_image_folder",
    "load_mini_imagenet",
    "load_mnist",
    "load_omniglot",
    "load_orl_faces",
    "read_idx",
    "read_pgm",
    "read_split_csvs",
    "read_split_file",
    "resize_ink",
    "safe_extract_zip",
]
