"""Models. Importing this package registers the meta-architectures, backbones and heads.

Detectron2's Panoptic-DeepLab (``PanopticDeepLab``, ``build_resnet_deeplab_backbone``) is registered
here too: it is the reference baseline trained through the same loop.
"""
import detectron2.projects.panoptic_deeplab  # noqa: F401  (registers PanopticDeepLab and its heads)
from . import backbone  # noqa: F401  (registers build_axial_resnet_backbone)
from .cmt.meta_arch import CMTDeepLab  # noqa: F401,E402  (registers CMTDeepLab)
from .cops.meta_arch import COPS  # noqa: F401,E402
