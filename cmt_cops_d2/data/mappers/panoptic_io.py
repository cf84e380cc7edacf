"""Reading one annotated image with checks shared by every mapper."""
import copy
from typing import Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data import detection_utils as utils
from panopticapi.utils import rgb2id

__all__ = ["read_image_checked", "read_panoptic_checked", "load_augmented_panoptic"]


def read_image_checked(dataset_dict: dict, image_format: str) -> np.ndarray:
    """Read ``dataset_dict["file_name"]``; a missing or corrupt file raises an error naming it."""
    path = dataset_dict["file_name"]
    try:
        image = utils.read_image(path, format=image_format)
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises several types for truncated / corrupt files
        raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
    utils.check_image_size(dataset_dict, image)
    return image


def read_panoptic_checked(dataset_dict: dict) -> Tuple[np.ndarray, np.ndarray]:
    """Read the panoptic PNG of ``dataset_dict`` and check it against its ``segments_info``.

    Returns:
        (pan_rgb, pan_ids): the H x W x 3 uint8 PNG (what augmentations transform) and the H x W
        int64 segment ids ``R + 256 G + 256^2 B``.

    Raises ``ValueError`` naming the PNG when it cannot be decoded, when a segment listed in the JSON
    has no pixel in the PNG, or when the PNG has a non-zero id that the JSON does not list.
    """
    path = dataset_dict["pan_seg_file_name"]
    try:
        pan_rgb = utils.read_image(path, "RGB")
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read panoptic PNG {path}: {type(e).__name__}: {e}") from e
    pan_ids = rgb2id(pan_rgb).astype(np.int64)
    present = set(np.unique(pan_ids).tolist()) - {0}
    listed = {int(s["id"]) for s in dataset_dict["segments_info"]}
    if listed - present:
        raise ValueError(
            f"panoptic PNG {path} (image {dataset_dict.get('image_id')}): segment id(s) "
            f"{sorted(listed - present)} are listed in the JSON but have no pixel in the PNG. "
            "Remove them from segments_info or fix the PNG."
        )
    if present - listed:
        raise ValueError(
            f"panoptic PNG {path} (image {dataset_dict.get('image_id')}): segment id(s) "
            f"{sorted(present - listed)} appear in the PNG but not in the JSON's segments_info."
        )
    if (pan_ids.shape[0], pan_ids.shape[1]) != (
        dataset_dict.get("height", pan_ids.shape[0]), dataset_dict.get("width", pan_ids.shape[1])
    ):
        raise ValueError(
            f"panoptic PNG {path} is {pan_ids.shape[1]}x{pan_ids.shape[0]} but the image is "
            f"{dataset_dict.get('width')}x{dataset_dict.get('height')} (width x height)"
        )
    return pan_rgb, pan_ids


def load_augmented_panoptic(dataset_dict: dict, image_format: str,
                            augmentations: T.AugmentationList) -> Tuple[dict, np.ndarray]:
    """Read (checked) and augment an image with its panoptic PNG, the shared first step of the mappers.

    Returns:
        (record, pan_ids): a copy of ``dataset_dict`` with ``image`` (3 x H x W uint8 tensor) set and
        ``pan_seg_file_name`` removed, and the augmented H x W int64 segment-id map.
    """
    dataset_dict = copy.deepcopy(dataset_dict)
    image = read_image_checked(dataset_dict, image_format)
    pan_rgb, _ = read_panoptic_checked(dataset_dict)
    dataset_dict.pop("pan_seg_file_name")
    aug_input = T.AugInput(image, sem_seg=pan_rgb)
    augmentations(aug_input)
    dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
    return dataset_dict, rgb2id(np.asarray(aug_input.sem_seg)).astype(np.int64)
