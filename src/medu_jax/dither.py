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

Options that change no bits of the defaults (all opt-in): ``clip="cover"`` (a codebook that contains the
whole max-abs cube, so the maxabs scale never overloads: the A2/D4/E8 coarse cells of the default clip 1 cut
the cube's corners, which at 16 bits turned a 1e-9 error into a 25% one), ``clip="fit"`` (the clip measured
best for Gaussian groups with the rms scale, per lattice and bit width, see docs/codec.md) and ``gain``
(a decoder-side shrinkage factor; "wiener" is 1 / (1 + error variance) for the rms scale, which makes 1-bit
codes better than storing zeros, at the price of a biased error).
Groups whose scale is tiny (below 2**-60, where (1/step)/scale overflowed float32 at high bit widths and the
group decoded to ~0) are normalised in two exact steps; every other group keeps its bits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.lattices import Lattice, get_lattice
from medu_jax.packing import check_bits

Array = jax.Array

SCALE_MODES = ("maxabs", "rms")
CLIP_RULES = ("cover", "fit")
GAIN_RULES = ("wiener",)

TINY_SCALE = 2.0**-60  # below this, (1/step)/scale can overflow float32 (1/step reaches 3.3e4 at 16 bits)
TINY_LIFT = 2.0**64  # exact power of two: tiny groups are normalised as (x * 2**64) * ((1/step) / (s * 2**64))

# clip="fit": the clip (in rms units) that minimised the MSE of N(0, 1) vectors of 32768 entries with the rms
# scale and gain="wiener", per lattice and bit width, on a grid of 0.25 from 1 to 4
# (benchmarks/rate_distortion.py --fit --n 32768 --lattices Z; Z, A2 and D4 at 1-3 bits measured so; D4 at
# 4 bits and E8 from a coarser search over 2.0-3.5: the grid search did not finish in its time box).
FIT_CLIP = {
    "Z": {1: 1.25, 2: 2.5, 3: 2.5, 4: 3.0},
    "A2": {1: 1.5, 2: 2.25, 3: 2.5, 4: 3.0},
    "D4": {1: 2.5, 2: 2.75, 3: 2.5, 4: 3.0},
    "E8": {1: 3.0, 2: 3.0, 3: 3.0, 4: 3.0},
}


def fitted_clip(lattice: Lattice, bits: int) -> float:
    """``clip="fit"``: the table's clip for (lattice, bits); above 4 bits, the 4-bit clip times sqrt(bits / 4)
    (the optimal loading of a uniform quantizer for a Gaussian grows about as sqrt(R); not fitted)."""
    table = FIT_CLIP[lattice.name]
    if bits in table:
        return table[bits]
    top = max(table)
    return float(table[top] * np.sqrt(bits / top))


@functools.lru_cache(maxsize=None)
def _cell_geometry(lat: Lattice) -> tuple[np.ndarray, float, float]:
    """(unit facet normals of the Voronoi cell, packing radius, max over the dither parallelepiped and the
    normals of n . z) for the lattice as generated. The Voronoi-relevant vectors of Z, A2, D4 and E8 are their
    minimal vectors: lattice points among integer coordinates -2..2 of the generator, plus, for E8 (whose
    roots need larger coordinates in this basis), the 240 roots (+-1, +-1, 0^6) and (+-1/2)^8 (even signs)."""
    g = lat.generator
    grid = np.array(np.meshgrid(*[np.arange(-2, 3)] * lat.dim, indexing="ij")).reshape(lat.dim, -1)
    pts = g @ grid
    if lat.dim == 8:
        halves = np.array(np.meshgrid(*[[-0.5, 0.5]] * 8, indexing="ij")).reshape(8, -1)
        halves = halves[:, np.sum(halves < 0, axis=0) % 2 == 0]
        pairs = [np.eye(8)[i] * a + np.eye(8)[j] * b for i in range(8) for j in range(i + 1, 8)
                 for a in (-1, 1) for b in (-1, 1)]
        pts = np.concatenate([pts, halves, np.array(pairs).T], axis=1)
        coords = np.linalg.solve(g, pts)
        pts = pts[:, np.all(np.abs(coords - np.round(coords)) < 1e-9, axis=0)]  # keep lattice points only
    norms = np.linalg.norm(pts, axis=0)
    nz = norms > 1e-9
    m = norms[nz].min()
    minimal = np.unique(np.round(pts[:, nz & (norms < m * (1 + 1e-9))], 9), axis=1)
    normals = minimal / m
    signs = np.array(np.meshgrid(*[[-0.5, 0.5]] * lat.dim, indexing="ij")).reshape(lat.dim, -1)
    zmax = float(np.max(normals.T @ (g @ signs)))
    return normals, m / 2.0, zmax


def dithered_entropy(step: float) -> float:
    """Entropy in bits of the Z code Q = round(x / step + z) of x ~ N(0, 1) with the subtractive dither z
    uniform on [-1/2, 1/2): P(Q = k) = (F((k + 1) step) - 2 F(k step) + F((k - 1) step)) / step with
    F(u) = u Phi(u) + phi(u), the second antiderivative of the Gaussian density (exact, no sampling)."""
    step = float(step)
    k = np.arange(-int(np.ceil(12.0 / step)) - 1, int(np.ceil(12.0 / step)) + 2, dtype=np.float64)
    u = np.concatenate([k[:1] - 1, k, k[-1:] + 1]) * step
    cdf = 0.5 * (1.0 + np.frompyfunc(math.erf, 1, 1)(u / math.sqrt(2.0)).astype(np.float64))
    f = u * cdf + np.exp(-0.5 * u * u) / math.sqrt(2.0 * math.pi)
    p = np.maximum((f[2:] - 2.0 * f[1:-1] + f[:-2]) / step, 0.0)
    p = p[p > 0] / p.sum()
    return float(-np.sum(p * np.log2(p)))


ENTROPY_SPAN = 8.0  # entropy_clip: the codebook must span at least +-8 rms (a Gaussian entry beyond: p ~ 1e-15)


def entropy_clip(rate: float, bits: int) -> float:
    """The clip (rms units) of Z codes ``bits`` wide whose step gives ``rate`` bits of entropy per entry on
    Gaussian groups with scale="rms": the setting for ``lattice_coding(..., entropy="ans")``, where ``bits`` is
    only the code width and the entropy is the stored rate. The step solves ``dithered_entropy(step) = rate``
    (bisection); clip = step * 2**bits / 2. Raises when the width leaves the codebook narrower than +-8 rms."""
    bits = check_bits(bits)
    rate = float(rate)
    if not 0.05 <= rate <= 12.0:
        raise ValueError(f"rate must be in [0.05, 12] bits per entry, got {rate!r}")
    lo, hi = math.log2(2.0**-14), math.log2(64.0)  # log2 of the step: entropy falls as the step grows
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if dithered_entropy(2.0**mid) > rate else (lo, mid)
    clip = 2.0 ** (0.5 * (lo + hi)) * 2**bits / 2.0
    if clip < ENTROPY_SPAN:
        raise ValueError(f"{bits}-bit codes at {rate:g} bits of entropy span only +-{clip:.3g} rms (overload); "
                         f"use more bits (the width costs nothing once entropy coded)")
    return float(clip)


COVER_MARGIN_MAX = 1.25  # clip="cover" pays at most this factor for the dither's margin (else the ladder does)


def cover_clip(lat: Lattice, bits: int) -> float:
    """``clip="cover"``: a clip whose coarse cell holds the whole max-abs cube [-1, 1]^L, so the maxabs scale
    does not overload. The cube fits the coarse cell when for every facet normal n, max_cube n . u <= 2**R *
    packing radius (the asymptotic clip h V^(1/L) / (2 rho), h = max ||n||_1: Z 1, A2 1.27, D4 1.19, E8 2);
    with the dither z and the fine cell added (n . z + covering radius), a margin factor 1 / (1 - (max n . z +
    covering radius) / (2**R rho)) makes it certain. The margin is paid where it costs at most 1.25x (Z from 4
    bits, A2 from 4, D4 from 5, E8 from 5): there no block overloads; below, the asymptotic clip is used and
    the rare overloaded block walks the ladder, whose error is then of the order of the step anyway."""
    normals, rho, zmax = _cell_geometry(lat)
    h = float(np.max(np.sum(np.abs(normals), axis=0)))  # max over the cube's corners of n . u
    base = h * lat.volume ** (1.0 / lat.dim) / (2.0 * rho)
    frac = (zmax + lat.covering_radius) / (rho * 2.0**bits)
    factor = 1.0 / (1.0 - frac) if frac < 1 else np.inf
    return float(base * (factor if factor <= COVER_MARGIN_MAX else 1.0))


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
      gain: decoder-side factor on the reconstruction (None: 1, the unbiased decoder); "wiener" is
        1 / (1 + error_variance()), the MMSE gain for a group whose mean square is s**2 (scale="rms" only).
    Clip rules: clip="cover" (no overload of the maxabs cube) and clip="fit" (rms, the Gaussian-fitted table)
    are resolved to numbers here.
    """

    lattice: Lattice
    bits: int = 2
    scale: str = "maxabs"
    clip: float | str | None = None
    group_size: int | None = None
    ladder: tuple[float, ...] = (1.0, 0.75, 0.5, 0.0)
    gain: float | str | None = None

    def __post_init__(self):
        object.__setattr__(self, "lattice", get_lattice(self.lattice))
        object.__setattr__(self, "bits", check_bits(self.bits))
        if self.scale not in SCALE_MODES:
            raise ValueError(f"unknown scale mode {self.scale!r}: choose one of {SCALE_MODES}")
        if self.clip is None:
            object.__setattr__(self, "clip", 1.0 if self.scale == "maxabs" else 3.0)
        elif isinstance(self.clip, str):
            if self.clip not in CLIP_RULES:
                raise ValueError(f"unknown clip rule {self.clip!r}: a positive number or one of {CLIP_RULES}")
            if self.clip == "cover" and self.scale != "maxabs":
                raise ValueError('clip="cover" covers the max-abs cube: it needs scale="maxabs"')
            if self.clip == "fit" and self.scale != "rms":
                raise ValueError('clip="fit" is fitted for Gaussian groups with scale="rms"')
            rule = cover_clip if self.clip == "cover" else fitted_clip
            object.__setattr__(self, "clip", float(rule(self.lattice, self.bits)))
        if isinstance(self.clip, bool) or not float(self.clip) > 0 or not np.isfinite(float(self.clip)):
            raise ValueError(f"clip must be positive, got {self.clip!r}")
        if self.gain is not None:
            if isinstance(self.gain, str):
                if self.gain not in GAIN_RULES:
                    raise ValueError(f"unknown gain rule {self.gain!r}: a number in (0, 1] or one of {GAIN_RULES}")
                if self.scale != "rms":
                    raise ValueError('gain="wiener" assumes the group mean square s**2: it needs scale="rms"')
            elif isinstance(self.gain, bool) or not 0.0 < float(self.gain) <= 1.0:
                raise ValueError(f"gain must be in (0, 1], a rule in {GAIN_RULES}, or None; got {self.gain!r}")
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

    def layout(self, sizes: int | tuple[int, ...]) -> "Layout":
        """Scale groups and padding for a vector of ``sizes`` entries (or for leaves of those sizes, concatenated)."""
        return Layout(tuple(int(n) for n in np.atleast_1d(sizes)), self.group_size, self.lattice.dim)

    def error_variance(self) -> float:
        """Per-entry variance of the quantization error in units of s**2 (no overload): G V^(2/L) step^2."""
        lat = self.lattice
        return lat.second_moment * lat.volume ** (2.0 / lat.dim) * self.step**2

    @property
    def decode_gain(self) -> float | None:
        """The decoder's factor on the reconstruction, or None (1: the unbiased decoder, no multiply)."""
        if self.gain is None:
            return None
        if self.gain == "wiener":
            return 1.0 / (1.0 + self.error_variance())
        return None if float(self.gain) == 1.0 else float(self.gain)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How a user's update, made of segments (leaves) of ``sizes`` entries, is cut into scale groups and blocks.

    Each segment is zero-padded to a multiple of L and coded on its own (its blocks never straddle leaves, so
    decoding writes each leaf directly, with no slicing of a fused computation); its entries are cut into
    groups of ``group`` entries (one group per segment when None). The dither counter runs over the padded
    segments in order, so the codes of all leaves concatenated are those of one padded vector.
    """

    sizes: tuple[int, ...]
    group: int | None
    L: int

    @functools.cached_property
    def groups_per_segment(self) -> tuple[int, ...]:
        return tuple(1 if self.group is None else max(1, -(-n // self.group)) for n in self.sizes)

    def group_length(self, i: int) -> int:
        """Entries per scale group in segment i (the whole segment when group is None)."""
        return max(self.sizes[i], 1) if self.group is None else self.group

    @functools.cached_property
    def padded_sizes(self) -> tuple[int, ...]:
        return tuple(max(-(-n // self.L) * self.L, self.L) for n in self.sizes)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(o) for o in np.cumsum((0,) + self.padded_sizes[:-1]))

    @property
    def num_groups(self) -> int:
        return sum(self.groups_per_segment)

    @property
    def size(self) -> int:
        return sum(self.sizes)

    @property
    def padded(self) -> int:
        return sum(self.padded_sizes)

    @functools.cached_property
    def seg_ids(self) -> np.ndarray:
        """Group index of every padded entry (padding belongs to its segment's last group)."""
        ids, base = [], 0
        for i, (n, ng, npad) in enumerate(zip(self.sizes, self.groups_per_segment, self.padded_sizes)):
            ids.append(base + np.minimum(np.arange(npad) // self.group_length(i), ng - 1))
            base += ng
        return np.concatenate(ids).astype(np.int32)

    @functools.cached_property
    def counts(self) -> np.ndarray:
        """Real entries per group (at least 1)."""
        real = np.concatenate([np.arange(npad) < n for n, npad in zip(self.sizes, self.padded_sizes)])
        return np.maximum(np.bincount(self.seg_ids[real], minlength=self.num_groups), 1)


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


def hash_bits(key: Array, n: int, offset: int = 0) -> Array:
    """n uint32 words: a counter hashed with two 32-bit seeds drawn from ``key`` (words offset .. offset + n - 1
    of the stream). Counter-based and a dozen integer operations per word, where jax.random's threefry runs as a
    rolled loop on CPU; the seeds come from the jax.random key, so streams are derived by fold_in, never stored."""
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    return _fmix32(_fmix32(jnp.arange(offset, offset + n, dtype=jnp.uint32) + seeds[0]) ^ seeds[1])


def uniform01(key: Array, n: int, dtype=jnp.float32, offset: int = 0) -> Array:
    """n numbers uniform on [0, 1) from ``hash_bits``: the dither costs about as much as reading the data."""
    h = hash_bits(key, n, offset)
    if dtype == jnp.float64:
        return h.astype(jnp.float64) * (2.0**-32)
    return (h >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)


def dither(key: Array, spec: QuantizerSpec, npad: int, dtype=jnp.float32, offset: int = 0) -> list:
    """The dither for npad entries (a multiple of L), L arrays of (blocks,): G (u - 1/2), u uniform on [0, 1)^L.

    That is uniform over a centred fundamental parallelepiped, a basic cell of the lattice; subtractive dithering
    needs no more (z mod Lambda is then uniform on the torus, so the error is uniform over the Voronoi cell),
    and it saves the nearest-point reduction of a Voronoi-cell dither on both sides.
    """
    u = uniform01(key, npad, dtype, offset).reshape(spec.lattice.dim, -1) - 0.5
    return spec.lattice.from_coords_list(list(u))


def _wrap(points: list, lat: Lattice, bits: int) -> list:
    """Reduces lattice points modulo the coarse lattice 2**R Lambda into its Voronoi region."""
    m = float(2**bits)
    return [p - m * q for p, q in zip(points, lat.nearest_list([p * (1.0 / m) for p in points]))]


def segment_scales(x: Array, group: int, mode: str) -> Array:
    """Scales (float32) of the groups of ``group`` entries of one segment x (n,): max |x|, or RMS computed as
    max * rms(x / max) so that huge values do not overflow. Static slices and reshapes: no scatter."""
    n = x.shape[0]
    ng = max(1, -(-n // group))
    g = jnp.pad(x, (0, ng * group - n)).reshape(ng, group)
    s = jnp.max(jnp.abs(g), axis=1)
    if mode == "rms":
        counts = np.maximum(np.minimum(group, n - group * np.arange(ng)), 1)
        r = g / jnp.where(s > 0, s, 1.0)[:, None]
        s = s * jnp.sqrt(jnp.sum(r * r, axis=1) / jnp.asarray(counts, x.dtype))
    return s.astype(jnp.float32)


def _per_entry(v: Array, group: int, npad: int) -> Array:
    """(groups,) per-group values -> (npad,) per-entry values (padding takes the last group's), no gather."""
    ng = v.shape[0]
    e = jnp.broadcast_to(v[:, None], (ng, group)).reshape(-1)
    return e[:npad] if e.shape[0] >= npad else jnp.pad(e, (0, npad - e.shape[0]), mode="edge")


def _blocks(v: Array, L: int) -> list:
    """(padded length,) -> L arrays of (blocks,): block j holds entries j, j + B, ..., j + (L-1) B. A strided
    partition needs no transpose, and any partition of the entries into blocks is a valid lattice quantizer."""
    return list(v.reshape(L, -1))


LADDER_DENSE_BLOCKS = 256  # segments up to this many blocks run the whole ladder on every block
LADDER_SHARE = 16  # larger segments of D4/E8 give the ladder to at most 1/16 of their blocks


def _try(alpha: float, ub: list, z: list, lat: Lattice, bits: int, cdt) -> tuple[list, Array]:
    """Codes of Q(alpha * u + z) modulo 2**R, and whether Q fell inside the coarse Voronoi region (no overload)."""
    m = 2**bits
    cq = lat.to_coords_list(lat.nearest_list([a * alpha + b for a, b in zip(ub, z)]))
    c = [jnp.remainder(v, m) for v in cq]
    back = lat.to_coords_list(_wrap(lat.from_coords_list([v.astype(cdt) for v in c]), lat, bits))
    return c, functools.reduce(jnp.logical_and, [a == b for a, b in zip(back, cq)])


def _ladder(ub: list, z: list, alphas: tuple, lat: Lattice, bits: int, cdt, first=None) -> list:
    """Codes of the first shrink factor in ``alphas`` that fits, per block; code 0 (the point 0) if none does.
    ``first``: the (codes, fits) of a factor already tried, taken where it fits. The factors run in a
    ``lax.scan``, so the nearest-point search is compiled once, not once per factor."""
    if first is None:
        first, alphas = _try(alphas[0], ub, z, lat, bits, cdt), alphas[1:]

    def step(carry, alpha):
        code, found = carry
        c, fits = _try(alpha, ub, z, lat, bits, cdt)
        take = fits & ~found
        return ([jnp.where(take, a, b) for a, b in zip(c, code)], found | fits), None

    code, found = first
    if alphas:
        (code, found), _ = jax.lax.scan(step, (list(code), found), jnp.asarray(alphas, cdt))
    return [jnp.where(found, v, 0) for v in code]


def _concat_blocks(per: list, L: int) -> list:
    """Per-segment blocks (each L arrays) -> L arrays over all blocks, segment after segment."""
    return [jnp.concatenate([b[j] for b in per]) if len(per) > 1 else per[0][j] for j in range(L)]


def _segment_blocks(vs: list, L: int) -> list:
    """Segments (each (padded length,)) -> L arrays over all their blocks: every block is the one ``_blocks``
    gives within its own segment, so one lattice pass codes them all (XLA compiles one pass instead of one per
    pytree leaf; docs/performance.md, "One lattice pass for all leaves")."""
    return _concat_blocks([_blocks(v, L) for v in vs], L)


def _segment_dither(key: Array, spec: QuantizerSpec, npads: tuple, dtype) -> list:
    """The dither of consecutive padded segments (segment i's starts at the stream's number sum(npads[:i])), laid
    out as ``_segment_blocks``."""
    offs = np.cumsum((0,) + tuple(npads[:-1]))
    return _concat_blocks([dither(key, spec, n, dtype, int(o)) for o, n in zip(offs, npads)], spec.lattice.dim)


def _split_blocks(cs: list, nbs: tuple) -> list:
    """Inverse of ``_segment_blocks``: L arrays over all blocks -> one (padded length,) array per segment."""
    out, b = [], 0
    for nb in nbs:
        out.append(jnp.concatenate([c[b : b + nb] for c in cs]))
        b += nb
    return out


def encode_segments(us: list, key: Array, spec: QuantizerSpec) -> tuple[list, Array]:
    """Codes (uint32, one array per segment) and overload count of consecutive padded segments u = x / (step *
    scale); segment i's dither is the stream's numbers from the sum of the earlier segments' lengths on.

    Overloaded blocks (rare) walk the shrink ladder. For D4 and E8, whose nearest-point search is costly,
    segments of more than 256 blocks run the ladder only on their first ceil(blocks / 16) overloaded blocks,
    gathered (measured 1.3-3x faster on CPU; for Z and A2 the gather costs more than it saves); further
    overloaded blocks (a segment where over 1/16 overload has a badly chosen scale) are coded 0.
    """
    lat = spec.lattice
    cdt = us[0].dtype
    nbs = tuple(u.shape[0] // lat.dim for u in us)
    ub = _segment_blocks(us, lat.dim)
    z = _segment_dither(key, spec, tuple(u.shape[0] for u in us), cdt)
    c, fits = _try(1.0, ub, z, lat, spec.bits, cdt)
    overload = jnp.sum(~fits, dtype=jnp.int32)
    dense = [nb <= LADDER_DENSE_BLOCKS or lat.dim < 4 for nb in nbs]
    if all(dense):
        codes = _split_blocks(_ladder(ub, z, spec.ladder[1:], lat, spec.bits, cdt, (c, fits)), nbs)
        return [v.astype(jnp.uint32) for v in codes], overload
    codes, b = [], 0
    for nb, d in zip(nbs, dense):
        part = lambda a: [v[b : b + nb] for v in a]  # noqa: E731
        pc, pf, pu, pz = part(c), fits[b : b + nb], part(ub), part(z)
        if d:
            code = _ladder(pu, pz, spec.ladder[1:], lat, spec.bits, cdt, (pc, pf))
        else:
            cap = -(-nb // LADDER_SHARE)
            idx = jnp.nonzero(~pf, size=cap, fill_value=nb)[0]
            g = jnp.minimum(idx, nb - 1)
            sub = _ladder([a[g] for a in pu], [a[g] for a in pz], spec.ladder[1:], lat, spec.bits, cdt)
            code = [jnp.where(pf, v, 0).at[idx].set(sv, mode="drop") for v, sv in zip(pc, sub)]
        codes.append(jnp.concatenate(code).astype(jnp.uint32))
        b += nb
    return codes, overload


def decode_segments(codes: list, key: Array, spec: QuantizerSpec, dtype=jnp.float32) -> list:
    """(Q - z) * step for the codes of consecutive padded segments (one array each): the reconstructions in
    units of the group scales."""
    lat = spec.lattice
    nbs = tuple(c.shape[0] // lat.dim for c in codes)
    cb = _segment_blocks([c.astype(jnp.int32) for c in codes], lat.dim)
    p = _wrap(lat.from_coords_list([c.astype(dtype) for c in cb]), lat, spec.bits)
    z = _segment_dither(key, spec, tuple(c.shape[0] for c in codes), dtype)
    return _split_blocks([(a - b) * spec.step for a, b in zip(p, z)], nbs)


def _compute_dtype(dtype) -> jnp.dtype:
    return jnp.dtype(jnp.float64) if jnp.dtype(dtype) == jnp.float64 else jnp.dtype(jnp.float32)


def quantize_segments(xs: list, key: Array, spec: QuantizerSpec, layout: Layout) -> Quantized:
    """Encodes segments xs[i] (sizes[i],) in the compute dtype: codes of all padded segments concatenated."""
    us, scales = [], []
    for i, x in enumerate(xs):
        group, npad = layout.group_length(i), layout.padded_sizes[i]
        s = segment_scales(x, group, spec.scale)
        # tiny groups: (1/step)/s would overflow, so x and s are both lifted by 2**64 first (exact); other groups
        # keep the one multiply x * ((1/step)/s) and their bits
        tiny = (s > 0) & (s < TINY_SCALE)
        inv = ((1.0 / spec.step) / jnp.where(s > 0, jnp.where(tiny, s * TINY_LIFT, s), 1.0)).astype(x.dtype)
        xp = jnp.pad(x, (0, npad - x.shape[0]))
        lifted = jnp.where(_per_entry(tiny, group, npad), xp * jnp.asarray(TINY_LIFT, x.dtype), xp)
        us.append(lifted * _per_entry(inv, group, npad))
        scales.append(s)
    codes, overload = encode_segments(us, key, spec)
    return Quantized(jnp.concatenate(codes), jnp.concatenate(scales), overload)


def dequantize_segments(codes: Array, scales: Array, key: Array, spec: QuantizerSpec, layout: Layout, dtype) -> list:
    """Decodes concatenated padded codes into one (sizes[i],) array per segment, in the compute dtype."""
    out, base, gain = [], 0, spec.decode_gain
    us = decode_segments([codes[o : o + n] for o, n in zip(layout.offsets, layout.padded_sizes)], key, spec, dtype)
    for i, (n, npad, u) in enumerate(zip(layout.sizes, layout.padded_sizes, us)):
        ng = layout.groups_per_segment[i]
        s = scales[base : base + ng].astype(dtype)
        if gain is not None:
            s = s * jnp.asarray(gain, dtype)
        # tiny groups: XLA folds step * s (below float32's normal range) and flushes it to zero, so their
        # product is formed with s lifted by 2**64 and brought back after; other groups keep u * s and its bits
        tiny = (s > 0) & (s < TINY_SCALE)
        glen = layout.group_length(i)
        v = u * _per_entry(jnp.where(tiny, s * jnp.asarray(TINY_LIFT, dtype), s), glen, npad)
        v = jnp.where(_per_entry(tiny, glen, npad), v * jnp.asarray(1.0 / TINY_LIFT, dtype), v)
        out.append(v[:n])
        base += ng
    return out


def materialize(tree, token: Array):
    """``tree`` unchanged, written to memory before its consumers run, on CPU (elsewhere a no-op).

    XLA CPU fuses the quantizer, a chain of cheap elementwise operations, into its consumers (the bit-packing
    reduction) and recomputes it for every use there, unvectorised: Z encode+pack of 1M entries took 27 ms
    instead of 3. A conditional is a fusion boundary; ``token`` (any int32 scalar >= 0, e.g. an overload
    count) makes its predicate opaque to the compiler, so the always-taken branch is not folded away.
    On GPU the fused reduction is what we want, so nothing is inserted there.
    """

    def boundary(t):
        return jax.lax.cond(token >= 0, lambda a: a, lambda a: jax.tree.map(jnp.zeros_like, a), t)

    return jax.lax.platform_dependent(tree, cpu=boundary, default=lambda t: t)


def _one_row(fn, *args):
    """fn (vmappable) applied to a batch of one and unbatched: XLA CPU compiles the quantizer's concatenation
    of lattice coordinates far better with a leading batch axis (A2 encode of 1M entries: 6 ms vs 138 ms;
    E8 decode: 4 ms vs 102 ms). Same bits."""
    out = jax.vmap(fn)(*(a[None] for a in args))
    return jax.tree.map(lambda a: a[0], out)


def quantize(x: Array, key: Array, spec: QuantizerSpec) -> Quantized:
    """Encodes a 1-D vector (any float dtype) into R-bit codes with the dither derived from ``key``."""
    layout = spec.layout(x.shape[0])
    return _one_row(lambda v: quantize_segments([v], key, spec, layout), x.astype(_compute_dtype(x.dtype)))


def dequantize(codes: Array, scales: Array, key: Array, spec: QuantizerSpec, n: int, dtype=jnp.float32) -> Array:
    """Decodes codes (padded length,) and scales into a vector of n entries of ``dtype``."""
    layout, cdt = spec.layout(n), _compute_dtype(dtype)
    return _one_row(lambda c, s: dequantize_segments(c, s, key, spec, layout, cdt)[0], codes, scales).astype(dtype)
