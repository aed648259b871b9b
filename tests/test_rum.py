"""RUM: proxies against a float64 reference, memorization groups, holdout proxy, MIA, NegGrad+."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import medu_jax as mj
from medu_jax import rum as R
from medu_jax.rum_experiment import RUMConfig, format_rum_table, run_rum


def setup(hidden=(16,)):
    ds = mj.data.load_digits(0)
    model = mj.models.MLP(hidden, 10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    return ds, model, params


def test_proxies_match_a_float64_reference_when_the_model_is_fixed():
    ds, model, params = setup()
    x, y = ds.x_train[:320], ds.y_train[:320]
    # lr 0: the model never moves, so every epoch's proxies are those of the initial model
    _, prox = R.train_with_proxies(model.apply, optax.sgd(0.0), params, x, y, epochs=2, batch_size=32,
                                   key=jax.random.key(1))
    logits = np.asarray(model.apply(params, jnp.asarray(x)), np.float64)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(prox.confidence, p[np.arange(len(y)), y], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(prox.max_confidence, p.max(1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(prox.entropy, -(p * np.log(p)).sum(1), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(prox.binary_accuracy, (p.argmax(1) == y).astype(float))
    with pytest.raises(ValueError, match="unknown proxy"):
        prox.memorization("loss")


def test_groups_partition_the_forget_set_in_memorization_order():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=100)
    forget = rng.choice(100, 31, replace=False)
    groups = R.split_by_memorization(scores, forget)
    assert sorted(np.concatenate(groups).tolist()) == sorted(forget.tolist())
    assert [len(g) for g in groups] == [11, 10, 10]
    for lo, hi in zip(groups, groups[1:]):
        assert scores[lo].max() <= scores[hi].min()


def test_holdout_proxy_scores_mislabelled_examples_as_memorized():
    ds, model, params = setup((32,))
    x, y = ds.x_train[:600], np.array(ds.y_train[:600])
    bad = np.arange(0, 600, 10)
    y = R.relabel(y, bad, 10, jax.random.key(3))
    score = R.holdout_memorization(model.apply, optax.sgd(0.1, momentum=0.9), params, x, y, epochs=30,
                                   batch_size=32, key=jax.random.key(4))
    clean = np.setdiff1d(np.arange(600), bad)
    assert score[bad].mean() > score[clean].mean() + 0.1


def test_mia_accuracy_matches_a_brute_force_threshold_search():
    ds, model, params = setup()
    xm, ym, xn, yn = ds.x_train[:50], ds.y_train[:50], ds.x_test[:50], ds.y_test[:50]
    got = R.mia_accuracy(model.apply, params, xm, ym, xn, yn)

    def conf(x, y):
        p = jax.nn.softmax(model.apply(params, jnp.asarray(x)))
        return np.asarray(p)[np.arange(len(y)), y]

    a, b = conf(xm, ym), conf(xn, yn)
    best = max(((a >= t).sum() + (b < t).sum()) / 100 for t in np.concatenate([a, b, [np.inf]]))
    assert got == pytest.approx(max(best, 0.5))


def test_neggrad_plus_directions():
    ds, model, params = setup()
    x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
    xf, yf, xr, yr = x[:64], y[:64], x[64:], y[64:]
    loss = lambda p, a, b: float(optax.softmax_cross_entropy_with_integer_labels(model.apply(p, a), b).mean())  # noqa
    tx = optax.sgd(0.05)
    up = R.neggrad_plus(model.apply, tx, params, xf, yf, xr, yr, jax.random.key(0), 20, 32, 0.0)
    down = R.neggrad_plus(model.apply, tx, params, xf, yf, xr, yr, jax.random.key(0), 20, 32, 1.0)
    assert loss(up, xf, yf) > loss(params, xf, yf)
    assert loss(down, xr, yr) < loss(params, xr, yr)


def test_rum_table():
    res = run_rum(RUMConfig(epochs=2, steps=3))
    names = [r["method"] for r in res["rows"]]
    assert names[:2] == ["original (no unlearning)", "retrain without the forget set"] and len(names) == 6
    assert res["rows"][1]["tow"] == 1.0 and sum(res["groups"]) == res["forget"]
    assert "RUM: NegGrad+ low -> mid -> high (confidence)" in format_rum_table(res)
    with pytest.raises(ValueError, match="unknown proxy"):
        RUMConfig(proxy="loss")
