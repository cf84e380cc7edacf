"""Reading one annotated image with checks shared by every mapper and by evaluation."""
import copy
from typing import Dict, Tuple

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.data import detection_utils as utils
from detectron2.utils.file_io import PathManager
from panopticapi.utils import rgb2id
from PIL import Image

__all__ = ["PANOPTIC_PNG_MODES", "read_image_checked", "read_panoptic_png", "check_panoptic_ids",
           "read_panoptic_checked", "check_panoptic_file", "load_augmented_panoptic"]

# PIL modes whose first three channels are R, G, B: what panopticapi's rgb2id reads.
PANOPTIC_PNG_MODES = ("RGB", "RGBA")
_MODE_NAMES = {"1": "black and white", "L": "grayscale", "LA": "grayscale", "P": "palette",
               "I": "32-bit grayscale", "I;16": "16-bit grayscale", "F": "float"}


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


def read_panoptic_png(path: str) -> np.ndarray:
    """Decode the panoptic PNG ``path`` into H x W x 3 uint8 (R, G, B).

    Raises ``ValueError`` naming the PNG when it cannot be decoded (corrupt, truncated) or is not an
    RGB(A) image: a grayscale, palette or 16-bit PNG holds no ``R + 256 G + 256^2 B`` ids.
    """
    try:
        with PathManager.open(path, "rb") as f:
            mode = Image.open(f).mode
        pan_rgb = utils.read_image(path, "RGB")
    except FileNotFoundError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read panoptic PNG {path}: {type(e).__name__}: {e}") from e
    if mode not in PANOPTIC_PNG_MODES:
        kind = _MODE_NAMES.get(mode, "not RGB")
        raise ValueError(
            f"panoptic PNG {path} has PIL mode {mode!r} ({kind}); it must be RGB, with segment id = "
            "R + 256 G + 256^2 B. Write it with panopticapi.utils.id2rgb."
        )
    return pan_rgb


def check_panoptic_ids(dataset_dict: dict, shape: Tuple[int, int], present) -> None:
    """Check a decoded panoptic PNG of ``shape`` (H, W) holding the ids ``present`` against
    ``dataset_dict`` (``pan_seg_file_name``, ``segments_info``, optional ``height`` / ``width``).

    Raises ``ValueError`` naming the PNG when its size differs from the image's, when a segment listed
    in the JSON has no pixel in the PNG, or when the PNG has a non-zero id that the JSON does not list.
    """
    path = dataset_dict["pan_seg_file_name"]
    height, width = shape
    if (height, width) != (dataset_dict.get("height", height), dataset_dict.get("width", width)):
        raise ValueError(
            f"panoptic PNG {path} is {width}x{height} but the image is "
            f"{dataset_dict.get('width')}x{dataset_dict.get('height')} (width x height); the PNG must "
            "label every pixel of the image"
        )
    present = {int(i) for i in present} - {0}
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
            f"{sorted(present - listed)} appear in the PNG but not in the JSON's segments_info. "
            "Add them to segments_info or set their pixels to 0 (unlabelled)."
        )


def read_panoptic_checked(dataset_dict: dict) -> Tuple[np.ndarray, np.ndarray]:
    """Read the panoptic PNG of ``dataset_dict`` and check it against its ``segments_info``.

    Returns:
        (pan_rgb, pan_ids): the H x W x 3 uint8 PNG (what augmentations transform) and the H x W
        int64 segment ids ``R + 256 G + 256^2 B``.

    Raises ``ValueError`` naming the PNG for the problems of :func:`read_panoptic_png` and
    :func:`check_panoptic_ids`.
    """
    pan_rgb = read_panoptic_png(dataset_dict["pan_seg_file_name"])
    pan_ids = rgb2id(pan_rgb).astype(np.int64)
    # return_counts selects numpy's sort-based unique, several times faster here than the default.
    check_panoptic_ids(dataset_dict, pan_ids.shape[:2], np.unique(pan_ids, return_counts=True)[0])
    return pan_rgb, pan_ids


def check_panoptic_file(dataset_dict: dict) -> Dict[int, int]:
    """The checks of :func:`read_panoptic_checked` without keeping the image (evaluation's pre-pass).

    Returns the pixel count of every non-zero segment id in the PNG.
    """
    pan_ids = rgb2id(read_panoptic_png(dataset_dict["pan_seg_file_name"]))
    ids, counts = np.unique(pan_ids, return_counts=True)
    check_panoptic_ids(dataset_dict, pan_ids.shape[:2], ids)
    return {int(i): int(c) for i, c in zip(ids, counts) if i != 0}


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
