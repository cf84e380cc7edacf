"""PQ evaluation that checks its ground truth first.

``COCOPanopticEvaluator`` hands the dataset's ``panoptic_json`` and the PNGs under ``panoptic_root`` to
panopticapi, which drops a PNG segment missing from the JSON, counts a JSON segment without pixels as a
miss, and crashes on a grayscale or wrong-size PNG. :func:`validate_panoptic_ground_truth` checks every
file panopticapi will read, with the checks the training mappers apply
(:mod:`cmt_cops_d2.data.mappers.panoptic_io`), and raises one error listing the problems.
:class:`CheckedCOCOPanopticEvaluator` runs it before inference, once per dataset and process.
"""
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOPanopticEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from PIL import Image

from ..data.datasets.panoptic import DatasetFormatError
from ..data.mappers.panoptic_io import check_panoptic_file

__all__ = ["CheckedCOCOPanopticEvaluator", "validate_panoptic_ground_truth"]

logger = logging.getLogger(__name__)

# (dataset name, JSON path, PNG folder, JSON mtime, JSON size) -> summary of a passed validation.
_VALIDATED: Dict[tuple, dict] = {}
_MAX_LISTED = 10          # problems quoted in the error message
_EXIF_ORIENTATION = 0x0112


def _image_size(path: str) -> Tuple[int, int]:
    """(height, width) of an image as Detectron2's ``read_image`` returns it, from the header only."""
    with PathManager.open(path, "rb") as f:
        image = Image.open(f)
        width, height = image.size
        try:
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # Detectron2 ignores unreadable EXIF data too
            orientation = 1
    return (width, height) if orientation in (5, 6, 7, 8) else (height, width)


def _metadata_path(dataset_name: str, key: str) -> str:
    value = getattr(MetadataCatalog.get(dataset_name), key, None)
    if not value:
        raise KeyError(
            f"metadata of dataset {dataset_name!r} has no {key!r}: COCOPanopticEvaluator reads the ground "
            "truth from 'panoptic_json' and 'panoptic_root'. Set both when registering the dataset "
            "(see datasets/README.md)."
        )
    local = PathManager.get_local_path(value)
    if not os.path.exists(local):
        raise FileNotFoundError(f"metadata {key}={value!r} of dataset {dataset_name!r}: not found")
    return local


def _annotation_jobs(dataset_name: str, gt: dict, json_file: str, panoptic_root: str,
                     records: List[dict]) -> Tuple[List[dict], List[str]]:
    """Check the GT JSON against the metadata and the dataset's records; one PNG job per annotation.

    Returns (jobs, problems); annotations with a problem get no job.
    """
    meta = MetadataCatalog.get(dataset_name)
    known = set(meta.thing_dataset_id_to_contiguous_id) | set(meta.stuff_dataset_id_to_contiguous_id)
    if not isinstance(gt, dict):
        return [], [f"{json_file} is not a COCO panoptic JSON (an object with 'annotations' and 'categories')"]
    problems = [f"{json_file} has no {key!r} list, which panopticapi reads"
                for key in ("annotations", "categories") if not isinstance(gt.get(key), list)]
    if problems:
        return [], problems
    problems = [f"{json_file}: category {c} has no 'id' or no 'isthing', which panopticapi reads"
                for c in gt["categories"] if not isinstance(c, dict) or "id" not in c or "isthing" not in c]
    if problems:
        return [], problems
    json_categories = {c["id"] for c in gt["categories"]}
    unlisted = sorted(known - json_categories)
    if unlisted:
        logger.warning(f"{json_file}: categories {unlisted} of the metadata of dataset {dataset_name!r} are "
                       "not in the JSON's 'categories'; a prediction of one of them makes panopticapi fail")
    by_id = {r["image_id"]: r for r in records}
    seen_images = set()
    jobs = []
    for ann in gt["annotations"]:
        image_id, png = ann.get("image_id"), ann.get("file_name")
        where = f"{json_file}, annotation of image_id {image_id!r} ({png})"
        missing = [k for k in ("image_id", "file_name", "segments_info") if k not in ann]
        if missing:
            problems.append(f"{where}: no {missing} key(s)")
            continue
        if image_id in seen_images:
            problems.append(f"{where}: a second annotation of the same image (panopticapi would score it twice)")
            continue
        seen_images.add(image_id)
        if image_id not in by_id:
            problems.append(f"{where}: the image is not among the records of dataset {dataset_name!r}, so it "
                            "gets no prediction (panopticapi stops with 'no prediction for the image')")
            continue
        bad, ids, areas = [], set(), {}
        for seg in ann["segments_info"]:
            sid = seg.get("id")
            lacks = [k for k in ("id", "category_id", "iscrowd", "area") if k not in seg]
            if lacks:
                bad.append(f"segment {sid}: no {lacks} key(s), which panopticapi reads")
            elif not isinstance(sid, int) or not 0 < sid < 256 ** 3:
                bad.append(f"segment id {sid!r} is not an integer in 1..2^24-1")
            elif sid in ids:
                bad.append(f"segment id {sid} appears twice")
            elif seg["category_id"] not in json_categories:
                bad.append(f"segment {sid} has category_id {seg['category_id']}, which the JSON's "
                           "'categories' do not list (panopticapi would leave it out of PQ)")
            elif seg["category_id"] not in known:
                bad.append(f"segment {sid} has category_id {seg['category_id']}, which is not among the "
                           f"categories of dataset {dataset_name!r}'s metadata {sorted(known)}")
            else:
                ids.add(sid)
                areas[sid] = seg["area"]
        if bad:
            problems.extend(f"{where}: {b}" for b in bad)
            continue
        record = by_id[image_id]
        job = {"pan_seg_file_name": os.path.join(panoptic_root, png), "image_id": image_id,
               "segments_info": [{"id": sid} for sid in ids], "areas": areas,
               "file_name": record["file_name"]}
        if "height" in record and "width" in record:
            job["height"], job["width"] = record["height"], record["width"]
        jobs.append(job)
    images = gt.get("images") if isinstance(gt.get("images"), list) else []
    unannotated = [im for im in images if im.get("id") not in seen_images]
    for im in unannotated[:_MAX_LISTED]:
        problems.append(f"{json_file}: 'images' lists image_id {im.get('id')!r} ({im.get('file_name')}) but "
                        "'annotations' has none, so the image is neither predicted nor scored; annotate it "
                        "or remove it from 'images'")
    for image_id in sorted(set(by_id) - seen_images, key=str)[:_MAX_LISTED]:
        problems.append(f"{json_file}: dataset {dataset_name!r} has image_id {image_id!r} "
                        f"({by_id[image_id]['file_name']}) but the JSON has no annotation of it: its "
                        "prediction would not be scored")
    return jobs, problems


def _check_job(job: dict) -> Tuple[Optional[str], List[tuple]]:
    """Check one PNG; returns (problem or None, [(png, segment id, JSON area, pixel count)])."""
    png = job["pan_seg_file_name"]
    try:
        if "height" not in job:
            job["height"], job["width"] = _image_size(job["file_name"])
    except Exception as e:
        return f"cannot read the size of image {job['file_name']}: {type(e).__name__}: {e}", []
    try:
        pixels = check_panoptic_file(job)
    except FileNotFoundError:
        return f"panoptic PNG of image_id {job['image_id']!r} not found: {png}", []
    except ValueError as e:
        return str(e), []
    wrong = [(png, sid, area, pixels[sid]) for sid, area in job["areas"].items() if area != pixels[sid]]
    return None, wrong


def validate_panoptic_ground_truth(dataset_name: str, num_threads: Optional[int] = None) -> dict:
    """Check the PQ ground truth of ``dataset_name``: its ``panoptic_json`` and every PNG under
    ``panoptic_root``, as panopticapi will read them.

    Checked: the JSON parses and has ``annotations`` and ``categories`` (each with ``id`` and
    ``isthing``); one annotation per image of
    ``images`` and of the dataset's records; every segment has ``id``, ``category_id``, ``iscrowd`` and
    ``area``, a unique id in 1..2^24-1 and a category of both the JSON and the metadata; every PNG
    decodes, is RGB, has the image's height and width, and holds exactly the JSON's segment ids (each
    with at least one pixel). A JSON ``area`` that differs from the pixel count is logged as a warning
    (panopticapi uses the JSON's value).

    In a multi-process run every process must call it (each checks a share of the PNGs). A passed
    validation is remembered for the process until the JSON file changes.

    Returns:
        ``{"images": N, "seconds": T, "area_mismatches": M}``.

    Raises:
        DatasetFormatError listing the problems (each naming the JSON or PNG and the segment id).
    """
    json_file = _metadata_path(dataset_name, "panoptic_json")
    panoptic_root = _metadata_path(dataset_name, "panoptic_root")
    stat = os.stat(json_file)
    key = (dataset_name, os.path.abspath(json_file), os.path.abspath(panoptic_root), stat.st_mtime_ns,
           stat.st_size)
    if key in _VALIDATED:
        return _VALIDATED[key]
    start = time.perf_counter()
    try:
        with open(json_file) as f:
            gt = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetFormatError(f"{json_file} (panoptic_json of dataset {dataset_name!r}) is not valid "
                                 f"JSON: {e}") from e
    jobs, problems = _annotation_jobs(dataset_name, gt, json_file, panoptic_root,
                                      DatasetCatalog.get(dataset_name))
    rank, world = comm.get_rank(), comm.get_world_size()
    if num_threads is None:
        num_threads = min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    with ThreadPoolExecutor(max(1, num_threads)) as pool:
        results = list(pool.map(_check_job, jobs[rank::world]))
    png_problems = [p for p, _ in results if p]
    wrong_areas = [w for _, ws in results for w in ws]
    if world > 1:
        gathered = comm.all_gather((png_problems, wrong_areas))
        png_problems = [p for g in gathered for p in g[0]]
        wrong_areas = [w for g in gathered for w in g[1]]
    problems += png_problems
    if problems:
        listed = "\n  ".join(problems[:_MAX_LISTED])
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise DatasetFormatError(
            f"the PQ ground truth of dataset {dataset_name!r} (panoptic_json={json_file}, "
            f"panoptic_root={panoptic_root}) has {len(problems)} problem(s); PQ would be wrong or "
            f"panopticapi would fail. Fix the files (or regenerate the dataset):\n  {listed}{more}"
        )
    if wrong_areas:
        shown = "; ".join(f"{png} segment {sid}: area {a} in the JSON, {n} pixels" for png, sid, a, n in
                          wrong_areas[:5])
        logger.warning(f"{json_file}: {len(wrong_areas)} segment(s) have a JSON 'area' that differs from "
                       f"their pixel count, and panopticapi uses the JSON's value for IoU: {shown}")
    seconds = time.perf_counter() - start
    summary = {"images": len(jobs), "seconds": seconds, "area_mismatches": len(wrong_areas)}
    logger.info(f"checked the PQ ground truth of {dataset_name!r}: {len(jobs)} PNG(s) in {seconds:.2f} s")
    _VALIDATED[key] = summary
    return summary


class CheckedCOCOPanopticEvaluator(COCOPanopticEvaluator):
    """``COCOPanopticEvaluator`` that validates its ground truth (:func:`validate_panoptic_ground_truth`)
    when built, before any inference, and again (normally a cache hit) before scoring."""

    def __init__(self, dataset_name: str, output_dir: Optional[str] = None):
        self._dataset_name = dataset_name
        validate_panoptic_ground_truth(dataset_name)
        super().__init__(dataset_name, output_dir)

    def evaluate(self):
        validate_panoptic_ground_truth(self._dataset_name)
        return super().evaluate()
