"""Training killed with SIGKILL, then run again with --resume.

``tools/train_net.py`` runs as a subprocess on the tiny synthetic set. It is killed from outside after
its first checkpoint, or kills itself with SIGKILL in the middle of writing a checkpoint file or
``last_checkpoint`` (``torch.save`` / ``tag_last_checkpoint`` patched to write part of the data first).
The trainer's checkpointer (``AtomicCheckpointer``) writes the checkpoint file, then ``last_checkpoint``,
each to ``<name>.tmp`` renamed when complete: a kill while either is written leaves the previous files
as they were (and a ``.tmp``), so --resume continues from the last complete checkpoint, from its
iteration + 1, and ends with exit 0. (An empty or wrong ``last_checkpoint`` written by other means is
an error naming it: tests/reliability/test_weights.py.)
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from cmt_cops_d2.engine import Trainer

from ..conftest import CONFIG_DIR
from ..engine.test_train_loop import TINY_OPTS, tiny_cfg

ROOT = os.path.dirname(CONFIG_DIR)
CONFIG = os.path.join(CONFIG_DIR, "synthetic", "panoptic_deeplab_tiny.yaml")
# No test set: the evaluation at the end of training is not what is tested here.
OPTS = TINY_OPTS + ["DATASETS.TEST", "()", "SOLVER.CHECKPOINT_PERIOD", "5", "SOLVER.MAX_ITER", "12"]

# Runs tools/train_net.py with the tiny synthetic set registered; CMT_TEST_KILL="save:N" kills the
# process with SIGKILL half-way through writing its N-th model_*.pth, "tag:N" right after the N-th
# write of last_checkpoint truncated it.
WRAPPER = r'''
import io, os, runpy, signal, sys
sys.path.insert(0, {root!r})
from cmt_cops_d2.data.datasets.register_synthetic import register_all_synthetic_panoptic
from tests.conftest import TINY
register_all_synthetic_panoptic({data!r}, prefix="tiny_synthetic", cfg=TINY)

import torch
from fvcore.common.checkpoint import Checkpointer

what, _, n = os.environ.get("CMT_TEST_KILL", "").partition(":")
calls = [0]
real_save, real_tag = torch.save, Checkpointer.tag_last_checkpoint

def save(obj, f, *args, **kwargs):
    name = os.path.basename(getattr(f, "name", "")).removesuffix(".tmp")  # written as <name>.tmp, then renamed
    if what == "save" and name.startswith("model_") and name.endswith(".pth"):
        calls[0] += 1
        if calls[0] == int(n):
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

def tag(self, basename):
    if what == "tag":
        calls[0] += 1
    if what == "tag" and calls[0] == int(n):
        with self.path_manager.open(os.path.join(self.save_dir, "last_checkpoint"), "w") as f:
            f.flush()  # killed with the new last_checkpoint opened and still empty
            os.kill(os.getpid(), signal.SIGKILL)
    return real_tag(self, basename)

torch.save = save
Checkpointer.tag_last_checkpoint = tag
sys.argv = ["tools/train_net.py"] + sys.argv[1:]
runpy.run_path(os.path.join({root!r}, "tools", "train_net.py"), run_name="__main__")
'''


def _start(tmp_path, data_root, out, *extra, resume=False, kill=""):
    """Start the wrapped train_net; returns (process, log file)."""
    wrapper = tmp_path / "run_train_net.py"
    wrapper.write_text(WRAPPER.format(root=ROOT, data=str(data_root)))
    n = len(list(tmp_path.glob("log*.txt")))
    log = tmp_path / f"log{n}.txt"
    cmd = [sys.executable, str(wrapper), "--config-file", CONFIG, *(["--resume"] if resume else []),
           *OPTS, "OUTPUT_DIR", str(out), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CMT_TEST_KILL": kill}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=str(tmp_path), env=env)
    return proc, log


def _run(tmp_path, data_root, out, *extra, resume=False, kill=""):
    """Run the wrapped train_net to its end; returns (exit status, log text)."""
    proc, log = _start(tmp_path, data_root, out, *extra, resume=resume, kill=kill)
    try:
        rc = proc.wait(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, log.read_text()


def _start_iter(log: str) -> int:
    found = re.findall(r"Starting training from iteration (\d+)", log)
    assert len(found) == 1, log[-3000:]
    return int(found[0])


def _iteration(path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


def _last(out) -> str:
    return (out / "last_checkpoint").read_text()


def _loads(path) -> bool:
    try:
        torch.load(path, map_location="cpu", weights_only=False)
        return True
    except Exception:
        return False


@pytest.fixture(scope="module")
def init_weights(tiny_synthetic, tmp_path_factory):
    """A MODEL.WEIGHTS file of the tiny Panoptic-DeepLab (model only)."""
    d = tmp_path_factory.mktemp("init")
    torch.manual_seed(1)
    DetectionCheckpointer(build_model(tiny_cfg(d)), save_dir=str(d)).save("init")
    return str(d / "init.pth")


def _killed_from_outside(tmp_path, data, out):
    """SIGKILL from outside once the first checkpoint is named in last_checkpoint."""
    proc, log = _start(tmp_path, data, out, "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "3")
    deadline = time.time() + 120
    try:
        while not ((out / "last_checkpoint").is_file() and _last(out).strip()):
            assert proc.poll() is None, f"train_net ended (exit {proc.returncode}) before its first checkpoint:\n" \
                                        + log.read_text()[-3000:]
            assert time.time() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "model_final.pth").exists()
    return ["SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "3"]


def _killed_writing_second_checkpoint(tmp_path, data, out):
    rc, log = _run(tmp_path, data, out, kill="save:2")
    assert rc == -signal.SIGKILL, log[-3000:]
    # the half-written file never got the checkpoint's name; last_checkpoint still names the first one
    assert not (out / "model_0000009.pth").exists() and not _loads(out / "model_0000009.pth.tmp")
    assert _last(out) == "model_0000004.pth" and _loads(out / "model_0000004.pth")
    return []


def _killed_writing_first_checkpoint(tmp_path, data, out):
    rc, log = _run(tmp_path, data, out, kill="save:1")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert not (out / "model_0000004.pth").exists() and not _loads(out / "model_0000004.pth.tmp")
    assert not (out / "last_checkpoint").exists()
    return []


# (case, how the first run ends, expected first iteration of the resumed run: a function of OUTPUT_DIR)
RESUME_CASES = [
    ("sigkill_after_first_checkpoint", _killed_from_outside,
     lambda out: _iteration(out / _last(out)) + 1),
    ("sigkill_while_writing_second_checkpoint", _killed_writing_second_checkpoint, lambda out: 5),
    # no checkpoint was completed: the resumed run starts again from MODEL.WEIGHTS
    ("sigkill_while_writing_first_checkpoint", _killed_writing_first_checkpoint, lambda out: 0),
]


@pytest.mark.parametrize("case,interrupt,first_iter", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_resume_after_sigkill_continues_and_ends_with_exit_0(tiny_synthetic, init_weights, tmp_path, case,
                                                            interrupt, first_iter):
    out = tmp_path / "out"
    weights = ["MODEL.WEIGHTS", init_weights]
    opts = interrupt(tmp_path, tiny_synthetic, out) + weights
    expected = first_iter(out)
    # loaded from the checkpoint last_checkpoint names, or from MODEL.WEIGHTS when there is none
    source = str(out / _last(out)) if (out / "last_checkpoint").exists() else init_weights
    rc, log = _run(tmp_path, tiny_synthetic, out, *opts, resume=True)
    assert rc == 0, log[-3000:]
    assert _start_iter(log) == expected
    assert f"[Checkpointer] Loading from {source} ..." in log
    max_iter = int(opts[opts.index("SOLVER.MAX_ITER") + 1]) if "SOLVER.MAX_ITER" in opts else 12
    assert _last(out) == "model_final.pth" and _iteration(out / "model_final.pth") == max_iter - 1
    for ckpt in out.glob("model_*.pth"):  # the resumed run rewrote the truncated file
        assert _loads(ckpt), ckpt


def test_sigkill_while_writing_last_checkpoint_keeps_the_previous_one(tiny_synthetic, tmp_path):
    """last_checkpoint is written to last_checkpoint.tmp and renamed: killed half-way, the previous one
    stays and --resume continues from the checkpoint it names."""
    out = tmp_path / "out"
    rc, log = _run(tmp_path, tiny_synthetic, out, kill="tag:2")
    assert rc == -signal.SIGKILL, log[-3000:]
    assert _last(out) == "model_0000004.pth" and (out / "last_checkpoint.tmp").exists()
    rc, log = _run(tmp_path, tiny_synthetic, out, resume=True)
    assert rc == 0, log[-3000:]
    assert _start_iter(log) == 5


@pytest.mark.parametrize("state", ["missing", "empty", "stray_files"])
def test_resume_without_a_checkpoint_starts_from_model_weights(tiny_synthetic, init_weights, tmp_path, state):
    out = tmp_path / "out"
    if state != "missing":
        out.mkdir()
    if state == "stray_files":  # files of a run killed before its first checkpoint was tagged
        (out / "model_0000004.pth").write_bytes(b"PK\x03\x04 truncated")
        (out / "log.txt").write_text("")
    trainer = Trainer(tiny_cfg(out, "DATASETS.TEST", "()", "MODEL.WEIGHTS", init_weights))
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 0
    saved = torch.load(init_weights, map_location="cpu", weights_only=False)["model"]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
