"""The Panoptic-DeepLab training mapper and the checked readers it shares with the other mappers."""
import argparse
import copy
import os
import shutil

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from panopticapi.utils import id2rgb, rgb2id
from PIL import Image

from cmt_cops_d2.data.mappers import PanopticDeepLabMapper, build_train_mapper
from cmt_cops_d2.engine import setup_cfg

from ..conftest import CONFIG_DIR


@pytest.fixture()
def mapper(tiny_synthetic):
    cfg = setup_cfg(argparse.Namespace(
        config_file=os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml"),
        opts=["DATASETS.TRAIN", "('tiny_synthetic_train',)", "INPUT.CROP.SIZE", "(48, 48)"]))
    m = build_train_mapper(cfg)
    assert isinstance(m, PanopticDeepLabMapper)
    return m


@pytest.fixture()
def record(tiny_synthetic):
    return copy.deepcopy(DatasetCatalog.get("tiny_synthetic_train")[0])


def test_mapper_outputs_targets_consistent_with_the_png(mapper, record):
    out = mapper(record)
    h, w = out["image"].shape[1:]
    assert out["image"].dtype == torch.uint8 and out["image"].shape[0] == 3
    for key in ("sem_seg", "center", "offset", "sem_seg_weights", "center_weights", "offset_weights"):
        assert out[key].shape[-2:] == (h, w), key
    # Every semantic target value is a known class or ignore.
    values = set(out["sem_seg"].unique().tolist())
    assert values <= set(range(7)) | {255}
    # The targets come from the actual PNG: without augmentation they equal a direct computation.
    mapper.augmentations.augs = []
    out = mapper(copy.deepcopy(record))
    pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"])))
    expected = np.full(pan.shape, 255)
    for s in record["segments_info"]:
        expected[pan == s["id"]] = s["category_id"]
    assert np.array_equal(out["sem_seg"].numpy(), expected)


def _copy_with(record, tmp_path, pan=None, image_bytes=None, pan_bytes=None):
    rec = copy.deepcopy(record)
    img_path, pan_path = str(tmp_path / "img.jpg"), str(tmp_path / "pan.png")
    shutil.copy(record["file_name"], img_path)
    shutil.copy(record["pan_seg_file_name"], pan_path)
    if pan is not None:
        Image.fromarray(id2rgb(pan)).save(pan_path)
    if image_bytes is not None:
        open(img_path, "wb").write(image_bytes)
    if pan_bytes is not None:
        open(pan_path, "wb").write(pan_bytes)
    rec["file_name"], rec["pan_seg_file_name"] = img_path, pan_path
    return rec


def test_segment_listed_in_json_but_absent_from_png(mapper, record, tmp_path):
    pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"])))
    gone = record["segments_info"][-1]["id"]
    pan[pan == gone] = 0
    rec = _copy_with(record, tmp_path, pan=pan)
    with pytest.raises(ValueError, match=rf"pan\.png.*\[{gone}\] are listed in the JSON"):
        mapper(rec)


def test_png_id_missing_from_json(mapper, record, tmp_path):
    pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"])))
    pan[:3, :3] = 4242
    rec = _copy_with(record, tmp_path, pan=pan)
    with pytest.raises(ValueError, match=r"pan\.png.*\[4242\] appear in the PNG"):
        mapper(rec)


def test_corrupt_image_names_the_file(mapper, record, tmp_path):
    rec = _copy_with(record, tmp_path, image_bytes=b"\xff\xd8 not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*img\.jpg"):
        mapper(rec)


def test_corrupt_png_names_the_file(mapper, record, tmp_path):
    rec = _copy_with(record, tmp_path, pan_bytes=b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"cannot read panoptic PNG .*pan\.png"):
        mapper(rec)


def test_missing_image_names_the_file(mapper, record, tmp_path):
    rec = _copy_with(record, tmp_path)
    os.remove(rec["file_name"])
    with pytest.raises(FileNotFoundError, match=r"img\.jpg"):
        mapper(rec)


def test_png_of_the_wrong_size(mapper, record, tmp_path):
    pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"])))
    rec = _copy_with(record, tmp_path, pan=pan[:-4])
    with pytest.raises(ValueError, match=r"pan\.png is 80x60 but the image is 80x64"):
        mapper(rec)
