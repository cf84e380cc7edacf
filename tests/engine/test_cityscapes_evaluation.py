"""Cityscapes: PQ, mIoU and instance AP from one evaluation (Cityscapes' own scripts), and clear errors
when instance AP cannot be computed."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import BitMasks, Instances
from panopticapi.utils import id2rgb
from PIL import Image

from cmt_cops_d2.data.datasets.register_cityscapes_panoptic import register_all_cityscapes_panoptic
from cmt_cops_d2.engine import Trainer, setup_cfg

from ..conftest import CONFIG_DIR
from ..data.test_real_dataset_registration import CS_STEMS, _perfect_panoptic_output

ROAD, CAR = (7, 0), (26, 13)   # (Cityscapes label id, train id)


def _cfg(path, *opts):
    return setup_cfg(argparse.Namespace(config_file=os.path.join(CONFIG_DIR, path), opts=["MODEL.DEVICE", "cpu", *opts]))


H, W = 32, 40
CAR_BOX = (slice(8, 20), slice(10, 22))    # 144 px: Cityscapes' AP ignores instances under 100 px


@pytest.fixture
def cityscapes(tmp_path):
    """Two 32 x 40 images of a prepared Cityscapes val split: road and one car each, with the panoptic
    PNG / JSON this project reads and the label / instance id PNGs Cityscapes' scripts read."""
    root = str(tmp_path / "datasets")
    cs = os.path.join(root, "cityscapes")
    img_dir = os.path.join(cs, "leftImg8bit", "val", "frankfurt")
    gt_dir = os.path.join(cs, "gtFine", "val", "frankfurt")
    pan_dir = os.path.join(cs, "gtFine", "cityscapes_panoptic_val")
    for d in (img_dir, gt_dir, pan_dir):
        os.makedirs(d, exist_ok=True)
    images, annotations = [], []
    for k, stem in enumerate(CS_STEMS):
        label_ids = np.full((H, W), ROAD[0], np.uint8)
        label_ids[CAR_BOX] = CAR[0]
        label_ids[0, 0] = 0
        pan = label_ids.astype(np.uint32)
        pan[CAR_BOX] = CAR[0] * 1000 + 1 + k
        train_ids = np.where(label_ids == CAR[0], CAR[1], np.where(label_ids == ROAD[0], ROAD[1], 255))
        Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(os.path.join(img_dir, stem + "_leftImg8bit.png"))
        Image.fromarray(train_ids.astype(np.uint8)).save(os.path.join(gt_dir, stem + "_gtFine_labelTrainIds.png"))
        Image.fromarray(label_ids).save(os.path.join(gt_dir, stem + "_gtFine_labelIds.png"))
        instance_ids = label_ids.astype(np.uint16)                # Cityscapes: 16-bit PNGs
        instance_ids[CAR_BOX] = CAR[0] * 1000 + k
        Image.fromarray(instance_ids).save(os.path.join(gt_dir, stem + "_gtFine_instanceIds.png"))
        Image.fromarray(id2rgb(pan)).save(os.path.join(pan_dir, stem + "_gtFine_panoptic.png"))
        images.append({"id": stem, "file_name": stem + "_leftImg8bit.png", "height": H, "width": W})
        annotations.append({"image_id": stem, "file_name": stem + "_gtFine_panoptic.png", "segments_info": [
            {"id": ROAD[0], "category_id": ROAD[0], "iscrowd": 0, "area": H * W - 145, "bbox": [0, 0, W, H]},
            {"id": CAR[0] * 1000 + 1 + k, "category_id": CAR[0], "iscrowd": 0, "area": 144,
             "bbox": [10, 8, 12, 12]}]})
    categories = [{"id": ROAD[0], "name": "road", "isthing": 0, "color": [128, 64, 128]},
                  {"id": CAR[0], "name": "car", "isthing": 1, "color": [0, 0, 142]}]
    with open(os.path.join(cs, "gtFine", "cityscapes_panoptic_val.json"), "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    register_all_cityscapes_panoptic(root)
    return root


def _outputs(rec, car_as_road=False):
    out = _perfect_panoptic_output(rec, False)
    pan = out["panoptic_seg"][0]
    car = torch.zeros_like(pan, dtype=torch.bool)
    for s in rec["segments_info"]:
        if s["isthing"]:
            car |= pan == s["id"]
    train_ids = torch.where(car & (not car_as_road), CAR[1], ROAD[1])
    out["sem_seg"] = torch.nn.functional.one_hot(train_ids.long(), 19).permute(2, 0, 1).float()
    inst = Instances(tuple(pan.shape))
    inst.pred_masks = car[None]
    inst.pred_boxes = BitMasks(inst.pred_masks).get_bounding_boxes()
    inst.pred_classes = torch.tensor([CAR[1]])
    inst.scores = torch.tensor([0.9])
    out["instances"] = inst
    return out


def _evaluate(cfg, **kw):
    evaluator = Trainer.build_evaluator(cfg, "cityscapes_fine_panoptic_val", os.path.join(cfg.OUTPUT_DIR, "eval"))
    evaluator.reset()
    for rec in DatasetCatalog.get("cityscapes_fine_panoptic_val"):
        evaluator.process([rec], [_outputs(rec, **kw)])
    return evaluator.evaluate()


def test_pq_miou_and_ap_in_one_evaluation(cityscapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # cityscapesscripts writes matches.json to the working directory
    cfg = _cfg("cityscapes/cops_r50_full.yaml", "OUTPUT_DIR", str(tmp_path / "out"))
    assert cfg.TEST.SEMANTIC_EVALUATION and cfg.TEST.INSTANCE_EVALUATION
    res = _evaluate(cfg)
    assert res["panoptic_seg"]["PQ"] == pytest.approx(100.0)
    assert res["sem_seg"]["IoU"] == pytest.approx(100.0)
    assert res["segm"]["AP"] == pytest.approx(100.0)
    wrong = _evaluate(cfg, car_as_road=True)["sem_seg"]
    assert wrong["IoU"] < 60            # car IoU 0


def test_instance_ap_needs_instances_and_cityscapes(cityscapes, tmp_path):
    with pytest.raises(ValueError, match=r"TEST.INSTANCE_EVALUATION is on, but CMTDeepLab .* outputs no 'instances'"):
        Trainer.build_evaluator(_cfg("cityscapes/cmt_r50.yaml", "TEST.INSTANCE_EVALUATION", "True"),
                                "cityscapes_fine_panoptic_val")
    with pytest.raises(ValueError, match=r"PREDICT_INSTANCES"):
        Trainer.build_evaluator(_cfg("cityscapes/cops_r50_full.yaml", "MODEL.COPS.PREDICT_INSTANCES", "False"),
                                "cityscapes_fine_panoptic_val")
    with pytest.raises(ValueError, match=r"instance AP is evaluated on Cityscapes only"):
        Trainer.build_evaluator(_cfg("coco/cops_r50_full.yaml", "TEST.INSTANCE_EVALUATION", "True"),
                                "coco_2017_val_panoptic")
