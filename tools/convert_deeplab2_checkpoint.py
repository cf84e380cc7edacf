#!/usr/bin/env python
"""Convert a DeepLab2 Axial-ResNet checkpoint (TensorFlow) into Detectron2 weights for this project's
Axial-ResNet backbone. TensorFlow is not needed.

    python tools/convert_deeplab2_checkpoint.py maxs_gelu_imagenet_22k_1k_224.tar.gz maxs_gelu.pth \\
        --activation gelu [--config-file configs/coco/cmt_r50.yaml] [KEY VALUE ...]

INPUT is a published ``.tar.gz`` (a path or an ``http(s)://`` URL, downloaded once into a checked
cache: ``cmt_cops_d2.checkpoint.download``), a folder holding one checkpoint, a checkpoint prefix
(``.../ckpt-123``) or its ``.index`` file. DeepLab2's ImageNet backbones for this model are
"Axial-ResNet-50 (MaX-S w/ GeLU)", ImageNet-22K+1K (``--activation gelu``), and
"MaX-DeepLab-S-Backbone (MaX-S w/ ReLU)", ImageNet-1K (``--activation relu``).

OUTPUT ``.pth`` (``torch.save``) or ``.pkl`` (pickle of numpy arrays) holds the Detectron2 model-zoo
fields: ``model`` (``backbone.*`` keys, the prefix of the backbone in Detectron2
meta-architectures; ``--prefix`` sets others, e.g. ``--prefix backbone. --prefix
sem_seg_head.backbone2.`` for ``MODEL.CMT.RFN``), ``__author__`` and ``matching_heuristics``. It also
holds ``config``, the config values the weights need. Use it with
``MODEL.WEIGHTS path/to/OUTPUT.pth`` and the printed config keys. The batch-norm epsilon
(``MODEL.AXIAL_RESNET.BN_EPS 0.001``) and the activation cannot be read from the weights; the pixel
normalisation is DeepLab2's ``rgb / 127.5 - 1``.

Every encoder variable must land on exactly one backbone tensor of the same shape. The target is the
backbone that ``--config-file`` (plus ``KEY VALUE`` overrides) builds, or, without a config, the
architecture read from the checkpoint. Optimizer state, step and save counters are skipped and
reported. ``--skip REGEX`` leaves out more on purpose. With a MaX-S config
(``configs/coco/max_deeplab_s.yaml``: the backbone stops at res4 and stage 5 is built by the
decoder), stage 5's blocks are placed in the decoder's dual-path blocks.
"""
import argparse
import os
import pickle
import sys
from collections import Counter

# Allow running from a source checkout without installation (sys.path[0] is tools/).
sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from cmt_cops_d2.checkpoint.deeplab2 import (  # noqa: E402
    DEEPLAB2_BN_EPS,
    convert_deeplab2_axial_resnet,
    deeplab2_axial_resnet_config,
    encoder_root,
    move_res5_into_maxs_decoder,
    skipped_deeplab2_variables,
)
from cmt_cops_d2.checkpoint.download import cached_download, is_url  # noqa: E402
from cmt_cops_d2.checkpoint.tf_checkpoint import TFCheckpointError, read_tf_checkpoint  # noqa: E402

AUTHOR = "DeepLab2 (google-research/deeplab2), converted by cmt_cops_d2"
PIXEL_CONFIG = {"MODEL.PIXEL_MEAN": [127.5, 127.5, 127.5], "MODEL.PIXEL_STD": [127.5, 127.5, 127.5],
                "INPUT.FORMAT": "RGB"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="DeepLab2 Axial-ResNet checkpoint -> Detectron2 weights (no TensorFlow).",
        epilog="KEY VALUE pairs after INPUT OUTPUT override --config-file.")
    parser.add_argument("input", help=".tar.gz, folder, checkpoint prefix or .index file")
    parser.add_argument("output", help="output .pth (torch.save) or .pkl (pickle of numpy arrays)")
    parser.add_argument("--config-file", default="", help="project config whose backbone the weights "
                        "must fit (default: the architecture read from the checkpoint)")
    parser.add_argument("--activation", choices=["gelu", "relu"], default=None,
                        help="the checkpoint's activation, recorded in the output (MaX-S w/ GeLU: "
                        "gelu; MaX-S w/ ReLU: relu)")
    parser.add_argument("--prefix", action="append", default=None,
                        help="key prefix of the backbone in the model (repeatable; default backbone.)")
    parser.add_argument("--skip", action="append", default=[], metavar="REGEX",
                        help="leave out checkpoint variables matching REGEX (repeatable)")
    parser.add_argument("--no-verify-crc", action="store_true", help="skip the CRC-32C checks")
    parser.add_argument("opts", nargs="*", help="config overrides, KEY VALUE pairs")
    return parser.parse_intermixed_args(argv)


def target_backbone_state(args, inferred):
    """Shapes of the backbone the weights must fit (built on the meta device: no memory, no init)
    and the config values it was built with."""
    from detectron2.layers import ShapeSpec

    from cmt_cops_d2.modeling.backbone import AxialResNet

    if args.config_file or args.opts:
        from detectron2.config import get_cfg

        from cmt_cops_d2.config import add_cmt_cops_d2_config

        cfg = get_cfg()
        add_cmt_cops_d2_config(cfg)
        if args.config_file:
            cfg.merge_from_file(args.config_file)
        cfg.merge_from_list(args.opts)
        if cfg.MODEL.BACKBONE.NAME != "build_axial_resnet_backbone":
            sys.exit(f"{args.config_file}: MODEL.BACKBONE.NAME is {cfg.MODEL.BACKBONE.NAME!r}, not "
                     "'build_axial_resnet_backbone'; these weights are for the Axial-ResNet")
        maxs = (cfg.MODEL.META_ARCHITECTURE == "CMTDeepLab"
                and cfg.MODEL.CMT.TRANSFORMER_DECODER_NAME == "MaXSTransformerDecoder")
        if maxs:  # stage 5 lives in the decoder: convert the backbone's res5 (stride 16), then move it
            from detectron2.modeling import META_ARCH_REGISTRY

            with torch.device("meta"):
                full_state = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)(cfg).state_dict()
            cfg = cfg.clone()
            cfg.MODEL.AXIAL_RESNET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
            cfg.MODEL.AXIAL_RESNET.RES5_DILATION = 2
        with torch.device("meta"):
            model = AxialResNet(cfg, ShapeSpec(channels=len(cfg.MODEL.PIXEL_MEAN)))
        used = {k: cfg.MODEL.AXIAL_RESNET[k] for k in list(inferred) + ["ACTIVATION"]}
        if maxs:
            used["maxs_model_state"] = full_state
    else:
        with torch.device("meta"):
            model = AxialResNet(
                depths=inferred["DEPTHS"], stem_width=inferred["STEM_WIDTH"],
                base_width=inferred["BASE_WIDTH"], axial_stages=inferred["AXIAL_STAGES"],
                attention_bottleneck_expansion=inferred.get("ATTENTION_BOTTLENECK_EXPANSION", 2.0),
                key_expansion=inferred.get("KEY_EXPANSION", 1.0),
                value_expansion=inferred.get("VALUE_EXPANSION", 2.0),
                num_heads=inferred.get("NUM_HEADS", 8), max_span=inferred.get("MAX_SPAN", 255),
                norm="BN", activation=args.activation or "gelu", bn_eps=DEEPLAB2_BN_EPS)
        used = dict(inferred)
    return model.state_dict(), used


def read_checkpoint(source: str, verify_crc: bool):
    """The TF variables of ``source``, a path or a URL (downloaded through the checked cache; a
    download or read failure names the URL)."""
    if not is_url(source):
        return read_tf_checkpoint(source, verify_crc=verify_crc)
    local = cached_download(source)
    try:
        return read_tf_checkpoint(local, verify_crc=verify_crc)
    except TFCheckpointError as e:
        raise TFCheckpointError(f"{source} (downloaded to {local}): {e}") from e


def main(argv=None):
    args = parse_args(argv)
    prefixes = args.prefix or ["backbone."]
    tf_vars = read_checkpoint(args.input, verify_crc=not args.no_verify_crc)
    skipped = skipped_deeplab2_variables(tf_vars, args.skip)
    kept = {k: v for k, v in tf_vars.items() if k not in skipped}
    root = encoder_root(kept)
    inferred = deeplab2_axial_resnet_config(tf_vars)
    print(f"Read {len(tf_vars)} tensors from {args.input}; backbone under {root!r}.")
    for reason, count in Counter(skipped.values()).most_common():
        print(f"  skipped {count:4d}: {reason}")

    state, used = target_backbone_state(args, inferred)
    maxs_state = used.pop("maxs_model_state", None)
    model = {}
    for prefix in prefixes:
        model.update(convert_deeplab2_axial_resnet(kept, model_state=state, prefix=prefix))
    if maxs_state is not None:
        model = move_res5_into_maxs_decoder(model, prefixes[0])
        wrong = [k for k, v in model.items() if k not in maxs_state or tuple(maxs_state[k].shape) != tuple(v.shape)]
        if wrong:
            raise ValueError(f"{len(wrong)} converted tensors do not fit the MaX-S model of {args.config_file}: "
                             + ", ".join(wrong[:10]))
        print("MaX-S layout (MaXSTransformerDecoder): the backbone's res5 blocks go to the axial halves of "
              "sem_seg_head.transformer_decoder.stage5")
    print(f"Converted {len(kept)} variables into {len(model)} tensors "
          f"({sum(t.numel() for t in model.values()):,} values) under {', '.join(prefixes)}")

    config = {f"MODEL.AXIAL_RESNET.{k}": v for k, v in inferred.items()}
    if args.activation:
        config["MODEL.AXIAL_RESNET.ACTIVATION"] = args.activation
    config.update(PIXEL_CONFIG)
    if args.config_file or args.opts:
        for key, value in inferred.items():
            if key != "BN_EPS" and used[key] != value and not (
                    isinstance(value, float) and abs(used[key] - value) < 1e-9):
                print(f"  note: the config has MODEL.AXIAL_RESNET.{key} {used[key]}, the checkpoint "
                      f"was built with {value} (the shapes still fit)")
    result = {"model": model, "__author__": AUTHOR, "matching_heuristics": True, "config": config,
              "deeplab2": {"source": os.path.basename(os.path.normpath(args.input)),
                           "encoder_root": root, "skipped": dict(Counter(skipped.values()))}}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.output.endswith(".pkl"):
        result["model"] = {k: v.numpy() for k, v in model.items()}
        with open(args.output, "wb") as f:
            pickle.dump(result, f)
    else:
        torch.save(result, args.output)
    print(f"Wrote {args.output}")

    print("\nThe weights need these config values (also stored under 'config' in the output):")
    from_config = bool(args.config_file or args.opts)

    def show(key, value, current=None):
        note = f"  (your config: {current})" if from_config and current != value else ""
        print(f"  {key} {value}{note}")

    show("MODEL.AXIAL_RESNET.BN_EPS", DEEPLAB2_BN_EPS, used.get("BN_EPS"))
    if args.activation:
        show("MODEL.AXIAL_RESNET.ACTIVATION", args.activation, used.get("ACTIVATION"))
    else:
        print("  MODEL.AXIAL_RESNET.ACTIVATION gelu | relu  (not in the weights: 'gelu' for "
              "MaX-S w/ GeLU, 'relu' for MaX-S w/ ReLU; --activation records it)")
    for key, value in PIXEL_CONFIG.items():
        print(f"  {key} {value}")
    if not from_config:
        print("  and the architecture: " + " ".join(
            f"MODEL.AXIAL_RESNET.{k} {v}" for k, v in inferred.items() if k != "BN_EPS"))
    return result


if __name__ == "__main__":
    main()
