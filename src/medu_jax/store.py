"""Durable history on disk: a zarr v3 group appended round by round, checksummed, never pickled.

Why zarr: typed, chunked arrays in plain files (readable from any language), appendable one round at a time,
with a crc32c codec that checksums every chunk; orbax-checkpoint is built for whole-checkpoint saves, not for
an append-only log of small records. Layout of a store (one ``History``):

  attrs                      format, version, compressor config, update structure, seed, server_lr, round keys
  params0/<i>, weights       written once, at creation
  rounds/<t>/<key>           round t's compact record (packed masks, flags, payload rows)
  state/<t % 2>/...          training state after round t (global params, compressor state), two slots
  commits/<t>                written last: the crc32 of every array of round t and of its state slot

A crash loses at most the round in flight: loading stops at the first round without a readable commit, and
a commit whose checksums do not match the data (flipped bytes, a missing or truncated chunk) is an error.
"""

from __future__ import annotations

import os
import shutil
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.compressors import Compressor, Like
from medu_jax.history import History

PyTree = Any

FORMAT = "medu_jax.history"
VERSION = 1


class HistoryFileError(ValueError):
    """A history store that is missing, foreign, truncated or corrupted; the message names what and where."""


def _codecs():
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=1), Crc32cCodec()]


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).tobytes()) & 0xFFFFFFFF


def _paths(tree: PyTree) -> list[str]:
    return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _like_meta(like: Like) -> dict:
    return {"paths": _paths(like.abstract()), "leaves": [[list(s), d] for s, d in like.leaves]}


def _rebuild(paths: list[str], leaves: list) -> PyTree:
    """Nested dicts from keystr paths like "['params']['Dense_0']['kernel']" (flax parameter trees)."""
    root: dict = {}
    for path, leaf in zip(paths, leaves):
        keys = path[2:-2].split("']['") if path.startswith("['") and path.endswith("']") else None
        if not keys or any("'" in k for k in keys):
            raise HistoryFileError(
                f"the stored update structure has a non-dict path {path!r}: pass template= (the model's params) "
                "to load it"
            )
        node = root
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = leaf
    return root


def _write(group, name: str, a: np.ndarray) -> int:
    a = np.ascontiguousarray(a)
    arr = group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, d) for d in a.shape),
                             compressors=_codecs(), overwrite=True)
    if a.size:
        arr[...] = a
    return _crc(a)


def _read(group, name: str, where: str, crc: int | None = None) -> np.ndarray:
    try:
        a = np.asarray(group[name][...])
    except KeyError as e:
        raise HistoryFileError(f"{where}: array {name!r} is missing") from e
    except Exception as e:  # zarr raises on checksum mismatch, truncated or undecodable chunks
        raise HistoryFileError(f"{where}: array {name!r} is corrupted ({type(e).__name__}: {e})") from e
    if crc is not None and _crc(a) != crc:
        raise HistoryFileError(f"{where}: array {name!r} does not match its committed checksum (corrupted or lost chunk)")
    return a


class HistoryWriter:
    """Appends a History's rounds (and the training state after each) to a store on disk."""

    def __init__(self, path: str, history: History, overwrite: bool = False):
        import zarr

        self.path = path
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(f"{path!r} exists: pass overwrite=True, or resume from it")
            shutil.rmtree(path)
        attrs = {
            "format": FORMAT, "version": VERSION, "compressor": history.compressor.config(),
            "like": _like_meta(history.like), "seed": int(history.seed), "server_lr": float(history.server_lr),
        }
        self.root = zarr.open_group(path, mode="w", attributes=attrs)
        p0 = self.root.create_group("params0")
        for i, leaf in enumerate(jax.tree.leaves(history.params0)):
            _write(p0, str(i), np.asarray(leaf))
        _write(self.root, "weights", np.asarray(history.weights))
        for name in ("rounds", "state", "commits"):
            self.root.create_group(name)

    @classmethod
    def reopen(cls, path: str) -> "HistoryWriter":
        """A writer that appends to an existing store (after ``load`` has checked it)."""
        import zarr

        self = cls.__new__(cls)
        self.path, self.root = path, zarr.open_group(path, mode="r+")
        return self

    def append(self, t: int, record: dict, params: PyTree | None = None, compressor_state: dict | None = None):
        """Writes round t's record and state slot, then commits the round (the commit is written last)."""
        rnd = self.root.require_group(f"rounds/{t}")
        crcs = {f"rounds/{t}/{k}": _write(rnd, k, v) for k, v in record.items()}
        if params is not None:
            slot = self.root.require_group(f"state/{t % 2}")
            for sub, tree in (("params", params), ("compressor", compressor_state["filters"])):
                g = slot.require_group(sub)
                for i, leaf in enumerate(jax.tree.leaves(tree)):
                    crcs[f"state/{t % 2}/{sub}/{i}"] = _write(g, str(i), np.asarray(leaf))
        self.root.create_group(f"commits/{t}", attributes={"round": t, "keys": sorted(record), "crc": crcs})

    def truncate(self, num_rounds: int):
        """Drops rounds >= num_rounds (an uncommitted round in flight, before a resume rewrites it)."""
        for name in ("commits", "rounds"):
            folder = os.path.join(self.path, name)
            for entry in os.listdir(folder) if os.path.isdir(folder) else []:
                if entry.isdigit() and int(entry) >= num_rounds:
                    shutil.rmtree(os.path.join(folder, entry))


def _open(path: str):
    import zarr

    if not os.path.exists(path):
        raise FileNotFoundError(f"no history store at {path!r}")
    try:
        root = zarr.open_group(path, mode="r")
        attrs = dict(root.attrs)
    except Exception as e:
        raise HistoryFileError(f"{path!r} is not a readable zarr group ({type(e).__name__}: {e})") from e
    if attrs.get("format") != FORMAT:
        raise HistoryFileError(f"{path!r} is not a medu_jax history (format {attrs.get('format')!r})")
    if attrs.get("version") != VERSION:
        raise HistoryFileError(f"{path!r} has history format version {attrs.get('version')}, this is {VERSION}")
    return root, attrs


def _commits(root, path: str) -> list[dict]:
    """Commit attrs of rounds 0, 1, ... up to the first missing one; a torn last commit is dropped."""
    folder = os.path.join(path, "commits")
    present = sorted(int(e) for e in os.listdir(folder) if e.isdigit()) if os.path.isdir(folder) else []
    out = []
    for t in range(len(present)):
        if t not in present:
            break
        try:
            attrs = dict(root[f"commits/{t}"].attrs)
            assert attrs.get("round") == t and isinstance(attrs.get("crc"), dict)
        except Exception as e:
            if t == max(present):  # the round in flight when the writer stopped: not committed
                break
            raise HistoryFileError(f"{path!r}: the commit of round {t} is corrupted ({type(e).__name__})") from e
        out.append(attrs)
    return out


class StoredRecord(Mapping):
    """Round t's compact record in a store, read array by array when accessed and checked against its commit:
    replay reads a round's masks without its payload rows, and the rows only for the chunk it decodes."""

    def __init__(self, root, path: str, commit: dict):
        self._root, self._t, self._keys, self._crc = root, commit["round"], tuple(commit["keys"]), commit["crc"]
        self._where = f"{path!r} round {self._t}"

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        name = f"rounds/{self._t}/{key}"
        return _read(self._root, name, self._where, self._crc[name])

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class StoredRecords(Sequence):
    """The committed rounds of a store as a read-only sequence of ``StoredRecord``: a History over it holds only
    the commit index in host memory and reads rounds from disk as they are used."""

    def __init__(self, path: str, root=None):
        root = _open(path)[0] if root is None else root  # load_history passes the group it has opened
        self.path = path
        self._items = [StoredRecord(root, path, c) for c in _commits(root, path)]

    def __getitem__(self, i):
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def append(self, record):
        raise TypeError(f"the history is read from the store {self.path!r} and is read-only; train(store=...) "
                        "appends rounds to a store")


def load_history(path: str, template: PyTree | None = None, lazy: bool = False) -> History:
    """Loads a History from a store: every committed round, checksums verified.

    ``template`` (e.g. the model's params0, or a pytree of (K, ...) updates) restores the exact pytree type and
    checks that the history belongs to this model; without it, flax-style nested dicts are rebuilt. ``lazy``
    leaves the records on disk (``StoredRecords``): each array is read, and its checksum verified, when replay
    uses it, so a history larger than host memory replays chunk by chunk.
    """
    root, attrs = _open(path)
    meta = attrs["like"]
    leaves = [(tuple(s), d) for s, d in meta["leaves"]]
    p0 = [_read(root["params0"], str(i), f"{path!r} params0") for i in range(len(leaves))]
    if template is not None:
        t_leaves, treedef = jax.tree_util.tree_flatten(template)
        t_paths = _paths(template)
        want = [(s[1:], d) for s, d in leaves]
        got = [(tuple(np.shape(x))[-len(s):] if len(s) else (), jnp.dtype(jnp.result_type(x)).name)
               for x, (s, _) in zip(t_leaves, want)]
        if t_paths != meta["paths"] or len(t_leaves) != len(leaves) or got != want:
            raise ValueError(
                f"history at {path!r} is from a different model: it stores leaves {meta['paths']} with shapes "
                f"{[list(s) for s, _ in want]}, the template has {t_paths} with {[list(np.shape(x)) for x in t_leaves]}"
            )
        params0 = treedef.unflatten(p0)
    else:
        params0 = _rebuild(meta["paths"], p0)
    like = Like(jax.tree_util.tree_structure(params0), tuple(leaves))
    try:
        compressor = Compressor.from_config(attrs["compressor"])
    except (TypeError, ValueError) as e:
        raise HistoryFileError(f"{path!r}: unreadable compressor configuration ({e})") from e
    hist = History(compressor, like, attrs["seed"], params0, _read(root, "weights", repr(path)), attrs["server_lr"])
    records = StoredRecords(path, root)
    hist.records = records if lazy else [dict(r) for r in records]
    return hist


def load_state(path: str, history: History, t: int) -> tuple[PyTree, dict]:
    """(global params, compressor state) after round t, from the store's state slot t % 2 (checksummed)."""
    root, _ = _open(path)
    commits = _commits(root, path)
    if t >= len(commits):
        raise HistoryFileError(f"{path!r} holds {len(commits)} committed rounds, no state after round {t}")
    crc = commits[t]["crc"]
    where = f"{path!r} state after round {t}"

    def read(sub: str, like_tree: PyTree) -> PyTree:
        n = len(jax.tree.leaves(like_tree))
        keys = [f"state/{t % 2}/{sub}/{i}" for i in range(n)]
        if any(k not in crc for k in keys):
            raise HistoryFileError(f"{where}: the store holds no training state (saved without params)")
        vals = [_read(root, k, where, crc[k]) for k in keys]
        return jax.tree_util.tree_structure(like_tree).unflatten([jnp.asarray(v) for v in vals])

    params = read("params", history.params0)
    state = history.compressor.init(history.like.zeros())
    state = {"like": state["like"], "filters": read("compressor", state["filters"])}
    return params, state


def save_history(history: History, path: str, overwrite: bool = False) -> None:
    """Writes a whole in-memory History (no training state) to a new store."""
    w = HistoryWriter(path, history, overwrite)
    for t, rec in enumerate(history.records):
        w.append(t, rec)
