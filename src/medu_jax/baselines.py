"""The server-side unlearning methods MEDU is compared with, over the same (float32 or compressed) history.

- ``fedrecover``: trajectory-corrected replay (L-BFGS) with warm-up and periodic exact rounds of the remaining
  users and final tuning rounds (Cao et al., FedRecover, 2023).
- ``federaser``: calibrated replay over a history kept every N rounds: the remaining users run a few local
  steps from the unlearned model and the server keeps their direction with the stored update's norm per user
  (Liu et al., FedEraser, 2021).
- ``crab``: selective storage (informative rounds and users, with model checkpoints) and rollback to the last
  round before the removed users' influence grew, then calibrated recovery (Jiang et al., Crab, 2024).

Each needs the remaining users to compute (exact or calibration rounds): ``apply_fn``, ``tx``, their ``data``
and the run's ``FedConfig``. These are the project's readings of the papers, adapted to one history object.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.compressors import Compressor, tree_sq_norm
from medu_jax.fedavg import ClientData, FedConfig, check_user_ids, fed_round, weighted_mean
from medu_jax.history import History, compressor_key
from medu_jax.unlearn import _init_state, _replay, _step_corrected, corrected_state, finetune, replay

PyTree = Any


def _nonempty(remove: Iterable[int], method: str) -> list:
    remove = list(remove)
    if not remove:
        raise ValueError(f"{method}: the remove set is empty")
    return remove


def _masks(history: History, remove: Iterable[int]):
    k = history.num_users
    excl = np.isin(np.arange(k), check_user_ids(remove, k))
    return jnp.asarray(excl), jnp.ones((k,), jnp.float32)


def fedrecover(history: History, remove: Iterable[int], apply_fn, tx, data: ClientData, cfg: FedConfig,
               warmup: int = 2, period: int = 0, tune: int = 2, memory: int = 5, gamma: float = 0.03,
               chunk: int | None = None) -> PyTree:
    """FedRecover-style recovery: the first ``warmup`` rounds and every ``period``-th round (0: none) are exact
    rounds of the remaining users from the unlearned model; the others are L-BFGS-corrected stored updates;
    then ``tune`` exact rounds."""
    remove = _nonempty(remove, "fedrecover")
    excl, ones = _masks(history, remove)
    exact = frozenset(i for i in range(history.num_rounds) if i < warmup or (period and (i + 1) % period == 0))

    def exact_round(w, t):
        return fed_round(apply_fn, tx, cfg, w, data, t, excl, ones)[0]

    w = _replay(history, remove, chunk, _step_corrected, corrected_state(history, memory), jnp.float32(gamma),
                exact=(exact, exact_round))
    return finetune(apply_fn, tx, w, data, cfg, remove, tune)


@functools.partial(jax.jit, static_argnames=("compressor",))
def _decode(compressor: Compressor, message, state, key):
    return compressor.decode(message, state, key)


@functools.partial(jax.jit, static_argnames=("apply_fn", "tx", "cal_cfg"))
def _calibrated_step(apply_fn, tx, cal_cfg: FedConfig, w, data, t, excl, ones, decoded, valid, weights, lr):
    """w + lr * mean_k |stored_k| * cal_k / |cal_k| over valid remaining users that calibrated."""
    _, cal, active, _ = fed_round(apply_fn, tx, cal_cfg, w, data, t, excl, ones)
    ratio = jnp.sqrt(tree_sq_norm(decoded) / jnp.maximum(tree_sq_norm(cal), 1e-30))
    upd = jax.tree.map(lambda c: c * ratio.reshape((-1,) + (1,) * (c.ndim - 1)).astype(c.dtype), cal)
    agg = weighted_mean(upd, valid & active & ~excl, weights)
    return jax.tree.map(lambda a, u: a + (lr * u).astype(a.dtype), w, agg)


def _rounds(history: History):
    """(record index, round id, one-round message) for every record, decoded in order by the caller."""
    ids = history.round_ids
    for i in range(history.num_rounds):
        yield i, ids[i], jax.tree.map(lambda a: a[0], history.expand([i]))


def _calibrated(history: History, remove, apply_fn, tx, data, cfg, cal_steps: int, start: int, w: PyTree) -> PyTree:
    """Decodes every record in order (closed loop) and, from record ``start`` on, applies calibrated steps."""
    if int(cal_steps) < 1:
        raise ValueError(f"cal_steps must be >= 1, got {cal_steps}")
    excl, ones = _masks(history, remove)
    state = _init_state(history.compressor, history.like)
    cal_cfg = dataclasses.replace(cfg, local_steps=int(cal_steps))
    weights = jnp.asarray(history.weights, jnp.float32)
    for i, t, msg in _rounds(history):
        decoded, valid, state = _decode(history.compressor, msg, state, compressor_key(history.seed, t))
        if i >= start:
            w = _calibrated_step(apply_fn, tx, cal_cfg, w, data, t, excl, ones, decoded, valid, weights,
                                 history.server_lr)
    return w


def federaser(history: History, remove: Iterable[int], apply_fn, tx, data: ClientData, cfg: FedConfig,
              cal_steps: int = 2) -> PyTree:
    """FedEraser-style calibrated replay over every round the history kept (build it with Selection(every=N))."""
    remove = _nonempty(remove, "federaser")
    w = jax.tree.map(jnp.asarray, history.params0)
    return _calibrated(history, remove, apply_fn, tx, data, cfg, cal_steps, 0, w)


def influence_start(history: History, remove: Iterable[int]) -> int:
    """Crab's rollback point: the first kept record of a round in which a removed user took part (the
    ``participants`` mask when the selection filtered users, else ``active``); ``num_rounds`` if none did."""
    removed = check_user_ids(remove, history.num_users)
    for i, r in enumerate(history.records):
        mask = np.unpackbits(r.get("participants", r["active"]))[: history.num_users].astype(bool)
        if mask[removed].any():
            return i
    return history.num_rounds


def crab(history: History, remove: Iterable[int], apply_fn, tx, data: ClientData, cfg: FedConfig,
         cal_steps: int = 2) -> PyTree:
    """Crab-style unlearning: roll back to the checkpoint before the removed users' influence started, then
    calibrated recovery over the kept rounds from there (build the history with Selection(checkpoints=True),
    optionally min_change / user_fraction for Crab's informative rounds and users)."""
    remove = _nonempty(remove, "crab")
    start = influence_start(history, remove)
    if start == history.num_rounds:  # the removed users never mattered in the kept rounds
        return replay(history, remove)
    return _calibrated(history, remove, apply_fn, tx, data, cfg, cal_steps, start, history.checkpoint(start))
