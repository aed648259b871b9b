"""Wall-clock timing of jax calls for the experiments' tables and the benchmarks (waits for the device)."""

from __future__ import annotations

import time
from typing import Any, Callable

import jax


def time_once(fn: Callable, *args) -> tuple[Any, float]:
    """(result, wall seconds) of one call, waiting for the device."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def warm_timed(fn: Callable, repeats: int) -> tuple[Any, float]:
    """(result, best seconds of ``repeats`` calls) after one warm-up (compiling) call."""
    jax.block_until_ready(fn())
    best, out = float("inf"), None
    for _ in range(repeats):
        out, t = time_once(fn)
        best = min(best, t)
    return out, best


def timed_against(fn: Callable, reference: Callable, *args, repeats: int = 5) -> tuple[Any, float, float]:
    """(result, best seconds of fn, best seconds of reference) from warm runs of the two interleaved, so a
    drift in machine speed hits both sides of the ratio alike."""
    out = jax.block_until_ready(fn(*args))
    best, best_ref = float("inf"), float("inf")
    for _ in range(repeats):
        best_ref = min(best_ref, time_once(reference)[1])
        best = min(best, time_once(fn, *args)[1])
    return out, best, best_ref
