"""Every shipped config loads (with its _BASE_ chain) and builds its model."""
import argparse
import glob
import os

import pytest
import torch
from detectron2.modeling import META_ARCH_REGISTRY

from cmt_cops_d2.engine import setup_cfg

from .conftest import CONFIG_DIR

CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True))
MODEL_CONFIGS = [c for c in CONFIGS if not os.path.basename(c).startswith("Base-")]


def test_configs_are_found():
    assert len(MODEL_CONFIGS) >= 8


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_config_loads_and_builds(path):
    cfg = setup_cfg(argparse.Namespace(config_file=path, opts=["MODEL.DEVICE", "cpu"]))
    assert cfg.MODEL.META_ARCHITECTURE in ("PanopticDeepLab", "CMTDeepLab", "COPS")
    with torch.device("meta"):  # shapes only: no memory for the large models
        model = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg)
    assert sum(p.numel() for p in model.parameters()) > 0
