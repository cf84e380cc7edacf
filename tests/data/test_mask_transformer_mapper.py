"""The mask-transformer training mapper: one binary mask per visible non-crowd segment."""
import copy

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import transforms as T
from panopticapi.utils import rgb2id
from PIL import Image

from cmt_cops_d2.data.mappers.mask_transformer import MaskTransformerPanopticMapper


@pytest.fixture()
def record(tiny_synthetic):
    return copy.deepcopy(DatasetCatalog.get("tiny_synthetic_train")[1])


def test_without_augmentation_masks_are_the_png_segments(record):
    mapper = MaskTransformerPanopticMapper(augmentations=[], image_format="RGB")
    out = mapper(copy.deepcopy(record))
    pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"])))
    inst = out["instances"]
    assert len(inst) == len(record["segments_info"])
    for s, c, m in zip(record["segments_info"], inst.gt_classes, inst.gt_masks):
        assert c == s["category_id"]
        assert torch.equal(m, torch.from_numpy(pan == s["id"]))
    assert out["image"].shape == (3,) + pan.shape
    assert out["padding_mask"].shape == pan.shape and not out["padding_mask"].any()


def test_scale_crop_pad_keeps_masks_disjoint_and_padding_void(record):
    np.random.seed(0)
    mapper = MaskTransformerPanopticMapper(
        augmentations=[T.ResizeScale(0.5, 0.6, 96, 96), T.FixedSizeCrop((96, 96), pad=True, pad_value=0.0)],
        image_format="RGB")
    out = mapper(copy.deepcopy(record))
    masks = out["instances"].gt_masks
    assert out["image"].shape == (3, 96, 96) and masks.shape[1:] == (96, 96)
    assert masks.sum(0).max() <= 1                                 # disjoint
    assert not masks[:, 60:, :].any() and not masks[:, :, 60:].any()   # 64x80 scaled by <=0.6 -> padding
    assert (out["image"][:, 60:, :] == 0).all()
    # the padding mask is exactly the padded region: rows / columns beyond the scaled image
    h = int((out["padding_mask"].logical_not().any(1)).sum())
    w = int((out["padding_mask"].logical_not().any(0)).sum())
    expected = torch.ones(96, 96, dtype=torch.bool)
    expected[:h, :w] = False
    assert torch.equal(out["padding_mask"], expected) and 30 <= h < 60 and 40 <= w < 60


def test_padding_mask_follows_the_flip(record):
    """A horizontal flip after the pad moves the padding to the left; the mask moves with it."""
    np.random.seed(0)
    mapper = MaskTransformerPanopticMapper(
        augmentations=[T.ResizeScale(0.5, 0.5, 96, 96), T.FixedSizeCrop((96, 96), pad=True, pad_value=0.0),
                       T.RandomFlip(prob=1.0)], image_format="RGB")
    out = mapper(copy.deepcopy(record))
    pad = out["padding_mask"]
    h, w = 38, 48                                  # 64 x 80 scaled by min(48 / 64, 48 / 80) = 0.6
    assert pad[:, : 96 - w].all() and not pad[:h, 96 - w :].any() and pad[h:, :].all()
    assert (out["image"][:, pad] == 0).all()


def test_crowd_segments_are_void(record):
    rec = copy.deepcopy(record)
    rec["segments_info"][0]["iscrowd"] = 1
    out = MaskTransformerPanopticMapper(augmentations=[], image_format="RGB")(rec)
    assert len(out["instances"]) == len(record["segments_info"]) - 1
    pan = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"])))
    crowd = torch.from_numpy(pan == record["segments_info"][0]["id"])
    assert crowd.any() and not out["instances"].gt_masks.any(0)[crowd].any()


def test_a_crop_without_labelled_pixels_gives_empty_targets(record):
    rec = copy.deepcopy(record)
    for s in rec["segments_info"]:
        s["iscrowd"] = 1
    out = MaskTransformerPanopticMapper(augmentations=[], image_format="RGB", max_crop_tries=3)(rec)
    assert len(out["instances"]) == 0
    assert out["instances"].gt_masks.shape == (0, 64, 80)
