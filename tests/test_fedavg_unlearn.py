"""FedAvg, history and replay: exactness against float64 references, determinism, bad input."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import medu_jax as mj
from medu_jax import data as D
from medu_jax.fedavg import batch_indices, fed_round, local_update, mulhi32, pairwise_sum
from medu_jax.models import MLP
from medu_jax.unlearn import lbfgs_hvp

unlearn_module = importlib.import_module("medu_jax.unlearn")

K = 6


@functools.lru_cache(maxsize=None)
def setup():
    ds = D.load_digits(0)
    clients = D.make_clients(ds, K, seed=0, alpha=0.5)
    model = MLP((16,), ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.sgd(0.1)
    cfg = mj.FedConfig(rounds=6, local_steps=3, batch_size=16, participation=1.0, seed=3)
    return ds, clients, model, params0, tx, cfg


@functools.lru_cache(maxsize=None)
def trained():
    ds, clients, model, params0, tx, cfg = setup()
    comps = {"f32": mj.identity(), "medu": mj.medu(0.5, 0.2, "A2", 3)}
    return mj.train(model.apply, tx, params0, clients, cfg, comps)


def leaves64(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


def test_vmapped_round_equals_a_per_client_loop():
    ds, clients, model, params0, tx, cfg = setup()
    excl = jnp.zeros((K,), bool)
    new, ups, active, rejected = fed_round(model.apply, tx, cfg, params0, clients, 0, excl, jnp.ones((K,)))[:4]
    rk = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    ck = jax.random.fold_in(rk, 1)
    for k in range(K):
        u = local_update(model.apply, tx, params0, clients.x[k], clients.y[k], clients.n[k],
                         jax.random.fold_in(ck, k), cfg.local_steps, cfg.batch_size)[0]
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(ups)):
            np.testing.assert_allclose(np.asarray(b[k]), np.asarray(a), rtol=1e-5, atol=1e-6)
    # the server step is the data-weighted mean (float64 reference)
    p = np.asarray(clients.n, np.float64) / float(np.sum(clients.n))
    for w0, w1, u in zip(leaves64(params0), leaves64(new), leaves64(ups)):
        np.testing.assert_allclose(w1, w0 + np.tensordot(p, u, axes=1), rtol=1e-5, atol=1e-6)
    assert bool(active.all()) and not bool(rejected.any())


def _np_pairwise(x: np.ndarray) -> np.ndarray:
    """Reference: recursive halving in float32, odd counts padded with a zero row."""
    if len(x) == 1:
        return x[0]
    if len(x) % 2:
        x = np.concatenate([x, np.zeros_like(x[:1])])
    return _np_pairwise((x[0::2] + x[1::2]).astype(np.float32))


@given(k=st.integers(1, 37), cols=st.integers(1, 9), scale=st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
       seed=st.integers(0, 2**16))
def test_pairwise_sum_is_the_documented_order(k, cols, scale, seed):
    x = (np.random.default_rng(seed).standard_normal((k, cols)) * scale).astype(np.float32)
    got = np.asarray(pairwise_sum(jnp.asarray(x)))
    np.testing.assert_array_equal(got, _np_pairwise(x))  # exactly this order, so bits are layout-free
    np.testing.assert_allclose(got, x.astype(np.float64).sum(0), rtol=1e-5, atol=1e-6 * scale * k)


@given(a=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=20), b=st.integers(0, 2**32 - 1))
def test_mulhi32_is_the_exact_high_word(a, b):
    a64 = np.asarray(a, np.uint64)
    want = ((a64 * np.uint64(b)) >> np.uint64(32)).astype(np.uint32)  # exact: a * b < 2^64
    np.testing.assert_array_equal(np.asarray(mulhi32(jnp.asarray(a64.astype(np.uint32)), jnp.uint32(b))), want)


@pytest.mark.parametrize("n", [0, 1, 3, 7, 1000, 2**31 - 1])
def test_batch_indices_are_in_range_and_uniform(n):
    idx = np.asarray(batch_indices(jax.random.key(n), n, 50, 400))
    assert idx.shape == (50, 400) and idx.dtype == np.int32
    assert idx.min() >= 0 and idx.max() < max(n, 1)
    if 1 < n <= 7:  # chi-square against uniform, 20,000 draws: p < 1e-4 would fail
        counts = np.bincount(idx.ravel(), minlength=n)
        chi2 = float(((counts - idx.size / n) ** 2 / (idx.size / n)).sum())
        assert chi2 < {3: 18.4, 7: 27.9}[n], counts
    other = np.asarray(batch_indices(jax.random.key(n + 1), n, 50, 400))
    assert n <= 1 or not np.array_equal(idx, other)  # the key matters


def test_pairwise_sum_of_nothing_is_an_error():
    with pytest.raises(ValueError, match="length 0"):
        pairwise_sum(jnp.zeros((0, 3)))


def test_local_update_equals_a_step_by_step_sgd_loop():
    # the documented sampling: step s trains on row s of batch_indices(key, n, E, B)
    ds, clients, model, params0, tx, cfg = setup()
    key, k = jax.random.key(11), 2
    n = int(clients.n[k])
    p = params0
    for idx in np.asarray(batch_indices(key, n, cfg.local_steps, cfg.batch_size)):
        g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(q, clients.x[k][idx]), clients.y[k][idx]).mean())(p)
        p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
    u = local_update(model.apply, tx, params0, clients.x[k], clients.y[k], clients.n[k], key, cfg.local_steps,
                     cfg.batch_size)[0]
    for a, b, w0 in zip(jax.tree.leaves(u), jax.tree.leaves(p), jax.tree.leaves(params0)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b) - np.asarray(w0), rtol=1e-5, atol=1e-6)


def test_same_seed_same_bits_and_history():
    ds, clients, model, params0, tx, cfg = setup()
    a = mj.train(model.apply, tx, params0, clients, cfg, {"m": mj.medu(0.5, 0.2, "A2", 3)})
    b = trained()
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    ra, rb = a.histories["m"].records, b.histories["medu"].records
    assert len(ra) == len(rb) == cfg.rounds
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys() and all(np.array_equal(x[n], y[n]) for n in x)


def test_block_size_follows_the_budget_the_progress_bar_and_the_host():
    from medu_jax.fedavg import _block_size

    h = trained().histories
    per_round = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(h["f32"].rows_like()))
    assert _block_size(None, [h["f32"]], 60, False) == 60
    assert _block_size(None, [h["f32"]], 60, False, budget_bytes=7 * per_round) == 7
    assert _block_size(None, [h["f32"]], 60, False, progress=True) == 3  # the bar moves 20 times
    assert _block_size(None, [h["f32"]], 60, True) == 1  # a store or a host-side selection
    assert _block_size(8, [h["f32"]], 5, False) == 5
    assert _block_size(None, [], 60, False) == 60  # retraining: nothing to stack


@pytest.mark.parametrize("block", [1, 4])
def test_rounds_per_call_does_not_change_the_bits(block):
    """The default runs all 6 rounds (training and encoding) as one lax.scan; blocks of 1 and of 4 (then a
    remainder of 2) must give the same params, records and logs."""
    ds, clients, model, params0, tx, cfg = setup()
    a = mj.train(model.apply, tx, params0, clients, cfg, {"f32": mj.identity(), "medu": mj.medu(0.5, 0.2, "A2", 3)},
                 rounds_per_call=block)
    b = trained()
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    for name in ("f32", "medu"):
        for x, y in zip(a.histories[name].records, b.histories[name].records, strict=True):
            assert x.keys() == y.keys() and all(np.array_equal(x[n], y[n]) for n in x)
        assert a.log["overload"][name] == b.log["overload"][name]
        assert a.log["rel_error"][name] == b.log["rel_error"][name]
    assert a.log["rejected"] == b.log["rejected"]
    with pytest.raises(ValueError, match="rounds_per_call"):
        mj.train(model.apply, tx, params0, clients, cfg, rounds_per_call=0)


def test_excluding_users_leaves_the_others_randomness_unchanged():
    ds, clients, model, params0, tx, cfg = setup()
    ones = jnp.ones((K,))
    ups = fed_round(model.apply, tx, cfg, params0, clients, 2, jnp.zeros((K,), bool), ones).updates
    excl = jnp.zeros((K,), bool).at[1].set(True)
    _, ups2, active2, _ = fed_round(model.apply, tx, cfg, params0, clients, 2, excl, ones)[:4]
    assert not bool(active2[1])
    for a, b in zip(jax.tree.leaves(ups), jax.tree.leaves(ups2)):
        assert np.all(np.asarray(b[1]) == 0)
        np.testing.assert_array_equal(np.asarray(a)[np.arange(K) != 1], np.asarray(b)[np.arange(K) != 1])


def test_float32_history_replays_the_trained_model():
    tr = trained()
    w = mj.replay(tr.histories["f32"])
    for a, b in zip(leaves64(w), leaves64(tr.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_naive_unlearning_matches_a_float64_reference():
    ds, clients, model, params0, tx, cfg = setup()
    tr = trained()
    hist = tr.histories["f32"]
    remove = [1, 4]
    keep = np.ones(K, bool)
    keep[remove] = False
    msgs = hist.expand()
    w = leaves64(params0)
    for t in range(hist.num_rounds):
        valid = np.asarray(msgs.present[t]) & keep
        p = np.asarray(hist.weights, np.float64) * valid
        p = p / p.sum()
        for i, rows in enumerate(msgs.rows["values"]):
            w[i] = w[i] + np.tensordot(p, np.asarray(rows[t], np.float64), axes=1)
    got = leaves64(mj.replay(hist, remove))
    for a, b in zip(got, w):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


CHAINS = {
    "identity": mj.identity(),
    "lattice": mj.lattice_coding("E8", 3),
    "topk": mj.user_sparsification(count=2, mode="topk"),
    "threshold": mj.differential_threshold(0.5),
    "medu": mj.medu(0.5, 0.4, "D4", 2),
    "reweight": mj.chain(mj.user_sparsification(0.5, missing="reweight"), mj.differential_threshold(0.3),
                         mj.lattice_coding("Z", 4)),
}


@functools.lru_cache(maxsize=None)
def encoded_history(name, rounds=7, k=5):
    """A history of random updates (odd leaf sizes, users dropping in and out) and the encoder's own
    closed-loop (decoded, valid) per round: the reference that replay must reproduce."""
    comp, rng = CHAINS[name], np.random.default_rng(1)
    params0 = {"a": np.zeros((3, 5), np.float32), "b": {"c": np.zeros((7,), np.float32)}}
    shapes = [(k, 3, 5), (k, 7)]
    base = [rng.normal(size=s) for s in shapes]
    treedef = jax.tree_util.tree_structure(params0)
    state = comp.init(treedef.unflatten([jnp.zeros(s, jnp.float32) for s in shapes]))
    hist = mj.History(comp, state["like"].value, 4, params0, rng.uniform(0.5, 2, k).astype(np.float32), 0.7)
    seen, encode = [], jax.jit(comp.encode)
    for t in range(rounds):
        ups = treedef.unflatten([jnp.asarray(b + 0.5 * rng.normal(size=b.shape), jnp.float32) for b in base])
        active = jnp.asarray(rng.uniform(size=k) < 0.8)
        msg, state, dec, valid, _ = encode(ups, state, mj.compressor_key(4, t), active)
        hist.append(msg, t)
        seen.append(([np.asarray(x, np.float64) for x in jax.tree.leaves(dec)], np.asarray(valid)))
    return hist, seen


@pytest.mark.parametrize("name", sorted(CHAINS))
@settings(max_examples=8)
@given(remove=st.lists(st.integers(0, 4), max_size=3, unique=True), chunk=st.sampled_from([None, 1, 3]))
def test_replay_matches_a_float64_sum_of_the_decoders_rounds(name, remove, chunk):
    # replay computes w0 + lr * sum_t,j C[t, j] row[t, j] from row weights found on masks alone; the reference
    # walks the rounds with the encoder's closed-loop reconstruction and the re-normalised weighted mean
    hist, seen = encoded_history(name)
    keep = ~np.isin(np.arange(hist.num_users), remove)
    w = leaves64(hist.params0)
    for dec, valid in seen:
        p = np.asarray(hist.weights, np.float64) * (valid & keep)
        p = p / p.sum() if p.sum() > 0 else p
        w = [a + hist.server_lr * np.tensordot(p, x, axes=1) for a, x in zip(w, dec)]
    got = mj.replay(hist, remove, chunk=chunk)
    for a, b in zip(leaves64(got), w):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(got))


@pytest.mark.parametrize("name", ["f32", "medu"])
def test_chunked_replay_is_bit_identical(name, monkeypatch):
    hist = trained().histories[name]
    full = mj.replay(hist, [2])
    for chunk in (1, 4):
        part = mj.replay(hist, [2], chunk=chunk)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(part)))
    # rounds decoded in groups inside a chunk (a scan over groups plus a remainder) give the same bits too
    for group, chunk in ((1, None), (4, None), (4, 5)):
        monkeypatch.setattr(unlearn_module, "_group", lambda history, g=group: g)
        part = mj.replay(hist, [2], chunk=chunk)
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(part)))


def test_replay_groups_rounds_by_the_coders_decode_footprint():
    f32, medu = trained().histories["f32"], trained().histories["medu"]
    assert unlearn_module._group(f32) == f32.num_rounds  # float32 rows: nothing to decode, all rounds at once
    per_round = 16 * medu.compressor.capacity(medu.num_users) * medu.num_params
    assert unlearn_module._group(medu, cache_bytes=10 * per_round) == 10
    assert unlearn_module._group(medu, cache_bytes=1) == 1


def test_medu_history_is_small_and_replays_close_to_the_trained_model():
    tr = trained()
    hist = tr.histories["medu"]
    s = hist.summary()
    assert s["bytes"] == sum(sum(a.nbytes for a in r.values()) for r in hist.records)
    assert s["float32_bytes"] == tr.histories["f32"].float32_nbytes
    assert s["ratio"] > 8
    w = mj.replay(hist)
    assert mj.metrics.relative_distance(w, tr.params) < 0.1


def test_removing_users_moves_the_model_towards_retraining():
    ds, clients, model, params0, tx, cfg = setup()
    tr = trained()
    remove = [0, 5]
    ref = mj.train(model.apply, tx, params0, clients, cfg, exclude=remove).params
    d_before = mj.metrics.relative_distance(tr.params, ref)
    d_after = mj.metrics.relative_distance(mj.replay(tr.histories["f32"], remove), ref)
    assert d_after < d_before


def test_finetune_is_exact_rounds_of_the_remaining_users_after_the_schedule():
    ds, clients, model, params0, tx, cfg = setup()
    w = mj.replay(trained().histories["medu"], [1])
    excl = jnp.asarray(np.isin(np.arange(K), [1]))
    ref = w
    for t in (cfg.rounds, cfg.rounds + 1):  # round keys continue after training
        ref, ups = fed_round(model.apply, tx, cfg, ref, clients, t, excl, jnp.ones((K,)))[:2]
        assert all(np.all(np.asarray(u[1]) == 0) for u in jax.tree.leaves(ups))
    out = mj.finetune(model.apply, tx, w, clients, cfg, [1], 2)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(out), jax.tree.leaves(ref)))
    assert mj.finetune(model.apply, tx, w, clients, cfg, [1], 0) is w
    with pytest.raises(ValueError, match="unknown user ids"):
        mj.finetune(model.apply, tx, w, clients, cfg, [K], 1)


def test_corrected_replay_without_removal_is_naive_replay():
    hist = trained().histories["f32"]
    # with no user removed the two trajectories coincide, so the correction term is B (w_u - w) = 0
    a = mj.corrected_replay(hist, [])
    b = mj.replay(hist)
    for x, y in zip(leaves64(a), leaves64(b)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


def test_lbfgs_hvp_matches_dense_bfgs_recursion():
    rng = np.random.default_rng(0)
    d, m = 7, 4
    A = rng.normal(size=(d, d))
    H = A @ A.T + d * np.eye(d)  # SPD: y = H s gives s'y > 0
    S = rng.normal(size=(m, d))
    Y = S @ H.T
    v = rng.normal(size=d)
    for count in range(0, m + 1):
        got = np.asarray(lbfgs_hvp(jnp.asarray(S, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.int32(count),
                                   jnp.asarray(v, jnp.float32), 0.5))
        if count == 0:
            assert np.all(got == 0)
            continue
        sigma = 0.5 * (Y[-1] @ Y[-1]) / (S[-1] @ Y[-1])
        B = sigma * np.eye(d)
        for s, y in zip(S[m - count:], Y[m - count:]):
            Bs = B @ s
            B = B - np.outer(Bs, Bs) / (s @ Bs) + np.outer(y, y) / (y @ s)
        np.testing.assert_allclose(got, B @ v, rtol=2e-3, atol=2e-3 * np.abs(B @ v).max())


def test_nan_updates_are_rejected_and_never_stored():
    ds, clients, model, params0, tx, cfg = setup()
    scale = np.ones(K, np.float32)
    scale[3] = np.nan
    tr = mj.train(model.apply, tx, params0, clients, cfg, {"m": mj.medu(1.0, 0.0, "A2", 3)}, update_scale=scale)
    assert all(r == [3] for r in tr.log["rejected"])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tr.params))
    hist = tr.histories["m"]
    assert all(np.unpackbits(r["active"])[3] == 0 for r in hist.records)
    w = mj.replay(hist, [3])
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(w))


@pytest.mark.parametrize(
    "remove, err, match",
    [
        ([], ValueError, "remove set is empty"),
        ([K], ValueError, "unknown user ids"),
        ([-1], ValueError, "unknown user ids"),
        ([True], TypeError, "must be integers"),
        (["a"], TypeError, "must be integers"),
    ],
)
def test_bad_remove_sets(remove, err, match):
    with pytest.raises(err, match=match):
        mj.unlearn(trained().histories["medu"], remove, method="naive")


def test_unknown_method_and_empty_history():
    hist = trained().histories["medu"]
    with pytest.raises(ValueError, match="unknown unlearning method"):
        mj.unlearn(hist, [1], method="magic")
    empty = mj.History(hist.compressor, hist.like, 0, hist.params0, hist.weights)
    with pytest.raises(ValueError, match="no rounds"):
        mj.replay(empty)


def test_fedconfig_and_partition_checks():
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        mj.FedConfig(rounds=0)
    with pytest.raises(ValueError, match="participation"):
        mj.FedConfig(participation=0.0)
    y = np.repeat(np.arange(10), 30)
    for shards in (D.partition_iid(len(y), 7, jax.random.key(0)),
                   D.partition_dirichlet(y, 7, 0.3, jax.random.key(0))):
        allidx = np.concatenate(shards)
        assert len(allidx) == len(y) and len(np.unique(allidx)) == len(y)
    # small alpha concentrates classes: most clients see few classes
    shards = D.partition_dirichlet(y, 7, 0.05, jax.random.key(1))
    assert np.mean([len(np.unique(y[s])) for s in shards if len(s)]) < 6
    with pytest.raises(ValueError, match="alpha must be positive"):
        D.partition_dirichlet(y, 3, 0.0, jax.random.key(0))


def test_partial_participation_draws_the_configured_count():
    ds, clients, model, params0, tx, _ = setup()
    cfg = mj.FedConfig(rounds=1, local_steps=1, batch_size=8, participation=0.5, seed=1)
    active = fed_round(model.apply, tx, cfg, params0, clients, 0, jnp.zeros((K,), bool), jnp.ones((K,))).active
    assert int(active.sum()) == 3


def test_a_diverging_run_says_so():
    ds, clients, model, params0, tx, cfg = setup()
    scale = np.full(K, -5.0, np.float32)  # every update sign-flipped and scaled: gradient ascent
    with pytest.warns(RuntimeWarning, match="diverged"):
        mj.train(model.apply, optax.sgd(2.0), params0, clients, mj.FedConfig(rounds=30, local_steps=3, batch_size=8),
                 update_scale=scale)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # an ordinary run does not warn
        mj.train(model.apply, tx, params0, clients, mj.FedConfig(rounds=2, local_steps=2, batch_size=8))


def test_a_history_whose_closed_loop_blows_up_says_so():
    """A 1-bit threshold loop whose guard lets every row through (guard 1e9) feeds a decoded error larger than the
    update back each round: the model is fine (the history is only recorded) but the history diverged (relative
    error ~1e6 here), and train names it; the default MEDU history of the same run does not warn."""
    ds, clients, model, params0, tx, _ = setup()
    bad = mj.chain(mj.differential_threshold(0.0), mj.lattice_coding("Z", 1, guard=1e9))
    with pytest.warns(RuntimeWarning, match="history 'bad' diverged") as caught:
        run = mj.train(model.apply, tx, params0, clients, mj.FedConfig(rounds=30, local_steps=2, batch_size=8),
                       {"bad": bad, "ok": mj.medu()})
    assert not any("'ok'" in str(w.message) for w in caught)
    assert max(run.log["rel_error"]["bad"]) > 1e3 > max(run.log["rel_error"]["ok"])
