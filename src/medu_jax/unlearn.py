"""Server-side unlearning by replaying a (compressed) history without the removed users.

Naive replay is linear in the stored rows: the chain's restore (per-user selects and adds against its
closed-loop state) and the weighted mean of the remaining users (weights re-normalised over the users kept)
give w_u = w^0 + lr * sum_{t, j} C[t, j] row[t, j]. ``row_weights`` finds C from the masks alone, then every
stored row is decoded once (rounds in parallel) and summed with its weight. Trajectory-corrected replay is
not linear in the rows: it decodes round by round with the chain's decoder (bit-for-bit the encoder's view)
in one ``lax.scan``. Both work in chunks of rounds so only one chunk of expanded codes sits on the device.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from medu_jax.compressors import Compressor, Message
from medu_jax.fedavg import ClientData, FedConfig, fed_rounds, init_server, server_update, user_mask, weighted_mean
from medu_jax.history import History, compressor_key
from medu_jax.trees import relative_distance

PyTree = Any


def lbfgs_hvp(S: jax.Array, Y: jax.Array, count: jax.Array, v: jax.Array, gamma: float = 1.0,
              rayleigh: bool = False) -> jax.Array:
    """B v for the compact L-BFGS approximation B of a Hessian built from the pairs (S[i], Y[i]).

    S, Y are (m, d) with the newest pair last and the ``count`` newest pairs valid (older rows are zero);
    Byrd, Nocedal & Schnabel (1994): B = sigma I - [sigma S; Y]^T M^-1 [sigma S; Y], with sigma = gamma y'y/s'y
    of the newest pair (gamma < 1 shrinks the curvature assumed outside the pairs' span), or with ``rayleigh``
    sigma = y's/s's, FedRecover's (and FLDetector's) choice: the curvature along s, which noise in y orthogonal
    to s (a compressed history's coding error) does not inflate. Zero when count is 0.
    """
    m = S.shape[0]
    ok = jnp.arange(m) >= m - count
    s_last, y_last = S[-1], Y[-1]
    num, den = (y_last @ s_last, s_last @ s_last) if rayleigh else (y_last @ y_last, s_last @ y_last)
    sigma = gamma * jnp.where(count > 0, num / jnp.where(count > 0, den, 1.0), 0.0)
    sy = S @ Y.T
    low = jnp.tril(sy, -1)
    top = jnp.concatenate([sigma * (S @ S.T), low], axis=1)
    bot = jnp.concatenate([low.T, -jnp.diag(jnp.diag(sy))], axis=1)
    mm = jnp.concatenate([top, bot], axis=0)
    ok2 = jnp.concatenate([ok, ok])
    mm = jnp.where(ok2[:, None] & ok2[None, :], mm, 0.0) + jnp.diag(jnp.where(ok2, 0.0, 1.0))
    rhs = jnp.where(ok2, jnp.concatenate([sigma * (S @ v), Y @ v]), 0.0)
    p = jnp.linalg.solve(mm, rhs)
    bv = sigma * v - (sigma * (p[:m] @ S) + p[m:] @ Y)
    return jnp.where(count > 0, bv, 0.0)


def _flat_users(tree: PyTree) -> jax.Array:
    """(K, d) float32 matrix of a pytree whose leaves are (K, ...)."""
    leaves = jax.tree.leaves(tree)
    k = leaves[0].shape[0]
    return jnp.concatenate([x.reshape(k, -1).astype(jnp.float32) for x in leaves], axis=1)


def _step_corrected(carry, decoded, valid, keep, weights, lr, hyper, correction):
    """FedRecover-style step: the remaining users' mean update, corrected by an L-BFGS Jacobian estimate. The
    original trajectory takes the round's model correction too, when the history codes them."""
    w_u, (w_o, S, Y, count, prev_w, prev_g, t) = carry
    flat_u, unravel = ravel_pytree(w_u)
    flat = _flat_users(decoded)
    w = weights * valid
    g_all = weighted_mean(flat, valid, weights)
    g_rem = weighted_mean(flat, valid & keep, weights)
    # pair from the original trajectory: s = w^{t-1} - w^{t-2}, y = -(g_rem^t - g_rem^{t-1}) (curvature of -J)
    s, y = w_o - prev_w, -(g_rem - prev_g)
    good = (t > 0) & (s @ y > 1e-10 * jnp.linalg.norm(s) * jnp.linalg.norm(y)) & (jnp.sum(w * keep) > 0)
    S = jnp.where(good, jnp.concatenate([S[1:], s[None]]), S)
    Y = jnp.where(good, jnp.concatenate([Y[1:], y[None]]), Y)
    count = jnp.where(good, jnp.minimum(count + 1, S.shape[0]), count)
    g_hat = g_rem - lbfgs_hvp(S, Y, count, flat_u - w_o, hyper)
    g_hat = jnp.where(jnp.sum(w * keep) > 0, g_hat, 0.0)
    new_u = unravel(flat_u + lr * g_hat)
    w_next = w_o + lr * g_all
    if correction is not None:
        w_next = w_next + ravel_pytree(correction)[0]
    return (new_u, (w_next, S, Y, count, w_o, g_rem, t + 1))


@dataclasses.dataclass(frozen=True)
class _ServerStep:
    """Naive replay's step through a server optimizer: the remaining users' weighted mean decoded update,
    then ``fedavg.server_update`` (the carry is (params, optimizer state))."""

    server_tx: Any

    def __call__(self, carry, decoded, valid, keep, weights, lr, hyper, correction):
        w_u, opt = carry
        mean = weighted_mean(decoded, valid & keep, weights)
        return server_update(self.server_tx, w_u, opt, mean, lr)


@functools.partial(jax.jit, static_argnames=("compressor", "step"))
def _replay_chunk(compressor: Compressor, step, carry, state, messages: Message, rounds, keep, weights, seed, lr, hyper):
    # decoding inside the scan body, one round at a time, measured 2.4x faster on CPU than decoding the whole
    # chunk vmapped over rounds first when a (K, d) state is carried: the round's rows stay in cache
    def body(c, xs):
        inner, st = c
        msg, t = xs
        key = compressor_key(seed, t)
        decoded, valid, st = compressor.decode(msg, st, key)
        corr = None if msg.correction is None else compressor.decode_correction(msg.correction, key, st["like"].value)
        return (step(inner, decoded, valid, keep, weights, lr, hyper, corr), st), None

    # unrolling 4 rounds per loop iteration measured ~20% faster on CPU (fewer loop-carried copies)
    (carry, state), _ = jax.lax.scan(body, (carry, state), (messages, rounds), unroll=min(4, rounds.shape[0]))
    return carry, state


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init_state(compressor: Compressor, like):
    """The decoder's initial closed-loop state, built on the device in one compiled call. An error-feedback
    chain's carry (filter 0) is left out: the decoder never reads it (``ErrorFeedback.restore`` passes its state
    through), so the decoded rows are the same bits and replay holds no dead (K, d) array."""
    state = compressor.init(like.zeros())
    if compressor.feedback is not None:
        state = {**state, "filters": ({},) + tuple(state["filters"][1:])}
    return state


def _default_chunk(history: History, budget_bytes: int = 256 << 20) -> int:
    """Rounds per replay chunk so that a chunk's expanded rows take about ``budget_bytes`` on the device: the
    coder's transient ``decode_bytes`` per payload entry, or the float32 rows themselves (the corrected
    replay's scan holds less, one round's (K, d) rows and state)."""
    per_entry = max(history.compressor.coder.decode_bytes, 4)
    per_round = per_entry * history.compressor.capacity(history.num_users) * history.num_params
    return max(1, min(history.num_rounds, budget_bytes // max(per_round, 1)))


def _setup(history: History, remove: Iterable[int], chunk: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """What every replay checks and derives first: (keep mask, float32 weights, rounds per chunk)."""
    if history.num_rounds == 0:
        raise ValueError("the history holds no rounds to replay")
    k = history.num_users
    keep = ~user_mask(remove, k)
    chunk = _default_chunk(history) if chunk is None else max(1, min(int(chunk), history.num_rounds))
    return keep, np.asarray(history.weights, np.float32), chunk


def _replay(history: History, remove: Iterable[int], chunk: int | None, step, extra, hyper=(),
            pad_chunks: bool = True) -> PyTree:
    """Replays the records round by round with ``step`` (carry: (params, ``extra``)) in scan chunks of ``chunk``
    rounds; the last chunk is padded with inactive rounds (one compiled program) unless ``pad_chunks`` is off."""
    keep, weights, chunk = _setup(history, remove, chunk)
    keep, params0, weights = jax.device_put((keep, history.params0, weights))
    carry = (params0, extra)
    state = _init_state(history.compressor, history.like)
    ids = history.round_ids
    for start in range(0, history.num_rounds, chunk):
        idx = list(range(start, min(start + chunk, history.num_rounds)))
        msgs = history.expand(idx)
        pad = chunk - len(idx) if pad_chunks else 0
        if pad:
            msgs = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]), msgs)
        rounds = jax.device_put(np.asarray([ids[i] for i in idx] + [max(ids) + 1] * pad, np.int32))
        carry, state = _replay_chunk(history.compressor, step, carry, state, msgs, rounds, keep, weights,
                                     history.seed, history.server_lr, hyper)
    return carry[0]


@functools.partial(jax.jit, static_argnums=(0,))
def row_weights(compressor: Compressor, masks: Message, keep: jax.Array, weights: jax.Array) -> jax.Array:
    """(rounds, capacity) weight of every payload slot in naive replay's sum of the rounds' aggregates.

    The decoder's restore (per-user selects and adds) and the weighted mean are linear in the decoded rows, so
    replay = w^0 + lr * sum_{t, j} C[t, j] row[t, j]; C is the gradient of that sum with scalar stand-ins for
    the rows, run through the chain's own ``restore`` on masks alone: O(rounds x users), no parameters.
    """
    k = keep.shape[0]
    state = compressor.init(jnp.zeros((k, 1), jnp.float32))

    def total(y):
        def body(st, xs):
            msg, yt = xs
            x, valid, st = compressor.restore(yt[:, None], msg, st)
            return st, weighted_mean(x, valid & keep, weights)[0]

        return jnp.sum(jax.lax.scan(body, state, (masks, y))[1])

    return jax.grad(total)(jnp.zeros((masks.present.shape[0], compressor.capacity(k)), jnp.float32))


def _group(history: History, cache_bytes: int = 8 << 20) -> int:
    """Rounds decoded together inside a replay chunk, so that their transient decoded rows (the coder's
    ``decode_bytes`` per payload entry) stay within ``cache_bytes``. Measured on CPU right after a retraining run
    (cold caches): lattice-coded demo rounds in groups of 10-20 were 20% faster than all 60 at once, the same
    when warm; float32 rows (nothing to decode) are fastest all at once (3.5x slower in groups of 5)."""
    per_round = history.compressor.coder.decode_bytes * history.compressor.capacity(history.num_users)
    return max(1, cache_bytes // max(per_round * history.num_params, 1)) if per_round else history.num_rounds


@functools.partial(jax.jit, static_argnums=(0, 1, 8))
def _accumulate(compressor: Compressor, like, acc: list, rows, present, coef, rounds, seed, group: int) -> list:
    """acc (float32 leaves, flat) + sum over the chunk's rounds, in round order, of sum_j coef[t, j] * row j.

    ``group`` rounds at a time decode in parallel (vmapped) and each round's slots are contracted leaf by leaf
    (no concatenated copy: 2-3x faster on CPU); the rounds are added one by one, so neither chunks nor groups
    change the bits.
    """

    def one(r, p, c, t):
        dec = compressor.coder.decode(r, jax.random.fold_in(compressor_key(seed, t), 0), like, compressor.slots(p))
        return [jnp.tensordot(c, x.reshape(x.shape[0], -1).astype(jnp.float32), axes=1) for x in jax.tree.leaves(dec)]

    def add_rounds(a, xs):
        contrib = jax.vmap(one)(*xs)
        return jax.lax.scan(lambda a, x: (jax.tree.map(jnp.add, a, x), None), a, contrib,
                            unroll=min(8, xs[2].shape[0]))[0]

    xs, t = (rows, present, coef, rounds), coef.shape[0]
    n = t - t % group
    if n:
        groups = jax.tree.map(lambda v: v[:n].reshape(n // group, group, *v.shape[1:]), xs)
        acc = jax.lax.scan(lambda a, x: (add_rounds(a, x), None), acc, groups)[0]
    if n < t:
        acc = add_rounds(acc, jax.tree.map(lambda v: v[n:], xs))
    return acc


@functools.partial(jax.jit, static_argnums=(0, 1))
def _add_corrections(compressor: Compressor, like, acc: list, rows, use, rounds, seed) -> list:
    """acc (flat float32 leaves) + the decoded model corrections of the rounds with ``use``, in round order."""

    def body(a, xs):
        r, u, t = xs
        c = compressor.decode_correction(r, compressor_key(seed, t), like)
        return [x + jnp.where(u, y.ravel(), 0.0) for x, y in zip(a, jax.tree.leaves(c))], None

    return jax.lax.scan(body, acc, (rows, use, rounds))[0]


@jax.jit
def _finish(params0: PyTree, acc: list, lr, corr: list) -> PyTree:
    """w^0 + lr * acc + corr, leaf by leaf, in each leaf's dtype."""
    leaves, treedef = jax.tree_util.tree_flatten(params0)
    return treedef.unflatten([(x.astype(jnp.float32) + lr * a.reshape(x.shape) + c.reshape(x.shape)).astype(x.dtype)
                              for x, a, c in zip(leaves, acc, corr)])


def _zeros(like) -> list:
    """The replay accumulator: one flat float32 zero vector per leaf of the update."""
    return [jnp.zeros((int(np.prod(s[1:], dtype=np.int64)),), jnp.float32) for s, _ in like.leaves]


@functools.partial(jax.jit, static_argnums=(0, 1, 11))
def _replay_whole(compressor: Compressor, like, masks, keep, weights, rows, rounds, seed, params0, lr, corrections,
                  group: int) -> PyTree:
    """Naive replay of a whole history in one compiled call (no chunking); ``corrections``: the model correction
    rows to add (None: none)."""
    coef = row_weights(compressor, masks, keep, weights)
    acc = _accumulate(compressor, like, _zeros(like), rows, masks.present, coef, rounds, seed, group)
    corr = _zeros(like)
    if corrections is not None:
        corr = _add_corrections(compressor, like, corr, corrections, jnp.ones(rounds.shape, bool), rounds, seed)
    return _finish(params0, acc, lr, corr)


def _use_corrections(history: History, remove: list, corrections: bool | None) -> bool:
    if corrections is None:
        return history.has_corrections and not remove
    if corrections and not history.has_corrections:
        raise ValueError("corrections=True: this history codes no model corrections (model_correction())")
    if corrections and history.server_tx is not None:
        raise ValueError("corrections=True: this history was recorded with a server optimizer, which model "
                         "corrections do not model")
    return bool(corrections)


def replay(history: History, remove: Iterable[int] = (), chunk: int | None = None,
           corrections: bool | None = None) -> PyTree:
    """Naive replay: the model from ``history``'s stored updates without the users in ``remove``.

    With ``remove`` empty this reconstructs the trained model from the history (up to compression error).
    Computed as w^0 + lr * (weighted sum of the stored rows), weights from ``row_weights``: each stored row is
    decoded once, and no per-user closed-loop state is carried over the rounds. ``corrections``: add the
    history's model corrections (``compressors.model_correction``), which make the replay follow the trained
    trajectory; by default only when nobody is removed (they correct towards the trajectory with every user in
    it). A history recorded with a server optimizer (``History.server_tx``) is replayed round by round through
    it instead. ``chunk`` bounds how many rounds are decoded on the device at once (default: about 256 MB of
    decoded rows); it does not change the bits.
    """
    remove = list(remove)
    use = _use_corrections(history, remove, corrections)
    if history.server_tx is not None:  # a server optimizer is not linear in the rows: round by round
        opt = history.server_tx.init(jax.tree.map(jnp.asarray, history.params0))
        # no padding rounds: an optimizer with momentum would still move on an empty round
        return _replay(history, remove, chunk, _ServerStep(history.server_tx), opt, pad_chunks=False)
    keep, weights, chunk = _setup(history, remove, chunk)
    comp, t_total, group = history.compressor, history.num_rounds, _group(history)
    ids, masks = np.asarray(history.round_ids, np.int32), history.masks()
    if chunk == t_total:  # one compiled call, host arrays moved in with its arguments
        return _replay_whole(comp, history.like, masks, keep, weights, history.payload(), ids, history.seed,
                             history.params0, history.server_lr, history.corrections() if use else None, group)
    pad = -t_total % chunk  # zero-weight rounds pad the last chunk, so one compiled program serves all chunks
    ids = np.concatenate([ids, np.full(pad, ids.max() + 1, np.int32)])
    present = np.pad(masks.present, ((0, pad), (0, 0)))
    coef = np.pad(np.asarray(row_weights(comp, masks, keep, weights)), ((0, pad), (0, 0)))
    real = np.arange(t_total + pad) < t_total
    acc, corr = _zeros(history.like), _zeros(history.like)
    for start in range(0, t_total, chunk):
        stop = start + chunk
        part = range(start, min(stop, t_total))
        rows = history.payload(part, length=chunk)
        acc = _accumulate(comp, history.like, acc, rows, present[start:stop], coef[start:stop], ids[start:stop],
                          history.seed, group)
        if use:
            corr = _add_corrections(comp, history.like, corr, history.corrections(part, length=chunk),
                                    real[start:stop], ids[start:stop], history.seed)
    return _finish(history.params0, acc, history.server_lr, corr)


def rebuild_error(history: History, trained_params: PyTree, corrections: bool | None = None) -> float:
    """The history's own error: ||replay(history) - trained|| / ||trained||, replay with nobody removed
    (what compression alone costs; float32 histories give ~1e-7). A history with model corrections replays
    with them unless ``corrections=False`` (the stored rows' own error)."""
    rebuilt = replay(history, corrections=corrections)
    a, b = (sum(int(np.size(x)) for x in jax.tree.leaves(t)) for t in (rebuilt, trained_params))
    if a != b:
        raise ValueError(f"trained_params has {b} parameters, the history's model {a}")
    return relative_distance(rebuilt, trained_params)


def corrected_state(history: History, memory: int) -> tuple:
    """Initial carry of the corrected step: original trajectory, ``memory`` L-BFGS pairs, previous round."""
    if int(memory) < 1:
        raise ValueError(f"memory must be >= 1, got {memory}")
    d = history.num_params
    z = jnp.zeros((d,), jnp.float32)
    w0 = ravel_pytree(jax.tree.map(jnp.asarray, history.params0))[0].astype(jnp.float32)
    return (w0, jnp.zeros((memory, d)), jnp.zeros((memory, d)), jnp.zeros((), jnp.int32), w0, z, jnp.zeros((), jnp.int32))


def corrected_replay(
    history: History, remove: Iterable[int], chunk: int | None = None, memory: int = 5, gamma: float = 0.03
) -> PyTree:
    """Trajectory-corrected replay (FedRecover-style, server side only).

    Replays the original trajectory w^t and the unlearned one w_u^t side by side; each round's remaining-user
    mean update g is corrected to g - B (w_u - w), with B an L-BFGS estimate of minus the Jacobian of g built
    from the last ``memory`` (step, update-change) pairs of the original trajectory. This damps the drift of
    naive replay, whose stale updates keep pushing along the removed users' share of the gradient. ``gamma``
    scales the curvature assumed outside the pairs' span: large values also pull the model back towards the
    original (attacked) trajectory in directions the remaining users do not constrain (a backdoor's).
    """
    if history.server_tx is not None:
        raise ValueError("corrected_replay models FedAvg's step; this history was recorded with a server optimizer "
                         "(use replay, or a recovery method)")
    return _replay(history, remove, chunk, _step_corrected, corrected_state(history, memory), jnp.float32(gamma))


def finetune(apply_fn, tx, params: PyTree, data: ClientData, cfg: FedConfig, exclude: Iterable[int], rounds: int,
             start_round: int | None = None) -> PyTree:
    """``rounds`` exact FedAvg rounds of the users not in ``exclude``, from ``params``.

    Round keys continue after the training schedule (t = cfg.rounds, cfg.rounds + 1, ...) unless
    ``start_round`` says otherwise, so tuning never reuses a training round's randomness. The rounds run as one
    compiled ``lax.scan`` (``fed_rounds``).
    """
    k = data.num_clients
    excl = jnp.asarray(user_mask(exclude, k, "exclude"))
    ones = jnp.ones((k,), jnp.float32)
    t0 = cfg.rounds if start_round is None else int(start_round)
    if int(rounds) < 1:
        return params
    server = init_server(params, cfg, start_round=t0)
    return fed_rounds(apply_fn, tx, cfg, server, data, excl, ones, length=int(rounds))[0].params
