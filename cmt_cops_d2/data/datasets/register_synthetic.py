"""Register the built-in synthetic panoptic dataset: ``synthetic_panoptic_{train,val}``.

The data lives under ``$DETECTRON2_DATASETS/synthetic_panoptic`` (default ``./datasets``) and is generated
the first time either split is loaded (or explicitly by ``python datasets/prepare_synthetic_panoptic.py``);
each load regenerates files that went missing or were truncated.
It goes through the same registration code as COCO panoptic (:func:`register_panoptic_dataset`).
"""
import functools
import os
import shlex

from detectron2.data import DatasetCatalog

from ..synthetic import SYNTHETIC_CATEGORIES, SyntheticConfig, ensure_synthetic_panoptic
from .panoptic import register_panoptic_dataset

__all__ = ["register_all_synthetic_panoptic", "synthetic_split_paths", "prepare_command"]

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


def prepare_command(root: str, cfg: SyntheticConfig) -> str:
    """The command that regenerates the copy of parameters ``cfg`` under the dataset root ``root``."""
    default = SyntheticConfig()
    args = [f"--root {shlex.quote(root)}"]
    for flag, key in (("--num-train", "num_train"), ("--num-val", "num_val"), ("--height", "height"),
                      ("--width", "width"), ("--seed", "seed")):
        if getattr(cfg, key) != getattr(default, key):
            args.append(f"{flag} {getattr(cfg, key)}")
    return "python datasets/prepare_synthetic_panoptic.py " + " ".join(args) + " --force"


def register_all_synthetic_panoptic(root: str, prefix: str = "synthetic_panoptic",
                                    cfg: SyntheticConfig = None) -> None:
    """Register ``{prefix}_train`` and ``{prefix}_val`` for the synthetic data under ``root``.

    Names already registered are left alone, so importing twice is harmless.
    """
    cfg = cfg or SyntheticConfig()
    generate = functools.partial(ensure_synthetic_panoptic, os.path.join(root, "synthetic_panoptic"), cfg)
    for split in SPLITS:
        name = f"{prefix}_{split}"
        if name in DatasetCatalog.list():
            continue
        register_panoptic_dataset(
            name, SYNTHETIC_CATEGORIES, **synthetic_split_paths(root, split),
            prepare_hint=f"regenerate it (from the repository root): {prepare_command(root, cfg)}",
            before_load=generate,
        )


register_all_synthetic_panoptic(os.getenv("DETECTRON2_DATASETS", "datasets"))
