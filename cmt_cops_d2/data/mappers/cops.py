"""Training mapper for COPS (semantic + affinity pretraining targets and the stride-4 panoptic GT).

Transforms as the other mappers (``build_train_augmentations``: resize, optional crop, flip), applied
to the image and to the panoptic PNG (nearest interpolation), read through the checked readers.

Outputs for one image of (augmented) size ``H x W``, ``h x w`` the target grid (see below),
``D = len(edge_distances)``:

* ``image``: ``3 x H x W`` uint8.
* ``sem_seg``: ``H x W`` long, contiguous class per pixel, ``ignore_label`` (255) at unlabelled pixels.
  Crowd pixels keep their class (as Panoptic-DeepLab with ``IGNORE_CROWD_IN_SEMANTIC=False``) unless
  ``ignore_crowd_in_semantic``.
* ``sem_seg_weights``: ``H x W`` float: 0 at ignore, ``small_instance_weight`` on the pixels of
  non-crowd things whose area in the augmented image is ``< small_instance_area``, 1 elsewhere.
* ``panoptic``: ``h x w`` long segment index (``0 .. S-1``), -1 at void / crowd / ignore. Segments are
  numbered in ``segments_info`` order; stuff segments of one class are merged into one index (COPS
  gives one segment per stuff class, and the public code gives all stuff pixels of a class the id
  ``c * divisor``); segments with no pixel on the grid are dropped.
* ``panoptic_classes``: ``(S,)`` long contiguous class of each segment; ``panoptic_isthing``: ``(S,)`` bool.
* ``panoptic_weights``: ``h x w`` float, 0 at void / crowd / ignore, 1 elsewhere.
* ``affinities``: ``D x 2 x h x w`` float; 1 = the two endpoints are in different segments (cut),
  computed on ``panoptic`` (so -1 counts as a label of its own). Anchor convention of
  ``cmt_cops_d2.solvers.graph``: channel 0 slot ``(r, c)`` is the edge ``(r, c)-(r+d, c)``, channel 1
  the edge ``(r, c)-(r, c+d)``. Slots whose edge leaves the grid hold 0.
* ``affinity_weights``: ``D x 2 x h x w`` float. With the grid pixel weight ``p`` = 0 at void / crowd /
  ignore, 1 on stuff, ``thing_edge_weight`` (4) on things, ``thing_edge_weight * small_instance_weight``
  (4 x 3) on small things, an edge gets ``max(p_u, p_v)`` if both are > 0, else 0 (public COPS
  rule: "x4 where at least one endpoint is a thing, x3 more for small objects"). Out-of-grid slots are 0.

**Target grid.** Grid pixel ``(i, j)`` is the full-resolution pixel ``(stride*i + stride//2,
stride*j + stride//2)`` (``array[2::4, 2::4]`` for stride 4, as the public COPS code), so
``h = len(range(stride//2, H, stride))`` (``= H / 4`` when ``H`` is a multiple of 4). A network whose
input is padded to a size divisibility has a larger output; the model pads these targets with weight 0.
The small-object test uses the segment's area in the full-resolution augmented image (as
Panoptic-DeepLab's target generator and the public COPS mapper).
"""
import logging
from typing import Iterable, List, Sequence, Union

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import transforms as T

from .panoptic_deeplab import build_train_augmentations
from .panoptic_io import load_augmented_panoptic

__all__ = ["COPSPanopticMapper", "cops_edge_targets"]

# COCO edge distances on the stride-4 grid (public COPS COCO yaml uses [1, 4, 16, 32]; the paper's
# setting and the Cityscapes one add 64).
DEFAULT_EDGE_DISTANCES = (1, 4, 16, 32, 64)


def cops_edge_targets(panoptic: np.ndarray, pixel_weights: np.ndarray, distances: Sequence[int]):
    """Affinity targets and weights on a grid, anchor convention (``cmt_cops_d2.solvers.graph``).

    Args:
        panoptic: ``h x w`` int segment index map (-1 void).
        pixel_weights: ``h x w`` float, 0 where edges touching the pixel must be ignored.
        distances: edge distances.
    Returns:
        (affinities, weights): float32 ``(D, 2, h, w)``; slot ``[k, 0, r, c]`` is the edge
        ``(r, c)-(r+d, c)``, ``[k, 1, r, c]`` the edge ``(r, c)-(r, c+d)``; out-of-grid slots are 0.
    """
    h, w = panoptic.shape
    aff = np.zeros((len(distances), 2, h, w), np.float32)
    wts = np.zeros((len(distances), 2, h, w), np.float32)
    for k, d in enumerate(distances):
        if d < h:
            a, b = panoptic[: h - d, :], panoptic[d:, :]
            pa, pb = pixel_weights[: h - d, :], pixel_weights[d:, :]
            aff[k, 0, : h - d, :] = a != b
            wts[k, 0, : h - d, :] = np.where((pa > 0) & (pb > 0), np.maximum(pa, pb), 0)
        if d < w:
            a, b = panoptic[:, : w - d], panoptic[:, d:]
            pa, pb = pixel_weights[:, : w - d], pixel_weights[:, d:]
            aff[k, 1, :, : w - d] = a != b
            wts[k, 1, :, : w - d] = np.where((pa > 0) & (pb > 0), np.maximum(pa, pb), 0)
    return aff, wts


class COPSPanopticMapper:
    """dataset dict -> ``image`` plus COPS targets (see the module doc for every output)."""

    @configurable
    def __init__(
        self,
        *,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str,
        ignore_label: int,
        thing_ids: Iterable[int],
        small_instance_area: int = 4096,
        small_instance_weight: float = 3.0,
        edge_distances: Sequence[int] = DEFAULT_EDGE_DISTANCES,
        target_stride: int = 4,
        thing_edge_weight: float = 4.0,
        ignore_crowd_in_semantic: bool = False,
    ):
        """
        Args:
            augmentations: applied to the image and the panoptic PNG.
            image_format: ``cfg.INPUT.FORMAT``.
            ignore_label: ``sem_seg`` value at unlabelled pixels (255).
            thing_ids: contiguous ids of the thing classes (used when a segment has no ``isthing``).
            small_instance_area: things with fewer pixels (augmented, full resolution) are "small".
            small_instance_weight: extra factor on small things, in ``sem_seg_weights`` and on top of
                ``thing_edge_weight`` in ``affinity_weights`` (COPS: 3, "following Panoptic-DeepLab").
            edge_distances: affinity distances on the target grid (default COCO ``(1, 4, 16, 32, 64)``).
            target_stride: stride of the target grid (4: the network output resolution).
            thing_edge_weight: affinity weight of edges with a thing endpoint (COPS: 4).
            ignore_crowd_in_semantic: set crowd pixels to ``ignore_label`` in ``sem_seg`` (default keeps
                their class with weight 1, as Panoptic-DeepLab's default).
        """
        ds = [int(d) for d in edge_distances]
        if not ds or any(d <= 0 for d in ds) or len(set(ds)) != len(ds):
            raise ValueError(f"edge_distances must be distinct positive integers, got {edge_distances!r}")
        if int(target_stride) <= 0:
            raise ValueError(f"target_stride must be positive, got {target_stride!r}")
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = int(ignore_label)
        self.thing_ids = set(int(t) for t in thing_ids)
        self.small_instance_area = small_instance_area
        self.small_instance_weight = float(small_instance_weight)
        self.edge_distances = tuple(ds)
        self.target_stride = int(target_stride)
        self.thing_edge_weight = float(thing_edge_weight)
        self.ignore_crowd_in_semantic = bool(ignore_crowd_in_semantic)
        logging.getLogger(__name__).info(f"Augmentations used in training: {augmentations}")

    @classmethod
    def from_config(cls, cfg):
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        return {
            "augmentations": build_train_augmentations(cfg),
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": meta.ignore_label,
            "thing_ids": list(meta.thing_dataset_id_to_contiguous_id.values()),
            "small_instance_area": cfg.INPUT.SMALL_INSTANCE_AREA,
            "small_instance_weight": cfg.INPUT.SMALL_INSTANCE_WEIGHT,
            "edge_distances": tuple(cfg.MODEL.COPS.EDGE_DISTANCES),
            "target_stride": cfg.MODEL.COPS.TARGET_STRIDE,
            "thing_edge_weight": cfg.MODEL.COPS.THING_EDGE_WEIGHT,
        }

    def _isthing(self, seg: dict) -> bool:
        return bool(seg["isthing"]) if "isthing" in seg else int(seg["category_id"]) in self.thing_ids

    def targets(self, pan_ids: np.ndarray, segments_info: List[dict]) -> dict:
        """The targets of the module doc from an augmented ``H x W`` segment-id map."""
        H, W = pan_ids.shape
        s, off = self.target_stride, self.target_stride // 2
        sem = np.full((H, W), self.ignore_label, np.int64)
        sem_w = np.zeros((H, W), np.float32)
        grid_ids = pan_ids[off::s, off::s]
        h, w = grid_ids.shape
        grid_pan = np.full((h, w), -1, np.int64)
        grid_pix_w = np.zeros((h, w), np.float32)
        classes, isthing, stuff_index = [], [], {}
        for seg in segments_info:
            sid, cat, crowd = int(seg["id"]), int(seg["category_id"]), bool(seg.get("iscrowd", 0))
            thing = self._isthing(seg)
            mask = pan_ids == sid
            area = int(mask.sum())
            if area == 0:  # cropped away
                continue
            small = thing and not crowd and area < self.small_instance_area
            if not (crowd and self.ignore_crowd_in_semantic):
                sem[mask] = cat
                sem_w[mask] = self.small_instance_weight if small else 1.0
            if crowd:
                continue  # void on the grid, weight 0
            gmask = grid_ids == sid
            if not gmask.any():
                continue  # vanished on the stride grid
            if not thing and cat in stuff_index:
                index = stuff_index[cat]
            else:
                index = len(classes)
                classes.append(cat)
                isthing.append(thing)
                if not thing:
                    stuff_index[cat] = index
            grid_pan[gmask] = index
            grid_pix_w[gmask] = (self.thing_edge_weight * (self.small_instance_weight if small else 1.0)
                                 if thing else 1.0)
        aff, aff_w = cops_edge_targets(grid_pan, grid_pix_w, self.edge_distances)
        return {
            "sem_seg": torch.as_tensor(sem),
            "sem_seg_weights": torch.as_tensor(sem_w),
            "panoptic": torch.as_tensor(grid_pan),
            "panoptic_classes": torch.as_tensor(np.asarray(classes, np.int64).reshape(-1)),
            "panoptic_isthing": torch.as_tensor(np.asarray(isthing, bool).reshape(-1)),
            "panoptic_weights": torch.as_tensor((grid_pan >= 0).astype(np.float32)),
            "affinities": torch.as_tensor(aff),
            "affinity_weights": torch.as_tensor(aff_w),
        }

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict, pan_ids = load_augmented_panoptic(dataset_dict, self.image_format, self.augmentations)
        dataset_dict.update(self.targets(pan_ids, dataset_dict["segments_info"]))
        return dataset_dict
