"""FedRecover / FedEraser / Crab over the same history object, and the history selections they read."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import medu_jax as mj
from medu_jax import baselines as B
from medu_jax.experiment import ExperimentConfig, run_experiment
from medu_jax.history import Selection

K = 6


@functools.lru_cache(maxsize=None)
def setup():
    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, K, seed=0)
    model = mj.models.MLP((16,), ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.sgd(0.1)
    cfg = mj.FedConfig(rounds=6, local_steps=3, batch_size=16, participation=0.5, seed=5)
    comps = {"f32": mj.identity(), "every2": mj.identity(), "crab": mj.medu(0.5, 0.1, "A2", 3)}
    sels = {"every2": Selection(every=2), "crab": Selection(user_fraction=0.5, checkpoints=True)}
    run = mj.train(model.apply, tx, params0, clients, cfg, comps, selections=sels)
    return ds, clients, model, params0, tx, cfg, run


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_selections_keep_the_rounds_users_and_checkpoints_they_say():
    ds, clients, model, params0, tx, cfg, run = setup()
    assert run.histories["f32"].round_ids == list(range(6))
    assert run.histories["every2"].round_ids == [0, 2, 4]
    crab = run.histories["crab"]
    for i, rec in enumerate(crab.records):
        part = np.unpackbits(rec["participants"])[:K].astype(bool)
        act = np.unpackbits(rec["active"])[:K].astype(bool)
        assert part.sum() == 3 and act.sum() == 2 and not (act & ~part).any()  # ceil(0.5 * 3) users kept
        # the checkpoint is the global model before that round: training for i rounds gives it
        upto = mj.train(model.apply, tx, params0, clients, mj.FedConfig(**{**cfg.__dict__, "rounds": max(i, 1)}))
        want = params0 if i == 0 else upto.params
        assert same(crab.checkpoint(i), want)
    with pytest.raises(ValueError, match="no model checkpoint"):
        run.histories["f32"].checkpoint(0)
    with pytest.raises(ValueError, match="every must be >= 1"):
        Selection(every=0)
    with pytest.raises(ValueError, match="user_fraction"):
        Selection(user_fraction=0.0)


def test_fedrecover_with_every_round_exact_is_retraining():
    ds, clients, model, params0, tx, cfg, run = setup()
    remove = [1, 4]
    w = B.fedrecover(run.histories["f32"], remove, model.apply, tx, clients, cfg, warmup=cfg.rounds, tune=0)
    ref = mj.train(model.apply, tx, params0, clients, cfg, exclude=remove).params
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_calibrated_step_keeps_stored_norms_and_calibrated_directions():
    ds, clients, model, params0, tx, cfg, run = setup()
    k = K
    excl = jnp.zeros((k,), bool).at[0].set(True)
    ones = jnp.ones((k,))
    decoded = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), (k, *p.shape)), params0)
    valid = jnp.ones((k,), bool)
    weights = jnp.asarray(clients.n, jnp.float32)
    cal_cfg = mj.FedConfig(**{**cfg.__dict__, "local_steps": 1})
    w = B._calibrated_step(model.apply, tx, cal_cfg, params0, clients, 2, excl, ones, decoded, valid, weights, 1.0)
    _, cal, active, _ = mj.fed_round(model.apply, tx, cal_cfg, params0, clients, 2, excl, ones)
    def flat(t, rows=k):
        return np.concatenate([np.asarray(x, np.float64).reshape(rows, -1) for x in jax.tree.leaves(t)], 1)

    d, c = flat(decoded), flat(cal)
    m = np.asarray(active) & ~np.asarray(excl)
    p = np.asarray(weights, np.float64) * m
    want = (p / p.sum()) @ (c * (np.linalg.norm(d, axis=1) / np.maximum(np.linalg.norm(c, axis=1), 1e-30))[:, None])
    got = flat(jax.tree.map(lambda a, b: a - b, w, params0), 1)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_crab_rolls_back_to_the_first_round_a_removed_user_joined():
    ds, clients, model, params0, tx, cfg, run = setup()
    crab = run.histories["crab"]
    for u in range(K):
        parts = [np.unpackbits(r["participants"])[u] for r in crab.records]
        want = parts.index(1) if 1 in parts else crab.num_rounds
        assert B.influence_start(crab, [u]) == want
    w = B.crab(crab, [0], model.apply, tx, clients, cfg)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(w))
    with pytest.raises(ValueError, match="remove set is empty"):
        B.crab(crab, [], model.apply, tx, clients, cfg)
    with pytest.raises(ValueError, match="fedrecover: the remove set is empty"):
        B.fedrecover(run.histories["f32"], [], model.apply, tx, clients, cfg)
    with pytest.raises(ValueError, match="cal_steps"):
        B.federaser(run.histories["every2"], [1], model.apply, tx, clients, cfg, cal_steps=0)
    with pytest.raises(ValueError, match="unknown user ids"):
        B.federaser(run.histories["every2"], [K + 3], model.apply, tx, clients, cfg)


def test_every_method_times_every_history_in_one_table(tmp_path):
    cfg = ExperimentConfig(num_users=6, num_malicious=2, rounds=4, local_steps=2, batch_size=16, hidden=(16,),
                           tune_rounds=1, methods=("float32", "medu"), unlearn_methods=tuple(
                               ["naive", "corrected", "fedrecover", "federaser", "crab"]), store=str(tmp_path / "s"))
    res = run_experiment(cfg, progress=False)
    labels = [r["method"] for r in res["rows"][2:]]
    assert labels == [f"{u} / {h}" for u in cfg.unlearn_methods for h in cfg.methods]
    by = {r["method"]: r for r in res["rows"]}
    assert by["federaser / float32"]["bytes"] < by["naive / float32"]["bytes"]  # every 2nd round only
    assert by["naive / medu"]["ratio"] > 5
    assert (tmp_path / "s" / "medu" / "zarr.json").exists()
    with pytest.raises(ValueError, match="unknown unlearn_methods"):
        ExperimentConfig(unlearn_methods=("naive", "magic"))
