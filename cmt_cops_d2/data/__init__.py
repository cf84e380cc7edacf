"""Data: the synthetic generator, dataset registration and training mappers."""
from . import datasets  # noqa: F401  (registers the built-in datasets)
from .mappers import MAPPERS, build_train_mapper  # noqa: F401
