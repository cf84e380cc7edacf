"""MODEL.WEIGHTS given as a URL: downloaded (to $FVCORE_CACHE) and loaded, here from a local server."""
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from cmt_cops_d2.engine import Trainer

from .test_train_loop import tiny_cfg


def test_weights_from_a_url_are_downloaded_and_loaded(tiny_synthetic, tmp_path, server, monkeypatch):
    handler, url = server
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(1)
    source = Trainer.build_model(tiny_cfg(tmp_path / "a"))
    os.makedirs(tmp_path / "www")
    DetectionCheckpointer(source, save_dir=str(tmp_path / "www")).save("model_x")
    handler.files["/model_x.pth"] = (tmp_path / "www" / "model_x.pth").read_bytes()
    cfg = tiny_cfg(tmp_path / "b")
    torch.manual_seed(2)
    target = Trainer.build_model(cfg)
    DetectionCheckpointer(target).resume_or_load(f"{url}/model_x.pth", resume=False)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    cached = [f for _, _, files in os.walk(tmp_path / "cache") for f in files]
    assert "model_x.pth" in cached


def test_a_missing_url_fails_naming_the_config_value(tiny_synthetic, tmp_path, server, monkeypatch):
    _, url = server
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    trainer = Trainer(tiny_cfg(tmp_path / "c", "MODEL.WEIGHTS", f"{url}/nothing.pth"))
    with pytest.raises(RuntimeError, match=r"MODEL.WEIGHTS='http://127\.0\.0\.1:\d+/nothing\.pth'.*404"):
        trainer.resume_or_load(resume=False)
