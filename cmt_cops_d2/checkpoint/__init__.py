"""Checkpoints from other frameworks: TensorFlow checkpoints read without TensorFlow
(:mod:`.tf_checkpoint`: standard library, numpy and google-crc32c), and DeepLab2's Axial-ResNet weights
converted into this project's backbone (:mod:`.deeplab2`; ``tools/convert_deeplab2_checkpoint.py``), and the
COPS authors' ``PanopticAffinity`` checkpoints converted into this project's ``COPS`` (:mod:`.cops`;
``tools/convert_cops_checkpoint.py``)."""
from .cops import (
    COPSCheckpointError,
    convert_cops_state_dict,
    cops_checkpoint_config,
    load_cops_checkpoint,
    skipped_cops_tensors,
)
from .deeplab2 import (
    DEEPLAB2_BN_EPS,
    convert_deeplab2_axial_resnet,
    deeplab2_axial_resnet_config,
    move_res5_into_maxs_decoder,
    skipped_deeplab2_variables,
)
from .tf_checkpoint import TensorInfo, TFCheckpointError, list_tf_checkpoint, read_tf_checkpoint

__all__ = [
    "read_tf_checkpoint",
    "list_tf_checkpoint",
    "TFCheckpointError",
    "TensorInfo",
    "convert_deeplab2_axial_resnet",
    "deeplab2_axial_resnet_config",
    "move_res5_into_maxs_decoder",
    "skipped_deeplab2_variables",
    "DEEPLAB2_BN_EPS",
    "convert_cops_state_dict",
    "cops_checkpoint_config",
    "skipped_cops_tensors",
    "load_cops_checkpoint",
    "COPSCheckpointError",
]
