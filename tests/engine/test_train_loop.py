"""The training / evaluation loop in one process: train, checkpoint, resume, evaluate, eval-only."""
import argparse
import os

import pytest
import torch

from cmt_cops_d2.engine import Trainer, setup_cfg
from tests.conftest import load_script

from ..conftest import CONFIG_DIR

ROOT = os.path.dirname(CONFIG_DIR)
TINY_OPTS = [
    "DATASETS.TRAIN", "('tiny_synthetic_train',)", "DATASETS.TEST", "('tiny_synthetic_val',)",
    "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "INPUT.CROP.SIZE", "(64, 64)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64", "SOLVER.WARMUP_ITERS", "1",
    "INPUT.CROP.ENABLED", "False", "MODEL.PANOPTIC_DEEPLAB.SIZE_DIVISIBILITY", "32",
]


def tiny_cfg(output_dir, *opts):
    return setup_cfg(argparse.Namespace(
        config_file=os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml"),
        opts=TINY_OPTS + ["OUTPUT_DIR", str(output_dir)] + list(opts)))


def _load_train_net():
    module = load_script("tools/train_net.py")
    return module


@pytest.fixture(scope="module")
def trained(tiny_synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    cfg = tiny_cfg(out, "SOLVER.MAX_ITER", "3")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    return cfg, trainer, before


def test_training_updates_every_parameter_and_evaluates(trained):
    cfg, trainer, before = trained
    changed = [not torch.equal(b, p) for b, p in zip(before, trainer.model.parameters())]
    assert all(changed), "some parameters received no update"
    res = trainer._last_eval_results["panoptic_seg"]
    assert set(res) >= {"PQ", "SQ", "RQ", "PQ_th", "PQ_st"}
    assert 0.0 <= res["PQ"] <= 100.0
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "model_final.pth"))
    assert os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "metrics.json"))


def test_resume_continues_from_the_last_checkpoint(trained, tmp_path):
    cfg, trainer, _ = trained
    resumed = Trainer(tiny_cfg(cfg.OUTPUT_DIR, "SOLVER.MAX_ITER", "5", "TEST.EVAL_PERIOD", "0"))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    for a, b in zip(resumed.model.parameters(), trainer.model.parameters()):
        assert torch.equal(a, b)


def test_eval_only_reproduces_the_final_evaluation(trained):
    cfg, trainer, _ = trained
    train_net = _load_train_net()
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml"),
         "--eval-only"] + TINY_OPTS
        + ["OUTPUT_DIR", cfg.OUTPUT_DIR, "MODEL.WEIGHTS", os.path.join(cfg.OUTPUT_DIR, "model_final.pth")])
    res = train_net.main(args)
    assert res["panoptic_seg"]["PQ"] == pytest.approx(trainer._last_eval_results["panoptic_seg"]["PQ"])
