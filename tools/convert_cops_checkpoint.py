#!/usr/bin/env python
"""Convert a checkpoint of the COPS authors' model (github:aabbas90/COPS, ``PanopticAffinity``) into
Detectron2 weights for this project's ``COPS`` meta-architecture.

    python tools/convert_cops_checkpoint.py model_0002999.pth cops_cityscapes.pth \\
        [--config-file configs/cityscapes/cops_r50_full.yaml] [KEY VALUE ...]

INPUT (a path, or an ``http(s)://`` URL downloaded once into a checked cache:
``cmt_cops_d2.checkpoint.download``) is a ``torch.save`` file of the authors' Detectron2 trainer: a dict with ``"model"`` (their
state dict) and possibly ``"iteration"``, ``"optimizer"``, ``"scheduler"`` (not converted). It is read
with ``torch.load(weights_only=True)``; ``--allow-pickle`` reads files that hold other pickled
objects, which runs code from the file: only for files you trust.

The weights are converted name by name (``cmt_cops_d2.checkpoint.cops``: every tensor to exactly one
of ours; the never-read ``amwc_layer.training_per_class_areas`` and the ``pixel_mean`` / ``pixel_std``
buffers are skipped and reported) and checked against the model that the config builds: strictly,
every tensor of the model covered with the same shape, or the tool stops and names the tensors.

The config is ``--config-file`` (default: ``configs/cityscapes/cops_r50_full.yaml`` for 19 classes,
``configs/coco/cops_r50_full.yaml`` for 133) with the values read from the weights applied on top
(number of classes, widths, separable decoders, per-distance edge affines, "+"-centred edge
features, a signed node-cost scale if the stored one is negative, the pixel normalisation), then the
``KEY VALUE`` overrides. The edge distances are not in the weights, only their number: for 5 or 4
classifiers (the authors' Cityscapes and COCO configs) the authors' lists are used; otherwise
``MODEL.COPS.EDGE_DISTANCES`` must come from the config or the command line, with as many entries.

OUTPUT (``torch.save``) holds the Detectron2 model-zoo fields ``model`` (CPU tensors),
``__author__`` and ``matching_heuristics: False`` (names already match), plus ``config`` (the keys
the weights need) and ``cops_source`` (what was read). Use it with ``MODEL.WEIGHTS path/to/OUTPUT.pth``
and the printed config keys.
"""
import argparse
import os
import sys

# Allow running from a source checkout without installation (sys.path[0] is tools/).
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(1, ROOT)

import torch  # noqa: E402

from cmt_cops_d2.checkpoint.cops import (  # noqa: E402
    PUBLIC_EDGE_DISTANCES,
    COPSCheckpointError,
    convert_cops_state_dict,
    cops_checkpoint_config,
    load_cops_checkpoint,
    skipped_cops_tensors,
    unit_distance_classifiers,
)
from cmt_cops_d2.checkpoint.download import cached_download, is_url  # noqa: E402

AUTHOR = "COPS authors (github:aabbas90/COPS, PanopticAffinity), converted by cmt_cops_d2"
DEFAULT_CONFIGS = {19: "configs/cityscapes/cops_r50_full.yaml", 133: "configs/coco/cops_r50_full.yaml"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="COPS authors' checkpoint (PanopticAffinity) -> Detectron2 weights of this project's COPS.",
        epilog="KEY VALUE pairs after INPUT OUTPUT override the config and the values read from the weights.")
    parser.add_argument("input", help="the authors' checkpoint (.pth, torch.save of {'model': ...})")
    parser.add_argument("output", help="output .pth (torch.save)")
    parser.add_argument("--config-file", default="", help="project config of the target model (default: "
                        "the Cityscapes or COCO full-stage config, chosen by the number of classes)")
    parser.add_argument("--allow-pickle", action="store_true", help="read INPUT with weights_only=False "
                        "(runs pickled code from the file: only for files you trust)")
    parser.add_argument("opts", nargs="*", help="config overrides, KEY VALUE pairs")
    args = parser.parse_intermixed_args(argv)
    if len(args.opts) % 2:
        parser.error(f"config overrides must be KEY VALUE pairs, got {args.opts}")
    return args


def _opt(value) -> str:
    return value if isinstance(value, str) else str(value)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) < 1e-3
        except (TypeError, ValueError):
            return False
    return a == b


def _get(cfg, key):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return list(node) if isinstance(node, tuple) else node


def load_config(config_file, opts):
    """The project config (no device check: the target model is built on the meta device)."""
    from detectron2.config import get_cfg

    from cmt_cops_d2.config import add_cmt_cops_d2_config

    cfg = get_cfg()
    add_cmt_cops_d2_config(cfg)
    if not os.path.isfile(config_file):
        raise COPSCheckpointError(f"--config-file {config_file}: no such file")
    cfg.merge_from_file(config_file)
    try:
        cfg.merge_from_list(opts)
    except AssertionError as e:   # yacs reports unknown keys this way
        raise COPSCheckpointError(f"bad config override in {opts}: {e}") from None
    cfg.freeze()
    return cfg


def build_config(args, inferred, unit):
    """``(cfg, base)``: the target config (file, then the values read from the weights, then the
    command line), and the config without the values read from the weights (to report what differs)."""
    config_file = args.config_file
    if not config_file:
        k = inferred.get("MODEL.SEM_SEG_HEAD.NUM_CLASSES")
        if k not in DEFAULT_CONFIGS:
            raise COPSCheckpointError(f"the checkpoint has {k} classes; give the project config of the target "
                                      "model with --config-file")
        config_file = os.path.join(ROOT, DEFAULT_CONFIGS[k])
    base = load_config(config_file, list(args.opts))
    user_keys = set(args.opts[0::2])
    opts = []
    for key, value in inferred.items():
        if key not in user_keys:
            opts += [key, _opt(value)]
    if "MODEL.COPS.EDGE_DISTANCES" not in inferred or "MODEL.COPS.EDGE_DISTANCES" in user_keys:
        distances = list(base.MODEL.COPS.EDGE_DISTANCES)
        if [d == 1 for d in distances] != unit:
            public = ", ".join(f"{n} classifiers: {d}" for n, d in sorted(PUBLIC_EDGE_DISTANCES.items()))
            raise COPSCheckpointError(
                f"the checkpoint has {len(unit)} edge classifiers (distance 1 at positions "
                f"{[i for i, u in enumerate(unit) if u]}), but MODEL.COPS.EDGE_DISTANCES is {distances}; give the "
                f"distances the model was trained with, e.g. MODEL.COPS.EDGE_DISTANCES \"[1, 4, 16]\" (the authors' "
                f"configs: {public}). The distances are not stored in the weights.")
    cfg = load_config(config_file, opts + list(args.opts))
    if cfg.MODEL.META_ARCHITECTURE != "COPS":
        raise COPSCheckpointError(f"{config_file}: MODEL.META_ARCHITECTURE is {cfg.MODEL.META_ARCHITECTURE!r}, "
                                  "not 'COPS'")
    return cfg, base, config_file


def target_state(cfg):
    """The target model's state dict, built on the meta device (shapes and dtypes, no memory)."""
    from cmt_cops_d2.modeling.cops.meta_arch import COPS

    with torch.device("meta"):
        model = COPS(cfg)
    return model, model.state_dict()


def main(argv=None):
    args = parse_args(argv)
    try:
        return convert(args)
    except (COPSCheckpointError, KeyError, ValueError) as e:
        sys.exit(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}")


def convert(args):
    source = args.input
    if is_url(source):  # downloaded once into the checked cache; a failure names the URL
        source = cached_download(source)
    try:
        state, extras = load_cops_checkpoint(source, allow_pickle=args.allow_pickle)
    except COPSCheckpointError as e:
        if source == args.input:
            raise
        raise COPSCheckpointError(f"{args.input} (downloaded to {source}): {e}") from e
    skipped = skipped_cops_tensors(state)
    inferred = cops_checkpoint_config(state)
    unit = unit_distance_classifiers(state)
    note = f", iteration {extras['iteration']}" if "iteration" in extras else ""
    print(f"Read {len(state)} tensors ({sum(t.numel() for t in state.values()):,} values) from {args.input}{note}.")
    for key in extras:
        if key != "iteration":
            print(f"  not converted: checkpoint entry {key!r} (training state, not model weights)")
    for name, reason in skipped.items():
        print(f"  skipped {name} {tuple(state[name].shape)}: {reason}")

    cfg, base, config_file = build_config(args, inferred, unit)
    model, model_state = target_state(cfg)
    converted = convert_cops_state_dict(state, model_state,
                                        signed_node_cost_scale=cfg.MODEL.COPS.SIGNED_NODE_COST_SCALE)
    model.load_state_dict(converted, strict=True, assign=True)   # meta model: checks names and shapes only
    filled = [k for k in converted if k.endswith("num_batches_tracked") and k not in state
              and not any(n.endswith("num_batches_tracked") for n in state)]
    count = sum(p.numel() for p in model.parameters())
    print(f"Converted into {len(converted)} tensors; they load strictly into the COPS that "
          f"{os.path.relpath(config_file)} builds with the keys below ({count:,} parameters)"
          + (f"; {len(filled)} batch-norm counters num_batches_tracked set to 0 (frozen batch norms in the "
             "checkpoint)" if filled else "") + ".")

    needed = dict(inferred)
    needed["MODEL.COPS.EDGE_DISTANCES"] = list(cfg.MODEL.COPS.EDGE_DISTANCES)
    needed.setdefault("MODEL.COPS.SIGNED_NODE_COST_SCALE", bool(cfg.MODEL.COPS.SIGNED_NODE_COST_SCALE))
    result = {
        "model": {k: v.contiguous() for k, v in converted.items()},
        "__author__": AUTHOR,
        "matching_heuristics": False,
        "config": needed,
        "cops_source": {"file": os.path.basename(args.input), "iteration": extras.get("iteration"),
                        "skipped": sorted(skipped), "not_converted": sorted(k for k in extras if k != "iteration")},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    torch.save(result, args.output)
    print(f"Wrote {args.output}")

    print("\nSet these config keys with MODEL.WEIGHTS (also stored under 'config' in the output):")
    for key, value in needed.items():
        current = _get(base, key)
        mark = "" if _same(current, value) else f"   <- your config: {current}"
        print(f"  {key} {value}{mark}")
    if "MODEL.COPS.EDGE_DISTANCES" not in inferred:
        print("  (the distances are not in the weights: the list above is the config's, with one entry per "
              "classifier of the checkpoint)")
    print("  INPUT.CROP.SIZE sets the ASPP image-pooling window (crop / 16), not stored in the weights: the "
          "authors' configs use (512, 1024) on Cityscapes and (640, 640) on COCO; yours is "
          f"{tuple(cfg.INPUT.CROP.SIZE) if cfg.INPUT.CROP.ENABLED else 'disabled (global pooling)'}")
    return result


if __name__ == "__main__":
    main()
