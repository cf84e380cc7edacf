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
import dataclasses
import logging
import os
import weakref
from typing import Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import (DatasetCatalog, MetadataCatalog, build_detection_test_loader,
                             build_detection_train_loader)
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, default_setup
from detectron2.evaluation import (CityscapesInstanceEvaluator, CityscapesSemSegEvaluator, DatasetEvaluators,
                                    SemSegEvaluator)
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from ..checkpoint.atomic import AtomicCheckpointer
from ..checkpoint.download import local_weights
from ..checkpoint.fit import FitCheckpointer, FitPolicy
from ..checkpoint.zoo import check_weights_file
from ..config import add_cmt_cops_d2_config
from ..data.mappers import InferenceMapper, build_train_mapper
from ..evaluation import CheckedCOCOPanopticEvaluator, check_model_classes, check_same_classes
from .checks import check_values
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
def weights_error_context(weights: str, resume_file: Optional[str] = None):
    """Re-raise a failure to read, download or fit ``weights`` with the config key and value in the
    message; with ``resume_file`` (the checkpoint ``OUTPUT_DIR/last_checkpoint`` names) name that file
    and ``last_checkpoint`` instead."""
    try:
        yield
    except Exception as e:
        if resume_file is None:
            raise RuntimeError(f"could not load MODEL.WEIGHTS={weights!r}: {type(e).__name__}: {e}") from e
        last = os.path.join(os.path.dirname(resume_file), "last_checkpoint")
        raise RuntimeError(
            f"could not resume from {resume_file!r} (named in {last}): {type(e).__name__}: {e}\n"
            f"Write the name of an intact checkpoint of that folder into {last}, or delete {last} (or leave "
            "out --resume) to start from MODEL.WEIGHTS") from e


def resume_checkpoint_file(checkpointer: DetectionCheckpointer) -> str:
    """The checkpoint that ``<save_dir>/last_checkpoint`` names; ``RuntimeError`` naming ``last_checkpoint``
    when it is empty or names a file that does not exist."""
    folder = checkpointer.save_dir
    last = os.path.join(folder, "last_checkpoint")
    with checkpointer.path_manager.open(last, "r") as f:
        name = f.read().strip()
    found = sorted(os.path.basename(p) for p in checkpointer.get_all_checkpoint_files())
    fix = (f"write the name of a checkpoint of {folder} into it (there: {', '.join(found) or 'none'}), or "
           f"delete it (or leave out --resume) to start from MODEL.WEIGHTS")
    if not name:
        raise RuntimeError(f"cannot resume: {last} is empty; it should hold the file name of the checkpoint to "
                           f"resume from; {fix}")
    path = os.path.join(folder, name)
    if not checkpointer.path_manager.isfile(path):
        raise RuntimeError(f"cannot resume: {last} names {name!r}, but {path} does not exist; {fix}")
    return path


def load_weights(checkpointer: DetectionCheckpointer, weights: str, resume: bool,
                 policy: Optional[FitPolicy] = None) -> dict:
    """``checkpointer.resume_or_load(weights, resume=resume)`` with checks; returns the same.

    * Resuming (``resume`` and ``<save_dir>/last_checkpoint`` exists): the file it names must exist and
      fit the model completely (``policy.partial`` ignored); failures name that file and
      ``last_checkpoint``.
    * Otherwise ``weights``: a URL is downloaded through the checked cache; a missing file is an error
      (with the command that creates the public starting points the configs name); the file must fit
      the model under ``policy`` (:mod:`cmt_cops_d2.checkpoint.fit`; default ``FitPolicy()``); failures
      name ``MODEL.WEIGHTS``.
    """
    policy = policy or FitPolicy()
    if resume and checkpointer.has_checkpoint():
        path = resume_checkpoint_file(checkpointer)
        with weights_error_context(weights, resume_file=path):
            return FitCheckpointer.like(checkpointer, dataclasses.replace(policy, partial=False)).load(path)
    with weights_error_context(weights):
        check_weights_file(weights)
        return FitCheckpointer.like(checkpointer, policy).load(local_weights(weights), checkpointables=[])


def check_cfg(cfg: CfgNode) -> None:
    """Reject configs that would otherwise fail late with an obscure error: no CUDA, unknown datasets,
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` unlike the datasets' class count, and training / test datasets
    whose classes differ from the first training dataset's."""
    check_values(cfg)  # device, batch size, ... (engine/checks.py)
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
        # Every training and test dataset must number the classes as the first training dataset does.
        check_same_classes(cfg.DATASETS.TRAIN[0], cfg.DATASETS.TRAIN, "DATASETS.TRAIN")
        check_same_classes(cfg.DATASETS.TRAIN[0], cfg.DATASETS.TEST, "DATASETS.TEST")
    for name in cfg.DATASETS.TEST:
        check_model_classes(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, name)


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
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    def resume_or_load(self, resume=True):
        """``DefaultTrainer.resume_or_load`` through :func:`load_weights`: checked downloads, and errors
        naming ``MODEL.WEIGHTS`` (or the checkpoint ``last_checkpoint`` names) for a file that is missing,
        unreadable or does not fit the model (``MODEL.WEIGHTS_PARTIAL``, ``MODEL.WEIGHTS_MIN_LOADED``)."""
        load_weights(self.checkpointer, self.cfg.MODEL.WEIGHTS, resume, FitPolicy.from_config(self.cfg))
        if resume and self.checkpointer.has_checkpoint():
            self.start_iter = self.iter + 1  # the checkpoint holds the iteration that just finished

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """PQ (``COCOPanopticEvaluator``, after checking the ground-truth JSON and PNGs:
        :class:`~cmt_cops_d2.evaluation.CheckedCOCOPanopticEvaluator`) on panoptic datasets; with
        ``TEST.SEMANTIC_EVALUATION`` also mIoU (Cityscapes: ``CityscapesSemSegEvaluator`` on
        ``gtFine/*_labelIds.png``; COCO: ``SemSegEvaluator`` with semantic PNGs); with
        ``TEST.INSTANCE_EVALUATION`` also instance AP (Cityscapes: ``CityscapesInstanceEvaluator``), for
        a model that outputs ``instances``. ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` must match the dataset's
        classes."""
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
        if evaluator_type in PANOPTIC_EVALUATOR_TYPES or evaluator_type == "sem_seg":
            check_model_classes(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, dataset_name)
        if evaluator_type in PANOPTIC_EVALUATOR_TYPES:
            evaluators.append(CheckedCOCOPanopticEvaluator(dataset_name, output_folder))
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
    def build_test_loader(cls, cfg, dataset_name):
        """Detectron2's test loader with :class:`~cmt_cops_d2.data.mappers.InferenceMapper`: a corrupt or
        truncated image raises an error naming the file."""
        return build_detection_test_loader(cfg, dataset_name, mapper=InferenceMapper(cfg))

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
