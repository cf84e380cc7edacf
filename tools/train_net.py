#!/usr/bin/env python
"""Train or evaluate a cmt_cops_d2 model (or Detectron2's Panoptic-DeepLab baseline).

Examples::

    # train, then evaluate on DATASETS.TEST (PQ table printed at the end)
    python tools/train_net.py --config-file configs/synthetic/panoptic_deeplab_tiny.yaml
    # 8 GPUs; on a machine without CUDA, --num-gpus N runs N CPU processes (Gloo)
    python tools/train_net.py --config-file configs/coco/cmt_r50.yaml --num-gpus 8
    # evaluate a checkpoint
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS path/to/model_final.pth
    # continue an interrupted run from OUTPUT_DIR/last_checkpoint
    python tools/train_net.py --config-file CFG --resume
    # two machines: run on each with --machine-rank 0 / 1
    python tools/train_net.py --config-file CFG --num-gpus 8 --num-machines 2 \
        --machine-rank 0 --dist-url tcp://HOST0:PORT

``KEY VALUE`` pairs after the flags override the config (e.g. ``SOLVER.MAX_ITER 100 MODEL.DEVICE cpu``).
Weights that do not fit the model are an error (``MODEL.WEIGHTS_PARTIAL`` and ``MODEL.WEIGHTS_MIN_LOADED``
allow partial loads), and so is ``--eval-only`` without weights; any failure exits with a non-zero status.
"""
import os
import sys

# Allow running from a source checkout without installation (sys.path[0] is tools/).
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import default_argument_parser  # noqa: E402
from detectron2.evaluation import verify_results  # noqa: E402
from detectron2.utils import comm  # noqa: E402

import cmt_cops_d2  # noqa: E402,F401  (registers datasets and models)
from cmt_cops_d2.checkpoint.fit import FitPolicy  # noqa: E402
from cmt_cops_d2.engine import (  # noqa: E402
    Trainer,
    default_setup_plugin,
    launch,
    setup_cfg,
    load_weights,
)
from cmt_cops_d2.engine.checks import check_eval_weights, check_training  # noqa: E402


def main(args):
    cfg = setup_cfg(args)
    # errors in the config are raised before anything is built
    if args.eval_only:
        check_eval_weights(cfg, args.resume)
    else:
        check_training(cfg)
    default_setup_plugin(cfg, args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        load_weights(DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR), cfg.MODEL.WEIGHTS, args.resume,
                     FitPolicy.from_config(cfg))
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def cli(argv=None):
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))


if __name__ == "__main__":
    cli()
