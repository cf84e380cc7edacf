"""load_panoptic_json / register_panoptic_dataset on tiny custom datasets, including every error case."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from panopticapi.utils import id2rgb, rgb2id

from detectron2.data import DatasetCatalog, MetadataCatalog

from cmt_cops_d2.data.datasets.panoptic import (
    DatasetFormatError,
    load_panoptic_json,
    panoptic_metadata_from_categories,
    register_panoptic_dataset,
)

# Non-contiguous ids, not sorted, things and stuff mixed: contiguous ids must follow this order.
CATEGORIES = [
    {"id": 7, "name": "cat", "isthing": 1, "color": [255, 0, 0]},
    {"id": 3, "name": "grass", "isthing": 0, "color": [0, 255, 0]},
    {"id": 20, "name": "dog", "isthing": 1, "color": [0, 0, 255]},
    {"id": 11, "name": "sky", "isthing": 0},
]
CONTIGUOUS = {7: 0, 3: 1, 20: 2, 11: 3}
HINT = "run `python make_my_data.py`"


@pytest.fixture
def custom(tmp_path, fakes):
    """A 3-image custom dataset with semantic PNGs; returns its paths and the written JSON dict."""
    paths = dict(
        image_root=str(tmp_path / "images"),
        panoptic_root=str(tmp_path / "panoptic"),
        json_file=str(tmp_path / "panoptic.json"),
        sem_seg_root=str(tmp_path / "semseg"),
    )
    data = fakes.write_panoptic_dataset(
        paths["image_root"], paths["panoptic_root"], paths["json_file"], CATEGORIES,
        fakes.make_layouts(3, things=(7, 20), stuff=(3, 11)), sem_dir=paths["sem_seg_root"])
    return paths, data


def _load(paths, **kw):
    return load_panoptic_json(paths["json_file"], paths["image_root"], paths["panoptic_root"],
                              panoptic_metadata_from_categories(CATEGORIES),
                              sem_seg_root=paths["sem_seg_root"], prepare_hint=HINT, **kw)


def _rewrite(json_file, edit):
    with open(json_file) as f:
        data = json.load(f)
    edit(data)
    with open(json_file, "w") as f:
        json.dump(data, f)


def test_metadata_from_categories():
    meta = panoptic_metadata_from_categories(CATEGORIES)
    assert meta["thing_classes"] == meta["stuff_classes"] == ["cat", "grass", "dog", "sky"]
    assert meta["thing_dataset_id_to_contiguous_id"] == {7: 0, 20: 2}
    assert meta["stuff_dataset_id_to_contiguous_id"] == CONTIGUOUS
    assert meta["thing_colors"][0] == [255, 0, 0] and len(meta["stuff_colors"]) == 4


def test_load_round_trip(custom):
    paths, data = custom
    records = _load(paths)
    assert len(records) == 3
    for rec, img, ann in zip(records, data["images"], data["annotations"]):
        assert rec["image_id"] == img["id"]
        assert (rec["height"], rec["width"]) == (img["height"], img["width"])
        assert rec["file_name"] == os.path.join(paths["image_root"], img["file_name"])
        assert rec["pan_seg_file_name"] == os.path.join(paths["panoptic_root"], ann["file_name"])
        assert rec["sem_seg_file_name"] == os.path.join(paths["sem_seg_root"], ann["file_name"])
        assert os.path.isfile(rec["sem_seg_file_name"])
        pan = rgb2id(np.asarray(Image.open(rec["pan_seg_file_name"]).convert("RGB")))
        assert set(np.unique(pan)) - {0} == {s["id"] for s in rec["segments_info"]}
        for seg, src in zip(rec["segments_info"], ann["segments_info"]):
            assert seg["id"] == src["id"]
            assert seg["category_id"] == CONTIGUOUS[src["category_id"]]
            assert seg["isthing"] == (src["category_id"] in (7, 20))
            assert seg["iscrowd"] == src["iscrowd"]
            assert seg["area"] == src["area"] == int((pan == src["id"]).sum())
            assert seg["bbox"] == src["bbox"]
    assert records[0]["segments_info"][2]["iscrowd"] == 1


def test_load_without_sem_seg_and_with_image_ext(custom, tmp_path):
    paths, _ = custom
    meta = panoptic_metadata_from_categories(CATEGORIES)
    records = load_panoptic_json(paths["json_file"], paths["image_root"], paths["panoptic_root"], meta)
    assert "sem_seg_file_name" not in records[0]
    # image_ext: images found by the PNG's name with that extension (COCO: ".jpg").
    for name in os.listdir(paths["image_root"]):
        os.rename(os.path.join(paths["image_root"], name),
                  os.path.join(paths["image_root"], name.replace(".png", ".jpeg")))
    records = load_panoptic_json(paths["json_file"], paths["image_root"], paths["panoptic_root"], meta,
                                 image_ext=".jpeg")
    assert records[0]["file_name"].endswith("000000000001.jpeg")


def test_height_width_optional(custom):
    paths, _ = custom
    _rewrite(paths["json_file"], lambda d: [img.pop(k) for img in d["images"] for k in ("height", "width")])
    rec = _load(paths)[0]
    # Detectron2 compares record height/width with the image when present; None would not match.
    assert "height" not in rec and "width" not in rec


def test_register_panoptic_dataset(custom):
    paths, _ = custom
    name = "test_custom_panoptic_loader"
    try:
        register_panoptic_dataset(name, CATEGORIES, paths["image_root"], paths["panoptic_root"],
                                  paths["json_file"], sem_seg_root=paths["sem_seg_root"],
                                  label_divisor=256, prepare_hint=HINT, foo="bar")
        assert len(DatasetCatalog.get(name)) == 3
        meta = MetadataCatalog.get(name)
        assert meta.evaluator_type == "coco_panoptic_seg"
        assert meta.label_divisor == 256 and meta.ignore_label == 255 and meta.foo == "bar"
        assert meta.panoptic_json == paths["json_file"] and meta.panoptic_root == paths["panoptic_root"]
        assert meta.sem_seg_root == paths["sem_seg_root"] and meta.image_root == paths["image_root"]
        assert meta.thing_dataset_id_to_contiguous_id == {7: 0, 20: 2}
        assert meta.stuff_dataset_id_to_contiguous_id == CONTIGUOUS
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


# Each case breaks the dataset and names the file the error message must mention.
def _remove_image(paths, data):
    os.remove(os.path.join(paths["image_root"], data["images"][1]["file_name"]))
    return FileNotFoundError, os.path.join(paths["image_root"], data["images"][1]["file_name"])


def _remove_png(paths, data):
    os.remove(os.path.join(paths["panoptic_root"], data["annotations"][2]["file_name"]))
    return FileNotFoundError, os.path.join(paths["panoptic_root"], data["annotations"][2]["file_name"])


def _remove_sem_png(paths, data):
    os.remove(os.path.join(paths["sem_seg_root"], data["annotations"][0]["file_name"]))
    return FileNotFoundError, os.path.join(paths["sem_seg_root"], data["annotations"][0]["file_name"])


def _remove_json(paths, data):
    os.remove(paths["json_file"])
    return FileNotFoundError, paths["json_file"]


def _remove_panoptic_folder(paths, data):
    os.rename(paths["panoptic_root"], paths["panoptic_root"] + "_moved")
    return FileNotFoundError, paths["panoptic_root"]


def _unknown_category(paths, data):
    _rewrite(paths["json_file"], lambda d: d["annotations"][1]["segments_info"][0].update(category_id=99))
    return DatasetFormatError, paths["json_file"]


def _no_segments(paths, data):
    _rewrite(paths["json_file"], lambda d: d["annotations"][2].update(segments_info=[]))
    return DatasetFormatError, paths["json_file"]


def _duplicated_segment(paths, data):
    def edit(d):
        segs = d["annotations"][0]["segments_info"]
        segs[1]["id"] = segs[0]["id"]
    _rewrite(paths["json_file"], edit)
    return DatasetFormatError, paths["json_file"]


def _segment_id_out_of_range(paths, data):
    _rewrite(paths["json_file"], lambda d: d["annotations"][0]["segments_info"][0].update(id=0))
    return DatasetFormatError, paths["json_file"]


def _image_id_not_in_images(paths, data):
    _rewrite(paths["json_file"], lambda d: d["annotations"][1].update(image_id=12345))
    return DatasetFormatError, paths["json_file"]


def _invalid_json(paths, data):
    with open(paths["json_file"], "w") as f:
        f.write('{"images": [}')
    return DatasetFormatError, paths["json_file"]


def _not_panoptic_json(paths, data):
    _rewrite(paths["json_file"], lambda d: d.pop("annotations"))
    return DatasetFormatError, paths["json_file"]


def _no_annotations(paths, data):
    _rewrite(paths["json_file"], lambda d: d.update(annotations=[]))
    return DatasetFormatError, paths["json_file"]


@pytest.mark.parametrize("corrupt", [
    _remove_image, _remove_png, _remove_sem_png, _remove_json, _remove_panoptic_folder,
    _unknown_category, _no_segments, _duplicated_segment, _segment_id_out_of_range,
    _image_id_not_in_images, _invalid_json, _not_panoptic_json, _no_annotations,
], ids=lambda f: f.__name__.strip("_"))
def test_load_errors_name_the_file(custom, corrupt):
    paths, data = custom
    error, named = corrupt(paths, data)
    with pytest.raises(error) as info:
        _load(paths)
    assert named in str(info.value)
    if error is FileNotFoundError:
        assert HINT in str(info.value)


def test_error_through_registered_name(custom):
    paths, data = custom
    name = "test_custom_panoptic_loader_missing"
    _remove_png(paths, data)
    register_panoptic_dataset(name, CATEGORIES, paths["image_root"], paths["panoptic_root"],
                              paths["json_file"], prepare_hint=HINT)
    try:
        with pytest.raises(FileNotFoundError, match="000000000003.png"):
            DatasetCatalog.get(name)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_string_image_ids_are_kept_and_duplicates_rejected(tmp_path):
    """Cityscapes-style string ids survive loading (panopticapi matches ids by equality)."""
    cats = [{"id": 7, "name": "road", "isthing": 0}]
    for d in ("img", "pan"):
        (tmp_path / d).mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "a_x.jpg")
    Image.fromarray(id2rgb(np.ones((4, 4), np.int64))).save(tmp_path / "pan" / "a_x.png")
    data = {"images": [{"id": "a_x", "file_name": "a_x.jpg"}],
            "annotations": [{"image_id": "a_x", "file_name": "a_x.png",
                             "segments_info": [{"id": 1, "category_id": 7}]}],
            "categories": cats}
    (tmp_path / "p.json").write_text(json.dumps(data))
    recs = load_panoptic_json(str(tmp_path / "p.json"), str(tmp_path / "img"), str(tmp_path / "pan"), panoptic_metadata_from_categories(cats))
    assert recs[0]["image_id"] == "a_x"
    data["annotations"].append(data["annotations"][0])
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"p\.json.*second annotation"):
        load_panoptic_json(str(tmp_path / "p.json"), str(tmp_path / "img"), str(tmp_path / "pan"), panoptic_metadata_from_categories(cats))
    data["annotations"].pop()
    data["images"].append(data["images"][0])
    (tmp_path / "p.json").write_text(json.dumps(data))
    with pytest.raises(DatasetFormatError, match=r"p\.json: image id 'a_x' appears twice"):
        load_panoptic_json(str(tmp_path / "p.json"), str(tmp_path / "img"), str(tmp_path / "pan"), panoptic_metadata_from_categories(cats))
