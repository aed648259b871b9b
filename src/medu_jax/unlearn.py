"""Server-side unlearning by replaying a (compressed) history without the removed users.

Replay starts from the stored w^0 and, for every round, decodes the stored messages with the chain's
decoder (closed loop, bit-for-bit the encoder's view), then adds the server step of the weighted mean of the
remaining users' decoded updates (weights re-normalised over the users kept). Rounds are one ``lax.scan``,
optionally in chunks of rounds so that only one chunk of expanded codes sits in device memory at a time.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.compressors import Compressor, Message
from medu_jax.history import History, compressor_key

PyTree = Any


def weighted_mean(updates: PyTree, mask: jax.Array, weights: jax.Array) -> PyTree:
    """Sum_k w_k m_k x_k / Sum_k w_k m_k over the user axis; zeros when no user is kept."""
    w = weights * mask
    total = jnp.sum(w)
    w = jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)
    return jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), updates)


def check_user_ids(ids: Iterable[int], num_users: int, what: str = "remove") -> np.ndarray:
    """Validates user ids (integers in [0, K)) and returns them as a sorted unique int array."""
    ids = list(ids)
    bad = [u for u in ids if isinstance(u, bool) or not isinstance(u, (int, np.integer))]
    if bad:
        raise TypeError(f"{what}: user ids must be integers, got {bad}")
    unknown = sorted({int(u) for u in ids if not 0 <= int(u) < num_users})
    if unknown:
        raise ValueError(f"{what}: unknown user ids {unknown}; this history has users 0..{num_users - 1}")
    return np.unique(np.asarray(ids, dtype=np.int64))


@functools.partial(jax.jit, static_argnames=("compressor",))
def _replay_chunk(compressor: Compressor, params, state, messages: Message, rounds, keep, weights, seed, lr):
    def step(carry, xs):
        w, st = carry
        msg, t = xs
        decoded, valid, st = compressor.decode(msg, st, compressor_key(seed, t))
        agg = weighted_mean(decoded, valid & keep, weights)
        w = jax.tree.map(lambda a, u: a + (lr * u).astype(a.dtype), w, agg)
        return (w, st), None

    (params, state), _ = jax.lax.scan(step, (params, state), (messages, rounds))
    return params, state


def replay(history: History, remove: Iterable[int] = (), chunk: int | None = None) -> PyTree:
    """The model obtained by replaying ``history`` without the users in ``remove``.

    With ``remove`` empty this reconstructs the trained model from the history (up to compression error).
    ``chunk`` bounds how many rounds of expanded codes are on the device at once (default: all rounds).
    """
    if history.num_rounds == 0:
        raise ValueError("the history holds no rounds to replay")
    k = history.num_users
    removed = check_user_ids(remove, k)
    keep = jnp.asarray(~np.isin(np.arange(k), removed))
    params = jax.tree.map(jnp.asarray, history.params0)
    state = history.compressor.init(history.like.zeros())
    weights = jnp.asarray(history.weights, jnp.float32)
    t_total = history.num_rounds
    chunk = t_total if chunk is None else max(1, min(int(chunk), t_total))
    for start in range(0, t_total, chunk):
        idx = list(range(start, min(start + chunk, t_total)))
        msgs = history.expand(idx)
        pad = chunk - len(idx)
        if pad:  # pad the last chunk with inactive rounds so one compiled program serves all chunks
            msgs = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]), msgs)
        rounds = jnp.asarray(idx + [t_total] * pad, jnp.int32)
        params, state = _replay_chunk(
            history.compressor, params, state, msgs, rounds, keep, weights, history.seed, history.server_lr
        )
    return params


def unlearn(history: History, remove: Iterable[int], chunk: int | None = None) -> PyTree:
    """Removes the users in ``remove`` from the model by replaying the history without them."""
    remove = list(remove)
    if not remove:
        raise ValueError("unlearn: the remove set is empty; use replay(history) to rebuild the trained model")
    return replay(history, remove, chunk)
