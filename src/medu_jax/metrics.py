"""Evaluation: clean accuracy, backdoor attack success, distance between models."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.attacks import add_trigger

PyTree = Any


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _predict(apply_fn: Callable, params: PyTree, x: jax.Array) -> jax.Array:
    return jnp.argmax(apply_fn(params, x), axis=-1)


def accuracy(apply_fn: Callable, params: PyTree, x, y) -> float:
    """Fraction of samples classified correctly."""
    return float(np.mean(np.asarray(_predict(apply_fn, params, jnp.asarray(x))) == np.asarray(y)))


def attack_success(apply_fn: Callable, params: PyTree, x, y, target: int, pixels: Iterable[int], value: float) -> float:
    """Backdoor success rate: fraction of triggered test samples (true class != target) predicted as target."""
    keep = np.asarray(y) != target
    xt = add_trigger(np.asarray(x)[keep], pixels, value)
    return float(np.mean(np.asarray(_predict(apply_fn, params, jnp.asarray(xt))) == target))


def flip_success(apply_fn: Callable, params: PyTree, x, y, source: int, target: int) -> float:
    """Targeted label-flip success: the fraction of test samples of class ``source`` predicted as ``target``."""
    keep = np.asarray(y) == source
    if not keep.any():
        raise ValueError(f"flip_success: the test set has no sample of class {source}")
    return float(np.mean(np.asarray(_predict(apply_fn, params, jnp.asarray(np.asarray(x)[keep]))) == target))


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _losses(apply_fn: Callable, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = apply_fn(params, x).astype(jnp.float32)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1)[:, 0]


def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of scores ``pos`` (positives) vs ``neg``: P(pos > neg) + P(pos == neg) / 2,
    from ranks (Mann-Whitney U), ties averaged."""
    pos, neg = np.asarray(pos, np.float64).ravel(), np.asarray(neg, np.float64).ravel()
    if not len(pos) or not len(neg):
        raise ValueError("auc: both score sets must be non-empty")
    from scipy.stats import rankdata  # scipy comes with scikit-learn

    ranks = rankdata(np.concatenate([pos, neg]))  # ties get their average rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def membership_auc(apply_fn: Callable, params: PyTree, x_members, y_members, x_non, y_non) -> float:
    """Loss-threshold membership inference (Yeom et al. 2018): the AUC of -loss separating ``members`` (e.g.
    the removed users' training samples) from non-members (held-out samples). 0.5: no trace of membership."""
    lm = np.asarray(_losses(apply_fn, params, jnp.asarray(x_members), jnp.asarray(y_members)))
    ln = np.asarray(_losses(apply_fn, params, jnp.asarray(x_non), jnp.asarray(y_non)))
    return auc(-lm, -ln)


def tree_distance(a: PyTree, b: PyTree) -> float:
    """||a - b|| over all leaves (float64 accumulation on the host)."""
    sq = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return sq**0.5


def relative_distance(w: PyTree, w_ref: PyTree) -> float:
    """||w - w_ref|| / ||w_ref||."""
    zero = jax.tree.map(np.zeros_like, w_ref)
    return tree_distance(w, w_ref) / max(tree_distance(w_ref, zero), 1e-30)
