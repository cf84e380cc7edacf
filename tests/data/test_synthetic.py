"""The synthetic generator: determinism, COCO panoptic format, round trips through panopticapi and
Detectron2's loader."""
import json
import os

import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from panopticapi.evaluation import pq_compute
from panopticapi.utils import rgb2id
from PIL import Image

from cmt_cops_d2.data.synthetic import (
    MIN_THING_AREA,
    SYNTHETIC_CATEGORIES,
    SyntheticConfig,
    generate_image,
    generate_split,
)

from ..conftest import TINY


def _paths(root, split):
    base = os.path.join(root, "synthetic_panoptic")
    return (os.path.join(base, "annotations", f"panoptic_{split}2017.json"),
            os.path.join(base, f"panoptic_{split}2017"), os.path.join(base, f"{split}2017"),
            os.path.join(base, f"panoptic_semseg_{split}2017"))


def test_same_seed_same_image_other_seed_other_image():
    a = generate_image(0, "train", 5, TINY)
    b = generate_image(0, "train", 5, TINY)
    c = generate_image(1, "train", 5, TINY)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])


def test_generated_files_are_byte_identical(tmp_path):
    cfg = SyntheticConfig(num_train=3, num_val=1, height=48, width=48, seed=7)
    for out in ("a", "b"):
        generate_split(str(tmp_path / out), "train", 3, cfg)
    for sub in ("train2017", "panoptic_train2017", "panoptic_semseg_train2017"):
        for name in os.listdir(tmp_path / "a" / sub):
            assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes()


def test_png_and_json_agree(tiny_synthetic):
    json_file, pan_dir, img_dir, sem_dir = _paths(tiny_synthetic, "train")
    with open(json_file) as f:
        data = json.load(f)
    contiguous = {c["id"]: i for i, c in enumerate(data["categories"])}
    assert data["categories"] == SYNTHETIC_CATEGORIES
    assert len(data["images"]) == TINY.num_train == len(data["annotations"])
    for img, ann in zip(data["images"], data["annotations"]):
        image = np.asarray(Image.open(os.path.join(img_dir, img["file_name"])))
        assert image.shape == (TINY.height, TINY.width, 3) == (img["height"], img["width"], 3)
        pan = rgb2id(np.asarray(Image.open(os.path.join(pan_dir, ann["file_name"]))))
        sem = np.asarray(Image.open(os.path.join(sem_dir, ann["file_name"])))
        ids = set(np.unique(pan).tolist()) - {0}
        assert ids == {s["id"] for s in ann["segments_info"]}
        expected_sem = np.full(pan.shape, 255)
        for s in ann["segments_info"]:
            m = pan == s["id"]
            ys, xs = np.nonzero(m)
            assert s["area"] == m.sum()
            assert s["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            expected_sem[m] = contiguous[s["category_id"]]
            if s["category_id"] in (1, 2, 3, 5):
                assert s["area"] >= MIN_THING_AREA
        assert np.array_equal(sem, expected_sem)


def test_dataset_has_what_the_task_needs(tiny_synthetic):
    """Several stuff regions, several thing classes, small instances, touching instances."""
    json_file, pan_dir, _, _ = _paths(tiny_synthetic, "train")
    with open(json_file) as f:
        data = json.load(f)
    things = {c["id"] for c in SYNTHETIC_CATEGORIES if c["isthing"]}
    small, touching, stuff_per_image, thing_classes = 0, 0, [], set()
    for ann in data["annotations"]:
        pan = rgb2id(np.asarray(Image.open(os.path.join(pan_dir, ann["file_name"]))))
        cat = {s["id"]: s["category_id"] for s in ann["segments_info"]}
        stuff_per_image.append(sum(c not in things for c in cat.values()))
        for s in ann["segments_info"]:
            if s["category_id"] in things:
                thing_classes.add(s["category_id"])
                small += s["area"] < 32 ** 2 / 4
        # two different thing segments 4-adjacent somewhere
        for a, b in ((pan[1:], pan[:-1]), (pan[:, 1:], pan[:, :-1])):
            pairs = (a != b) & np.isin(a, [i for i, c in cat.items() if c in things]) \
                & np.isin(b, [i for i, c in cat.items() if c in things])
            touching += int(pairs.any())
    assert thing_classes == things
    assert min(stuff_per_image) >= 1 and max(stuff_per_image) >= 2
    assert small >= 5
    assert touching >= 3


def test_round_trip_through_panopticapi(tiny_synthetic, tmp_path):
    """Ground truth scored against itself by panopticapi is perfect: the format is what it expects."""
    json_file, pan_dir, _, _ = _paths(tiny_synthetic, "val")
    res = pq_compute(json_file, json_file, gt_folder=pan_dir, pred_folder=pan_dir)
    assert res["All"]["pq"] == pytest.approx(1.0)
    assert res["All"]["n"] == len(SYNTHETIC_CATEGORIES)


def test_round_trip_through_detectron2_loader(tiny_synthetic):
    dicts = DatasetCatalog.get("tiny_synthetic_val")
    meta = MetadataCatalog.get("tiny_synthetic_val")
    json_file, pan_dir, img_dir, sem_dir = _paths(tiny_synthetic, "val")
    with open(json_file) as f:
        data = json.load(f)
    assert len(dicts) == TINY.num_val
    assert meta.evaluator_type == "coco_panoptic_seg"
    assert meta.panoptic_json == json_file and meta.panoptic_root == pan_dir
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 5: 3}
    assert meta.stuff_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 5: 3, 11: 4, 12: 5, 13: 6}
    for d, ann in zip(dicts, data["annotations"]):
        assert d["file_name"] == os.path.join(img_dir, f"{ann['image_id']:06d}.jpg")
        assert d["pan_seg_file_name"] == os.path.join(pan_dir, ann["file_name"])
        assert d["sem_seg_file_name"] == os.path.join(sem_dir, ann["file_name"])
        for s, raw in zip(d["segments_info"], ann["segments_info"]):
            assert s["id"] == raw["id"]
            assert meta.stuff_classes[s["category_id"]] == next(
                c["name"] for c in SYNTHETIC_CATEGORIES if c["id"] == raw["category_id"])
            assert s["isthing"] == (raw["category_id"] in (1, 2, 3, 5))


def test_regenerates_only_when_parameters_change(tmp_path):
    from cmt_cops_d2.data.synthetic import ensure_synthetic_panoptic

    cfg = SyntheticConfig(num_train=2, num_val=1, height=40, width=40)
    root = str(tmp_path / "s")
    assert ensure_synthetic_panoptic(root, cfg) is True
    assert ensure_synthetic_panoptic(root, cfg) is False
    assert ensure_synthetic_panoptic(root, SyntheticConfig(num_train=3, num_val=1, height=40,
                                                           width=40)) is True
    assert len(os.listdir(os.path.join(root, "train2017"))) == 3


def test_bad_generator_parameters():
    with pytest.raises(ValueError, match="at least 32x32"):
        SyntheticConfig(height=16, width=16)
    with pytest.raises(ValueError, match="min_things"):
        SyntheticConfig(min_things=5, max_things=2)
