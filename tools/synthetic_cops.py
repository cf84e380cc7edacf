#!/usr/bin/env python
"""COPS on the built-in synthetic dataset over seeds: both training stages, with and without the
inference size gate.

Per seed, one run at a time (two concurrent CPU runs slow each other far more than 2x):

1. pretraining, ``configs/synthetic/cops_tiny_pretrain.yaml`` -> ``<output-dir>/pretrain_seed<s>``;
2. full training through the AMWC solver from that checkpoint, ``configs/synthetic/cops_tiny_full.yaml``
   -> ``<output-dir>/full_seed<s>``.

Each training run ends with an evaluation with the size gate on (the configs' default,
``MODEL.COPS.INFERENCE_AREA_GATE True``); the script then evaluates each final checkpoint again with
the gate off. It prints PQ / PQ_th / PQ_st as mean and spread (half the max - min range) over the seeds.

Usage::

    python tools/synthetic_cops.py --seeds 0 1 --output-dir output/cops_seeds

Finished runs and evaluations are not repeated (``gate_off.json`` in each run folder holds the gate-off
result), so an interrupted measurement continues where it stopped. A failed run stops the script with a
non-zero exit status.
"""
import argparse
import json
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from synthetic_ablation import final_pq, table_lines, train  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = os.path.join(ROOT, "configs", "synthetic", "cops_tiny_pretrain.yaml")
FULL = os.path.join(ROOT, "configs", "synthetic", "cops_tiny_full.yaml")


def train_once(config: str, out: str, seed: int, opts: List[str]) -> Dict[str, float]:
    """Train ``config`` into ``out`` unless it already holds a final result; the final PQ (gate on)."""
    result = final_pq(out)
    return result if result is not None else train(config, opts, seed, out, out)


def evaluate_without_gate(config: str, out: str) -> Dict[str, float]:
    """PQ of ``out/model_final.pth`` with ``MODEL.COPS.INFERENCE_AREA_GATE False`` (cached in
    ``out/gate_off.json``)."""
    cached = os.path.join(out, "gate_off.json")
    if os.path.exists(cached):
        with open(cached) as f:
            return json.load(f)
    from detectron2.checkpoint import DetectionCheckpointer

    from cmt_cops_d2.engine import Trainer, setup_cfg

    weights = os.path.join(out, "model_final.pth")
    cfg = setup_cfg(argparse.Namespace(config_file=config, opts=[
        "MODEL.WEIGHTS", weights, "MODEL.COPS.INFERENCE_AREA_GATE", "False", "OUTPUT_DIR",
        os.path.join(out, "gate_off")]))
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    pq = Trainer.test(cfg, model)["panoptic_seg"]
    result = {k: float(pq[k]) for k in ("PQ", "PQ_th", "PQ_st")}
    with open(cached, "w") as f:
        json.dump(result, f)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--output-dir", default=os.path.join(ROOT, "output", "cops_seeds"))
    args = p.parse_args(argv)
    rows = {name: [] for name in ("pretraining, gate on", "pretraining, gate off", "full training, gate on",
                                  "full training, gate off")}
    for seed in args.seeds:
        pre = os.path.join(args.output_dir, f"pretrain_seed{seed}")
        full = os.path.join(args.output_dir, f"full_seed{seed}")
        rows["pretraining, gate on"].append(train_once(PRETRAIN, pre, seed, []))
        rows["full training, gate on"].append(
            train_once(FULL, full, seed, ["MODEL.WEIGHTS", os.path.join(pre, "model_final.pth")]))
        rows["pretraining, gate off"].append(evaluate_without_gate(PRETRAIN, pre))
        rows["full training, gate off"].append(evaluate_without_gate(FULL, full))
        for name, results in rows.items():
            r = results[-1]
            print(f"{name}, seed {seed}: " + " ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    print(f"\nseeds {' '.join(map(str, args.seeds))} (mean +- half range)")
    print("\n".join(table_lines(list(rows.items()))))


if __name__ == "__main__":
    main()
