"""Config loading and the checks that reject bad configs with a message naming the key."""
import argparse
import os

import pytest
import torch
import yaml

from cmt_cops_d2.engine import setup_cfg

from ..conftest import CONFIG_DIR

PDL_TINY = os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml")


def _args(config_file, *opts):
    return argparse.Namespace(config_file=config_file, opts=list(opts))


def test_tiny_config_loads_with_base_and_overrides():
    cfg = setup_cfg(_args(PDL_TINY, "SOLVER.MAX_ITER", "7"))
    assert cfg.MODEL.META_ARCHITECTURE == "PanopticDeepLab"
    assert cfg.DATASETS.TRAIN == ("synthetic_panoptic_train",)      # from _BASE_
    assert cfg.SOLVER.MAX_ITER == 7
    assert cfg.SOLVER.POLY_LR_POWER == 0.9                            # DeepLab key
    assert cfg.INPUT.DATASET_MAPPER_NAME == "panoptic_deeplab"        # plugin key


def test_unknown_key_in_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"_BASE_": PDL_TINY, "SOLVER": {"MAX_ITRE": 3}}))
    with pytest.raises(KeyError, match="SOLVER.MAX_ITRE"):
        setup_cfg(_args(str(bad)))


def test_unknown_key_on_command_line_is_named():
    with pytest.raises(KeyError, match="MODEL.NOT_A_KEY"):
        setup_cfg(_args(PDL_TINY, "MODEL.NOT_A_KEY", "1"))


def test_num_classes_must_match_the_dataset():
    with pytest.raises(ValueError, match="NUM_CLASSES=5 .* has 7 classes"):
        setup_cfg(_args(PDL_TINY, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "5"))


def test_unregistered_dataset_is_named():
    with pytest.raises(KeyError, match="'no_such_dataset'"):
        setup_cfg(_args(PDL_TINY, "DATASETS.TEST", "('no_such_dataset',)"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_device_without_cuda_says_how_to_fix():
    with pytest.raises(ValueError, match="MODEL.DEVICE cpu"):
        setup_cfg(_args(PDL_TINY, "MODEL.DEVICE", "cuda"))


def test_amp_on_cpu_is_rejected():
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED"):
        setup_cfg(_args(PDL_TINY, "SOLVER.AMP.ENABLED", "True"))


def test_unknown_mapper_name():
    from cmt_cops_d2.data.mappers import build_train_mapper

    cfg = setup_cfg(_args(PDL_TINY, "INPUT.DATASET_MAPPER_NAME", "nope"))
    with pytest.raises(ValueError, match="INPUT.DATASET_MAPPER_NAME='nope'"):
        build_train_mapper(cfg)
