"""Distances between parameter pytrees, on the host in float64: shared by training (Crab's informative rounds)
and evaluation (``metrics``), so it sits at the bottom of the import graph."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

PyTree = Any


def tree_distance(a: PyTree, b: PyTree) -> float:
    """||a - b|| over all leaves (float64 accumulation on the host)."""
    sq = sum(float(np.sum((np.asarray(x, np.float64) - np.asarray(y, np.float64)) ** 2)) for x, y in
             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return sq**0.5


def relative_distance(w: PyTree, w_ref: PyTree) -> float:
    """||w - w_ref|| / ||w_ref||."""
    zero = jax.tree.map(np.zeros_like, w_ref)
    return tree_distance(w, w_ref) / max(tree_distance(w_ref, zero), 1e-30)
