"""``rounding``: float64 -> checkpoint dtype rounds once, to nearest (ties to even); decoding is exact.

The reference for "nearest" is exact rational arithmetic (``fractions``), not another float library.
Values just off a tie are where a double rounding goes wrong, so they are built on purpose.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch

from lmdeploy_regex_lora.merge.rounding import decode, encode, finite_encoded

MANTISSA = {"F32": 23, "F16": 10, "BF16": 7}
TORCH = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _representable(code: str, n: int, seed: int) -> np.ndarray:
    """``n`` random normal values exactly representable in ``code`` (as float64)."""
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randn(n, generator=gen, dtype=torch.float64) * 4).to(TORCH[code]).double().numpy()
    return values[np.abs(values) > 2.0**-14]  # normal in every format here


def _half_ulp(code: str, values: np.ndarray) -> np.ndarray:
    return 2.0 ** (np.floor(np.log2(np.abs(values))) - MANTISSA[code] - 1)


def _nearest_even(code: str, x: float) -> float:
    """The nearest ``code`` value to ``x``, ties to even, by exact comparison with both neighbours."""
    t = torch.tensor([x], dtype=torch.float64).to(TORCH[code])  # some neighbour; then search around it
    bits_dtype = {"F32": torch.int32, "F16": torch.int16, "BF16": torch.int16}[code]
    center = int(t.view(bits_dtype)[0])
    best = None
    width = 32 if code == "F32" else 16
    for step in range(-2, 3):
        cand = (center + step + 2 ** (width - 1)) % 2**width - 2 ** (width - 1)  # wrap around, as bits do
        value = torch.tensor([cand], dtype=bits_dtype).view(TORCH[code]).double().item()
        if not np.isfinite(value):
            continue
        key = (abs(Fraction(value) - Fraction(x)), cand & 1)
        if best is None or key < best[0]:
            best = (key, value)
    return best[1]


@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
def test_rounds_once_next_to_ties(code):
    exact = _representable(code, 4000, seed=1)
    half = _half_ulp(code, exact)
    # Off the tie by far less than float32 resolves (for float16/bfloat16: a float32 intermediate would
    # land on the tie), but by more than float64 does.
    eps = 2.0**-20 if code == "F32" else 2.0**-30
    above = exact + np.sign(exact) * half * (1 + eps)
    below = exact + np.sign(exact) * half * (1 - eps)
    tie = exact + np.sign(exact) * half
    up = np.abs(decode(code, encode(code, above).tobytes())) > np.abs(exact)
    down = np.abs(decode(code, encode(code, below).tobytes())) > np.abs(exact)
    assert up.all() and not down.any()
    got_tie = decode(code, encode(code, tie).tobytes())
    for x, g in zip(tie[:300], got_tie[:300], strict=True):
        assert g == _nearest_even(code, float(x))


def test_bfloat16_double_rounding_would_be_wrong():
    """The control: float64 -> float32 -> bfloat16 (torch's route) sends values just above a tie to even."""
    exact = _representable("BF16", 4000, seed=2)
    above = exact + np.sign(exact) * _half_ulp("BF16", exact) * (1 + 2.0**-30)
    twice = torch.from_numpy(above).float().to(torch.bfloat16).double().numpy()
    once = decode("BF16", encode("BF16", above).tobytes())
    assert (twice != once).mean() > 0.3  # about half are ties-to-even the wrong way
    assert (np.abs(once) > np.abs(exact)).all()


@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
def test_random_values_are_nearest(code):
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.standard_normal(400) * 10.0 ** rng.integers(-6, 4, 400), rng.standard_normal(50) * 1e-41])
    got = decode(code, encode(code, x).tobytes())
    for xi, g in zip(x, got, strict=True):
        assert g == _nearest_even(code, float(xi)), (code, xi)


@pytest.mark.parametrize("code", ["F32", "F16", "BF16"])
def test_overflow_nan_and_decode(code):
    big = {"F32": 1e39, "F16": 70000.0, "BF16": 1e39}[code]
    enc = encode(code, np.array([big, -big, np.nan, 1.0]))
    assert finite_encoded(code, enc).tolist() == [False, False, False, True]
    dec = decode(code, enc.tobytes())
    assert dec[0] == np.inf and dec[1] == -np.inf and np.isnan(dec[2]) and dec[3] == 1.0
    # Decoding is exact: the bytes torch writes decode to torch's own float64 values.
    t = torch.randn(1000, dtype=torch.float64).to(TORCH[code])
    raw = t.view(torch.uint8).numpy().tobytes()
    assert np.array_equal(decode(code, raw), t.double().numpy())
