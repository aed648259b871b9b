"""ZO-GA: gradient ascent on a forget set with a two-point zeroth-order (SPSA) gradient estimate.

The estimate for q directions z_i ~ N(0, I) is g = (1/q) sum_i (L(w + mu z_i) - L(w - mu z_i)) / (2 mu) z_i.
Each z_i is regenerated from fold_in(key, i) (per leaf) when it is needed, never stored, and only forward
passes run: no backpropagation memory. ``fo_ga_step`` is the first-order comparison (autodiff). For a quadratic
loss the two-point difference is exact, so E[g] equals the true gradient (the property the tests check).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from medu_jax.fedavg import cross_entropy

PyTree = Any
Loss = Callable[[PyTree, Any], jax.Array]


def _xent(apply_fn, params: PyTree, batch) -> jax.Array:
    x, y = batch
    return cross_entropy(apply_fn, params, x, y)


@functools.lru_cache(maxsize=None)
def classification_loss(apply_fn) -> Loss:
    """loss(params, (x, y)): mean cross-entropy of ``apply_fn``; one cached object per model, so jitted steps
    that take it as a static argument compile once."""
    return functools.partial(_xent, apply_fn)


def direction(key: jax.Array, like: PyTree) -> PyTree:
    """A standard normal direction shaped like ``like``, regenerated from ``key`` (leaf j: fold_in(key, j))."""
    leaves, treedef = jax.tree_util.tree_flatten(like)
    return treedef.unflatten([jax.random.normal(jax.random.fold_in(key, j), x.shape, x.dtype)
                              for j, x in enumerate(leaves)])


def _axpy(a, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree.map(lambda u, v: v + (a * u).astype(v.dtype), x, y)


def spsa_coefficients(loss: Loss, params: PyTree, batch, key: jax.Array, mu: float, q: int) -> jax.Array:
    """(q,) projected derivatives c_i = (L(w + mu z_i) - L(w - mu z_i)) / (2 mu), two forward passes each."""
    def one(i):
        z = direction(jax.random.fold_in(key, i), params)
        return (loss(_axpy(mu, z, params), batch) - loss(_axpy(-mu, z, params), batch)) / (2 * mu)

    return jax.lax.map(one, jnp.arange(q))


def spsa_gradient(loss: Loss, params: PyTree, batch, key: jax.Array, mu: float = 1e-3, q: int = 1) -> PyTree:
    """The ZO gradient estimate g = mean_i c_i z_i, with z_i regenerated from the key (no stored noise)."""
    c = spsa_coefficients(loss, params, batch, key, mu, q)

    def add(acc, i):
        return _axpy(c[i] / q, direction(jax.random.fold_in(key, i), params), acc), None

    return jax.lax.scan(add, jax.tree.map(jnp.zeros_like, params), jnp.arange(q))[0]


@functools.partial(jax.jit, static_argnames=("loss", "q"))
def zo_ga_step(loss: Loss, params: PyTree, batch, key: jax.Array, lr: float, mu: float = 1e-3, q: int = 1) -> PyTree:
    """One ZO gradient-ascent step on the forget loss: w + lr * g_SPSA, applied direction by direction."""
    c = spsa_coefficients(loss, params, batch, key, mu, q)

    def add(w, i):
        return _axpy(lr * c[i] / q, direction(jax.random.fold_in(key, i), params), w), None

    return jax.lax.scan(add, params, jnp.arange(q))[0]


@functools.partial(jax.jit, static_argnames=("loss",))
def fo_ga_step(loss: Loss, params: PyTree, batch, lr: float) -> PyTree:
    """One first-order gradient-ascent step (backpropagation): the comparison for ZO-GA."""
    return _axpy(lr, jax.grad(loss)(params, batch), params)


def peak_bytes(compiled) -> int:
    """Peak device bytes of a compiled step by XLA's memory analysis: arguments + outputs + temporaries."""
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes)


def memory_ratio(loss: Loss, params: PyTree, batch, q: int = 1) -> dict:
    """Peak bytes of the first-order and the ZO step for the same loss, params and batch."""
    key = jax.random.key(0)
    fo = fo_ga_step.lower(loss, params, batch, 1e-3).compile()
    zo = zo_ga_step.lower(loss, params, batch, key, 1e-3, 1e-3, q).compile()
    f, z = peak_bytes(fo), peak_bytes(zo)
    return {"first_order_bytes": f, "zeroth_order_bytes": z, "ratio": f / max(z, 1)}


def unlearn_samples(loss: Loss, params: PyTree, forget, key: jax.Array, steps: int, lr: float, mu: float = 1e-3,
                    q: int = 4, method: str = "zo") -> PyTree:
    """``steps`` gradient-ascent steps on the forget batch (``method`` "zo" or "fo"), step i keyed fold_in(key, i)."""
    if method not in ("zo", "fo"):
        raise ValueError(f"unknown method {method!r}: choose 'zo' or 'fo'")
    for i in range(int(steps)):
        if method == "zo":
            params = zo_ga_step(loss, params, forget, jax.random.fold_in(key, i), lr, mu, q)
        else:
            params = fo_ga_step(loss, params, forget, lr)
    return params
