"""Distances between parameter pytrees, on the host in float64: shared by training (Crab's informative rounds)
and evaluation (``metrics``), so it sits at the bottom of the import graph."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def tree_norm(a: PyTree) -> float:
    """||a|| over all leaves (float64 accumulation on the host)."""
    return sum(float(np.sum(np.square(np.asarray(x, np.float64)))) for x in jax.tree.leaves(a)) ** 0.5


def tree_distance(a: PyTree, b: PyTree) -> float:
    """||a - b|| over all leaves (float64 accumulation on the host)."""
    sq = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return sq**0.5


def relative_distance(w: PyTree, w_ref: PyTree) -> float:
    """||w - w_ref|| / ||w_ref||."""
    return tree_distance(w, w_ref) / max(tree_norm(w_ref), 1e-30)
