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


def tree_distance(a: PyTree, b: PyTree) -> float:
    """||a - b|| over all leaves (float64 accumulation on the host)."""
    sq = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return sq**0.5


def relative_distance(w: PyTree, w_ref: PyTree) -> float:
    """||w - w_ref|| / ||w_ref||."""
    zero = jax.tree.map(np.zeros_like, w_ref)
    return tree_distance(w, w_ref) / max(tree_distance(w_ref, zero), 1e-30)
