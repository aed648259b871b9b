"""Evaluation: clean accuracy, backdoor and targeted-flip attack success, membership-inference AUC, distances."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.attacks import add_trigger
from medu_jax.objectives import as_objective
from medu_jax.trees import relative_distance, tree_distance  # noqa: F401  (re-exported: the evaluation API)

PyTree = Any


def outputs(model, params: PyTree, x, state: PyTree = None) -> jax.Array:
    """The model's evaluation-mode outputs on ``x``: ``model`` is an objective (``objectives``, e.g. with
    BatchNorm statistics in ``state``) or a plain apply function."""
    return _outputs(as_objective(model), params, {} if state is None else state, jnp.asarray(x))


@functools.partial(jax.jit, static_argnames=("model",))
def _outputs(model, params: PyTree, state: PyTree, x: jax.Array) -> jax.Array:
    return model.apply(params, state, x)


def _predict(apply_fn, params: PyTree, x: jax.Array, state: PyTree = None) -> jax.Array:
    return jnp.argmax(outputs(apply_fn, params, x, state), axis=-1)


def accuracy(apply_fn: Callable, params: PyTree, x, y, state: PyTree = None) -> float:
    """Fraction of samples classified correctly (``apply_fn``: an apply function or an objective with its
    model ``state``)."""
    return float(np.mean(np.asarray(_predict(apply_fn, params, jnp.asarray(x), state)) == np.asarray(y)))


def mean_squared_error(model, params: PyTree, x, y, state: PyTree = None) -> float:
    """Mean squared error of a regression model's outputs ((N,) or (N, 1)) against targets y (N,)."""
    out = np.asarray(outputs(model, params, x, state), np.float64)
    y = np.asarray(y, np.float64)
    return float(np.mean((out.reshape(y.shape) - y) ** 2))


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


def _losses(apply_fn, params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
    logits = outputs(apply_fn, params, x).astype(jnp.float32)
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
