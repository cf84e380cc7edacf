"""Checkpoints written atomically: a kill while a checkpoint or ``last_checkpoint`` is written never leaves
a truncated file under its name or an empty ``last_checkpoint``.

fvcore's ``Checkpointer`` writes ``model_*.pth`` and then ``last_checkpoint`` in place, through its
``path_manager``. :class:`AtomicCheckpointer` gives it a path manager whose ``open`` for writing a local
file writes ``<path>.tmp``, flushes it to disk and renames it over ``<path>`` when the ``with`` block ends
without an error; the previous file stays until then. Reads and remote paths go to the original path
manager unchanged.
"""
import contextlib
import os

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["AtomicCheckpointer"]


@contextlib.contextmanager
def _replace_on_close(path: str, mode: str):
    tmp = path + ".tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _AtomicWrites:
    """Path manager proxy: local files opened for writing replace their target only once complete."""

    def __init__(self, path_manager):
        self._path_manager = path_manager

    def __getattr__(self, name):
        return getattr(self._path_manager, name)

    def open(self, path, mode="r", **kwargs):
        if "w" not in mode or "://" in str(path):
            return self._path_manager.open(path, mode, **kwargs)
        return _replace_on_close(str(path), mode)


class AtomicCheckpointer(DetectionCheckpointer):
    """``DetectionCheckpointer`` whose checkpoints and ``last_checkpoint`` are written atomically."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.path_manager = _AtomicWrites(self.path_manager)
