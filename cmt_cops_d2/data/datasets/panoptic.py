"""Register a COCO-panoptic-format dataset: the one code path for the synthetic set, COCO and custom data.

A dataset in COCO panoptic format is

* a folder of RGB images,
* a folder of panoptic PNGs (segment id = R + 256 G + 256^2 B, 0 = unlabelled),
* a panoptic JSON (``images``, ``annotations`` with ``segments_info``, ``categories`` with ``isthing``),
* optionally a folder of semantic PNGs (contiguous class id per pixel, 255 = ignore), needed only by
  semantic-segmentation evaluation.

:func:`register_panoptic_dataset` registers such a dataset under a name in Detectron2's
``DatasetCatalog`` / ``MetadataCatalog`` with everything ``COCOPanopticEvaluator``, ``SemSegEvaluator``,
the mappers and the ``Visualizer`` need. :func:`load_panoptic_json` reads it into Detectron2's standard
dicts and checks the annotations while doing so: a JSON that is not UTF-8 or lacks a top-level key, a
missing key or a value of the wrong type (``"category_id": "3"``), a missing file, an unknown category
id, an image without segments or a duplicated segment id raises an error that names the file, the entry
and how to fix it. Nothing is skipped silently.
"""
import json
import numbers
import os
from typing import Callable, Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = [
    "DatasetFormatError",
    "panoptic_metadata_from_categories",
    "load_panoptic_json",
    "read_panoptic_json",
    "register_panoptic_dataset",
]


class DatasetFormatError(ValueError):
    """A dataset file is missing or does not follow the COCO panoptic format."""


def panoptic_metadata_from_categories(categories: List[dict]) -> Dict:
    """Detectron2 metadata for a list of COCO panoptic categories.

    Classes are numbered 0..K-1 in the order of ``categories`` (things and stuff in one space, as in
    Detectron2's ``coco_panoptic_standard``). ``thing_dataset_id_to_contiguous_id`` holds the things only;
    ``stuff_dataset_id_to_contiguous_id`` holds every class, so that ``SemSegEvaluator`` can map all of
    them (Mask2Former's convention). ``thing_classes`` and ``stuff_classes`` both list all K names,
    indexed by contiguous id, as the ``Visualizer`` expects.
    """
    if not isinstance(categories, (list, tuple)) or not categories:
        raise DatasetFormatError(f"the category list is empty or not a list: {categories!r}")
    for i, c in enumerate(categories):
        if not isinstance(c, dict):
            raise DatasetFormatError(f"categories[{i}] = {c!r} is not a dict with 'id', 'name' and 'isthing'")
        missing = {"id", "name", "isthing"} - set(c)
        if missing:
            raise DatasetFormatError(f"categories[{i}] = {c} lacks the key(s) {sorted(missing)}")
        if not _is_int(c["id"]):
            raise DatasetFormatError(
                f"categories[{i}] ({c['name']!r}) has \"id\": {_show(c['id'])}; it must be an integer")
        if c["isthing"] not in (0, 1):  # True / False compare equal to 1 / 0
            raise DatasetFormatError(
                f"categories[{i}] ({c['name']!r}) has \"isthing\": {_show(c['isthing'])}; it must be 1 or 0")
    ids = [c["id"] for c in categories]
    if len(set(ids)) != len(ids):
        raise DatasetFormatError(f"duplicated category ids in {ids}")
    names = [c["name"] for c in categories]
    colors = [list(c.get("color", [(37 * i) % 256, (97 * i) % 256, (173 * i) % 256]))
              for i, c in enumerate(categories)]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(categories) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {c["id"]: i for i, c in enumerate(categories)},
    }


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


_JSON_TYPES = {int: "an integer", str: "a string", float: "a number with a fraction", bool: "a boolean", list: "a list",
               dict: "an object", type(None): "null"}


def _show(value) -> str:
    """``value`` as the JSON has it, with its type: ``"3" (a string)``."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({_JSON_TYPES.get(type(value), type(value).__name__)})"


def _get(entry, key: str, where: str, check: Callable, expected: str):
    """``entry[key]``, or an error naming ``where`` and ``key`` when it is absent or fails ``check``."""
    if key not in entry:
        raise DatasetFormatError(f"{where} lacks the key \"{key}\" ({expected})")
    value = entry[key]
    if not check(value):
        raise DatasetFormatError(f"{where} has \"{key}\": {_show(value)}; it must be {expected}")
    return value


def _entries(data: dict, key: str, json_file: str):
    """(index, entry) of the top-level list ``key``; an entry that is not an object is an error."""
    for i, entry in enumerate(data[key]):
        if not isinstance(entry, dict):
            raise DatasetFormatError(f"{json_file}: {key}[{i}] is {_show(entry)}, not an object")
        yield i, entry


def read_panoptic_json(json_file: str) -> dict:
    """Read a COCO panoptic JSON: UTF-8 (or UTF-16/32), an object with the lists ``images``,
    ``annotations`` and ``categories``. Anything else raises :class:`DatasetFormatError` naming the file."""
    with open(json_file, "rb") as f:
        raw = f.read()
    try:
        data = json.loads(raw)
    except UnicodeDecodeError as e:
        bad = e.object[e.start:e.start + 1].hex()
        line = e.object[:e.start].count(b"\n") + 1
        raise DatasetFormatError(
            f"{json_file} is not UTF-8 text: byte 0x{bad} at offset {e.start} (line {line}) is not valid "
            f"{e.encoding} ({e.reason}). JSON files must be UTF-8: re-save it as UTF-8 (for a Latin-1 "
            f"file: `iconv -f latin1 -t utf-8 old.json > new.json`; from Python: json.dump to a file opened "
            f"with encoding='utf-8')"
        ) from e
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{json_file} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise DatasetFormatError(
            f"{json_file}: the top level is {_JSON_TYPES.get(type(data), type(data).__name__)}, not an object "
            "with the keys 'images', 'annotations' and 'categories': not a COCO panoptic JSON")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise DatasetFormatError(
            f"{json_file} lacks the top-level key(s) {', '.join(repr(k) for k in missing)} (it has "
            f"{sorted(data)[:10]}): not a COCO panoptic JSON, which needs 'images', 'annotations' and "
            "'categories'")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise DatasetFormatError(f"{json_file}: top-level \"{key}\" is {_show(data[key])}; it must be a list")
    return data


def _image_id_ok(value) -> bool:
    return _is_int(value) or isinstance(value, str)


def _require(path: str, what: str, hint: Optional[str]) -> None:
    if not os.path.exists(path):
        msg = f"{what} not found: {path}"
        if hint:
            msg += f"\n  {hint}"
        raise FileNotFoundError(msg)


def load_panoptic_json(
    json_file: str,
    image_root: str,
    panoptic_root: str,
    meta: Dict,
    sem_seg_root: Optional[str] = None,
    image_ext: Optional[str] = None,
    prepare_hint: Optional[str] = None,
) -> List[dict]:
    """Read a COCO panoptic JSON into Detectron2 dicts, checking it on the way.

    Args:
        json_file: the panoptic JSON.
        image_root: folder of the images. An image is looked up by the ``file_name`` of its ``images``
            entry; with ``image_ext`` set (e.g. ``".jpg"`` for COCO) by the annotation's PNG name with
            that extension instead.
        panoptic_root: folder of the panoptic PNGs named by ``annotations[i]["file_name"]``.
        meta: metadata with ``thing_dataset_id_to_contiguous_id`` and ``stuff_dataset_id_to_contiguous_id``.
        sem_seg_root: optional folder of semantic PNGs named like the panoptic PNGs.
        prepare_hint: appended to "not found" errors: the command that creates the dataset.

    Returns:
        one dict per image: ``file_name``, ``image_id``, ``height`` and ``width`` (when the ``images``
        entry has them), ``pan_seg_file_name``,
        ``segments_info`` (``id``, contiguous ``category_id``, ``isthing``, ``iscrowd``, ``area``,
        ``bbox``) and, with ``sem_seg_root``, ``sem_seg_file_name``.
    """
    _require(json_file, "panoptic JSON", prepare_hint)
    _require(image_root, "image folder", prepare_hint)
    _require(panoptic_root, "panoptic PNG folder", prepare_hint)
    if sem_seg_root is not None:
        _require(sem_seg_root, "semantic PNG folder", prepare_hint)
    data = read_panoptic_json(json_file)

    thing_map = meta["thing_dataset_id_to_contiguous_id"]
    stuff_map = meta["stuff_dataset_id_to_contiguous_id"]
    # Image ids are kept as the JSON has them (COCO: int, Cityscapes: str): panopticapi matches
    # predictions to ground truth by equality of image_id.
    images = {}
    for i, img in _entries(data, "images", json_file):
        where = f"{json_file}: images[{i}]"
        image_id = _get(img, "id", where, _image_id_ok, "an integer or a string")
        if image_ext is None:
            _get(img, "file_name", where, lambda v: isinstance(v, str) and v, "the image's file name")
        for key in ("height", "width"):
            if img.get(key) is not None:
                _get(img, key, where, lambda v: _is_int(v) and v > 0, "a positive integer (or absent)")
        if image_id in images:
            raise DatasetFormatError(f"{json_file}: image id {image_id!r} appears twice in 'images'")
        images[image_id] = img
    annotated = set()
    ret = []
    for i, ann in _entries(data, "annotations", json_file):
        image_id = _get(ann, "image_id", f"{json_file}: annotations[{i}]", _image_id_ok,
                        "an integer or a string, an id of 'images'")
        where = f"{json_file}, annotation of image_id {image_id!r}"
        if isinstance(ann.get("file_name"), str):
            where += f" ({ann['file_name']})"
        if image_id not in images:
            other = next((k for k in images if str(k) == str(image_id)), None)
            if other is not None:
                raise DatasetFormatError(
                    f"{where}: image_id is {_show(image_id)} but 'images' has the id {_show(other)}; "
                    "write the id with the same type in both")
            raise DatasetFormatError(f"{where}: image_id is not listed in 'images'")
        if image_id in annotated:
            raise DatasetFormatError(f"{where}: the image has a second annotation; merge them")
        annotated.add(image_id)
        _get(ann, "file_name", where, lambda v: isinstance(v, str) and v, "the panoptic PNG's file name")
        segments_info = _get(ann, "segments_info", where, lambda v: isinstance(v, list), "a list of segments")
        img = images[image_id]
        if image_ext is None:
            image_file = os.path.join(image_root, img["file_name"])
        else:
            image_file = os.path.join(image_root, os.path.splitext(ann["file_name"])[0] + image_ext)
        pan_file = os.path.join(panoptic_root, ann["file_name"])
        _require(image_file, f"image of image_id {image_id}", prepare_hint)
        _require(pan_file, f"panoptic PNG of image_id {image_id}", prepare_hint)
        if not segments_info:
            raise DatasetFormatError(
                f"{where}: the image has no segments. Every image needs at least one labelled segment; "
                "remove the image from the JSON or annotate it."
            )
        segments, seen = [], set()
        for k, seg in enumerate(segments_info):
            seg_where = f"{where}: segments_info[{k}]"
            if not isinstance(seg, dict):
                raise DatasetFormatError(f"{seg_where} is {_show(seg)}, not an object")
            sid = _get(seg, "id", seg_where, _is_int, "an integer segment id (R + 256 G + 256^2 B)")
            cat = _get(seg, "category_id", seg_where, _is_int,
                       "an integer, the id of one of the dataset's categories, written without quotes")
            if "iscrowd" in seg:
                _get(seg, "iscrowd", seg_where, lambda v: v in (0, 1) and not isinstance(v, float), "0 or 1")
            if sid <= 0 or sid >= 256 ** 3:
                raise DatasetFormatError(f"{where}: segment id {sid} is outside 1..2^24-1")
            if sid in seen:
                raise DatasetFormatError(f"{where}: segment id {sid} appears twice")
            seen.add(sid)
            if cat in thing_map:
                contiguous, isthing = thing_map[cat], True
            elif cat in stuff_map:
                contiguous, isthing = stuff_map[cat], False
            else:
                raise DatasetFormatError(
                    f"{where}: segment {sid} has category_id {cat}, which is not among the dataset's "
                    f"categories {sorted(stuff_map)}. Fix the annotation or add the category."
                )
            segments.append({
                "id": sid,
                "category_id": contiguous,
                "isthing": isthing,
                "iscrowd": int(seg.get("iscrowd", 0)),
                "area": seg.get("area"),
                "bbox": seg.get("bbox"),
            })
        record = {
            "file_name": image_file,
            "image_id": image_id,
            "pan_seg_file_name": pan_file,
            "segments_info": segments,
        }
        # Only when known: Detectron2 checks a record's height/width against the image, and None fails.
        if img.get("height") is not None and img.get("width") is not None:
            record["height"], record["width"] = int(img["height"]), int(img["width"])
        if sem_seg_root is not None:
            sem_file = os.path.join(sem_seg_root, ann["file_name"])
            _require(sem_file, f"semantic PNG of image_id {image_id}", prepare_hint)
            record["sem_seg_file_name"] = sem_file
        ret.append(record)
    if not ret:
        raise DatasetFormatError(f"{json_file} has no annotations")
    return ret


def register_panoptic_dataset(
    name: str,
    categories: List[dict],
    image_root: str,
    panoptic_root: str,
    panoptic_json: str,
    sem_seg_root: Optional[str] = None,
    label_divisor: int = 1000,
    ignore_label: int = 255,
    image_ext: Optional[str] = None,
    prepare_hint: Optional[str] = None,
    before_load: Optional[Callable[[], None]] = None,
    **extra_metadata,
) -> None:
    """Register a COCO-panoptic-format dataset as ``name`` (data is read lazily, on first use).

    Args:
        categories: the JSON's ``categories`` (``id``, ``name``, ``isthing``, optional ``color``);
            contiguous ids follow their order.
        label_divisor: ``category * label_divisor + instance`` encoding used by semantic+instance outputs.
        prepare_hint: shown when a file is missing, e.g. the command that builds the dataset.
        before_load: called each time before the data is read (the synthetic set generates itself here).
        extra_metadata: anything else to store in the metadata.

    Example (a custom dataset)::

        register_panoptic_dataset("my_train", categories, "data/images", "data/panoptic",
                                  "data/panoptic.json", sem_seg_root="data/semseg")
    """
    try:
        meta = panoptic_metadata_from_categories(categories)
    except DatasetFormatError as e:
        raise DatasetFormatError(f"register_panoptic_dataset({name!r}), argument categories: {e}") from e

    def load():
        if before_load is not None:
            before_load()
        return load_panoptic_json(
            panoptic_json, image_root, panoptic_root, meta, sem_seg_root, image_ext, prepare_hint
        )

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        image_root=image_root,
        panoptic_root=panoptic_root,
        panoptic_json=panoptic_json,
        sem_seg_root=sem_seg_root,
        evaluator_type="coco_panoptic_seg",
        ignore_label=ignore_label,
        label_divisor=label_divisor,
        **meta,
        **extra_metadata,
    )
