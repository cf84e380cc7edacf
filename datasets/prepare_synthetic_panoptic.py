#!/usr/bin/env python
"""Generate the built-in synthetic panoptic dataset (COCO panoptic format).

    python datasets/prepare_synthetic_panoptic.py                 # -> $DETECTRON2_DATASETS/synthetic_panoptic
    python datasets/prepare_synthetic_panoptic.py --force         # regenerate

The registered datasets ``synthetic_panoptic_{train,val}`` generate it on first use with the default
parameters; other parameters here give a copy that the registered names do not read unless the
parameters match (use ``register_all_synthetic_panoptic`` for a custom copy).
"""
import argparse
import os
import sys
import time

sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cmt_cops_d2.data.synthetic import (  # noqa: E402
    SyntheticConfig,
    ensure_synthetic_panoptic,
    generate_synthetic_panoptic,
)


def main(argv=None):
    default = SyntheticConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=os.getenv("DETECTRON2_DATASETS", "datasets"),
                   help="dataset root (default: $DETECTRON2_DATASETS or ./datasets)")
    p.add_argument("--num-train", type=int, default=default.num_train)
    p.add_argument("--num-val", type=int, default=default.num_val)
    p.add_argument("--height", type=int, default=default.height)
    p.add_argument("--width", type=int, default=default.width)
    p.add_argument("--seed", type=int, default=default.seed)
    p.add_argument("--force", action="store_true", help="regenerate even if an up-to-date copy exists")
    args = p.parse_args(argv)
    cfg = SyntheticConfig(num_train=args.num_train, num_val=args.num_val, height=args.height,
                          width=args.width, seed=args.seed)
    out = os.path.join(args.root, "synthetic_panoptic")
    start = time.time()
    if args.force:
        generate_synthetic_panoptic(out, cfg)
        made = True
    else:
        made = ensure_synthetic_panoptic(out, cfg)
    print(f"{'generated' if made else 'already up to date:'} {out} "
          f"({cfg.num_train} train + {cfg.num_val} val images, {cfg.height}x{cfg.width}) "
          f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
