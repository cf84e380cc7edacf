"""COCO 2017 panoptic: the ``*_with_sem_seg`` names and checked versions of Detectron2's builtin names.

Registered under ``root`` (``$DETECTRON2_DATASETS``, default ``datasets``) when this module is imported:

* ``coco_2017_{train,val}_panoptic_with_sem_seg``: through :func:`register_panoptic_dataset`, with the
  133 ``COCO_CATEGORIES`` numbered 0..132 in their order and the semantic PNGs written by
  ``python datasets/prepare_coco_semantic_from_panoptic.py``. Usable with ``COCOPanopticEvaluator`` and
  ``SemSegEvaluator``.
* ``coco_2017_{train,val,val_100}_panoptic``: Detectron2's own names and metadata, with a loader that
  checks every path (Detectron2's only asserts on the first file) and then calls Detectron2's
  ``load_coco_panoptic_json``. Their records have no ``sem_seg_file_name``.

See ``datasets/README.md`` for the download and the expected layout.
"""
import json
import os
from typing import Dict, List

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES, _get_builtin_metadata
from detectron2.data.datasets.coco_panoptic import load_coco_panoptic_json

from .panoptic import DatasetFormatError, _require, register_panoptic_dataset

__all__ = [
    "COCO_WITH_SEM_SEG_SPLITS",
    "COCO_BUILTIN_PANOPTIC_SPLITS",
    "coco_prepare_hint",
    "load_coco_builtin_panoptic",
    "register_all_coco_panoptic",
]

# name -> (image_root, panoptic_root, panoptic_json, sem_seg_root), relative to the dataset root.
COCO_WITH_SEM_SEG_SPLITS = {
    f"coco_2017_{split}_panoptic_with_sem_seg": (
        f"coco/{split}2017",
        f"coco/panoptic_{split}2017",
        f"coco/annotations/panoptic_{split}2017.json",
        f"coco/panoptic_semseg_{split}2017",
    )
    for split in ("train", "val")
}

# Detectron2's builtin names -> (image_root, panoptic_root, panoptic_json, instances json_file),
# as Detectron2 registers them in detectron2/data/datasets/builtin.py.
COCO_BUILTIN_PANOPTIC_SPLITS = {
    "coco_2017_train_panoptic": (
        "coco/train2017",
        "coco/panoptic_train2017",
        "coco/annotations/panoptic_train2017.json",
        "coco/annotations/instances_train2017.json",
    ),
    "coco_2017_val_panoptic": (
        "coco/val2017",
        "coco/panoptic_val2017",
        "coco/annotations/panoptic_val2017.json",
        "coco/annotations/instances_val2017.json",
    ),
    "coco_2017_val_100_panoptic": (
        "coco/val2017",
        "coco/panoptic_val2017_100",
        "coco/annotations/panoptic_val2017_100.json",
        "coco/annotations/instances_val2017_100.json",
    ),
}


def coco_prepare_hint(root: str, name: str) -> str:
    """What to do when a file of the COCO panoptic dataset ``name`` is missing."""
    coco = os.path.join(root, "coco")
    layout = (
        f"Expected under {coco}/: {{train,val}}2017/ (JPEG images), panoptic_{{train,val}}2017/ "
        "(panoptic PNGs), annotations/panoptic_{train,val}2017.json"
    )
    download = (
        "Download COCO 2017 images and the panoptic annotations as described in datasets/README.md "
        "(the dataset root is $DETECTRON2_DATASETS, default 'datasets')"
    )
    if name.endswith("_with_sem_seg"):
        return (
            f"{layout} and panoptic_semseg_{{train,val}}2017/ (semantic PNGs). {download}, then run "
            "`python datasets/prepare_coco_semantic_from_panoptic.py`."
        )
    if "val_100" in name:
        return (
            f"Expected {coco}/panoptic_val2017_100/ and {coco}/annotations/panoptic_val2017_100.json, "
            "a 100-image subset of val2017 that Detectron2 does not ship. With COCO val2017 panoptic in "
            "place, run `python datasets/prepare_coco_semantic_from_panoptic.py --val-100` to create it "
            "(see datasets/README.md), or use coco_2017_val_panoptic."
        )
    return (
        f"{layout}. {download}. (`python datasets/prepare_coco_semantic_from_panoptic.py` then adds "
        "the semantic PNGs that the *_with_sem_seg names need.)"
    )


def _coco_standard_metadata() -> Dict:
    return _get_builtin_metadata("coco_panoptic_standard")


def load_coco_builtin_panoptic(root: str, name: str) -> List[dict]:
    """Load Detectron2's builtin COCO panoptic split ``name`` from under ``root``, checking every file.

    Checks the JSON and folders first, then calls Detectron2's ``load_coco_panoptic_json`` and checks
    that each record's image and panoptic PNG exist.
    """
    if name not in COCO_BUILTIN_PANOPTIC_SPLITS:
        raise KeyError(f"{name} is not one of {sorted(COCO_BUILTIN_PANOPTIC_SPLITS)}")
    image_root, panoptic_root, panoptic_json, _ = (
        os.path.join(root, p) for p in COCO_BUILTIN_PANOPTIC_SPLITS[name]
    )
    hint = coco_prepare_hint(root, name)
    _require(panoptic_json, "panoptic JSON", hint)
    _require(image_root, "image folder", hint)
    _require(panoptic_root, "panoptic PNG folder", hint)
    try:
        records = load_coco_panoptic_json(panoptic_json, image_root, panoptic_root,
                                          _coco_standard_metadata())
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{panoptic_json} is not valid JSON: {e}") from e
    except KeyError as e:
        raise DatasetFormatError(
            f"{panoptic_json}: key {e} is missing, or a segment has a category id that is not a COCO "
            "panoptic category. Use the official panoptic_{train,val}2017.json."
        ) from e
    except AssertionError as e:
        # Detectron2 asserts that the JSON has annotations and that the first files exist.
        raise FileNotFoundError(f"{panoptic_json}: {e}\n  {hint}") from e
    check_record_files(records, ("file_name", "pan_seg_file_name"), panoptic_json, hint)
    return records


def check_record_files(records: List[dict], keys, source: str, hint: str) -> None:
    """Raise FileNotFoundError naming the first missing file among ``record[key]`` for all records."""
    missing = [r[k] for r in records for k in keys if not os.path.isfile(r[k])]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) listed in {source} are missing, the first one: {missing[0]}\n"
            f"  {hint}"
        )


def update_metadata(name: str, required: Dict, defaults: Dict) -> None:
    """Make ``MetadataCatalog[name]`` hold ``required`` and ``defaults`` where a key is missing.

    Every other existing key is kept. ``Metadata.set`` refuses to change a value, so when a required
    value (e.g. a path under another root) differs, the metadata is rebuilt with the same keys.
    """
    current = {k: v for k, v in MetadataCatalog.get(name).as_dict().items() if k != "name"}
    wanted = {**defaults, **current, **required}
    if wanted == current:
        return
    if any(k in current and current[k] != v for k, v in required.items()):
        MetadataCatalog.remove(name)
    MetadataCatalog.get(name).set(**wanted)


def _register_with_sem_seg(root: str) -> None:
    for name, rel_paths in COCO_WITH_SEM_SEG_SPLITS.items():
        image_root, panoptic_root, panoptic_json, sem_seg_root = (
            os.path.join(root, p) for p in rel_paths
        )
        # These names are ours: drop a previous registration (another root, or a module reload).
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        if name in MetadataCatalog.list():
            MetadataCatalog.remove(name)
        register_panoptic_dataset(
            name,
            COCO_CATEGORIES,
            image_root=image_root,
            panoptic_root=panoptic_root,
            panoptic_json=panoptic_json,
            sem_seg_root=sem_seg_root,
            label_divisor=1000,
            ignore_label=255,
            image_ext=".jpg",
            prepare_hint=coco_prepare_hint(root, name),
        )


def _wrap_builtin(root: str) -> None:
    # Detectron2's metadata for these names: thing_dataset_id_to_contiguous_id holds the 80 things,
    # stuff_dataset_id_to_contiguous_id the 53 stuff classes, together 0..132, which is what
    # COCOPanopticEvaluator inverts. It is kept as is. SemSegEvaluator needs sem_seg_file_name, which
    # these records lack: use the *_with_sem_seg names for semantic evaluation.
    defaults = dict(
        _coco_standard_metadata(), evaluator_type="coco_panoptic_seg", ignore_label=255,
        label_divisor=1000,
    )
    for name, rel_paths in COCO_BUILTIN_PANOPTIC_SPLITS.items():
        image_root, panoptic_root, panoptic_json, json_file = (
            os.path.join(root, p) for p in rel_paths
        )
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda r=root, n=name: load_coco_builtin_panoptic(r, n))
        update_metadata(
            name,
            required=dict(image_root=image_root, panoptic_root=panoptic_root,
                          panoptic_json=panoptic_json, json_file=json_file),
            defaults=defaults,
        )


def register_all_coco_panoptic(root: str) -> None:
    """Register the COCO panoptic names under ``root``; calling it again (any root) is safe."""
    _register_with_sem_seg(root)
    _wrap_builtin(root)


register_all_coco_panoptic(os.getenv("DETECTRON2_DATASETS", "datasets"))
