"""Subtractive dithered lattice quantization with nested-lattice (Voronoi) codebooks.

A vector x is cut into groups, each normalised by a stored scale s (its max-abs or RMS), cut into blocks of
the lattice dimension L, and quantized as q = Q(u / step + z) with a dither z uniform over the Voronoi cell.
The code is q's integer basis coordinates modulo 2**R (exactly R bits per entry); the decoder maps the code
back into the Voronoi region of the coarse lattice 2**R * Lambda and returns (q - z) * step * s. Without
overload the error is uniform over step * s * V(Lambda), zero-mean and independent of x.

Overload (q outside the coarse region) is detected by the encoder, which then shrinks the block towards the
origin along a fixed ladder of factors (the last is 0, which always fits) and counts the block as overloaded.
The dither is regenerated from a key on both sides: nothing random is stored.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from medu_jax.lattices import Lattice, get_lattice
from medu_jax.packing import check_bits

Array = jax.Array

SCALE_MODES = ("maxabs", "rms")


@dataclasses.dataclass(frozen=True)
class QuantizerSpec:
    """Static configuration of the dithered lattice quantizer.

    Attributes:
      lattice: the lattice (or its name).
      bits: R, bits per entry (1..16).
      scale: "maxabs" (s = max |x| of the group, rarely overloads) or "rms" (s = RMS of the group).
      clip: the codebook spans about [-clip, clip] per entry in units of s (default 1 for maxabs, 3 for rms).
      group_size: entries sharing one scale (rounded up to a multiple of L); None means one scale per leaf.
      ladder: shrink factors tried in order when a block overloads; must end with 0.0.
    """

    lattice: Lattice
    bits: int = 2
    scale: str = "maxabs"
    clip: float | None = None
    group_size: int | None = None
    ladder: tuple[float, ...] = (1.0, 0.75, 0.5, 0.0)

    def __post_init__(self):
        object.__setattr__(self, "lattice", get_lattice(self.lattice))
        object.__setattr__(self, "bits", check_bits(self.bits))
        if self.scale not in SCALE_MODES:
            raise ValueError(f"unknown scale mode {self.scale!r}: choose one of {SCALE_MODES}")
        if self.clip is None:
            object.__setattr__(self, "clip", 1.0 if self.scale == "maxabs" else 3.0)
        if not float(self.clip) > 0:
            raise ValueError(f"clip must be positive, got {self.clip!r}")
        if self.group_size is not None and (int(self.group_size) < 1):
            raise ValueError(f"group_size must be a positive integer or None, got {self.group_size!r}")
        ladder = tuple(float(a) for a in self.ladder)
        if not ladder or ladder[0] != 1.0 or ladder[-1] != 0.0:
            raise ValueError(f"ladder must start with 1.0 and end with 0.0, got {self.ladder!r}")
        object.__setattr__(self, "ladder", ladder)

    @property
    def step(self) -> float:
        """Fine-lattice scaling so that the coarse cell 2**R * step * V has the volume of [-clip, clip]^L."""
        lat = self.lattice
        return 2.0 * self.clip / (2**self.bits * lat.volume ** (1.0 / lat.dim))

    def layout(self, n: int) -> tuple[int, int, int]:
        """(group length, number of groups, padded length) for a vector of n entries."""
        L = self.lattice.dim
        g = max(n, 1) if self.group_size is None else int(self.group_size)
        g = -(-g // L) * L
        ng = -(-max(n, 1) // g)
        return g, ng, g * ng

    def error_variance(self) -> float:
        """Per-entry variance of the quantization error in units of s**2 (no overload): G V^(2/L) step^2."""
        lat = self.lattice
        return lat.second_moment * lat.volume ** (2.0 / lat.dim) * self.step**2


class Quantized(NamedTuple):
    """Quantizer output for one vector: codes (padded length,) uint32 in [0, 2**R); scales (groups,) float32."""

    codes: Array
    scales: Array
    overload: Array  # int32 scalar: number of overloaded blocks


def dither(key: Array, spec: QuantizerSpec, n: int, dtype=jnp.float32) -> Array:
    """The dither for a vector of n entries, shape (blocks, L), uniform over the Voronoi cell."""
    _, _, npad = spec.layout(n)
    return spec.lattice.uniform_cell(key, (npad // spec.lattice.dim,), dtype)


def _wrap(points: Array, lat: Lattice, bits: int) -> Array:
    """Reduces lattice points modulo the coarse lattice 2**R Lambda into its Voronoi region."""
    m = float(2**bits)
    return points - m * lat.nearest(points / m)


def _scales(x: Array, spec: QuantizerSpec, n: int) -> tuple[Array, Array]:
    g, ng, npad = spec.layout(n)
    xg = jnp.pad(x, (0, npad - n)).reshape(ng, g)
    if spec.scale == "maxabs":
        s = jnp.max(jnp.abs(xg), axis=1)
    else:
        count = jnp.clip(n - g * jnp.arange(ng), 1, g).astype(x.dtype)  # real (unpadded) entries per group
        s = jnp.sqrt(jnp.sum(xg * xg, axis=1) / count)
    return xg, s.astype(jnp.float32)


def quantize(x: Array, key: Array, spec: QuantizerSpec) -> Quantized:
    """Encodes a 1-D vector (float32/float64) into R-bit codes with the dither derived from ``key``."""
    n = x.shape[0]
    lat, L = spec.lattice, spec.lattice.dim
    cdt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = x.astype(cdt)
    xg, s = _scales(x, spec, n)
    s_c = s.astype(cdt)
    safe = jnp.where(s_c > 0, s_c, 1.0)
    u = (xg / safe[:, None]).reshape(-1, L) / spec.step
    z = dither(key, spec, n, cdt)
    alphas = jnp.asarray(spec.ladder, cdt)[:, None, None]
    q = lat.nearest(alphas * u[None] + z[None])  # (A, blocks, L)
    cq = lat.to_coords(q)
    m = 2**spec.bits
    code = jnp.remainder(cq, m)
    back = lat.to_coords(_wrap(lat.from_coords(code, cdt), lat, spec.bits))
    fits = jnp.all(back == cq, axis=-1)  # (A, blocks)
    first = jnp.argmax(fits, axis=0)
    chosen = jnp.take_along_axis(code, first[None, :, None], axis=0)[0]
    overload = jnp.sum(first > 0, dtype=jnp.int32)
    return Quantized(chosen.reshape(-1).astype(jnp.uint32), s, overload)


def dequantize(codes: Array, scales: Array, key: Array, spec: QuantizerSpec, n: int, dtype=jnp.float32) -> Array:
    """Decodes codes (padded length,) and scales into a vector of n entries of ``dtype``."""
    lat, L = spec.lattice, spec.lattice.dim
    cdt = jnp.float64 if dtype == jnp.float64 else jnp.float32
    g, ng, npad = spec.layout(n)
    c = codes.reshape(-1, L).astype(jnp.int32)
    p = _wrap(lat.from_coords(c, cdt), lat, spec.bits)
    z = dither(key, spec, n, cdt)
    u = ((p - z) * spec.step).reshape(ng, g)
    return (u * scales.astype(cdt)[:, None]).reshape(-1)[:n].astype(dtype)
