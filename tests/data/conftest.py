"""Tiny fake panoptic datasets written in ``tmp_path`` for the data tests."""
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from panopticapi.utils import id2rgb

REPO = Path(__file__).resolve().parents[2]

# Real COCO panoptic category ids: person (contiguous 0), car (2), banner (80, first stuff), rug-merged (132).
COCO_THINGS = (1, 3)
COCO_STUFF = (92, 200)


def segment_entry(pan: np.ndarray, sid: int, category_id: int, iscrowd: int = 0) -> dict:
    """A ``segments_info`` entry for segment ``sid`` of the id map ``pan``, with area and XYWH bbox."""
    ys, xs = np.nonzero(pan == sid)
    return {
        "id": int(sid),
        "category_id": int(category_id),
        "iscrowd": int(iscrowd),
        "area": int(len(ys)),
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
    }


def make_layouts(n: int, things=COCO_THINGS, stuff=COCO_STUFF):
    """``n`` small id maps with one stuff segment, two things (ids using the G and B channels), a void
    pixel and, in the first image, a crowd thing. Returns [(pan, segments_info)]."""
    out = []
    for k in range(n):
        h, w = 6 + k, 8
        pan = np.zeros((h, w), np.uint32)
        stuff_id, thing_a, thing_b = 1 + k, 3 * 256 + 1, 2 * 65536 + 5
        pan[:, : w // 2] = stuff_id
        pan[1:3, 5:7] = thing_a
        pan[4:, 5:] = thing_b
        pan[0, 7] = 0  # unlabelled
        segs = [
            segment_entry(pan, stuff_id, stuff[k % len(stuff)]),
            segment_entry(pan, thing_a, things[0]),
            segment_entry(pan, thing_b, things[1 % len(things)], iscrowd=int(k == 0)),
        ]
        out.append((pan, segs))
    return out


def write_panoptic_dataset(image_dir, pan_dir, json_file, categories, layouts, image_ext=".png",
                           sem_dir=None, first_id=1):
    """Write images, panoptic PNGs (``id2rgb``), the JSON and, with ``sem_dir``, semantic PNGs (contiguous
    id by ``categories`` order, 255 void). Returns the JSON dict."""
    for d in (image_dir, pan_dir, os.path.dirname(json_file)) + ((sem_dir,) if sem_dir else ()):
        os.makedirs(d, exist_ok=True)
    contiguous = {c["id"]: i for i, c in enumerate(categories)}
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i, (pan, segs) in enumerate(layouts):
        image_id = first_id + i
        stem = f"{image_id:012d}"
        h, w = pan.shape
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            os.path.join(image_dir, stem + image_ext))
        Image.fromarray(id2rgb(pan)).save(os.path.join(pan_dir, stem + ".png"))
        if sem_dir:
            sem = np.full((h, w), 255, np.uint8)
            for s in segs:
                sem[pan == s["id"]] = contiguous[s["category_id"]]
            Image.fromarray(sem).save(os.path.join(sem_dir, stem + ".png"))
        images.append({"id": image_id, "file_name": stem + image_ext, "height": h, "width": w})
        annotations.append({"image_id": image_id, "file_name": stem + ".png", "segments_info": segs})
    data = {"images": images, "annotations": annotations, "categories": [dict(c) for c in categories]}
    with open(json_file, "w") as f:
        json.dump(data, f)
    return data


def write_fake_coco(root, splits=(("train", 2), ("val", 3))):
    """A COCO 2017 panoptic layout under ``root/coco`` without semantic PNGs.

    Returns {split: (json dict, layouts)}."""
    from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

    coco = os.path.join(root, "coco")
    out = {}
    for split, n in splits:
        layouts = make_layouts(n)
        data = write_panoptic_dataset(
            os.path.join(coco, f"{split}2017"), os.path.join(coco, f"panoptic_{split}2017"),
            os.path.join(coco, "annotations", f"panoptic_{split}2017.json"), COCO_CATEGORIES, layouts,
            image_ext=".jpg", first_id=100 if split == "val" else 1,
        )
        out[split] = (data, layouts)
    return out


def load_script(name: str):
    """Import ``datasets/<name>.py`` (not a package) as a module."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "datasets" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # so that a process pool can pickle its functions
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fakes():
    """The helpers above, for the test modules (no ``import conftest``, which is ambiguous)."""
    return types.SimpleNamespace(
        segment_entry=segment_entry, make_layouts=make_layouts,
        write_panoptic_dataset=write_panoptic_dataset, write_fake_coco=write_fake_coco,
        load_script=load_script, COCO_THINGS=COCO_THINGS, COCO_STUFF=COCO_STUFF,
    )


@pytest.fixture
def restore_real_registrations():
    """Re-register the COCO / Cityscapes names under the environment's root after a test moved them."""
    yield
    from cmt_cops_d2.data.datasets.register_cityscapes_panoptic import register_all_cityscapes_panoptic
    from cmt_cops_d2.data.datasets.register_coco_panoptic import register_all_coco_panoptic

    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    register_all_coco_panoptic(root)
    register_all_cityscapes_panoptic(root)
