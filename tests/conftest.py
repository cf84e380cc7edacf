"""Shared fixtures: a small synthetic dataset registered under test-only names."""
import importlib.util
import os

import pytest
import torch

import cmt_cops_d2  # noqa: F401  (registers datasets and models)
from cmt_cops_d2.data.datasets.register_synthetic import register_all_synthetic_panoptic
from cmt_cops_d2.data.synthetic import SyntheticConfig

TINY = SyntheticConfig(num_train=16, num_val=6, height=64, width=80, seed=3)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory):
    """Registers ``tiny_synthetic_{train,val}`` (generated on first load) and returns its root."""
    root = str(tmp_path_factory.mktemp("datasets"))
    register_all_synthetic_panoptic(root, prefix="tiny_synthetic", cfg=TINY)
    from detectron2.data import DatasetCatalog

    DatasetCatalog.get("tiny_synthetic_train")  # generate now, once
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests: a second thread only adds start-up and
    contention on the shared CPUs (use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def load_script(path: str):
    """A repository script (``tools/train_net.py``, ``demo/demo.py``, ...) imported as a module, so that
    tests can call its ``main``; ``path`` is relative to the repository root."""
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
