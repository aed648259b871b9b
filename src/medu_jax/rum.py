"""Memorization-proxy unlearning (RUM, Zhao et al. 2024, arXiv 2410.16516), the project's reading.

Training records cheap per-example memorization proxies from the logits it already computes (no extra pass):
confidence in the true label, max-confidence, entropy and binary accuracy, averaged over the epochs. A forget
set is then split into low / mid / high memorization (memorization ~ 1 - confidence) and unlearned group by
group in that order with NegGrad+ (descend on the retain loss, ascend on the group's loss). Also: a holdout
retraining proxy, fine-tuning and random-label baselines, a confidence-threshold membership inference attack.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any
PROXIES = ("confidence", "max_confidence", "entropy", "binary_accuracy")


class Proxies(NamedTuple):
    """Per-example proxies averaged over the epochs (n,) each; higher confidence means less memorization."""

    confidence: np.ndarray
    max_confidence: np.ndarray
    entropy: np.ndarray
    binary_accuracy: np.ndarray

    def memorization(self, name: str = "confidence") -> np.ndarray:
        """A memorization score (higher = more memorized) from one proxy."""
        if name not in PROXIES:
            raise ValueError(f"unknown proxy {name!r}: choose one of {PROXIES}")
        v = getattr(self, name)
        return v if name == "entropy" else 1.0 - v


def _xent(apply_fn, params, x, y):
    logits = apply_fn(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


@functools.partial(jax.jit, static_argnames=("apply_fn", "tx", "batch_size"))
def _epoch(apply_fn, tx, params, opt, x, y, key, batch_size: int):
    """One epoch of minibatch training; returns params, opt state and per-example proxy sums (from the logits
    the training step computed anyway)."""
    n = x.shape[0]
    nb = n // batch_size
    perm = jax.random.permutation(key, n)[: nb * batch_size].reshape(nb, batch_size)

    def step(carry, idx):
        p, o, acc = carry
        (_, logits), g = jax.value_and_grad(functools.partial(_xent, apply_fn), has_aux=True)(p, x[idx], y[idx])
        u, o = tx.update(g, o, p)
        prob = jax.nn.softmax(logits)
        stats = jnp.stack([
            jnp.take_along_axis(prob, y[idx][:, None], 1)[:, 0], prob.max(1),
            -jnp.sum(prob * jnp.log(jnp.maximum(prob, 1e-30)), 1), (logits.argmax(1) == y[idx]).astype(prob.dtype),
            jnp.ones_like(prob[:, 0]),
        ], 1)
        return (optax.apply_updates(p, u), o, acc.at[idx].add(stats)), None

    acc = jnp.zeros((n, 5), jnp.float32)
    (params, opt, acc), _ = jax.lax.scan(step, (params, opt, acc), perm)
    return params, opt, acc


def train_with_proxies(apply_fn, tx, params: PyTree, x, y, epochs: int, batch_size: int, key: jax.Array):
    """Trains ``epochs`` epochs (epoch e shuffled by fold_in(key, e)); returns (params, Proxies)."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    opt = tx.init(params)
    acc = np.zeros((x.shape[0], 5), np.float64)
    for e in range(int(epochs)):
        params, opt, a = _epoch(apply_fn, tx, params, opt, x, y, jax.random.fold_in(key, e), int(batch_size))
        acc += np.asarray(a, np.float64)
    seen = np.maximum(acc[:, 4], 1)
    return params, Proxies(*(acc[:, i] / seen for i in range(4)))


def holdout_memorization(apply_fn, tx, init: PyTree, x, y, epochs: int, batch_size: int, key: jax.Array):
    """Holdout-retraining proxy: two models on the two halves of a random split; an example's score is its
    true-label confidence under the model that saw it minus under the model that did not."""
    n = len(y)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 0), n))
    halves = [np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])]
    conf = [None, None]
    for h in range(2):
        p, _ = train_with_proxies(apply_fn, tx, init, x[halves[h]], y[halves[h]], epochs, batch_size,
                                  jax.random.fold_in(key, h + 1))
        prob = jax.nn.softmax(apply_fn(p, jnp.asarray(x)))
        conf[h] = np.asarray(jnp.take_along_axis(prob, jnp.asarray(y)[:, None], 1)[:, 0])
    score = np.zeros(n)
    score[halves[0]] = conf[0][halves[0]] - conf[1][halves[0]]
    score[halves[1]] = conf[1][halves[1]] - conf[0][halves[1]]
    return score


def split_by_memorization(scores: np.ndarray, forget_idx: np.ndarray, groups: int = 3) -> list[np.ndarray]:
    """The forget set cut into ``groups`` equal parts by increasing memorization score (low, mid, high)."""
    forget_idx = np.asarray(forget_idx)
    order = forget_idx[np.argsort(np.asarray(scores)[forget_idx], kind="stable")]
    return [np.sort(part) for part in np.array_split(order, groups)]


@functools.partial(jax.jit, static_argnames=("apply_fn", "tx", "steps", "batch_size"))
def neggrad_plus(apply_fn, tx, params, xf, yf, xr, yr, key, steps: int, batch_size: int, beta: float):
    """NegGrad+: ``steps`` steps on beta * L(retain batch) - (1 - beta) * L(forget batch)."""
    def loss(p, kf, kr):
        i = jax.random.randint(kf, (batch_size,), 0, xf.shape[0])
        j = jax.random.randint(kr, (batch_size,), 0, xr.shape[0])
        return beta * _xent(apply_fn, p, xr[j], yr[j])[0] - (1 - beta) * _xent(apply_fn, p, xf[i], yf[i])[0]

    def step(carry, k):
        p, o = carry
        g = jax.grad(loss)(p, jax.random.fold_in(k, 0), jax.random.fold_in(k, 1))
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), None

    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
    return params


def rum(apply_fn, tx, params, x, y, forget_groups: list[np.ndarray], retain_idx: np.ndarray, key: jax.Array,
        steps: int = 30, batch_size: int = 32, beta: float = 0.9) -> PyTree:
    """RUM: NegGrad+ on each memorization group in turn (low, mid, high), ``steps`` steps each."""
    xr, yr = jnp.asarray(x[retain_idx]), jnp.asarray(y[retain_idx])
    for g, idx in enumerate(forget_groups):
        if len(idx):
            params = neggrad_plus(apply_fn, tx, params, jnp.asarray(x[idx]), jnp.asarray(y[idx]), xr, yr,
                                  jax.random.fold_in(key, g), int(steps), int(batch_size), float(beta))
    return params


def relabel(y: np.ndarray, idx: np.ndarray, num_classes: int, key: jax.Array) -> np.ndarray:
    """Labels with the examples ``idx`` given a random wrong label (the random-label baseline's data)."""
    y = np.array(y)
    shift = np.asarray(jax.random.randint(key, (len(idx),), 1, num_classes))
    y[idx] = (y[idx] + shift) % num_classes
    return y


def mia_accuracy(apply_fn, params, x_members, y_members, x_non, y_non) -> float:
    """Best-threshold accuracy of telling members from non-members by true-label confidence (balanced)."""
    def conf(x, y):
        prob = jax.nn.softmax(apply_fn(params, jnp.asarray(x)))
        return np.asarray(jnp.take_along_axis(prob, jnp.asarray(y)[:, None], 1)[:, 0])

    m = min(len(y_members), len(y_non))
    a, b = conf(x_members[:m], y_members[:m]), conf(x_non[:m], y_non[:m])
    s = np.concatenate([a, b])
    lab = np.concatenate([np.ones(m), np.zeros(m)])
    order = np.argsort(-s, kind="stable")
    tp = np.cumsum(lab[order])
    fp = np.cumsum(1 - lab[order])
    acc = (tp + (m - fp)) / (2 * m)  # predict "member" for the top-k confidences
    return float(max(acc.max(), 0.5))


def tug_of_war(acc: dict, ref: dict) -> float:
    """ToW = (1 - |dFA|)(1 - |dRA|)(1 - |dTA|) against the retrained model's forget/retain/test accuracy."""
    return float(np.prod([1 - abs(acc[k] - ref[k]) for k in ("forget_acc", "retain_acc", "test_acc")]))

