#!/usr/bin/env python
"""The project's GPU check, in one command: ``bash tools/gpu_check.sh`` (which calls this script).

On a CUDA machine, each check runs in its own process with a time limit, and one table is printed:

* ``train``: a few training iterations of every synthetic config on ``cuda``, in float32 and with AMP
  (``SOLVER.AMP.ENABLED``); the losses must stay finite;
* ``launch``: one iteration of ``cmt_tiny`` under ``launch`` (NCCL, one process) with SyncBN;
* ``gpu=cpu``: eval-mode outputs of CMT-DeepLab and COPS on the GPU against the CPU with the same weights
  (semantic logits within a tolerance, panoptic labels on nearly every pixel);
* ``speed``: ``tools/benchmark_model.py --device cuda`` for ``cmt_r50`` at 641 and 1281 and COPS-R50 at
  640 (network and post-processing, i.e. the AMWC solver, separately).

The exit status is non-zero if any check failed. Without CUDA it says so and exits 0 without checking
anything (``--device cpu`` runs the same checks on the CPU, AMP left out, to try the script itself).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, ROOT)

SYNTHETIC = ["panoptic_deeplab_tiny", "cmt_tiny", "cops_tiny_pretrain", "cops_tiny_full"]
MARK = "GPU_CHECK_RESULT "


def _cfg(name, device, *opts):
    from cmt_cops_d2.engine import setup_cfg

    path = os.path.join(ROOT, "configs", name if name.endswith(".yaml") else f"synthetic/{name}.yaml")
    return setup_cfg(argparse.Namespace(config_file=path, opts=["MODEL.DEVICE", device, *opts]))


def check_train(config, amp, device, iters=5):
    """A few iterations; returns seconds per iteration and the last total loss."""
    import math

    from cmt_cops_d2.engine import Trainer

    out = tempfile.mkdtemp(prefix="gpu_check_")
    cfg = _cfg(config, device, "SOLVER.MAX_ITER", str(iters), "SOLVER.AMP.ENABLED", str(amp),
               "TEST.EVAL_PERIOD", "0", "SOLVER.CHECKPOINT_PERIOD", "100000", "OUTPUT_DIR", out,
               "MODEL.WEIGHTS", "", "DATALOADER.NUM_WORKERS", "2")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - start) / iters
    loss = trainer.storage.history("total_loss").latest()
    if not math.isfinite(loss):
        raise FloatingPointError(f"total_loss {loss}")
    return f"{seconds:.3f} s/it, total_loss {loss:.3f}"


def _launch_worker(device):
    from cmt_cops_d2.engine import Trainer

    out = tempfile.mkdtemp(prefix="gpu_check_")
    cfg = _cfg("cmt_tiny", device, "SOLVER.MAX_ITER", "1", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", out,
               "MODEL.AXIAL_RESNET.NORM", "SyncBN", "MODEL.CMT.NORM", "SyncBN", "SOLVER.IMS_PER_BATCH", "2")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()


def check_launch(device):
    from cmt_cops_d2.engine import launch

    launch(_launch_worker, 1, dist_url="auto", args=(device,))
    return f"backend {'nccl' if device.startswith('cuda') else 'gloo'}, SyncBN, 1 process: one iteration"


def check_gpu_equals_cpu(config, device):
    """Same weights on CPU and ``device``; returns the largest semantic-logit difference and the share of
    pixels with the same panoptic class."""
    import copy

    import numpy as np
    import torch
    from detectron2.modeling import build_model

    cfg = _cfg(config, "cpu")
    torch.manual_seed(0)
    cpu_model = build_model(cfg).eval()
    gpu_model = copy.deepcopy(cpu_model).to(device).eval()
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.integers(0, 256, (3, 96, 128), dtype=np.uint8))
    with torch.no_grad():
        a = cpu_model([{"image": image, "height": 96, "width": 128}])[0]
        b = gpu_model([{"image": image.to(device), "height": 96, "width": 128}])[0]
    out = []
    if "sem_seg" in a:
        sa, sb = a["sem_seg"].float(), b["sem_seg"].float().cpu()
        rel = float((sa - sb).abs().max() / sa.abs().max().clamp_min(1e-12))
        out.append(f"sem_seg max rel. diff {rel:.1e}")
        if rel > 1e-2:
            raise AssertionError(f"sem_seg differs by {rel:.3g} (relative) between cpu and {device}")
    pa, pb = a["panoptic_seg"][0].cpu(), b["panoptic_seg"][0].cpu()
    ca = _pixel_classes(pa, a["panoptic_seg"][1])
    cb = _pixel_classes(pb, b["panoptic_seg"][1])
    same = float((ca == cb).float().mean())
    out.append(f"panoptic class agreement {same:.4f}")
    if same < 0.98:
        raise AssertionError(f"panoptic classes agree on only {same:.4f} of the pixels")
    return ", ".join(out)


def _pixel_classes(ids, segments):
    import torch

    cls = torch.full_like(ids, -1)
    for s in segments:
        cls[ids == s["id"]] = s["category_id"]
    return cls


def check_speed(config, sizes, device):
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark_model.py"), "--config-file",
           os.path.join(ROOT, "configs", config), "--device", device, "--no-flops", "--repeats", "3",
           "--sizes", *sizes, "MODEL.WEIGHTS", ""]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError((res.stdout + res.stderr)[-2000:])
    rows = [line.strip() for line in res.stdout.splitlines() if line.strip().split(" ")[0] in sizes]
    return " | ".join(rows)


CHECKS = {}
for _c in SYNTHETIC:
    CHECKS[f"train {_c} fp32"] = (lambda d, c=_c: check_train(c, False, d), 240)
    CHECKS[f"train {_c} amp"] = (lambda d, c=_c: check_train(c, True, d), 240)
CHECKS["launch nccl syncbn cmt_tiny"] = (check_launch, 240)
CHECKS["gpu=cpu cmt_tiny"] = (lambda d: check_gpu_equals_cpu("cmt_tiny", d), 240)
CHECKS["gpu=cpu cops_tiny_pretrain"] = (lambda d: check_gpu_equals_cpu("cops_tiny_pretrain", d), 240)
CHECKS["speed cmt_r50 (coco)"] = (lambda d: check_speed("coco/cmt_r50.yaml", ["641", "1281"], d), 400)
CHECKS["speed cops_r50 (coco)"] = (lambda d: check_speed("coco/cops_r50_full.yaml", ["640"], d), 300)


def run_one(name, device):
    fn, _ = CHECKS[name]
    try:
        detail, ok = fn(device), True
    except Exception as e:  # reported in the table; the parent sets the exit status
        detail, ok = f"{type(e).__name__}: {e}".replace("\n", " ")[:600], False
    print(MARK + json.dumps({"name": name, "ok": ok, "detail": detail}), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (a dry run)")
    p.add_argument("--only", nargs="+", default=None, help="names (or prefixes) of the checks to run")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    if args.one:
        run_one(args.one, args.device)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        print("gpu_check: no CUDA device on this machine (torch.cuda.is_available() is False); nothing "
              "was checked. Run it on a GPU machine, or with --device cpu to try the script.")
        return 0
    names = [n for n in CHECKS if not args.only or any(n.startswith(o) for o in args.only)]
    if not device.startswith("cuda"):
        names = [n for n in names if not n.endswith(" amp")]
    if device.startswith("cuda"):
        print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA "
              f"{torch.version.cuda}", flush=True)
    results = []
    for name in names:
        start = time.perf_counter()
        try:
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", name, "--device", device],
                                 capture_output=True, text=True, timeout=CHECKS[name][1])
            found = [json.loads(line[len(MARK):]) for line in res.stdout.splitlines() if line.startswith(MARK)]
            if found:
                ok, detail = found[-1]["ok"], found[-1]["detail"]
            else:
                ok, detail = False, f"exit {res.returncode}: " + (res.stderr or res.stdout)[-600:].replace("\n", " ")
        except subprocess.TimeoutExpired:
            ok, detail = False, f"timed out after {CHECKS[name][1]} s"
        seconds = time.perf_counter() - start
        results.append((name, ok, seconds, detail))
        print(f"  {'PASS' if ok else 'FAIL'} {name} ({seconds:.0f} s)", flush=True)
    print("\n| check | result | seconds | detail |\n| --- | --- | --- | --- |")
    for name, ok, seconds, detail in results:
        print(f"| {name} | {'pass' if ok else 'FAIL'} | {seconds:.0f} | {detail} |")
    failed = [r[0] for r in results if not r[1]]
    print(f"\n{len(results) - len(failed)} of {len(results)} checks passed" + (
        f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
