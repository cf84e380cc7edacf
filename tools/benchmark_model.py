#!/usr/bin/env python
"""Parameters, FLOPs, latency and peak memory of a model, with random weights.

    python tools/benchmark_model.py --config-file configs/coco/cmt_r50.yaml --sizes 641 1281
    python tools/benchmark_model.py --config-file configs/coco/cmt_r50.yaml --sizes 641 --device cuda

For each input size (square images, or ``HxW``) it reports: FLOPs of the network (fvcore, one image;
``--no-flops`` skips the count), the latency of the full model call split into the network and the
post-processing (median of ``--repeats`` runs after ``--warmup``), and the peak memory of the model
call (CUDA: the allocator's peak; CPU: the peak resident set size of a process that builds the model and
runs only that size, model weights included; each size runs in its own process because the peak RSS
only grows, and the FLOP count, whose tracing needs more memory than inference, runs after the
timing). The model runs in eval mode, batch 1, on a random image of exactly that size (no padding up
to one fixed size beyond the size divisibility).
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(1, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402

import cmt_cops_d2  # noqa: E402,F401
from cmt_cops_d2.engine import setup_cfg  # noqa: E402


def parse_size(text):
    if "x" in text:
        h, w = text.lower().split("x")
        return int(h), int(w)
    return int(text), int(text)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class SplitTimer:
    """Times the network (everything up to the model's ``inference``) and the post-processing."""

    def __init__(self, model):
        self.model, self.post = model, 0.0
        inner = model.inference

        def timed(*args, **kwargs):
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            self.post += time.perf_counter() - t
            return out

        if hasattr(model, "inference"):
            model.inference = timed


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def count_flops(model, image):
    from fvcore.nn import FlopCountAnalysis

    class Network(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            outputs = self.m.network(x) if hasattr(self.m, "network") else self.m.backbone(x)
            return outputs["pred_masks"] if isinstance(outputs, dict) and "pred_masks" in outputs \
                else list(outputs.values())[0]

    x = ((image.float() - model.pixel_mean) / model.pixel_std)[None]
    pad = getattr(model, "size_divisibility", 32) or 32
    h, w = x.shape[-2:]
    x = torch.nn.functional.pad(x, (0, (-w) % pad, 0, (-h) % pad))
    analysis = FlopCountAnalysis(Network(model), x)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    return analysis.total()


def benchmark_size(model, text, args):
    """One row of the table: GFLOPs, total / network / post-processing seconds, peak GiB."""
    h, w = parse_size(text)
    image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8, device=args.device)
    inputs = [{"image": image, "height": h, "width": w}]
    timer = SplitTimer(model)
    with torch.no_grad():
        for _ in range(args.warmup):
            model(inputs)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        totals, posts = [], []
        for _ in range(args.repeats):
            timer.post = 0.0
            sync(args.device)
            t = time.perf_counter()
            model(inputs)
            sync(args.device)
            totals.append(time.perf_counter() - t)
            posts.append(timer.post)
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak = peak_rss_bytes() / 2 ** 30
    flops = float("nan") if args.no_flops else count_flops(model, image) / 1e9
    total, post = statistics.median(totals), statistics.median(posts)
    return f"{h:>5}x{w:<5} {flops:>8.1f} {total:>8.2f} {total - post:>10.2f} {post:>7.2f} {peak:>9.2f}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config-file", required=True)
    p.add_argument("--sizes", nargs="+", default=["641", "1281"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-flops", action="store_true")
    p.add_argument("--one-size", action="store_true", help=argparse.SUPPRESS)  # child process mode
    p.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(argparse.Namespace(config_file=args.config_file,
                                       opts=["MODEL.DEVICE", args.device] + args.opts))
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    if args.one_size:
        print(benchmark_size(model, args.sizes[0], args), flush=True)
        return
    params = sum(q.numel() for q in model.parameters())
    print(f"config {args.config_file}  device {args.device}  threads {torch.get_num_threads()}")
    print(f"parameters: {params / 1e6:.2f}M")
    print(f"{'size':>11} {'GFLOPs':>8} {'total s':>8} {'network s':>10} {'post s':>7} {'peak GiB':>9}",
          flush=True)
    if args.device.startswith("cuda"):
        for text in args.sizes:
            print(benchmark_size(model, text, args), flush=True)
        return
    del model
    # CPU: one process per size, so that each peak RSS belongs to that size alone.
    for text in args.sizes:
        cmd = [sys.executable, os.path.abspath(__file__), "--one-size", "--sizes", text,
               "--config-file", args.config_file, "--device", args.device, "--repeats",
               str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        cmd += ["--no-flops"] if args.no_flops else []
        subprocess.run(cmd + list(args.opts), check=True)

if __name__ == "__main__":
    main()
