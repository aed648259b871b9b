"""Lattices for dithered lattice coding: exact nearest-point search and integer basis coordinates.

Each lattice is a small frozen (hashable) object, so it can be a static argument of jitted code. Points are
arrays whose last axis is the lattice dimension; every function is vectorised over the leading axes and works
in float32 and float64. The nearest-point algorithms are the exact ones of Conway & Sloane ("Fast quantizing
and decoding algorithms for lattice quantizers and codes", 1982).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _nearest_z(x: Array) -> Array:
    return jnp.round(x)


def _nearest_a2(x: Array) -> Array:
    # A2 = R  union  (R + (1/2, sqrt3/2)) with R the rectangular lattice Z x sqrt3 Z.
    r = jnp.asarray([1.0, math.sqrt(3.0)], x.dtype)
    off = jnp.asarray([0.5, math.sqrt(3.0) / 2.0], x.dtype)
    p0 = jnp.round(x / r) * r
    p1 = jnp.round((x - off) / r) * r + off
    d0 = jnp.sum((x - p0) ** 2, axis=-1, keepdims=True)
    d1 = jnp.sum((x - p1) ** 2, axis=-1, keepdims=True)
    return jnp.where(d1 < d0, p1, p0)


def _nearest_dn(x: Array) -> Array:
    # D_n: round every coordinate; if the sum is odd, round the worst coordinate the other way.
    f = jnp.round(x)
    err = x - f
    worst = jnp.argmax(jnp.abs(err), axis=-1)
    step = jnp.where(err >= 0, 1.0, -1.0).astype(x.dtype)
    flip = jax.nn.one_hot(worst, x.shape[-1], dtype=x.dtype) * step
    odd = (jnp.sum(f, axis=-1, keepdims=True) % 2) != 0
    return jnp.where(odd, f + flip, f)


def _nearest_e8(x: Array) -> Array:
    # E8 = D8  union  (D8 + 1/2).
    p0 = _nearest_dn(x)
    p1 = _nearest_dn(x - 0.5) + 0.5
    d0 = jnp.sum((x - p0) ** 2, axis=-1, keepdims=True)
    d1 = jnp.sum((x - p1) ** 2, axis=-1, keepdims=True)
    return jnp.where(d1 < d0, p1, p0)


@dataclasses.dataclass(frozen=True, eq=False)
class Lattice:
    """A lattice with generator matrix ``generator`` (columns are basis vectors) and its nearest-point map.

    Attributes:
      name: short name ("Z", "A2", "D4", "E8").
      dim: lattice dimension L (block length of the quantizer).
      generator: (L, L) float64 NumPy array; a lattice point is ``generator @ coords`` with integer coords.
      nearest: exact nearest-lattice-point function on arrays of shape (..., L).
      second_moment: the known normalised second moment G(Lambda) (dimensionless).
      covering_radius: radius of the Voronoi cell for this scaling of the lattice.
    """

    name: str
    dim: int
    generator: np.ndarray
    nearest: Callable[[Array], Array]
    second_moment: float
    covering_radius: float

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lattice) and other.name == self.name

    def __repr__(self) -> str:
        return f"Lattice({self.name})"

    @property
    def volume(self) -> float:
        """Volume of the Voronoi (basic) cell, |det G|."""
        return float(abs(np.linalg.det(self.generator)))

    def to_coords(self, points: Array) -> Array:
        """Integer basis coordinates (int32) of lattice points: round(G^-1 p)."""
        ginv = jnp.asarray(np.linalg.inv(self.generator), points.dtype)
        return jnp.round(points @ ginv.T).astype(jnp.int32)

    def from_coords(self, coords: Array, dtype=jnp.float32) -> Array:
        """Lattice points G c for integer coordinates c of shape (..., L)."""
        g = jnp.asarray(self.generator, dtype)
        return coords.astype(dtype) @ g.T

    def uniform_cell(self, key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        """Samples uniform over the Voronoi cell: uniform in the fundamental parallelepiped, reduced mod Lambda."""
        u = jax.random.uniform(key, (*shape, self.dim), dtype=dtype)
        p = self.from_coords(u, dtype)
        return p - self.nearest(p)


def _e8_generator() -> np.ndarray:
    g = np.zeros((8, 8))
    g[0, 0] = 2.0
    for i in range(1, 7):
        g[i, i - 1] = -1.0
        g[i, i] = 1.0
    g[7, :] = 0.5
    return g.T  # Conway & Sloane's rows become columns


Z = Lattice("Z", 1, np.eye(1), _nearest_z, 1.0 / 12.0, 0.5)
A2 = Lattice(
    "A2", 2, np.array([[1.0, 0.5], [0.0, math.sqrt(3.0) / 2.0]]), _nearest_a2, 5.0 / (36.0 * math.sqrt(3.0)),
    1.0 / math.sqrt(3.0),
)
D4 = Lattice(
    "D4", 4, np.array([[-1, -1, 0, 0], [1, -1, 0, 0], [0, 1, -1, 0], [0, 0, 1, -1]], dtype=float).T,
    _nearest_dn, 0.0766032, 1.0,
)
E8 = Lattice("E8", 8, _e8_generator(), _nearest_e8, 929.0 / 12960.0, 1.0)

LATTICES: dict[str, Lattice] = {lat.name: lat for lat in (Z, A2, D4, E8)}


def get_lattice(name: str | Lattice) -> Lattice:
    """Looks a lattice up by name ("Z", "A2", "D4", "E8"), case-insensitive; passes Lattice objects through."""
    if isinstance(name, Lattice):
        return name
    key = str(name).upper()
    if key in ("Z1", "SCALAR"):
        key = "Z"
    if key not in LATTICES:
        raise ValueError(f"unknown lattice {name!r}: choose one of {sorted(LATTICES)}")
    return LATTICES[key]
