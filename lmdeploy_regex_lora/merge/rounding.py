"""Checkpoint float formats in numpy: decoding to float64, and rounding float64 once to the nearest value.

``merge`` computes ``W + scaling * B @ A`` in float64 and rounds it once, to the nearest value of the
shard's dtype (ties to even). That result does not depend on the machine's BLAS, unlike a float32
product (PEFT's ``merge_and_unload`` rounds B @ A to float32 in whatever order the BLAS sums it).

numpy's float64 -> float32 and float64 -> float16 casts round directly (tests/test_rounding.py checks
values just off the ties). numpy has no bfloat16: it is the top half of a float32's bits. Rounding
twice (float64 -> float32 -> bfloat16) is not rounding once: a value just above a bfloat16 tie
becomes the tie in float32 and then goes to even. So a float64 is first rounded to float32 *to odd*
(truncate, then set the last bit if anything was dropped), after which rounding to 8 significant
bits by integer arithmetic gives what one direct rounding would (round-to-odd needs 2 spare bits;
float32 has 16 more than bfloat16).
"""

from __future__ import annotations

import numpy as np

from ..safetensors_io import DTYPES


def decode(code: str, data) -> np.ndarray:
    """A flat float64 array of the little-endian ``data`` (bytes-like) holding ``code`` values; exact."""
    if code == "BF16":
        bits = np.frombuffer(data, dtype="<u2").astype(np.uint32)
        bits <<= 16
        return bits.view(np.float32).astype(np.float64)
    return np.frombuffer(data, dtype=np.dtype(DTYPES[code].numpy_name)).astype(np.float64)


def _odd_f32_bits(x: np.ndarray) -> np.ndarray:
    """Each float64 rounded to float32 *to odd*, as uint32 bits (NaN stays NaN)."""
    nearest = x.astype(np.float32)
    bits = nearest.view(np.uint32).copy()
    back = nearest.astype(np.float64)
    inexact = back != x  # NaN too: its last bit set keeps it a NaN
    # Where rounding to nearest went away from zero, step one unit back toward zero (the bits are
    # sign-magnitude, so minus one shrinks the magnitude for either sign), then mark every inexact
    # result by its last bit.
    bits[inexact & (np.abs(back) > np.abs(x))] -= np.uint32(1)
    bits[inexact] |= np.uint32(1)
    return bits


def _bf16_bits(x: np.ndarray) -> np.ndarray:
    """The nearest bfloat16 (ties to even) of each float64, as uint16 bits."""
    bits = _odd_f32_bits(x)
    nan = np.isnan(x)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    rounded >>= 16
    out = rounded.astype(np.uint16)
    if nan.any():
        out[nan] = ((bits[nan] >> 16) | np.uint32(0x0040)).astype(np.uint16)  # stays a (quiet) NaN
    return out


def encode(code: str, x: np.ndarray) -> np.ndarray:
    """``x`` (float64) rounded once to the nearest ``code`` value, as an array whose bytes are the tensor's."""
    if code == "BF16":
        return _bf16_bits(x).astype("<u2", copy=False)
    return x.astype(np.dtype(DTYPES[code].numpy_name), copy=False)


def finite_encoded(code: str, encoded: np.ndarray) -> np.ndarray:
    """Which encoded values are finite (bfloat16: exponent bits not all ones)."""
    if code == "BF16":
        return (encoded & np.uint16(0x7F80)) != np.uint16(0x7F80)
    return np.isfinite(encoded)
