"""The server's history of compressed updates: one compact record of NumPy arrays per round.

A record keeps only the payload rows of users whose row is stored (``message.present``) and bit-packs the
per-user masks, so ``nbytes`` is what the server really pays. With ``lattice_coding(..., entropy="ans")`` the
code words are stored entropy coded ("ans:i" in place of "row:i", see ``medu_jax.entropy``), and ``nbytes``
counts the coded arrays. ``expand`` rebuilds the full, static-shaped ``Message`` that the jitted decoder
replays (decoding coded words back to the exact packed words). Keys are never stored: the round's compressor key is derived
from (seed, round) with ``compressor_key``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.compressors import Compressor, Like, Message
from medu_jax.entropy import decode_words, encode_words

PyTree = Any

COMPRESSOR_STREAM = 2  # fold_in tag of the compressor's key stream within a round


def compressor_key(seed: int, round_index) -> jax.Array:
    """The key of round ``round_index``'s compressor: fold_in(fold_in(key(seed), round), 2)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), round_index), COMPRESSOR_STREAM)


@functools.lru_cache(maxsize=64)
def _correction_like(compressor: Compressor, like: Like):
    one = like.single()
    users = jax.ShapeDtypeStruct((1,), jnp.int32)
    return jax.eval_shape(lambda x, u: compressor.correction.encode(x, jax.random.key(0), one, u)[0],
                          one.abstract(), users)


@functools.lru_cache(maxsize=64)
def _rows_like(compressor: Compressor, like: Like):
    coder = compressor.coder
    users = jax.ShapeDtypeStruct((compressor.capacity(like.num_users),), jnp.int32)
    sliced = jax.tree.map(lambda a: jax.ShapeDtypeStruct((users.shape[0], *a.shape[1:]), a.dtype), like.abstract())
    return jax.eval_shape(lambda x, u: coder.encode(x, jax.random.key(0), like, u)[0], sliced, users)


def _flat_flags(flags: dict) -> dict[str, Any]:
    return {f"{layer}/{name}": v for layer, d in sorted(flags.items()) for name, v in sorted(d.items())}


def entropy_leaves(compressor: Compressor, rows: PyTree) -> tuple[int, ...]:
    """Positions of the payload leaves that records of ``compressor`` store entropy coded (as "ans:i" instead
    of "row:i"): the lattice coder's packed code words when it was built with ``entropy``, else none."""
    if getattr(compressor.coder, "entropy", None) is None:
        return ()
    paths = jax.tree_util.tree_flatten_with_path(rows)[0]
    return tuple(i for i, (path, _) in enumerate(paths) if jax.tree_util.keystr(path) == "['words']")


def compact(message: Message, compressor: Compressor | None = None) -> dict[str, np.ndarray]:
    """Host-side compact record of a message: packed masks and the present users' rows only; with the
    ``compressor`` of a lattice coder built with ``entropy``, its code words entropy coded (``entropy``)."""
    present = np.asarray(message.present, bool)
    record = {"active": np.packbits(np.asarray(message.active, bool)), "present": np.packbits(present)}
    for name, v in _flat_flags(message.flags).items():
        record[f"flag:{name}"] = np.packbits(np.asarray(v, bool))
    n = int(present.sum())  # payload slots 0..n-1 hold the present users' rows, in user order
    coded = () if compressor is None else entropy_leaves(compressor, message.rows)
    for i, leaf in enumerate(jax.tree.leaves(message.rows)):
        rows = np.ascontiguousarray(np.asarray(leaf)[:n])
        if i in coded:
            record[f"ans:{i}"] = encode_words(rows, compressor.coder.bits)
        else:
            record[f"row:{i}"] = rows
    if message.correction is not None:  # the model correction's one row: "cans:i" entropy coded, else "corr:i"
        paths = jax.tree_util.tree_flatten_with_path(message.correction)[0]
        for i, (path, leaf) in enumerate(paths):
            a = np.ascontiguousarray(np.asarray(leaf))
            if compressor is not None and compressor.correction.entropy is not None and \
                    jax.tree_util.keystr(path) == "['words']":
                record[f"cans:{i}"] = encode_words(a, compressor.correction.bits)
            else:
                record[f"corr:{i}"] = a
    return record


def _has_correction(record) -> bool:
    return any(k.startswith(("corr:", "cans:")) for k in record)


def record_nbytes(record: dict[str, np.ndarray]) -> int:
    """Bytes of one compact record: the sum of its arrays' nbytes."""
    return int(sum(a.nbytes for a in record.values()))


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which rounds and users a history keeps (the full history by default).

    every: keep rounds t with t % every == 0 (FedEraser's retention interval).
    min_change: Crab-style informative rounds: keep a round only when the global model has moved by at least
      this fraction of its norm since the last kept round.
    user_fraction: Crab-style informative users: within a kept round keep only this fraction of the active
      users, those whose update is best aligned (cosine) with the round's aggregate update.
    checkpoints: also keep the global model before each kept round (rollback points).
    """

    every: int = 1
    min_change: float = 0.0
    user_fraction: float = 1.0
    checkpoints: bool = False

    def __post_init__(self):
        if int(self.every) < 1:
            raise ValueError(f"Selection.every must be >= 1, got {self.every!r}")
        if not 0.0 < float(self.user_fraction) <= 1.0:
            raise ValueError(f"Selection.user_fraction must be in (0, 1], got {self.user_fraction!r}")
        if float(self.min_change) < 0:
            raise ValueError(f"Selection.min_change must be >= 0, got {self.min_change!r}")

    @property
    def keeps_all(self) -> bool:
        return self.every == 1 and self.min_change == 0 and self.user_fraction == 1.0 and not self.checkpoints


@dataclasses.dataclass
class History:
    """Compressed update history of a federated run, plus what replay needs (w0, weights, seed).

    Attributes:
      compressor: the chain that produced the records (its config is part of the history).
      like: structure of a round's update pytree (leaves (K, ...)).
      seed: the run's seed; the compressor key of round t is compressor_key(seed, t).
      params0: the initial global model w^0 (NumPy leaves).
      weights: (K,) aggregation weights p_k before re-normalisation (e.g. data sizes).
      server_lr: global step applied to the weighted mean of the updates.
      records: one compact record per kept round (with its training round index, and with the global model
        before that round when the selection keeps checkpoints).
      selection: which rounds and users this history keeps (all, by default).
      server_tx: the run's server optimizer (an optax transform on the mean update, see
        ``fedavg.server_update``); None for FedAvg's step server_lr * mean, the only one replay keeps linear.
        Not written to a store (train refuses store= with a server optimizer).
      model_state0: the model's initial non-trained state (BatchNorm statistics; None: a stateless model),
        which recovery's exact rounds start from.
    """

    compressor: Compressor
    like: Like
    seed: int
    params0: PyTree
    weights: np.ndarray
    server_lr: float = 1.0
    records: list = dataclasses.field(default_factory=list)
    selection: "Selection" = dataclasses.field(default_factory=lambda: Selection())
    server_tx: Any = None
    model_state0: Any = None

    @property
    def num_users(self) -> int:
        return self.like.num_users

    @property
    def num_rounds(self) -> int:
        return len(self.records)

    @property
    def num_params(self) -> int:
        """Parameters per user update."""
        return int(sum(np.prod(s[1:], dtype=np.int64) for s, _ in self.like.leaves))

    def rows_like(self):
        """Shapes/dtypes of the coder's payload (``capacity`` slots), from an abstract evaluation (cached)."""
        return _rows_like(self.compressor, self.like)

    def append(self, message: Message, round_id: int | None = None, checkpoint: PyTree = None,
               participants=None, keep: bool = True) -> dict[str, np.ndarray]:
        """Compacts and appends training round ``round_id``'s message; with a selection, also the model before
        the round and the round's participants (when the selection stored only some of them). Returns the record;
        ``keep=False`` only builds it (for a store that holds the rounds instead of host memory)."""
        record = compact(jax.device_get(message), self.compressor)
        if participants is not None:
            record["participants"] = np.packbits(np.asarray(participants, bool))
        record["round"] = np.array([self.num_rounds if round_id is None else round_id], np.int32)
        for i, leaf in enumerate(jax.tree.leaves(checkpoint)):
            record[f"ckpt:{i}"] = np.asarray(leaf, np.float32)
        if keep:
            self.records.append(record)
        return record

    @property
    def round_ids(self) -> list[int]:
        """The training round of each record (compressor keys are derived from it)."""
        return [int(r["round"][0]) if "round" in r else i for i, r in enumerate(self.records)]

    def checkpoint(self, i: int) -> PyTree:
        """The global model before record i's round, if the selection kept checkpoints."""
        r = self.records[i]
        leaves, treedef = jax.tree_util.tree_flatten(self.params0)
        if "ckpt:0" not in r:
            raise ValueError(f"record {i} holds no model checkpoint (Selection(checkpoints=True) keeps them)")
        return treedef.unflatten([jnp.asarray(r[f"ckpt:{j}"]).astype(jnp.result_type(x)) for j, x in enumerate(leaves)])

    @property
    def nbytes(self) -> int:
        """Bytes of all stored records (packed or entropy-coded codes with their models, scales, masks, flags)."""
        return int(sum(record_nbytes(r) for r in self.records))

    @property
    def float32_nbytes(self) -> int:
        """Bytes of a float32 history of the same run: every active user's full update, every round."""
        active = sum(int(np.unpackbits(r["active"])[: self.num_users].sum()) for r in self.records)
        return active * self.num_params * 4

    def _records(self, rounds) -> list:
        recs = [self.records[t] for t in (range(self.num_rounds) if rounds is None else rounds)]
        if not recs:
            raise ValueError("no rounds selected (the history or the selection of rounds is empty)")
        return recs

    def _masks(self, recs: list) -> tuple:
        k = self.num_users

        def unpack(name: str) -> np.ndarray:
            return np.unpackbits(np.stack([r[name] for r in recs]), axis=1)[:, :k].astype(bool)

        flags: dict = {}
        for n in (n for n in recs[0] if n.startswith("flag:")):
            layer, name = n[len("flag:") :].split("/", 1)
            flags.setdefault(layer, {})[name] = unpack(n)
        return unpack("active"), unpack("present"), flags

    def masks(self, rounds: range | list[int] | None = None) -> Message:
        """The messages of ``rounds`` (default all) without their payload (``rows`` is None): the masks and
        flags that decide how stored rows enter the model, stacked on a leading round axis (NumPy)."""
        return Message(*self._masks(self._records(rounds)), None)

    def payload(self, rounds: range | list[int] | None = None, length: int | None = None) -> PyTree:
        """The coder's payload rows of ``rounds`` as full static-shaped NumPy arrays (capacity slots, unused
        slots zero) on a leading round axis, zero-padded to ``length`` rounds if given."""
        return self._payload(self._records(rounds), length)

    def _payload(self, recs: list, length: int | None = None) -> PyTree:
        length = len(recs) if length is None else int(length)
        like = self.rows_like()
        row_leaves, row_def = jax.tree_util.tree_flatten(like)
        coded = entropy_leaves(self.compressor, like)
        stored = [int(np.unpackbits(r["present"])[: self.num_users].sum()) for r in recs] if coded else []
        rows = []
        for i, sd in enumerate(row_leaves):
            full = np.zeros((length, *sd.shape), sd.dtype)
            for t, r in enumerate(recs):
                if i in coded:  # the exact packed words back from their entropy-coded array
                    full[t, : stored[t]] = decode_words(r[f"ans:{i}"], self.compressor.coder.bits,
                                                        (stored[t], *sd.shape[1:]))
                else:
                    full[t, : len(r[f"row:{i}"])] = r[f"row:{i}"]
            rows.append(full)
        return row_def.unflatten(rows)

    @property
    def has_corrections(self) -> bool:
        """True when the records hold model correction rows: the compressor codes them
        (``compressors.model_correction``) and ``train`` recorded the rounds (a message from ``encode`` alone
        has none). A history with them in some rounds only is refused where they are read."""
        return self.compressor.correction is not None and bool(self.records) and _has_correction(self.records[0])

    def corrections(self, rounds: range | list[int] | None = None, length: int | None = None) -> PyTree:
        """The model correction rows of ``rounds`` (default all; None without corrections), stacked on a leading
        round axis (leaves (rounds, 1, ...)), zero-padded to ``length`` rounds if given."""
        return self._corrections(self._records(rounds), length)

    def _corrections(self, recs: list, length: int | None = None) -> PyTree:
        if not self.has_corrections:
            return None
        if not all(_has_correction(r) for r in recs):
            raise ValueError("the history holds model corrections in some rounds only (rounds appended from encode "
                             "alone, or from another run?): replay cannot follow its trajectory")
        length = len(recs) if length is None else int(length)
        like = _correction_like(self.compressor, self.like)
        leaves, treedef = jax.tree_util.tree_flatten(like)
        out = []
        for i, sd in enumerate(leaves):
            full = np.zeros((length, *sd.shape), sd.dtype)
            for t, r in enumerate(recs):
                full[t] = decode_words(r[f"cans:{i}"], self.compressor.correction.bits, sd.shape) \
                    if f"cans:{i}" in r else r[f"corr:{i}"]
            out.append(full)
        return treedef.unflatten(out)

    def expand(self, rounds: range | list[int] | None = None) -> Message:
        """Full static-shaped messages for ``rounds`` (default all), stacked on a leading round axis, with their
        model correction rows when the compressor codes them."""
        recs = self._records(rounds)
        # built on the host, moved to the device in one transfer
        return jax.device_put(Message(*self._masks(recs), self._payload(recs), self._corrections(recs)))

    def skip_rates(self) -> dict:
        """What each filter layer left out, from the stored masks and flags (no decoding):

        active: user-rounds that entered the compressor; stored: fraction of them with a payload row;
        sparsified: fraction of the active ones user sparsification selected out; thresholded: fraction of the
        active ones differential thresholding skipped (a flag only); reset: fraction coded as key frames
        (threshold reset=True); zero_rows: fraction of the stored rows whose scales are all zero (rows a guarded
        coder stored as zero, and rows of exactly zero updates)."""
        out = {"active": 0, "stored": 0.0, "sparsified": 0.0, "thresholded": 0.0, "reset": 0.0, "zero_rows": 0.0}
        if not self.records:
            return out
        m = self.masks()
        active = int(np.sum(m.active))
        stored = int(np.sum(m.present))
        denom = max(active, 1)

        def frac(layer: str, flag: str) -> float:
            v = m.flags.get(layer, {}).get(flag)
            return 0.0 if v is None else float(np.sum(v & m.active)) / denom

        zero = 0  # lattice rows: the leaf named "scales" of the payload (other coders have none)
        paths = jax.tree_util.tree_flatten_with_path(self.rows_like())[0]
        for i in [i for i, (path, _) in enumerate(paths) if "scales" in jax.tree_util.keystr(path)]:
            for r in self.records:
                rows = r[f"row:{i}"]
                zero += int(np.sum(np.all(rows.reshape(rows.shape[0], int(np.prod(rows.shape[1:]))) == 0, axis=1)))
        sel = m.flags.get("sparsify", {}).get("selected")
        out.update(
            active=active,
            stored=stored / denom,
            sparsified=0.0 if sel is None else float(np.sum(m.active & ~sel)) / denom,
            thresholded=frac("threshold", "skipped"),
            reset=frac("threshold", "reset"),
            zero_rows=zero / max(stored, 1),
        )
        return out

    @property
    def correction_nbytes(self) -> int:
        """Bytes of the model correction rows (part of ``nbytes``; 0 without corrections)."""
        return int(sum(a.nbytes for r in self.records for k, a in r.items() if k.startswith(("corr:", "cans:"))))

    def summary(self) -> dict:
        """Sizes in bytes (the model corrections' share too) and the ratio to float32 history."""
        f32 = self.float32_nbytes
        return {
            "rounds": self.num_rounds,
            "users": self.num_users,
            "params": self.num_params,
            "bytes": self.nbytes,
            "correction_bytes": self.correction_nbytes,
            "float32_bytes": f32,
            "ratio": f32 / max(self.nbytes, 1),
        }
