"""Register the built-in synthetic panoptic dataset: ``synthetic_panoptic_{train,val}``.

The data lives under ``$DETECTRON2_DATASETS/synthetic_panoptic`` (default ``./datasets``) and is generated
the first time either split is loaded (or explicitly by ``python datasets/prepare_synthetic_panoptic.py``).
It goes through the same registration code as COCO panoptic (:func:`register_panoptic_dataset`).
"""
import functools
import os

from detectron2.data import DatasetCatalog

from ..synthetic import SYNTHETIC_CATEGORIES, SyntheticConfig, ensure_synthetic_panoptic
from .panoptic import register_panoptic_dataset

__all__ = ["register_all_synthetic_panoptic", "synthetic_split_paths"]

SPLITS = ("train", "val")


def synthetic_split_paths(root: str, split: str) -> dict:
    """Paths of one split of the synthetic dataset under the dataset root ``root``."""
    base = os.path.join(root, "synthetic_panoptic")
    return {
        "image_root": os.path.join(base, f"{split}2017"),
        "panoptic_root": os.path.join(base, f"panoptic_{split}2017"),
        "panoptic_json": os.path.join(base, "annotations", f"panoptic_{split}2017.json"),
        "sem_seg_root": os.path.join(base, f"panoptic_semseg_{split}2017"),
    }


def register_all_synthetic_panoptic(root: str, prefix: str = "synthetic_panoptic",
                                    cfg: SyntheticConfig = None) -> None:
    """Register ``{prefix}_train`` and ``{prefix}_val`` for the synthetic data under ``root``.

    Names already registered are left alone, so importing twice is harmless.
    """
    generate = functools.partial(ensure_synthetic_panoptic, os.path.join(root, "synthetic_panoptic"),
                                 cfg or SyntheticConfig())
    for split in SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        register_panoptic_dataset(
            name, SYNTHETIC_CATEGORIES, **synthetic_split_paths(root, split),
            prepare_hint="run: python datasets/prepare_synthetic_panoptic.py", before_load=generate,
        )


register_all_synthetic_panoptic(os.getenv("DETECTRON2_DATASETS", "datasets"))
