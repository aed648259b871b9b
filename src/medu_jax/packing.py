"""Bit packing of R-bit codes into uint32 words, so stored bytes are real bytes (R bits per entry + padding).

Codes are packed as R bit-planes of 32 entries per word: exactly R bits per entry, with at most 31 entries of
padding per plane, and a layout that is a few shifts and a sum, so XLA fuses it with the quantizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

MAX_BITS = 16


def check_bits(bits: int) -> int:
    """Validates a bit width (1..16 supported by the packer) and returns it as an int."""
    if isinstance(bits, bool) or not isinstance(bits, (int,)) or not 1 <= int(bits) <= MAX_BITS:
        raise ValueError(f"bits must be an integer in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def num_words(n: int) -> int:
    """Number of uint32 words per bit-plane for n entries."""
    return -(-n // 32)


def pack_bits(codes: Array, bits: int) -> Array:
    """Packs codes (..., N) with values in [0, 2**bits) into uint32 words of shape (..., bits, ceil(N/32))."""
    bits = check_bits(bits)
    n = codes.shape[-1]
    w = num_words(n)
    c = codes.astype(jnp.uint32)
    c = jnp.pad(c, [(0, 0)] * (c.ndim - 1) + [(0, w * 32 - n)])
    c = c.reshape(*c.shape[:-1], w, 32)
    planes = (c[..., None, :, :] >> jnp.arange(bits, dtype=jnp.uint32)[:, None, None]) & 1
    shifts = jnp.arange(32, dtype=jnp.uint32)
    return jnp.sum(planes << shifts, axis=-1, dtype=jnp.uint32)


def unpack_bits(words: Array, bits: int, n: int) -> Array:
    """Inverse of pack_bits: uint32 words (..., bits, W) to codes (..., n) as uint32."""
    bits = check_bits(bits)
    if words.shape[-2] != bits:
        raise ValueError(f"packed words have {words.shape[-2]} bit-planes, expected {bits}")
    shifts = jnp.arange(32, dtype=jnp.uint32)
    b = (words[..., :, :, None] >> shifts) & 1  # (..., bits, W, 32)
    b = b.reshape(*b.shape[:-2], -1)[..., :n]
    weights = (jnp.uint32(1) << jnp.arange(bits, dtype=jnp.uint32))[:, None]
    return jnp.sum(b * weights, axis=-2, dtype=jnp.uint32)
