"""Two training processes on CPU (Gloo) through the same Trainer, DDP wrapping and evaluators.

This catches the classic multi-GPU failures before a user meets them: parameters without gradient
(DDP with find_unused_parameters=False raises), ranks drifting apart, and evaluation that is not
collective (COCOPanopticEvaluator must gather every rank's predictions).
"""
import json
import os

import pytest
import torch
import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from cmt_cops_d2.data.datasets.register_synthetic import register_all_synthetic_panoptic
from cmt_cops_d2.engine import Trainer, launch

from ..conftest import TINY
from .test_train_loop import tiny_cfg


def _train_then_evaluate(dataset_root, output_dir):
    register_all_synthetic_panoptic(dataset_root, prefix="tiny_synthetic", cfg=TINY)
    cfg = tiny_cfg(output_dir, "SOLVER.MAX_ITER", "3", "SOLVER.IMS_PER_BATCH", "4")
    trainer = Trainer(cfg)
    assert isinstance(trainer.model, torch.nn.parallel.DistributedDataParallel)
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module
    # Gradients were averaged, so every rank holds the same parameters.
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = comm.all_gather(flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    # BN statistics are per rank (broadcast_buffers=False); use rank 0's, which model_final holds.
    for buf in model.buffers():
        dist.broadcast(buf, 0)
    res = Trainer.test(cfg, model)
    if comm.is_main_process():
        with open(os.path.join(output_dir, "ranks.json"), "w") as f:
            json.dump({"world_size": comm.get_world_size(), "same_parameters": same,
                       "pq": res["panoptic_seg"]["PQ"], "sq": res["panoptic_seg"]["SQ"]}, f)


def _fail_on_rank_one():
    if comm.get_rank() == 1:
        raise RuntimeError("worker 1 failed on purpose")


def test_two_cpu_processes_train_and_gather_evaluation(tiny_synthetic, tmp_path):
    launch(_train_then_evaluate, 2, dist_url="auto", args=(tiny_synthetic, str(tmp_path)))
    with open(tmp_path / "ranks.json") as f:
        ranks = json.load(f)
    assert ranks["world_size"] == 2
    assert ranks["same_parameters"]
    # The distributed evaluation covered every image: one process evaluating the saved final model
    # on the whole validation set gets the same numbers.
    cfg = tiny_cfg(tmp_path / "single")
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(str(tmp_path / "model_final.pth"))
    res = Trainer.test(cfg, model)["panoptic_seg"]
    assert res["PQ"] == pytest.approx(ranks["pq"], abs=1e-6)
    assert res["SQ"] == pytest.approx(ranks["sq"], abs=1e-6)


def test_a_failing_worker_fails_the_launch():
    # torch.multiprocessing re-raises the worker's error in the launching process (non-zero exit).
    with pytest.raises(Exception, match="worker 1 failed on purpose"):
        launch(_fail_on_rank_one, 2, dist_url="auto")
