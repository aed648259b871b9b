"""Subtractive dithered lattice quantization with nested-lattice (Voronoi) codebooks.

A vector x is cut into groups, each normalised by a stored scale s (its max-abs or RMS), cut into blocks of
the lattice dimension L, and quantized as q = Q(u / step + z) with a dither z uniform over a basic cell of
the lattice.
The code is q's integer basis coordinates modulo 2**R (exactly R bits per entry); the decoder maps the code
back into the Voronoi region of the coarse lattice 2**R * Lambda and returns (q - z) * step * s. Without
overload the error is uniform over step * s * V(Lambda), zero-mean and independent of x.

Overload (q outside the coarse region) is detected by the encoder, which then shrinks the block towards the
origin along a fixed ladder of factors (ending with 0; if no factor fits, the block is coded as the lattice
point 0, which always decodes exactly) and counts the block as overloaded.
The dither is regenerated from a key on both sides: nothing random is stored.
"""

from __future__ import annotations

import dataclasses
import functools
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


def _fmix32(h: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 values."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def uniform01(key: Array, n: int, dtype=jnp.float32) -> Array:
    """n numbers uniform on [0, 1): a counter hashed with two 32-bit seeds drawn from ``key``.

    Counter-based and a dozen integer operations per number, so the dither costs about as much as reading
    the data; the seeds come from the jax.random key, so streams are derived by fold_in and never stored.
    """
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    h = _fmix32(_fmix32(jnp.arange(n, dtype=jnp.uint32) + seeds[0]) ^ seeds[1])
    if dtype == jnp.float64:
        return h.astype(jnp.float64) * (2.0**-32)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def dither(key: Array, spec: QuantizerSpec, n: int, dtype=jnp.float32) -> list:
    """The dither for a vector of n entries, L arrays of (blocks,): G (u - 1/2) with u uniform on [0, 1)^L.

    That is uniform over a centred fundamental parallelepiped, a basic cell of the lattice; subtractive dithering
    needs no more (z mod Lambda is then uniform on the torus, so the error is uniform over the Voronoi cell),
    and it saves the nearest-point reduction of a Voronoi-cell dither on both sides.
    """
    _, _, npad = spec.layout(n)
    u = uniform01(key, npad, dtype).reshape(spec.lattice.dim, -1) - 0.5
    return spec.lattice.from_coords_list(list(u))


def _wrap(points: list, lat: Lattice, bits: int) -> list:
    """Reduces lattice points modulo the coarse lattice 2**R Lambda into its Voronoi region."""
    m = float(2**bits)
    return [p - m * q for p, q in zip(points, lat.nearest_list([p * (1.0 / m) for p in points]))]


def _scales(x: Array, spec: QuantizerSpec, n: int) -> tuple[Array, Array]:
    g, ng, npad = spec.layout(n)
    xg = jnp.pad(x, (0, npad - n)).reshape(ng, g)
    s = jnp.max(jnp.abs(xg), axis=1)
    if spec.scale == "rms":  # computed as max * rms(x / max), so huge values do not overflow
        count = jnp.clip(n - g * jnp.arange(ng), 1, g).astype(x.dtype)  # real (unpadded) entries per group
        r = xg / jnp.where(s > 0, s, 1.0)[:, None]
        s = s * jnp.sqrt(jnp.sum(r * r, axis=1) / count)
    return xg, s.astype(jnp.float32)


def _blocks(v: Array, L: int) -> list:
    """(padded length,) -> L arrays of (blocks,): block j holds entries j, j + B, ..., j + (L-1) B. A strided
    partition needs no transpose, and any partition of the entries into blocks is a valid lattice quantizer."""
    return list(v.reshape(L, -1))


def quantize(x: Array, key: Array, spec: QuantizerSpec) -> Quantized:
    """Encodes a 1-D vector (float32/float64) into R-bit codes with the dither derived from ``key``."""
    n = x.shape[0]
    lat, L = spec.lattice, spec.lattice.dim
    cdt = jnp.float64 if x.dtype == jnp.float64 else jnp.float32
    x = x.astype(cdt)
    xg, s = _scales(x, spec, n)
    s_c = s.astype(cdt)
    safe = jnp.where(s_c > 0, s_c, 1.0)
    u = _blocks((xg * (1.0 / spec.step / safe)[:, None]).reshape(-1), L)
    z = dither(key, spec, n, cdt)
    m = 2**spec.bits
    code, found, overload = None, None, jnp.zeros((), jnp.int32)
    for alpha in spec.ladder:  # try shrink factors in order; keep the first that fits
        cq = lat.to_coords_list(lat.nearest_list([a * alpha + b for a, b in zip(u, z)]))
        c = [jnp.remainder(v, m) for v in cq]
        back = lat.to_coords_list(_wrap(lat.from_coords_list([v.astype(cdt) for v in c]), lat, spec.bits))
        fits = functools.reduce(jnp.logical_and, [a == b for a, b in zip(back, cq)])
        if code is None:
            code, found = c, fits
            overload = jnp.sum(~fits, dtype=jnp.int32)
        else:
            take = fits & ~found
            code = [jnp.where(take, a, b) for a, b in zip(c, code)]
            found = found | fits
    code = [jnp.where(found, v, 0) for v in code]  # code 0 (the point 0) always decodes exactly
    return Quantized(jnp.concatenate(code).astype(jnp.uint32), s, overload)


def dequantize(codes: Array, scales: Array, key: Array, spec: QuantizerSpec, n: int, dtype=jnp.float32) -> Array:
    """Decodes codes (padded length,) and scales into a vector of n entries of ``dtype``."""
    lat, L = spec.lattice, spec.lattice.dim
    cdt = jnp.float64 if dtype == jnp.float64 else jnp.float32
    g, ng, npad = spec.layout(n)
    p = _wrap(lat.from_coords_list([c.astype(cdt) for c in _blocks(codes.astype(jnp.int32), L)]), lat, spec.bits)
    z = dither(key, spec, n, cdt)
    u = jnp.concatenate([(a - b) * spec.step for a, b in zip(p, z)]).reshape(ng, g)
    return (u * scales.astype(cdt)[:, None]).reshape(-1)[:n].astype(dtype)
