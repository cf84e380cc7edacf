"""Evaluation checks its ground truth and the model's classes before scoring.

Each case writes a tiny COCO-panoptic dataset (3 images of 40 x 32), damages it one way and runs
``Trainer.test`` (or ``setup_cfg``) with a stub model that echoes a fixed, imperfect prediction.
"""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, DatasetMapper, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import COCOPanopticEvaluator, inference_on_dataset
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

import cmt_cops_d2.evaluation.panoptic as checked_panoptic
from cmt_cops_d2 import register_panoptic_dataset
from cmt_cops_d2.data.mappers import read_panoptic_checked
from cmt_cops_d2.engine import Trainer, setup_cfg

from ..conftest import CONFIG_DIR

H, W, NUM_IMAGES = 32, 40, 3
CATEGORIES = [
    {"id": 1, "name": "ground", "isthing": 0},
    {"id": 2, "name": "sky", "isthing": 0},
    {"id": 5, "name": "box", "isthing": 1},
    {"id": 7, "name": "disc", "isthing": 1},
]
GROUND, SKY, BOX, DISC = 1, 2, 10, 20          # segment ids (+ image index for the things)


def _layout(k):
    """Segment-id map of image ``k``: sky over ground, a box and a disc, an unlabelled column."""
    pan = np.full((H, W), SKY, np.int64)
    pan[H // 2:] = GROUND
    pan[4 + k:14 + k, 3:13] = BOX + k
    yy, xx = np.mgrid[:H, :W]
    pan[(yy - 20) ** 2 + (xx - 28) ** 2 < 36 + 4 * k] = DISC + k
    pan[:, -2:] = 0
    return pan


def _category(sid):
    return {GROUND: 1, SKY: 2}.get(sid) or (5 if sid < DISC else 7)


def _segments(pan):
    segs = []
    for sid in np.unique(pan)[1:].tolist():
        ys, xs = np.nonzero(pan == sid)
        segs.append({"id": sid, "category_id": _category(sid), "iscrowd": 0, "area": len(ys),
                     "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs)) + 1, int(np.ptp(ys)) + 1]})
    return segs


def _write_dataset(root):
    paths = {"image_root": os.path.join(root, "images"), "panoptic_root": os.path.join(root, "panoptic"),
             "panoptic_json": os.path.join(root, "panoptic.json")}
    os.makedirs(paths["image_root"])
    os.makedirs(paths["panoptic_root"])
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for k in range(NUM_IMAGES):
        pan = _layout(k)
        Image.fromarray(rng.integers(0, 255, (H, W, 3), dtype=np.uint8)).save(
            os.path.join(paths["image_root"], f"img{k}.jpg"), quality=90)
        Image.fromarray(id2rgb(pan)).save(os.path.join(paths["panoptic_root"], f"img{k}.png"))
        images.append({"id": k, "file_name": f"img{k}.jpg", "height": H, "width": W})
        annotations.append({"image_id": k, "file_name": f"img{k}.png", "segments_info": _segments(pan)})
    with open(paths["panoptic_json"], "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": CATEGORIES}, f)
    return paths


@pytest.fixture
def dataset(tmp_path):
    """A fresh dataset registered as ``reliability_<test>``: (name, paths, names to unregister)."""
    name = f"reliability_{tmp_path.name}"
    paths = _write_dataset(str(tmp_path / "data"))
    register_panoptic_dataset(name, CATEGORIES, **paths)
    registered = [name]
    yield name, paths, registered
    for n in registered:
        DatasetCatalog.remove(n)
        MetadataCatalog.remove(n)


class EchoModel(torch.nn.Module):
    """Predicts the ground truth of each input minus its disc and with the box one pixel too wide, so
    that PQ is neither 0 nor 100."""

    def forward(self, inputs):
        outputs = []
        for x in inputs:
            pan = rgb2id(np.asarray(Image.open(x["pan_seg_file_name"]).convert("RGB"))).astype(np.int32)
            info = []
            for s in x["segments_info"]:
                mask = pan == s["id"]
                if s["category_id"] == 3:                    # disc: not predicted
                    pan[mask] = 0
                    continue
                if s["category_id"] == 2:                    # box: one column wider
                    ys, xs = np.nonzero(mask)
                    pan[ys.min():ys.max() + 1, xs.max() + 1] = s["id"]
                info.append({"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]})
            outputs.append({"panoptic_seg": (torch.from_numpy(pan), info)})
        return outputs


def _cfg(out, train, test, *opts):
    return setup_cfg(argparse.Namespace(
        config_file=os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml"),
        opts=["MODEL.DEVICE", "cpu", "DATALOADER.NUM_WORKERS", "0", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "4",
              "DATASETS.TRAIN", repr(tuple(train)), "DATASETS.TEST", repr(tuple(test)),
              "OUTPUT_DIR", str(out), *opts]))


def _evaluate(name, out):
    return Trainer.test(_cfg(out, [name], [name]), EchoModel())["panoptic_seg"]


# ---------------------------------------------------------------------------------------------------
# Damage: function(paths) -> None, then the error Trainer.test must raise.


def _edit_json(paths, edit):
    with open(paths["panoptic_json"]) as f:
        data = json.load(f)
    edit(data)
    with open(paths["panoptic_json"], "w") as f:
        json.dump(data, f)


def _png(paths, k=0):
    return os.path.join(paths["panoptic_root"], f"img{k}.png")


def _drop_disc_from_json(paths):
    _edit_json(paths, lambda d: d["annotations"][0]["segments_info"].pop())


def _add_segment_without_pixels(paths):
    _edit_json(paths, lambda d: d["annotations"][0]["segments_info"].append(
        {"id": 99, "category_id": 5, "iscrowd": 0, "area": 4, "bbox": [0, 0, 2, 2]}))


def _shrink_png(paths):
    Image.open(_png(paths)).resize((W // 2, H // 2), Image.Resampling.NEAREST).save(_png(paths))


def _grayscale_png(paths):
    Image.open(_png(paths)).convert("L").save(_png(paths))


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:int(len(data) * keep)])


def _unknown_category(paths):
    _edit_json(paths, lambda d: d["annotations"][1]["segments_info"][0].update(category_id=99))


def _category_not_in_json(paths):
    _edit_json(paths, lambda d: d["categories"].pop())


def _no_iscrowd(paths):
    _edit_json(paths, lambda d: d["annotations"][2]["segments_info"][1].pop("iscrowd"))


def _image_without_annotation(paths):
    _edit_json(paths, lambda d: d["annotations"].pop())


PNG = r"panoptic PNG \S*img0\.png"
GT_CASES = {
    "png_segment_missing_from_json": (_drop_disc_from_json, rf"{PNG} \(image 0\): segment id\(s\) \[{DISC}\] "
                                      r"appear in the PNG but not in the JSON's segments_info"),
    "json_segment_without_pixels": (_add_segment_without_pixels,
                                    rf"{PNG} \(image 0\): segment id\(s\) \[99\] are listed in the JSON but "
                                    "have no pixel in the PNG"),
    "png_wrong_size": (_shrink_png, rf"{PNG} is 20x16 but the image is 40x32"),
    "png_grayscale": (_grayscale_png, rf"{PNG} has PIL mode 'L'"),
    "png_truncated": (lambda p: _truncate(_png(p)), r"cannot read panoptic PNG \S*img0\.png: \w+"),
    "json_unknown_category": (_unknown_category, r"panoptic\.json, annotation of image_id 1 \(img1\.png\): "
                              r"segment 1 has category_id 99, which is not among"),
    "json_category_not_listed": (_category_not_in_json, r"panoptic\.json, annotation of image_id \d \(img\d\.png\): "
                                 r"segment 2\d has category_id 7, which the JSON's 'categories' do not list"),
    "json_segment_without_iscrowd": (_no_iscrowd, r"panoptic\.json, annotation of image_id 2 \(img2\.png\): "
                                     r"segment 2: no \['iscrowd'\] key"),
    "json_image_without_annotation": (_image_without_annotation, r"panoptic\.json: 'images' lists image_id 2 "
                                      r"\(img2\.jpg\) but 'annotations' has none"),
    "jpeg_truncated": (lambda p: _truncate(os.path.join(p["image_root"], "img1.jpg")),
                       r"cannot read image \S*img1\.jpg: OSError: image file is truncated"),
}


@pytest.mark.parametrize("case", sorted(GT_CASES))
def test_damaged_dataset_is_an_error_naming_the_file(dataset, tmp_path, case):
    name, paths, _ = dataset
    damage, message = GT_CASES[case]
    damage(paths)
    with pytest.raises(ValueError, match=message):
        _evaluate(name, tmp_path / "out")


@pytest.mark.parametrize("case", ["png_segment_missing_from_json", "json_segment_without_pixels",
                                  "png_wrong_size", "png_grayscale", "png_truncated"])
def test_training_reader_applies_the_same_png_checks(dataset, case):
    name, paths, _ = dataset
    damage, message = GT_CASES[case]
    damage(paths)
    record = next(r for r in DatasetCatalog.get(name) if r["image_id"] == 0)
    with pytest.raises(ValueError, match=message):
        read_panoptic_checked(record)


def test_undamaged_dataset_scores_as_detectron2_does_and_is_checked_once(dataset, tmp_path, monkeypatch):
    name, paths, _ = dataset
    cfg = _cfg(tmp_path / "plain", [name], [name])
    loader = build_detection_test_loader(cfg, name, mapper=DatasetMapper(cfg, False))
    plain = inference_on_dataset(EchoModel(), loader, COCOPanopticEvaluator(name, str(tmp_path / "plain")))
    calls = []
    check = checked_panoptic.check_panoptic_file
    monkeypatch.setattr(checked_panoptic, "check_panoptic_file", lambda d: calls.append(d) or check(d))
    first = _evaluate(name, tmp_path / "out")
    assert len(calls) == NUM_IMAGES
    assert 0 < first["PQ"] < 100
    assert first == pytest.approx(plain["panoptic_seg"])
    second = _evaluate(name, tmp_path / "out")            # a periodic evaluation: nothing is read again
    assert len(calls) == NUM_IMAGES and second == first
    _drop_disc_from_json(paths)                           # but a changed JSON is checked again
    with pytest.raises(ValueError, match=GT_CASES["png_segment_missing_from_json"][1]):
        _evaluate(name, tmp_path / "out")


def test_every_problem_is_counted_in_one_error(dataset, tmp_path):
    name, paths, _ = dataset
    _drop_disc_from_json(paths)
    _grayscale_png(paths)
    for k in (1, 2):
        Image.open(_png(paths, k)).convert("L").save(_png(paths, k))
    with pytest.raises(ValueError, match=r"has 3 problem\(s\)") as info:
        _evaluate(name, tmp_path / "out")
    assert all(f"img{k}.png has PIL mode 'L'" in str(info.value) for k in range(3))


def _register_reordered(dataset, suffix, categories):
    name, paths, registered = dataset
    other = f"{name}_{suffix}"
    register_panoptic_dataset(other, categories, **paths)
    registered.append(other)
    return name, other


CLASS_CASES = {
    "model_with_more_classes": (
        lambda ds: ([], [ds[0]], "5"),
        r"MODEL\.SEM_SEG_HEAD\.NUM_CLASSES=5 but test dataset 'reliability_\S+' has 4 classes"),
    "two_training_datasets_in_different_order": (
        lambda ds: (_register_reordered(ds, "b", CATEGORIES[::-1]), [ds[0]], "4"),
        r"DATASETS\.TRAIN: dataset 'reliability_\S+_b' does not have the classes of 'reliability_\S+': contiguous "
        r"class id 0 is 'ground' in 'reliability_\S+' but 'disc' in 'reliability_\S+_b'"),
    "test_dataset_with_another_thing_class": (
        lambda ds: ([ds[0]], [_register_reordered(ds, "t", [dict(c, isthing=int(c["id"] == 2))
                                                            for c in CATEGORIES])[1]], "4"),
        r"DATASETS\.TEST: dataset 'reliability_\S+_t' does not have the classes of 'reliability_\S+': contiguous "
        r"class id 1 \('sky'\) is a thing in 'reliability_\S+_t' but not in 'reliability_\S+'"),
}


@pytest.mark.parametrize("case", sorted(CLASS_CASES))
def test_class_mismatch_is_an_error_before_evaluation(dataset, tmp_path, case):
    make, message = CLASS_CASES[case]
    train, test, num_classes = make(dataset)
    with pytest.raises(ValueError, match=message):
        _cfg(tmp_path / "out", train, test, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", num_classes)


def test_model_with_more_classes_fails_in_build_evaluator_too(dataset, tmp_path):
    """A config that skipped setup_cfg's checks still fails before inference, not with ``KeyError: 4``."""
    name, _, _ = dataset
    cfg = _cfg(tmp_path / "out", [name], [name])
    cfg.defrost()
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 5
    with pytest.raises(ValueError, match=rf"NUM_CLASSES=5 but test dataset '{name}' has 4 classes"):
        Trainer.test(cfg, EchoModel())
