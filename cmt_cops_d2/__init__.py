"""cmt_cops_d2: CMT-DeepLab and COPS panoptic segmentation for Detectron2.

Importing the package registers everything with Detectron2: the built-in datasets
(``synthetic_panoptic_*``, COCO and Cityscapes panoptic), the meta-architectures and their parts.
"""
from . import data  # noqa: F401
from . import modeling  # noqa: F401
from .config import add_cmt_cops_d2_config
from .data.datasets import register_panoptic_dataset

__all__ = ["add_cmt_cops_d2_config", "register_panoptic_dataset"]
__version__ = "0.1.0"
