#!/usr/bin/env bash
# Prepare what tools/gpu_check.sh needs on a GPU machine that has PyTorch but no network and none of
# this project's other dependencies (the device machines lent to this project: Python 3.12, torch with
# CUDA, numpy, scipy, numba, OpenCV, Pillow preinstalled). Run here, after tools/install.sh:
#
#     bash tools/prepare_gpu_check.sh
#
# It fills .gpu_deps/ (git-ignored): site/ with the pure-Python packages copied from .venv (Detectron2
# with its stand-in _C, fvcore, iopath, yacs, termcolor, omegaconf, hydra, antlr4, panopticapi, tabulate,
# portalocker) and wheels/ with the compiled ones for CPython 3.12 (pycocotools, google-crc32c), and
# generates the synthetic dataset under datasets/. Then carry .gpu_deps and datasets/synthetic_panoptic
# to the GPU machine and run `bash tools/gpu_check.sh` there (about 25 MB in all).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
[ -x "$PY" ] || { echo "prepare_gpu_check: run bash tools/install.sh first (.venv/ is missing)" >&2; exit 1; }
SITE=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
rm -rf .gpu_deps && mkdir -p .gpu_deps/site .gpu_deps/wheels
for pkg in detectron2 fvcore iopath yacs termcolor omegaconf hydra antlr4 panopticapi tabulate portalocker; do
  [ -d "$SITE/$pkg" ] || { echo "prepare_gpu_check: $pkg is not installed in .venv" >&2; exit 1; }
  if find "$SITE/$pkg" -name '*.so' | grep -q .; then
    echo "prepare_gpu_check: $pkg has compiled modules; it cannot be copied as pure Python" >&2; exit 1
  fi
  cp -r "$SITE/$pkg" .gpu_deps/site/
done
find .gpu_deps/site -name __pycache__ -prune -exec rm -rf {} +
pins=$(grep -E '^(pycocotools|google-crc32c)==' requirements.txt)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu_deps/wheels $pins
"$PY" datasets/prepare_synthetic_panoptic.py --root datasets
du -sh .gpu_deps datasets/synthetic_panoptic
echo "prepare_gpu_check: done; carry [\".gpu_deps\", \"datasets/synthetic_panoptic\"] and run: bash tools/gpu_check.sh"
