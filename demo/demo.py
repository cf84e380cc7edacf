#!/usr/bin/env python
"""Run a trained model on images and draw the panoptic result (Detectron2's Visualizer).

    python demo/demo.py --config-file configs/synthetic/panoptic_deeplab_tiny.yaml \
        --input img1.jpg "folder/*.png" --output out/ \
        --opts MODEL.WEIGHTS output/panoptic_deeplab_tiny/model_final.pth

Each output image shows the input with every segment coloured and labelled ("ring", "sand", ...).
Runs on CPU with ``MODEL.DEVICE cpu`` (the synthetic configs' default).

Errors: a missing config file, an ``--input`` pattern that matches no file and an ``--output`` folder
that cannot be created stop the demo before the model is built (exit status 2, the path named). An
input that cannot be read (corrupt, truncated, not an image) is reported by name and skipped; the
other images are still drawn, and the demo ends with exit status 1 and the list of the failed files.
An error of the model itself stops the demo at once, naming the image.
"""
import argparse
import glob
import os
import sys
import time

sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.engine import DefaultPredictor  # noqa: E402
from detectron2.utils.visualizer import ColorMode, Visualizer  # noqa: E402
from PIL import Image  # noqa: E402

import cmt_cops_d2  # noqa: E402,F401
from cmt_cops_d2.checkpoint.fit import FitPolicy  # noqa: E402
from cmt_cops_d2.data.mappers import read_image_checked  # noqa: E402
from cmt_cops_d2.engine import load_weights, setup_cfg  # noqa: E402


def expand_inputs(patterns):
    """The files matched by ``patterns`` (paths or globs); a pattern matching nothing is an error."""
    files = []
    for pattern in patterns:
        matched = sorted(glob.glob(os.path.expanduser(pattern)))
        if not matched:
            raise FileNotFoundError(f"--input {pattern!r} matches no file")
        files.extend(matched)
    return files


def draw_panoptic(image_rgb: np.ndarray, predictions: dict, metadata) -> np.ndarray:
    """RGB image with the panoptic prediction drawn on it."""
    if "panoptic_seg" not in predictions:
        raise ValueError(f"the model returned {sorted(predictions)}; expected 'panoptic_seg'")
    pan, segments_info = predictions["panoptic_seg"]
    vis = Visualizer(image_rgb, metadata, instance_mode=ColorMode.IMAGE)
    return vis.draw_panoptic_seg(pan.to("cpu"), segments_info).get_image()


def build_predictor(cfg) -> DefaultPredictor:
    """Detectron2's ``DefaultPredictor`` whose weights come through ``load_weights``: a URL through the
    checked cache, and an error naming ``MODEL.WEIGHTS`` for a missing file or one that does not fit
    the model (``MODEL.WEIGHTS_PARTIAL``, ``MODEL.WEIGHTS_MIN_LOADED``)."""
    bare = cfg.clone()
    bare.defrost()
    bare.MODEL.WEIGHTS = ""  # DefaultPredictor then loads nothing; the checked load follows
    bare.freeze()
    predictor = DefaultPredictor(bare)
    load_weights(DetectionCheckpointer(predictor.model), cfg.MODEL.WEIGHTS, resume=False,
                 policy=FitPolicy.from_config(cfg))
    predictor.cfg = cfg.clone()
    return predictor


def check_output_folder(path: str) -> None:
    """Check that the folder ``path`` exists or can be created (without creating it); raise ``OSError``
    naming it otherwise."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise OSError(f"--output {path!r} is a file, not a folder; name a folder")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OSError(f"--output {path!r} cannot be created: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == os.path.abspath(path) else f"cannot be created in {existing}"
        raise OSError(f"--output {path!r} {what}: permission denied")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--input", nargs="+", required=True, help="image files or glob patterns")
    p.add_argument("--output", required=True, help="output folder")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    # Argument checks first, before the (slow) model is built: each exits with status 2.
    if not os.path.isfile(args.config_file):
        p.error(f"--config-file {args.config_file!r}: no such file")
    try:
        inputs = expand_inputs(args.input)
        check_output_folder(args.output)
    except OSError as e:
        p.error(str(e))
    cfg = setup_cfg(argparse.Namespace(config_file=args.config_file, opts=args.opts))
    if not cfg.MODEL.WEIGHTS:
        print("warning: MODEL.WEIGHTS is empty, drawing the output of an untrained model",
              file=sys.stderr)
    predictor = build_predictor(cfg)
    metadata = MetadataCatalog.get(cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "__unused")
    try:
        os.makedirs(args.output, exist_ok=True)
    except OSError as e:
        p.error(f"--output {args.output!r} cannot be created: {e}")
    failed = []
    for path in inputs:
        try:
            image = read_image_checked({"file_name": path}, "BGR")
        except (OSError, ValueError) as e:  # the input's own problem: report it, go on with the next
            message = str(e) if path in str(e) else f"cannot read image {path}: {e}"
            print(f"error: {message}; skipped", file=sys.stderr)
            failed.append((path, message))
            continue
        start = time.time()
        try:
            with torch.no_grad():
                predictions = predictor(image)
            drawn = draw_panoptic(image[:, :, ::-1], predictions, metadata)
        except Exception as e:
            e.add_note(f"while running the model on {path}")
            raise
        out = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + "_panoptic.png")
        Image.fromarray(drawn).save(out)
        print(f"{path}: {time.time() - start:.2f} s -> {out}")
    if failed:
        sys.exit(f"error: {len(failed)} of {len(inputs)} input(s) could not be read and were skipped:\n"
                 + "\n".join(f"  {message}" for _, message in failed))


if __name__ == "__main__":
    main()
