"""Checked, cached downloads of weights given as URLs (``MODEL.WEIGHTS``, the converters' inputs).

``cached_download(url)`` returns a local file: ``<cache>/<sha1(url)[:16]>/<file name>``, downloaded
once. The cache is ``$CMT_COPS_D2_CACHE``, else ``$FVCORE_CACHE/cmt_cops_d2`` (Detectron2's cache),
else ``~/.torch/cmt_cops_d2``. A download

* streams into a temporary file next to its destination and is renamed only when complete, so an
  interrupted or failed download never leaves a file in the cache;
* is checked against the server's ``Content-Length`` (a truncated body is an error) and, when the
  expected SHA-256 is known, against it. The SHA-256 is taken from the ``sha256`` argument or from
  the URL's fragment, ``https://host/model.pth#sha256=<64 hex digits>`` (the form ``MODEL_ZOO.md``
  uses where the source publishes a checksum). A cached file is checked again when a SHA-256 is
  known, and downloaded anew if it does not match.

Every failure raises :class:`DownloadError`, whose message names the URL and what went wrong (HTTP
status, connection error, size or checksum mismatch).
"""
import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Optional

__all__ = ["DownloadError", "cached_download", "local_weights", "is_url", "cache_dir", "split_sha256"]

logger = logging.getLogger(__name__)

_SCHEMES = ("http://", "https://")
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")
_CHUNK = 1 << 20


class DownloadError(RuntimeError):
    """A URL could not be downloaded or its content failed a check; the message names the URL."""


def is_url(path: str) -> bool:
    return isinstance(path, str) and path.lower().startswith(_SCHEMES)


def cache_dir() -> str:
    """Where downloads are kept (see the module doc)."""
    if os.environ.get("CMT_COPS_D2_CACHE"):
        return os.environ["CMT_COPS_D2_CACHE"]
    if os.environ.get("FVCORE_CACHE"):
        return os.path.join(os.environ["FVCORE_CACHE"], "cmt_cops_d2")
    return os.path.join(os.path.expanduser("~"), ".torch", "cmt_cops_d2")


def split_sha256(url: str):
    """``(url without fragment, sha256 or None)`` for ``...#sha256=<hex>``; other fragments are an error."""
    base, _, fragment = url.partition("#")
    if not fragment:
        return base, None
    key, _, value = fragment.partition("=")
    if key != "sha256" or not _SHA256.match(value):
        raise DownloadError(f"{url}: the only URL fragment understood is '#sha256=<64 hex digits>', got "
                            f"'#{fragment}'")
    return base, value.lower()


def _sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def cached_download(url: str, *, sha256: Optional[str] = None, timeout: float = 60.0,
                    directory: Optional[str] = None) -> str:
    """Local path of ``url``'s content, downloaded into the cache unless already there.

    Args:
        url: ``http(s)://...``, optionally ending in ``#sha256=<hex>``.
        sha256: expected SHA-256 (hex); overrides none given in the URL (both given and different: error).
        timeout: seconds to wait for the server (connect and each read).
        directory: cache directory (default :func:`cache_dir`).
    """
    if not is_url(url):
        raise DownloadError(f"{url!r} is not an http(s) URL")
    base, from_url = split_sha256(url)
    if sha256 is not None and from_url is not None and sha256.lower() != from_url:
        raise DownloadError(f"{url}: sha256 {sha256} given, but the URL says {from_url}")
    want = (sha256 or from_url)
    if want is not None:
        if not _SHA256.match(want):
            raise DownloadError(f"{url}: sha256 must be 64 hex digits, got {want!r}")
        want = want.lower()
    name = os.path.basename(urllib.parse.urlparse(base).path) or "download"
    folder = os.path.join(directory or cache_dir(), hashlib.sha1(base.encode()).hexdigest()[:16])
    dest = os.path.join(folder, name)
    if os.path.isfile(dest):
        if want is None or _sha256_of(dest) == want:
            return dest
        logger.warning(f"{dest} (from {base}) does not match its sha256 {want}; downloading it again")
    os.makedirs(folder, exist_ok=True)
    logger.info(f"Downloading {base} to {dest}")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(base, timeout=timeout) as resp:
                    length = resp.headers.get("Content-Length")
                    shutil.copyfileobj(resp, out, _CHUNK)
            except urllib.error.HTTPError as e:
                raise DownloadError(f"could not download {base}: HTTP {e.code} {e.reason}") from e
            except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
                # URLError: no connection; HTTPException: e.g. IncompleteRead, a body cut short
                raise DownloadError(f"could not download {base}: {type(e).__name__}: {e}") from e
            got = out.tell()
        if length is not None and got != int(length):
            raise DownloadError(f"could not download {base}: the body has {got} bytes, the server "
                                f"announced {length} (truncated)")
        if want is not None:
            actual = _sha256_of(tmp)
            if actual != want:
                raise DownloadError(f"{base}: sha256 of the downloaded file is {actual}, expected {want}")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return dest


def local_weights(path: str) -> str:
    """``path`` itself, or for a URL the checked local copy (:func:`cached_download`)."""
    return cached_download(path) if is_url(path) else path
