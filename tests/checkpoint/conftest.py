"""Fixtures of the checkpoint tests: an HTTP server on 127.0.0.1 that can also misbehave."""
import http.server
import threading

import pytest


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
    monkeypatch.setenv("CMT_COPS_D2_CACHE", str(tmp_path / "cache"))
    _Handler.files, _Handler.truncate, _Handler.requests = {}, set(), []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield _Handler, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
