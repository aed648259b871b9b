"""Bit packing: NumPy reference, round trips, exact sizes, bad bit widths."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, strategies as st

from medu_jax.packing import check_bits, pack_bits, unpack_bits


def np_pack(codes, bits):
    n = codes.shape[-1]
    w = -(-n // 32)
    c = np.zeros(codes.shape[:-1] + (w * 32,), np.uint64)
    c[..., :n] = codes
    c = c.reshape(codes.shape[:-1] + (w, 32))
    out = np.zeros(codes.shape[:-1] + (bits, w), np.uint64)
    for b in range(bits):
        out[..., b, :] = np.sum(((c >> b) & 1) << np.arange(32, dtype=np.uint64), axis=-1)
    return out.astype(np.uint32)


@given(bits=st.integers(1, 16), n=st.integers(1, 300), rows=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_pack_matches_reference_and_round_trips(bits, n, rows, seed):
    codes = np.random.default_rng(seed).integers(0, 2**bits, size=(rows, n), dtype=np.uint32)
    words = pack_bits(jnp.asarray(codes), bits)
    assert words.dtype == jnp.uint32 and words.shape == (rows, bits, -(-n // 32))
    np.testing.assert_array_equal(np.asarray(words), np_pack(codes, bits))
    np.testing.assert_array_equal(np.asarray(unpack_bits(words, bits, n)), codes)
    # real bytes: R bits per entry plus at most 31 entries of padding per bit-plane
    assert words.nbytes * 8 - rows * bits * n < rows * 32 * bits


@pytest.mark.parametrize("bad", [0, 17, -1, 2.5, True, "2"])
def test_bits_out_of_range(bad):
    with pytest.raises(ValueError, match="bits must be an integer in 1..16"):
        check_bits(bad)


def test_unpack_checks_planes():
    with pytest.raises(ValueError, match="bit-planes"):
        unpack_bits(jnp.zeros((3, 5), jnp.uint32), 2, 100)
