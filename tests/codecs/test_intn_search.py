"""The C clipping search of intn-group.v1 gives the numpy search's float32 bits, so the same codes and scales.

Where the extension is not built (``python setup.py build_ext --inplace`` builds it), both
sides run the numpy path, as ``test_entropy`` does for its kernels.
"""

from __future__ import annotations

import numpy as np
import pytest

from shardstore.codecs import intn
from shardstore.codecs.quantize import bf16_ceil


def _parameters(groups: np.ndarray, bits: int, steps: int) -> tuple[np.ndarray, ...]:
    qmax = np.float32((1 << bits) - 1)
    lo = np.minimum(groups.min(axis=2), 0)
    hi = np.maximum(groups.max(axis=2), 0)
    scales = np.stack([bf16_ceil((hi - lo) * np.float32(1 - intn.CLIP_STEP * s) / qmax) for s in range(steps)])
    divisors = np.where(scales > 0, scales, np.float32(1))
    zeros = np.stack([np.clip(np.rint(-lo * np.float32(1 - intn.CLIP_STEP * s) / divisors[s]), 0, qmax)
                      for s in range(steps)])
    return divisors, zeros, scales, qmax


# Group sizes around numpy's pairwise-sum block (8 lanes, blocks of 128, halves split at multiples of 8)
# and past its 8192-element buffer; scales from subnormal-ish to large.
@pytest.mark.parametrize("size", [1, 7, 8, 9, 64, 127, 128, 129, 136, 384, 1000, 8192, 8200, 14336])
@pytest.mark.parametrize("scale", [1e-30, 0.02, 300.0])
def test_errors_and_codes_match_numpy_bit_for_bit(size: int, scale: float) -> None:
    rng = np.random.default_rng(size)
    groups = (rng.standard_normal((3, 2, size)) * scale).astype(np.float32)
    groups[0, 0, 0] *= 40  # an outlier: clipping then matters
    groups[2, 1] = 0  # an all-zero group: scale 0
    for bits in (2, 4, 8):
        divisors, zeros, scales, qmax = _parameters(groups, bits, 11)
        fast = intn._clip_errors(groups, divisors, zeros, scales, qmax, use_c=True)
        slow = intn._clip_errors(groups, divisors, zeros, scales, qmax, use_c=False)
        assert np.array_equal(fast.view(np.uint32), slow.view(np.uint32))
        for a, b in zip(intn._search(groups, bits, 11, use_c=True), intn._search(groups, bits, 11, use_c=False),
                        strict=True):
            assert np.array_equal(np.asarray(a).view(np.uint8), np.asarray(b).view(np.uint8))
