#!/usr/bin/env python
"""Generate the built-in synthetic panoptic dataset (COCO panoptic format), or repair a copy.

    python datasets/prepare_synthetic_panoptic.py                 # -> $DETECTRON2_DATASETS/synthetic_panoptic
    python datasets/prepare_synthetic_panoptic.py --force         # regenerate every file

Without ``--force`` an existing copy with the same parameters is checked file by file: missing files
and files whose size differs from the one recorded at generation (truncated) are regenerated, and
"already up to date" is printed only when every expected file is there.

The registered datasets ``synthetic_panoptic_{train,val}`` generate (and repair) it on first use with
the default parameters; other parameters here give a copy that the registered names do not read unless
the parameters match (use ``register_all_synthetic_panoptic`` for a custom copy).
"""
import argparse
import os
import sys
import time

sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cmt_cops_d2.data.synthetic import (  # noqa: E402
    SyntheticConfig,
    check_synthetic_panoptic,
    ensure_synthetic_panoptic,
    expected_files,
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
    p.add_argument("--force", action="store_true", help="regenerate every file, even in an intact copy")
    args = p.parse_args(argv)
    try:
        cfg = SyntheticConfig(num_train=args.num_train, num_val=args.num_val, height=args.height,
                              width=args.width, seed=args.seed)
    except ValueError as e:
        p.error(str(e))  # exit status 2, with the usage
    out = os.path.join(args.root, "synthetic_panoptic")
    start = time.time()
    if args.force:
        generate_synthetic_panoptic(out, cfg)
        what = "generated"
    else:
        current, damaged = check_synthetic_panoptic(out, cfg)
        ensure_synthetic_panoptic(out, cfg)
        if not current:
            what = "generated"
        elif damaged:
            what = f"repaired ({len(damaged)} missing or truncated file(s) regenerated, e.g. {damaged[0]})"
        else:
            what = f"already up to date (all {len(expected_files(out, cfg))} files present):"
    # Checked again: a copy that is still incomplete (e.g. a read-only folder) is an error.
    current, damaged = check_synthetic_panoptic(out, cfg)
    if not current or damaged:
        why = (f"{len(damaged)} file(s) missing or truncated, e.g. {damaged[0]}" if damaged
               else f"{os.path.join(out, 'GENERATED.json')} is missing or names other parameters")
        sys.exit(f"error: {out} is still incomplete after generation ({why}); check that the folder is "
                 "writable and has free space, then run again with --force")
    print(f"{what} {out} ({cfg.num_train} train + {cfg.num_val} val images, {cfg.height}x{cfg.width}) "
          f"in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
