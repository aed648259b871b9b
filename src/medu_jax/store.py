"""Durable history on disk: a store appended round by round, checksummed in one chain, never pickled.

Layout of a store (one ``History``; format version 3), the same few files whatever its number of rounds:

  zarr.json         a zarr v3 group's attributes: format, version, compressor config, update structure, seed,
                    server_lr, the run's description (FedConfig, optimizer, data; see ``describe_run``), the
                    crc32/shape/dtype of params0 and weights, and ``checks``: the crc32 of every other attribute
  params0/<i>, weights   zarr arrays, written once, at creation
  rounds.bin        append-only: every round's compact record (packed masks, flags, payload rows), each array one
                    zstd frame, round after round
  state.0, state.1  the training state after the last two rounds (global params, compressor state; raw bytes),
                    slot t % 2 after round t, written in place (the last commit's state is in the other slot)
  commits.jsonl     append-only, one JSON line per round, written last: crc32, shape, dtype and place (offset,
                    length, crc32 of the bytes on disk) of every array of round t and of its state slot, the end
                    of its data, the rounds the run was configured for, the checksum of the attributes and of
                    commit t - 1 (round 0: of the attributes), and its own checksum
  final.json        written when the run has all its rounds: their number and the last commit's checksum

Why this layout: typed arrays and JSON in plain files, readable from any language (zstd frames at offsets a
JSON line gives); appending a round writes three files that exist from creation on, so a 10,000-round store has no more
files than a 3-round one (format 2 had a folder of zarr arrays per round: ~16 files a round). Every byte that
changes a result is covered by one chain: the attributes by ``checks``, params0 and weights by the attributes,
each round and state slot by its commit, each commit by the next one and the last by ``final.json``. A changed
attribute, a lost or changed byte, a missing or replaced commit (also the last one of a finished run) is a
``HistoryFileError`` that names it. A crash loses at most the round in flight: its commit line is not written
(or is torn) and the store is *cut short* (``store_info``), which ``train(..., resume=True)`` continues (it
cuts the log and the data file after the last commit). ``HistoryWriter(fsync=True)``, the default, fdatasyncs
a round's data, its state slot and then its commit line before ``append`` returns, so a power loss keeps every
committed round too. A store is built under a temporary name and renamed into place, so it is either absent or
whole; ``StoreLock`` (an OS file lock, ``fcntl.flock``) keeps a second writer out while a run trains. Shapes
read from disk are checked against the commits and the attributes, and the attributes against sane bounds,
before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import uuid
import warnings
import zlib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.compressors import Compressor, Like
from medu_jax.history import History

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no OS lock
    fcntl = None

PyTree = Any

FORMAT = "medu_jax.history"
VERSION = 3
ROUNDS_FILE, COMMITS_FILE, FINAL_FILE, STATE_FILE = "rounds.bin", "commits.jsonl", "final.json", "state.{}"
LOCK_NAME = ".medu.lock"  # in the folder given to train(store=...)
MAX_USERS = 2**31 - 1
MAX_ENTRIES = 2**40  # entries of any one array read from a store


class HistoryFileError(ValueError):
    """A history store that is missing, foreign, truncated or corrupted; the message names what and where."""


class StoreBusyError(HistoryFileError):
    """Another process holds the store's lock (it is training into the store): one writer at a time."""


class IncompleteHistoryWarning(UserWarning):
    """The store holds fewer rounds than its run was configured for (a crash, or a run stopped early)."""


def _codecs():
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return [ZstdCodec(level=1), Crc32cCodec()]


@functools.cache
def _zstd():
    """The codec of a round's arrays in rounds.bin (zstd level 1, as format 2's zarr arrays had)."""
    from numcodecs import Zstd

    return Zstd(level=1)


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(a).tobytes()) & 0xFFFFFFFF


def _canon(x) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"))


def _jcrc(x) -> int:
    """crc32 of a JSON value in canonical form (sorted keys, no spaces)."""
    return zlib.crc32(_canon(x).encode()) & 0xFFFFFFFF


def _plain(x):
    """x as it reads back from JSON (tuples as lists), so checksums match before and after a round trip."""
    return json.loads(_canon(x))


def _spec(a: np.ndarray) -> list:
    """[crc32, shape, dtype] of an array: what a commit or the attributes record of it."""
    a = np.asarray(a)
    return [_crc(a), list(a.shape), a.dtype.name]


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


def _write(group, name: str, a: np.ndarray) -> list:
    """Writes one array; returns its spec [crc32, shape, dtype]."""
    a = np.ascontiguousarray(a)
    arr = group.create_array(name, shape=a.shape, dtype=a.dtype, chunks=tuple(max(1, d) for d in a.shape),
                             compressors=_codecs(), overwrite=True)
    if a.size:
        arr[...] = a
    return _spec(a)


def _read(group, name: str, where: str, spec: list | None = None) -> np.ndarray:
    """Reads one array, its on-disk shape and dtype checked against ``spec`` before anything is allocated and
    its bytes against the spec's crc32 after."""
    try:
        arr = group[name]
    except KeyError as e:
        raise HistoryFileError(f"{where}: array {name!r} is missing") from e
    except Exception as e:  # unreadable metadata
        raise HistoryFileError(f"{where}: array {name!r} is corrupted ({type(e).__name__}: {e})") from e
    if spec is not None:
        shape, dtype = list(getattr(arr, "shape", ())), np.dtype(getattr(arr, "dtype", None)).name
        if shape != list(spec[1]) or dtype != spec[2]:
            raise HistoryFileError(f"{where}: array {name!r} is {shape} {dtype} on disk, but was written as "
                                   f"{spec[1]} {spec[2]} (changed metadata)")
    try:
        a = np.asarray(arr[...])
    except Exception as e:  # zarr raises on checksum mismatch, truncated or undecodable chunks
        raise HistoryFileError(f"{where}: array {name!r} is corrupted ({type(e).__name__}: {e})") from e
    if spec is not None and _crc(a) != spec[0]:
        raise HistoryFileError(f"{where}: array {name!r} does not match its committed checksum "
                               "(corrupted or lost chunk)")
    return a


def _is_spec(s) -> bool:
    return (isinstance(s, list) and len(s) == 3 and isinstance(s[0], int) and isinstance(s[1], list)
            and all(isinstance(d, int) and 0 <= d <= MAX_ENTRIES for d in s[1]) and isinstance(s[2], str)
            and math.prod(s[1]) <= MAX_ENTRIES)


def _nbytes(spec: list) -> int:
    try:
        return math.prod(spec[1]) * np.dtype(spec[2]).itemsize
    except TypeError:
        raise HistoryFileError(f"unknown dtype {spec[2]!r}") from None


# ---------------------------------------------------------------------------------------------- the run's identity


def describe_run(apply_fn, tx, params0: PyTree, data, cfg, exclude=None, update_scale=None) -> dict:
    """What ``train`` records of a run so that ``resume=True`` can refuse a different one: the FedConfig fields
    that change the result (all but ``rounds``, which a resume may extend, and ``client_chunk``, a memory knob),
    crc32/shape/dtype of the client data, of ``exclude`` and ``update_scale``, and probes of what cannot be
    serialised: the optimizer's updates for four fixed gradients (learning rate, schedule, momentum...) and the
    model's outputs on two samples (sum |y| and sum y^2; compared to a relative 1e-3, so a resume on another
    device is accepted)."""
    fed = {}
    for f in dataclasses.fields(cfg):
        if f.name in ("rounds", "client_chunk"):
            continue
        v = getattr(cfg, f.name)
        fed[f.name] = int(v) if isinstance(v, (int, np.integer)) and not isinstance(v, bool) else float(v)
    out = {"fed": fed, "data": {n: _spec(np.asarray(a)) for n, a in zip(("x", "y", "n"), data)}}
    k = np.asarray(data[2]).shape[0]
    excl = np.zeros(k, bool) if exclude is None else np.asarray(exclude, bool)
    scale = np.ones(k, np.float32) if update_scale is None else np.asarray(update_scale, np.float32)
    out["users"] = {"exclude": _spec(excl), "update_scale": _spec(scale)}
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    try:  # the optimizer: its state's leaf shapes and its updates for four fixed gradients
        g = treedef.unflatten([jnp.asarray((np.arange(np.size(x)) % 7 - 3.0).reshape(np.shape(x)) * 0.01,
                                           jnp.result_type(x)) for x in leaves])
        state = tx.init(params0)
        probe = []
        for s in range(4):
            u, state = tx.update(jax.tree.map(lambda a: a * (s + 1), g), state, params0)
            probe.append(_num(sum(np.vdot(np.asarray(a, np.float64), np.asarray(b, np.float64))
                                  for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(g)))))
        out["optimizer"] = {"state": [[list(np.shape(a)), jnp.result_type(a).name] for a in jax.tree.leaves(state)],
                            "probe": probe}
    except Exception as e:  # an optimizer that needs more than (grads, state, params): not described
        out["optimizer"] = {"undescribed": type(e).__name__}
    try:  # the model: its outputs on client 0's first two samples
        y = np.asarray(apply_fn(params0, jnp.asarray(data[0][0][:2])), np.float64)
        out["model"] = {"probe": [_num(np.abs(y).sum()), _num((y * y).sum())]}  # no cancellation: a stable ratio
    except Exception as e:
        out["model"] = {"undescribed": type(e).__name__}
    return _plain(out)


def _num(x) -> float | str:
    """A probe value for JSON: a finite float, or its repr (nan, inf)."""
    x = float(x)
    return x if math.isfinite(x) else repr(x)


def _close(a, b) -> bool:
    if not all(isinstance(x, float) for x in [*a, *b]):
        return a == b
    return all(abs(x - y) <= 1e-3 * max(abs(x), abs(y)) + 1e-12 for x, y in zip(a, b)) and len(a) == len(b)


def run_differences(stored: dict | None, mine: dict) -> list[str]:
    """The fields in which two ``describe_run`` descriptions differ (probes compared to a relative 1e-3)."""
    if stored is None:
        return ["run (the store was not written by train: save_history stores no run)"]
    diff = []
    for part in sorted(set(stored) | set(mine)):
        a, b = stored.get(part), mine.get(part)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            if a != b:
                diff.append(part)
            continue
        for key in sorted(set(a) | set(b)):
            x, y = a.get(key), b.get(key)
            same = _close(x, y) if key == "probe" and isinstance(x, list) and isinstance(y, list) else x == y
            if not same:
                diff.append(f"{part}.{key}")
    return diff


# ---------------------------------------------------------------------------------------------- the lock


class StoreLock:
    """An exclusive OS lock (``fcntl.flock``) on ``folder/.medu.lock``, taken without waiting: a second writer
    gets ``StoreBusyError``. The OS releases it when the process ends, however it ends (also SIGKILL)."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:  # pragma: no cover
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(self._fd, 200, 0).decode(errors="replace").strip()
            os.close(self._fd)
            self._fd = None
            raise StoreBusyError(
                f"the history store {folder!r} is being written by another process ({holder or 'unknown'}): "
                "one writer at a time; wait for it to finish, or stop it"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"pid {os.getpid()}\n".encode(), 0)

    def release(self):
        """Releases the lock (idempotent)."""
        if self._fd is not None:
            if fcntl is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def remove_stale(folder: str) -> list[str]:
    """Removes the temporary stores left in ``folder`` by a creation that crashed (hold the lock)."""
    gone = []
    for entry in os.listdir(folder) if os.path.isdir(folder) else []:
        if entry.startswith(".") and (".tmp-" in entry or ".old-" in entry):
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)
            gone.append(entry)
    return gone


# ---------------------------------------------------------------------------------------------- writing


def _commit(fields: dict) -> dict:
    c = _plain(fields)
    c["crc"] = _jcrc(c)
    return c


def _pwrite(fd: int, data: bytes, offset: int, what: str) -> None:
    """Writes all of ``data`` at ``offset`` of an open file. Every byte a store appends or replaces after its
    creation goes through here (``what`` names it, e.g. "round 3", "commit 3", "state 1"), so tests can stop a
    run at any write, or fail one (a full disk)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _fsync_dir(folder: str) -> None:
    """Makes a folder's entries (a file created or renamed in it) durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace(path: str, data: bytes, what: str, sync: bool) -> None:
    """Replaces a file's content atomically: written to a temporary name (fsynced), then renamed over it."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _pwrite(fd, data, 0, what)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        _fsync_dir(os.path.dirname(path))


def _sync_tree(folder: str) -> None:
    """fsyncs every file and folder under ``folder`` (a new store, before it is renamed into place)."""
    for d, _, files in os.walk(folder):
        for f in files:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(d)


class HistoryWriter:
    """Appends a History's rounds (and the training state after each) to a store on disk.

    ``run`` is the run's description (``describe_run``), ``planned`` the rounds it is configured for (recorded
    in every commit; default: unknown until ``finish``). The store is built under a temporary name beside
    ``path`` and renamed into place, so a crash during creation leaves no half-made store. A round is appended
    to ``rounds.bin``, its training state written over the older of two slots, and the round committed by a
    line appended to ``commits.jsonl``: the store has the same few files whatever its number of rounds.
    ``fsync`` (default): ``append`` returns only when the round and its commit are on the disk (the data and
    the state slot are fdatasynced, then the commit line), so a power loss too keeps every committed round;
    ``fsync=False`` leaves that to the OS (a process crash still loses nothing committed, a power loss may lose
    the last rounds, which the checksums then report as damage)."""

    def __init__(self, path: str, history: History, overwrite: bool = False, run: dict | None = None,
                 planned: int | None = None, fsync: bool = True):
        import zarr

        path = os.path.normpath(path)
        self.path, self.planned, self.fsync = path, planned, fsync
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"{path!r} exists: pass overwrite=True, or resume from it")
        parent, base = os.path.split(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        p0 = [np.asarray(leaf) for leaf in jax.tree.leaves(history.params0)]
        weights = np.asarray(history.weights)
        attrs = _plain({
            "format": FORMAT, "version": VERSION, "compressor": history.compressor.config(),
            "like": _like_meta(history.like), "seed": int(history.seed), "server_lr": float(history.server_lr),
            "run": run, "params0": [_spec(a) for a in p0], "weights": _spec(weights),
        })
        attrs["checks"] = {k: _jcrc(v) for k, v in attrs.items()}
        tmp = os.path.join(parent, f".{base}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        root = zarr.open_group(tmp, mode="w", attributes=attrs)
        g = root.create_group("params0")
        for i, a in enumerate(p0):
            _write(g, str(i), a)
        _write(root, "weights", weights)
        for name in (ROUNDS_FILE, COMMITS_FILE, STATE_FILE.format(0), STATE_FILE.format(1)):
            open(os.path.join(tmp, name), "wb").close()
        if fsync:
            _sync_tree(tmp)
        if os.path.exists(path):  # overwrite: the old store is moved aside, then removed
            old = os.path.join(parent, f".{base}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, path)
        if fsync:
            _fsync_dir(parent)
        self._attrs_crc = self._prev = _jcrc(attrs)
        self.rounds = self._end = self._log_end = 0

    @classmethod
    def reopen(cls, path: str, fsync: bool = True) -> "HistoryWriter":
        """A writer that appends to an existing store after its committed rounds (``load_history`` checks it).
        What lies past the last commit (a round in flight when a writer stopped) is cut off."""
        _, attrs, acrc = _open(path)
        self = cls.__new__(cls)
        self.path, self.fsync, self._attrs_crc = path, fsync, acrc
        chain = _chain(path, acrc, _record_bound(attrs))
        self.planned = chain.final["rounds"] if chain.final else (chain.commits[-1].get("of") if chain.commits
                                                                     else None)
        self._set(chain, len(chain.commits))
        return self

    def _set(self, chain: "_Chain", n: int) -> None:
        """Keeps rounds < n of ``chain``: the log and the data file are cut after round n - 1's bytes."""
        self.rounds = n
        self._prev = chain.commits[n - 1]["crc"] if n else self._attrs_crc
        self._end = chain.commits[n - 1]["end"] if n else 0
        self._log_end = chain.ends[n - 1] if n else 0
        for name, size in ((COMMITS_FILE, self._log_end), (ROUNDS_FILE, self._end)):  # the log first
            fd = os.open(os.path.join(self.path, name), os.O_RDWR)
            try:
                if os.fstat(fd).st_size != size:
                    os.ftruncate(fd, size)
                    if self.fsync:
                        os.fsync(fd)
            finally:
                os.close(fd)
        for entry in os.listdir(self.path):  # a completion mark a crash left half-written
            if ".tmp-" in entry:
                os.remove(os.path.join(self.path, entry))

    def append(self, t: int, record: dict, params: PyTree | None = None, compressor_state: dict | None = None):
        """Writes round t's record and state slot, then commits the round (the commit is written last)."""
        if t != self.rounds:
            raise ValueError(f"{self.path!r}: round {t} appended after {self.rounds} committed rounds")
        arrays, places, blobs, end = {}, {}, [], self._end
        for k in sorted(record):  # each array one zstd frame, the round's frames one after the other
            a = np.ascontiguousarray(record[k])
            blob = _zstd().encode(a) if a.size else b""
            name = f"rounds/{t}/{k}"
            arrays[name], places[name] = _spec(a), [end, len(blob), zlib.crc32(blob) & 0xFFFFFFFF]
            blobs.append(blob)
            end += len(blob)
        slot = []
        if params is not None:  # the state slot: raw bytes, leaf after leaf
            at = 0
            for sub, tree in (("params", params), ("compressor", compressor_state["filters"]),
                              ("correction", compressor_state.get("correction"))):
                for i, leaf in enumerate(jax.tree.leaves(tree)):
                    a = np.ascontiguousarray(np.asarray(leaf))
                    name = f"state/{t % 2}/{sub}/{i}"
                    arrays[name] = _spec(a)
                    places[name] = [at, a.nbytes, arrays[name][0]]
                    slot.append(a.tobytes())
                    at += a.nbytes
        c = _commit({"round": t, "of": self.planned, "keys": sorted(record), "arrays": arrays, "places": places,
                     "end": end, "attrs": self._attrs_crc, "prev": self._prev})
        line = (_canon(c) + "\n").encode()
        try:
            # the data, then the state slot t % 2 in place (the last commit's state is in the other slot), both
            # on the disk before the commit line that covers them
            self._put(ROUNDS_FILE, b"".join(blobs), self._end, f"round {t}")
            if params is not None:
                self._put(STATE_FILE.format(t % 2), b"".join(slot), 0, f"state {t % 2}", cut=True)
            self._put(COMMITS_FILE, line, self._log_end, f"commit {t}")
        except OSError as e:
            msg = (f"writing round {t} to the history store {self.path!r} failed ({e.strerror or e}); the store "
                   f"keeps its {t} committed rounds: free space and resume")
            raise OSError(e.errno, msg) from e
        self._prev, self.rounds, self._end, self._log_end = c["crc"], t + 1, end, self._log_end + len(line)

    def _put(self, name: str, data: bytes, offset: int, what: str, cut: bool = False) -> None:
        """Writes ``data`` at ``offset`` of the store's file ``name`` (``cut``: and ends the file there), then
        fdatasyncs it when the writer is durable. The files exist from creation on, so no folder entry changes."""
        fd = os.open(os.path.join(self.path, name), os.O_WRONLY)
        try:
            _pwrite(fd, data, offset, what)
            if cut and os.fstat(fd).st_size != offset + len(data):
                os.ftruncate(fd, offset + len(data))
            if self.fsync:
                os.fdatasync(fd)
        finally:
            os.close(fd)

    def finish(self):
        """Marks the store complete: it holds every round of its run (the number and the last commit's checksum)."""
        mark = _commit({"rounds": self.rounds, "last": self._prev})
        if _read_final(self.path) != mark:  # a finished store resumed with nothing to add keeps its mark
            _replace(os.path.join(self.path, FINAL_FILE), _canon(mark).encode(), "final", self.fsync)

    def unfinish(self):
        """Removes the completion mark (before a resume appends more rounds)."""
        try:
            os.remove(os.path.join(self.path, FINAL_FILE))
        except FileNotFoundError:
            return
        if self.fsync:
            _fsync_dir(self.path)

    def truncate(self, num_rounds: int):
        """Drops rounds >= num_rounds (an uncommitted round in flight, before a resume rewrites it): the completion
        mark first, then the commits (one cut of the log, so a crash here leaves a valid chain), then their data."""
        _, attrs, _ = _open(self.path)
        chain = _chain(self.path, self._attrs_crc, _record_bound(attrs))
        if chain.final is not None and len(chain.commits) > num_rounds:
            self.unfinish()
        self._set(chain, min(num_rounds, len(chain.commits)))


# ---------------------------------------------------------------------------------------------- reading


def _check_attrs(path: str, attrs: dict) -> None:
    """Every root attribute against its checksum, then the structure against sane bounds."""
    checks = attrs.get("checks")
    if not isinstance(checks, dict):
        raise HistoryFileError(f"{path!r}: the root attributes carry no checksums (corrupted)")
    for key in sorted(set(checks) | set(attrs) - {"checks"}):
        if key not in attrs:
            raise HistoryFileError(f"{path!r}: root attribute {key!r} is missing")
        if key not in checks:
            raise HistoryFileError(f"{path!r}: root attribute {key!r} is not covered by the checksums (added later)")
        if _jcrc(attrs[key]) != checks[key]:
            raise HistoryFileError(f"{path!r}: root attribute {key!r} does not match its checksum (changed or "
                                   f"corrupted: it reads {_canon(attrs[key])[:120]})")
    try:
        leaves = attrs["like"]["leaves"]
        assert len(attrs["like"]["paths"]) == len(leaves) == len(attrs["params0"]) >= 1
        k = leaves[0][0][0]
        assert isinstance(k, int) and 1 <= k <= MAX_USERS, f"{k!r} users"
        for (shape, dtype), spec in zip(leaves, attrs["params0"]):
            assert all(isinstance(d, int) and d >= 0 for d in shape) and shape[0] == k, f"leaf shape {shape}"
            assert math.prod(shape) <= MAX_ENTRIES, f"leaf shape {shape}"
            assert _is_spec(spec) and spec[1] == shape[1:] and spec[2] == dtype, f"params0 {spec} for {shape} {dtype}"
        assert _is_spec(attrs["weights"]) and attrs["weights"][1] == [k], f"weights {attrs['weights']} for {k} users"
        assert isinstance(attrs["seed"], int) and isinstance(attrs["server_lr"], (int, float))
        assert math.isfinite(attrs["server_lr"]), "server_lr"
    except (AssertionError, KeyError, TypeError, IndexError) as e:
        raise HistoryFileError(f"{path!r}: the root attributes describe an impossible history ({e})") from None


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
        old = isinstance(attrs.get("version"), int) and attrs["version"] < VERSION
        raise HistoryFileError(
            f"{path!r} has history format version {attrs.get('version')!r}, this is {VERSION}" + (
                " (written by an older medu_jax, which kept a folder of arrays per round; read it with that "
                "version, or train again)" if old else ""))
    _check_attrs(path, attrs)
    return root, attrs, _jcrc(attrs)


def _record_bound(attrs: dict) -> int:
    """Bytes a round's arrays (record and state slot) may take: generous, but finite."""
    leaves = attrs["like"]["leaves"]
    k, p = leaves[0][0][0], sum(math.prod(s[1:]) for s, _ in leaves)
    return 64 * k * max(p, 1) + (1 << 24)


def _stored_bound(nbytes: int) -> int:
    """The most bytes a zstd frame of ``nbytes`` bytes can take (zstd's worst case, with room to spare)."""
    return nbytes + nbytes // 128 + 1024


def _valid_commit(c: dict, t: int, bound: int) -> str | None:
    """Why commit t's content is impossible, or None."""
    if c.get("round") != t:
        return f"it names round {c.get('round')!r}"
    keys, arrays, places = c.get("keys"), c.get("arrays"), c.get("places")
    if not isinstance(keys, list) or not isinstance(arrays, dict) or not isinstance(places, dict):
        return "no keys, arrays or places"
    if any(f"rounds/{t}/{k}" not in arrays for k in keys):
        return "an array of the record is not listed"
    if not all(_is_spec(s) for s in arrays.values()):
        return "an array spec is malformed or too large"
    try:
        total = sum(_nbytes(s) for s in arrays.values())
    except HistoryFileError as e:
        return str(e)
    if total > bound:
        return f"its arrays take {total} bytes, more than a round of this history can ({bound})"
    for name, spec in arrays.items():
        p = places.get(name)
        if not (isinstance(p, list) and len(p) == 3 and all(isinstance(x, int) and x >= 0 for x in p)):
            return f"array {name!r} has no valid place on disk"
        if p[1] > _stored_bound(_nbytes(spec)):
            return f"array {name!r} takes {p[1]} bytes on disk, more than {_nbytes(spec)} bytes can"
    ends = [places[f"rounds/{t}/{k}"][0] + places[f"rounds/{t}/{k}"][1] for k in keys]
    if not isinstance(c.get("end"), int) or c["end"] < max(ends, default=0):
        return "its data end is not after its arrays"
    return None


def _read_final(path: str) -> dict | None:
    """The completion mark's content (None when there is none); a mark that is not valid JSON is corrupted."""
    try:
        with open(os.path.join(path, FINAL_FILE), "rb") as f:
            text = f.read(1 << 16)
    except FileNotFoundError:
        return None
    try:
        final = json.loads(text)
    except ValueError:
        final = None
    if (not isinstance(final, dict) or final.get("crc") != _jcrc({k: v for k, v in final.items() if k != "crc"})
            or not isinstance(final.get("rounds"), int)):
        raise HistoryFileError(f"{path!r}: the completion mark ('final') is corrupted")
    return final


def _parse_commit(line: bytes) -> dict | None:
    """One line of the commit log as a commit, or None when it is not one (torn, or its own checksum fails)."""
    try:
        c = json.loads(line)
    except ValueError:
        return None
    if not isinstance(c, dict) or c.get("crc") != _jcrc({k: v for k, v in c.items() if k != "crc"}):
        return None
    return c


class _Chain(NamedTuple):
    commits: list  # rounds 0, 1, ... as one verified chain
    final: dict | None  # the completion mark
    ends: list  # the byte offset in the commit log after each commit's line


def _chain(path: str, attrs_crc: int, bound: int) -> _Chain:
    """The verified commit chain of a store.

    A torn or unreadable last line of the log of a store that is not marked complete is the round in flight:
    dropped. Anything else that breaks the chain (a missing or corrupted middle commit, a commit from other
    attributes or replaced, a completion mark that does not match the last commit) is a HistoryFileError naming
    it."""
    final = _read_final(path)
    try:
        with open(os.path.join(path, COMMITS_FILE), "rb") as f:
            log = f.read()
    except FileNotFoundError:
        raise HistoryFileError(f"{path!r}: the commit log ({COMMITS_FILE}) is missing") from None
    lines = log.split(b"\n")
    lines[-1:] = [lines[-1]] if lines[-1] else []  # text after the last newline: a torn line
    parsed = [_parse_commit(line) for line in lines]
    out, ends, prev, at = [], [], attrs_crc, 0
    for i, (line, c) in enumerate(zip(lines, parsed)):
        t = len(out)
        if c is None or not line.endswith(b"}") or i == len(lines) - 1 and not log.endswith(b"\n"):
            if i == len(lines) - 1 and final is None:  # the round in flight when the writer stopped: not committed
                break
            raise HistoryFileError(f"{path!r}: the commit of round {t} is corrupted")
        if isinstance(c.get("round"), int) and c["round"] > t:
            later = [x["round"] for x in parsed[i:] if x is not None and isinstance(x.get("round"), int)]
            raise HistoryFileError(f"{path!r}: the commit of round {t} is missing, but rounds {later} are "
                                   "committed (a deleted commit)")
        why = _valid_commit(c, t, bound)
        if why:
            raise HistoryFileError(f"{path!r}: the commit of round {t} is impossible ({why})")
        if c.get("attrs") != attrs_crc:
            raise HistoryFileError(f"{path!r}: the commit of round {t} was written for other root attributes "
                                   "(an attribute was changed, or the commit comes from another store)")
        if c.get("prev") != prev:
            raise HistoryFileError(f"{path!r}: the commit of round {t} does not follow the commit of round {t - 1} "
                                   "(a commit was replaced or comes from another store)")
        if out and c["end"] < out[-1]["end"]:
            raise HistoryFileError(f"{path!r}: the commit of round {t} places its data before round {t - 1}'s")
        at += len(line) + 1
        prev = c["crc"]
        out.append(c)
        ends.append(at)
    if final is not None and (final["rounds"] != len(out) or final.get("last") != prev):
        raise HistoryFileError(
            f"{path!r}: the store is marked complete with {final['rounds']} rounds, but its commits hold "
            f"{len(out)}" + (f" (the commit of round {len(out)} is missing or corrupted)"
                             if final["rounds"] > len(out) else " or do not end with the marked commit"))
    return _Chain(out, final, ends)


def _commits(path: str, attrs_crc: int, bound: int) -> tuple[list[dict], dict | None]:
    """(the verified commits of rounds 0, 1, ..., the completion mark or None): see ``_chain``."""
    chain = _chain(path, attrs_crc, bound)
    return chain.commits, chain.final


class StoreInfo(NamedTuple):
    """What a store holds: committed rounds, the rounds its run was configured for (None: unknown), whether it
    is complete (marked finished by its writer), and the run's description (``describe_run``; None when written
    by ``save_history``)."""

    path: str
    rounds: int
    planned: int | None
    complete: bool
    run: dict | None
    params0: list


def _info(path: str, attrs: dict, commits: list, final: dict | None) -> StoreInfo:
    planned = final["rounds"] if final else (commits[-1].get("of") if commits else None)
    return StoreInfo(path, len(commits), planned, final is not None, attrs.get("run"), attrs["params0"])


def store_info(path: str) -> StoreInfo:
    """Reads and checks a store's attributes and commit chain (no round data): ``StoreInfo``."""
    _, attrs, acrc = _open(path)
    return _info(path, attrs, *_commits(path, acrc, _record_bound(attrs)))


def _load(file: str, name: str, spec: list, place: list, where: str, compressed: bool) -> np.ndarray:
    """One array of a round or state slot: its bytes at ``place`` = [offset, length, crc32] of ``file``, checked
    against the crc32 of the bytes on disk, then (zstd frame or raw) decoded into an array of the committed shape
    and dtype (bounded by the commit) and checked against the committed crc32."""
    off, n, crc = place
    try:
        with open(file, "rb") as f:
            f.seek(off)
            blob = f.read(n)
    except FileNotFoundError:
        raise HistoryFileError(f"{where}: {os.path.basename(file)!r}, which holds array {name!r}, is missing") from None
    if len(blob) != n:
        raise HistoryFileError(f"{where}: array {name!r} is truncated ({len(blob)} of its {n} bytes are on disk)")
    if zlib.crc32(blob) & 0xFFFFFFFF != crc:
        raise HistoryFileError(f"{where}: array {name!r} is corrupted (its bytes on disk do not match their checksum)")
    a = np.empty(spec[1], np.dtype(spec[2]))
    if a.size:
        try:
            if not compressed:
                if n != a.nbytes:
                    raise ValueError(f"{n} bytes for {a.nbytes}")
                a = np.frombuffer(blob, a.dtype).reshape(a.shape).copy()
            else:
                _zstd().decode(blob, out=a)
        except Exception as e:
            raise HistoryFileError(f"{where}: array {name!r} is corrupted ({type(e).__name__}: {e})") from e
    if _crc(a) != spec[0]:
        raise HistoryFileError(f"{where}: array {name!r} does not match its committed checksum")
    return a


class StoredRecord(Mapping):
    """Round t's compact record in a store, read array by array when accessed and checked against its commit:
    replay reads a round's masks without its payload rows, and the rows only for the chunk it decodes."""

    def __init__(self, path: str, commit: dict):
        self._path, self._t, self._keys = path, commit["round"], tuple(commit["keys"])
        self._specs, self._places = commit["arrays"], commit["places"]
        self._where = f"{path!r} round {self._t}"

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._keys:
            raise KeyError(key)
        name = f"rounds/{self._t}/{key}"
        return _load(os.path.join(self._path, ROUNDS_FILE), name, self._specs[name], self._places[name],
                     self._where, compressed=True)

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class StoredRecords(Sequence):
    """The committed rounds of a store as a read-only sequence of ``StoredRecord``: a History over it holds only
    the commit index in host memory and reads rounds from disk as they are used. ``info``: ``StoreInfo``."""

    def __init__(self, path: str, root=None):
        _, attrs, acrc = _open(path)
        self.path = path
        commits, final = _commits(path, acrc, _record_bound(attrs))
        self.info = _info(path, attrs, commits, final)
        self._items = [StoredRecord(path, c) for c in commits]

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
    uses it, so a history larger than host memory replays chunk by chunk. A store that was cut short (fewer
    rounds than its run was configured for) loads with an ``IncompleteHistoryWarning``; see ``store_info``.
    """
    root, attrs, _ = _open(path)
    meta = attrs["like"]
    leaves = [(tuple(s), d) for s, d in meta["leaves"]]
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
    try:
        compressor = Compressor.from_config(attrs["compressor"])
    except (TypeError, ValueError) as e:
        raise HistoryFileError(f"{path!r}: unreadable compressor configuration ({e})") from e
    records = StoredRecords(path)  # the commit chain, before any array is read
    p0 = [_read(root["params0"], str(i), f"{path!r} params0", spec) for i, spec in enumerate(attrs["params0"])]
    params0 = treedef.unflatten(p0) if template is not None else _rebuild(meta["paths"], p0)
    like = Like(jax.tree_util.tree_structure(params0), tuple(leaves))
    weights = _read(root, "weights", repr(path), attrs["weights"])
    hist = History(compressor, like, attrs["seed"], params0, weights, attrs["server_lr"])
    hist.records = records if lazy else [dict(r) for r in records]
    info = records.info
    if not info.complete:
        planned = "an unknown number of" if info.planned is None else f"{info.planned}"
        warnings.warn(IncompleteHistoryWarning(
            f"the history store {path!r} was cut short: it holds {info.rounds} of {planned} rounds (a crash, or "
            "a run stopped early); train(..., resume=True) continues it"), stacklevel=2)
    return hist


def load_state(path: str, history: History, t: int) -> tuple[PyTree, dict]:
    """(global params, compressor state) after round t, from the store's state slot t % 2 (checksummed; only the
    last two committed rounds have theirs)."""
    _, attrs, acrc = _open(path)
    commits, _ = _commits(path, acrc, _record_bound(attrs))
    if t >= len(commits):
        raise HistoryFileError(f"{path!r} holds {len(commits)} committed rounds, no state after round {t}")
    specs, places = commits[t]["arrays"], commits[t]["places"]
    where = f"{path!r} state after round {t}"
    file = os.path.join(path, STATE_FILE.format(t % 2))

    def read(sub: str, like_tree: PyTree) -> PyTree:
        n = len(jax.tree.leaves(like_tree))
        keys = [f"state/{t % 2}/{sub}/{i}" for i in range(n)]
        if any(k not in specs for k in keys):
            raise HistoryFileError(f"{where}: the store holds no training state (saved without params)")
        vals = [_load(file, k, specs[k], places[k], where, compressed=False) for k in keys]
        for k, v, x in zip(keys, vals, jax.tree.leaves(like_tree)):
            if v.shape != np.shape(x):
                raise HistoryFileError(f"{where}: array {k!r} has shape {v.shape}, the model needs {np.shape(x)}")
        return jax.tree_util.tree_structure(like_tree).unflatten([jnp.asarray(v) for v in vals])

    params = read("params", history.params0)
    state = history.compressor.init(history.like.zeros())
    state = {**state, "filters": read("compressor", state["filters"])}
    if "correction" in state:  # the model correction's carry (trained minus replayed model)
        state["correction"] = read("correction", state["correction"])
    return params, state


def save_history(history: History, path: str, overwrite: bool = False) -> None:
    """Writes a whole in-memory History (no training state) to a new store, marked complete."""
    w = HistoryWriter(path, history, overwrite, planned=history.num_rounds)
    for t, rec in enumerate(history.records):
        w.append(t, rec)
    w.finish()
