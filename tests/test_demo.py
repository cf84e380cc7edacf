"""demo/demo.py draws a panoptic prediction over the input image."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image
from tests.conftest import load_script

from .conftest import CONFIG_DIR

ROOT = os.path.dirname(CONFIG_DIR)


def _demo():
    module = load_script("demo/demo.py")
    return module


def test_draw_panoptic_colours_each_segment_and_labels_it(tiny_synthetic):
    demo = _demo()
    meta = MetadataCatalog.get("tiny_synthetic_val")
    image = np.full((64, 80, 3), 128, np.uint8)
    pan = torch.full((64, 80), -1, dtype=torch.int64)
    pan[:, :40] = 4 * meta.label_divisor          # sand (stuff)
    pan[10:30, 50:70] = 1 * meta.label_divisor + 1  # a square (thing)
    drawn = demo.draw_panoptic(image, {"panoptic_seg": (pan, None)}, meta)
    assert drawn.shape == image.shape
    assert not np.array_equal(drawn[5, 5], image[5, 5])          # stuff coloured
    assert not np.array_equal(drawn[20, 60], image[20, 60])      # thing coloured
    assert np.array_equal(drawn[60, 45], image[60, 45])          # void untouched


def test_demo_cli_writes_one_picture_per_input(tiny_synthetic, tmp_path):
    demo = _demo()
    inputs = [d["file_name"] for d in DatasetCatalog.get("tiny_synthetic_val")[:2]]
    demo.main(["--config-file", os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml"),
               "--input", *inputs, "--output", str(tmp_path),
               "--opts", "DATASETS.TEST", "('tiny_synthetic_val',)", "DATASETS.TRAIN",
               "('tiny_synthetic_train',)"])
    outs = sorted(os.listdir(tmp_path))
    assert outs == sorted(os.path.splitext(os.path.basename(p))[0] + "_panoptic.png" for p in inputs)
    assert Image.open(tmp_path / outs[0]).size == (80, 64)


def test_demo_names_a_missing_input(tiny_synthetic, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        _demo().expand_inputs([str(tmp_path / "nothing_here*.jpg")])
