"""Small flax models for the demos. Any flax model works: medu_jax only needs apply_fn(params, x)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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



class Conv3x3(nn.Module):
    """A 3x3 convolution with SAME zero padding and stride 1, computed as one matmul over the nine shifted copies
    of the input (im2col). Same kernel (3, 3, C, F) and result as ``nn.Conv(F, (3, 3), padding="SAME")``; vmapped
    over clients it becomes a batched matmul, which XLA's CPU backend runs several times faster than the grouped
    convolution a vmapped ``nn.Conv`` becomes."""

    features: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        h, w = x.shape[1], x.shape[2]
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        patches = jnp.concatenate([xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)], axis=-1)
        return patches @ kernel.reshape(-1, self.features) + bias


class CNN(nn.Module):
    """A small convolutional net on images: per entry of ``features`` a 3x3 convolution (SAME padding, see
    ``Conv3x3``), ReLU and 2x2 average pooling, then a dense layer to the classes. Takes (N, H, W, C) images, or
    (N, H, W) ones (a channel axis is added): 8x8x1 digits (8 -> 4 -> 2; 1,898 parameters with the default
    (8, 16)) and 28x28x1 MNIST (28 -> 14 -> 7; 9,098 parameters) with the same code."""

    features: Sequence[int] = (8, 16)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"CNN takes images (N, H, W) or (N, H, W, C), got shape {x.shape}: load the data with "
                             "flatten=False")
        for f in self.features:
            x = nn.avg_pool(nn.relu(Conv3x3(f)(x)), (2, 2), strides=(2, 2), padding="SAME")
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))
