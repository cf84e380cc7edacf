"""Checked versions of Detectron2's ``cityscapes_fine_panoptic_{train,val}``.

Detectron2 registers these names (detectron2/data/datasets/cityscapes_panoptic.py) with a loader that
only asserts on the first file. :func:`register_all_cityscapes_panoptic` replaces the loader with
:func:`load_cityscapes_panoptic_checked`, which checks the folders, the JSON and every file and names
what is missing and how to create it (``python datasets/prepare_cityscapes_panoptic.py``). The metadata
stays Detectron2's (trainId contiguous ids, ``evaluator_type="cityscapes_panoptic_seg"``,
``label_divisor=1000``), with paths under the given root.

Records are those of Detectron2's ``load_cityscapes_panoptic``, except that ``sem_seg_file_name`` is
built from the file's name only: Detectron2 cuts the whole path at its first ``.``, which breaks roots
such as ``../datasets``.
"""
import json
import os
from typing import Dict, List

from detectron2.data import DatasetCatalog
from detectron2.data.datasets.builtin_meta import CITYSCAPES_CATEGORIES
from detectron2.data.datasets.cityscapes_panoptic import get_cityscapes_panoptic_files

from .panoptic import DatasetFormatError, _require
from .register_coco_panoptic import check_record_files, update_metadata

__all__ = [
    "CITYSCAPES_PANOPTIC_SPLITS",
    "cityscapes_prepare_hint",
    "cityscapes_panoptic_metadata",
    "load_cityscapes_panoptic_checked",
    "register_all_cityscapes_panoptic",
]

CITYSCAPES_PANOPTIC_SPLITS = {
    "cityscapes_fine_panoptic_train": "train",
    "cityscapes_fine_panoptic_val": "val",
}


def _split_paths(root: str, split: str) -> Dict[str, str]:
    cs = os.path.join(root, "cityscapes")
    return {
        "image_root": os.path.join(cs, "leftImg8bit", split),
        "panoptic_root": os.path.join(cs, "gtFine", f"cityscapes_panoptic_{split}"),
        "panoptic_json": os.path.join(cs, "gtFine", f"cityscapes_panoptic_{split}.json"),
        "gt_dir": os.path.join(cs, "gtFine", split),
    }


def cityscapes_prepare_hint(root: str) -> str:
    """What to do when a Cityscapes panoptic file is missing."""
    cs = os.path.join(root, "cityscapes")
    return (
        f"Expected under {cs}/: leftImg8bit/{{train,val}}/<city>/*_leftImg8bit.png and gtFine/ from "
        "the official gtFine_trainvaltest.zip (see datasets/README.md; the dataset root is "
        "$DETECTRON2_DATASETS, default 'datasets'). Then run "
        "`python datasets/prepare_cityscapes_panoptic.py` to create "
        "gtFine/cityscapes_panoptic_{train,val}[.json] and the *_labelTrainIds.png files."
    )


def cityscapes_panoptic_metadata() -> Dict:
    """Detectron2's Cityscapes panoptic metadata: classes by trainId, label ids mapped to trainIds."""
    names = [c["name"] for c in CITYSCAPES_CATEGORIES]
    colors = [c["color"] for c in CITYSCAPES_CATEGORIES]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if c["isthing"] == 1
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: c["trainId"] for c in CITYSCAPES_CATEGORIES if c["isthing"] != 1
        },
    }


def load_cityscapes_panoptic_checked(root: str, split: str) -> List[dict]:
    """Load Cityscapes fine panoptic ``split`` ("train" or "val") from under ``root``, checking every file.

    Returns Detectron2's records: ``file_name``, ``image_id`` (``<city>_<seq>_<frame>``),
    ``sem_seg_file_name`` (``*_gtFine_labelTrainIds.png``), ``pan_seg_file_name`` and ``segments_info``
    with contiguous (trainId) ``category_id``.
    """
    paths = _split_paths(root, split)
    hint = cityscapes_prepare_hint(root)
    _require(paths["image_root"], "Cityscapes image folder", hint)
    _require(paths["gt_dir"], "Cityscapes gtFine folder", hint)
    _require(paths["panoptic_json"], "Cityscapes panoptic JSON", hint)
    _require(paths["panoptic_root"], "Cityscapes panoptic PNG folder", hint)
    json_file = paths["panoptic_json"]
    try:
        with open(json_file) as f:
            json_info = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{json_file} is not valid JSON: {e}\n  {hint}") from e
    if "annotations" not in json_info:
        raise DatasetFormatError(f"{json_file} has no 'annotations' list\n  {hint}")
    try:
        files = get_cityscapes_panoptic_files(paths["image_root"], paths["panoptic_root"], json_info)
    except AssertionError as e:
        # Detectron2 asserts on file names, on annotations without image and on the first files.
        raise DatasetFormatError(
            f"{json_file} does not match {paths['image_root']}: {e}\n  {hint}"
        ) from e

    meta = cityscapes_panoptic_metadata()
    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    suffix = "_leftImg8bit.png"
    ret = []
    for image_file, label_file, segments_info in files:
        city = os.path.basename(os.path.dirname(image_file))
        stem = os.path.basename(image_file)[: -len(suffix)]
        segments = []
        for seg in segments_info:
            cat = seg["category_id"]
            if cat in thing_map:
                seg = dict(seg, category_id=thing_map[cat], isthing=True)
            elif cat in stuff_map:
                seg = dict(seg, category_id=stuff_map[cat], isthing=False)
            else:
                raise DatasetFormatError(
                    f"{json_file}, image {stem}: segment {seg.get('id')} has category_id {cat}, which "
                    "is not a Cityscapes evaluation label id. Create the JSON with "
                    "`python datasets/prepare_cityscapes_panoptic.py` (label ids, not trainIds)."
                )
            segments.append(seg)
        ret.append({
            "file_name": image_file,
            "image_id": "_".join(stem.split("_")[:3]),
            "sem_seg_file_name": os.path.join(
                paths["gt_dir"], city, stem + "_gtFine_labelTrainIds.png"
            ),
            "pan_seg_file_name": label_file,
            "segments_info": segments,
        })
    check_record_files(ret, ("file_name", "pan_seg_file_name", "sem_seg_file_name"), json_file, hint)
    return ret


def register_all_cityscapes_panoptic(root: str) -> None:
    """(Re-)register ``cityscapes_fine_panoptic_{train,val}`` under ``root``; safe to call again."""
    defaults = dict(
        cityscapes_panoptic_metadata(),
        evaluator_type="cityscapes_panoptic_seg",
        ignore_label=255,
        label_divisor=1000,
    )
    for name, split in CITYSCAPES_PANOPTIC_SPLITS.items():
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
        DatasetCatalog.register(name, lambda r=root, s=split: load_cityscapes_panoptic_checked(r, s))
        update_metadata(name, required=_split_paths(root, split), defaults=defaults)


register_all_cityscapes_panoptic(os.getenv("DETECTRON2_DATASETS", "datasets"))
