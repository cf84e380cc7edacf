#!/usr/bin/env bash
# The project's GPU check in one command (tools/gpu_check.py says what it checks; it prints one table
# and exits non-zero if a check failed; without CUDA it says so and exits 0).
#
# On this project's development machines: bash tools/gpu_check.sh   (uses .venv)
# On a GPU machine without network: prepare here with `bash tools/prepare_gpu_check.sh`, carry
# .gpu_deps and datasets/synthetic_panoptic, and run `bash tools/gpu_check.sh` there: the carried
# packages are installed into /tmp/site and the machine's own python3 (with CUDA PyTorch) is used.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .gpu_deps ] && [ ! -x .venv/bin/python ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu_deps/wheels/*.whl
  export PYTHONPATH="/tmp/site:$PWD/.gpu_deps/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  PY=python3
else
  PY=${CMT_COPS_D2_PYTHON:-.venv/bin/python}
fi
export DETECTRON2_DATASETS="${DETECTRON2_DATASETS:-$PWD/datasets}" PYTHONUNBUFFERED=1
exec "$PY" tools/gpu_check.py "$@"
