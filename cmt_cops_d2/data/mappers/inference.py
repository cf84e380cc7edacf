"""The test-time mapper: Detectron2's ``DatasetMapper`` in inference mode, reading with checks."""
import copy

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data import detection_utils as utils

from .panoptic_io import read_image_checked

__all__ = ["InferenceMapper"]


class InferenceMapper(DatasetMapper):
    """``DatasetMapper(cfg, is_train=False)`` whose image and semantic PNG reads name the file on failure.

    Returns the same dict as Detectron2's inference mapper: the record (``height`` / ``width`` filled in
    from the image when missing) with ``image`` (3 x H x W uint8 tensor, resized by the test
    augmentations), ``sem_seg`` when the record has ``sem_seg_file_name``, and without
    ``annotations`` / ``sem_seg_file_name``.
    """

    @configurable
    def __init__(self, **kwargs):
        kwargs["is_train"] = False
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg, is_train: bool = False):
        if is_train:
            raise ValueError("InferenceMapper is for evaluation; use build_train_mapper(cfg) for training")
        return DatasetMapper.from_config(cfg, is_train=False)

    def __call__(self, dataset_dict):
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image_checked(dataset_dict, self.image_format)
        sem_seg_gt = None
        if "sem_seg_file_name" in dataset_dict:
            path = dataset_dict.pop("sem_seg_file_name")
            try:
                sem_seg_gt = utils.read_image(path, "L").squeeze(2)
            except FileNotFoundError:
                raise
            except Exception as e:
                raise ValueError(f"cannot read semantic PNG {path}: {type(e).__name__}: {e}") from e
        aug_input = T.AugInput(image, sem_seg=sem_seg_gt)
        transforms = self.augmentations(aug_input)
        image, sem_seg_gt = aug_input.image, aug_input.sem_seg
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg_gt is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg_gt.astype("long"))
        if self.proposal_topk is not None:
            utils.transform_proposals(dataset_dict, image.shape[:2], transforms,
                                      proposal_topk=self.proposal_topk)
        dataset_dict.pop("annotations", None)
        return dataset_dict
