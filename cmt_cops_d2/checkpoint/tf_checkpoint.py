"""Read TensorFlow 2 checkpoints (tensor bundles) without TensorFlow (standard library, numpy, google-crc32c).

A checkpoint ``PREFIX`` (e.g. ``.../ckpt-123``) is made of these files:

* ``PREFIX.index``: a sorted table in LevelDB's SSTable format. Its data blocks hold key/value
  entries with prefix-compressed keys: for each entry, the length of the prefix shared with the
  previous key, the length of the rest of the key and the value's length, as varints, then the rest
  of the key and the value. A block ends with its restart offsets (uint32 each) and their count. An
  index block maps the last key of each data block to the block's handle (offset and size, as
  varints). The file ends with a 48-byte footer: the metaindex and index block handles, padding, and
  the magic number 0xdb4775248b80fb57. Each block is followed by a 5-byte trailer: the compression
  type, then the masked CRC-32C of the block and that type byte. The CRC is verified. TensorFlow
  writes bundle indexes uncompressed, so compressed blocks are rejected.
* The value of the empty key is a ``BundleHeaderProto`` (number of shards, endianness). Every other
  key is a tensor name whose value is a ``BundleEntryProto``: dtype, shape, shard, offset, size and
  the masked CRC-32C of the tensor's bytes. Both are protobuf messages, decoded here by hand.
* ``PREFIX.data-SSSSS-of-NNNNN``: the shards. Each tensor's raw bytes sit at its offset, in the
  header's byte order (little-endian in practice).

Tensors are returned as numpy arrays. bfloat16 is widened to float32, which is exact. String
tensors are skipped. One of them is ``_CHECKPOINTABLE_OBJECT_GRAPH``, the serialized object graph
of an object-based checkpoint; the variables' keys already spell out their paths in that graph,
e.g. ``encoder/_stem/_conv1_bn_act/_conv/kernel/.ATTRIBUTES/VARIABLE_VALUE``. Every tensor's CRC is
checked (see :mod:`.crc32c` for the implementation used). Problems raise :class:`TFCheckpointError`,
whose message names the file and what is wrong.
"""
import contextlib
import logging
import os
import re
import struct
import tarfile
import tempfile
from typing import Callable, Dict, Iterator, List, NamedTuple, Tuple

import numpy as np

from . import crc32c as _crc

__all__ = ["read_tf_checkpoint", "list_tf_checkpoint", "TFCheckpointError", "TensorInfo"]

logger = logging.getLogger(__name__)

TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER = 48  # two block handles (at most 2 x 20 bytes) padded to 40 bytes, and the 8-byte magic
_TRAILER = 5  # compression type, masked CRC-32C
_COMPRESSION = {1: "snappy"}  # block types other than 0 (none)
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".tar.bz2", ".tar.xz")
_DATA_FILE = re.compile(r"^(?P<prefix>.+)\.data-\d{5}-of-\d{5}$")

# TensorFlow's DataType enum (types.proto) -> numpy dtype as stored in the data shards.
_DT_STRING = 7
_DT_BFLOAT16 = 14
_NUMPY_DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    8: np.complex64, 9: np.int64, 10: np.bool_, _DT_BFLOAT16: np.uint16, 17: np.uint16,
    18: np.complex128, 19: np.float16, 22: np.uint32, 23: np.uint64,
}
_DTYPE_NAMES = {
    0: "invalid", 1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8",
    7: "string", 8: "complex64", 9: "int64", 10: "bool", 11: "qint8", 12: "quint8", 13: "qint32",
    14: "bfloat16", 15: "qint16", 16: "quint16", 17: "uint16", 18: "complex128", 19: "float16",
    20: "resource", 21: "variant", 22: "uint32", 23: "uint64",
}


class TFCheckpointError(ValueError):
    """A TensorFlow checkpoint that is missing, corrupt, or not readable here (see the message)."""


class TensorInfo(NamedTuple):
    """One tensor of the index: TensorFlow dtype name, shape, and where its bytes are."""

    dtype: str
    shape: Tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int  # masked, as stored


class _Malformed(Exception):
    """Internal: a structural problem in the index, reported with the file name by the caller."""


class _Unsupported(Exception):
    """Internal: a valid index this reader cannot read, reported with the file name by the caller."""


# --------------------------------------------------------------------------------------------
# Protobuf wire format
# --------------------------------------------------------------------------------------------
def _varint(buf, pos: int, limit: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= limit:
            raise _Malformed("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Malformed("varint longer than 10 bytes")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _fields(buf) -> Iterator[Tuple[int, int, object]]:
    """``(field number, wire type, value)`` of a serialized message; length-delimited values are
    bytes, fixed32 / fixed64 values ints."""
    pos, limit = 0, len(buf)
    while pos < limit:
        tag, pos = _varint(buf, pos, limit)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise _Malformed("protobuf field number 0")
        if wire == 0:
            value, pos = _varint(buf, pos, limit)
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            if pos + width > limit:
                raise _Malformed("truncated fixed-width protobuf field")
            value = int.from_bytes(buf[pos:pos + width], "little")
            pos += width
        elif wire == 2:
            length, pos = _varint(buf, pos, limit)
            if pos + length > limit:
                raise _Malformed("truncated protobuf field")
            value = bytes(buf[pos:pos + length])
            pos += length
        else:
            raise _Malformed(f"unsupported protobuf wire type {wire}")
        yield field, wire, value


def _parse_shape(buf) -> Tuple[int, ...]:
    """``TensorShapeProto``: repeated ``Dim dim = 2`` (``int64 size = 1``), ``bool unknown_rank = 3``."""
    dims = []
    for field, wire, value in _fields(buf):
        if field == 2 and wire == 2:
            size = 0
            for f, w, v in _fields(value):
                if f == 1 and w == 0:
                    size = _signed64(v)
            dims.append(size)
        elif field == 3 and wire == 0 and value:
            raise _Malformed("tensor shape of unknown rank")
    if any(d < 0 for d in dims):
        raise _Malformed(f"tensor shape with unknown dimensions {dims}")
    return tuple(dims)


def _parse_entry(buf) -> Tuple[TensorInfo, int, int]:
    """``BundleEntryProto`` -> (info, dtype enum, number of slices)."""
    dtype, shape, shard, offset, size, crc, slices = 0, (), 0, 0, 0, 0, 0
    for field, wire, value in _fields(buf):
        if field == 1 and wire == 0:
            dtype = value
        elif field == 2 and wire == 2:
            shape = _parse_shape(value)
        elif field == 3 and wire == 0:
            shard = _signed64(value)
        elif field == 4 and wire == 0:
            offset = _signed64(value)
        elif field == 5 and wire == 0:
            size = _signed64(value)
        elif field == 6 and wire == 5:
            crc = value
        elif field == 7 and wire == 2:
            slices += 1
    if shard < 0 or offset < 0 or size < 0:
        raise _Malformed(f"negative shard / offset / size ({shard}, {offset}, {size})")
    info = TensorInfo(_DTYPE_NAMES.get(dtype, f"enum {dtype}"), shape, shard, offset, size, crc)
    return info, dtype, slices


def _parse_header(buf) -> Tuple[int, str]:
    """``BundleHeaderProto`` -> (num_shards, "little" or "big")."""
    num_shards, endianness = 0, 0
    for field, wire, value in _fields(buf):
        if field == 1 and wire == 0:
            num_shards = _signed64(value)
        elif field == 2 and wire == 0:
            endianness = value
    if num_shards < 1:
        raise _Malformed(f"header says {num_shards} data shards")
    if endianness not in (0, 1):
        raise _Malformed(f"header has unknown endianness {endianness}")
    return num_shards, ("little", "big")[endianness]


# --------------------------------------------------------------------------------------------
# SSTable
# --------------------------------------------------------------------------------------------
def _block_handle(buf, pos: int, limit: int) -> Tuple[int, int, int]:
    offset, pos = _varint(buf, pos, limit)
    size, pos = _varint(buf, pos, limit)
    return offset, size, pos


def _read_block(data: bytes, offset: int, size: int, what: str) -> memoryview:
    end = offset + size
    if end + _TRAILER > len(data) - _FOOTER:
        raise _Malformed(f"{what} (bytes {offset}..{end}) runs past the end of the table")
    stored = struct.unpack_from("<I", data, end + 1)[0]
    actual = _crc.mask(_crc.crc32c(memoryview(data)[offset:end + 1]))  # the block and its type byte
    if stored != actual:
        raise _Malformed(f"{what} fails its checksum (stored 0x{stored:08x}, computed 0x{actual:08x})")
    kind = data[end]
    if kind != 0:
        raise _Unsupported(
            f"{what} is compressed ({_COMPRESSION.get(kind, f'type {kind}')}); TensorFlow writes "
            "checkpoint indexes uncompressed and this reader does not decompress them")
    return memoryview(data)[offset:end]


def _block_entries(block: memoryview, what: str) -> Iterator[Tuple[bytes, memoryview]]:
    if len(block) < 4:
        raise _Malformed(f"{what} is shorter than its restart count")
    num_restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    limit = len(block) - 4 * (num_restarts + 1)
    if limit < 0:
        raise _Malformed(f"{what} has {num_restarts} restart points, more than fit in it")
    pos, key = 0, b""
    while pos < limit:
        shared, pos = _varint(block, pos, limit)
        unshared, pos = _varint(block, pos, limit)
        value_length, pos = _varint(block, pos, limit)
        if shared > len(key) or pos + unshared + value_length > limit:
            raise _Malformed(f"{what} has an entry that does not fit (at byte {pos})")
        key = key[:shared] + bytes(block[pos:pos + unshared])
        pos += unshared
        yield key, block[pos:pos + value_length]
        pos += value_length


def _read_table(data: bytes) -> List[Tuple[bytes, memoryview]]:
    """All (key, value) pairs of an SSTable, in key order."""
    if len(data) < _FOOTER:
        raise _Malformed(f"{len(data)} bytes, shorter than a table footer ({_FOOTER} bytes)")
    magic = struct.unpack_from("<Q", data, len(data) - 8)[0]
    if magic != TABLE_MAGIC:
        raise _Malformed(f"bad magic number 0x{magic:016x} (a table ends with 0x{TABLE_MAGIC:016x})")
    footer = len(data) - _FOOTER
    _, _, pos = _block_handle(data, footer, footer + 40)  # metaindex: unused by tensor bundles
    index_offset, index_size, _ = _block_handle(data, pos, footer + 40)
    entries: List[Tuple[bytes, memoryview]] = []
    for _, handle in _block_entries(_read_block(data, index_offset, index_size, "index block"),
                                    "index block"):
        offset, size, _ = _block_handle(handle, 0, len(handle))
        what = f"data block at byte {offset}"
        for key, value in _block_entries(_read_block(data, offset, size, what), what):
            if entries and key <= entries[-1][0]:
                raise _Malformed(f"keys out of order ({entries[-1][0]!r} then {key!r})")
            entries.append((key, value))
    return entries


# --------------------------------------------------------------------------------------------
# Locating the checkpoint
# --------------------------------------------------------------------------------------------
def _is_archive(path: str) -> bool:
    return path.lower().endswith(_ARCHIVE_SUFFIXES)


def _single_prefix(root: str, what: str) -> str:
    found = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found += [os.path.join(folder, f[: -len(".index")]) for f in sorted(files) if f.endswith(".index")]
    if not found:
        raise TFCheckpointError(f"{what} contains no TensorFlow checkpoint (no *.index file)")
    if len(found) > 1:
        names = ", ".join(os.path.relpath(p, root) for p in found)
        raise TFCheckpointError(
            f"{what} contains {len(found)} checkpoints ({names}); give the prefix of one of them "
            "(e.g. .../ckpt-123)")
    return found[0]


@contextlib.contextmanager
def _located(path) -> Iterator[Tuple[str, Callable[[str], str]]]:
    """Yields ``(prefix, name)``: the checkpoint prefix and a function naming its files in errors
    (``archive.tar.gz!member`` for files extracted from an archive)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        yield _single_prefix(path, f"folder {path}"), str
    elif _is_archive(path):
        if not os.path.isfile(path):
            raise TFCheckpointError(f"checkpoint archive {path} not found")
        with tempfile.TemporaryDirectory(prefix="tf_checkpoint_") as tmp:
            try:
                with tarfile.open(path, "r:*") as tar:
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(tmp, filter="data")
                    else:  # Python without extraction filters: refuse unsafe member names
                        for member in tar.getmembers():
                            name = os.path.normpath(member.name)
                            if os.path.isabs(name) or name.startswith(".."):
                                raise tarfile.TarError(f"unsafe member name {member.name!r}")
                        tar.extractall(tmp)
            except (tarfile.TarError, EOFError, OSError, ValueError) as e:
                raise TFCheckpointError(f"cannot extract checkpoint archive {path}: {e}") from e
            prefix = _single_prefix(tmp, f"archive {path}")
            yield prefix, lambda p: f"{path}!{os.path.relpath(p, tmp)}"
    else:
        if path.endswith(".index"):
            prefix = path[: -len(".index")]
        else:
            match = _DATA_FILE.match(path)
            prefix = match.group("prefix") if match else path
        if not os.path.isfile(prefix + ".index"):
            raise TFCheckpointError(
                f"no TensorFlow checkpoint at {path}: {prefix}.index not found (give a checkpoint "
                "prefix such as .../ckpt-123, its .index file, a folder or a .tar.gz holding one "
                "checkpoint)")
        yield prefix, str


def _read_index(prefix: str, name: Callable[[str], str]):
    """(num_shards, byte order, {key: (info, dtype enum)}) of ``prefix.index``."""
    index = prefix + ".index"
    try:
        with open(index, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TFCheckpointError(f"cannot read checkpoint index {name(index)}: {e}") from e
    try:
        entries = _read_table(data)
        if not entries or entries[0][0] != b"":
            raise _Malformed("no header entry (the empty key)")
        num_shards, byte_order = _parse_header(entries[0][1])
        tensors = {}
        for raw_key, value in entries[1:]:
            try:
                key = raw_key.decode("utf-8")
            except UnicodeDecodeError:
                raise _Malformed(f"tensor name {raw_key!r} is not UTF-8") from None
            try:
                info, dtype, slices = _parse_entry(value)
            except _Malformed as e:
                raise _Malformed(f"entry of tensor {key!r}: {e}") from None
            if slices:
                raise _Unsupported(
                    f"tensor {key!r} is saved in {slices} slices (a partitioned variable), which "
                    "this reader does not support")
            if info.shard >= num_shards:
                raise _Malformed(f"tensor {key!r} is in shard {info.shard} of {num_shards}")
            tensors[key] = (info, dtype)
    except _Malformed as e:
        raise TFCheckpointError(f"{name(index)}: not a valid TensorFlow checkpoint index: {e}") from None
    except _Unsupported as e:
        raise TFCheckpointError(f"{name(index)}: {e}") from None
    return num_shards, byte_order, tensors


def list_tf_checkpoint(path) -> Dict[str, TensorInfo]:
    """Every tensor of the checkpoint index, string tensors included, without reading the data.

    Args:
        path: as :func:`read_tf_checkpoint`.
    """
    with _located(path) as (prefix, name):
        return {key: info for key, (info, _) in _read_index(prefix, name)[2].items()}


def read_tf_checkpoint(path, *, verify_crc: bool = True) -> Dict[str, np.ndarray]:
    """Every numeric / boolean tensor of a TensorFlow (1 or 2) checkpoint, by key.

    Args:
        path: a checkpoint prefix (``.../ckpt-123``), its ``.index`` or a ``.data-*`` file, a folder
            holding exactly one checkpoint (searched recursively), or a ``.tar.gz`` / ``.tgz`` /
            ``.tar`` archive holding exactly one (extracted to a temporary folder, removed after).
        verify_crc: check every tensor's CRC-32C against the index (on by default).

    Returns:
        ``{key: array}`` in key order. Arrays are writable, in native byte order, with the stored
        dtype, except bfloat16, which is widened to float32. String tensors are skipped (logged at
        debug level; only checked to lie inside their shard).

    Raises:
        TFCheckpointError: nothing found at ``path``; an archive or folder with no checkpoint, or
            several; a missing or unreadable data shard; a shard too short for a tensor; an index
            with a bad magic number, failed block checksum or malformed entries; a compressed index
            block; an unsupported dtype; a tensor whose CRC-32C does not match. The message names the
            file and, where one is concerned, the tensor.
    """
    with _located(path) as (prefix, name):
        num_shards, byte_order, tensors = _read_index(prefix, name)
        order = "<" if byte_order == "little" else ">"
        result: Dict[str, np.ndarray] = {}
        files: Dict[int, object] = {}
        try:
            for key, (info, dtype) in tensors.items():
                # Every entry, skipped ones included, must lie inside an existing shard.
                shard = f"{prefix}.data-{info.shard:05d}-of-{num_shards:05d}"
                if info.shard not in files:
                    try:
                        files[info.shard] = open(shard, "rb")
                    except FileNotFoundError:
                        raise TFCheckpointError(
                            f"missing data shard {name(shard)} (it holds tensor {key!r}); a checkpoint "
                            f"is {os.path.basename(prefix)}.index plus all its .data-*-of-"
                            f"{num_shards:05d} files") from None
                    except OSError as e:
                        raise TFCheckpointError(f"cannot read data shard {name(shard)}: {e}") from e
                f = files[info.shard]
                file_size = os.fstat(f.fileno()).st_size
                end = info.offset + info.size
                if end > file_size:
                    raise TFCheckpointError(
                        f"data shard {name(shard)} is truncated: tensor {key!r} needs bytes "
                        f"{info.offset}..{end}, the file has {file_size} bytes")
                if dtype == _DT_STRING:
                    logger.debug("Skipping string tensor %s", key)
                    continue
                if dtype not in _NUMPY_DTYPES:
                    raise TFCheckpointError(
                        f"{name(prefix + '.index')}: tensor {key!r} has dtype {info.dtype}, which "
                        "this reader does not support")
                stored = np.dtype(_NUMPY_DTYPES[dtype]).newbyteorder(order)
                count = int(np.prod(info.shape, dtype=np.int64))
                if count * stored.itemsize != info.size:
                    raise TFCheckpointError(
                        f"{name(prefix + '.index')}: not a valid TensorFlow checkpoint index: tensor "
                        f"{key!r} of shape {info.shape} and dtype {info.dtype} should take "
                        f"{count * stored.itemsize} bytes, its entry says {info.size}")
                array = np.empty(count, dtype=stored)
                f.seek(info.offset)
                if f.readinto(array.view(np.uint8)) != info.size:
                    raise TFCheckpointError(f"short read of tensor {key!r} from {name(shard)}")
                if verify_crc:
                    actual = _crc.mask(_crc.crc32c(array.view(np.uint8)))
                    if actual != info.crc32c:
                        raise TFCheckpointError(
                            f"data shard {name(shard)} is corrupt: tensor {key!r} (bytes "
                            f"{info.offset}..{end}) fails its checksum (stored masked CRC-32C "
                            f"0x{info.crc32c:08x}, computed 0x{actual:08x})")
                if dtype == _DT_BFLOAT16:
                    array = (array.astype(np.uint32) << np.uint32(16)).view(np.float32)
                elif not stored.isnative:
                    array = array.astype(stored.newbyteorder("="))
                result[key] = array.reshape(info.shape)
        finally:
            for f in files.values():
                f.close()
    return result
