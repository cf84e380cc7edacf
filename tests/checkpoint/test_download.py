"""Checked, cached downloads (cmt_cops_d2.checkpoint.download), from an HTTP server on 127.0.0.1 that
can also misbehave: 404, a body shorter than its Content-Length, a corrupt archive, a wrong checksum.
Used by MODEL.WEIGHTS (training, --eval-only, demo) and by the converters."""
import hashlib
import os

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer

from cmt_cops_d2.checkpoint.download import DownloadError, cached_download, split_sha256
from cmt_cops_d2.checkpoint.tf_checkpoint import TFCheckpointError
from cmt_cops_d2.engine import Trainer, load_weights
from tests.conftest import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA = os.path.join(ROOT, "tests", "data", "deeplab2")


def _cached_files(tmp_path):
    return sorted(f for _, _, files in os.walk(tmp_path / "cache") for f in files)


def test_download_is_cached_and_checked(server, tmp_path):
    handler, url = server
    body = os.urandom(3000)
    handler.files["/w/model.pth"] = body
    digest = hashlib.sha256(body).hexdigest()
    path = cached_download(f"{url}/w/model.pth#sha256={digest}")
    assert open(path, "rb").read() == body and os.path.basename(path) == "model.pth"
    assert cached_download(f"{url}/w/model.pth") == path            # the same file, no new request
    assert handler.requests == ["/w/model.pth"]
    with open(path, "wb") as f:                                     # a damaged cache entry is replaced
        f.write(b"x")
    assert open(cached_download(f"{url}/w/model.pth", sha256=digest), "rb").read() == body
    assert len(handler.requests) == 2


def test_404_truncated_body_and_wrong_checksum_name_the_url(server, tmp_path):
    handler, url = server
    with pytest.raises(DownloadError, match=rf"{url}/missing\.pth: HTTP 404"):
        cached_download(f"{url}/missing.pth")
    handler.files["/cut.pth"] = os.urandom(5000)
    handler.truncate.add("/cut.pth")
    with pytest.raises(DownloadError, match=rf"could not download {url}/cut\.pth"):
        cached_download(f"{url}/cut.pth")
    handler.files["/ok.pth"] = b"abc"
    with pytest.raises(DownloadError, match=rf"{url}/ok\.pth: sha256 of the downloaded file is"):
        cached_download(f"{url}/ok.pth", sha256="0" * 64)
    assert _cached_files(tmp_path) == []                            # nothing partial was kept
    with pytest.raises(DownloadError, match="#sha256=<64 hex digits>"):
        split_sha256(f"{url}/ok.pth#md5=123")
    with pytest.raises(DownloadError, match="not an http"):
        cached_download("ftp://example.org/x.pth")


def test_model_weights_url_failures_name_the_config_value(tiny_synthetic, server, tmp_path):
    from tests.engine.test_train_loop import tiny_cfg

    handler, url = server
    torch.manual_seed(1)
    source = Trainer.build_model(tiny_cfg(tmp_path / "a"))
    os.makedirs(tmp_path / "src")
    DetectionCheckpointer(source, save_dir=str(tmp_path / "src")).save("model_x")
    handler.files["/model_x.pth"] = open(tmp_path / "src" / "model_x.pth", "rb").read()
    handler.files["/cut.pth"] = handler.files["/model_x.pth"]
    handler.truncate.add("/cut.pth")
    target = Trainer.build_model(tiny_cfg(tmp_path / "b"))
    load_weights(DetectionCheckpointer(target), f"{url}/model_x.pth", resume=False)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(RuntimeError, match=rf"MODEL.WEIGHTS='{url}/cut\.pth'.*could not download"):
        load_weights(DetectionCheckpointer(target), f"{url}/cut.pth", resume=False)
    assert _cached_files(tmp_path) == ["model_x.pth"]


def test_converter_reads_a_url_and_names_it_when_the_archive_is_corrupt(server, tmp_path, capsys):
    handler, url = server
    cli = load_script("tools/convert_deeplab2_checkpoint.py")
    archive = open(os.path.join(DATA, "maxs_relu.tar.gz"), "rb").read()
    handler.files["/maxs_relu.tar.gz"] = archive
    handler.files["/broken.tar.gz"] = archive[:1000] + bytes(256) + archive[1256:]
    out = cli.main([f"{url}/maxs_relu.tar.gz", str(tmp_path / "w.pth"), "--activation", "relu"])
    assert len(out["model"]) == 491
    with pytest.raises(TFCheckpointError, match=rf"{url}/broken\.tar\.gz \(downloaded to "):
        cli.main([f"{url}/broken.tar.gz", str(tmp_path / "x.pth")])
    with pytest.raises(DownloadError, match=rf"{url}/none\.tar\.gz: HTTP 404"):
        cli.main([f"{url}/none.tar.gz", str(tmp_path / "y.pth")])


def test_cops_converter_reads_a_url_and_names_it_when_the_file_is_not_a_checkpoint(server, tmp_path, capsys):
    import json

    handler, url = server
    cli = load_script("tools/convert_cops_checkpoint.py")
    data = os.path.join(ROOT, "tests", "data", "cops")
    meta = json.load(open(os.path.join(data, "cityscapes_tiny.json")))
    handler.files["/cops.pth"] = open(os.path.join(data, meta["files"]["model"]), "rb").read()
    handler.files["/page.pth"] = b"<html>not found</html>"
    args = ["--config-file", os.path.join(ROOT, meta["project_config_file"]),
            "MODEL.COPS.EDGE_DISTANCES", "[1, 4, 16]", "INPUT.CROP.SIZE", "(48, 80)"]
    result = cli.main([f"{url}/cops.pth", str(tmp_path / "w.pth")] + args)
    assert "affinity_head.predictors.2.predictor.weight" in result["model"]
    with pytest.raises(SystemExit, match=rf"{url}/page\.pth \(downloaded to .*\): .*not a PyTorch checkpoint"):
        cli.main([f"{url}/page.pth", str(tmp_path / "x.pth")] + args)
    with pytest.raises(DownloadError, match=rf"{url}/gone\.pth: HTTP 404"):
        cli.main([f"{url}/gone.pth", str(tmp_path / "y.pth")] + args)
