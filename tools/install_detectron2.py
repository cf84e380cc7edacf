#!/usr/bin/env python
"""Prepare a Detectron2 source tree so that it builds and runs on the current stack.

Called by ``tools/install.sh``; not imported by the plugin. It is the one place that holds the
environment workarounds the project needs:

* Detectron2 v0.6 predates Pillow>=10, numpy>=1.24, numpy 2 and setuptools>=81; each fix below is the
  one upstream Detectron2 made later (commit named in the comment). On a newer source tree (the
  official repository's main branch) most patterns are already gone and the patch is a no-op.
* ``--stand-in-c``: the registry sdist ``pb1-detectron2==0.6`` ships without ``layers/csrc``. We then
  build without the C++ extension and install a pure-Python ``detectron2/_C.py`` whose attributes raise
  a clear error. This plugin uses none of the compiled ops (deformable conv, rotated boxes, the fast
  COCO instance-AP evaluator).

Usage: python tools/install_detectron2.py SOURCE_DIR [--stand-in-c]
"""
import argparse
import os
import re
import shutil
import sys

# (file relative to the source root, regex, replacement, why)
SOURCE_FIXES = [
    ("detectron2/data/transforms/transform.py", r"Image\.LINEAR\b", "Image.BILINEAR",
     "Pillow>=10 removed Image.LINEAR (upstream ff53992b, issue #5010)"),
    ("detectron2/layers/mask_ops.py", r"np\.array\(mask, copy=False\)", "np.asarray(mask)",
     "numpy 2 refuses copy=False when a copy is needed (upstream 70f45430)"),
    ("detectron2/model_zoo/model_zoo.py", r"^import pkg_resources\n", "",
     "setuptools>=81 removed pkg_resources (issue #5494)"),
    ("detectron2/model_zoo/model_zoo.py",
     r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*os\.path\.join\(\"configs\", config_path\)\s*\)",
     "os.path.join(os.path.dirname(__file__), \"configs\", config_path)",
     "setuptools>=81 removed pkg_resources (issue #5494)"),
]

# numpy>=1.24 removed the aliases np.bool/np.int/np.float/np.str/np.object (upstream 857d5de2,
# 027099d3, 54dd614e, 654570a2). Matches np.bool but not np.bool_ or np.float32.
NUMPY_ALIAS = r"\bnp\.(bool|int|float|str|object)\b(?![_\w])"

SETUP_FIXES = [
    # black is only used to pretty-print LazyConfig files; 21.4b2 crashes with click>=8.1.
    (r"\"black==21\.4b2\"", "\"black\""),
]

STAND_IN_C = '''"""Stand-in for Detectron2's compiled extension ``detectron2._C``.

Written by cmt_cops_d2's tools/install_detectron2.py: this Detectron2 was built from a source tree
without its C++ sources (the registry sdist pb1-detectron2==0.6). The compiled ops (deformable
convolution, rotated boxes and ROIAlignRotated, the fast COCO instance evaluator) are unavailable;
cmt_cops_d2 needs none of them. Install Detectron2 from its official repository to get them.
"""


def get_compiler_version():
    return "none (cmt_cops_d2 stand-in for detectron2._C, no compiled ops)"


def get_cuda_version():
    return "none"


def has_cuda():
    return False


def __getattr__(name):
    raise RuntimeError(
        f"detectron2._C.{name} is unavailable: this Detectron2 was built without its C++ extension "
        "(cmt_cops_d2 stand-in). Install Detectron2 from its official source repository to use "
        "compiled ops such as deformable convolution, rotated boxes or the fast COCO evaluator."
    )
'''


def _sub_file(path, pattern, repl, flags=re.M):
    with open(path) as f:
        text = f.read()
    new, n = re.subn(pattern, repl, text, flags=flags)
    if n:
        with open(path, "w") as f:
            f.write(new)
    return n


def patch(root, stand_in_c):
    if not os.path.isfile(os.path.join(root, "setup.py")):
        sys.exit(f"install_detectron2.py: {root} is not a Detectron2 source tree (no setup.py)")
    log = []
    for rel, pattern, repl, why in SOURCE_FIXES:
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            n = _sub_file(path, pattern, repl)
            if n:
                log.append(f"{rel}: {n} change(s), {why}")
    for base in ("detectron2", "projects"):
        for dirpath, _, files in os.walk(os.path.join(root, base)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    n = _sub_file(path, NUMPY_ALIAS, r"\1")
                    if n:
                        log.append(f"{os.path.relpath(path, root)}: {n} numpy alias(es)")
    # The sdist keeps the model-zoo configs only under detectron2/model_zoo/configs, but setup.py
    # packages them from a top-level configs/ folder; restore that folder so they get installed.
    zoo_configs = os.path.join(root, "detectron2", "model_zoo", "configs")
    top_configs = os.path.join(root, "configs")
    if not os.path.exists(top_configs) and os.path.isdir(zoo_configs):
        shutil.copytree(zoo_configs, top_configs)
        log.append("configs/: restored from detectron2/model_zoo/configs (model-zoo configs)")
    setup_py = os.path.join(root, "setup.py")
    for pattern, repl in SETUP_FIXES:
        _sub_file(setup_py, pattern, repl)
    if stand_in_c:
        n = _sub_file(setup_py, r"ext_modules=get_extensions\(\)", "ext_modules=[]")
        if not n and "ext_modules=[]" not in open(setup_py).read():
            sys.exit("install_detectron2.py: could not disable the C++ extension in setup.py")
        with open(os.path.join(root, "detectron2", "_C.py"), "w") as f:
            f.write(STAND_IN_C)
        log.append("setup.py: C++ extension replaced by the pure-Python stand-in detectron2/_C.py")
    for line in log:
        print("  patched", line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source_dir")
    parser.add_argument("--stand-in-c", action="store_true",
                        help="build without the C++ extension (source tree has no layers/csrc)")
    args = parser.parse_args()
    patch(args.source_dir, args.stand_in_c)


if __name__ == "__main__":
    main()
