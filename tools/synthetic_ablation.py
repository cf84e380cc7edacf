#!/usr/bin/env python
"""CMT-DeepLab's ablation (paper Tables 2a-2c) on the built-in synthetic dataset.

Trains ``configs/synthetic/cmt_tiny.yaml`` once per row and seed, one run at a time (two concurrent
CPU runs slow each other far more than 2x), through ``tools/train_net.py``, and prints PQ / PQ_th /
PQ_st as mean and spread (half the max - min range) over the seeds. Rows, in the paper's order
(Table 2c, with Table 2a's steps on the stronger decoder):

On MaX-DeepLab-S's layout (``MaXSTransformerDecoder``: stage 5 at stride 16 with a transformer layer
after each axial block, one extra block; tiny: 2 + 1 blocks):

1. MaX-S baseline: every CMT switch off, MaX-DeepLab's instance-wise discrimination loss;
2. MaX-S + clustering update: center update, assignment residual, pixel update and the pixel-wise
   contrastive loss (Table 2c's "clustering update" = Table 2a's last row);
3. MaX-S + location: reference masks, coord-conv, mask approximation loss, no clustering update.

On the stronger decoder (cmt_tiny's 2 + 2 dual-path blocks), cumulative:

4. stronger decoder baseline: every CMT switch off, instance-wise discrimination;
5. + clustering center update (eq. 7's clustering term);
6. + assignment residual (eq. 6, between layers);
7. + pixel update (eq. 8); rows 5-7 together are Table 2a's "clustering transformer";
8. + pixel-wise contrastive loss (Table 2a, eq. 14);
9. + location: reference masks, coord-conv, mask approximation loss (Table 2b/2c) = CMT-DeepLab.

Usage::

    python tools/synthetic_ablation.py --seeds 0 1 --output-dir output/ablation

A run whose ``metrics.json`` already holds a final PQ is not trained again (``--retrain`` forces it),
so an interrupted ablation continues where it stopped. Any failed run stops the script with a non-zero
exit status.
"""
import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "cmt_tiny.yaml")
OFF = ["MODEL.CMT.USE_CLUSTER_UPDATE", "False", "MODEL.CMT.USE_ASSIGNMENT_RESIDUAL", "False",
       "MODEL.CMT.USE_PIXEL_UPDATE", "False", "MODEL.CMT.USE_REFERENCE_MASK", "False",
       "MODEL.CMT.USE_COORD_CONV", "False"]
CENTER_UPDATE = ["MODEL.CMT.USE_CLUSTER_UPDATE", "True"]
RESIDUAL = CENTER_UPDATE + ["MODEL.CMT.USE_ASSIGNMENT_RESIDUAL", "True"]
CLUSTERING = RESIDUAL + ["MODEL.CMT.USE_PIXEL_UPDATE", "True"]
INSTANCE_WISE = ["MODEL.CMT.INSDIS_TYPE", "instance"]
LOCATION = ["MODEL.CMT.USE_REFERENCE_MASK", "True", "MODEL.CMT.USE_COORD_CONV", "True"]
MAX_S = ["MODEL.CMT.TRANSFORMER_DECODER_NAME", "MaXSTransformerDecoder", "MODEL.CMT.STAGE_BLOCKS", "[2, 1]",
         "MODEL.AXIAL_RESNET.OUT_FEATURES", "['res2', 'res3', 'res4']"]
ROWS = [
    ("MaX-S baseline", MAX_S + OFF + INSTANCE_WISE),
    ("MaX-S + clustering update", MAX_S + OFF + CLUSTERING + ["MODEL.CMT.INSDIS_TYPE", "pixel"]),
    ("MaX-S + location", MAX_S + OFF + LOCATION + INSTANCE_WISE),
    ("stronger decoder baseline", OFF + INSTANCE_WISE),
    ("+ clustering center update", OFF + CENTER_UPDATE + INSTANCE_WISE),
    ("+ assignment residual", OFF + RESIDUAL + INSTANCE_WISE),
    ("+ pixel update", OFF + CLUSTERING + INSTANCE_WISE),
    ("+ pixel-wise contrastive loss", OFF + CLUSTERING + ["MODEL.CMT.INSDIS_TYPE", "pixel"]),
    ("+ location (CMT-DeepLab)", []),
]


def final_pq(output_dir: str) -> Optional[Dict[str, float]]:
    """The last ``panoptic_seg`` result in ``output_dir/metrics.json``, or None."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    found = None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e}); delete the run's folder to "
                                 "train it again") from e
            if "panoptic_seg/PQ" in record:
                found = {k: record[f"panoptic_seg/{k}"] for k in ("PQ", "PQ_th", "PQ_st")}
    return found


def run_folder(output_dir: str, name: str, seed: int) -> str:
    """``output_dir/<row name as a slug>_seed<seed>``."""
    slug = name.lower().replace("+ ", "").replace(" ", "_").replace("(", "").replace(")", "")
    return os.path.join(output_dir, f"{slug}_seed{seed}")


def train(config: str, opts: List[str], seed: int, out: str, what: str) -> Dict[str, float]:
    """``tools/train_net.py --config-file config opts SEED seed OUTPUT_DIR out`` (log in ``out.log``);
    the final PQ. A failed run or one without a result ends the script, naming ``what``."""
    cmd = [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", config,
           *opts, "SEED", str(seed), "OUTPUT_DIR", out]
    print("running:", " ".join(cmd), flush=True)
    os.makedirs(out, exist_ok=True)
    with open(out + ".log", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if code != 0:
        sys.exit(f"{what}: train_net.py exited with {code}; see {out}.log")
    result = final_pq(out)
    if result is None:
        sys.exit(f"{what}: no panoptic_seg result in {out}/metrics.json")
    return result


def run(name: str, opts: List[str], seed: int, args) -> Dict[str, float]:
    out = run_folder(args.output_dir, name, seed)
    result = None if args.retrain else final_pq(out)
    if result is None:
        iters = [] if args.iters is None else ["SOLVER.MAX_ITER", str(args.iters)]
        result = train(CONFIG, [*opts, *iters], seed, out, f"{name}, seed {seed}")
    print(f"{name}, seed {seed}: " + " ".join(f"{k} {v:.2f}" for k, v in result.items()), flush=True)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=None,
                   help="SOLVER.MAX_ITER of every run (default: the config's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--rows", type=int, nargs="+", default=list(range(1, len(ROWS) + 1)),
                   help="which rows (1-based) to run")
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output", "ablation"))
    p.add_argument("--retrain", action="store_true", help="train again even if a result exists")
    args = p.parse_args(argv)
    for r in args.rows:
        if not 1 <= r <= len(ROWS):
            p.error(f"--rows: {r} is not a row number (1..{len(ROWS)})")
    table = []
    for r in args.rows:
        name, opts = ROWS[r - 1]
        results = [run(name, opts, seed, args) for seed in args.seeds]
        table.append((name, results))
    budget = "the config's" if args.iters is None else str(args.iters)
    print(f"\n{budget} iterations, seeds {' '.join(map(str, args.seeds))} (mean +- half range)")
    print("\n".join(table_lines(table)))


def table_lines(table) -> List[str]:
    """Markdown rows ``| name | PQ | PQ_th | PQ_st | per seed PQ |`` (mean +- half the range)."""
    lines = ["| model | PQ | PQ_th | PQ_st | per seed PQ |", "| --- | --- | --- | --- | --- |"]
    for name, results in table:
        cells = []
        for k in ("PQ", "PQ_th", "PQ_st"):
            values = [res[k] for res in results]
            cells.append(f"{sum(values) / len(values):.2f} +- {(max(values) - min(values)) / 2:.2f}")
        seeds = " / ".join(f"{res['PQ']:.2f}" for res in results)
        lines.append(f"| {name} | {' | '.join(cells)} | {seeds} |")
    return lines


if __name__ == "__main__":
    main()
