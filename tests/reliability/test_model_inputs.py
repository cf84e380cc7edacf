"""Bad model inputs for CMT-DeepLab and COPS: wrong image shapes give a ValueError naming the image and
the expected 3 x H x W; NaN pixels and NaN outputs stop with a FloatingPointError in Detectron2's words."""
import argparse
import os

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from cmt_cops_d2.data.mappers import build_train_mapper
from cmt_cops_d2.engine import setup_cfg

from ..conftest import CONFIG_DIR

TINY_DATA = ["DATASETS.TRAIN", "('tiny_synthetic_train',)", "DATASETS.TEST", "('tiny_synthetic_val',)",
             "MODEL.DEVICE", "cpu"]
CONFIGS = {
    "cmt": ("cmt_tiny.yaml", ["INPUT.IMAGE_SIZE", "[64, 64]", "MODEL.CMT.NUM_CLUSTERS", "16"]),
    "cops": ("cops_tiny_pretrain.yaml", ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "100",
                                         "INPUT.CROP.ENABLED", "False"]),
}


def _cfg(name):
    file, opts = CONFIGS[name]
    return setup_cfg(argparse.Namespace(config_file=os.path.join(CONFIG_DIR, "synthetic", file),
                                        opts=TINY_DATA + opts))


@pytest.fixture(scope="module")
def models(tiny_synthetic):
    torch.manual_seed(0)
    return {name: build_model(_cfg(name)) for name in CONFIGS}


def _image(shape, dtype=torch.uint8):
    return torch.randint(0, 255, shape).to(dtype)


BAD_SHAPES = [
    ("four_channels", (4, 32, 32), r"has shape \(4, 32, 32\); expected 3 x H x W .*4 channels"),
    ("channels_last", (32, 40, 3), r"has shape \(32, 40, 3\); expected 3 x H x W .*channels last"),
    ("empty", (3, 0, 0), r"has shape \(3, 0, 0\); expected 3 x H x W \(channels first, H and W at least 1\)"),
    ("two_dims", (32, 40), r"has shape \(32, 40\); expected 3 x H x W"),
]


@pytest.mark.parametrize("model_name", list(CONFIGS))
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("case,shape,message", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_wrong_image_shapes_name_the_image_and_the_expected_shape(models, model_name, training, case, shape,
                                                                   message):
    model = models[model_name].train(training)
    named = {"image": _image(shape), "file_name": f"/data/{case}.png"}
    with pytest.raises(ValueError, match=rf"input image '/data/{case}\.png' " + message):
        model([{"image": _image((3, 32, 32))}, named])
    with pytest.raises(ValueError, match=r"input image batched_inputs\[0\] " + message):
        model([{"image": _image(shape)}])


@pytest.mark.parametrize("model_name", list(CONFIGS))
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
def test_a_nan_pixel_stops_with_a_floating_point_error_naming_the_image(models, model_name, training):
    model = models[model_name].train(training)
    image = _image((3, 32, 32), torch.float32)
    image[1, 5, 7] = float("nan")
    with pytest.raises(FloatingPointError, match=r"input image '/data/nan\.png' holds NaN or inf pixel values"):
        model([{"image": image, "file_name": "/data/nan.png", "height": 32, "width": 32}])
    image[1, 5, 7] = float("inf")
    with pytest.raises(FloatingPointError, match=r"input image batched_inputs\[0\] holds NaN or inf"):
        model([{"image": image}])


@pytest.fixture(scope="module")
def cmt_batch(tiny_synthetic):
    mapper = build_train_mapper(_cfg("cmt"))
    return [mapper(d) for d in DatasetCatalog.get("tiny_synthetic_train")[:2]]


def test_cmt_nan_outputs_stop_training_in_detectron2s_words_before_the_matching(cmt_batch):
    torch.manual_seed(0)
    model = build_model(_cfg("cmt")).train()
    assert all(torch.isfinite(v) for v in model(cmt_batch).values())   # the batch itself is fine
    with torch.no_grad():
        model.sem_seg_head.predictor.class_head.weight.fill_(float("nan"))
    with EventStorage(start_iter=7), pytest.raises(
            FloatingPointError, match=r"Loss became infinite or NaN at iteration=7! CMT-DeepLab's outputs "
                                      r"pred_logits, .* hold NaN or inf .*SOLVER.BASE_LR"):
        model(cmt_batch)
    with pytest.raises(FloatingPointError, match=r"^Loss became infinite or NaN! "):  # outside a trainer
        model(cmt_batch)
