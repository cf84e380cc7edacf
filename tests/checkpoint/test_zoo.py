"""The public starting points the configs name in MODEL.WEIGHTS: a missing file is an error that prints
the command creating it, and that command works (here against a local server holding DeepLab2's
fixture checkpoint in place of the published one)."""
import argparse
import os
import shlex

import pytest
from detectron2.checkpoint import DetectionCheckpointer
from torch import nn

from cmt_cops_d2.checkpoint.zoo import PRETRAINED, check_weights_file, convert_command
from cmt_cops_d2.engine import load_weights, setup_cfg
from tests.conftest import load_script

from .test_download import ROOT


@pytest.mark.parametrize("config", ["coco/cmt_r50.yaml", "cityscapes/cmt_r50.yaml", "coco/max_deeplab_s.yaml"])
def test_paper_configs_name_the_converted_imagenet_backbone(config):
    cfg = setup_cfg(argparse.Namespace(config_file=os.path.join(ROOT, "configs", config), opts=[
        "MODEL.DEVICE", "cpu"]))
    assert cfg.MODEL.WEIGHTS == "pretrained/maxs_gelu_imagenet_22k_1k.pth"
    assert os.path.basename(cfg.MODEL.WEIGHTS) in PRETRAINED and cfg.MODEL.AXIAL_RESNET.BN_EPS == 1e-3


def test_a_missing_pretrained_file_prints_the_command_and_the_command_works(server, tmp_path, monkeypatch):
    handler, url = server
    monkeypatch.chdir(tmp_path)
    path = "pretrained/maxs_gelu_imagenet_22k_1k.pth"
    with pytest.raises(RuntimeError, match=r"MODEL.WEIGHTS='pretrained/maxs_gelu_imagenet_22k_1k.pth'") as e:
        load_weights(DetectionCheckpointer(nn.Linear(1, 1)), path, resume=False)
    command = convert_command(path)
    assert command in str(e.value) and 'MODEL.WEIGHTS ""' in str(e.value)
    assert command.startswith("python tools/convert_deeplab2_checkpoint.py https://storage.googleapis.com/")
    # the printed command, with the published archive served locally (the fixture stands in for it)
    args = shlex.split(command)[2:]
    archive = os.path.join(ROOT, "tests", "data", "deeplab2", "maxs_gelu.tar.gz")
    handler.files["/maxs_gelu_imagenet_22k_1k_224.tar.gz"] = open(archive, "rb").read()
    args[0] = f"{url}/maxs_gelu_imagenet_22k_1k_224.tar.gz"
    cli = load_script("tools/convert_deeplab2_checkpoint.py")
    cli.main(args)
    assert os.path.isfile(path)
    check_weights_file(path)  # now passes


def test_other_missing_files_name_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"MODEL.WEIGHTS='nothing/here.pth' does not exist .*{tmp_path}"):
        check_weights_file("nothing/here.pth")
    for fine in ("", "https://example.org/x.pth", "detectron2://ImageNetPretrained/MSRA/R-50.pkl"):
        check_weights_file(fine)
