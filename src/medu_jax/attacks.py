"""Malicious users: label flipping and backdoor triggers (data poisoning), scaled or sign-flipped updates.

The attacks rewrite the malicious clients' data, or return the per-client update scale that FedAvg applies.
Which users are malicious is known to the experiment only: nothing here is visible to the server.
"""

from __future__ import annotations

from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.fedavg import ClientData


def add_trigger(x: np.ndarray | jax.Array, pixels: Iterable[int], value: float) -> np.ndarray:
    """Stamps the trigger on a batch of samples (first axis; one vector sample if 1-D): sets feature indices
    ``pixels`` of each flattened sample to ``value`` (vectors and images alike, e.g. (N, 64) or (N, 8, 8, 1))."""
    x = np.array(x, np.float32, copy=True)
    flat = x.reshape(x.shape[0], -1) if x.ndim > 1 else x
    flat[..., list(pixels)] = value
    return flat.reshape(x.shape)


def default_trigger(num_features: int) -> tuple[list[int], float]:
    """A small bright patch: the last 4 features for vectors, the bottom-right 2x2 corner for 8x8 digits."""
    if num_features == 64:
        return [54, 55, 62, 63], 1.0
    return list(range(num_features - 4, num_features)), 3.0


def backdoor(
    data: ClientData, users: Iterable[int], target: int, fraction: float = 0.5,
    pixels: Iterable[int] | None = None, value: float | None = None, seed: int = 0,
) -> ClientData:
    """Poisons ``fraction`` of each malicious client's samples: trigger stamped, label set to ``target``."""
    x, y, n = np.array(data.x), np.array(data.y), np.asarray(data.n)
    if pixels is None:
        pixels, default_value = default_trigger(int(np.prod(x.shape[2:])))
        value = default_value if value is None else value
    for u in users:
        k = jax.random.fold_in(jax.random.key(seed), int(u))
        m = int(round(fraction * n[u]))
        idx = np.asarray(jax.random.permutation(k, int(n[u])))[:m]
        x[u, idx] = add_trigger(x[u, idx], pixels, value)
        y[u, idx] = target
    return ClientData(jnp.asarray(x), jnp.asarray(y), data.n)


def label_flip(data: ClientData, users: Iterable[int], num_classes: int) -> ClientData:
    """Flips every label of the malicious clients: y -> C - 1 - y."""
    y = np.array(data.y)
    for u in users:
        y[u] = num_classes - 1 - y[u]
    return ClientData(data.x, jnp.asarray(y), data.n)


def targeted_flip(data: ClientData, users: Iterable[int], source: int, target: int) -> ClientData:
    """Targeted label flip: the malicious clients relabel every sample of class ``source`` as ``target``
    (the other classes keep their labels, so clean accuracy barely shows the attack; see
    ``metrics.flip_success``)."""
    if source == target:
        raise ValueError(f"targeted_flip: source and target must differ, got {source} -> {target}")
    y = np.array(data.y)
    for u in users:
        n = int(np.asarray(data.n)[u])
        row = y[u, :n]
        row[row == source] = target
    return ClientData(data.x, jnp.asarray(y), data.n)


def update_scale(num_clients: int, users: Iterable[int], factor: float) -> np.ndarray:
    """Per-client update multipliers: ``factor`` for malicious users (e.g. 10 scaled, -1 sign-flip), 1 else."""
    s = np.ones((num_clients,), np.float32)
    s[list(users)] = factor
    return s
