"""Config keys of cmt_cops_d2, added to Detectron2's defaults.

``add_cmt_cops_d2_config(cfg)`` adds the keys shared by every model of the plugin (data mapper choice,
optimizer, evaluation). It also adds DeepLab's and Panoptic-DeepLab's keys (poly LR, ASPP, target
generation), so configs of Detectron2's Panoptic-DeepLab baseline load as they are. Model-specific
functions (``add_cmt_config``, ``add_cops_config``) build on it.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.panoptic_deeplab import add_panoptic_deeplab_config

__all__ = ["add_cmt_cops_d2_config"]


def add_cmt_cops_d2_config(cfg: CN) -> CN:
    """Add the plugin's shared keys (idempotent; returns ``cfg``)."""
    if "DATASET_MAPPER_NAME" in cfg.INPUT:
        return cfg
    # Poly LR (SOLVER.POLY_LR_POWER, POLY_LR_CONSTANT_ENDING), ASPP, DeepLab stem, and the
    # Panoptic-DeepLab heads / targets / SOLVER.OPTIMIZER.
    add_panoptic_deeplab_config(cfg)

    # Which training mapper builds the model's targets (see cmt_cops_d2.data.mappers.MAPPERS).
    cfg.INPUT.DATASET_MAPPER_NAME = "panoptic_deeplab"

    # Optimizer: "SGD", "ADAM" or "ADAMW". Panoptic-DeepLab's config sets ADAM as its default.
    cfg.SOLVER.OPTIMIZER = "ADAM"
    # Learning rate of backbone parameters = BASE_LR * BACKBONE_MULTIPLIER (CMT-DeepLab: 0.1).
    cfg.SOLVER.BACKBONE_MULTIPLIER = 1.0
    # Weight decay of embedding parameters (nn.Embedding, learned queries / cluster centers).
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    # SOLVER.CLIP_GRADIENTS.CLIP_TYPE also accepts "full_model": clip the global norm over all
    # parameters together (Detectron2's "norm" clips each parameter separately).

    # DistributedDataParallel(find_unused_parameters=...). Keep False: a model whose parameters all
    # receive gradients trains faster, and the multi-process test then catches unused ones.
    cfg.MODEL.FIND_UNUSED_PARAMETERS = False

    # Also run SemSegEvaluator (mIoU) on panoptic datasets that have semantic PNGs.
    cfg.TEST.SEMANTIC_EVALUATION = False

    return cfg
