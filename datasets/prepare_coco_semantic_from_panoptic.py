#!/usr/bin/env python
"""Write COCO semantic PNGs from the COCO panoptic annotations.

For each split, reads ``coco/annotations/panoptic_{split}2017.json`` and ``coco/panoptic_{split}2017/*.png``
under the dataset root and writes ``coco/panoptic_semseg_{split}2017/<same name>.png``: uint8, the
contiguous class id 0..132 (order of Detectron2's ``COCO_CATEGORIES``, things and stuff together) per
pixel, 255 where the panoptic PNG is unlabelled (id 0). Crowd segments keep their class.

Usage::

    python datasets/prepare_coco_semantic_from_panoptic.py [--root DIR] [--splits train val] [--workers N]
    python datasets/prepare_coco_semantic_from_panoptic.py --val-100   # also build panoptic_val2017_100

The root defaults to ``$DETECTRON2_DATASETS`` (default ``datasets``).
"""
import argparse
import functools
import json
import multiprocessing as mp
import os
import shutil
import sys
from typing import Dict, List, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

IGNORE_LABEL = 255
DOWNLOAD_HINT = (
    "Download and unpack COCO 2017 panoptic annotations as described in datasets/README.md: "
    "coco/annotations/panoptic_{train,val}2017.json and the PNG folders coco/panoptic_{train,val}2017/."
)


def coco_category_map() -> Dict[int, int]:
    """COCO panoptic category id -> contiguous id, in the order of Detectron2's ``COCO_CATEGORIES``."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    return {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}


def panoptic_to_semantic(pan_png: str, segments_info: List[dict], id_map: Dict[int, int],
                         json_file: str) -> np.ndarray:
    """The uint8 semantic map of one panoptic PNG (255 = unlabelled)."""
    rgb = np.asarray(Image.open(pan_png).convert("RGB"), dtype=np.uint32)
    pan = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    seg_class = {}
    for seg in segments_info:
        cat = seg["category_id"]
        if cat not in id_map:
            raise ValueError(
                f"{json_file}: segment {seg['id']} of {os.path.basename(pan_png)} has category_id {cat}, "
                "which is not a COCO panoptic category"
            )
        seg_class[int(seg["id"])] = id_map[cat]
    ids, inverse = np.unique(pan, return_inverse=True)
    unlisted = [int(i) for i in ids if i != 0 and int(i) not in seg_class]
    if unlisted:
        raise ValueError(
            f"{pan_png} contains segment id(s) {unlisted[:10]} that segments_info in {json_file} does not "
            "list; the PNG and the JSON do not belong together"
        )
    lut = np.array([seg_class.get(int(i), IGNORE_LABEL) for i in ids], dtype=np.uint8)
    sem = lut[inverse].reshape(pan.shape)
    return sem


def _convert_one(ann: dict, pan_dir: str, sem_dir: str, id_map: Dict[int, int], json_file: str) -> None:
    pan_png = os.path.join(pan_dir, ann["file_name"])
    if not os.path.isfile(pan_png):
        raise FileNotFoundError(f"panoptic PNG listed in {json_file} not found: {pan_png}\n  {DOWNLOAD_HINT}")
    sem = panoptic_to_semantic(pan_png, ann["segments_info"], id_map, json_file)
    Image.fromarray(sem).save(os.path.join(sem_dir, ann["file_name"]))


def _load_json(json_file: str) -> dict:
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"panoptic JSON not found: {json_file}\n  {DOWNLOAD_HINT}")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{json_file} is not valid JSON: {e}") from e
    if "annotations" not in data:
        raise ValueError(f"{json_file} has no 'annotations' list: not a COCO panoptic JSON")
    return data


def convert_split(root: str, split: str, workers: int = 0) -> str:
    """Write ``coco/panoptic_semseg_{split}2017/`` under ``root``; returns that folder.

    ``workers`` > 1 uses a process pool of that size, otherwise runs in this process.
    """
    coco = os.path.join(root, "coco")
    json_file = os.path.join(coco, "annotations", f"panoptic_{split}2017.json")
    pan_dir = os.path.join(coco, f"panoptic_{split}2017")
    sem_dir = os.path.join(coco, f"panoptic_semseg_{split}2017")
    data = _load_json(json_file)
    if not os.path.isdir(pan_dir):
        raise FileNotFoundError(f"panoptic PNG folder not found: {pan_dir}\n  {DOWNLOAD_HINT}")
    os.makedirs(sem_dir, exist_ok=True)
    fn = functools.partial(_convert_one, pan_dir=pan_dir, sem_dir=sem_dir, id_map=coco_category_map(),
                           json_file=json_file)
    anns = data["annotations"]
    desc = f"{split}2017 -> {sem_dir}"
    if workers > 1:
        with mp.Pool(processes=workers) as pool:
            for _ in tqdm(pool.imap_unordered(fn, anns, chunksize=16), total=len(anns), desc=desc):
                pass
    else:
        for ann in tqdm(anns, desc=desc):
            fn(ann)
    return sem_dir


def make_val_100(root: str, num_images: int = 100) -> None:
    """Write Detectron2's ``coco_2017_val_100_panoptic`` files: the first ``num_images`` val annotations.

    Creates ``coco/annotations/panoptic_val2017_100.json`` and copies their PNGs to
    ``coco/panoptic_val2017_100/``; the images stay in ``coco/val2017/``.
    """
    coco = os.path.join(root, "coco")
    json_file = os.path.join(coco, "annotations", "panoptic_val2017.json")
    data = _load_json(json_file)
    anns = data["annotations"][:num_images]
    ids = {a["image_id"] for a in anns}
    subset = dict(data, annotations=anns, images=[im for im in data["images"] if im["id"] in ids])
    src_dir = os.path.join(coco, "panoptic_val2017")
    dst_dir = os.path.join(coco, "panoptic_val2017_100")
    os.makedirs(dst_dir, exist_ok=True)
    for ann in anns:
        src = os.path.join(src_dir, ann["file_name"])
        if not os.path.isfile(src):
            raise FileNotFoundError(f"panoptic PNG listed in {json_file} not found: {src}\n  {DOWNLOAD_HINT}")
        shutil.copyfile(src, os.path.join(dst_dir, ann["file_name"]))
    with open(os.path.join(coco, "annotations", "panoptic_val2017_100.json"), "w") as f:
        json.dump(subset, f)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                        help="dataset root holding coco/ (default: $DETECTRON2_DATASETS or 'datasets')")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="worker processes (1 = no pool)")
    parser.add_argument("--val-100", action="store_true",
                        help="also create Detectron2's coco_2017_val_100_panoptic subset")
    args = parser.parse_args(argv)
    for split in args.splits:
        convert_split(args.root, split, args.workers)
    if args.val_100:
        make_val_100(args.root)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
