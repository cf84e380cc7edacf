"""Bad config values end with an error naming the key and value, raised before the model or the data
loader is built; the solver's CMT_AMWC_WORKSPACE_MB is checked where it is used."""
import argparse
import os
import subprocess
import sys

import pytest

from cmt_cops_d2.engine import setup_cfg
from cmt_cops_d2.solvers import amwc, grid_edges, solve_amwc
from tests.conftest import load_script

from ..conftest import CONFIG_DIR

ROOT = os.path.dirname(CONFIG_DIR)
PDL = os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml")
CMT = os.path.join(CONFIG_DIR, "synthetic", "cmt_tiny.yaml")
COPS = os.path.join(CONFIG_DIR, "synthetic", "cops_tiny_pretrain.yaml")


def _setup(config, *opts):
    return setup_cfg(argparse.Namespace(config_file=config, opts=list(opts)))


def _train_net():
    module = load_script("tools/train_net.py")
    return module


@pytest.mark.parametrize("config,opts,message", [
    (PDL, ["MODEL.DEVICE", "gpu"], r"MODEL.DEVICE='gpu' is not a torch device; use cpu, cuda or cuda:N"),
    (PDL, ["MODEL.DEVICE", "cuda:x"], r"MODEL.DEVICE='cuda:x' is not a torch device"),
    (PDL, ["SOLVER.IMS_PER_BATCH", "0"], r"SOLVER.IMS_PER_BATCH=0 must be at least 1"),
    (COPS, ["SOLVER.IMS_PER_BATCH", "-2"], r"SOLVER.IMS_PER_BATCH=-2 must be at least 1"),
    (CMT, ["MODEL.CMT.NUM_CLUSTERS", "0"], r"MODEL.CMT.NUM_CLUSTERS=0 must be at least 1"),
    (PDL, ["MODEL.WEIGHTS_MIN_LOADED", "1.5"], r"MODEL.WEIGHTS_MIN_LOADED=1.5 must be a share between 0 and 1"),
])
def test_bad_values_are_named_when_the_config_is_set_up(config, opts, message):
    with pytest.raises(ValueError, match=message):
        _setup(config, *opts)


@pytest.mark.parametrize("flags,opts,message", [
    ([], ["SOLVER.MAX_ITER", "0"], r"SOLVER.MAX_ITER=0: training needs at least 1 iteration"),
    ([], ["SOLVER.MAX_ITER", "-1"], r"SOLVER.MAX_ITER=-1: training needs at least 1 iteration"),
    # evaluation runs no iteration: only its own requirement (weights) is reported
    (["--eval-only"], ["SOLVER.MAX_ITER", "0"], r"--eval-only with an empty MODEL.WEIGHTS"),
])
def test_training_only_values_fail_before_anything_is_built(tmp_path, flags, opts, message):
    train_net = _train_net()
    out = tmp_path / "out"
    args = train_net.default_argument_parser().parse_args(
        ["--config-file", PDL, *flags, *opts, "OUTPUT_DIR", str(out)])
    with pytest.raises(ValueError, match=message):
        train_net.main(args)
    assert not out.exists()  # raised before default_setup wrote anything


def test_train_net_exits_non_zero_naming_the_device(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "train_net.py"), "--config-file", PDL,
         "MODEL.DEVICE", "gpu", "OUTPUT_DIR", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "MODEL.DEVICE='gpu' is not a torch device; use cpu, cuda or cuda:N" in proc.stderr


@pytest.fixture()
def bad_workspace_env(monkeypatch):
    monkeypatch.setenv("CMT_AMWC_WORKSPACE_MB", "abc")
    monkeypatch.setattr(amwc, "_WS_LIMIT", None)  # read again from the environment
    yield
    amwc.release_workspaces()


def test_bad_workspace_variable_breaks_no_import():
    proc = subprocess.run([sys.executable, "-c", "import cmt_cops_d2.solvers"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "CMT_AMWC_WORKSPACE_MB": "abc"})
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("where", ["solve", "cops_config"])
def test_bad_workspace_variable_is_named_where_it_is_used(bad_workspace_env, where):
    with pytest.raises(ValueError, match=r"environment variable CMT_AMWC_WORKSPACE_MB='abc' must be a whole "
                                         r"number of MiB >= 0.*fix or unset it"):
        if where == "solve":
            edges = grid_edges(2, 2, [1])
            solve_amwc([[0.0, 1.0]] * 4, edges, [1.0] * len(edges), [True, False])
        else:
            _setup(COPS)


def test_models_that_use_no_solver_ignore_the_workspace_variable(bad_workspace_env):
    assert _setup(CMT).MODEL.META_ARCHITECTURE == "CMTDeepLab"
