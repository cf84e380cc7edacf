"""Checks of the ``batched_inputs`` both meta-architectures receive."""
from typing import List

import torch

__all__ = ["check_input_images"]


def _image_name(x, i: int) -> str:
    return repr(x["file_name"]) if isinstance(x, dict) and "file_name" in x else f"batched_inputs[{i}]"


def check_input_images(batched_inputs: List[dict], channels: int = 3) -> None:
    """Every input's ``image`` must be a ``channels x H x W`` tensor (H, W >= 1) of finite values:
    ``ValueError`` for a wrong shape, ``FloatingPointError`` for NaN / inf, naming the image (its
    ``file_name`` when the input has one)."""
    for i, x in enumerate(batched_inputs):
        name = _image_name(x, i)
        image = x.get("image") if isinstance(x, dict) else None
        if not isinstance(image, torch.Tensor):
            raise ValueError(f"input image {name}: 'image' must be a torch.Tensor of shape {channels} x H x W, "
                             f"got {type(image).__name__}")
        shape = tuple(image.shape)
        if len(shape) != 3 or shape[0] != channels or min(shape[1:]) < 1:
            hint = ""
            if len(shape) == 3 and shape[-1] == channels and shape[0] != channels:
                hint = " (channels last? pass image.permute(2, 0, 1))"
            elif len(shape) == 3 and shape[0] != channels:
                hint = f" ({shape[0]} channels; MODEL.PIXEL_MEAN has {channels})"
            raise ValueError(f"input image {name} has shape {shape}; expected {channels} x H x W "
                             f"(channels first, H and W at least 1){hint}")
        if image.is_floating_point() and not bool(torch.isfinite(image).all()):
            raise FloatingPointError(f"input image {name} holds NaN or inf pixel values; the model's output "
                                     "would be meaningless (check the image file or the code that made it)")
