"""S3T-style exact unlearning (arXiv 2406.16257), the project's reading: shards, slices, several slice orders.

The training data is cut into S shards of L slices. A frozen base network gives features; each shard trains a
small head (the per-slice layers, in place of LoRA adapters) sequentially on growing prefixes of its slices, in
B slice orders (cyclic rotations), keeping a checkpoint after every prefix. Deleting a sample invalidates, in
each order, every checkpoint whose prefix contains the sample's slice; the shard falls back to the longest
surviving prefix over its orders (exact: that checkpoint never saw the sample), and must retrain only when no
order keeps a prefix of ``min_prefix`` slices. SISA is the single-order case. Predictions average the shards.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


def slice_orders(num_slices: int, num_orders: int) -> np.ndarray:
    """(B, L) slice orders: B cyclic rotations of 0..L-1, spread evenly (B <= L)."""
    if not 1 <= num_orders <= num_slices:
        raise ValueError(f"num_orders must be in 1..num_slices={num_slices}, got {num_orders}")
    base = np.arange(num_slices)
    return np.stack([np.roll(base, -(b * num_slices) // num_orders) for b in range(num_orders)])


def surviving_prefix(orders: np.ndarray, deleted: set) -> tuple[int, int]:
    """(order index, prefix length) of the longest prefix, over the orders, that holds no deleted slice."""
    best = (0, 0)
    for b, order in enumerate(orders):
        n = 0
        while n < len(order) and int(order[n]) not in deleted:
            n += 1
        if n > best[1]:
            best = (b, n)
    return best


def deletions_absorbed(num_shards: int, num_slices: int, num_orders: int, key: jax.Array, trials: int = 200,
                       min_prefix: int = 1) -> float:
    """Mean number of uniformly random deletions (shard, slice) absorbed before some shard keeps no prefix of
    ``min_prefix`` slices in any order (and must retrain). num_orders = 1 is SISA without retraining."""
    orders = slice_orders(num_slices, num_orders)
    counts = []
    for t in range(int(trials)):
        hits = np.asarray(jax.random.randint(jax.random.fold_in(key, t), (num_shards * num_slices + 1, 2), 0,
                                             jnp.asarray([num_shards, num_slices])))
        deleted: list[set] = [set() for _ in range(num_shards)]
        n = 0
        for shard, sl in hits:
            deleted[shard].add(int(sl))
            if surviving_prefix(orders, deleted[shard])[1] < min_prefix:
                break
            n += 1
        counts.append(n)
    return float(np.mean(counts))


class S3TModel(NamedTuple):
    """Trained shards: checkpoints[s][b][l] = head params after the prefix of l + 1 slices of order b."""

    orders: np.ndarray
    checkpoints: list
    slices: list  # slices[s][j] = sample indices of shard s, slice j


@functools.partial(jax.jit, static_argnames=("head_apply", "tx", "steps", "batch_size"))
def _train_head(head_apply, tx, params, feats, y, mask, key, steps: int, batch_size: int):
    """``steps`` SGD steps on batches drawn from the rows where mask is True (a slice prefix)."""
    p_mask = mask / jnp.maximum(mask.sum(), 1)

    def step(carry, k):
        p, o = carry
        idx = jax.random.choice(k, feats.shape[0], (batch_size,), p=p_mask)
        g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
            head_apply(q, feats[idx]), y[idx]).mean())(p)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
    return params


def train_s3t(features, head_apply, head0: PyTree, tx, x, y, num_shards: int, num_slices: int, num_orders: int,
              key: jax.Array, steps_per_slice: int = 50, batch_size: int = 32) -> S3TModel:
    """Trains every shard's head on growing slice prefixes in each order; ``features(x)`` is the frozen base."""
    n = len(y)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), n))
    shards = np.array_split(perm, num_shards)
    slices = [[np.sort(s) for s in np.array_split(sh, num_slices)] for sh in shards]
    orders = slice_orders(num_slices, num_orders)
    feats, yy = jnp.asarray(features(jnp.asarray(x))), jnp.asarray(y)
    checkpoints = []
    for s in range(num_shards):
        per_order = []
        for b, order in enumerate(orders):
            p, mask, ck = head0, np.zeros(n, np.float32), []
            for pos, j in enumerate(order):
                mask[slices[s][j]] = 1.0
                p = _train_head(head_apply, tx, p, feats, yy, jnp.asarray(mask),
                                jax.random.fold_in(key, (s * 64 + b) * 64 + pos + 1), steps_per_slice, batch_size)
                ck.append(p)
            per_order.append(ck)
        checkpoints.append(per_order)
    return S3TModel(orders, checkpoints, slices)


def delete(model: S3TModel, sample_ids, deleted: list[set] | None = None) -> tuple[list[set], list[tuple[int, int]]]:
    """Marks the slices holding ``sample_ids`` deleted; returns (deleted slices per shard, per shard the
    (order, prefix length) now served; prefix 0 means the shard must retrain)."""
    deleted = [set() for _ in model.slices] if deleted is None else [set(d) for d in deleted]
    ids = set(int(i) for i in sample_ids)
    for s, shard in enumerate(model.slices):
        for j, sl in enumerate(shard):
            if ids.intersection(sl.tolist()):
                deleted[s].add(j)
    return deleted, [surviving_prefix(model.orders, d) for d in deleted]


def predict(model: S3TModel, features, head_apply, x, served: list[tuple[int, int]] | None = None) -> jax.Array:
    """Class scores averaged over the shards' served checkpoints (default: every shard's full prefix);
    shards with no surviving prefix are left out."""
    f = features(jnp.asarray(x))
    L = model.orders.shape[1]
    served = [(0, L)] * len(model.checkpoints) if served is None else served
    probs = [jax.nn.softmax(head_apply(model.checkpoints[s][b][n - 1], f)) for s, (b, n) in enumerate(served) if n]
    if not probs:
        raise ValueError("every shard lost all its checkpoints: retrain")
    return sum(probs) / len(probs)
