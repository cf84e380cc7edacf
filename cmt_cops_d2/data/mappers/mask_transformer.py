"""Training mapper for mask-transformer models (CMT-DeepLab): image + one binary mask per segment.

Augmentation (MaX-DeepLab / CMT-DeepLab training): random scale of the target crop size, random crop of
that size (padding smaller images at the bottom / right), horizontal flip. The padded pixels are
returned as ``padding_mask`` (H x W bool, True on padding): the model sets them to the pixel mean
after normalisation, as it pads at inference (DeepLab2 pads with the mean in training and inference).
Targets are Detectron2
``Instances`` with ``gt_classes`` (contiguous ids) and ``gt_masks`` (G x H x W bool) for every non-crowd
segment visible in the crop, stuff included; crowd regions, unlabelled pixels and padding belong to no
mask (void). The model samples the masks at its output stride.

A crop that contains no labelled pixel is re-drawn (up to ``max_crop_tries`` times); if every try is
empty the sample is returned with zero masks, and the losses then only ask every cluster for the void
class (tested behaviour, not an error: an image can be almost entirely void).
"""
import copy
import logging
from typing import List, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import transforms as T
from detectron2.structures import Instances
from panopticapi.utils import rgb2id

from .panoptic_io import read_image_checked, read_panoptic_checked

__all__ = ["MaskTransformerPanopticMapper"]


class MaskTransformerPanopticMapper:
    """dataset dict -> ``image`` (3 x H x W uint8) and ``instances`` (gt_classes, gt_masks)."""

    @configurable
    def __init__(self, *, augmentations: List[Union[T.Augmentation, T.Transform]], image_format: str,
                 max_crop_tries: int = 10):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.max_crop_tries = max_crop_tries
        logging.getLogger(__name__).info(f"Augmentations used in training: {augmentations}")

    @classmethod
    def from_config(cls, cfg):
        h, w = cfg.INPUT.IMAGE_SIZE
        augs = [T.ResizeScale(cfg.INPUT.MIN_SCALE, cfg.INPUT.MAX_SCALE, h, w),
                T.FixedSizeCrop(crop_size=(h, w), pad=True, pad_value=0.0)]
        if cfg.INPUT.RANDOM_FLIP != "none":
            augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                     vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
        return {"augmentations": augs, "image_format": cfg.INPUT.FORMAT}

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.image_format)
        pan_rgb, _ = read_panoptic_checked(dataset_dict)
        dataset_dict.pop("pan_seg_file_name")
        segments = [s for s in dataset_dict.pop("segments_info") if not s.get("iscrowd", 0)]
        for _ in range(self.max_crop_tries):
            aug_input = T.AugInput(image, sem_seg=pan_rgb)
            transforms = self.augmentations(aug_input)
            pan = rgb2id(aug_input.sem_seg)
            masks = [pan == s["id"] for s in segments]
            keep = [i for i, m in enumerate(masks) if m.any()]
            if keep:
                break
        crop = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(crop.transpose(2, 0, 1)))
        # Padding is 0 in a transformed all-ones map (segmentations are padded with 0).
        real = transforms.apply_segmentation(np.ones(image.shape[:2], dtype=np.uint8))
        dataset_dict["padding_mask"] = torch.from_numpy(np.ascontiguousarray(real == 0))
        instances = Instances(crop.shape[:2])
        instances.gt_classes = torch.tensor([segments[i]["category_id"] for i in keep], dtype=torch.int64)
        if keep:
            instances.gt_masks = torch.from_numpy(np.stack([masks[i] for i in keep]))
        else:
            instances.gt_masks = torch.zeros((0,) + crop.shape[:2], dtype=torch.bool)
        dataset_dict["instances"] = instances
        return dataset_dict
