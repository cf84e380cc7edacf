"""TensorFlow checkpoint reader: what TensorFlow wrote comes back bit for bit; every kind of damage is
reported with the file (and tensor) concerned; CRC-32C as TensorFlow masks it."""
import hashlib
import json
import os
import shutil
import tarfile

import numpy as np
import pytest

from cmt_cops_d2.checkpoint import crc32c as crc
from cmt_cops_d2.checkpoint.tf_checkpoint import (
    TFCheckpointError,
    list_tf_checkpoint,
    read_tf_checkpoint,
)

from .bundle_writer import write_bundle

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "deeplab2")
DATA_FILE = "ckpt-1.data-00000-of-00001"


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()).hexdigest()


@pytest.fixture
def extracted(tmp_path):
    """The GeLU fixture checkpoint, extracted: returns its prefix ``.../maxs_gelu/ckpt-1``."""
    with tarfile.open(os.path.join(DATA, "maxs_gelu.tar.gz")) as tar:
        tar.extractall(tmp_path, filter="data")
    return str(tmp_path / "maxs_gelu" / "ckpt-1")


# ---------------------------------------------------------------------------------------------
# CRC-32C
# ---------------------------------------------------------------------------------------------
def test_crc32c_known_values_and_masking():
    assert crc.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    assert crc.crc32c(b"") == 0
    assert crc.crc32c(memoryview(b"xx123456789")[2:]) == 0xE3069283
    assert crc.crc32c(np.frombuffer(b"123456789", np.uint8)) == 0xE3069283
    assert crc.mask(0) == 0xA282EAD8
    for value in (0, 1, 0xE3069283, 0xFFFFFFFF):
        assert crc.unmask(crc.mask(value)) == value


# ---------------------------------------------------------------------------------------------
# Checkpoints written by TensorFlow (tools/fixtures/make_deeplab2_fixture.py)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["maxs_gelu", "maxs_relu"])
def test_reader_returns_exactly_what_tensorflow_wrote(name):
    with open(os.path.join(DATA, f"{name}_variables.json")) as f:
        manifest = json.load(f)  # TensorFlow's own reading: dtype, shape, SHA-256 of the bytes
    tensors = read_tf_checkpoint(os.path.join(DATA, f"{name}.tar.gz"))
    strings = {k for k, e in manifest.items() if e["dtype"] == "string"}
    assert strings == {"_CHECKPOINTABLE_OBJECT_GRAPH"}
    assert list(tensors) == sorted(set(manifest) - strings)
    for key, value in tensors.items():
        entry = manifest[key]
        assert (value.dtype.name, list(value.shape)) == (entry["dtype"], entry["shape"]), key
        assert _sha256(value) == entry["sha256"], key
        assert value.flags.writeable
    info = list_tf_checkpoint(os.path.join(DATA, f"{name}.tar.gz"))
    assert set(info) == set(manifest)
    assert info["_CHECKPOINTABLE_OBJECT_GRAPH"].dtype == "string"


def test_every_way_of_naming_the_checkpoint(extracted, tmp_path):
    reference = read_tf_checkpoint(extracted)
    folder = os.path.dirname(extracted)
    for path in (extracted + ".index", os.path.join(folder, DATA_FILE), folder, str(tmp_path)):
        result = read_tf_checkpoint(path)
        assert list(result) == list(reference)
        assert all(np.array_equal(result[k], reference[k]) for k in reference)


# ---------------------------------------------------------------------------------------------
# Damage, each reported with the file (and the tensor) concerned
# ---------------------------------------------------------------------------------------------
def _largest(prefix):
    info = list_tf_checkpoint(prefix)
    return max((i.size, k) for k, i in info.items() if i.dtype == "float32")[1], info


def test_truncated_data_file(extracted):
    data = os.path.join(os.path.dirname(extracted), DATA_FILE)
    info = list_tf_checkpoint(extracted)
    last = max(info, key=lambda k: info[k].offset + info[k].size)
    with open(data, "r+b") as f:
        f.truncate(info[last].offset + info[last].size - 1)
    with pytest.raises(TFCheckpointError, match="truncated") as e:
        read_tf_checkpoint(extracted)
    assert DATA_FILE in str(e.value) and repr(last) in str(e.value)


def test_flipped_byte_fails_the_tensor_checksum(extracted):
    key, info = _largest(extracted)
    with open(os.path.join(os.path.dirname(extracted), DATA_FILE), "r+b") as f:
        f.seek(info[key].offset + info[key].size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(TFCheckpointError, match="checksum") as e:
        read_tf_checkpoint(extracted)
    assert DATA_FILE in str(e.value) and repr(key) in str(e.value)
    assert key in read_tf_checkpoint(extracted, verify_crc=False)


def test_corrupt_index_magic_and_block(extracted):
    index = extracted + ".index"
    with open(index, "rb") as f:
        original = f.read()
    with open(index, "wb") as f:
        f.write(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(TFCheckpointError, match="bad magic number") as e:
        read_tf_checkpoint(extracted)
    assert "ckpt-1.index" in str(e.value)
    damaged = bytearray(original)
    damaged[len(original) // 3] ^= 0x01  # inside the data block: its checksum fails
    with open(index, "wb") as f:
        f.write(bytes(damaged))
    with pytest.raises(TFCheckpointError, match="not a valid TensorFlow checkpoint index.*checksum"):
        read_tf_checkpoint(extracted)
    with open(index, "wb") as f:
        f.write(b"not an index")
    with pytest.raises(TFCheckpointError, match="shorter than a table footer"):
        read_tf_checkpoint(extracted)


def test_missing_data_shard_and_missing_checkpoint(extracted, tmp_path):
    os.remove(os.path.join(os.path.dirname(extracted), DATA_FILE))
    with pytest.raises(TFCheckpointError, match="missing data shard") as e:
        read_tf_checkpoint(extracted)
    assert DATA_FILE in str(e.value)
    with pytest.raises(TFCheckpointError, match="ckpt-7.index not found"):
        read_tf_checkpoint(str(tmp_path / "ckpt-7"))
    with pytest.raises(TFCheckpointError, match="not found"):
        read_tf_checkpoint(str(tmp_path / "nothing.tar.gz"))


def test_archives_with_two_or_no_checkpoints(extracted, tmp_path):
    folder = os.path.dirname(extracted)
    shutil.copytree(folder, str(tmp_path / "second"))
    two = str(tmp_path / "two.tar.gz")
    with tarfile.open(two, "w:gz") as tar:
        tar.add(folder, arcname="first")
        tar.add(str(tmp_path / "second"), arcname="second")
    with pytest.raises(TFCheckpointError, match=r"contains 2 checkpoints \(first/ckpt-1, second/ckpt-1\)"):
        read_tf_checkpoint(two)
    with pytest.raises(TFCheckpointError, match="contains 2 checkpoints"):
        read_tf_checkpoint(str(tmp_path))  # a folder, searched recursively
    none = str(tmp_path / "none.tgz")
    with tarfile.open(none, "w:gz") as tar:
        tar.add(os.path.join(folder, "checkpoint"), arcname="checkpoint")
    with pytest.raises(TFCheckpointError, match=f"archive {none} contains no TensorFlow checkpoint"):
        read_tf_checkpoint(none)
    broken = str(tmp_path / "broken.tar.gz")
    with open(broken, "wb") as f:
        f.write(b"\x1f\x8b not really gzip")
    with pytest.raises(TFCheckpointError, match="cannot extract"):
        read_tf_checkpoint(broken)


# ---------------------------------------------------------------------------------------------
# Hand-written bundles: table layout, shards, dtypes, byte order
# ---------------------------------------------------------------------------------------------
def _tensors():
    rng = np.random.default_rng(1)
    bf16 = (rng.standard_normal(6).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return {
        "a/kernel": ("float32", rng.standard_normal((3, 3, 2, 4)).astype(np.float32)),
        "a/kernel_2": ("float32", rng.standard_normal(5).astype(np.float32)),
        "b/step": ("int64", np.array(7, dtype=np.int64)),
        "b/flags": ("bool", np.array([True, False, True])),
        "c/half": ("float16", rng.standard_normal((2, 2)).astype(np.float16)),
        "c/bf16": ("bfloat16", bf16),
        "c/empty": ("float32", np.zeros((0, 3), dtype=np.float32)),
        "d/graph": ("string", b"\x03abc"),
    }


@pytest.mark.parametrize("big_endian", [False, True])
def test_multi_block_multi_shard_bundle(tmp_path, big_endian):
    tensors = _tensors()
    prefix = str(tmp_path / "model.ckpt")
    write_bundle(prefix, tensors, num_shards=3, big_endian=big_endian, entries_per_block=2,
                 restart_interval=2)
    result = read_tf_checkpoint(prefix)
    assert list(result) == sorted(k for k in tensors if k != "d/graph")  # strings skipped
    for key, (dtype, value) in tensors.items():
        if dtype == "bfloat16":  # widened exactly to float32
            assert result[key].dtype == np.float32
            np.testing.assert_array_equal(result[key].view(np.uint32) >> 16, value)
        elif dtype != "string":
            assert result[key].dtype == value.dtype and result[key].dtype.isnative
            np.testing.assert_array_equal(result[key], value)
    os.remove(prefix + ".data-00001-of-00003")
    with pytest.raises(TFCheckpointError, match=r"missing data shard .*data-00001-of-00003"):
        read_tf_checkpoint(prefix)


def test_unsupported_dtype_and_compressed_index(tmp_path):
    prefix = str(tmp_path / "variant")
    write_bundle(prefix, {"v": ("variant", b"\x00" * 8), "w": ("float32", np.ones(2, np.float32))})
    with pytest.raises(TFCheckpointError, match="tensor 'v' has dtype variant") as e:
        read_tf_checkpoint(prefix)
    assert "variant.index" in str(e.value)
    prefix = str(tmp_path / "snappy")
    write_bundle(prefix, {"w": ("float32", np.ones(2, np.float32))}, compression=1)
    with pytest.raises(TFCheckpointError, match=r"is compressed \(snappy\)") as e:
        read_tf_checkpoint(prefix)
    assert "snappy.index" in str(e.value)
