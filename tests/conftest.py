"""Shared fixtures and helpers: a small synthetic dataset under test-only names, a local HTTP server,
one torch thread per module, repository scripts imported as modules."""
import http.server
import importlib.util
import os
import threading

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


class _Handler(http.server.BaseHTTPRequestHandler):
    files = {}        # path -> bytes
    truncate = set()  # paths whose body is cut in half (Content-Length says the full size)
    requests = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        type(self).requests.append(self.path)
        body = self.files.get(self.path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.path in self.truncate else body)
        if self.path in self.truncate:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture()
def server(tmp_path, monkeypatch):
    """An HTTP server on 127.0.0.1 serving ``handler.files`` (path -> bytes); paths in ``handler.truncate``
    send half their body under the full Content-Length. Yields ``(handler, base URL)``; downloads go
    to a cache under ``tmp_path``."""
    monkeypatch.setenv("CMT_COPS_D2_CACHE", str(tmp_path / "cache"))
    _Handler.files, _Handler.truncate, _Handler.requests = {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
