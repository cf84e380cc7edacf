"""Training mapper for Detectron2's Panoptic-DeepLab (the reference baseline).

Same transforms and targets as ``detectron2.projects.panoptic_deeplab.PanopticDeeplabDatasetMapper``
(resize, optional crop, flip; semantic / center heatmap / offset targets from
``PanopticDeepLabTargetGenerator``), with the image and panoptic PNG read through the checked readers.
"""
import logging
from typing import Callable, List, Union

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T
from detectron2.projects.panoptic_deeplab.target_generator import PanopticDeepLabTargetGenerator

from .panoptic_io import load_augmented_panoptic

__all__ = ["PanopticDeepLabMapper", "build_train_augmentations"]


def build_train_augmentations(cfg) -> List[T.Augmentation]:
    """Resize shortest edge, optional random crop, horizontal flip (``cfg.INPUT``)."""
    augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                 cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
    if cfg.INPUT.CROP.ENABLED:
        augs.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    if cfg.INPUT.RANDOM_FLIP != "none":
        augs.append(T.RandomFlip(horizontal=cfg.INPUT.RANDOM_FLIP == "horizontal",
                                 vertical=cfg.INPUT.RANDOM_FLIP == "vertical"))
    return augs


class PanopticDeepLabMapper:
    """dataset dict -> ``image`` plus Panoptic-DeepLab targets (``sem_seg``, ``center``, ``offset``
    and their weights)."""

    @configurable
    def __init__(self, *, augmentations: List[Union[T.Augmentation, T.Transform]],
                 image_format: str, panoptic_target_generator: Callable):
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.panoptic_target_generator = panoptic_target_generator
        logging.getLogger(__name__).info(f"Augmentations used in training: {augmentations}")

    @classmethod
    def from_config(cls, cfg):
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        generator = PanopticDeepLabTargetGenerator(
            ignore_label=meta.ignore_label,
            thing_ids=list(meta.thing_dataset_id_to_contiguous_id.values()),
            sigma=cfg.INPUT.GAUSSIAN_SIGMA,
            ignore_stuff_in_offset=cfg.INPUT.IGNORE_STUFF_IN_OFFSET,
            small_instance_area=cfg.INPUT.SMALL_INSTANCE_AREA,
            small_instance_weight=cfg.INPUT.SMALL_INSTANCE_WEIGHT,
            ignore_crowd_in_semantic=cfg.INPUT.IGNORE_CROWD_IN_SEMANTIC,
        )
        return {"augmentations": build_train_augmentations(cfg), "image_format": cfg.INPUT.FORMAT,
                "panoptic_target_generator": generator}

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict, pan_ids = load_augmented_panoptic(dataset_dict, self.image_format, self.augmentations)
        dataset_dict.update(self.panoptic_target_generator(pan_ids, dataset_dict["segments_info"]))
        return dataset_dict
