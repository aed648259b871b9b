"""Block thresholding, the project's own variant of MEDU's differential thresholding: decisions per block of
entries instead of per user-round.

``differential_threshold`` stores a user's whole change h - r_k or only a flag when ||h - r_k|| / ||h|| < tau.
Measured on the suite's runs (docs/codec.md, "Thresholding that skips"), a whole round's change is rarely that
small. Against MEDU's closed-loop reference (a decoded row, often rounds old under user sparsification) its
median is 0.48 on digits and 0.90 on MNIST-1D, where no row comes below 0.3. A block's change relative to its
own norm is as large. But most blocks carry little of the row's norm (on digits a quarter of the entries are
exactly zero), so they can keep their reference at little cost in error.

``BlockThreshold`` cuts each leaf into blocks of ``block`` entries and, per user, keeps the reference of the
blocks whose change is smallest, as many as fit an error budget of tau^2 ||h||^2: the error it adds to a row
is at most tau ||h|| (the bound of a row skipped by ``differential_threshold``), wherever it falls. Skipped
blocks reach the coder as zeros and are flagged (one (K,) flag per block, bit-packed in the History); a user
whose blocks are all skipped stores no row at all (flagged "skipped"). Blocks are whole lattice blocks of a
coder of dimension ``lattice_dim`` (entries j, j + B, ... of the coder's strided partition of a leaf), so the
codes of a skipped block never enter the decoding of another block: ``strip`` removes them from the records, and
``unstrip`` gives back records that replay to the same bits. The History itself still holds the full rows
(its payload rows have a fixed width), so ``stripped_nbytes`` is the stored size of this layer's histories.

Replay: the restore is per block, not per user, so naive replay's row weights (``unlearn.replay``, which
assumes per-user selects) cannot replay it; decoding round by round (the chain's decoder, as recovery does)
can. ``restore`` raises rather than giving row weights for the wrong blocks.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.compressors import Compressor, LatticeCoding, Like, _as_compressor, register_filter, tree_where
from medu_jax.entropy import decode_words, encode_words, pack_codes, unpack_codes
from medu_jax.history import History, record_nbytes

Array = jax.Array

LATTICE_DIMS = (1, 2, 4, 8)  # Z, A2, D4, E8


@functools.lru_cache(maxsize=256)
def block_ids(n: int, block: int, lattice_dim: int, padded: bool = False) -> tuple[np.ndarray, int]:
    """(block of each entry of a leaf of n entries, number of blocks): the leaf padded to a multiple of L
    (as the lattice coder pads it) is read as L strided rows of B entries; block c holds columns c*block/L ..
    (c+1)*block/L - 1 of every row, so it is a set of whole lattice blocks. ``padded``: ids of the padded
    positions too (what ``strip`` cuts the stored codes with)."""
    b, per_row, nb = _grid(n, block, lattice_dim)
    ids = (np.arange(b * lattice_dim if padded else n) % b) // per_row
    return ids.astype(np.int32), nb


def _grid(n: int, block: int, lattice_dim: int) -> tuple[int, int, int]:
    """(B, columns per block, blocks) of a leaf of n entries (see ``block_ids``)."""
    b = max(-(-n // lattice_dim), 1)
    per_row = block // lattice_dim
    return b, per_row, -(-b // per_row)


def _to_blocks(x: Array, n: int, block: int, lattice_dim: int) -> Array:
    """(K, n) -> (K, L, blocks, block / L): the leaf's entries on the block grid, zero-padded (static reshapes
    and pads, no gathers: fast to compile and to run)."""
    b, per_row, nb = _grid(n, block, lattice_dim)
    x = jnp.pad(x, ((0, 0), (0, lattice_dim * b - n))).reshape(x.shape[0], lattice_dim, b)
    return jnp.pad(x, ((0, 0), (0, 0), (0, nb * per_row - b))).reshape(x.shape[0], lattice_dim, nb, per_row)


def _from_blocks(mask: Array, n: int, block: int, lattice_dim: int) -> Array:
    """(K, blocks) per-block values -> (K, n) per-entry values, the inverse layout of ``_to_blocks``."""
    b, per_row, nb = _grid(n, block, lattice_dim)
    k = mask.shape[0]
    e = jnp.broadcast_to(mask[:, None, :, None], (k, lattice_dim, nb, per_row)).reshape(k, lattice_dim, -1)
    return e[:, :, :b].reshape(k, -1)[:, :n]


@dataclasses.dataclass(frozen=True)
class BlockThreshold:
    """Per block of ``block`` entries: store the change from the user's closed-loop reference, or keep the
    reference (a flag), skipping the least-changed blocks while their squared change adds up to at most
    tau^2 ||h||^2. tau 0 skips only blocks whose change is exactly zero. See the module docstring."""

    tau: float = 0.3
    block: int = 128
    lattice_dim: int = 2
    name: str = "blocks"
    kind = "filter"
    closed_loop = True  # decoded errors feed back through the reference (see Compressor's 1-bit refusal)

    def __post_init__(self):
        if not (np.isfinite(float(self.tau)) and float(self.tau) >= 0.0):
            raise ValueError(f"tau must be a finite number >= 0, got {self.tau!r}")
        if self.lattice_dim not in LATTICE_DIMS:
            raise ValueError(f"lattice_dim must be the coder's lattice dimension, one of {LATTICE_DIMS}; "
                             f"got {self.lattice_dim!r}")
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < self.lattice_dim \
                or self.block % self.lattice_dim:
            raise ValueError(f"block must be a positive multiple of lattice_dim={self.lattice_dim} (blocks are whole "
                             f"lattice blocks), got {self.block!r}")

    def sizes(self, like: Like) -> list[int]:
        """Entries per user of each leaf."""
        return [int(np.prod(shape[1:], dtype=np.int64)) for shape, _ in like.leaves]

    def geometry(self, like: Like) -> tuple[list[np.ndarray], int]:
        """Per leaf, the (row-wide) block id of each entry, and the row's number of blocks."""
        ids, base = [], 0
        for n in self.sizes(like):
            leaf, nb = block_ids(n, self.block, self.lattice_dim)
            ids.append(leaf + base)
            base += nb
        return ids, base

    def _expand(self, skip: Array, like: Like) -> list[Array]:
        """Row-wide (K, blocks) skip flags -> per leaf (K, n) per-entry flags."""
        out, base = [], 0
        for n in self.sizes(like):
            nb = _grid(n, self.block, self.lattice_dim)[2]
            out.append(_from_blocks(skip[:, base : base + nb], n, self.block, self.lattice_dim))
            base += nb
        return out

    def init(self, like: Like) -> dict:
        return {"ref": like.zeros()}

    def select(self, x, present, state, key):
        like = Like.of(x)
        k = like.num_users
        delta = jax.tree.map(lambda a, r: a - r.astype(a.dtype), x, state["ref"])
        dl, xl = jax.tree.leaves(delta), jax.tree.leaves(x)
        # squares of entries divided by the user's peak |entry|: exact ratios for huge and tiny values alike
        cdt = jnp.promote_types(jnp.result_type(*dl), jnp.float32)
        flat = [(a.reshape(k, -1).astype(cdt), b.reshape(k, -1).astype(cdt)) for a, b in zip(dl, xl)]
        peak = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(v), axis=1, initial=0.0) for p in flat for v in p])
        peak = jnp.where(peak > 0, peak, 1.0)[:, None]
        e = jnp.concatenate([jnp.sum(_to_blocks(jnp.square(d / peak), n, self.block, self.lattice_dim), axis=(1, 3))
                             for (d, _), n in zip(flat, self.sizes(like))], axis=1)
        h2 = sum(jnp.sum(jnp.square(h / peak), axis=1) for _, h in flat)
        skip = budget_skip(e, float(self.tau) ** 2 * h2) & present[:, None]
        out = [jnp.where(m.reshape(a.shape), 0, a) for a, m in zip(dl, self._expand(skip, like))]
        # rows skipped whole store no row and get a flag of their own: a restore that reduced the block flags
        # instead compiled 15x slower in replay's unrolled scans (measured: 21 s against 1.2 s, 181 blocks)
        whole = jnp.all(skip, axis=1)
        flags = {"skipped": whole, **{f"b{j}": skip[:, j] for j in range(skip.shape[1])}}
        return like.treedef.unflatten(out), present & ~whole, flags

    def restore(self, x_hat, valid, flags, state, active):
        like = Like.of(state["ref"])
        nb = self.geometry(like)[1]
        if len(flags) != nb + 1:
            raise ValueError(
                f"block_threshold's message has {len(flags) - 1} block flags, its updates {nb} blocks: its restore is "
                "per block, so naive replay's per-row weights (unlearn.replay, rebuild_error) cannot replay it; "
                "decode round by round with the chain's decoder instead (as recovery does)")
        skip = jnp.stack([flags[f"b{j}"] for j in range(nb)], axis=1)
        stored_in = valid | flags["skipped"]
        full = [r + jnp.where(m.reshape(d.shape), 0, d).astype(r.dtype)
                for d, r, m in zip(jax.tree.leaves(x_hat), jax.tree.leaves(state["ref"]), self._expand(skip, like))]
        full = like.treedef.unflatten(full)
        return full, stored_in, {"ref": tree_where(stored_in, full, state["ref"])}


register_filter(BlockThreshold, 2)  # the place of differential_threshold in MEDU's order (one or the other)


def budget_skip(e: Array, budget: Array) -> Array:
    """(K, nb) bool: per row, the smallest entries of ``e`` (in increasing order, ties by position) whose sum
    stays within ``budget`` (K,)."""
    order = jnp.argsort(e, axis=1, stable=True)
    ok = jnp.cumsum(jnp.take_along_axis(e, order, axis=1), axis=1) <= budget[:, None]
    return jnp.take_along_axis(ok, jnp.argsort(order, axis=1), axis=1)  # back to block order (order's inverse)


def block_threshold(tau: float = 0.3, block: int = 128, lattice_dim: int = 2) -> Compressor:
    """Block thresholding (the project's variant of layer 2): per block of ``block`` entries keep the reference
    of the least-changed blocks within an error budget tau ||h||; ``lattice_dim`` is the coder's (A2: 2)."""
    return _as_compressor(BlockThreshold(float(tau), int(block), int(lattice_dim)))


# ----------------------------------------------------------------------------------------- stored form


def _layer(history: History) -> BlockThreshold:
    """The history's block_threshold layer (an error names a chain without one)."""
    layers = [f for f in history.compressor.filters if isinstance(f, BlockThreshold)]
    if not layers:
        raise ValueError("the history's chain has no block_threshold layer")
    return layers[0]


def _strippable(history: History) -> BlockThreshold:
    """The layer, checked against the coder: a lattice coder whose blocks the layer's blocks are made of."""
    layer, coder = _layer(history), history.compressor.coder
    if not isinstance(coder, LatticeCoding):
        raise ValueError(f"strip needs a lattice coder, the chain's coder is {type(coder).__name__}")
    if coder.spec.lattice.dim != layer.lattice_dim:
        raise ValueError(f"block_threshold(lattice_dim={layer.lattice_dim}) with the {coder.lattice} lattice "
                         f"(dimension {coder.spec.lattice.dim}): its blocks are not whole lattice blocks, so their "
                         "codes cannot be stripped; build the layer with the coder's lattice_dim")
    return layer


def _words_leaf(history: History) -> int:
    paths = jax.tree_util.tree_flatten_with_path(history.rows_like())[0]
    return next(i for i, (p, _) in enumerate(paths) if jax.tree_util.keystr(p) == "['words']")


def _positions(history: History, layer: BlockThreshold) -> tuple[np.ndarray, int]:
    """(block id of every padded code position of a row, number of blocks)."""
    ids, base = [], 0
    for shape, _ in history.like.leaves:
        leaf, nb = block_ids(int(np.prod(shape[1:], dtype=np.int64)), layer.block, layer.lattice_dim, padded=True)
        ids.append(leaf + base)
        base += nb
    return np.concatenate(ids), base


def _kept_positions(history: History, record: dict) -> tuple[np.ndarray, int]:
    """(kept code positions (n, padded) bool of the record's n present users, the payload leaf of the words)."""
    layer = _strippable(history)
    pos, nb = _positions(history, layer)
    k = history.num_users
    present = np.unpackbits(record["present"])[:k].astype(bool)
    skip = np.stack([np.unpackbits(record[f"flag:{layer.name}/b{j}"])[:k].astype(bool) for j in range(nb)], axis=1)
    return ~skip[present][:, pos], _words_leaf(history)


def _words(history: History, record: dict, i: int, n: int) -> np.ndarray:
    """The record's packed code words (n, R, W) of its n present users, whether entropy coded or not."""
    if f"ans:{i}" in record:
        shape = (n, *history.rows_like()["words"].shape[1:])
        return decode_words(record[f"ans:{i}"], history.compressor.coder.bits, shape)
    return record[f"row:{i}"]


def strip(history: History) -> list[dict]:
    """The history's records with the codes of skipped blocks removed: each record's code words ("row:i", or
    "ans:i" when entropy coded) become "kept:i", the kept codes of its present users in order, packed as one row
    of R-bit codes (``packing.pack_bits``' layout; entropy coded the same way as the words were)."""
    coder = history.compressor.coder
    out = []
    for record in history.records:
        kept, i = _kept_positions(history, record)
        codes = unpack_codes(_words(history, record, i, kept.shape[0]), coder.bits)[:, : kept.shape[1]][kept]
        words = pack_codes(np.pad(codes, (0, -len(codes) % 32))[None], coder.bits)
        new = {name: v for name, v in record.items() if name not in (f"row:{i}", f"ans:{i}")}
        new[f"kept:{i}"] = words if coder.entropy is None else encode_words(words, coder.bits)
        out.append(new)
    return out


def unstrip(history: History, records: list[dict]) -> History:
    """A copy of ``history`` holding ``records`` (from ``strip``) with full code words again: skipped blocks'
    codes are 0, which decode to values the restore never reads, so replay and recovery give the same bits."""
    coder = history.compressor.coder
    full = []
    for record in records:
        kept, i = _kept_positions(history, record)
        count = int(kept.sum())
        stored = record[f"kept:{i}"]
        words = stored if coder.entropy is None else decode_words(stored, coder.bits, (1, coder.bits, -(-count // 32)))
        codes = np.zeros((kept.shape[0], 32 * history.rows_like()["words"].shape[-1]), np.int32)
        codes[:, : kept.shape[1]][kept] = unpack_codes(words, coder.bits)[0, :count]
        words = pack_codes(codes, coder.bits)
        new = {name: v for name, v in record.items() if name != f"kept:{i}"}
        if coder.entropy is None:
            new[f"row:{i}"] = words
        else:
            new[f"ans:{i}"] = encode_words(words, coder.bits)
        full.append(new)
    return dataclasses.replace(history, records=full)


def stripped_nbytes(history: History) -> int:
    """Bytes of ``strip(history)``: the masks and flags (bit-packed), scales and the kept codes (packed, or
    entropy coded)."""
    return int(sum(record_nbytes(r) for r in strip(history)))


def skip_rates(history: History) -> dict:
    """What block thresholding left out of the user-rounds that reached it (``entered``: those user
    sparsification kept; a row is stored, or skipped whole): the fraction of blocks and of entries skipped, and
    of rows skipped whole (no row stored)."""
    layer = _layer(history)
    ids, nb = layer.geometry(history.like)
    sizes = np.bincount(np.concatenate(ids), minlength=nb)
    m = history.masks()
    skip = np.stack([m.flags[layer.name][f"b{j}"] for j in range(nb)], axis=-1)  # (rounds, K, nb)
    skip = skip[m.present | m.flags[layer.name]["skipped"]]
    n = max(len(skip), 1)
    return {"entered": int(len(skip)), "blocks": float(skip.sum()) / (n * nb),
            "entries": float((skip * sizes).sum() / (n * sizes.sum())), "rows": float(skip.all(axis=1).sum()) / n}
