"""demo/demo.py with bad inputs: an unreadable image is named, skipped, and fails the run at the end
(exit status 1, with the list of failed files); a missing config, an --input pattern matching nothing
and an --output folder that cannot be created stop the demo before the model is built (exit status 2)."""
import os
import shutil
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog
from tests.conftest import load_script

from ..conftest import CONFIG_DIR

ROOT = os.path.dirname(CONFIG_DIR)
CONFIG = os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml")
OPTS = ["--opts", "DATASETS.TEST", "('tiny_synthetic_val',)", "DATASETS.TRAIN", "('tiny_synthetic_train',)"]


def _demo():
    module = load_script("demo/demo.py")
    return module


@pytest.fixture
def images(tiny_synthetic, tmp_path):
    """Two good synthetic images in ``tmp_path/in``: a.jpg, c.jpg."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, record in zip(("a.jpg", "c.jpg"), DatasetCatalog.get("tiny_synthetic_val")):
        shutil.copy(record["file_name"], folder / name)
    return folder


def _truncated(folder):
    raw = (folder / "a.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(raw[: len(raw) // 3])
    return "OSError: image file is truncated"


def _empty(folder):
    (folder / "b.jpg").write_bytes(b"")
    return "UnidentifiedImageError: cannot identify image file"


def _text(folder):
    (folder / "b.jpg").write_text("not an image\n")
    return "UnidentifiedImageError: cannot identify image file"


def _folder(folder):
    (folder / "b.jpg").mkdir()
    return "IsADirectoryError"


# (case, writes b.jpg between the good a.jpg and c.jpg, what the error says after the path)
UNREADABLE = [("truncated_jpeg", _truncated), ("empty_file", _empty), ("text_file", _text),
              ("folder_named_like_an_image", _folder)]


@pytest.mark.parametrize("case,make", UNREADABLE, ids=[c[0] for c in UNREADABLE])
def test_an_unreadable_image_is_named_skipped_and_fails_the_run(images, tmp_path, capsys, case, make):
    reason = make(images)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        _demo().main(["--config-file", CONFIG, "--input", str(images / "*.jpg"), "--output", str(out), *OPTS])
    bad = str(images / "b.jpg")
    assert isinstance(e.value.code, str)  # sys.exit(message): exit status 1
    assert e.value.code.startswith("error: 1 of 3 input(s) could not be read and were skipped:\n")
    assert f"cannot read image {bad}" in e.value.code and reason in e.value.code
    err = capsys.readouterr().err
    assert f"error: cannot read image {bad}" in err and "; skipped" in err
    # the images before and after it were drawn
    assert sorted(os.listdir(out)) == ["a_panoptic.png", "c_panoptic.png"]


def test_the_demo_process_exits_1_after_a_truncated_image(images, tmp_path):
    _truncated(images)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "demo", "demo.py"), "--config-file", CONFIG, "--input",
         str(images / "a.jpg"), str(images / "b.jpg"), str(images / "c.jpg"), "--output", str(tmp_path / "out"),
         "--opts", "DATASETS.TEST", "('synthetic_panoptic_val',)"],
        capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"cannot read image {images / 'b.jpg'}: OSError: image file is truncated" in proc.stderr
    assert proc.stderr.rstrip().splitlines()[-2] == "error: 1 of 3 input(s) could not be read and were skipped:"
    assert sorted(os.listdir(tmp_path / "out")) == ["a_panoptic.png", "c_panoptic.png"]


def _no_match(tmp_path, images):
    pattern = str(tmp_path / "nothing" / "*.jpg")
    return ["--input", pattern], f"--input {pattern!r} matches no file"


def _missing_file(tmp_path, images):
    path = str(images / "missing.jpg")
    return ["--input", str(images / "a.jpg"), path], f"--input {path!r} matches no file"


def _missing_config(tmp_path, images):
    path = str(tmp_path / "configs" / "nope.yaml")
    return ["--config-file", path], f"--config-file {path!r}: no such file"


def _output_under_a_file(tmp_path, images):
    (tmp_path / "file").write_text("")
    path = str(tmp_path / "file" / "out")
    return ["--output", path], f"--output {path!r} cannot be created: {tmp_path / 'file'} is a file, not a folder"


def _output_is_a_file(tmp_path, images):
    (tmp_path / "file").write_text("")
    path = str(tmp_path / "file")
    return ["--output", path], f"--output {path!r} is a file, not a folder; name a folder"


# (case, (arguments replacing the defaults, message))
BAD_ARGUMENTS = [("input_glob_matches_nothing", _no_match), ("input_file_missing", _missing_file),
                 ("config_file_missing", _missing_config), ("output_under_a_file", _output_under_a_file),
                 ("output_is_a_file", _output_is_a_file)]


@pytest.mark.parametrize("case,make", BAD_ARGUMENTS, ids=[c[0] for c in BAD_ARGUMENTS])
def test_bad_arguments_stop_before_the_model_is_built(images, tmp_path, capsys, monkeypatch, case, make):
    demo = _demo()
    monkeypatch.setattr(demo, "build_predictor", lambda cfg: pytest.fail("the model was built"))
    changed, message = make(tmp_path, images)
    args = {"--config-file": [CONFIG], "--input": [str(images / "*.jpg")], "--output": [str(tmp_path / "o")]}
    args[changed[0]] = changed[1:]
    with pytest.raises(SystemExit) as e:
        demo.main([a for key, values in args.items() for a in (key, *values)] + OPTS)
    assert e.value.code == 2
    assert f"error: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written
