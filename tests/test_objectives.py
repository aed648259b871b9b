"""Bring your own model, loss, optimizer and data (issue 17): objectives (linen, nnx, regression, custom),
per-step rngs, model state, server optimizers, the round-by-round API, traced seeds, packed client data."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, strategies as st

import medu_jax as mj
from medu_jax import data as D
from medu_jax import fedavg, objectives

K = 6


@functools.lru_cache(maxsize=None)
def digits():
    ds = D.load_digits()
    return ds, D.make_clients(ds, K, seed=0, alpha=0.5)


def cfg_(**kw):
    return mj.FedConfig(**{"rounds": 4, "local_steps": 3, "batch_size": 16, "seed": 1, **kw})


def same_bits(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


class Noise:
    """A custom objective whose gradient is the step's rng made visible: loss = -<params, N(rng)>, so one SGD
    step of lr 1 adds N(rng) to the params."""

    def loss(self, params, state, batch, rng):
        return -jnp.vdot(params["w"], jax.random.normal(rng, params["w"].shape)), (state, {})

    def apply(self, params, state, x):
        return x @ params["w"]


NOISE = Noise()


def test_every_step_and_client_gets_its_own_rng_derived_as_documented():
    ds, clients = digits()
    cfg = cfg_(rounds=1, local_steps=3)
    p0 = {"w": jnp.zeros((64, 10))}
    r = mj.fed_round(NOISE, optax.sgd(1.0), cfg, p0, clients, 5, jnp.zeros((K,), bool), jnp.ones((K,)))
    ck = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 5), 1)
    for k in range(K):
        step_key = jax.random.fold_in(jax.random.fold_in(ck, k), 1)
        want = sum(np.asarray(jax.random.normal(jax.random.fold_in(step_key, s), (64, 10)), np.float64)
                   for s in range(cfg.local_steps))
        np.testing.assert_allclose(np.asarray(r.updates["w"][k]), want, rtol=1e-5, atol=1e-5)
    ups = np.asarray(r.updates["w"]).reshape(K, -1)
    assert len({u.tobytes() for u in ups}) == K  # no two clients share their randomness


class BNDrop(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(16)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.8)(x)
        x = nn.Dropout(0.5, deterministic=not train)(nn.relu(x))
        return nn.Dense(10)(x)


def test_linen_batchnorm_and_dropout():
    ds, clients = digits()
    module = BNDrop()
    obj, params, state = mj.from_linen(module, module.init(jax.random.key(0), jnp.zeros((2, 64)), train=False))
    x, y = jnp.asarray(ds.x_train[:32]), jnp.asarray(ds.y_train[:32])
    l1, (s1, _) = obj.loss(params, state, (x, y), jax.random.key(1))
    l2, _ = obj.loss(params, state, (x, y), jax.random.key(2))
    l1b, _ = obj.loss(params, state, (x, y), jax.random.key(1))
    assert float(l1) != float(l2) and float(l1) == float(l1b)  # the rng reaches the dropout stream
    assert not same_bits(s1, state)  # training mode updates the batch statistics
    # evaluation uses the running statistics, no dropout: linen's own call with train=False
    want = module.apply({"params": params, **state}, x, train=False)
    np.testing.assert_array_equal(np.asarray(obj.apply(params, state, x)), np.asarray(want))
    cfg = cfg_(rounds=6, local_steps=4)
    r = mj.train(obj, optax.sgd(0.1), params, clients, cfg, {"m": mj.medu()}, model_state=state)
    mean0 = state["batch_stats"]["BatchNorm_0"]["mean"]
    assert not np.allclose(np.asarray(r.model_state["batch_stats"]["BatchNorm_0"]["mean"]), np.asarray(mean0))
    trained = mj.metrics.accuracy(obj, r.params, ds.x_test, ds.y_test, r.model_state)
    stale = mj.metrics.accuracy(obj, r.params, ds.x_test, ds.y_test, state)
    assert trained > 0.5 and trained > stale + 0.1
    # the batch statistics are never coded: the history's rows are the params' shape
    assert r.histories["m"].num_params == sum(int(np.size(a)) for a in jax.tree.leaves(params))
    rec = mj.unlearn(r.histories["m"], [1], apply_fn=obj, tx=optax.sgd(0.1), data=clients, cfg=cfg)
    assert rec.model_state is not None and mj.metrics.accuracy(obj, rec.params, ds.x_test, ds.y_test,
                                                               rec.model_state) > 0.4
    re = mj.recalibrate_state(obj, r.params, state, clients, cfg)
    assert mj.metrics.accuracy(obj, r.params, ds.x_test, ds.y_test, re) > stale + 0.1


def test_nnx_model_trains_and_unlearns():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1, self.bn = nnx.Linear(64, 16, rngs=rngs), nnx.BatchNorm(16, rngs=rngs)
            self.drop, self.l2 = nnx.Dropout(0.3, rngs=rngs), nnx.Linear(16, 10, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))

    ds, clients = digits()
    net = Net(nnx.Rngs(0, dropout=1))
    with pytest.raises(TypeError, match="from_nnx"):
        mj.train(net, optax.sgd(0.1), None, clients, cfg_())
    obj, params, state = mj.from_nnx(net)
    cfg = cfg_(rounds=6, local_steps=4)
    r = mj.train(obj, optax.sgd(0.1), params, clients, cfg, {"m": mj.medu()}, model_state=state)
    assert mj.metrics.accuracy(obj, r.params, ds.x_test, ds.y_test, r.model_state) > 0.5
    assert not same_bits(r.model_state, state)
    rec = mj.unlearn(r.histories["m"], [2], apply_fn=obj, tx=optax.sgd(0.1), data=clients, cfg=cfg)
    assert np.isfinite(mj.metrics.accuracy(obj, rec.params, ds.x_test, ds.y_test, rec.model_state))


def test_regression_loss_and_label_errors():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = x @ np.arange(5, dtype=np.float32) + 0.25
    clients = D.from_clients([(x[i::3], y[i::3]) for i in range(3)])
    assert clients.y.dtype == jnp.float32  # real targets are not cast to integers
    dense = nn.Dense(1)
    p0 = dense.init(jax.random.key(0), x[:1])
    reg = mj.Regressor(dense.apply)
    r = mj.train(reg, optax.sgd(0.05), p0, clients, cfg_(rounds=15, local_steps=5, batch_size=20))
    mse0 = mj.metrics.mean_squared_error(reg, p0, x, y)
    mse = mj.metrics.mean_squared_error(reg, r.params, x, y)
    assert mse < 0.01 * mse0 and r.log["loss"][-1] < r.log["loss"][0]
    with pytest.raises(TypeError, match="Regressor"):  # a classifier refuses real targets
        mj.train(dense.apply, optax.sgd(0.05), p0, clients, cfg_(rounds=1))
    with pytest.raises(ValueError, match="do not match"):
        bad = D.from_clients([(x[:10], np.stack([y[:10]] * 2, 1))])
        mj.train(reg, optax.sgd(0.05), p0, bad, cfg_(rounds=1))


@pytest.mark.parametrize("name,server_tx", [
    ("fedavgm", optax.sgd(1.0, momentum=0.9)),
    ("fedadam", optax.adam(0.02, eps=1e-3)),
])
def test_server_optimizer_replay_with_nobody_removed_equals_training(name, server_tx):
    import dataclasses

    ds, clients = digits()
    model = mj.models.MLP(hidden=(16,))
    p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    cfg = cfg_(rounds=5)
    r = mj.train(model.apply, optax.sgd(0.1), p0, clients, cfg, {"f": mj.identity()}, server_tx=server_tx)
    assert r.histories["f"].server_tx is server_tx
    assert mj.metrics.relative_distance(mj.replay(r.histories["f"]), r.params) < 1e-5
    as_fedavg = mj.replay(dataclasses.replace(r.histories["f"], server_tx=None))  # the same rows, FedAvg's step
    assert mj.metrics.relative_distance(as_fedavg, r.params) > 1e-3  # so the server optimizer did something
    # exact rounds through the same server optimizer: fedrecover with every round exact is retraining
    rec = mj.fedrecover(r.histories["f"], [1], model.apply, optax.sgd(0.1), clients, cfg, warmup=cfg.rounds, tune=0)
    retrain = mj.train(model.apply, optax.sgd(0.1), p0, clients, cfg, exclude=[1], server_tx=server_tx)
    assert mj.metrics.relative_distance(rec.params, retrain.params) < 1e-5


@given(st.integers(1, 4), st.floats(1e-3, 1.0), st.floats(0.0, 0.95), st.sampled_from([0.0, 1e-30, 1.0, 1e20]))
def test_server_update_matches_the_fedopt_formulas(rounds, lr, beta, scale):
    rng = np.random.default_rng(rounds)
    means = [{"a": rng.normal(size=(3,)).astype(np.float32) * scale, "b": rng.normal(size=(2, 5)).astype(np.float32)}
             for _ in range(rounds)]
    p0 = {"a": np.ones(3, np.float32), "b": np.zeros((2, 5), np.float32)}
    # FedAvgM: v = beta v + mean; w += lr v (the pseudo-gradient is -mean)
    tx = optax.sgd(lr, momentum=beta)
    p, opt = p0, tx.init(p0)
    v = {k: np.zeros_like(x, np.float64) for k, x in p0.items()}
    ref = {k: x.astype(np.float64) for k, x in p0.items()}
    for m in means:
        p, opt = mj.server_update(tx, p, opt, m, 1.0)
        for k in ref:
            v[k] = beta * v[k] + m[k]
            ref[k] = ref[k] + lr * v[k]
    for k in ref:
        np.testing.assert_allclose(np.asarray(p[k], np.float64), ref[k], rtol=1e-4, atol=1e-6 * max(scale, 1.0))
    # FedAvg: w + server_lr * mean
    p, _ = mj.server_update(None, p0, (), means[0], lr)
    np.testing.assert_allclose(np.asarray(p["b"]), p0["b"] + np.float32(lr) * means[0]["b"], rtol=1e-6)


@given(st.lists(st.floats(0.0, 5.0), min_size=1, max_size=5), st.sampled_from([(3,), (1,), (2, 7)]))
def test_state_mean_is_the_weighted_mean_of_float_leaves(weights, shape):
    k = len(weights)
    rng = np.random.default_rng(k)
    new = {"f": rng.normal(size=(k, *shape)).astype(np.float32), "i": np.arange(k, dtype=np.int32)}
    old = {"f": np.full(shape, 7.0, np.float32), "i": np.int32(42)}
    w = np.asarray(weights, np.float64)
    wn = w / w.sum() if w.sum() > 0 else w
    got = objectives.state_mean(jax.tree.map(jnp.asarray, new), jax.tree.map(jnp.asarray, old), jnp.asarray(wn, jnp.float32))
    want = np.tensordot(wn, new["f"].astype(np.float64), 1) if w.sum() > 0 else old["f"]
    np.testing.assert_allclose(np.asarray(got["f"]), want, rtol=1e-5, atol=1e-6)
    assert int(got["i"]) == 42  # counters keep the server's value


def test_round_by_round_equals_one_call():
    ds, clients = digits()
    model = mj.models.MLP(hidden=(16,))
    p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx, stx = optax.sgd(0.1), optax.sgd(0.5, momentum=0.5)
    one = mj.train(model.apply, tx, p0, clients, cfg_(rounds=5), {"m": mj.medu(correction=False)}, server_tx=stx)
    first = mj.train(model.apply, tx, p0, clients, cfg_(rounds=2), {"m": mj.medu(correction=False)}, server_tx=stx)
    rest = mj.train(model.apply, tx, p0, clients, cfg_(rounds=5), {"m": mj.medu(correction=False)}, server_tx=stx, start=first)
    assert same_bits(one.params, rest.params) and first.histories["m"].num_rounds == 2
    assert [r["round"][0] for r in rest.histories["m"].records] == list(range(5))
    assert same_bits(mj.replay(one.histories["m"]), mj.replay(rest.histories["m"]))
    assert one.log["loss"] == rest.log["loss"]
    # the functional API: a ServerState advanced one round at a time
    server = mj.init_server(p0, cfg_(rounds=5), server_tx=stx)
    for _ in range(5):
        server, _, out = mj.fed_rounds(model.apply, tx, cfg_(rounds=5), server, clients, server_tx=stx)
    assert same_bits(server.params, one.params) and int(server.round) == 5
    with pytest.raises(ValueError, match="seed"):
        mj.train(model.apply, tx, p0, clients, cfg_(rounds=5, seed=9), {"m": mj.medu(correction=False)}, server_tx=stx, start=first)


def test_a_new_seed_or_server_lr_does_not_recompile():
    ds, clients = digits()
    model = mj.models.MLP(hidden=(16,))
    p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.sgd(0.1)
    a = mj.train(model.apply, tx, p0, clients, cfg_(seed=3), {"m": mj.medu()})
    size = fedavg._fed_rounds._cache_size()
    b = mj.train(model.apply, tx, p0, clients, cfg_(seed=4, server_lr=0.5), {"m": mj.medu()})
    c = mj.train(model.apply, tx, p0, clients, cfg_(seed=3), {"m": mj.medu()})
    assert fedavg._fed_rounds._cache_size() == size
    assert not same_bits(a.params, b.params) and same_bits(a.params, c.params)


def test_per_client_dict_data_without_padding():
    ds = D.load_digits()
    shards = D.partition_dirichlet(ds.y_train, 20, 0.3, jax.random.key(0))
    padded = D.to_client_data(ds.x_train, ds.y_train, shards)
    packed = D.from_clients({f"user{i}": (ds.x_train[s], ds.y_train[s]) for i, s in enumerate(shards)})
    assert padded.padding_overhead > 1.25 and packed.padding_overhead <= 1.25
    assert packed.x.nbytes + packed.y.nbytes <= 1.25 * (ds.x_train.nbytes + ds.y_train.nbytes)
    for k in (0, 7, 19):
        x, y = packed.client(k)
        np.testing.assert_array_equal(np.asarray(x), ds.x_train[shards[k]])
    assert same_bits(packed.to_padded(), padded)
    model = mj.models.MLP(hidden=(16,))
    p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    cfg = cfg_(rounds=3, participation=0.6)
    a = mj.train(model.apply, optax.sgd(0.1), p0, padded, cfg, {"m": mj.medu()})
    b = mj.train(model.apply, optax.sgd(0.1), p0, packed, cfg, {"m": mj.medu()})
    assert same_bits(a.params, b.params)  # the same samples give the same bits in either layout
    assert same_bits(a.histories["m"].records[-1], b.histories["m"].records[-1])
    with pytest.raises(ValueError, match="differ in shape"):
        D.from_clients([(np.zeros((3, 4)), np.zeros(3, int)), (np.zeros((3, 5)), np.zeros(3, int))])
    with pytest.raises(ValueError, match="samples"):
        D.from_clients([(np.zeros((3, 4)), np.zeros(2, int))])
    c = D.make_clients((ds.x_train, ds.y_train), 5)  # a plain (x, y) tuple works too
    assert c.num_clients == 5 and int(np.sum(np.asarray(c.n))) == len(ds.y_train)
