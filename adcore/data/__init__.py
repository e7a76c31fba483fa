"""Datasets: the embedded ``textures`` and ``digits`` benchmarks and loaders for MVTec AD, BTAD, VisA, MVTec 3D-AD
and any folder in MVTec layout. Everything goes through :func:`load_dataset`; nothing is ever downloaded."""
from __future__ import annotations

from .benchmarks import list_categories, load_dataset
from .folder import AnomalyDataset, DataError

__all__ = ["AnomalyDataset", "DataError", "list_categories", "load_dataset"]
