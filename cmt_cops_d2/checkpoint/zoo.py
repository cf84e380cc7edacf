"""Public starting points the configs name in ``MODEL.WEIGHTS``, and how each file is made.

The COCO / Cityscapes CMT-DeepLab configs start from DeepLab2's ImageNet-pretrained Axial-ResNet, which
is published as a TensorFlow checkpoint: the configs name the converted file
(``pretrained/<name>.pth``, relative to the working directory) and :func:`check_weights_file` turns a
missing one into an error that prints the command creating it, instead of a silent random init.
"""
import os
from typing import Dict, NamedTuple

__all__ = ["PretrainedWeights", "PRETRAINED", "check_weights_file", "convert_command"]


class PretrainedWeights(NamedTuple):
    description: str
    source_url: str
    convert_args: str  # the converter's options after INPUT OUTPUT


_DEEPLAB2 = "https://storage.googleapis.com/gresearch/tf-deeplab/checkpoint/"

PRETRAINED: Dict[str, PretrainedWeights] = {
    "maxs_gelu_imagenet_22k_1k.pth": PretrainedWeights(
        "DeepLab2's Axial-ResNet-50 (MaX-S w/ GeLU), ImageNet-22K + 1K",
        _DEEPLAB2 + "maxs_gelu_imagenet_22k_1k_224.tar.gz", "--activation gelu"),
    "max_deeplab_s_backbone_imagenet1k.pth": PretrainedWeights(
        "DeepLab2's MaX-DeepLab-S backbone (MaX-S w/ ReLU), ImageNet-1K",
        _DEEPLAB2 + "max_deeplab_s_backbone_imagenet1k_strong_training_strategy.tar.gz",
        "--activation relu"),
}


def convert_command(path: str) -> str:
    """The command that creates ``path`` from its public source (``path``'s name must be in PRETRAINED)."""
    w = PRETRAINED[os.path.basename(path)]
    return f"python tools/convert_deeplab2_checkpoint.py {w.source_url} {path} {w.convert_args}"


def check_weights_file(path: str) -> None:
    """Raise ``FileNotFoundError`` for a ``MODEL.WEIGHTS`` file that does not exist, with the command that
    makes it when it is one of the :data:`PRETRAINED` files. Empty values and URLs pass."""
    if not path or "://" in path or os.path.exists(path):
        return
    name = os.path.basename(path)
    if name in PRETRAINED:
        raise FileNotFoundError(
            f"MODEL.WEIGHTS={path!r} does not exist. It is {PRETRAINED[name].description}, converted for "
            f"this plugin; create it (once, from the repository root) with\n    {convert_command(path)}\n"
            "or set MODEL.WEIGHTS \"\" to train from random weights.")
    raise FileNotFoundError(f"MODEL.WEIGHTS={path!r} does not exist (relative paths are relative to the "
                            f"working directory {os.getcwd()})")
