"""Crab over a selective history, the history selections it reads, and every method in one experiment table."""

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
    comps = {"f32": mj.identity(), "every2": mj.identity(), "crab": mj.medu(0.5, 0.1, "A2", 3, correction=False)}
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


def test_crab_rolls_back_to_the_first_round_a_removed_user_joined():
    ds, clients, model, params0, tx, cfg, run = setup()
    crab = run.histories["crab"]
    for u in range(K):
        parts = [np.unpackbits(r["participants"])[u] for r in crab.records]
        want = parts.index(1) if 1 in parts else crab.num_rounds
        assert B.influence_start(crab, [u]) == want
    rec = B.crab(crab, [0], model.apply, tx, clients, cfg)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(rec.params))
    # calibration from the rollback point on: cal_steps local steps per participating remaining client
    assert rec.client_steps > 0 and rec.client_steps % 2 == 0
    with pytest.raises(ValueError, match="remove set is empty"):
        B.crab(crab, [], model.apply, tx, clients, cfg)
    with pytest.raises(ValueError, match="cal_steps"):
        B.crab(crab, [1], model.apply, tx, clients, cfg, cal_steps=0)


def test_every_method_times_every_history_in_one_table(tmp_path):
    cfg = ExperimentConfig(num_users=6, num_malicious=2, rounds=4, local_steps=2, batch_size=16, hidden=(16,),
                           tune_rounds=1, methods=("float32", "medu"), unlearn_methods=tuple(
                               ["naive", "corrected", "fedrecover", "adaptive", "federaser", "crab"]),
                           store=str(tmp_path / "s"), fedrecover_warmup=1, fedrecover_tune=1)
    res = run_experiment(cfg, progress=False)
    labels = [r["method"] for r in res["rows"][2:]]
    assert labels == [f"{u} / {h}" for u in cfg.unlearn_methods for h in cfg.methods]
    by = {r["method"]: r for r in res["rows"]}
    assert by["crab / float32"]["bytes"] < by["naive / float32"]["bytes"]  # selected rounds and users only
    assert by["fedrecover / float32"]["bytes"] == by["naive / float32"]["bytes"]  # the same full history
    assert by["naive / medu"]["ratio"] > 5
    assert (tmp_path / "s" / "medu" / "zarr.json").exists()
    with pytest.raises(ValueError, match="unknown unlearn_methods"):
        ExperimentConfig(unlearn_methods=("naive", "magic"))
