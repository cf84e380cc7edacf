"""Broken datasets: custom data registered with register_panoptic_dataset and the built-in synthetic set.

A custom JSON that is not UTF-8, lacks a top-level key, or holds a value of the wrong type
(``"category_id": "3"``) is an error naming the file, the entry and the key; so are a missing image or
PNG, an unknown category id, and a corrupt image met during training. The synthetic set repairs
itself on load, and its prepare script regenerates missing or truncated files instead of calling the
copy up to date. (tests/data has the loader's and mappers' other checks.)
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from cmt_cops_d2 import register_panoptic_dataset
from cmt_cops_d2.data.datasets.panoptic import DatasetFormatError
from cmt_cops_d2.data.datasets.register_synthetic import (
    prepare_command,
    register_all_synthetic_panoptic,
    synthetic_split_paths,
)
from cmt_cops_d2.data.synthetic import SYNTHETIC_CATEGORIES, SyntheticConfig
from cmt_cops_d2.engine import Trainer
from tests.conftest import load_script

from ..conftest import CONFIG_DIR
from ..data.conftest import make_layouts, write_panoptic_dataset
from ..engine.test_train_loop import tiny_cfg

ROOT = os.path.dirname(CONFIG_DIR)
CATEGORIES = [
    {"id": 7, "name": "cat", "isthing": 1},
    {"id": 3, "name": "grass", "isthing": 0},
    {"id": 20, "name": "dog", "isthing": 1},
    {"id": 11, "name": "sky", "isthing": 0},
]
SMALL = SyntheticConfig(num_train=3, num_val=1, height=40, width=40, seed=5)


@pytest.fixture
def custom(tmp_path):
    """A 2-image custom dataset registered as ``reliability_custom``; yields (paths, JSON dict)."""
    paths = {"image_root": str(tmp_path / "images"), "panoptic_root": str(tmp_path / "panoptic"),
             "panoptic_json": str(tmp_path / "panoptic.json")}
    data = write_panoptic_dataset(paths["image_root"], paths["panoptic_root"], paths["panoptic_json"],
                                  CATEGORIES, make_layouts(2, things=(7, 20), stuff=(3, 11)))
    register_panoptic_dataset("reliability_custom", CATEGORIES, **paths)
    yield paths, data
    DatasetCatalog.remove("reliability_custom")
    MetadataCatalog.remove("reliability_custom")


def _dump(edit):
    """A case that edits the JSON dict and writes it back as UTF-8."""
    def apply(paths, data):
        edit(data)
        with open(paths["panoptic_json"], "w", encoding="utf-8") as f:
            json.dump(data, f)
    return apply


def _non_utf8(paths, data):
    data["categories"][1]["name"] = "gräss"
    with open(paths["panoptic_json"], "wb") as f:
        f.write(json.dumps(data, ensure_ascii=False).encode("latin-1"))


def _top_level_list(paths, data):
    with open(paths["panoptic_json"], "w") as f:
        json.dump([data], f)


def _remove(kind, index):
    def apply(paths, data):
        if kind == "image":
            os.remove(os.path.join(paths["image_root"], data["images"][index]["file_name"]))
        else:
            os.remove(os.path.join(paths["panoptic_root"], data["annotations"][index]["file_name"]))
    return apply


def _seg(key, value, index=0):
    return _dump(lambda d: d["annotations"][0]["segments_info"][index].update({key: value}))


# (case, breakage, error type, regular expression the message must match besides naming the JSON; None
# for a missing file, whose message names that file)
CASES = [
    ("non_utf8_json", _non_utf8, DatasetFormatError,
     r"is not UTF-8 text: byte 0xe4 at offset \d+ \(line 1\) is not valid utf-8 .*re-save it as UTF-8"),
    ("top_level_list", _top_level_list, DatasetFormatError,
     r"the top level is a list, not an object with the keys 'images', 'annotations' and 'categories'"),
    ("no_annotations_key", _dump(lambda d: d.pop("annotations")), DatasetFormatError,
     r"lacks the top-level key\(s\) 'annotations' \(it has \['categories', 'images'\]\)"),
    ("no_categories_key", _dump(lambda d: d.pop("categories")), DatasetFormatError,
     r"lacks the top-level key\(s\) 'categories'"),
    ("no_images_key", _dump(lambda d: d.pop("images")), DatasetFormatError,
     r"lacks the top-level key\(s\) 'images'"),
    ("no_top_level_keys", _dump(lambda d: [d.pop(k) for k in ("images", "annotations", "categories")]),
     DatasetFormatError, r"lacks the top-level key\(s\) 'images', 'annotations', 'categories' \(it has \[\]\)"),
    ("annotations_not_a_list", _dump(lambda d: d.update(annotations={"a": 1})), DatasetFormatError,
     r"top-level \"annotations\" is \{\"a\": 1\} \(an object\); it must be a list"),
    ("category_id_string", _seg("category_id", "3"), DatasetFormatError,
     r"annotation of image_id 1 \(000000000001\.png\): segments_info\[0\] has \"category_id\": \"3\" "
     r"\(a string\); it must be an integer"),
    ("category_id_float", _seg("category_id", 3.5), DatasetFormatError,
     r"segments_info\[0\] has \"category_id\": 3\.5 \(a number with a fraction\)"),
    ("category_id_missing", _dump(lambda d: d["annotations"][1]["segments_info"][2].pop("category_id")),
     DatasetFormatError, r"annotation of image_id 2 .*segments_info\[2\] lacks the key \"category_id\""),
    ("segment_id_string", _seg("id", "1"), DatasetFormatError,
     r"segments_info\[0\] has \"id\": \"1\" \(a string\); it must be an integer segment id"),
    ("iscrowd_string", _seg("iscrowd", "0", index=2), DatasetFormatError,
     r"segments_info\[2\] has \"iscrowd\": \"0\" \(a string\); it must be 0 or 1"),
    ("segments_info_null", _dump(lambda d: d["annotations"][0].update(segments_info=None)),
     DatasetFormatError, r"image_id 1 \(000000000001\.png\) has \"segments_info\": null \(null\); it must be a list"),
    ("annotation_not_an_object", _dump(lambda d: d["annotations"].append("x")), DatasetFormatError,
     r": annotations\[2\] is \"x\" \(a string\), not an object"),
    ("image_id_type_differs", _dump(lambda d: d["annotations"][1].update(image_id="2")), DatasetFormatError,
     r"image_id is \"2\" \(a string\) but 'images' has the id 2 \(an integer\); write the id with the same type"),
    ("image_without_file_name", _dump(lambda d: d["images"][1].pop("file_name")), DatasetFormatError,
     r": images\[1\] lacks the key \"file_name\""),
    ("image_height_string", _dump(lambda d: d["images"][0].update(height="6")), DatasetFormatError,
     r": images\[0\] has \"height\": \"6\" \(a string\); it must be a positive integer"),
    # already reported before this suite
    ("unknown_category_id", _seg("category_id", 99), DatasetFormatError,
     r"segment 1 has category_id 99, which is not among the dataset's categories \[3, 7, 11, 20\]"),
    ("missing_image", _remove("image", 1), FileNotFoundError, None),
    ("missing_panoptic_png", _remove("png", 0), FileNotFoundError, None),
]


@pytest.mark.parametrize("case,breakage,error,fragment", CASES, ids=[c[0] for c in CASES])
def test_broken_custom_dataset_names_the_file_and_the_entry(custom, case, breakage, error, fragment):
    paths, data = custom
    missing_files = {"missing_image": os.path.join(paths["image_root"], "000000000002.png"),
                     "missing_panoptic_png": os.path.join(paths["panoptic_root"], "000000000001.png")}
    breakage(paths, data)
    with pytest.raises(error) as info:
        DatasetCatalog.get("reliability_custom")
    message = str(info.value)
    if fragment is None:
        assert f"not found: {missing_files[case]}" in message
    else:
        assert paths["panoptic_json"] in message
        assert re.search(fragment, message), message


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16"])
def test_json_with_a_bom_or_in_utf16_is_read(custom, encoding):
    paths, data = custom
    with open(paths["panoptic_json"], "w", encoding=encoding) as f:
        json.dump(data, f)
    assert len(DatasetCatalog.get("reliability_custom")) == 2


@pytest.mark.parametrize("categories,fragment", [
    ([{"id": "7", "name": "cat", "isthing": 1}], r"categories\[0\] \('cat'\) has \"id\": \"7\" \(a string\); "
                                                 r"it must be an integer"),
    ([{"id": 7, "name": "cat", "isthing": "yes"}], r"categories\[0\] \('cat'\) has \"isthing\": \"yes\" "
                                                   r"\(a string\); it must be 1 or 0"),
    ([{"name": "cat", "isthing": 1}], r"categories\[0\] = .* lacks the key\(s\) \['id'\]"),
], ids=["id_string", "isthing_string", "id_missing"])
def test_bad_categories_are_named_at_registration(tmp_path, categories, fragment):
    with pytest.raises(DatasetFormatError, match=r"register_panoptic_dataset\('reliability_bad_categories'\), "
                                                 r"argument categories: " + fragment):
        register_panoptic_dataset("reliability_bad_categories", categories, str(tmp_path), str(tmp_path),
                                  str(tmp_path / "p.json"))
    assert "reliability_bad_categories" not in DatasetCatalog.list()


def test_corrupt_image_stops_training_naming_the_file(tiny_synthetic, tmp_path):
    """Four synthetic images as a custom dataset, one truncated: the training run stops at it."""
    src = synthetic_split_paths(tiny_synthetic, "train")
    with open(src["panoptic_json"]) as f:
        data = json.load(f)
    data["images"], data["annotations"] = data["images"][:4], data["annotations"][:4]
    paths = {"image_root": str(tmp_path / "img"), "panoptic_root": str(tmp_path / "pan"),
             "panoptic_json": str(tmp_path / "p.json")}
    for key, folder, entries in (("image_root", "image_root", data["images"]),
                                 ("panoptic_root", "panoptic_root", data["annotations"])):
        os.makedirs(paths[key])
        for e in entries:
            shutil.copy(os.path.join(src[folder], e["file_name"]), paths[key])
    json.dump(data, open(paths["panoptic_json"], "w"))
    bad = os.path.join(paths["image_root"], data["images"][2]["file_name"])
    raw = open(bad, "rb").read()
    open(bad, "wb").write(raw[: len(raw) // 3])
    register_panoptic_dataset("reliability_corrupt_train", SYNTHETIC_CATEGORIES, **paths)
    try:
        trainer = Trainer(tiny_cfg(tmp_path / "out", "DATASETS.TRAIN", "('reliability_corrupt_train',)",
                                   "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "2"))
        trainer.resume_or_load(resume=False)
        with pytest.raises(ValueError, match=rf"cannot read image {bad}: OSError: image file is truncated"):
            trainer.train()
    finally:
        DatasetCatalog.remove("reliability_corrupt_train")
        MetadataCatalog.remove("reliability_corrupt_train")


# ---- the built-in synthetic set --------------------------------------------------------------------

def _prepare_script():
    module = load_script("datasets/prepare_synthetic_panoptic.py")
    return module


PREPARE_ARGS = ["--num-train", "3", "--num-val", "1", "--height", "40", "--width", "40", "--seed", "5"]


@pytest.fixture
def small_synthetic(tmp_path):
    """A small synthetic copy under ``tmp_path/root``, registered as ``reliability_syn_{train,val}``."""
    root = str(tmp_path / "root")
    register_all_synthetic_panoptic(root, prefix="reliability_syn", cfg=SMALL)
    DatasetCatalog.get("reliability_syn_train")
    yield root
    for split in ("train", "val"):
        DatasetCatalog.remove(f"reliability_syn_{split}")
        MetadataCatalog.remove(f"reliability_syn_{split}")


def _damage(path, how):
    if how == "deleted":
        os.remove(path)
    else:
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])


# (case, the file damaged (split, key of synthetic_split_paths, file name or None), how)
SYNTHETIC_CASES = [
    ("image_deleted", ("train", "image_root", "000002.jpg"), "deleted"),
    ("image_truncated", ("train", "image_root", "000001.jpg"), "truncated"),
    ("panoptic_png_deleted", ("val", "panoptic_root", "000001.png"), "deleted"),
    ("semantic_png_truncated", ("train", "sem_seg_root", "000003.png"), "truncated"),
    ("json_deleted", ("train", "panoptic_json", None), "deleted"),
]


def _file(root, where):
    split, key, name = where
    path = synthetic_split_paths(root, split)[key]
    return os.path.join(path, name) if name else path


@pytest.mark.parametrize("case,where,how", SYNTHETIC_CASES, ids=[c[0] for c in SYNTHETIC_CASES])
def test_synthetic_set_repairs_itself_on_load(small_synthetic, case, where, how, caplog):
    path = _file(small_synthetic, where)
    original = open(path, "rb").read()
    _damage(path, how)
    assert len(DatasetCatalog.get(f"reliability_syn_{where[0]}")) == {"train": 3, "val": 1}[where[0]]
    assert open(path, "rb").read() == original  # regenerated byte for byte
    assert f"1 file(s) missing or truncated ({path}); regenerating them" in caplog.text


@pytest.mark.parametrize("case,where,how", SYNTHETIC_CASES, ids=[c[0] for c in SYNTHETIC_CASES])
def test_prepare_script_repairs_before_it_says_up_to_date(tmp_path, capsys, case, where, how):
    prepare = _prepare_script()
    data_root = str(tmp_path / "root")
    prepare.main(["--root", data_root, *PREPARE_ARGS])
    assert capsys.readouterr().out.startswith("generated ")
    path = _file(data_root, where)
    original = open(path, "rb").read()
    _damage(path, how)
    prepare.main(["--root", data_root, *PREPARE_ARGS])
    out = capsys.readouterr().out
    assert out.startswith("repaired ("), out
    assert path in out
    assert open(path, "rb").read() == original
    prepare.main(["--root", data_root, *PREPARE_ARGS])
    assert capsys.readouterr().out.startswith("already up to date (all 14 files present): ")


def test_prepare_script_force_regenerates_an_intact_copy(tmp_path, capsys):
    prepare = _prepare_script()
    data_root = str(tmp_path / "root")
    prepare.main(["--root", data_root, *PREPARE_ARGS])
    capsys.readouterr()
    prepare.main(["--root", data_root, *PREPARE_ARGS, "--force"])
    assert capsys.readouterr().out.startswith("generated ")


def test_prepare_script_rejects_bad_parameters(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _prepare_script().main(["--root", str(tmp_path), "--height", "16"])
    assert e.value.code == 2
    assert "synthetic images must be at least 32x32, got 16x128" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "synthetic_panoptic")


def test_the_command_in_the_not_found_message_restores_the_copy(tmp_path, monkeypatch):
    """When the copy is not repaired on load (here: repair switched off), the missing file is named with
    the command for this root and these parameters, and that command restores it."""
    import cmt_cops_d2.data.datasets.register_synthetic as reg

    monkeypatch.setattr(reg, "ensure_synthetic_panoptic", lambda root, cfg: False)
    root = str(tmp_path / "root d")  # a space: the command quotes the root
    _prepare_script().main(["--root", root, *PREPARE_ARGS])
    reg.register_all_synthetic_panoptic(root, prefix="reliability_norepair", cfg=SMALL)
    try:
        path = _file(root, ("train", "image_root", "000002.jpg"))
        os.remove(path)
        command = prepare_command(root, SMALL)
        with pytest.raises(FileNotFoundError) as info:
            DatasetCatalog.get("reliability_norepair_train")
        assert f"image of image_id 2 not found: {path}" in str(info.value)
        assert f"regenerate it (from the repository root): {command}" in str(info.value)
        assert command.startswith(f"python datasets/prepare_synthetic_panoptic.py --root '{root}' ")
        args = shlex.split(command)  # python datasets/prepare_synthetic_panoptic.py --root ...
        proc = subprocess.run([sys.executable, *args[1:]], cwd=ROOT, capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith("generated ")
        assert len(DatasetCatalog.get("reliability_norepair_train")) == 3
    finally:
        for split in ("train", "val"):
            DatasetCatalog.remove(f"reliability_norepair_{split}")
            MetadataCatalog.remove(f"reliability_norepair_{split}")
