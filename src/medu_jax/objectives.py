"""What a client minimises and how the server evaluates: the model-and-loss interface of training.

An objective is any object with two methods (a ``typing.Protocol``, in the spirit of fedjax's Model):

- ``loss(params, state, batch, rng) -> (loss, (new_state, metrics))``: one local step's loss on
  ``batch = (x, y)`` in training mode. ``params`` are what clients train and the history codes; ``state`` is
  everything else the model carries (BatchNorm statistics), never coded as an update; ``rng`` is that step's
  key (dropout), distinct per step and client; ``metrics`` a dict of scalars.
- ``apply(params, state, x) -> outputs``: evaluation mode (running statistics, no dropout).

``Classifier`` (softmax cross-entropy of integer labels, the default when ``train`` gets a plain
``apply_fn(params, x)``), ``Regressor`` (mean squared error), ``from_linen`` and ``from_nnx`` adapters are given here.
Objectives are frozen dataclasses: two built from the same functions compare equal, so a jitted round does not
recompile for a new wrapper of the same model.

Model state over a federated round: each client starts from the server's state and its last step's new state
is kept; the server takes the weighted mean (client weights n_k, active clients only) of the floating-point
leaves and keeps the server's value of the others (counters). Unlearning recovers ``params`` from the history;
``recalibrate_state`` (fedavg) recomputes the state from the remaining clients at the unlearned parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Batch = tuple  # (x, y)


@runtime_checkable
class Objective(Protocol):
    """A client's training loss and the server's evaluation function (see the module docstring)."""

    def loss(self, params: PyTree, state: PyTree, batch: Batch, rng: jax.Array) -> tuple[jax.Array, tuple[PyTree, dict]]:
        ...

    def apply(self, params: PyTree, state: PyTree, x: jax.Array) -> jax.Array:
        ...


def _labels_for_classes(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Integer labels shaped like logits[..., 0]; (N, 1) labels are squeezed; anything else is a clear error."""
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"Classifier: labels must be integers, got dtype {y.dtype}; for real-valued targets use "
                        "medu_jax.Regressor(apply_fn) (mean squared error) or your own objective")
    if y.ndim == logits.ndim and y.shape[-1] == 1:
        y = y[..., 0]
    if logits.shape[:-1] != y.shape or logits.ndim < 2:
        raise ValueError(f"Classifier: the model's outputs {logits.shape} do not fit labels {y.shape}: it needs "
                         "logits (batch, ..., classes) for labels (batch, ...)")
    return y


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of integer labels (checked: see ``_labels_for_classes``)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, _labels_for_classes(logits, y)).mean()


def mean_squared_error(pred: jax.Array, y: jax.Array) -> jax.Array:
    """Mean squared error in float32. Outputs (N, 1) for targets (N,) are squeezed; any other shape mismatch is
    an error rather than a silent broadcast."""
    if pred.shape != y.shape and pred.shape == (*y.shape, 1):
        pred = pred[..., 0]
    if pred.shape != y.shape:
        raise ValueError(f"mean squared error: the model's outputs {pred.shape} do not match the targets {y.shape}")
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - y.astype(jnp.float32)))


@dataclasses.dataclass(frozen=True)
class Classifier:
    """Softmax cross-entropy of integer labels for a stateless ``apply_fn(params, x) -> logits`` (no metrics).
    The default objective of ``train`` when it is given a plain apply function."""

    apply_fn: Callable[[PyTree, jax.Array], jax.Array]

    def loss(self, params, state, batch, rng):
        x, y = batch
        return cross_entropy(self.apply_fn(params, x), y), (state, {})

    def apply(self, params, state, x):
        return self.apply_fn(params, x)


@dataclasses.dataclass(frozen=True)
class Regressor:
    """``mean_squared_error`` of real targets for a stateless ``apply_fn(params, x)``."""

    apply_fn: Callable[[PyTree, jax.Array], jax.Array]

    def loss(self, params, state, batch, rng):
        x, y = batch
        return mean_squared_error(self.apply_fn(params, x), y), (state, {})

    def apply(self, params, state, x):
        return self.apply_fn(params, x)


LOSSES = {"cross_entropy": cross_entropy, "mse": mean_squared_error}


def _loss_fn(loss: str | Callable) -> Callable:
    if callable(loss):
        return loss
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: give one of {sorted(LOSSES)} or a function (outputs, y) -> scalar")
    return LOSSES[loss]


@dataclasses.dataclass(frozen=True)
class LinenObjective:
    """A flax.linen module: params are variables['params'], the model state every other collection (e.g.
    'batch_stats', updated in training as ``mutable``). Training calls ``module.apply(variables, x, rngs=
    {stream: rng for each of rng_streams}, mutable=[...], **{train_kwarg: True})``; evaluation passes False."""

    module: Any
    loss_name: str | Callable = "cross_entropy"
    train_kwarg: str | None = "train"
    rng_streams: tuple[str, ...] = ("dropout",)

    def _kwargs(self, train: bool) -> dict:
        return {} if self.train_kwarg is None else {self.train_kwarg: train}

    def loss(self, params, state, batch, rng):
        x, y = batch
        rngs = {s: jax.random.fold_in(rng, i) for i, s in enumerate(self.rng_streams)}
        mutable = list(state.keys())
        out = self.module.apply({"params": params, **state}, x, rngs=rngs, mutable=mutable, **self._kwargs(True))
        out, new_state = out if mutable else (out, state)
        return _loss_fn(self.loss_name)(out, y), (dict(new_state), {})

    def apply(self, params, state, x):
        return self.module.apply({"params": params, **state}, x, **self._kwargs(False))


def from_linen(module, variables: PyTree, loss: str | Callable = "cross_entropy", train_kwarg: str | None = "train",
          rng_streams: tuple[str, ...] = ("dropout",)) -> tuple[LinenObjective, PyTree, PyTree]:
    """(objective, params, state) for a flax.linen ``module`` and its ``variables`` (``module.init(...)``).
    ``train_kwarg``: the keyword of the module's call that switches training mode (None: it has none)."""
    variables = dict(variables)
    if "params" not in variables:
        raise ValueError(f"from_linen: variables have no 'params' collection (collections: {sorted(variables)})")
    params = variables.pop("params")
    _loss_fn(loss)
    return LinenObjective(module, loss, train_kwarg, tuple(rng_streams)), params, variables


@dataclasses.dataclass(frozen=True, eq=False)
class NnxObjective:
    """A flax.nnx module split into graph definitions (training and evaluation mode), ``nnx.Param`` leaves
    (params) and the rest without RNG state (the model state: BatchStat and other variables). RNG streams are
    re-seeded from each step's rng, so dropout masks differ per step and client. Compares by identity: build it
    once (``from_nnx(model)``) and reuse it, so jitted rounds do not recompile."""

    train_def: Any
    eval_def: Any
    rng_state: Any
    loss_name: str | Callable = "cross_entropy"

    def _merge(self, graphdef, params, state, rng):
        from flax import nnx as _nnx

        keys = jax.tree.leaves(self.rng_state, is_leaf=lambda v: isinstance(v, _nnx.RngKey))
        fresh = iter(range(len(keys)))

        def reseed(v):
            if isinstance(v, _nnx.RngKey):
                return v.replace(jax.random.fold_in(rng, next(fresh)))
            if isinstance(v, _nnx.RngCount):
                return v.replace(jnp.zeros_like(v.get_value()))
            return v

        is_var = lambda v: isinstance(v, _nnx.Variable)  # noqa: E731
        rngs = jax.tree.map(reseed, self.rng_state, is_leaf=is_var)
        # fresh variables at this trace level: nnx refuses to update a variable made under another transform
        params, state = (jax.tree.map(lambda v: type(v)(v.get_value(), **v.get_metadata()), t, is_leaf=is_var)
                         for t in (params, state))
        return _nnx.merge(graphdef, params, state, rngs)

    def loss(self, params, state, batch, rng):
        from flax import nnx as _nnx

        x, y = batch
        model = self._merge(self.train_def, params, state, rng)
        out = model(x)
        new_state = _nnx.split(model, _nnx.Param, _nnx.RngState, ...)[3]
        return _loss_fn(self.loss_name)(out, y), (new_state, {})

    def apply(self, params, state, x):
        return self._merge(self.eval_def, params, state, jax.random.key(0))(x)


def from_nnx(model, loss: str | Callable = "cross_entropy") -> tuple[NnxObjective, PyTree, PyTree]:
    """(objective, params, state) for a flax.nnx module: ``params`` are its ``nnx.Param`` leaves (what clients
    train and the history codes), ``state`` its other variables except RNG state (BatchNorm statistics)."""
    from flax import nnx as _nnx

    _loss_fn(loss)
    graphdef, params, rngs, state = _nnx.split(model, _nnx.Param, _nnx.RngState, ...)
    train_m = _nnx.merge(graphdef, params, rngs, state)
    train_m.train()
    train_def = _nnx.split(train_m, _nnx.Param, _nnx.RngState, ...)[0]
    eval_m = _nnx.merge(graphdef, params, rngs, state)
    eval_m.eval()
    eval_def = _nnx.split(eval_m, _nnx.Param, _nnx.RngState, ...)[0]
    return NnxObjective(train_def, eval_def, rngs, loss), params, state


def as_objective(model) -> Objective:
    """``model`` itself when it is an objective, ``Classifier(model)`` for a plain apply function."""
    if _is_flax_module(model):
        raise TypeError(f"got a flax module ({type(model).__name__}); wrap it: objective, params, state = "
                        "medu_jax.from_linen(module, variables) or medu_jax.from_nnx(model)")
    if hasattr(model, "loss") and hasattr(model, "apply") and not isinstance(model, type):
        return model
    if not callable(model):
        raise TypeError(f"expected an objective (loss/apply methods) or an apply function (params, x) -> logits, "
                        f"got {type(model).__name__}")
    return Classifier(model)


def _is_flax_module(model) -> bool:
    import sys

    linen_mod, nnx_mod = sys.modules.get("flax.linen"), sys.modules.get("flax.nnx")
    return bool((linen_mod and isinstance(model, linen_mod.Module)) or (nnx_mod and isinstance(model, nnx_mod.Module)))


def state_mean(new_states: PyTree, old: PyTree, w: jax.Array) -> PyTree:
    """The server's model state from the clients' (leading axis K): the ``w``-weighted mean of floating leaves
    (w already normalised; the old state when w sums to 0), the server's own value for the others."""
    has = jnp.sum(w) > 0

    def one(new, o):
        if not jnp.issubdtype(new.dtype, jnp.floating):
            return o
        m = jnp.tensordot(w.astype(jnp.float32), new.astype(jnp.float32), axes=1).astype(new.dtype)
        return jnp.where(has, m, o)

    return jax.tree.map(one, new_states, old)
