"""Small flax models for the demos. Any flax model works: medu_jax only needs apply_fn(params, x)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """A ReLU multilayer perceptron on flattened inputs."""

    hidden: Sequence[int] = (64,)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = nn.relu(nn.Dense(h)(x))
        return nn.Dense(self.num_classes)(x)
