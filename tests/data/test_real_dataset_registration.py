"""COCO / Cityscapes panoptic registration and the preparation scripts, on tiny fake layouts.

Every test passes its dataset root explicitly; ``restore_real_registrations`` puts the names back under
``$DETECTRON2_DATASETS`` afterwards.
"""
import importlib
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from panopticapi.utils import id2rgb, rgb2id

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES, _get_builtin_metadata
from detectron2.evaluation import COCOPanopticEvaluator, SemSegEvaluator

from cmt_cops_d2.data.datasets import register_cityscapes_panoptic as cs_module
from cmt_cops_d2.data.datasets import register_coco_panoptic as coco_module
from cmt_cops_d2.data.datasets.panoptic import DatasetFormatError
from cmt_cops_d2.data.datasets.register_cityscapes_panoptic import (
    load_cityscapes_panoptic_checked,
    register_all_cityscapes_panoptic,
)
from cmt_cops_d2.data.datasets.register_coco_panoptic import (
    COCO_BUILTIN_PANOPTIC_SPLITS,
    COCO_WITH_SEM_SEG_SPLITS,
    load_coco_builtin_panoptic,
    register_all_coco_panoptic,
)

COCO_CONTIGUOUS = {c["id"]: i for i, c in enumerate(COCO_CATEGORIES)}
COCO_THING_IDS = {c["id"] for c in COCO_CATEGORIES if c["isthing"]}
CITYSCAPES_NAMES = ("cityscapes_fine_panoptic_train", "cityscapes_fine_panoptic_val")
ALL_NAMES = tuple(COCO_WITH_SEM_SEG_SPLITS) + tuple(COCO_BUILTIN_PANOPTIC_SPLITS) + CITYSCAPES_NAMES

pytestmark = pytest.mark.usefixtures("restore_real_registrations")


@pytest.fixture
def coco_root(tmp_path, fakes):
    """A fake COCO root with panoptic JSONs, PNGs, JPEGs and the semantic PNGs from the prepare script."""
    root = str(tmp_path / "d2_datasets")
    written = fakes.write_fake_coco(root)
    fakes.load_script("prepare_coco_semantic_from_panoptic").main(["--root", root, "--workers", "1"])
    return root, written


# ---------------------------------------------------------------------------------------------------
# Names and metadata


def test_names_registered_at_import():
    registered = set(DatasetCatalog.list())
    for name in ALL_NAMES:
        assert name in registered and name in MetadataCatalog.list(), name


def test_import_twice_and_reregister(tmp_path):
    importlib.reload(coco_module)
    importlib.reload(cs_module)
    root = str(tmp_path)
    for _ in range(2):
        coco_module.register_all_coco_panoptic(root)
        cs_module.register_all_cityscapes_panoptic(root)
    assert MetadataCatalog.get("coco_2017_val_panoptic").panoptic_json == os.path.join(
        root, "coco/annotations/panoptic_val2017.json")
    assert MetadataCatalog.get("coco_2017_val_panoptic_with_sem_seg").sem_seg_root == os.path.join(
        root, "coco/panoptic_semseg_val2017")
    assert MetadataCatalog.get("cityscapes_fine_panoptic_val").gt_dir == os.path.join(
        root, "cityscapes/gtFine/val")


def test_builtin_metadata_kept_at_env_root():
    """At the environment's root, wrapping leaves Detectron2's builtin metadata exactly as it was."""
    root = os.getenv("DETECTRON2_DATASETS", "datasets")
    std = _get_builtin_metadata("coco_panoptic_standard")
    for name, (image_root, panoptic_root, panoptic_json, json_file) in COCO_BUILTIN_PANOPTIC_SPLITS.items():
        meta = MetadataCatalog.get(name)
        assert meta.thing_dataset_id_to_contiguous_id == std["thing_dataset_id_to_contiguous_id"]
        assert meta.stuff_dataset_id_to_contiguous_id == std["stuff_dataset_id_to_contiguous_id"]
        assert meta.image_root == os.path.join(root, image_root)
        assert meta.panoptic_root == os.path.join(root, panoptic_root)
        assert meta.json_file == os.path.join(root, json_file)
        assert meta.label_divisor == 1000 and meta.evaluator_type == "coco_panoptic_seg"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_metadata_fits_panoptic_evaluator(name, tmp_path):
    """What COCOPanopticEvaluator reads: both id maps (together covering every contiguous id, things
    exactly in the thing map), label_divisor, panoptic_json / panoptic_root; plus a known evaluator_type."""
    meta = MetadataCatalog.get(name)
    COCOPanopticEvaluator(name, str(tmp_path))
    num_classes = len(meta.stuff_classes)
    assert len(meta.thing_classes) == num_classes
    thing_ids = set(meta.thing_dataset_id_to_contiguous_id.values())
    all_ids = thing_ids | set(meta.stuff_dataset_id_to_contiguous_id.values())
    assert all_ids == set(range(num_classes))
    assert meta.label_divisor == 1000 and meta.ignore_label == 255
    assert meta.panoptic_json.endswith(".json") and meta.panoptic_root
    if name.startswith("coco"):
        assert meta.evaluator_type == "coco_panoptic_seg" and num_classes == 133
        assert thing_ids == {COCO_CONTIGUOUS[i] for i in COCO_THING_IDS}
    else:
        assert meta.evaluator_type == "cityscapes_panoptic_seg" and num_classes == 19
    if name.endswith("_with_sem_seg"):
        # SemSegEvaluator maps every contiguous id back to a dataset id: the stuff map holds all 133.
        assert meta.stuff_dataset_id_to_contiguous_id == COCO_CONTIGUOUS
        assert meta.sem_seg_root.endswith("panoptic_semseg_" + name.split("_")[2] + "2017")


# ---------------------------------------------------------------------------------------------------
# COCO on a fake layout


def _check_coco_records(records, data, layouts, root, split):
    assert len(records) == len(data["annotations"])
    for rec, ann, (pan, segs) in zip(records, data["annotations"], layouts):
        stem = os.path.splitext(ann["file_name"])[0]
        assert rec["image_id"] == ann["image_id"]
        assert rec["file_name"] == os.path.join(root, "coco", f"{split}2017", stem + ".jpg")
        assert rec["pan_seg_file_name"] == os.path.join(root, "coco", f"panoptic_{split}2017", stem + ".png")
        assert [s["id"] for s in rec["segments_info"]] == [s["id"] for s in segs]
        for seg, src in zip(rec["segments_info"], segs):
            assert seg["category_id"] == COCO_CONTIGUOUS[src["category_id"]]
            assert seg["isthing"] == (src["category_id"] in COCO_THING_IDS)


def test_coco_with_sem_seg_round_trip(coco_root):
    root, written = coco_root
    register_all_coco_panoptic(root)
    for split in ("train", "val"):
        data, layouts = written[split]
        records = DatasetCatalog.get(f"coco_2017_{split}_panoptic_with_sem_seg")
        _check_coco_records(records, data, layouts, root, split)
        for rec, (pan, _) in zip(records, layouts):
            assert rec["sem_seg_file_name"] == os.path.join(
                root, "coco", f"panoptic_semseg_{split}2017", os.path.basename(rec["pan_seg_file_name"]))
            assert (rec["height"], rec["width"]) == pan.shape
            assert rec["segments_info"][0]["isthing"] is False


def test_coco_builtin_names_wrapped(coco_root):
    root, written = coco_root
    register_all_coco_panoptic(root)
    data, layouts = written["val"]
    records = DatasetCatalog.get("coco_2017_val_panoptic")
    _check_coco_records(records, data, layouts, root, "val")
    assert "sem_seg_file_name" not in records[0]
    # Same records through the explicit-root loader.
    assert load_coco_builtin_panoptic(root, "coco_2017_train_panoptic")[0]["image_id"] == 1
    meta = MetadataCatalog.get("coco_2017_val_panoptic")
    assert meta.panoptic_json == os.path.join(root, "coco/annotations/panoptic_val2017.json")
    assert meta.json_file == os.path.join(root, "coco/annotations/instances_val2017.json")
    std = _get_builtin_metadata("coco_panoptic_standard")
    assert meta.stuff_dataset_id_to_contiguous_id == std["stuff_dataset_id_to_contiguous_id"]


def _perfect_panoptic_output(rec, encode_with_label_divisor):
    pan = rgb2id(np.asarray(Image.open(rec["pan_seg_file_name"]).convert("RGB"))).astype(np.int64)
    if not encode_with_label_divisor:
        info = [{"id": s["id"], "category_id": s["category_id"], "isthing": s["isthing"]}
                for s in rec["segments_info"]]
        return {"panoptic_seg": (torch.from_numpy(pan).int(), info)}
    # category * label_divisor + instance, -1 for void: the path of semantic+instance models.
    out = np.full(pan.shape, -1, np.int64)
    for k, s in enumerate(rec["segments_info"]):
        out[pan == s["id"]] = s["category_id"] * 1000 + (k + 1 if s["isthing"] else 0)
    return {"panoptic_seg": (torch.from_numpy(out).int(), None)}


@pytest.mark.parametrize("name,encode", [
    ("coco_2017_val_panoptic_with_sem_seg", False),
    ("coco_2017_val_panoptic", True),
])
def test_panoptic_evaluator_end_to_end(coco_root, tmp_path, name, encode):
    """Ground truth fed back as prediction scores PQ 100 (crowd segments are ignored by PQ)."""
    root, _ = coco_root
    register_all_coco_panoptic(root)
    evaluator = COCOPanopticEvaluator(name, str(tmp_path / "eval"))
    evaluator.reset()
    for rec in DatasetCatalog.get(name):
        if encode:  # crowd regions cannot be expressed here: drop them from the prediction
            rec = dict(rec, segments_info=[s for s in rec["segments_info"] if not s["iscrowd"]])
        evaluator.process([rec], [_perfect_panoptic_output(rec, encode)])
    result = evaluator.evaluate()["panoptic_seg"]
    assert result["PQ"] == pytest.approx(100.0)


def test_sem_seg_evaluator_end_to_end(coco_root):
    root, _ = coco_root
    register_all_coco_panoptic(root)
    name = "coco_2017_val_panoptic_with_sem_seg"
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    for rec in DatasetCatalog.get(name):
        sem = np.asarray(Image.open(rec["sem_seg_file_name"]), dtype=np.int64)
        logits = torch.nn.functional.one_hot(torch.from_numpy(np.where(sem == 255, 0, sem)), 133)
        evaluator.process([rec], [{"sem_seg": logits.permute(2, 0, 1).float()}])
    assert evaluator.evaluate()["sem_seg"]["mIoU"] == pytest.approx(100.0)


# ---------------------------------------------------------------------------------------------------
# Missing or broken data


@pytest.mark.parametrize("name", tuple(COCO_WITH_SEM_SEG_SPLITS) + tuple(COCO_BUILTIN_PANOPTIC_SPLITS))
def test_coco_missing_dataset(tmp_path, name):
    root = str(tmp_path / "empty")
    register_all_coco_panoptic(root)
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get(name)
    msg = str(info.value)
    assert os.path.join(root, "coco") in msg
    assert "python datasets/prepare_coco_semantic_from_panoptic.py" in msg
    assert "datasets/README.md" in msg


def test_coco_missing_semantic_pngs(tmp_path, fakes):
    root = str(tmp_path)
    fakes.write_fake_coco(root)
    register_all_coco_panoptic(root)
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get("coco_2017_val_panoptic_with_sem_seg")
    assert os.path.join(root, "coco", "panoptic_semseg_val2017") in str(info.value)
    assert "prepare_coco_semantic_from_panoptic.py" in str(info.value)


@pytest.mark.parametrize("folder,key", [("val2017", "file_name"), ("panoptic_val2017", "pan_seg_file_name")])
def test_coco_builtin_checks_every_file(tmp_path, fakes, folder, key):
    """Detectron2's own loader only checks the first record; the wrapper names any missing file."""
    root = str(tmp_path)
    fakes.write_fake_coco(root)
    last = sorted(os.listdir(os.path.join(root, "coco", folder)))[-1]
    os.remove(os.path.join(root, "coco", folder, last))
    with pytest.raises(FileNotFoundError, match=last) as info:
        load_coco_builtin_panoptic(root, "coco_2017_val_panoptic")
    assert os.path.join(root, "coco", folder, last) in str(info.value)


def test_coco_builtin_invalid_json(tmp_path, fakes):
    root = str(tmp_path)
    fakes.write_fake_coco(root)
    json_file = os.path.join(root, "coco/annotations/panoptic_val2017.json")
    with open(json_file, "w") as f:
        f.write("{")
    with pytest.raises(DatasetFormatError, match=json_file):
        load_coco_builtin_panoptic(root, "coco_2017_val_panoptic")


# ---------------------------------------------------------------------------------------------------
# Cityscapes on a fake layout

CS_STEMS = ("frankfurt_000000_000294", "frankfurt_000001_000019")


def _write_fake_cityscapes(root, split="val"):
    """Two images of a 'prepared' Cityscapes split: road (label id 7, trainId 0) and cars (26 -> 13)."""
    cs = os.path.join(root, "cityscapes")
    img_dir = os.path.join(cs, "leftImg8bit", split, "frankfurt")
    gt_dir = os.path.join(cs, "gtFine", split, "frankfurt")
    pan_dir = os.path.join(cs, "gtFine", f"cityscapes_panoptic_{split}")
    for d in (img_dir, gt_dir, pan_dir):
        os.makedirs(d, exist_ok=True)
    images, annotations = [], []
    for k, stem in enumerate(CS_STEMS):
        pan = np.full((8, 10), 7, np.uint32)
        pan[2:5, 3:6] = 26001 + k
        pan[0, 0] = 0
        Image.fromarray(np.zeros((8, 10, 3), np.uint8)).save(os.path.join(img_dir, stem + "_leftImg8bit.png"))
        Image.fromarray(np.where(pan == 7, 0, 13).astype(np.uint8)).save(
            os.path.join(gt_dir, stem + "_gtFine_labelTrainIds.png"))
        Image.fromarray(id2rgb(pan)).save(os.path.join(pan_dir, stem + "_gtFine_panoptic.png"))
        images.append({"id": stem, "file_name": stem + "_leftImg8bit.png", "height": 8, "width": 10})
        annotations.append({"image_id": stem, "file_name": stem + "_gtFine_panoptic.png", "segments_info": [
            {"id": 7, "category_id": 7, "iscrowd": 0, "area": 70, "bbox": [0, 0, 10, 8]},
            {"id": 26001 + k, "category_id": 26, "iscrowd": 0, "area": 9, "bbox": [3, 2, 3, 3]},
        ]})
    json_file = os.path.join(cs, "gtFine", f"cityscapes_panoptic_{split}.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": []}, f)
    return json_file


def test_cityscapes_round_trip(tmp_path):
    # A '.' in the root: Detectron2's own loader derives a wrong labelTrainIds path from it.
    root = str(tmp_path / "data.v1")
    _write_fake_cityscapes(root)
    register_all_cityscapes_panoptic(root)
    records = DatasetCatalog.get("cityscapes_fine_panoptic_val")
    assert [r["image_id"] for r in records] == list(CS_STEMS)
    for rec, stem in zip(records, CS_STEMS):
        assert rec["file_name"] == os.path.join(root, "cityscapes/leftImg8bit/val/frankfurt",
                                                stem + "_leftImg8bit.png")
        assert rec["sem_seg_file_name"] == os.path.join(root, "cityscapes/gtFine/val/frankfurt",
                                                        stem + "_gtFine_labelTrainIds.png")
        assert [(s["category_id"], s["isthing"]) for s in rec["segments_info"]] == [(0, False), (13, True)]
    meta = MetadataCatalog.get("cityscapes_fine_panoptic_val")
    assert meta.panoptic_root == os.path.join(root, "cityscapes/gtFine/cityscapes_panoptic_val")
    assert meta.evaluator_type == "cityscapes_panoptic_seg" and meta.label_divisor == 1000


@pytest.mark.parametrize("remove,what", [
    (None, "cityscapes/leftImg8bit/val"),
    ("cityscapes/gtFine/cityscapes_panoptic_val.json", "cityscapes/gtFine/cityscapes_panoptic_val.json"),
    ("cityscapes/gtFine/cityscapes_panoptic_val", "cityscapes/gtFine/cityscapes_panoptic_val"),
    ("cityscapes/gtFine/val/frankfurt/frankfurt_000001_000019_gtFine_labelTrainIds.png",
     "frankfurt_000001_000019_gtFine_labelTrainIds.png"),
    ("cityscapes/gtFine/cityscapes_panoptic_val/frankfurt_000001_000019_gtFine_panoptic.png",
     "frankfurt_000001_000019_gtFine_panoptic.png"),
])
def test_cityscapes_missing(tmp_path, remove, what):
    import shutil

    root = str(tmp_path)
    if remove is not None:
        _write_fake_cityscapes(root)
        path = os.path.join(root, remove)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    register_all_cityscapes_panoptic(root)
    with pytest.raises(FileNotFoundError) as info:
        DatasetCatalog.get("cityscapes_fine_panoptic_val")
    assert what in str(info.value)
    assert "python datasets/prepare_cityscapes_panoptic.py" in str(info.value)


def test_cityscapes_bad_json(tmp_path):
    root = str(tmp_path)
    json_file = _write_fake_cityscapes(root)
    with open(json_file) as f:
        data = json.load(f)
    data["annotations"][0]["segments_info"][0]["category_id"] = 0  # 'unlabeled': not evaluated
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetFormatError, match=json_file):
        load_cityscapes_panoptic_checked(root, "val")
    data["annotations"][0]["image_id"] = "frankfurt_999999_999999"  # no such image
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(DatasetFormatError, match=json_file):
        load_cityscapes_panoptic_checked(root, "val")


# ---------------------------------------------------------------------------------------------------
# Preparation scripts


def test_prepare_coco_semantic_values(coco_root, fakes):
    root, written = coco_root
    for split, (data, layouts) in written.items():
        for ann, (pan, segs) in zip(data["annotations"], layouts):
            sem = np.asarray(Image.open(os.path.join(root, "coco", f"panoptic_semseg_{split}2017",
                                                     ann["file_name"])))
            assert sem.dtype == np.uint8 and sem.shape == pan.shape
            category_of = {s["id"]: s["category_id"] for s in segs}
            expected = np.empty_like(sem)
            for y in range(pan.shape[0]):
                for x in range(pan.shape[1]):
                    sid = int(pan[y, x])
                    expected[y, x] = 255 if sid == 0 else COCO_CONTIGUOUS[category_of[sid]]
            np.testing.assert_array_equal(sem, expected)
            assert {0, 2, 255} <= set(np.unique(sem).tolist())


def test_prepare_coco_pool_and_val_100(coco_root, fakes):
    root, _ = coco_root
    script = fakes.load_script("prepare_coco_semantic_from_panoptic")
    sem_dir = os.path.join(root, "coco", "panoptic_semseg_val2017")
    before = {f: np.asarray(Image.open(os.path.join(sem_dir, f))) for f in os.listdir(sem_dir)}
    script.main(["--root", root, "--splits", "val", "--workers", "2", "--val-100"])
    for f, sem in before.items():
        np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(sem_dir, f))), sem)
    assert len(load_coco_builtin_panoptic(root, "coco_2017_val_100_panoptic")) == 3


def test_prepare_coco_errors(tmp_path, fakes):
    script = fakes.load_script("prepare_coco_semantic_from_panoptic")
    root = str(tmp_path)
    missing = os.path.join(root, "coco", "annotations", "panoptic_train2017.json")
    with pytest.raises(FileNotFoundError, match=missing):
        script.main(["--root", root, "--workers", "1"])
    written = fakes.write_fake_coco(root)
    json_file = os.path.join(root, "coco", "annotations", "panoptic_val2017.json")
    data = written["val"][0]
    # A PNG segment missing from segments_info.
    data["annotations"][0]["segments_info"].pop()
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match="000000000100.png"):
        script.main(["--root", root, "--splits", "val", "--workers", "1"])
    # An unknown category id.
    data["annotations"][0]["segments_info"][0]["category_id"] = 999
    with open(json_file, "w") as f:
        json.dump(data, f)
    with pytest.raises(ValueError, match=json_file):
        script.main(["--root", root, "--splits", "val", "--workers", "1"])
    # A missing panoptic PNG.
    os.remove(os.path.join(root, "coco", "panoptic_train2017", "000000000002.png"))
    with pytest.raises(FileNotFoundError, match="000000000002.png"):
        script.main(["--root", root, "--splits", "train", "--workers", "1"])


def test_prepare_cityscapes_errors(tmp_path, fakes, monkeypatch):
    script = fakes.load_script("prepare_cityscapes_panoptic")
    root = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=os.path.join(root, "cityscapes", "gtFine")):
        script.main(["--root", root])
    split_dir = os.path.join(root, "cityscapes", "gtFine", "val", "frankfurt")
    os.makedirs(split_dir)
    with pytest.raises(FileNotFoundError, match="_gtFine_polygons.json"):
        script.main(["--root", root, "--splits", "val"])
    for suffix in ("_gtFine_polygons.json", "_gtFine_instanceIds.png"):
        open(os.path.join(split_dir, "frankfurt_000000_000294" + suffix), "w").close()
    # cityscapesscripts not installed (None in sys.modules makes its import fail).
    for mod in ("cityscapesscripts", "cityscapesscripts.preparation",
                "cityscapesscripts.preparation.createPanopticImgs"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ImportError, match="pip install cityscapesscripts"):
        script.main(["--root", root, "--splits", "val"])
