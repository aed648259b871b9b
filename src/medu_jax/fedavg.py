"""Functional FedAvg with clients on the leading axis, feeding every round's updates into MEDU histories.

Local training is one function vmapped over clients (E optax steps as a ``lax.scan``); a round is one jitted
step; rounds run in a Python loop so progress is shown and each round's compressed messages are appended to
the histories on the host. Any flax ``apply_fn(params, x)`` and optax optimizer plug in.

Randomness: round t uses fold_in(key(seed), t); within it stream 0 draws the participants, stream 1 the
clients' batches (client k: fold_in(stream 1, k)) and stream 2 the compressors (see ``compressor_key``).
Removing users from a run (``exclude``) leaves every other user's randomness unchanged, which is what makes
retrain-from-scratch a like-for-like reference.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Callable, Iterable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from medu_jax.compressors import Compressor, tree_where
from medu_jax.dither import hash_bits
from medu_jax.history import History, Selection, compressor_key
from medu_jax.objectives import as_objective, state_mean
from medu_jax.recording import Recorder, rel_error, to_host

PyTree = Any
ApplyFn = Callable[[PyTree, jax.Array], jax.Array]


def _normalized(weights: jax.Array, mask: jax.Array) -> jax.Array:
    """w_k m_k / sum_k w_k m_k, or zeros when no user is kept."""
    w = weights * mask
    total = jnp.sum(w)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def weighted_mean(updates: PyTree, mask: jax.Array, weights: jax.Array) -> PyTree:
    """Sum_k w_k m_k x_k / Sum_k w_k m_k over the user axis; zeros when no user is kept."""
    w = _normalized(weights, mask)
    return jax.tree.map(lambda x: jnp.tensordot(w.astype(x.dtype), x, axes=1), updates)


def pairwise_sum(x: jax.Array) -> jax.Array:
    """Sum over the leading axis in a fixed pairwise order ((x0 + x1) + (x2 + x3)) + ...: log2(K) vectorised
    adds whose bits do not depend on how the K rows are laid out over devices (and more accurate than a
    running sum)."""
    if x.shape[0] == 0:
        raise ValueError("pairwise_sum: nothing to sum (the leading axis has length 0)")
    while x.shape[0] > 1:
        if x.shape[0] % 2:
            x = jnp.concatenate([x, jnp.zeros((1, *x.shape[1:]), x.dtype)])
        x = x[0::2] + x[1::2]
    return x[0]


def _flat_weighted(weights: jax.Array, ups: PyTree) -> jax.Array:
    """(K, d + 1) rows [w_k x_k (all leaves raveled), w_k]: one array to sum, so one collective per round."""
    k, leaves = weights.shape[0], jax.tree.leaves(ups)
    dt = jnp.result_type(jnp.float32, *[u.dtype for u in leaves])  # float32 or wider accumulation
    w = weights.astype(dt)
    rows = [(w.reshape((k,) + (1,) * (u.ndim - 1)) * u.astype(dt)).reshape(k, -1) for u in leaves]
    return jnp.concatenate(rows + [w[:, None]], axis=1)


def _mean_from_sum(total: jax.Array, like: PyTree) -> PyTree:
    """Splits [sum_k w_k x_k, sum_k w_k] back into the pytree of the weighted mean (zeros when the weight is 0)."""
    s, wsum = total[:-1], total[-1]
    mean = jnp.where(wsum > 0, s / jnp.where(wsum > 0, wsum, 1.0), 0.0)
    leaves, treedef = jax.tree.flatten(like)
    sizes = np.cumsum([int(np.prod(u.shape[1:])) for u in leaves])[:-1]
    parts = jnp.split(mean, sizes)
    return jax.tree.unflatten(treedef, [q.reshape(u.shape[1:]).astype(u.dtype) for q, u in zip(parts, leaves)])


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


def user_mask(ids: Iterable[int], num_users: int, what: str = "remove") -> np.ndarray:
    """(num_users,) bool, True at the (validated, see ``check_user_ids``) user ids."""
    return np.isin(np.arange(num_users), check_user_ids(ids, num_users, what))


class ClientData(NamedTuple):
    """Per-client data padded to a common length: x (K, n_max, ...), y (K, n_max) int32, n (K,) int32."""

    x: jax.Array
    y: jax.Array
    n: jax.Array

    @property
    def num_clients(self) -> int:
        return int(self.x.shape[0])

    @property
    def padding_overhead(self) -> float:
        """Sample slots held over samples owned: n_max K / sum n (1.0: no padding)."""
        return float(self.x.shape[0] * self.x.shape[1]) / max(int(np.sum(np.asarray(self.n))), 1)


class PackedClientData(NamedTuple):
    """Per-client data without padding: every client's samples back to back, x (N, ...), y (N, ...), client k
    owning rows offset[k] .. offset[k] + n[k] - 1. Trains with the same bits as the padded ``ClientData`` of the
    same samples (a client's batch indices are shifted by its offset); see ``data.from_clients``."""

    x: jax.Array
    y: jax.Array
    n: jax.Array
    offset: jax.Array

    @property
    def num_clients(self) -> int:
        return int(self.n.shape[0])

    @property
    def padding_overhead(self) -> float:
        """Sample slots held over samples owned (1.0 up to the empty tail, if any)."""
        return float(self.x.shape[0]) / max(int(np.sum(np.asarray(self.n))), 1)

    def client(self, k: int) -> tuple[jax.Array, jax.Array]:
        """Client k's (x, y)."""
        o, n = int(self.offset[k]), int(self.n[k])
        return self.x[o:o + n], self.y[o:o + n]

    def to_padded(self) -> ClientData:
        """The same samples padded to the largest client (what attacks and the suite's tools take)."""
        shards = [np.arange(o, o + n) for o, n in zip(np.asarray(self.offset), np.asarray(self.n))]
        return pad_shards(np.asarray(self.x), np.asarray(self.y), shards)


def pad_shards(x: np.ndarray, y: np.ndarray, shards: list[np.ndarray], x_dtype=None, y_dtype=None) -> ClientData:
    """ClientData of the samples ``shards[k]`` of (x, y) for client k, padded with zeros to the largest client (n
    holds the true counts); the arrays keep x's and y's dtypes unless ``x_dtype`` / ``y_dtype`` say otherwise."""
    n = np.asarray([len(s) for s in shards], np.int32)
    n_max = max(int(n.max(initial=0)), 1)
    xs = np.zeros((len(shards), n_max, *x.shape[1:]), x.dtype if x_dtype is None else x_dtype)
    ys = np.zeros((len(shards), n_max, *y.shape[1:]), y.dtype if y_dtype is None else y_dtype)
    for k, s in enumerate(shards):
        xs[k, : len(s)], ys[k, : len(s)] = x[s], y[s]
    return ClientData(jnp.asarray(xs), jnp.asarray(ys), jnp.asarray(n))


@dataclasses.dataclass(frozen=True)
class FedConfig:
    """Schedule of a federated run.

    rounds: T; local_steps: E optax steps per client per round; batch_size: samples per local step (drawn
    with replacement from the client's own n_k samples); participation: fraction of clients per round (a
    fixed count, drawn uniformly); server_lr: global step on the weighted mean update; seed: the run's seed;
    client_chunk: train clients ``client_chunk`` at a time (``lax.map``) instead of all at once (``vmap``),
    when a round's clients do not fit in device memory.
    """

    rounds: int = 40
    local_steps: int = 10
    batch_size: int = 32
    participation: float = 1.0
    server_lr: float = 1.0
    seed: int = 0
    client_chunk: int | None = None

    def __post_init__(self):
        def integer(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"FedConfig.{name} must be an integer, got {v!r} ({type(v).__name__})")

        def real(name, v):
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise TypeError(f"FedConfig.{name} must be a number, got {v!r} ({type(v).__name__})")
            if not np.isfinite(v):
                raise ValueError(f"FedConfig.{name} must be finite, got {v!r}")

        for name in ("rounds", "local_steps", "batch_size", "seed"):
            integer(name, getattr(self, name))
        for name in ("rounds", "local_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FedConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if self.client_chunk is not None:
            integer("client_chunk", self.client_chunk)
            if self.client_chunk < 1:
                raise ValueError(f"FedConfig.client_chunk must be >= 1 or None, got {self.client_chunk!r}")
        real("participation", self.participation)
        real("server_lr", self.server_lr)
        if not 0.0 < float(self.participation) <= 1.0:
            raise ValueError(f"FedConfig.participation must be in (0, 1], got {self.participation!r}")


def cross_entropy(apply_fn: ApplyFn, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()


def mulhi32(a: jax.Array, b: jax.Array) -> jax.Array:
    """floor(a * b / 2^32) of uint32 arrays, exactly, from 16-bit limbs (no 64-bit integers needed)."""
    a, b = a.astype(jnp.uint32), b.astype(jnp.uint32)
    al, ah, bl, bh = a & 0xFFFF, a >> 16, b & 0xFFFF, b >> 16
    ll, lh, hl = al * bl, al * bh, ah * bl
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    return ah * bh + (lh >> 16) + (hl >> 16) + (mid >> 16)


def batch_indices(key: jax.Array, n: jax.Array, local_steps: int, batch_size: int) -> jax.Array:
    """(local_steps, batch_size) int32 sample indices, uniform on [0, max(n, 1)) with replacement: counter-hash
    words (``dither.hash_bits``) mapped by a multiply-high (Lemire), bias below n / 2^32. One vectorised draw
    for all steps; a tenth of a round's time cheaper than jax.random.randint (threefry, rolled loops on CPU)."""
    words = hash_bits(key, local_steps * batch_size)
    n = jnp.maximum(jnp.asarray(n, jnp.int32), 1).astype(jnp.uint32)
    return mulhi32(words, n).astype(jnp.int32).reshape(local_steps, batch_size)


def local_update(model, tx, params, x, y, n, key, local_steps: int, batch_size: int, state: PyTree = None,
                 offset=0):
    """One client's local training: ``local_steps`` optax steps of the objective's loss (``objectives``; a
    plain apply function is a ``Classifier``) on batches from its first n samples. Returns (update w_k - w, the
    client's new model state, its mean loss over the steps, its mean metrics). Step s gets the rng
    fold_in(fold_in(key, 1), s); the batches come from ``key`` itself, so a model that draws no randomness
    trains with the same bits as before rngs existed. ``offset``: where the client's samples start in x and y
    (packed data)."""
    obj = as_objective(model)
    state = {} if state is None else state
    step_key = jax.random.fold_in(key, 1)

    def step(carry, xs):
        p, o, st = carry
        s, idx = xs
        (loss, (st, metrics)), g = jax.value_and_grad(obj.loss, has_aux=True)(
            p, st, (x[idx], y[idx]), jax.random.fold_in(step_key, s))
        upd, o = tx.update(g, o, p)
        return (optax.apply_updates(p, upd), o, st), (loss, metrics)

    idx = batch_indices(key, n, local_steps, batch_size) + offset  # step s trains on row s
    (p, _, state), (losses, metrics) = jax.lax.scan(step, (params, tx.init(params), state),
                                                    (jnp.arange(local_steps), idx))
    mean = lambda v: jnp.mean(v.astype(jnp.float32))  # noqa: E731
    return jax.tree.map(lambda a, b: a - b, p, params), state, mean(losses), jax.tree.map(mean, metrics)


def participants(key: jax.Array, num_clients: int, fraction: float) -> jax.Array:
    """(K,) bool mask of round participants: a uniform subset of round(fraction * K) clients (at least 1)."""
    m = max(1, int(round(fraction * num_clients)))
    if m >= num_clients:
        return jnp.ones((num_clients,), bool)
    return jnp.zeros((num_clients,), bool).at[jax.random.permutation(key, num_clients)[:m]].set(True)


CLIENTS = "clients"  # the mesh axis the client axis is sharded over


def client_mesh(devices=None) -> Mesh:
    """A 1-D device mesh with axis 'clients' over ``devices`` (default: all devices)."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (CLIENTS,))


def shard_clients(data: ClientData | PackedClientData, mesh: Mesh) -> ClientData | PackedClientData:
    """Places client data with its client axis split over the mesh's 'clients' axis (packed data: the samples
    replicated, the per-client counts and offsets split)."""
    n_dev = mesh.shape[CLIENTS]
    if data.num_clients % n_dev:
        raise ValueError(f"{data.num_clients} clients cannot be split evenly over {n_dev} devices: use a multiple "
                         f"of {n_dev} clients (clients with n = 0 are allowed as padding) or fewer devices")
    if isinstance(data, PackedClientData):
        rep, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(CLIENTS))
        return PackedClientData(*jax.device_put((data.x, data.y), rep), *jax.device_put((data.n, data.offset), split))
    return jax.device_put(data, NamedSharding(mesh, P(CLIENTS)))


class RoundResult(NamedTuple):
    """One FedAvg round (``fed_round``): the new global params (FedAvg's step, server_lr times the mean), the
    clients' updates (K, ...), active / rejected (K,) masks, the server's new model state, the clients'
    weighted mean loss and metrics, and the weighted mean update (what a server optimizer consumes)."""

    params: PyTree
    updates: PyTree
    active: jax.Array
    rejected: jax.Array
    model_state: PyTree
    loss: jax.Array
    metrics: dict
    mean_update: PyTree


def _static(cfg: FedConfig) -> FedConfig:
    """The part of a config that shapes the compiled program: seed and server_lr travel as traced arrays."""
    return dataclasses.replace(cfg, seed=0, server_lr=1.0)


def fed_round(model, tx, cfg: FedConfig, params, data: ClientData, t, exclude, update_scale, mesh: Mesh | None = None,
              model_state: PyTree = None) -> RoundResult:
    """One FedAvg round of ``model`` (an objective, or an apply function trained as a ``Classifier``).

    Updates of excluded, non-participating or empty clients are zero and inactive. A client whose update holds
    NaN/inf is rejected: left out of the aggregate and of the history (so it cannot poison either), and
    reported in ``rejected``. With a ``mesh`` each device trains its share of the clients (``shard_map`` over
    the 'clients' axis) and keeps their updates (sharded output). The aggregate is always the ``pairwise_sum``
    of the weighted updates in client order, so it has the same bits on any layout; with 2^j clients per device
    the tree's first j levels run on each device and only one d-sized sum per device is gathered (otherwise the
    weighted updates are). A sharded run has the same bits as one device running the clients in chunks of
    K / devices (``client_chunk``); XLA does not promise equal bits for local training at different batch
    sizes, so plain vmap over all K may differ in the last bits. The seed and server_lr are traced: a new value
    does not recompile.
    """
    model_state = {} if model_state is None else model_state
    return _fed_round(as_objective(model), tx, _static(cfg), params, data, t, exclude, update_scale, mesh,
                      model_state, jnp.uint32(cfg.seed), jnp.float32(cfg.server_lr))


@functools.partial(jax.jit, static_argnames=("model", "tx", "cfg", "mesh"))
def _fed_round(model, tx, cfg, params, data, t, exclude, update_scale, mesh, model_state, seed, server_lr):
    return _round(model, tx, cfg, params, data, t, exclude, update_scale, mesh, model_state, seed, server_lr)


def _round(model, tx, cfg: FedConfig, params, data: ClientData, t, exclude, update_scale, mesh, model_state, seed,
           server_lr) -> RoundResult:
    """``fed_round``'s body (traced inside ``fed_rounds``' scan too)."""
    k = data.num_clients
    rk = jax.random.fold_in(jax.random.key(seed), t)
    part = participants(jax.random.fold_in(rk, 0), k, cfg.participation) & ~exclude & (data.n > 0)
    ck = jax.random.fold_in(rk, 1)
    keys = jax.vmap(lambda u: jax.random.fold_in(ck, u))(jnp.arange(k))

    packed = isinstance(data, PackedClientData)

    def clients(p, shared, args):  # the clients of one device: vmapped, or lax.map in chunks of client_chunk
        def one(a):
            if packed:  # the samples are shared; a client reads its rows from its offset
                n, kk, off = a
                return local_update(model, tx, p, *shared, n, kk, cfg.local_steps, cfg.batch_size, model_state, off)
            x, y, n, kk = a
            return local_update(model, tx, p, x, y, n, kk, cfg.local_steps, cfg.batch_size, model_state)

        return jax.vmap(one)(args) if cfg.client_chunk is None else jax.lax.map(one, args, batch_size=cfg.client_chunk)

    def checked(out, scale, part):  # per client: scale, reject non-finite, zero the inactive
        ups, states, losses, metrics = out
        kk = scale.shape[0]
        ups = jax.tree.map(lambda u: u * scale.reshape((kk,) + (1,) * (u.ndim - 1)).astype(u.dtype), ups)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u.reshape(kk, -1)), axis=1) for u in jax.tree.leaves(ups)]), 0)
        active = part & finite
        ups = tree_where(active, ups, jax.tree.map(jnp.zeros_like, ups))
        return ups, active, part & ~finite, (states, losses, metrics)

    def finish(mean, ups, active, rejected, aux):  # the server's side: FedAvg's step, state and loss means
        states, losses, metrics = aux
        w = _normalized(data.n.astype(jnp.float32), active)
        new = server_update(None, params, (), mean, server_lr)[0]
        wmean = lambda v: jnp.tensordot(w, v.astype(jnp.float32), axes=1)  # noqa: E731
        return RoundResult(new, ups, active, rejected, state_mean(states, model_state, w), wmean(losses),
                           jax.tree.map(wmean, metrics), mean)

    shared, args = ((data.x, data.y), (data.n, keys, data.offset)) if packed else ((), (data.x, data.y, data.n, keys))
    if mesh is None:
        ups, active, rejected, aux = checked(clients(params, shared, args), update_scale, part)
        total = pairwise_sum(_flat_weighted(data.n.astype(jnp.float32) * active, ups))
        return finish(_mean_from_sum(total, ups), ups, active, rejected, aux)

    def device(p, shared, a, scale, part_l):  # one device: its K / D clients, whose updates stay there
        n_l = a[0] if packed else a[2]
        ups, active_l, rejected, aux = checked(clients(p, shared, a), scale, part_l)
        rows = _flat_weighted(n_l.astype(jnp.float32) * active_l, ups)
        if rows.shape[0] & (rows.shape[0] - 1) == 0:  # 2^j clients per device: the pairwise tree's first j
            total = pairwise_sum(jax.lax.all_gather(pairwise_sum(rows), CLIENTS))  # levels are device-local
        else:
            total = pairwise_sum(jax.lax.all_gather(rows, CLIENTS, tiled=True))
        return _mean_from_sum(total, ups), ups, active_l, rejected, aux

    # check_vma=False: with the varying-axes check on, jax 0.10 computed wrong local updates (random ops)
    c = P(CLIENTS)
    mean, ups, active, rejected, aux = jax.shard_map(
        device, mesh=mesh, in_specs=(P(), P(), c, c, c), out_specs=(P(), c, c, c, c), check_vma=False)(
        params, shared, args, update_scale, part)
    return finish(mean, ups, active, rejected, aux)


class ServerState(NamedTuple):
    """The server between rounds: what ``init_server`` makes and ``fed_rounds`` advances. ``round`` is the next
    round's index; ``seed`` and ``server_lr`` are arrays, so a new value does not recompile."""

    params: PyTree
    model_state: PyTree
    opt_state: PyTree  # the server optimizer's state (() for FedAvg's plain step)
    round: jax.Array
    seed: jax.Array
    server_lr: jax.Array


def init_server(params0: PyTree, cfg: FedConfig, model_state: PyTree = None,
                server_tx: optax.GradientTransformation | None = None, start_round: int = 0) -> ServerState:
    """The server before round ``start_round``: params0, the model state, the server optimizer's initial state."""
    return ServerState(params0, {} if model_state is None else model_state,
                       () if server_tx is None else server_tx.init(params0), jnp.int32(start_round),
                       jnp.uint32(cfg.seed), jnp.float32(cfg.server_lr))


def recalibrate_state(model, params: PyTree, model_state: PyTree, data: ClientData, cfg: FedConfig,
                      exclude: Iterable[int] = (), t: int | None = None) -> PyTree:
    """The model state (BatchNorm statistics) at ``params``, recomputed by the clients not in ``exclude``: one
    round of their local steps in training mode with the parameters held fixed, the new states averaged as in
    training. For a server-only unlearned model, whose state the history cannot give. Round key t (default
    cfg.rounds, after training's)."""
    k = data.num_clients
    excl = jnp.asarray(user_mask(exclude, k, "exclude"))
    t = cfg.rounds if t is None else int(t)
    return fed_round(model, optax.set_to_zero(), cfg, params, data, t, excl, jnp.ones((k,), jnp.float32),
                     model_state=model_state).model_state


def server_update(server_tx, params: PyTree, opt_state: PyTree, mean_update: PyTree, server_lr) -> tuple:
    """The server's step on the clients' weighted mean update: FedAvg's w + server_lr * mean (``server_tx``
    None), or any optax transform fed the pseudo-gradient -mean (FedOpt, Reddi et al. 2021: ``optax.sgd(lr,
    momentum)`` is FedAvgM, ``optax.adam`` FedAdam, ``optax.yogi`` FedYogi). Returns (params, opt_state)."""
    if server_tx is None:
        return jax.tree.map(lambda a, b: a + (server_lr * b).astype(a.dtype), params, mean_update), opt_state
    upd, opt_state = server_tx.update(jax.tree.map(jnp.negative, mean_update), opt_state, params)
    return optax.apply_updates(params, upd), opt_state


class TrainResult(NamedTuple):
    """Outcome of ``train``: final params, one History per compressor, per-round log (loss, rejected clients,
    the compressors' overloads and errors), wall time (s), the model state (e.g. BatchNorm statistics), and
    the server and compressor states a later ``train(start=result)`` continues from."""

    params: PyTree
    histories: dict
    log: dict
    seconds: float
    model_state: PyTree = None
    server: ServerState | None = None
    codec_states: dict | None = None


class RoundOutputs(NamedTuple):
    """What ``fed_rounds`` hands the host per round (leading axis: the block's rounds)."""

    active: jax.Array  # (B, K) bool: clients whose update entered the aggregate
    rejected: jax.Array  # (B, K) bool: clients whose update held NaN/inf
    messages: tuple  # per compressor: the round's Message
    overload: tuple  # per compressor: (B,) int32 overloaded lattice blocks
    rel_error: tuple  # per compressor: (B,) float32 sum ||decoded - update||^2 / sum ||update||^2
    updates: PyTree  # the (B, K, ...) updates when asked for (host-side selections), else None
    loss: jax.Array = None  # (B,) the active clients' weighted mean training loss
    metrics: dict = None  # the objective's metrics, (B,) each, weighted like the loss
    model_gap: tuple = ()  # per compressor: (B,) float32 ||trained - replayed model|| after the round (a model
    # correction's coding error), NaN for compressors without ``model_correction``


def fed_rounds(model, tx, cfg: FedConfig, server: ServerState, data: ClientData, exclude=None, update_scale=None,
               states: tuple = (), compressors: tuple = (), length: int = 1, mesh: Mesh | None = None,
               with_updates: bool = False, server_tx: optax.GradientTransformation | None = None):
    """The round-by-round API: rounds server.round .. server.round + length - 1 as one compiled ``lax.scan``;
    each runs ``fed_round``, the server's step (``server_update`` with ``server_tx``) and encodes the updates with
    every compressor (closed-loop ``states`` carried). Returns (server, states, RoundOutputs stacked over the
    rounds). Any split of the rounds into calls gives the same bits: round t's randomness depends on (seed, t)
    only. ``exclude`` (K,) bool and ``update_scale`` (K,) default to nobody and 1.

        server = mj.init_server(params0, cfg)
        server, _, out = mj.fed_rounds(model, tx, cfg, server, data)          # one round
        server, _, out = mj.fed_rounds(model, tx, cfg, server, data, length=9)  # nine more
    """
    k = data.num_clients
    if server_tx is not None and any(c.correction is not None for c in compressors):
        raise ValueError("model_correction codes FedAvg's step (server_lr x mean); with a server optimizer use a "
                         "compressor without it (e.g. medu(correction=False))")
    exclude = jnp.zeros((k,), bool) if exclude is None else jnp.asarray(exclude, bool)
    update_scale = jnp.ones((k,), jnp.float32) if update_scale is None else jnp.asarray(update_scale, jnp.float32)
    return _fed_rounds(as_objective(model), tx, _static(cfg), server, data, exclude, update_scale, tuple(states),
                       tuple(compressors), int(length), mesh, bool(with_updates), server_tx)


@functools.partial(jax.jit, static_argnames=("model", "tx", "cfg", "mesh", "compressors", "length", "with_updates",
                                             "server_tx"))
def _fed_rounds(model, tx, cfg: FedConfig, server: ServerState, data: ClientData, exclude, update_scale,
                states: tuple, compressors: tuple, length: int, mesh, with_updates: bool, server_tx):
    def body(carry, _):
        srv, sts = carry
        r = _round(model, tx, cfg, srv.params, data, srv.round, exclude, update_scale, mesh, srv.model_state,
                   srv.seed, srv.server_lr)
        params, opt = (r.params, srv.opt_state) if server_tx is None else \
            server_update(server_tx, srv.params, srv.opt_state, r.mean_update, srv.server_lr)
        msgs, new, over, err, gap = [], [], [], [], []
        for comp, st in zip(compressors, sts):
            key = compressor_key(srv.seed, srv.round)
            msg, st, decoded, valid, stats = comp.encode(r.updates, st, key, r.active)
            g = jnp.float32(jnp.nan)
            if comp.correction is not None:  # what replay does with the decoded rows vs the trained step: the mean
                # in float32 (bf16 rows too, as replay sums them), summed like the aggregate (the same bits on a mesh)
                dec32 = jax.tree.map(lambda x: x.astype(jnp.float32), decoded)
                mean = _mean_from_sum(pairwise_sum(_flat_weighted(data.n.astype(jnp.float32) * valid, dec32)), dec32)
                replayed = jax.tree.map(lambda m: srv.server_lr * m, mean)
                step = jax.tree.map(lambda a, b: a.astype(jnp.float32) - b.astype(jnp.float32), params, srv.params)
                msg, st, (g, _) = comp.correct(msg, st, step, replayed, key)
            msgs.append(msg), new.append(st), over.append(stats.overload)
            err.append(rel_error(stats)), gap.append(g)
        out = RoundOutputs(r.active, r.rejected, tuple(msgs), tuple(over), tuple(err),
                           r.updates if with_updates else None, r.loss, r.metrics, tuple(gap))
        return (srv._replace(params=params, model_state=r.model_state, opt_state=opt, round=srv.round + 1),
                tuple(new)), out

    (server, states), out = jax.lax.scan(body, (server, tuple(states)), None, length=length)
    return server, states, out


def _block_size(rounds_per_call: int | None, histories: list[History], remaining: int, per_round: bool,
                progress: bool = False, budget_bytes: int = 64 << 20) -> int:
    """Rounds per compiled call: 1 when the host must act after every round (a store's commit, a selection's
    choice), else ``rounds_per_call`` or, by default, as many as keep the block's stacked payloads (the coder's
    rows, which dwarf the per-user masks) within ``budget_bytes`` on the device, and with a progress bar at
    most a twentieth of the run, so the bar moves."""
    if per_round:
        return 1
    if rounds_per_call is not None:
        if int(rounds_per_call) < 1:
            raise ValueError(f"rounds_per_call must be >= 1 or None, got {rounds_per_call!r}")
        return max(1, min(int(rounds_per_call), remaining))
    msg_bytes = sum(int(np.prod(a.shape)) * a.dtype.itemsize for h in histories for a in jax.tree.leaves(h.rows_like()))
    cap = -(-remaining // 20) if progress else remaining
    return max(1, min(cap, budget_bytes // max(msg_bytes, 1)))


def _open_stores(store: str, resume: bool, histories: dict, states: dict, params0: PyTree, cfg: FedConfig,
                 lazy: bool = False, run: dict | None = None):
    """Takes the store folder's lock, then creates (or, resuming, reloads and checks) one store per history;
    returns (params, first round, writers, lock). The caller releases the lock when the run ends, however."""
    import warnings

    from medu_jax import store as S

    if not histories:
        raise ValueError("store= given but no full history to write")
    if os.path.exists(store) and not os.path.isdir(store):
        raise NotADirectoryError(f"store={store!r} is a file, not a folder for history stores")
    if resume and not os.path.isdir(store):
        raise FileNotFoundError(f"resume=True, but there is no history store at {store!r} (nothing to resume): "
                                "start without resume, or give the folder of the run to continue")
    paths = {name: os.path.join(store, name) for name in histories}
    os.makedirs(store, exist_ok=True)
    lock = S.StoreLock(store)
    try:
        S.remove_stale(store)  # temporary stores of a creation that crashed (we hold the lock)
        existing = [p for p in paths.values() if os.path.exists(p)]
        if not resume and existing:
            raise FileExistsError(f"history store {existing[0]!r} exists: continue it with resume=True "
                                  "(medu: --resume) or choose a new folder")
        with warnings.catch_warnings():  # a store cut short is what a resume is for
            warnings.simplefilter("ignore", S.IncompleteHistoryWarning)
            loaded = {n: S.load_history(p, params0, lazy) for n, p in paths.items() if os.path.exists(p)}
        p0 = [S._spec(np.asarray(x)) for x in jax.tree.leaves(params0)]
        for n, h in loaded.items():
            mine, info = histories[n], S.store_info(paths[n])
            diff = [what for what, same in (
                ("compressor", h.compressor == mine.compressor), ("seed", h.seed == mine.seed),
                ("server_lr", h.server_lr == mine.server_lr),
                ("client weights", np.array_equal(h.weights, mine.weights)), ("params0", info.params0 == p0),
            ) if not same]
            diff += S.run_differences(info.run, run) if run is not None else []
            if diff:
                raise S.HistoryFileError(f"cannot resume {paths[n]!r}: it was written by a different run "
                                         f"({', '.join(diff)} differ)")
        t0 = min((h.num_rounds for h in loaded.values()), default=0)
        missing = [p for n, p in paths.items() if n not in loaded]
        if missing and t0:
            raise S.HistoryFileError(f"cannot resume: {missing} missing beside {existing}, which hold {t0} rounds")
        if t0 > cfg.rounds:
            raise S.HistoryFileError(f"cannot resume: the stores hold {t0} rounds, more than cfg.rounds={cfg.rounds}")
        params, writers = params0, {}
        for n, p in paths.items():
            if n not in loaded:  # a new store (also one whose creation a crash interrupted: none has a round)
                writers[n] = S.HistoryWriter(p, histories[n], run=run, planned=cfg.rounds)
                continue
            histories[n].records = loaded[n].records[:t0]
            writers[n] = S.HistoryWriter.reopen(p)
            writers[n].truncate(t0)
            if t0 < cfg.rounds:
                writers[n].unfinish()
            writers[n].planned = cfg.rounds
            if t0:
                params, states[n] = S.load_state(p, histories[n], t0 - 1)
        return params, t0, writers, lock
    except BaseException:
        lock.release()
        raise


def train(
    model,
    tx: optax.GradientTransformation,
    params0: PyTree,
    data: ClientData,
    cfg: FedConfig,
    compressors: dict[str, Compressor] | None = None,
    exclude: Iterable[int] = (),
    update_scale: np.ndarray | None = None,
    progress: bool = False,
    desc: str = "FedAvg",
    store: str | None = None,
    resume: bool = False,
    selections: dict[str, Selection] | None = None,
    mesh: Mesh | None = None,
    rounds_per_call: int | None = None,
    offload: bool = False,
    *,
    model_state: PyTree = None,
    server_tx: optax.GradientTransformation | None = None,
    start: "TrainResult | None" = None,
) -> TrainResult:
    """Runs federated training of ``model`` for rounds 0..cfg.rounds - 1 and feeds every round's updates
    through each compressor into its own History.

    ``model``: an objective (``objectives``: a loss and an evaluation function; ``linen`` / ``nnx`` adapters) or a
    plain ``apply_fn(params, x) -> logits`` (softmax cross-entropy); ``model_state``: its non-trained state
    (BatchNorm statistics), averaged over clients each round. ``server_tx``: the server optimizer on the mean
    update (None: FedAvg's step cfg.server_lr; see ``server_update``). ``start``: a previous result of the same
    run to continue from (its rounds, histories and states): ``train(cfg(rounds=3))`` then
    ``train(cfg(rounds=5), start=...)`` has the same bits as one ``train(cfg(rounds=5))``.
    ``exclude`` lists users left out of the whole run (retrain-from-scratch); ``update_scale`` (K,) multiplies
    each client's update (scaled or sign-flipped update attacks, 1 for honest clients). With ``store`` (a
    folder) each history is also appended to ``store/<name>`` round by round with the training state, so a
    crash loses at most the round in flight; ``resume=True`` continues from what the store holds (the result
    is bit-identical to an uninterrupted run). ``offload=True`` (with ``store``) keeps those histories on disk
    only: host memory holds no round, and the returned histories read their rounds from the store as replay
    uses them (``store.StoredRecords``). ``selections`` maps a history name to the rounds and users it
    keeps (FedEraser's interval, Crab's informative rounds/users, rollback checkpoints); default: all.
    ``mesh`` (see ``client_mesh``) shards the clients over devices; the result has the same bits as one device.
    Rounds run ``rounds_per_call`` at a time as one compiled ``lax.scan`` (``fed_rounds``: training and encoding),
    by default as many as keep their stacked messages within 64 MB (with ``progress``, at most 1/20 of the run);
    a store or a host-side selection runs them one by one. Any block size gives the same bits.
    """
    excl, scale = _client_masks(data, exclude, update_scale)
    if store is not None and (server_tx is not None or jax.tree.leaves(model_state)):
        raise ValueError("store= keeps params and the compressors' states per round, not yet a server optimizer's "
                         "or a model state: train without store, or with FedAvg's step and a stateless model")
    rec = Recorder(params0, data, cfg, dict(compressors or {}), dict(selections or {}), server_tx, model_state)
    server = init_server(params0, cfg, model_state, server_tx)
    if start is not None:
        server = rec.continue_from(start, cfg)
    storage = _Storage.open(store, resume, offload, rec, model, tx, params0, data, cfg, excl, scale)
    try:  # a store's lock is held until the run ends, however it ends
        if storage.writers:
            server = server._replace(params=storage.params, round=jnp.int32(storage.t0))
        t0 = int(server.round)
        block = _block_size(rounds_per_call, rec.scanned_histories, max(cfg.rounds - t0, 1),
                            rec.per_round or store is not None, progress)
        bar = _progress_bar(progress, desc, cfg.rounds - t0)
        start_time = time.perf_counter()
        placed = data if mesh is None else shard_clients(data, mesh)
        for t in range(t0, cfg.rounds, block):
            n, prev = min(block, cfg.rounds - t), server.params
            server, states, out = fed_rounds(model, tx, cfg, server, placed, excl, scale, rec.scanned_states,
                                             rec.scanned_compressors, n, mesh, rec.per_round, server_tx)
            for name, round_id, record in rec.record_block(t, n, states, out, storage.offloaded):
                storage.write(name, round_id, record, server.params, rec.states[name])
            rec.record_selected(t, prev, server.params, out)
            bar.update(n)
        bar.close()
        rec.warn_if_idle(data, excl, t0, cfg.rounds)
        rec.warn_if_diverged(params0, server.params)
        rec.warn_if_history_diverged()
        rec.warn_if_model_gap(server.params)
        storage.finish(rec.histories)
        jax.block_until_ready(server.params)
        return TrainResult(server.params, rec.histories, rec.log, time.perf_counter() - start_time,
                           server.model_state, server, dict(rec.states))
    finally:
        storage.release()


def _client_masks(data: ClientData, exclude: Iterable[int], update_scale) -> tuple[np.ndarray, np.ndarray]:
    """(K,) bool of the clients left out of the run and (K,) float32 update multipliers, checked."""
    k = data.num_clients
    excl = user_mask(exclude, k, "exclude")
    scale = np.ones((k,), np.float32) if update_scale is None else np.asarray(update_scale, np.float32)
    if scale.shape != (k,):
        raise ValueError(f"update_scale must have shape ({k},), got {scale.shape}")
    return excl, scale


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(progress: bool, desc: str, total: int):
    if not progress:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)


class _Storage:
    """The run's history stores: the folder's lock, one writer per full history, where training starts (after
    what a resumed store holds), and the histories kept on disk only (``offload``)."""

    def __init__(self, params, t0: int, writers: dict, lock, offload: bool, gather: bool = False):
        self.params, self.t0, self.writers, self.lock = params, t0, writers, lock
        self.offloaded = frozenset(writers) if offload else frozenset()
        self.gather = gather  # several processes: all gather the sharded codec states, process 0 writes them

    @classmethod
    def open(cls, store, resume, offload, rec: Recorder, model, tx, params0, data, cfg, excl, scale):
        if offload and store is None:
            raise ValueError("offload=True keeps the histories on disk only: it needs store=")
        if store is None:
            return cls(params0, 0, {}, None, False)
        if jax.process_count() > 1:  # only process 0 writes (and locks) the store; the others hold none
            if resume:
                raise ValueError("resume=True is not supported in a multi-process run (only process 0 holds the "
                                 "store): resume it from one process, or start a new store")
            if jax.process_index() != 0:
                return cls(params0, 0, {}, None, False, gather=True)
        if resume and rec.partial:
            raise ValueError(f"resume=True needs full histories only; {rec.partial} have a Selection")
        from medu_jax.store import describe_run

        obj = as_objective(model)
        run = describe_run(lambda p, x: obj.apply(p, {}, x), tx, params0, data, cfg, excl, scale)
        full = {n: rec.histories[n] for n in rec.scanned}  # selective histories stay in memory (save_history after)
        return cls(*_open_stores(store, resume, full, rec.states, params0, cfg, offload, run), offload,
                   jax.process_count() > 1)

    def write(self, name: str, round_id: int, record: dict, params, state) -> None:
        if self.gather:
            state = to_host(state)
        if name in self.writers:
            self.writers[name].append(round_id, record, params, state)

    def finish(self, histories: dict) -> None:
        """Marks every store complete and points offloaded histories at their stores."""
        for w in self.writers.values():
            w.finish()
        if self.offloaded:
            from medu_jax.store import StoredRecords

            for name in self.offloaded:
                histories[name].records = StoredRecords(self.writers[name].path)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
