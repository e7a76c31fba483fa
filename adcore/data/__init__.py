"""Datasets: the embedded ``textures`` and ``digits`` benchmarks and loaders for MVTec AD, BTAD, VisA, MVTec 3D-AD
and any folder in MVTec layout. Everything goes through :func:`load_dataset`; nothing is ever downloaded.
:func:`make_fake_mvtec` and :func:`make_fake_weights` write a look-alike MVTec AD and WideResNet-50-2 file for tests."""
from __future__ import annotations

from .benchmarks import list_categories, load_dataset
from .fake import make_fake_mvtec, make_fake_weights
from .folder import AnomalyDataset, DataError

__all__ = ["AnomalyDataset", "DataError", "list_categories", "load_dataset", "make_fake_mvtec", "make_fake_weights"]
