#!/usr/bin/env python
"""cmt_cops_d2: CMT-DeepLab and COPS as a Detectron2 plugin.

Install with ``bash tools/install.sh`` (creates .venv/ with every pinned dependency, see requirements.txt)
or, in an environment that already has PyTorch and Detectron2, ``pip install -e .``.
"""
from setuptools import find_packages, setup

setup(
    name="cmt_cops_d2",
    version="0.1.0",
    description="CMT-DeepLab and COPS panoptic segmentation for Detectron2",
    packages=find_packages(include=("cmt_cops_d2", "cmt_cops_d2.*")),
    python_requires=">=3.9",
    # torch and detectron2 are installed by tools/install.sh (see README); the rest is pinned there.
    install_requires=["numpy", "scipy", "numba", "opencv-python-headless", "pycocotools", "fvcore", "google-crc32c"],
)
