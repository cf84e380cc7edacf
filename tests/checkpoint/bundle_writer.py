"""Test helper: writes TensorFlow tensor bundles (SSTable index + data shards) by hand.

This lets the reader's handling of multi-block tables, shards, dtypes, byte order and malformed
files be tested without TensorFlow. The real thing, written by TensorFlow itself, is in
``tests/data/deeplab2``.
"""
import struct
from typing import Dict, List, Tuple

import numpy as np

from cmt_cops_d2.checkpoint.crc32c import crc32c, mask

MAGIC = 0xDB4775248B80FB57
DT = {"float32": 1, "int32": 3, "string": 7, "int64": 9, "bool": 10, "bfloat16": 14,
      "float16": 19, "variant": 21}


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def field_varint(number: int, value: int) -> bytes:
    return varint(number << 3) + varint(value)


def field_bytes(number: int, value: bytes) -> bytes:
    return varint(number << 3 | 2) + varint(len(value)) + value


def entry_proto(dtype: int, shape, shard: int, offset: int, size: int, crc: int) -> bytes:
    shape_proto = b"".join(field_bytes(2, field_varint(1, d)) for d in shape)
    return (field_varint(1, dtype) + field_bytes(2, shape_proto) + field_varint(3, shard)
            + field_varint(4, offset) + field_varint(5, size)
            + varint(6 << 3 | 5) + struct.pack("<I", crc))


def header_proto(num_shards: int, big_endian: bool = False) -> bytes:
    return (field_varint(1, num_shards) + (field_varint(2, 1) if big_endian else b"")
            + field_bytes(3, field_varint(1, 1)))


def block(entries: List[Tuple[bytes, bytes]], restart_interval: int) -> bytes:
    out, restarts, prev = bytearray(), [], b""
    for i, (key, value) in enumerate(entries):
        shared = 0
        if i % restart_interval == 0:
            restarts.append(len(out))
        else:
            while shared < min(len(prev), len(key)) and prev[shared] == key[shared]:
                shared += 1
        out += varint(shared) + varint(len(key) - shared) + varint(len(value)) + key[shared:] + value
        prev = key
    for r in restarts or [0]:
        out += struct.pack("<I", r)
    return bytes(out + struct.pack("<I", len(restarts or [0])))


def write_table(path: str, entries: List[Tuple[bytes, bytes]], entries_per_block: int = 3,
                restart_interval: int = 2, compression: int = 0) -> None:
    """An SSTable with several small data blocks, prefix-compressed keys and restart points."""
    data = bytearray()

    def put(contents: bytes) -> bytes:
        offset = len(data)
        trailer = bytes([compression])
        data.extend(contents + trailer + struct.pack("<I", mask(crc32c(contents + trailer))))
        return varint(offset) + varint(len(contents))

    index = []
    for i in range(0, len(entries), entries_per_block):
        chunk = entries[i:i + entries_per_block]
        index.append((chunk[-1][0], put(block(chunk, restart_interval))))
    metaindex_handle = put(block([], 1))
    index_handle = put(block(index, 1))
    footer = (metaindex_handle + index_handle).ljust(40, b"\0") + struct.pack("<Q", MAGIC)
    with open(path, "wb") as f:
        f.write(bytes(data) + footer)


def write_bundle(prefix: str, tensors: Dict[str, Tuple[str, np.ndarray]], num_shards: int = 1,
                 big_endian: bool = False, **table_kwargs) -> None:
    """``{key: (TF dtype name, array)}`` -> ``prefix.index`` and ``prefix.data-*-of-*``; tensors
    go to the shards in turn. bfloat16 arrays are given as uint16 bit patterns; string tensors as
    raw bytes (only their entry matters)."""
    shards = [bytearray() for _ in range(num_shards)]
    entries = [(b"", header_proto(num_shards, big_endian))]
    for i, key in enumerate(sorted(tensors)):
        dtype, value = tensors[key]
        if isinstance(value, bytes):
            raw, shape = value, ()
        else:
            order = ">" if big_endian else "<"
            raw = np.ascontiguousarray(value).astype(value.dtype.newbyteorder(order)).tobytes()
            shape = value.shape
        shard = shards[i % num_shards]
        entries.append((key.encode(), entry_proto(DT[dtype], shape, i % num_shards, len(shard),
                                                  len(raw), mask(crc32c(raw)))))
        shard.extend(raw)
    write_table(prefix + ".index", entries, **table_kwargs)
    for s, shard in enumerate(shards):
        with open(f"{prefix}.data-{s:05d}-of-{num_shards:05d}", "wb") as f:
            f.write(bytes(shard))
