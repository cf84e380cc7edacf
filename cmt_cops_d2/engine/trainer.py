"""The training / evaluation loop: Detectron2's ``DefaultTrainer`` with the plugin's choices.

* evaluators by the dataset's ``evaluator_type`` (``COCOPanopticEvaluator``, optionally
  ``SemSegEvaluator``);
* the training mapper by ``INPUT.DATASET_MAPPER_NAME``;
* SGD / Adam / AdamW with backbone LR multiplier and no weight decay on norms and embeddings
  (:mod:`cmt_cops_d2.engine.optimizer`);
* poly LR with warmup (``WarmupPolyLR``) or any Detectron2 scheduler;
* DistributedDataParallel on GPU (one device per process) and on CPU (Gloo), so a multi-process run
  works with or without CUDA.
"""
import contextlib
import logging
import os
import weakref

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup
from detectron2.evaluation import (CityscapesInstanceEvaluator, CityscapesSemSegEvaluator, COCOPanopticEvaluator,
                                    DatasetEvaluators, SemSegEvaluator)
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.download import local_weights
from ..checkpoint.zoo import check_weights_file
from ..config import add_cmt_cops_d2_config
from ..data.mappers import build_train_mapper
from .optimizer import build_optimizer

__all__ = ["Trainer", "setup_cfg", "create_ddp_model", "check_cfg", "default_setup_plugin",
           "weights_error_context", "load_weights"]

PANOPTIC_EVALUATOR_TYPES = ("coco_panoptic_seg", "cityscapes_panoptic_seg")


def predicts_instances(cfg: CfgNode) -> bool:
    """Whether the configured model adds ``instances`` (thing masks with scores) to its outputs."""
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch == "COPS":
        return bool(cfg.MODEL.COPS.PREDICT_INSTANCES)
    if arch == "PanopticDeepLab":
        return bool(cfg.MODEL.PANOPTIC_DEEPLAB.PREDICT_INSTANCES)
    return False


def create_ddp_model(model: torch.nn.Module, **kwargs) -> torch.nn.Module:
    """Wrap ``model`` in DistributedDataParallel when there are several processes.

    On CUDA each process drives its local device; on CPU ``device_ids`` stays unset (Gloo).
    """
    if comm.get_world_size() == 1:
        return model
    if next(model.parameters()).device.type == "cuda":
        kwargs.setdefault("device_ids", [comm.get_local_rank()])
    return DistributedDataParallel(model, **kwargs)


@contextlib.contextmanager
def weights_error_context(weights: str):
    """Re-raise a failure to read or download ``weights`` with the config key and value in the message."""
    try:
        yield
    except Exception as e:
        raise RuntimeError(f"could not load MODEL.WEIGHTS={weights!r}: {type(e).__name__}: {e}") from e


def load_weights(checkpointer: DetectionCheckpointer, weights: str, resume: bool) -> None:
    """``checkpointer.resume_or_load(weights, resume)`` with a URL downloaded through the checked cache
    first (not when resuming from a checkpoint in the output folder); a missing file is an error (with
    the command that creates it for the public starting points the configs name); failures name
    ``MODEL.WEIGHTS``."""
    with weights_error_context(weights):
        if not (resume and checkpointer.has_checkpoint()):
            check_weights_file(weights)
            weights = local_weights(weights)
        checkpointer.resume_or_load(weights, resume=resume)


def check_cfg(cfg: CfgNode) -> None:
    """Reject configs that would otherwise fail late with an obscure error."""
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"MODEL.DEVICE={cfg.MODEL.DEVICE!r} but no CUDA device is available; "
            "add `MODEL.DEVICE cpu` to the command line"
        )
    if cfg.SOLVER.AMP.ENABLED and not cfg.MODEL.DEVICE.startswith("cuda"):
        raise ValueError("SOLVER.AMP.ENABLED needs a CUDA device (MODEL.DEVICE cuda); "
                         "set SOLVER.AMP.ENABLED False for CPU training")
    for name in tuple(cfg.DATASETS.TRAIN) + tuple(cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list():
            raise KeyError(f"dataset {name!r} (DATASETS.TRAIN / DATASETS.TEST) is not registered; "
                           "see datasets/README.md for the built-in names and custom registration")
    if cfg.DATASETS.TRAIN:
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        num_classes = len(getattr(meta, "stuff_classes", []) or [])
        if num_classes and cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != num_classes:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES={cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} but dataset "
                f"{cfg.DATASETS.TRAIN[0]!r} has {num_classes} classes; set it to {num_classes}"
            )


def setup_cfg(args) -> CfgNode:
    """Config from ``args.config_file`` and ``args.opts`` (``KEY VALUE`` pairs), frozen and checked.

    An unknown key in the file or on the command line raises ``KeyError`` naming the key.
    """
    cfg = get_cfg()
    add_cmt_cops_d2_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    try:
        cfg.merge_from_list(args.opts)
    except AssertionError as e:  # yacs reports unknown keys and odd KEY VALUE lists this way
        raise KeyError(f"bad command-line config override {args.opts}: {e}") from None
    cfg.freeze()
    check_cfg(cfg)
    return cfg


class Trainer(DefaultTrainer):
    """``DefaultTrainer`` whose evaluator, mapper, optimizer, scheduler and DDP wrapping follow the
    plugin's config keys."""

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__, except that DDP is created by our create_ddp_model (CPU-capable).
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        model = create_ddp_model(model, broadcast_buffers=False,
                                 find_unused_parameters=cfg.MODEL.FIND_UNUSED_PARAMETERS)
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(
            model, data_loader, optimizer
        )
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = DetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """``DefaultTrainer.resume_or_load``; a URL in ``MODEL.WEIGHTS`` is downloaded with checks
        (:func:`cmt_cops_d2.checkpoint.download.cached_download`), and a weights file that cannot be
        read or downloaded raises an error naming ``MODEL.WEIGHTS``."""
        load_weights(self.checkpointer, self.cfg.MODEL.WEIGHTS, resume)
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1  # the checkpoint holds the iteration that just finished

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """PQ (``COCOPanopticEvaluator``) on panoptic datasets; with ``TEST.SEMANTIC_EVALUATION`` also
        mIoU (Cityscapes: ``CityscapesSemSegEvaluator`` on ``gtFine/*_labelIds.png``; COCO:
        ``SemSegEvaluator`` with semantic PNGs); with ``TEST.INSTANCE_EVALUATION`` also instance AP
        (Cityscapes: ``CityscapesInstanceEvaluator``), for a model that outputs ``instances``."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        evaluator_type = getattr(meta, "evaluator_type", None)
        evaluators = []
        if cfg.TEST.INSTANCE_EVALUATION:
            if evaluator_type != "cityscapes_panoptic_seg":
                raise ValueError(f"TEST.INSTANCE_EVALUATION: instance AP is evaluated on Cityscapes only; "
                                 f"{dataset_name!r} has evaluator_type={evaluator_type!r}")
            if not predicts_instances(cfg):
                raise ValueError(f"TEST.INSTANCE_EVALUATION is on, but {cfg.MODEL.META_ARCHITECTURE} with this "
                                 "config outputs no 'instances' (COPS: MODEL.COPS.PREDICT_INSTANCES True); "
                                 "its AP would be 0")
        if evaluator_type in PANOPTIC_EVALUATOR_TYPES:
            evaluators.append(COCOPanopticEvaluator(dataset_name, output_folder))
            if cfg.TEST.SEMANTIC_EVALUATION and evaluator_type == "cityscapes_panoptic_seg":
                evaluators.append(CityscapesSemSegEvaluator(dataset_name))
            elif cfg.TEST.SEMANTIC_EVALUATION and getattr(meta, "sem_seg_root", None):
                evaluators.append(SemSegEvaluator(dataset_name, distributed=True,
                                                  output_dir=output_folder))
            if cfg.TEST.INSTANCE_EVALUATION:
                evaluators.append(CityscapesInstanceEvaluator(dataset_name))
        elif evaluator_type == "sem_seg":
            evaluators.append(SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder))
        if not evaluators:
            raise NotImplementedError(
                f"no evaluator for dataset {dataset_name!r} with evaluator_type={evaluator_type!r}; "
                f"supported: {PANOPTIC_EVALUATOR_TYPES + ('sem_seg',)}"
            )
        return evaluators[0] if len(evaluators) == 1 else DatasetEvaluators(evaluators)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=build_train_mapper(cfg))

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg, optimizer):
        # WarmupPolyLR (SOLVER.POLY_LR_POWER, POLY_LR_CONSTANT_ENDING) or Detectron2's schedulers.
        return build_deeplab_lr_scheduler(cfg, optimizer)


def default_setup_plugin(cfg: CfgNode, args) -> None:
    """Detectron2's ``default_setup`` (output dir, config dump, env log, seed) plus our logger."""
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="cmt_cops_d2")
