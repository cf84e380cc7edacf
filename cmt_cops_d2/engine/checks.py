"""Config values checked before anything is built: each error names the key, its value and a fix.

* :func:`check_values` (every command; called by ``check_cfg``): ``MODEL.DEVICE``,
  ``SOLVER.IMS_PER_BATCH``, ``MODEL.CMT.NUM_CLUSTERS``, ``MODEL.WEIGHTS_MIN_LOADED`` and, for COPS, the
  solver's ``CMT_AMWC_WORKSPACE_MB`` environment variable;
* :func:`check_training` (training only): ``SOLVER.MAX_ITER``;
* :func:`check_eval_weights` (``--eval-only``): weights to evaluate.
"""
import os

import torch
from detectron2.config import CfgNode

__all__ = ["check_values", "check_training", "check_eval_weights"]


def check_values(cfg: CfgNode) -> None:
    """Raise ``ValueError`` naming the first config value that cannot work."""
    device = cfg.MODEL.DEVICE
    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"MODEL.DEVICE={device!r} is not a torch device; use cpu, cuda or cuda:N "
                         "(e.g. `MODEL.DEVICE cuda:0`)") from None
    if cfg.SOLVER.IMS_PER_BATCH < 1:
        raise ValueError(f"SOLVER.IMS_PER_BATCH={cfg.SOLVER.IMS_PER_BATCH} must be at least 1 (the number of "
                         "images per step over all processes, e.g. `SOLVER.IMS_PER_BATCH 8`)")
    if cfg.MODEL.META_ARCHITECTURE == "CMTDeepLab" and cfg.MODEL.CMT.NUM_CLUSTERS < 1:
        raise ValueError(f"MODEL.CMT.NUM_CLUSTERS={cfg.MODEL.CMT.NUM_CLUSTERS} must be at least 1 (the number of "
                         "cluster centers, i.e. the most segments per image; the paper uses 128)")
    share = cfg.MODEL.WEIGHTS_MIN_LOADED
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"MODEL.WEIGHTS_MIN_LOADED={share!r} must be a share between 0 and 1 (default 0.9)")
    if cfg.MODEL.META_ARCHITECTURE == "COPS":
        from ..solvers.amwc import workspace_limit

        workspace_limit()  # the solver reads it; a bad value is named now rather than at the first solve


def check_training(cfg: CfgNode) -> None:
    """Raise ``ValueError`` for values that only training cannot use."""
    if cfg.SOLVER.MAX_ITER < 1:
        raise ValueError(f"SOLVER.MAX_ITER={cfg.SOLVER.MAX_ITER}: training needs at least 1 iteration; set "
                         "SOLVER.MAX_ITER to a positive number, or add --eval-only to evaluate MODEL.WEIGHTS")


def check_eval_weights(cfg: CfgNode, resume: bool) -> None:
    """``--eval-only`` needs weights: ``MODEL.WEIGHTS``, or with ``--resume`` a checkpoint named by
    ``OUTPUT_DIR/last_checkpoint``. Raises ``ValueError`` otherwise."""
    if cfg.MODEL.WEIGHTS or (resume and os.path.exists(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint"))):
        return
    raise ValueError("--eval-only with an empty MODEL.WEIGHTS would evaluate an untrained model; give the "
                     "weights to evaluate, e.g. `MODEL.WEIGHTS output/run/model_final.pth`, or add --resume "
                     "to evaluate the checkpoint named by OUTPUT_DIR/last_checkpoint")
