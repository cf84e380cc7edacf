"""A deterministic synthetic panoptic dataset, written in COCO panoptic format.

Each image has 2-3 textured stuff regions (``sand``, ``grass``, ``water``) with smooth random boundaries
and 2-9 thing instances (``disk``, ``square``, ``triangle``, ``ring``) of widely varying size, small ones
included, placed so that many touch or occlude each other. Thing colours come from overlapping
per-class palettes, so shape matters as well as colour; shading, Gaussian noise and global colour jitter
keep the task from being trivial. Instance remnants smaller than ``MIN_THING_AREA`` pixels after
occlusion are left unlabelled (id 0, "void"), as unlabelled pixels are in COCO.

Files, under ``root`` (default ``$DETECTRON2_DATASETS/synthetic_panoptic``), mirror COCO::

    {split}2017/{image_id:06d}.jpg                RGB images
    panoptic_{split}2017/{image_id:06d}.png       panoptic PNGs, id = R + 256 G + 256^2 B (panopticapi id2rgb)
    panoptic_semseg_{split}2017/{image_id:06d}.png semantic PNGs, contiguous class id, 255 = unlabelled
    annotations/panoptic_{split}2017.json         images, annotations (segments_info), categories
    GENERATED.json                                the parameters' key and the size of every file

:func:`ensure_synthetic_panoptic` (run before each load) regenerates the copy when the parameters
changed, and only the missing or truncated files (a size that differs from ``GENERATED.json``) when not.

numpy, OpenCV, PIL and panopticapi's ``id2rgb``; no Detectron2 needed. The same (seed, split, index) always gives the same image.
"""
import hashlib
import json
import logging
import os
from typing import Dict, List, Tuple

import cv2
import numpy as np
from panopticapi.utils import id2rgb
from PIL import Image

__all__ = [
    "SYNTHETIC_CATEGORIES",
    "SyntheticConfig",
    "generate_image",
    "generate_split",
    "generate_synthetic_panoptic",
    "ensure_synthetic_panoptic",
    "check_synthetic_panoptic",
    "repair_synthetic_panoptic",
    "expected_files",
]

# Category ids are deliberately not contiguous (as in COCO), so the id maps are exercised.
SYNTHETIC_CATEGORIES: List[Dict] = [
    {"id": 1, "name": "disk", "isthing": 1, "color": [220, 20, 60], "supercategory": "shape"},
    {"id": 2, "name": "square", "isthing": 1, "color": [0, 0, 230], "supercategory": "shape"},
    {"id": 3, "name": "triangle", "isthing": 1, "color": [250, 170, 30], "supercategory": "shape"},
    {"id": 5, "name": "ring", "isthing": 1, "color": [160, 60, 220], "supercategory": "shape"},
    {"id": 11, "name": "sand", "isthing": 0, "color": [210, 190, 140], "supercategory": "ground"},
    {"id": 12, "name": "grass", "isthing": 0, "color": [70, 160, 60], "supercategory": "ground"},
    {"id": 13, "name": "water", "isthing": 0, "color": [40, 90, 200], "supercategory": "ground"},
]
THING_IDS = [c["id"] for c in SYNTHETIC_CATEGORIES if c["isthing"]]
STUFF_IDS = [c["id"] for c in SYNTHETIC_CATEGORIES if not c["isthing"]]
CONTIGUOUS = {c["id"]: i for i, c in enumerate(SYNTHETIC_CATEGORIES)}
MIN_THING_AREA = 12
# Hue centre (OpenCV hue, 0..180) of each thing class; the +-25 jitter makes neighbours overlap.
THING_HUE = {1: 0, 2: 30, 3: 60, 5: 100}
GENERATOR_VERSION = 1


class SyntheticConfig:
    """Generation parameters; ``key()`` identifies a generated copy on disk."""

    def __init__(self, num_train=500, num_val=100, height=128, width=128, seed=0,
                 min_things=2, max_things=9, min_radius=3.0, max_radius=30.0):
        self.num_train, self.num_val = int(num_train), int(num_val)
        self.height, self.width, self.seed = int(height), int(width), int(seed)
        self.min_things, self.max_things = int(min_things), int(max_things)
        self.min_radius, self.max_radius = float(min_radius), float(max_radius)
        if min(self.height, self.width) < 32:
            raise ValueError(f"synthetic images must be at least 32x32, got {self.height}x{self.width}")
        if not 1 <= self.min_things <= self.max_things:
            raise ValueError(f"need 1 <= min_things <= max_things, got {min_things}, {max_things}")

    def as_dict(self) -> Dict:
        return dict(vars(self), version=GENERATOR_VERSION)

    def key(self) -> str:
        return hashlib.sha1(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()[:12]


def _smooth_field(rng: np.random.Generator, h: int, w: int, n_waves: int = 4) -> np.ndarray:
    """A smooth random field: a sum of random low-frequency plane waves."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    out = np.zeros((h, w), np.float32)
    for _ in range(n_waves):
        theta = rng.uniform(0, 2 * np.pi)
        freq = rng.uniform(0.5, 2.0) * 2 * np.pi / max(h, w)
        phase = rng.uniform(0, 2 * np.pi)
        out += rng.uniform(0.5, 1.0) * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
    return out


def _stuff_texture(rng: np.random.Generator, cat_id: int, h: int, w: int) -> np.ndarray:
    """H x W x 3 float RGB texture of a stuff class."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.array(next(c["color"] for c in SYNTHETIC_CATEGORIES if c["id"] == cat_id), np.float32)
    base = base + rng.uniform(-25, 25, size=3)
    if cat_id == 11:  # sand: fine grain
        pattern = rng.normal(0, 14, size=(h, w))
    elif cat_id == 12:  # grass: vertical streaks
        streak = rng.normal(0, 1, size=w)
        pattern = 22 * np.tile(np.convolve(streak, np.ones(2) / 2, mode="same"), (h, 1))
        pattern += rng.normal(0, 6, size=(h, w))
    else:  # water: horizontal waves
        f = rng.uniform(0.25, 0.6)
        pattern = 25 * np.sin(f * yy + 0.6 * np.sin(0.15 * xx + rng.uniform(0, 6)))
    return base[None, None, :] + pattern[..., None].astype(np.float32)


def _thing_mask(rng: np.random.Generator, cat_id: int, cx: float, cy: float, r: float,
                h: int, w: int) -> np.ndarray:
    canvas = np.zeros((h, w), np.uint8)
    scale = 16  # sub-pixel precision for cv2 drawing
    c = (int(round(cx * scale)), int(round(cy * scale)))
    if cat_id == 1:
        cv2.circle(canvas, c, int(round(r * scale)), 1, -1, lineType=cv2.LINE_8, shift=4)
    elif cat_id == 5:
        cv2.circle(canvas, c, int(round(r * scale)), 1, -1, lineType=cv2.LINE_8, shift=4)
        cv2.circle(canvas, c, int(round(0.5 * r * scale)), 0, -1, lineType=cv2.LINE_8, shift=4)
    else:
        n = 4 if cat_id == 2 else 3
        angle = rng.uniform(0, 2 * np.pi)
        ang = angle + 2 * np.pi * np.arange(n) / n
        pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
        cv2.fillPoly(canvas, [np.round(pts * scale).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return canvas.astype(bool)


def _thing_color(rng: np.random.Generator, cat_id: int) -> np.ndarray:
    hue = (THING_HUE[cat_id] + rng.uniform(-25, 25)) % 180
    hsv = np.array([[[hue, rng.uniform(120, 255), rng.uniform(120, 255)]]], np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def generate_image(seed: int, split: str, index: int, cfg: SyntheticConfig
                   ) -> Tuple[np.ndarray, np.ndarray, List[Dict]]:
    """Generate one image.

    Returns:
        image: H x W x 3 uint8 RGB.
        pan: H x W int64 segment ids (0 = unlabelled).
        segments: COCO ``segments_info`` (id, dataset category_id, iscrowd, area, bbox [x, y, w, h]).
    """
    split_code = {"train": 0, "val": 1}.get(split, 2 + sum(map(ord, split)))
    rng = np.random.default_rng([seed, split_code, index])
    h, w = cfg.height, cfg.width

    # Stuff: 2-3 classes, regions are the argmax of smooth random fields.
    stuff = rng.choice(STUFF_IDS, size=int(rng.integers(2, 4)), replace=False)
    fields = np.stack([_smooth_field(rng, h, w) + rng.uniform(-0.5, 0.5) for _ in stuff])
    stuff_index = fields.argmax(0)
    image = np.zeros((h, w, 3), np.float32)
    for k, cat in enumerate(stuff):
        region = stuff_index == k
        image[region] = _stuff_texture(rng, int(cat), h, w)[region]

    # Segment ids: distinct random values below 2^24 (exercises id2rgb / rgb2id round trips).
    n_things = int(rng.integers(cfg.min_things, cfg.max_things + 1))
    seg_ids = rng.choice(np.arange(1, 256 ** 3), size=len(stuff) + n_things, replace=False)
    pan = np.zeros((h, w), np.int64)
    for k in range(len(stuff)):
        pan[stuff_index == k] = seg_ids[k]
    categories = {int(seg_ids[k]): int(stuff[k]) for k in range(len(stuff))}

    # Things, painted in order (later ones occlude earlier ones); about half are placed against an
    # earlier instance so that they touch or overlap.
    placed = []  # (cx, cy, r)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    log_lo, log_hi = np.log(cfg.min_radius), np.log(cfg.max_radius)
    for t in range(n_things):
        cat = int(rng.choice(THING_IDS))
        r = float(np.exp(rng.uniform(log_lo, log_hi)))
        if placed and rng.random() < 0.5:
            px, py, pr = placed[int(rng.integers(len(placed)))]
            ang = rng.uniform(0, 2 * np.pi)
            dist = (pr + r) * rng.uniform(0.6, 1.05)
            cx, cy = px + dist * np.cos(ang), py + dist * np.sin(ang)
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        mask = _thing_mask(rng, cat, cx, cy, r, h, w)
        if not mask.any():
            continue
        placed.append((cx, cy, r))
        color = _thing_color(rng, cat)
        # Linear shading across the object, as if lit from one side.
        theta = rng.uniform(0, 2 * np.pi)
        shade = 1.0 + 0.25 * ((xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)) / max(r, 1.0)
        image[mask] = color[None, :] * np.clip(shade[mask], 0.6, 1.4)[:, None]
        sid = int(seg_ids[len(stuff) + t])
        pan[mask] = sid
        categories[sid] = cat

    # Occlusion remnants too small to be objects become unlabelled.
    ids, areas = np.unique(pan, return_counts=True)
    for sid, area in zip(ids.tolist(), areas.tolist()):
        if sid and categories[sid] in THING_IDS and area < MIN_THING_AREA:
            pan[pan == sid] = 0

    # Global colour jitter and sensor noise.
    gain = rng.uniform(0.85, 1.15, size=3).astype(np.float32)
    image = (image - 128.0) * rng.uniform(0.8, 1.2) * gain + 128.0 + rng.uniform(-20, 20)
    image += rng.normal(0, rng.uniform(3, 10), size=image.shape)
    image = np.clip(image, 0, 255).astype(np.uint8)

    segments = []
    for sid in np.unique(pan).tolist():
        if sid == 0:
            continue
        ys, xs = np.nonzero(pan == sid)
        x0, y0 = int(xs.min()), int(ys.min())
        segments.append({
            "id": int(sid),
            "category_id": categories[sid],
            "iscrowd": 0,
            "area": int(len(xs)),
            "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
        })
    return image, pan, segments


def _split_dirs(root: str, split: str) -> Dict[str, str]:
    return {"image": os.path.join(root, f"{split}2017"), "pan": os.path.join(root, f"panoptic_{split}2017"),
            "sem": os.path.join(root, f"panoptic_semseg_{split}2017"),
            "json": os.path.join(root, "annotations", f"panoptic_{split}2017.json")}


def _image_files(root: str, split: str, index: int) -> Dict[str, str]:
    """The image, panoptic PNG and semantic PNG of image ``index`` of ``split``."""
    d, stem = _split_dirs(root, split), f"{index + 1:06d}"
    return {"image": os.path.join(d["image"], stem + ".jpg"), "pan": os.path.join(d["pan"], stem + ".png"),
            "sem": os.path.join(d["sem"], stem + ".png")}


def _write_image(root: str, split: str, index: int, cfg: SyntheticConfig, which=("image", "pan", "sem")
                 ) -> Tuple[Dict, Dict]:
    """Generate image ``index`` and write the files in ``which``; returns its ``images`` and
    ``annotations`` entries."""
    image, pan, segments = generate_image(cfg.seed, split, index, cfg)
    files = _image_files(root, split, index)
    if "image" in which:
        Image.fromarray(image).save(files["image"], quality=95)
    if "pan" in which:
        Image.fromarray(id2rgb(pan)).save(files["pan"])
    if "sem" in which:
        sem = np.full(pan.shape, 255, np.uint8)
        for s in segments:
            sem[pan == s["id"]] = CONTIGUOUS[s["category_id"]]
        Image.fromarray(sem).save(files["sem"])
    image_id = index + 1
    return ({"id": image_id, "file_name": os.path.basename(files["image"]), "height": cfg.height,
             "width": cfg.width},
            {"image_id": image_id, "file_name": os.path.basename(files["pan"]), "segments_info": segments})


def generate_split(root: str, split: str, num_images: int, cfg: SyntheticConfig) -> str:
    """Write one split under ``root``; returns the path of its panoptic JSON."""
    dirs = _split_dirs(root, split)
    for d in (dirs["image"], dirs["pan"], dirs["sem"], os.path.dirname(dirs["json"])):
        os.makedirs(d, exist_ok=True)
    entries = [_write_image(root, split, i, cfg) for i in range(num_images)]
    json_file = dirs["json"]
    with open(json_file + ".tmp", "w") as f:
        json.dump({"info": {"description": "cmt_cops_d2 synthetic panoptic", **cfg.as_dict()},
                   "images": [e[0] for e in entries], "annotations": [e[1] for e in entries],
                   "categories": SYNTHETIC_CATEGORIES}, f)
    os.replace(json_file + ".tmp", json_file)
    return json_file


def _marker(root: str) -> str:
    return os.path.join(root, "GENERATED.json")


def _split_sizes(cfg: SyntheticConfig) -> Dict[str, int]:
    return {"train": cfg.num_train, "val": cfg.num_val}


def expected_files(root: str, cfg: SyntheticConfig) -> List[str]:
    """Every file a complete copy of the dataset with parameters ``cfg`` has under ``root``."""
    out = []
    for split, n in _split_sizes(cfg).items():
        out.append(_split_dirs(root, split)["json"])
        for i in range(n):
            out.extend(_image_files(root, split, i).values())
    return out


def _write_marker(root: str, cfg: SyntheticConfig) -> None:
    sizes = {os.path.relpath(p, root): os.path.getsize(p) for p in expected_files(root, cfg)}
    with open(_marker(root) + ".tmp", "w") as f:
        json.dump({"key": cfg.key(), **cfg.as_dict(), "file_sizes": sizes}, f, indent=1)
    os.replace(_marker(root) + ".tmp", _marker(root))


def check_synthetic_panoptic(root: str, cfg: SyntheticConfig = None) -> Tuple[bool, List[str]]:
    """Compare the copy under ``root`` with the parameters ``cfg``.

    Returns ``(current, damaged)``: ``current`` is False when there is no copy or one made with other
    parameters; ``damaged`` lists the expected files that are missing or whose size differs from the
    one recorded at generation (a truncated file), for a current copy.
    """
    cfg = cfg or SyntheticConfig()
    try:
        with open(_marker(root)) as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False, []
    if not isinstance(marker, dict) or marker.get("key") != cfg.key():
        return False, []
    sizes = marker.get("file_sizes") or {}
    damaged = []
    for path in expected_files(root, cfg):
        try:
            size = os.path.getsize(path)
        except OSError:
            damaged.append(path)
            continue
        recorded = sizes.get(os.path.relpath(path, root))
        if recorded is not None and size != recorded:
            damaged.append(path)
    return True, damaged


def repair_synthetic_panoptic(root: str, damaged: List[str], cfg: SyntheticConfig = None) -> List[str]:
    """Regenerate the ``damaged`` files of a current copy (generation is deterministic, so the other
    files stay valid); a damaged JSON regenerates its split. Returns the files written."""
    cfg = cfg or SyntheticConfig()
    damaged = set(damaged)
    written = []
    for split, n in _split_sizes(cfg).items():
        dirs = _split_dirs(root, split)
        if dirs["json"] in damaged:
            generate_split(root, split, n, cfg)
            written.append(dirs["json"])
            written.extend(p for i in range(n) for p in _image_files(root, split, i).values())
            continue
        for d in (dirs["image"], dirs["pan"], dirs["sem"]):
            os.makedirs(d, exist_ok=True)
        for i in range(n):
            which = [k for k, p in _image_files(root, split, i).items() if p in damaged]
            if which:
                _write_image(root, split, i, cfg, which)
                written.extend(_image_files(root, split, i)[k] for k in which)
    _write_marker(root, cfg)
    return written


def generate_synthetic_panoptic(root: str, cfg: SyntheticConfig = None) -> None:
    """Generate the train and val splits under ``root`` (overwriting), then write the marker file."""
    cfg = cfg or SyntheticConfig()
    if os.path.exists(_marker(root)):
        os.remove(_marker(root))
    generate_split(root, "train", cfg.num_train, cfg)
    generate_split(root, "val", cfg.num_val, cfg)
    _write_marker(root, cfg)


def ensure_synthetic_panoptic(root: str, cfg: SyntheticConfig = None) -> bool:
    """Make the copy under ``root`` complete and current: generate it when it is absent or was made with
    other parameters; regenerate the files that are missing or truncated.

    Safe to call from several processes at once (a file lock serialises generation). Returns True if
    it wrote anything.
    """
    from iopath.common.file_io import file_lock

    cfg = cfg or SyntheticConfig()
    current, damaged = check_synthetic_panoptic(root, cfg)
    if current and not damaged:
        return False
    os.makedirs(root, exist_ok=True)
    with file_lock(os.path.join(root, "generate")):
        current, damaged = check_synthetic_panoptic(root, cfg)
        if current and not damaged:
            return False
        if not current:
            generate_synthetic_panoptic(root, cfg)
            return True
        shown = ", ".join(damaged[:3]) + (f" and {len(damaged) - 3} more" if len(damaged) > 3 else "")
        logging.getLogger(__name__).warning(
            "synthetic dataset %s: %d file(s) missing or truncated (%s); regenerating them",
            root, len(damaged), shown)
        repair_synthetic_panoptic(root, damaged, cfg)
    return True
