"""S3T: slice orders, exact prefix fallback, the deletion-rate simulation against SISA's closed form."""

import itertools

import jax
import numpy as np
import pytest

from medu_jax import s3t
from medu_jax.s3t_experiment import S3TConfig, format_s3t_table, run_s3t


def test_orders_are_even_cyclic_rotations():
    o = s3t.slice_orders(6, 3)
    assert o.tolist() == [[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 0, 1], [4, 5, 0, 1, 2, 3]]
    with pytest.raises(ValueError, match="num_orders"):
        s3t.slice_orders(3, 4)


def test_surviving_prefix_matches_brute_force():
    orders = s3t.slice_orders(5, 3)
    for r in range(6):
        for deleted in itertools.combinations(range(5), r):
            b, n = s3t.surviving_prefix(orders, set(deleted))
            best = max(next((i for i, j in enumerate(o) if j in deleted), 5) for o in orders)
            assert n == best and not set(orders[b][:n].tolist()) & set(deleted)


def test_sisa_absorbs_the_geometric_expectation_and_orders_absorb_more():
    key = jax.random.key(0)
    # one order: a shard breaks when its first slice is hit; the count before that is geometric, mean L - 1
    sisa = s3t.deletions_absorbed(3, 4, 1, key, trials=300)
    assert abs(sisa - 3.0) < 0.8
    more = [s3t.deletions_absorbed(3, 4, b, key, trials=300) for b in (2, 4)]
    assert sisa < more[0] < more[1]


def test_served_checkpoints_never_saw_a_deleted_sample():
    import flax.linen as nn
    import jax.numpy as jnp
    import optax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(240, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    head = nn.Dense(2)
    head0 = head.init(jax.random.key(0), jnp.zeros((1, 8)))
    model = s3t.train_s3t(lambda a: a, head.apply, head0, optax.sgd(0.1), x, y, 3, 4, 2, jax.random.key(1), 5)
    assert len(model.checkpoints) == 3 and len(model.checkpoints[0]) == 2 and len(model.checkpoints[0][0]) == 4
    gone = [5, 77, 150]
    deleted, served = s3t.delete(model, gone)
    for s, (b, n) in enumerate(served):
        seen = set(np.concatenate([model.slices[s][j] for j in model.orders[b][:n]]).tolist()) if n else set()
        assert not seen & set(gone)
    scores = s3t.predict(model, lambda a: a, head.apply, x, served)
    assert scores.shape == (240, 2)
    with pytest.raises(ValueError, match="retrain"):
        s3t.predict(model, lambda a: a, head.apply, x, [(0, 0)] * 3)


def test_s3t_table():
    res = run_s3t(S3TConfig(shards=2, slices=2, orders=2, steps_per_slice=5, deletions=2))
    assert len(res["rows"]) == 3 and set(res["absorbed"]) == {1, 2}
    assert "(SISA)" in format_s3t_table(res)
    with pytest.raises(ValueError, match="orders must be"):
        S3TConfig(slices=2, orders=3)
