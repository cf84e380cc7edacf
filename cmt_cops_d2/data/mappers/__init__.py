"""Training dataset mappers, chosen by ``cfg.INPUT.DATASET_MAPPER_NAME``, and the checked inference mapper."""
from .cops import COPSPanopticMapper
from .inference import InferenceMapper
from .mask_transformer import MaskTransformerPanopticMapper
from .panoptic_deeplab import PanopticDeepLabMapper
from .panoptic_io import check_panoptic_file, read_image_checked, read_panoptic_checked

__all__ = ["MAPPERS", "build_train_mapper", "PanopticDeepLabMapper", "MaskTransformerPanopticMapper", "read_image_checked",
           "read_panoptic_checked", "check_panoptic_file", "COPSPanopticMapper", "InferenceMapper"]

# INPUT.DATASET_MAPPER_NAME -> mapper class (each has a configurable __init__ taking cfg).
MAPPERS = {
    "panoptic_deeplab": PanopticDeepLabMapper,
    "mask_transformer_panoptic": MaskTransformerPanopticMapper,
    "cops_panoptic": COPSPanopticMapper,
}


def build_train_mapper(cfg):
    """The training mapper named by ``cfg.INPUT.DATASET_MAPPER_NAME``."""
    name = cfg.INPUT.DATASET_MAPPER_NAME
    if name not in MAPPERS:
        raise ValueError(
            f"INPUT.DATASET_MAPPER_NAME={name!r} is unknown; available: {sorted(MAPPERS)}"
        )
    return MAPPERS[name](cfg)
