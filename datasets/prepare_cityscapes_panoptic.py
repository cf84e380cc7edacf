#!/usr/bin/env python
"""Prepare Cityscapes fine panoptic annotations for ``cityscapes_fine_panoptic_{train,val}``.

Needs ``cityscapesscripts`` (``pip install cityscapesscripts``) and the official ``gtFine`` folder
(``gtFine_trainvaltest.zip``) under ``<root>/cityscapes/``. For each split it

1. writes ``gtFine/<split>/<city>/*_gtFine_labelTrainIds.png`` from ``*_gtFine_polygons.json``
   (cityscapesscripts' ``json2labelImg``, as ``createTrainIdLabelImgs.py`` does; Detectron2's records
   point to these files as ``sem_seg_file_name``),
2. runs cityscapesscripts' panoptic conversion (``createPanopticImgs.convert2panoptic``, label ids, not
   trainIds, as Detectron2's metadata expects) on ``*_gtFine_instanceIds.png``, which writes
   ``gtFine/cityscapes_panoptic_<split>/`` and ``gtFine/cityscapes_panoptic_<split>.json``.

Usage::

    python datasets/prepare_cityscapes_panoptic.py [--root DIR] [--splits train val] [--workers N]

The root defaults to ``$DETECTRON2_DATASETS`` (default ``datasets``).
"""
import argparse
import glob
import multiprocessing as mp
import os
import sys
from typing import List, Optional

from tqdm import tqdm

GT_HINT = (
    "Download gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com/downloads/ (registration "
    "needed) and unzip it into {cs}/ so that {cs}/gtFine/{{train,val}}/<city>/ exist; see datasets/README.md."
)


def _import_cityscapesscripts():
    try:
        from cityscapesscripts.preparation.createPanopticImgs import convert2panoptic
        from cityscapesscripts.preparation.json2labelImg import json2labelImg
    except ImportError as e:
        raise ImportError(
            f"cityscapesscripts is needed to prepare Cityscapes ({e}). Install it with "
            "`pip install cityscapesscripts`."
        ) from e
    return convert2panoptic, json2labelImg


def _train_ids_one(polygons_json: str) -> None:
    _, json2labelImg = _import_cityscapesscripts()
    json2labelImg(polygons_json, polygons_json.replace("_polygons.json", "_labelTrainIds.png"), "trainIds")


def prepare(root: str, splits: List[str], workers: int = 0) -> None:
    """Create the labelTrainIds PNGs and the panoptic PNGs + JSON for ``splits`` under ``root``."""
    cs = os.path.join(root, "cityscapes")
    gt_fine = os.path.join(cs, "gtFine")
    hint = GT_HINT.format(cs=cs)
    if not os.path.isdir(gt_fine):
        raise FileNotFoundError(f"Cityscapes gtFine folder not found: {gt_fine}\n  {hint}")
    polygons = {}
    for split in splits:
        split_dir = os.path.join(gt_fine, split)
        if not os.path.isdir(split_dir):
            raise FileNotFoundError(f"Cityscapes gtFine split folder not found: {split_dir}\n  {hint}")
        # Check first: cityscapesscripts calls sys.exit() when it finds nothing.
        for pattern in ("*_gtFine_polygons.json", "*_gtFine_instanceIds.png"):
            if not glob.glob(os.path.join(split_dir, "*", pattern)):
                raise FileNotFoundError(
                    f"no {pattern} files in {split_dir}/<city>/: gtFine is incomplete\n  {hint}"
                )
        polygons[split] = sorted(glob.glob(os.path.join(split_dir, "*", "*_gtFine_polygons.json")))
    convert2panoptic, _ = _import_cityscapesscripts()

    for split in splits:
        files = polygons[split]
        desc = f"{split}: labelTrainIds"
        if workers > 1:
            with mp.Pool(processes=workers) as pool:
                for _ in tqdm(pool.imap_unordered(_train_ids_one, files, chunksize=8),
                              total=len(files), desc=desc):
                    pass
        else:
            for f in tqdm(files, desc=desc):
                _train_ids_one(f)
    convert2panoptic(cityscapesPath=gt_fine, outputFolder=gt_fine, useTrainId=False, setNames=list(splits))


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                        help="dataset root holding cityscapes/ (default: $DETECTRON2_DATASETS or 'datasets')")
    parser.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val"])
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="worker processes for the labelTrainIds step (1 = no pool)")
    args = parser.parse_args(argv)
    prepare(args.root, args.splits, args.workers)


if __name__ == "__main__":
    try:
        main()
    except (ImportError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
