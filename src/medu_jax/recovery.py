"""Unlearning with client work: recovery methods that read the (compressed) history and ask the remaining
clients for some exact updates.

- ``fedrecover``: FedRecover (Cao et al., IEEE S&P 2023). Warm-up exact rounds, then each remaining client's
  update is estimated from its stored update with a per-client L-BFGS Hessian-vector product,
  g_i(w_u) ~ g_i(w) + H_i (w_u - w), whose pairs (w_u - w, exact - stored) come from the exact rounds;
  periodic correction rounds; abnormality fixing (a client whose estimate has an entry above tau computes
  exactly); the last rounds are exact (final tuning).
- ``adaptive_recovery``: the project's own variant (not from a paper) and the default of ``unlearn``.
  FedRecover's estimator, but exact rounds are spent where the recovered trajectory drifts: a round is exact
  when the offset w_u - w between the recovered and the original trajectory has moved by more than ``drift``
  (relative) since the last exact round. The trigger is computed on the server, so it costs no client work; a
  client budget caps drift rounds and abnormality fixes (beyond it an abnormal client's stored row is used as
  it is); each client's curvature pair sums a run of consecutive exact rounds, which averages out the stored
  rows' coding noise.
- ``federaser``: FedEraser (Liu et al., IWQoS 2021): every ``every``-th stored round, the remaining clients run
  a fraction of their local work from the unlearned model; the server keeps each client's calibrated direction
  with its stored update's norm.
- ``finetune_baseline``: fine-tuning the attacked model on the remaining clients (no history at all), the
  baseline every history-based method is compared with at equal client cost.

Every method returns a ``Recovery``: the model and its client cost, local steps spent by the remaining clients
over the local steps retraining would spend. Exact updates at round t use round t's client randomness, so an
exact round is bit-for-bit the retraining run's round from the same model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.compressors import Compressor
from medu_jax.fedavg import (ClientData, FedConfig, check_user_ids, fed_round, fed_rounds, init_server, server_update,
                             user_mask, weighted_mean)
from medu_jax.history import History, compressor_key
from medu_jax.trees import tree_norm
from medu_jax.unlearn import _flat_users, _init_state, lbfgs_hvp

STALE_ROWS = ("last", "interpolate")  # adaptive_recovery's choices for a row its round did not store

PyTree = Any


class Recovery(NamedTuple):
    """An unlearned model and what it cost the remaining clients.

    client_steps: local optimizer steps the remaining clients ran; client_cost: that over retraining's local
    steps (``retrain_steps``); exact_rounds: rounds in which every remaining client computed; fixed_updates:
    single-client exact updates outside those rounds (abnormality fixing); dropped_estimates: abnormal estimates
    not computed exactly because the client budget was spent, their clients' stored rows used uncorrected
    instead (``adaptive_recovery`` only);
    model_state: the model's state (BatchNorm statistics) as the last round with client work aggregated it
    (None for a stateless model and for the server-only methods: see ``fedavg.recalibrate_state``).
    """

    params: PyTree
    client_steps: int
    client_cost: float
    exact_rounds: int
    fixed_updates: int
    dropped_estimates: int = 0
    model_state: PyTree = None


def retrain_steps(data: ClientData, cfg: FedConfig, remove: Iterable[int]) -> float:
    """Local steps retraining without ``remove`` spends: rounds x local steps x the expected number of remaining
    clients with data in a round (all of them at participation 1)."""
    k = data.num_clients
    keep = ~user_mask(remove, k)
    m = max(1, int(round(cfg.participation * k)))
    expected = min(m, k) * float(np.sum(keep & (np.asarray(data.n) > 0))) / k
    return float(cfg.rounds * cfg.local_steps * max(expected, 1e-12))


def _recovery(params, steps: int, data, cfg, remove, exact_rounds: int = 0, fixed: int = 0,
              dropped: int = 0, start: PyTree = None, growth: float = 1e4, model_state: PyTree = None) -> Recovery:
    """The Recovery of ``params``: an error if it is non-finite, a warning if its norm grew more than
    ``growth``-fold over the model the method started from (``start``), e.g. a history whose trajectory diverged."""
    leaves = jax.tree.leaves(params)
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
        raise FloatingPointError("recovery produced a non-finite model (NaN/inf): the estimated updates diverged; "
                                 "use more exact rounds (smaller period) or a lower abnormality threshold")
    if start is not None and tree_norm(params) > growth * max(tree_norm(start), 1e-30):
        warnings.warn(f"recovery diverged: the model's norm grew from {tree_norm(start):.3g} to "
                      f"{tree_norm(params):.3g}; "
                      "the history's trajectory may itself have diverged (see train's warning), and only "
                      "retraining can help then", RuntimeWarning, stacklevel=3)
    return Recovery(params, int(steps), steps / retrain_steps(data, cfg, remove), int(exact_rounds), int(fixed),
                    int(dropped), model_state if jax.tree.leaves(model_state) else None)


def _flat(tree: PyTree) -> jax.Array:
    """One float32 vector of a pytree's leaves."""
    return jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in jax.tree.leaves(tree)])


def _unflat(flat: jax.Array, like: PyTree) -> PyTree:
    leaves, treedef = jax.tree.flatten(like)
    sizes = np.cumsum([int(np.prod(np.shape(x))) for x in leaves])[:-1]
    return treedef.unflatten([p.reshape(np.shape(x)).astype(jnp.result_type(x))
                              for p, x in zip(jnp.split(flat, sizes), leaves)])


@functools.partial(jax.jit, static_argnames=("compressor",))
def _decode(compressor: Compressor, message, state, key):
    decoded, valid, state = compressor.decode(message, state, key)
    return _flat_users(decoded), valid, state


@functools.partial(jax.jit, static_argnames=("compressor",))
def _correction(compressor: Compressor, rows, key, like_state):
    """A round's decoded model correction, flat (see ``Compressor.correct``)."""
    return _flat(compressor.decode_correction(rows, key, like_state["like"].value))


@jax.jit
def _share(weights, valid, kept):
    """The factor on a round's model correction c^ ~ (lr / W) sum_i w_i (h_i - d_i) (every user's coding error
    and staleness) in the kept users' mean: 1, the best linear estimate of (lr / W_keep) sum_keep w_i (h_i - d_i)
    given the total when the users' errors are alike (independent, or with a shared bias); 0 if nobody is kept."""
    return jnp.where(jnp.sum(weights * kept) > 0, 1.0, 0.0)


@jax.jit
def _estimate(v, stored, valid, keep, S, Y, count, tau):
    """FedRecover's estimate of every client's update at w_u: stored - B_i v_i with v_i = w_u - w (one offset for
    all, (d,), or one per client, (K, d)), and which remaining clients are abnormal (an entry above tau, or
    non-finite)."""
    v = jnp.broadcast_to(v, stored.shape)
    est = stored - jax.vmap(lambda s, y, c, vi: lbfgs_hvp(s, y, c, vi, rayleigh=True))(S, Y, count, v)
    big = jnp.max(jnp.abs(est), axis=1)
    abnormal = keep & valid & ~(big <= tau)  # NaN compares False: non-finite estimates are abnormal too
    return est, abnormal


@jax.jit
def _add_pairs(S, Y, count, s, y, mask, extend):
    """Adds the pair (s_i, y_i) of one exact round (s: (d,) for every client, or (K, d)) to the buffers of the
    clients in ``mask``, if it has positive curvature. A client in ``extend`` (its newest pair is the sum over the
    exact rounds just before this one, see ``adaptive_recovery``) gets its newest pair replaced by
    (S_new + s_i, Y_new + y_i); the others get (s_i, y_i) appended. Returns the buffers and the clients whose newest
    pair now ends at this round."""
    k = S.shape[0]
    ext = extend[:, None]
    s_i = jnp.broadcast_to(s, (k, s.shape[-1])) + jnp.where(ext, S[:, -1], 0.0)
    y_i = y + jnp.where(ext, Y[:, -1], 0.0)
    ok = mask & (jnp.sum(y_i * s_i, 1) > 1e-12 * jnp.linalg.norm(s_i, axis=1) * jnp.linalg.norm(y_i, axis=1)) \
        & jnp.all(jnp.isfinite(y_i), 1)
    old_s, old_y = jnp.where(ext[:, :, None], S[:, :-1], S[:, 1:]), jnp.where(ext[:, :, None], Y[:, :-1], Y[:, 1:])
    s_n = jnp.concatenate([old_s, s_i[:, None]], axis=1)
    y_n = jnp.concatenate([old_y, y_i[:, None]], axis=1)
    return (jnp.where(ok[:, None, None], s_n, S), jnp.where(ok[:, None, None], y_n, Y),
            jnp.where(ok & ~extend, jnp.minimum(count + 1, S.shape[1]), count), ok)


@jax.jit
def _rows_at(rows_at, w_o, present):
    """The original-trajectory model each client's current row was computed at: this round's for the clients
    whose row the round stores, unchanged for the others (their row is an earlier round's, kept by ``missing``)."""
    return jnp.where(present[:, None], w_o[None], rows_at)


@jax.jit
def _step(w_u, rows, mask, weights, lr):
    return w_u + lr * weighted_mean(rows, mask, weights)


class _Server:
    """One trajectory's server step in the flat form recovery works in: FedAvg's w + lr * mean (``_step``), or
    the history's server optimizer (``server_update`` on the pytree, its state carried here)."""

    def __init__(self, history: History, params: PyTree):
        self.tx, self.lr, self.like = history.server_tx, history.server_lr, params
        self.opt = () if self.tx is None else self.tx.init(params)
        self.model_state = {} if history.model_state0 is None else history.model_state0

    def step(self, flat: jax.Array, rows: jax.Array, mask, weights) -> jax.Array:
        if self.tx is None:
            return _step(flat, rows, mask, weights, self.lr)
        mean = _unflat(weighted_mean(rows, mask, weights), self.like)
        params, self.opt = _server_step(self.tx, _unflat(flat, self.like), self.opt, mean, jnp.float32(self.lr))
        return _flat(params)

    def after_round(self, start: PyTree, r) -> PyTree:
        """The params after an exact round ``r`` (a ``fed_round`` result) from the model ``start`` it ran at."""
        self.model_state = r.model_state
        if self.tx is None:
            return r.params
        params, self.opt = _server_step(self.tx, start, self.opt, r.mean_update, jnp.float32(self.lr))
        return params


_server_step = jax.jit(server_update, static_argnums=0)


@jax.jit
def _round_tau(stored, valid, allowed):
    """tau_t: the least float32 magnitude that at most ``allowed`` of a round's stored entries (valid users)
    exceed, found exactly by bisection on the bit patterns (non-negative floats order like their int32 bits):
    32 counting passes, far cheaper on CPU than sorting or top_k."""
    a = jax.lax.bitcast_convert_type(jnp.where(valid[:, None], jnp.abs(stored), 0.0), jnp.int32).ravel()

    def body(_, lohi):
        lo, hi = lohi
        mid = lo + (hi - lo) // 2
        ok = jnp.sum(a > mid) <= allowed
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, _ = jax.lax.fori_loop(0, 32, body, (jnp.int32(0), jnp.max(a)))
    return jax.lax.bitcast_convert_type(lo, jnp.float32)


def abnormality_threshold(history: History, alpha: float) -> float:
    """FedRecover's tau = max_t tau_t, tau_t such that a fraction ``alpha`` of the entries of round t's stored
    updates exceed it (the paper's tolerance rate). alpha = 0 gives tau = inf (no abnormality fixing)."""
    if not 0.0 <= float(alpha) < 1.0:
        raise ValueError(f"alpha (tolerance rate) must be in [0, 1), got {alpha!r}")
    if alpha == 0:
        return math.inf
    tau = -math.inf
    for _, _, _, stored, valid, _ in _decoded(history):
        n = int(jnp.sum(valid)) * stored.shape[1]
        if n:
            tau = max(tau, float(_round_tau(stored, valid, int(alpha * n))))
    return tau


def _messages(history: History):
    """(record index, round id, one round's message) in order."""
    ids = history.round_ids
    for i in range(history.num_rounds):
        yield i, ids[i], jax.tree.map(lambda a: a[0], history.expand([i]))


def _decoded(history: History):
    """(record index, round id, message, decoded rows (K, d), valid, decoder state after it) in order."""
    state = _init_state(history.compressor, history.like)
    for i, t, msg in _messages(history):
        stored, valid, state = _decode(history.compressor, msg, state, compressor_key(history.seed, t))
        yield i, t, msg, stored, valid, state


class _Interpolator:
    """stale_rows="interpolate": a row the round did not store, between two rows the history did store for that
    user (rounds p < t < q), estimated as d_p + (t - p) / (q - p) (d_q - d_p), the original trajectory's update at
    round t to first order in time instead of zeroth (recovery runs after training: the later row is known).
    Holds every stored row decoded, (stored rows, d) float32, for the recovery's duration. A guarded coder's
    fallback row (stored as zero or as its reference) is a stored row like any other here."""

    def __init__(self, history: History):
        if history.compressor.feedback is not None or any(
                getattr(f, "missing", "last") != "last" for f in history.compressor.filters):
            raise ValueError("stale_rows='interpolate' needs a history whose unstored rows are the users' last stored "
                             "rows (missing='last', no error feedback)")
        rows, present, n = [], [], 0
        index = np.full((history.num_rounds, history.num_users), -1, np.int64)
        for i, _, msg, stored, valid, _ in _decoded(history):
            p = np.asarray(msg.present) & np.asarray(valid)
            index[i, p] = n + np.arange(int(p.sum()))
            n += int(p.sum())
            rows.append(np.asarray(stored)[p])
            present.append(p)
        self.rows = np.concatenate(rows) if n else np.zeros((0, 0), np.float32)
        self.index = index
        present = np.stack(present) if present else np.zeros((0, history.num_users), bool)
        t_ = np.arange(history.num_rounds)[:, None]
        self.prev = np.maximum.accumulate(np.where(present, t_, -1), axis=0)  # last stored round <= t
        big = history.num_rounds
        self.next = np.flip(np.minimum.accumulate(np.flip(np.where(present, t_, big), 0), axis=0), 0)
        self.next = np.concatenate([self.next[1:], np.full((1, history.num_users), big)])  # first stored round > t
        self.big = big

    def __call__(self, i: int, stored: jax.Array, valid: jax.Array) -> jax.Array:
        p, q = self.prev[i], self.next[i]
        between = np.asarray(valid) & (p >= 0) & (p < i) & (q < self.big)
        if not between.any():
            return stored
        users = np.flatnonzero(between)
        frac = np.zeros((stored.shape[0], 1), np.float32)
        frac[users, 0] = (i - p[users]) / (q[users] - p[users])
        later = np.zeros(stored.shape, np.float32)
        later[users] = self.rows[self.index[q[users], users]]
        return _lerp(stored, jnp.asarray(later), jnp.asarray(frac), jnp.asarray(between))


@jax.jit
def _lerp(stored, later, frac, between):
    return jnp.where(between[:, None], stored + frac * (later - stored), stored)


def _full(history: History, method: str) -> None:
    """FedRecover's and FedEraser's bookkeeping (the original trajectory, the retention interval) needs every round
    and every active user: a selective history (Crab's) would silently skip rounds."""
    if not history.selection.keeps_all or history.round_ids != list(range(history.num_rounds)):
        raise ValueError(f"{method} needs a full history (every round, every active user); this one was recorded "
                         f"with {history.selection} (rounds {history.round_ids[:5]}...): use it with baselines.crab")


def _check(history: History, remove, data: ClientData, cfg: FedConfig, method: str):
    remove = list(remove)
    if not remove:
        raise ValueError(f"{method}: the remove set is empty")
    if data.num_clients != history.num_users:
        raise ValueError(f"{method}: the data has {data.num_clients} clients, the history {history.num_users}")
    k = history.num_users
    excl = user_mask(remove, k)
    return remove, jnp.asarray(excl), jnp.ones((k,), jnp.float32)


@dataclasses.dataclass(frozen=True)
class _Schedule:
    """Which rounds are exact: fixed ones, and (adaptive) rounds where the trajectory offset drifted."""

    fixed: frozenset
    drift: float = math.inf
    budget: float = math.inf  # client cost the adaptive rounds and fixes may reach (fixed rounds always run)
    tail: bool = False  # every round is exact once the budget covers all the rounds still to come


def _recover(history: History, remove, apply_fn, tx, data: ClientData, cfg: FedConfig, schedule: _Schedule,
             memory: int, alpha: float, method: str, run_pairs: bool = False, remaining_corrections: bool = False,
             stale_offsets: bool = False, stale_rows: str = "last") -> Recovery:
    """The FedRecover loop over the history's rounds (see ``fedrecover``); ``run_pairs``: one pair per run of
    consecutive exact rounds, ``remaining_corrections``: estimated rounds take the model corrections,
    ``stale_offsets``: each client's offset is taken from the model its row was computed at, ``stale_rows``:
    "interpolate" estimates the rows a round did not store from the user's stored rows before and after it (see
    ``adaptive_recovery``)."""
    _full(history, method)
    remove, excl, ones = _check(history, remove, data, cfg, method)
    if int(memory) < 1:
        raise ValueError(f"memory (L-BFGS pairs) must be >= 1, got {memory}")
    if stale_rows not in STALE_ROWS:
        raise ValueError(f"{method}: unknown stale_rows {stale_rows!r}: choose one of {STALE_ROWS}")
    if stale_rows == "interpolate" and stale_offsets:
        raise ValueError(f"{method}: stale_rows='interpolate' estimates every row at its round's model; "
                         "stale_offsets (rows at the model they were computed at) does not apply")
    if stale_rows == "interpolate" and remaining_corrections:
        raise ValueError(f"{method}: remaining_corrections adds the staleness of the decoded rows back; with "
                         "stale_rows='interpolate' the rows are no longer those, and it would count it twice")
    interp = _Interpolator(history) if stale_rows == "interpolate" else None
    tau = jnp.float32(abnormality_threshold(history, alpha))
    keep, weights = ~excl, jnp.asarray(history.weights, jnp.float32)
    w_u = jax.tree.map(jnp.asarray, history.params0)
    w_o = _flat(w_u)
    k, d = history.num_users, w_o.shape[0]
    S, Y, count = jnp.zeros((k, memory, d)), jnp.zeros((k, memory, d)), jnp.zeros((k,), jnp.int32)
    steps, exact_rounds, fixed, dropped = 0, 0, 0, 0
    srv_u, srv_o = _Server(history, w_u), _Server(history, w_u)  # the recovered and the original trajectory
    full = retrain_steps(data, cfg, remove)
    anchor = None  # w_u - w at the last exact round (the adaptive trigger's reference)
    in_run = jnp.zeros((k,), bool)  # clients whose newest pair sums the exact rounds up to the previous one
    rows_at = jnp.broadcast_to(w_o, (k, d)) if stale_offsets else None  # the model each client's row was computed at
    for i, t, msg, stored, valid, state in _decoded(history):
        stored_valid, flat_u = valid, _flat(w_u)
        decoded = stored  # the original trajectory's rows; recovery's (stored) may be interpolated
        if interp is not None:
            stored = interp(i, stored, valid)
        corr = None if msg.correction is None else \
            _correction(history.compressor, msg.correction, compressor_key(history.seed, t), state)
        v = flat_u - w_o
        if stale_offsets:
            rows_at = _rows_at(rows_at, w_o, jnp.asarray(msg.present))
            offsets = flat_u - rows_at
        else:
            offsets = v
        exact = i in schedule.fixed
        # local steps the fixed exact rounds still to come will take: the budget keeps room for them
        reserve = sum(1 for j in schedule.fixed if j > i) * full / max(history.num_rounds, 1)
        if not exact and schedule.tail and \
                (steps + (history.num_rounds - i) * full / history.num_rounds) / full <= schedule.budget:
            exact = True
        if not exact and anchor is not None and math.isfinite(schedule.drift) and \
                (steps + reserve) / full + 1.0 / max(history.num_rounds, 1) <= schedule.budget:
            moved = float(jnp.linalg.norm(v - anchor) / jnp.maximum(jnp.linalg.norm(anchor), 1e-30))
            exact = moved > schedule.drift
        if exact:
            r = fed_round(apply_fn, tx, cfg, w_u, data, t, excl, ones, model_state=srv_u.model_state)
            ex, active = _flat_users(r.updates), r.active
            S, Y, count, ended = _add_pairs(S, Y, count, offsets, stored - ex, active & valid & keep, in_run)
            if run_pairs:  # the next round, if exact, extends these clients' pairs
                in_run = ended
            steps += int(jnp.sum(active)) * cfg.local_steps
            exact_rounds += 1
            anchor = v
            w_u = srv_u.after_round(w_u, r)
        else:
            in_run = jnp.zeros((k,), bool)
            est, abnormal = _estimate(offsets, stored, valid, keep, S, Y, count, tau)
            n_ab = int(jnp.sum(abnormal))
            if n_ab and (steps + reserve + n_ab * cfg.local_steps) / full > schedule.budget:
                # budget spent (adaptive only): the abnormal clients' stored rows enter uncorrected
                est, dropped = jnp.where(abnormal[:, None], stored, est), dropped + n_ab
            elif n_ab:  # abnormality fixing: those clients compute their exact update
                r = fed_round(apply_fn, tx, cfg, w_u, data, t, ~abnormal, ones, model_state=srv_u.model_state)
                ex, active = _flat_users(r.updates), r.active
                S, Y, count, _ = _add_pairs(S, Y, count, offsets, stored - ex, active & valid, in_run)
                est = jnp.where(active[:, None], ex, est)
                n = int(jnp.sum(active))
                steps, fixed = steps + n * cfg.local_steps, fixed + n
                valid = valid & ~(abnormal & ~active)
            flat_new = srv_u.step(flat_u, est, valid & keep, weights)
            if remaining_corrections and corr is not None:
                flat_new = flat_new + _share(weights, stored_valid, valid & keep) * corr
            w_u = _unflat(flat_new, w_u)
        w_o = srv_o.step(w_o, decoded, stored_valid, weights)  # the original trajectory
        if corr is not None:  # ... put back on the trained one by the round's model correction
            w_o = w_o + corr
    return _recovery(w_u, steps, data, cfg, remove, exact_rounds, fixed, dropped, start=history.params0,
                     model_state=srv_u.model_state)


def fedrecover(history: History, remove: Iterable[int], apply_fn, tx, data: ClientData, cfg: FedConfig,
               warmup: int = 5, period: int = 10, tune: int = 5, memory: int = 2, alpha: float = 1e-4) -> Recovery:
    """FedRecover (Cao et al. 2023) over a float32 or compressed history.

    Rounds 0..``warmup``-1, every ``period``-th round after the warm-up (0: none) and the last ``tune`` rounds
    are exact rounds of the remaining clients from the recovered model (the pairs (w_u - w, stored - exact) of
    each client join its L-BFGS buffer of ``memory`` pairs); the other rounds use the estimated updates
    stored_i - B_i (w_u - w). A remaining client whose estimate has an entry above tau (``alpha``: tolerance
    rate, see ``abnormality_threshold``; 0 turns fixing off) or a non-finite one computes its exact update.
    The paper gives no values for our schedules: these defaults spend about 20-30% of retraining's client work
    over 60-100 rounds.
    """
    t = history.num_rounds
    for name, v in (("warmup", warmup), ("period", period), ("tune", tune)):
        if int(v) < 0:
            raise ValueError(f"fedrecover: {name} must be >= 0, got {v}")
    fixed = frozenset(i for i in range(t) if i < warmup or i >= t - tune
                      or (period and i >= warmup and (i - warmup + 1) % period == 0))
    return _recover(history, remove, apply_fn, tx, data, cfg, _Schedule(fixed), memory, alpha, "fedrecover")


def adaptive_recovery(history: History, remove: Iterable[int], apply_fn, tx, data: ClientData, cfg: FedConfig,
                      warmup: int = 5, tune: int = 5, drift: float = 0.5, budget: float = 0.3, memory: int = 2,
                      alpha: float = 1e-4, remaining_corrections: bool = False, stale_offsets: bool = False,
                      exact_tail: bool = False, stale_rows: str = "last") -> Recovery:
    """The project's adaptive variant of FedRecover (the default of ``unlearn``): exact rounds where the
    recovered trajectory drifts, within a client budget.

    Warm-up and final tuning as in ``fedrecover``; in between, a round is exact when the offset w_u - w of the
    recovered from the original trajectory has moved by more than ``drift`` (relative to its size at the last
    exact round). Curvature pairs go stale as the offset moves, so exact work goes where the estimate is least
    trustworthy, and the trigger is computed on the server at no client cost. ``budget`` (a fraction of
    retraining's local steps) caps the drift rounds and the abnormality fixes, keeping room for the warm-up and
    tuning rounds: once it is spent, an abnormal client enters its round with its stored row, uncorrected (what
    naive replay uses; counted in ``dropped_estimates``), instead of being computed exactly. Leaving the row out
    instead (the earlier rule) drops the user's update for good, and with an error-feedback history also the
    rounds that row carried.

    Curvature pairs, unlike FedRecover's one per exact round: a run of consecutive exact rounds (the warm-up, the
    tuning, drift rounds in a row) gives each client one pair, (sum of w_u - w, sum of stored - exact) over the
    run. L-BFGS's secant condition B s = y puts a pair's noise into every later estimate along s, and a stored
    row's coding noise is larger than the curvature signal stored - exact (measured 3-4x with the default MEDU
    history, 11-23x with error feedback): over a run the signal adds up, while independent coding errors grow
    only with the run's square root and error feedback's (rows h_t + e_{t-1} - e_t) telescope to one carry.

    A history with model corrections (``compressors.model_correction``) gives the original trajectory as
    trained (FedRecover's stored global models); with ``remaining_corrections`` (opt-in, the project's own) an
    estimated round also adds the round's correction (``_share``): the correction holds every user's coding
    error and the staleness of the rows sparsification left out, and the kept users' share of it is its best
    linear estimate for their aggregate. Measured on four MNIST-1D cells it was not a consistent gain
    (docs/recovery.md).

    ``stale_offsets`` (opt-in, the project's own): a sparsified or thresholded history gives a client, in a round
    that did not store it, its last stored row, computed at an earlier model of the original trajectory. FedRecover
    expands a row around the model it was computed at, so the offset of such a client is w_u minus that earlier
    model (in its estimate and in the curvature pairs it adds), not minus this round's. With a history that
    stores every row in every round (float32) it changes nothing. Costs one (K, d) float32 array.

    ``exact_tail`` (opt-in, the project's own): budget the drift rounds left unspent goes to the last rounds: a
    round is exact as soon as the budget covers it and every round after it (at retraining's cost per round), so
    the recovery ends with as many exact rounds of the remaining clients as the budget allows. Exact rounds late in
    the recovery act on the model that is returned, where the estimates' errors have had no time to be corrected.

    ``stale_rows`` (the project's own): a client whose row this round did not store (sparsified or thresholded
    out) is estimated from "last" (the default): its last stored row, as decoded, computed at an earlier model of
    the original trajectory; or "interpolate": between its stored rows of rounds p < t < q, d_p + (t - p) / (q - p)
    (d_q - d_p), the original trajectory's update at round t to first order in time (recovery runs after
    training, so the later row is known; before a user's first and after its last stored row, the row as decoded).
    Every estimate and curvature pair then uses a row for this round's model, so ``stale_offsets`` does not apply.
    It decodes the history once more and holds every stored row decoded during the recovery ((stored rows, d) float32:
    with 7 of 50 users a round, 14% of the float32 history's bytes). A float32 history stores every row, and there
    it changes nothing.
    """
    if not drift > 0:
        raise ValueError(f"adaptive_recovery: drift must be > 0, got {drift!r}")
    t = history.num_rounds
    fixed = frozenset(i for i in range(t) if i < warmup or i >= t - tune)
    schedule = _Schedule(fixed, float(drift), float(budget), bool(exact_tail))
    return _recover(history, remove, apply_fn, tx, data, cfg, schedule,
                    memory, alpha, "adaptive_recovery", run_pairs=True,
                    remaining_corrections=bool(remaining_corrections), stale_offsets=bool(stale_offsets),
                    stale_rows=stale_rows)


@functools.partial(jax.jit, static_argnames=("apply_fn", "tx", "cal_cfg"))
def _calibrated_rows(apply_fn, tx, cal_cfg: FedConfig, w, data, t, excl, ones, stored, model_state=None):
    """FedEraser's calibrated updates |stored_k| * cal_k / |cal_k| of the remaining clients, who computed, and
    the model state they aggregated."""
    r = fed_round(apply_fn, tx, cal_cfg, w, data, t, excl, ones, model_state=model_state)
    cal = _flat_users(r.updates)
    norm = jnp.linalg.norm(stored, axis=1) / jnp.maximum(jnp.linalg.norm(cal, axis=1), 1e-30)
    return cal * norm[:, None], r.active, r.model_state


def calibrated_replay(history: History, remove, apply_fn, tx, data: ClientData, cfg: FedConfig, cal_steps: int,
                      every: int, start: int, w: PyTree, first_direct: bool, method: str) -> Recovery:
    """FedEraser's calibration over records start, start + every, ... of ``history`` from the model ``w``
    (shared with Crab): decodes every record in order (closed loop) and takes one calibrated step per used one."""
    remove, excl, ones = _check(history, remove, data, cfg, method)
    if int(cal_steps) < 1 or int(every) < 1:
        raise ValueError(f"{method}: cal_steps and every must be >= 1, got {cal_steps}, {every}")
    cal_cfg = dataclasses.replace(cfg, local_steps=int(cal_steps))
    weights = jnp.asarray(history.weights, jnp.float32)
    steps, start_model, srv = 0, w, _Server(history, w)
    for i, t, _, stored, valid, _ in _decoded(history):
        if i < start or (i - start) % every:
            continue
        if first_direct and i == start:  # the first round starts from w^0, untouched by the removed clients
            w = _unflat(srv.step(_flat(w), stored, valid & ~excl, weights), w)
            continue
        rows, active, srv.model_state = _calibrated_rows(apply_fn, tx, cal_cfg, w, data, t, excl, ones, stored,
                                                         srv.model_state)
        w = _unflat(srv.step(_flat(w), rows, valid & active & ~excl, weights), w)
        steps += int(jnp.sum(active)) * int(cal_steps)
    return _recovery(w, steps, data, cfg, remove, start=start_model, model_state=srv.model_state)


def federaser(history: History, remove: Iterable[int], apply_fn, tx, data: ClientData, cfg: FedConfig,
              every: int = 2, ratio: float = 0.5) -> Recovery:
    """FedEraser (Liu et al. 2021): calibration training every ``every``-th stored round (the paper's retention
    interval, default 2) with ``ratio`` of the local work (the paper's calibration ratio r, default 0.5:
    ceil(r E) local steps), starting from the unlearned model; each client keeps its calibrated direction with
    its stored update's norm, and the unlearned model takes one step per retained round. The first retained
    round is applied as stored (w^0 carries no influence of the removed clients), as in the paper."""
    if not 0.0 < float(ratio) <= 1.0:
        raise ValueError(f"federaser: ratio must be in (0, 1], got {ratio!r}")
    _full(history, "federaser")
    cal = max(1, math.ceil(float(ratio) * cfg.local_steps))
    w = jax.tree.map(jnp.asarray, history.params0)
    return calibrated_replay(history, remove, apply_fn, tx, data, cfg, cal, every, 0, w, True, "federaser")


def finetune_baseline(params: PyTree, remove: Iterable[int], apply_fn, tx, data: ClientData, cfg: FedConfig,
                      rounds: int, server_tx=None, model_state: PyTree = None) -> Recovery:
    """Fine-tuning the attacked model: ``rounds`` exact FedAvg rounds of the remaining clients from ``params``
    (no history; ``server_tx`` starts afresh; ``model_state`` is the attacked model's). Round keys continue
    after training's (t = cfg.rounds, ...)."""
    remove = list(remove)
    k = data.num_clients
    excl = jnp.asarray(user_mask(remove, k))
    if int(rounds) < 1:
        return _recovery(params, 0, data, cfg, remove)
    server = init_server(params, cfg, model_state, server_tx, start_round=cfg.rounds)
    server, _, out = fed_rounds(apply_fn, tx, cfg, server, data, excl, length=int(rounds), server_tx=server_tx)
    steps = int(np.sum(np.asarray(out.active))) * cfg.local_steps
    return _recovery(server.params, steps, data, cfg, remove, start=params, model_state=server.model_state)


def _naive(history, remove, apply_fn, tx, data, cfg, **kw) -> Recovery:
    from medu_jax.unlearn import replay  # the server-only replays live one floor down

    return Recovery(replay(history, remove, **kw), 0, 0.0, 0, 0)


def _corrected(history, remove, apply_fn, tx, data, cfg, **kw) -> Recovery:
    from medu_jax.unlearn import corrected_replay

    return Recovery(corrected_replay(history, remove, **kw), 0, 0.0, 0, 0)


UNLEARN_METHODS = {
    "fedrecover": fedrecover,
    "adaptive": adaptive_recovery,
    "federaser": federaser,
    "naive": _naive,
    "corrected": _corrected,
}
SERVER_ONLY = ("naive", "corrected")


def unlearn(history: History, remove: Iterable[int], method: str = "adaptive", *, apply_fn=None, tx=None,
            data: ClientData | None = None, cfg: FedConfig | None = None, **options) -> Recovery:
    """Removes the users in ``remove`` from the model ``history`` recorded. Returns a ``Recovery``.

    The default, ``adaptive`` (``adaptive_recovery``: FedRecover's estimator, exact rounds where the recovered
    trajectory drifts, within a client budget of 30% of retraining's local work), is the method judged by the
    project's bar on the scenario suite (docs/recovery.md); ``fedrecover`` is the paper's method. Both need the
    remaining clients, given as ``apply_fn``, ``tx``, ``data`` and the run's ``cfg``. ``naive`` (replay of the stored updates without the
    users) and ``corrected`` are server-only and need none of them, but drift far from retraining when the
    removed users shaped the trajectory (docs/recovery.md). ``options`` go to the method (e.g. ``warmup=``).
    Removal requests over time: unlearning users B after A is ``unlearn(history, A + B)``: every method
    recomputes from the history and round t's exact updates use round t's randomness, so the result is the
    same as removing A and B at once.
    """
    remove = list(remove)
    if not remove:
        raise ValueError("unlearn: the remove set is empty; use replay(history) to rebuild the trained model")
    check_user_ids(remove, history.num_users)
    if method not in UNLEARN_METHODS:
        raise ValueError(f"unknown unlearning method {method!r}: choose one of {sorted(UNLEARN_METHODS)}")
    if method not in SERVER_ONLY:
        missing = [n for n, v in (("apply_fn", apply_fn), ("tx", tx), ("data", data), ("cfg", cfg)) if v is None]
        if missing:
            raise ValueError(f"unlearn: method {method!r} asks the remaining clients for exact updates and needs "
                             f"{missing}; method='naive' is server-only (replay), but see docs/recovery.md for "
                             "where it fails")
    return UNLEARN_METHODS[method](history, remove, apply_fn, tx, data, cfg, **options)
