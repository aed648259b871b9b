"""Lattices for dithered lattice coding: exact nearest-point search and integer basis coordinates.

Each lattice is a small frozen (hashable) object, so it can be a static argument of jitted code. Points are
arrays whose FIRST axis is the lattice dimension L (coordinate-major, shape (L, ...)). Internally a vector is a
list of L same-shaped arrays: every operation then runs elementwise on long contiguous vectors, which XLA
fuses and vectorises, instead of on a minor axis of length 2..8, which it does not.
Every function works in float32 and float64. The nearest-point algorithms are the exact ones of Conway & Sloane ("Fast quantizing
and decoding algorithms for lattice quantizers and codes", 1982).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


Coords = list  # a lattice vector as a list of L arrays of the same shape (coordinate-major)


def _nearest_z(x: Coords) -> Coords:
    return [jnp.round(x[0])]


def _nearest_a2(x: Coords) -> Coords:
    # A2 = R  union  (R + (1/2, sqrt3/2)) with R the rectangular lattice Z x sqrt3 Z.
    r3 = math.sqrt(3.0)
    a0, b0 = jnp.round(x[0]), jnp.round(x[1] * (1 / r3)) * r3
    a1, b1 = jnp.round(x[0] - 0.5) + 0.5, jnp.round(x[1] * (1 / r3) - 0.5) * r3 + r3 / 2
    d0 = (x[0] - a0) ** 2 + (x[1] - b0) ** 2
    d1 = (x[0] - a1) ** 2 + (x[1] - b1) ** 2
    use1 = d1 < d0
    return [jnp.where(use1, a1, a0), jnp.where(use1, b1, b0)]


def _nearest_dn(x: Coords) -> Coords:
    # D_n: round every coordinate; if the sum is odd, round the worst coordinate the other way.
    f = [jnp.round(v) for v in x]
    err = [v - r for v, r in zip(x, f)]
    best, worst = jnp.abs(err[0]), jnp.zeros(err[0].shape, jnp.int32)
    parity = f[0]
    for i in range(1, len(x)):
        a = jnp.abs(err[i])
        worst = jnp.where(a > best, i, worst)
        best = jnp.maximum(a, best)
        parity = parity + f[i]
    odd = jnp.remainder(parity, 2.0) != 0
    return [jnp.where(odd & (worst == i), r + jnp.where(e >= 0, 1.0, -1.0).astype(r.dtype), r)
            for i, (r, e) in enumerate(zip(f, err))]


def _nearest_e8(x: Coords) -> Coords:
    # E8 = D8  union  (D8 + 1/2).
    p0 = _nearest_dn(x)
    p1 = [v + 0.5 for v in _nearest_dn([v - 0.5 for v in x])]
    d0 = sum((v - p) ** 2 for v, p in zip(x, p0))
    d1 = sum((v - p) ** 2 for v, p in zip(x, p1))
    use1 = d1 < d0
    return [jnp.where(use1, b, a) for a, b in zip(p0, p1)]


@dataclasses.dataclass(frozen=True, eq=False)
class Lattice:
    """A lattice with generator matrix ``generator`` (columns are basis vectors) and its nearest-point map.

    Attributes:
      name: short name ("Z", "A2", "D4", "E8").
      dim: lattice dimension L (block length of the quantizer).
      generator: (L, L) float64 NumPy array; a lattice point is ``generator @ coords`` with integer coords.
      nearest_list: exact nearest-lattice-point function on lists of L arrays (use ``nearest`` for arrays).
      second_moment: the known normalised second moment G(Lambda) (dimensionless).
      covering_radius: radius of the Voronoi cell for this scaling of the lattice.
    """

    name: str
    dim: int
    generator: np.ndarray
    nearest_list: Callable[[Coords], Coords]
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

    def nearest(self, x: Array) -> Array:
        """Nearest lattice point of each column of x, shape (L, ...); ties go to either nearest point."""
        return jnp.stack(self.nearest_list(list(x)))

    def to_coords(self, points: Array) -> Array:
        """Integer basis coordinates (int32, shape (L, ...)) of lattice points: round(G^-1 p)."""
        return jnp.stack(self.to_coords_list(list(points)))

    def from_coords(self, coords: Array, dtype=jnp.float32) -> Array:
        """Lattice points G c for coordinates c of shape (L, ...) (integers, or reals for the cell)."""
        return jnp.stack(self.from_coords_list([c.astype(dtype) for c in coords]))

    def to_coords_list(self, points: Coords) -> Coords:
        return [jnp.round(v).astype(jnp.int32) for v in _matvec(np.linalg.inv(self.generator), points)]

    def from_coords_list(self, coords: Coords) -> Coords:
        return _matvec(self.generator, coords)


def _matvec(m: np.ndarray, x: Coords) -> Coords:
    """m @ x for a constant matrix m and a list of arrays x, unrolled (zero entries skipped)."""
    rows = []
    for i in range(m.shape[0]):
        terms = [x[j] if m[i, j] == 1.0 else float(m[i, j]) * x[j] for j in range(m.shape[1]) if m[i, j] != 0.0]
        rows.append(functools.reduce(lambda a, b: a + b, terms) if terms else jnp.zeros_like(x[0]))
    return rows


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
