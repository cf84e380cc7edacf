#!/usr/bin/env bash
# The one install step of cmt_cops_d2.
#
# Creates the project environment .venv/ at the repository root (if missing) and installs, pinned in
# requirements.txt: PyTorch + torchvision, Detectron2, panopticapi, cityscapesscripts, fvcore, pycocotools, numba,
# OpenCV, scipy and pytest; then this plugin itself (editable). A second run with nothing changed
# finishes in seconds.
#
# Detectron2 comes from its official source repository when that is reachable (with its compiled
# ops); otherwise from the registry sdist pb1-detectron2==0.6 (= Detectron2 v0.6 without C++ sources),
# built with a pure-Python stand-in for detectron2._C. tools/install_detectron2.py applies the
# upstream compatibility fixes (Pillow>=10, numpy>=1.24, numpy 2, setuptools>=81) to either tree.
#
# Environment knobs:
#   CMT_COPS_D2_VENV        where to create the environment (default: <repo>/.venv)
#   CMT_COPS_D2_PYTHON      interpreter used to create it (default: python3)
#   CMT_COPS_D2_PIP_ARGS    extra pip arguments (default: --isolated, i.e. ignore the machine's pip
#                           configuration, whose local CPU-only torch wheel has no matching torchvision)
#   CMT_COPS_D2_D2_SOURCE   "auto" (default), "official" or "sdist"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${CMT_COPS_D2_VENV:-$ROOT/.venv}"
BASE_PYTHON="${CMT_COPS_D2_PYTHON:-python3}"
PIP_ARGS="${CMT_COPS_D2_PIP_ARGS---isolated}"
D2_SOURCE="${CMT_COPS_D2_D2_SOURCE:-auto}"
D2_REPO="https://github.com/facebookresearch/detectron2.git"
D2_SDIST="pb1-detectron2==0.6"
BUILD="$ROOT/.build"

say() { echo "[install] $*"; }
die() { echo "[install] ERROR: $*" >&2; exit 1; }

cd "$ROOT"
STAMP="$VENV/.cmt_cops_d2_install_stamp"
WANT="$(cat requirements.txt tools/install.sh tools/install_detectron2.py setup.py | sha256sum | cut -d' ' -f1)"

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ]; then
  if "$VENV/bin/python" -c "import torch, torchvision, detectron2, panopticapi.evaluation, numba, cmt_cops_d2, cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling" 2>/dev/null; then
    say "environment $VENV is up to date"
    exit 0
  fi
  say "environment $VENV is incomplete; reinstalling"
fi

start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
  say "creating $VENV with $BASE_PYTHON ($("$BASE_PYTHON" --version 2>&1))"
  "$BASE_PYTHON" -m venv "$VENV" || die "could not create a virtual environment with $BASE_PYTHON"
fi
PY="$VENV/bin/python"
pip_install() { "$PY" -m pip install $PIP_ARGS --disable-pip-version-check -q "$@"; }

say "installing the pinned requirements (requirements.txt)"
NO_DEPS='^\s*(panopticapi-lite|cityscapesscripts)=='
grep -v -E "$NO_DEPS" requirements.txt > "$VENV/.requirements-main.txt"
pip_install -r "$VENV/.requirements-main.txt"
# panopticapi-lite pins numpy<2 in its metadata but runs with numpy 2; cityscapesscripts requires the
# Python 2 `typing` backport: both without deps (what they import is pinned in requirements.txt).
pip_install --no-deps $(grep -E "$NO_DEPS" requirements.txt | tr -d ' ')

# cityscapesscripts 2.3.0 and numpy 2 (patched in place, idempotent; tests/engine run its evaluations):
# np.in1d is gone (np.isin is the same test; the callers reshape its result anyway), and numpy scalars
# now reach its JSON writer, whose fallback reads o.__dict__ (numpy scalars: o.item()).
"$PY" - <<'EOF' || die "could not patch cityscapesscripts for numpy 2"
import pathlib, cityscapesscripts
root = pathlib.Path(cityscapesscripts.__path__[0])
fixes = {"evaluation/evalPixelLevelSemanticLabeling.py": [("np.in1d(", "np.isin(")],
         "evaluation/evalInstanceLevelSemanticLabeling.py": [("np.in1d(", "np.isin(")],
         "helpers/csHelpers.py": [("default=lambda o: o.__dict__",
                                   "default=lambda o: o.item() if hasattr(o, 'item') else o.__dict__")]}
for name, pairs in fixes.items():
    path = root / name
    text = path.read_text()
    for old, new in pairs:
        text = text.replace(old, new)   # idempotent: no `old` is part of its `new`
        assert old not in text, f"{path}: {old!r} left"
    path.write_text(text)
    # pip compiled the unpatched file; a patch of the same length written within the same second would
    # pass the bytecode cache's size / mtime check, so drop the stale bytecode
    for pyc in (path.parent / "__pycache__").glob(f"{path.stem}.*.pyc"):
        pyc.unlink()
EOF

d2_ok() {
  "$PY" - <<'EOF' 2>/dev/null
import numpy as np, detectron2, detectron2.data, detectron2.engine
from detectron2.projects.panoptic_deeplab import PanopticDeepLab  # noqa: F401
from detectron2.structures.masks import polygon_area  # noqa: F401
EOF
}

install_d2_from() {  # $1: source tree, $2: extra flag for install_detectron2.py
  "$PY" tools/install_detectron2.py "$1" $2
  pip_install --no-build-isolation --no-deps "$1"
}

if d2_ok && [ -f "$STAMP" ]; then
  say "Detectron2 already installed: $("$PY" -c 'import detectron2; print(detectron2.__version__, detectron2.__file__)')"
else
  mkdir -p "$BUILD"
  use_official=0
  if [ "$D2_SOURCE" = official ]; then
    use_official=1
  elif [ "$D2_SOURCE" = auto ] && command -v git >/dev/null \
       && timeout 20 git ls-remote --exit-code "$D2_REPO" HEAD >/dev/null 2>&1; then
    use_official=1
  fi
  if [ "$use_official" = 1 ]; then
    say "building Detectron2 from its official repository ($D2_REPO), with its compiled ops"
    rm -rf "$BUILD/detectron2"
    git clone --depth 1 "$D2_REPO" "$BUILD/detectron2" || die "git clone $D2_REPO failed"
    install_d2_from "$BUILD/detectron2" ""
  else
    say "official repository not used (CMT_COPS_D2_D2_SOURCE=$D2_SOURCE, or not reachable): building the registry sdist $D2_SDIST with a stand-in _C"
    rm -rf "$BUILD/sdist" && mkdir -p "$BUILD/sdist"
    # pip runs setup.py to read the sdist's metadata; setup.py imports torch, hence no build isolation.
    "$PY" -m pip download $PIP_ARGS --disable-pip-version-check -q --no-deps --no-build-isolation \
      --no-binary :all: "$D2_SDIST" -d "$BUILD/sdist" || die "could not download $D2_SDIST"
    tar -xzf "$BUILD"/sdist/pb1-detectron2-*.tar.gz -C "$BUILD/sdist"
    install_d2_from "$(ls -d "$BUILD"/sdist/pb1-detectron2-*/ | head -n 1)" "--stand-in-c"
  fi
  d2_ok || die "Detectron2 was installed but does not import; see the messages above"
fi

say "installing cmt_cops_d2 (editable)"
pip_install --no-build-isolation --no-deps -e .

"$PY" -c "import torch, torchvision, detectron2, panopticapi.evaluation, numba, cmt_cops_d2, cityscapesscripts.evaluation.evalInstanceLevelSemanticLabeling" \
  || die "the environment does not import; see the messages above"
echo "$WANT" > "$STAMP"
say "done in $(( $(date +%s) - start )) s: torch $("$PY" -c 'import torch; print(torch.__version__)'), detectron2 $("$PY" -c 'import detectron2; print(detectron2.__version__)'); use $VENV/bin/python"
