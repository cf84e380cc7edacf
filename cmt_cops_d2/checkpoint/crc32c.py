"""CRC-32C (Castagnoli), which TensorFlow uses to checksum its checkpoint blocks and tensors, computed
by ``google_crc32c`` (a dependency: requirements.txt), plus TensorFlow's CRC masking.

TensorFlow stores *masked* CRCs (``mask``): the CRC rotated right by 15 bits, plus 0xa282ead8.
"""
import google_crc32c

__all__ = ["crc32c", "mask", "unmask"]

_MASK_DELTA = 0xA282EAD8
_U32 = 0xFFFFFFFF


def crc32c(data) -> int:
    """CRC-32C of a bytes-like object (the standard value: ``crc32c(b"123456789") == 0xE3069283``)."""
    return google_crc32c.value(bytes(data))


def mask(crc: int) -> int:
    """TensorFlow's masked CRC (``crc32c::Mask``): rotate right by 15 bits, add 0xa282ead8."""
    return ((((crc >> 15) | (crc << 17)) & _U32) + _MASK_DELTA) & _U32


def unmask(masked: int) -> int:
    """Inverse of :func:`mask`."""
    rot = (masked - _MASK_DELTA) & _U32
    return ((rot >> 17) | (rot << 15)) & _U32
