"""Recovery with client work (FedRecover, the adaptive variant, FedEraser, fine-tuning) and its client cost."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import medu_jax as mj
from medu_jax import recovery as R

K = 6
hvp = functools.partial(R.lbfgs_hvp, rayleigh=True)  # FedRecover's sigma = y's/s's


@functools.lru_cache(maxsize=None)
def setup():
    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, K, seed=0, alpha=0.5)
    clients = mj.attacks.backdoor(clients, [4, 5], 0)
    model = mj.models.MLP((16,), ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.sgd(0.1)
    cfg = mj.FedConfig(rounds=12, local_steps=3, batch_size=16, seed=5)
    run = mj.train(model.apply, tx, params0, clients, cfg, {"f32": mj.identity(), "medu": mj.medu(0.5, 0.3, "A2", 2)})
    return ds, clients, model, params0, tx, cfg, run


def leaves(t):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]


def close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(leaves(a), leaves(b)):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def retrain(remove):
    ds, clients, model, params0, tx, cfg, run = setup()
    return mj.train(model.apply, tx, params0, clients, cfg, exclude=remove).params


@pytest.mark.parametrize("name", ["f32", "medu"])
def test_fedrecover_with_every_round_exact_is_retraining(name):
    ds, clients, model, params0, tx, cfg, run = setup()
    rec = mj.fedrecover(run.histories[name], [4, 5], model.apply, tx, clients, cfg, warmup=cfg.rounds, tune=0)
    close(rec.params, retrain([4, 5]))
    assert rec.exact_rounds == cfg.rounds and rec.fixed_updates == 0
    assert rec.client_cost == pytest.approx(1.0)


def test_abnormality_fixing_everywhere_is_retraining():
    """alpha near 1 puts tau below every entry: every remaining client computes exactly in every round."""
    ds, clients, model, params0, tx, cfg, run = setup()
    rec = mj.fedrecover(run.histories["f32"], [4, 5], model.apply, tx, clients, cfg, warmup=1, period=0, tune=0,
                        alpha=0.999)
    close(rec.params, retrain([4, 5]), rtol=1e-4, atol=1e-5)
    assert rec.exact_rounds == 1 and rec.fixed_updates == 4 * (cfg.rounds - 1)
    assert rec.client_cost == pytest.approx(1.0)


def test_client_cost_counts_exact_rounds_and_fixes():
    ds, clients, model, params0, tx, cfg, run = setup()
    rec = mj.fedrecover(run.histories["medu"], [4, 5], model.apply, tx, clients, cfg, warmup=2, period=4, tune=2,
                        alpha=0)
    exact = [i for i in range(12) if i < 2 or i >= 10 or (i - 1) % 4 == 0]  # rounds 0, 1, 5, 9, 10, 11
    assert rec.exact_rounds == len(exact) and rec.fixed_updates == 0
    assert rec.client_steps == len(exact) * 4 * cfg.local_steps
    assert rec.client_cost == pytest.approx(len(exact) / cfg.rounds)
    assert all(np.all(np.isfinite(x)) for x in leaves(rec.params))
    fixed = mj.fedrecover(run.histories["medu"], [4, 5], model.apply, tx, clients, cfg, warmup=2, period=4, tune=2,
                          alpha=0.01)
    assert fixed.client_steps == (len(exact) * 4 + fixed.fixed_updates) * cfg.local_steps


def test_recovery_moves_towards_retraining_from_both_histories():
    ds, clients, model, params0, tx, cfg, run = setup()
    ref = retrain([4, 5])
    before = mj.metrics.relative_distance(run.params, ref)
    for name in ("f32", "medu"):
        for fn in (mj.fedrecover, mj.adaptive_recovery):
            rec = fn(run.histories[name], [4, 5], model.apply, tx, clients, cfg, warmup=2, tune=2)
            assert mj.metrics.relative_distance(rec.params, ref) < before, (name, fn.__name__)


def test_removal_requests_over_time_equal_one_request():
    """Removing 5 after 4 recomputes from the history with {4, 5}: the order of requests does not matter."""
    ds, clients, model, params0, tx, cfg, run = setup()
    h = run.histories["medu"]
    at_once = mj.unlearn(h, [4, 5], apply_fn=model.apply, tx=tx, data=clients, cfg=cfg)
    first = mj.unlearn(h, [4], apply_fn=model.apply, tx=tx, data=clients, cfg=cfg)
    later = mj.unlearn(h, [4] + [5], apply_fn=model.apply, tx=tx, data=clients, cfg=cfg)
    reversed_ = mj.unlearn(h, [5, 4], apply_fn=model.apply, tx=tx, data=clients, cfg=cfg)
    for a, b in ((at_once, later), (at_once, reversed_)):
        assert all(np.array_equal(x, y) for x, y in zip(leaves(a.params), leaves(b.params)))
    assert not all(np.array_equal(x, y) for x, y in zip(leaves(first.params), leaves(at_once.params)))


def test_adaptive_spends_exact_rounds_within_its_budget():
    ds, clients, model, params0, tx, cfg, run = setup()
    h = run.histories["f32"]
    lo = mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, warmup=2, tune=1, drift=0.05, budget=0.5,
                              alpha=0)
    assert lo.client_cost <= 0.5 + 1e-9
    hi = mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, warmup=2, tune=1, drift=1e6, alpha=0)
    assert hi.exact_rounds == 3  # the drift bound is never crossed: warm-up and tuning only
    assert lo.exact_rounds > hi.exact_rounds
    with pytest.raises(ValueError, match="drift"):
        mj.adaptive_recovery(h, [4], model.apply, tx, clients, cfg, drift=0)


def test_exact_tail_spends_the_unused_budget_on_the_last_rounds():
    """exact_tail: with no drift rounds and no fixes, 12 rounds, warm-up 2 and budget 0.5, rounds 8-11 are the
    ones the budget can still cover to the end, so the schedule is the one of tune=4 without the tail rule."""
    ds, clients, model, params0, tx, cfg, run = setup()
    h = run.histories["medu"]
    kw = dict(warmup=2, drift=1e6, alpha=0, stale_offsets=True)
    tail = mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, tune=1, budget=0.5, exact_tail=True, **kw)
    fixed = mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, tune=4, **kw)
    plain = mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, tune=1, budget=0.5, **kw)
    assert tail.exact_rounds == fixed.exact_rounds == 6 and plain.exact_rounds == 3
    assert tail.client_cost == pytest.approx(0.5) and tail.client_cost <= 0.5 + 1e-9
    for x, y in zip(leaves(tail.params), leaves(fixed.params)):
        np.testing.assert_array_equal(x, y)
    assert max(np.max(np.abs(x - y)) for x, y in zip(leaves(tail.params), leaves(plain.params))) > 1e-6


def test_adaptive_budget_caps_abnormality_fixing_and_counts_what_it_does_not_fix():
    ds, clients, model, params0, tx, cfg, run = setup()
    h = run.histories["medu"]
    free = mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, warmup=2, tune=1, drift=1e6, alpha=0.5,
                                budget=10.0)
    capped = mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, warmup=2, tune=1, drift=1e6, alpha=0.5,
                                  budget=0.6)
    assert free.fixed_updates > capped.fixed_updates and free.dropped_estimates == 0
    assert free.client_cost > 0.6 >= capped.client_cost - 1e-9 and capped.dropped_estimates > 0
    assert all(np.all(np.isfinite(x)) for x in leaves(capped.params))
    # FedRecover itself has no budget: the paper fixes every abnormal client
    fr = mj.fedrecover(h, [4, 5], model.apply, tx, clients, cfg, warmup=2, period=0, tune=1, alpha=0.5)
    assert fr.dropped_estimates == 0 and fr.fixed_updates == free.fixed_updates



@pytest.mark.parametrize("name", ["f32", "medu"])
def test_beyond_the_budget_abnormal_clients_enter_with_their_stored_rows(name):
    """alpha near 1 makes every estimate abnormal and budget 0 fixes none: the rounds between warm-up and tuning
    are then FedAvg steps with the stored rows of the remaining clients (the reference below), none left out."""
    from medu_jax.fedavg import fed_round, weighted_mean

    ds, clients, model, params0, tx, cfg, run = setup()
    h, remove = run.histories[name], [4, 5]
    rec = mj.adaptive_recovery(h, remove, model.apply, tx, clients, cfg, warmup=2, tune=1, drift=1e6, budget=0.0,
                               alpha=0.999)
    keep = jnp.asarray(~np.isin(np.arange(K), remove))
    state, w, n = R._init_state(h.compressor, h.like), jax.tree.map(jnp.asarray, h.params0), 0
    for i, t, msg in R._messages(h):
        stored, valid, state = R._decode(h.compressor, msg, state, mj.compressor_key(h.seed, t))
        if i < 2 or i == h.num_rounds - 1:
            w = fed_round(model.apply, tx, cfg, w, clients, t, ~keep, jnp.ones((K,)), model_state={}).params
        else:
            w = R._unflat(R._flat(w) + h.server_lr * weighted_mean(stored, valid & keep, jnp.asarray(h.weights)), w)
            n += int(jnp.sum(valid & keep))
    assert rec.exact_rounds == 3 and rec.fixed_updates == 0 and rec.dropped_estimates == n > 0
    close(rec.params, w, rtol=1e-6, atol=1e-7)

def test_federaser_step_keeps_stored_norms_and_calibrated_directions():
    ds, clients, model, params0, tx, cfg, run = setup()
    excl = jnp.zeros((K,), bool).at[0].set(True)
    ones = jnp.ones((K,))
    d = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params0))
    stored = jax.random.normal(jax.random.key(3), (K, d))
    valid = jnp.ones((K,), bool)
    weights = jnp.asarray(clients.n, jnp.float32)
    cal_cfg = mj.FedConfig(**{**cfg.__dict__, "local_steps": 1})
    rows, used, _ = R._calibrated_rows(model.apply, tx, cal_cfg, params0, clients, 2, excl, ones, stored)
    w = R._unflat(R._Server(run.histories["f32"], params0).step(R._flat(params0), rows, valid & used & ~excl, weights),
                  params0)
    _, cal, active, _ = mj.fed_round(model.apply, tx, cal_cfg, params0, clients, 2, excl, ones)[:4]
    c = np.concatenate([np.asarray(x, np.float64).reshape(K, -1) for x in jax.tree.leaves(cal)], 1)
    s = np.asarray(stored, np.float64)
    m = np.asarray(active) & ~np.asarray(excl)
    p = np.asarray(weights, np.float64) * m
    want = (p / p.sum()) @ (c * (np.linalg.norm(s, axis=1) / np.maximum(np.linalg.norm(c, axis=1), 1e-30))[:, None])
    got = np.concatenate([np.ravel(a - b) for a, b in zip(leaves(w), leaves(params0))])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(used), np.asarray(active))


def test_federaser_cost_is_ratio_over_interval():
    ds, clients, model, params0, tx, cfg, run = setup()
    rec = mj.federaser(run.histories["f32"], [4, 5], model.apply, tx, clients, cfg, every=2, ratio=0.5)
    used = len(range(0, cfg.rounds, 2)) - 1  # the first retained round is applied as stored
    assert rec.client_steps == used * 4 * 2  # ceil(0.5 * 3) = 2 calibration steps
    assert rec.client_cost == pytest.approx(used * 2 / (cfg.rounds * cfg.local_steps))
    with pytest.raises(ValueError, match="ratio"):
        mj.federaser(run.histories["f32"], [4], model.apply, tx, clients, cfg, ratio=0)
    with pytest.raises(ValueError, match="unknown user ids"):
        mj.federaser(run.histories["f32"], [K + 3], model.apply, tx, clients, cfg)


def test_finetune_baseline_cost_and_rounds():
    ds, clients, model, params0, tx, cfg, run = setup()
    rec = mj.finetune_baseline(run.params, [4, 5], model.apply, tx, clients, cfg, 3)
    assert rec.client_cost == pytest.approx(3 / cfg.rounds)
    close(rec.params, mj.finetune(model.apply, tx, run.params, clients, cfg, [4, 5], 3))


def test_unlearn_default_needs_the_clients_and_names_them():
    ds, clients, model, params0, tx, cfg, run = setup()
    h = run.histories["medu"]
    with pytest.raises(ValueError, match=r"needs \['apply_fn', 'tx', 'data', 'cfg'\].*naive"):
        mj.unlearn(h, [4])
    naive = mj.unlearn(h, [4], method="naive")
    assert naive.client_cost == 0 and all(np.array_equal(a, b) for a, b in zip(leaves(naive.params),
                                                                                leaves(mj.replay(h, [4]))))
    with pytest.raises(ValueError, match="unknown unlearning method"):
        mj.unlearn(h, [4], method="magic")
    with pytest.raises(ValueError, match="unknown user ids"):
        mj.unlearn(h, [K], apply_fn=model.apply, tx=tx, data=clients, cfg=cfg)
    with pytest.raises(ValueError, match="remove set is empty"):
        mj.fedrecover(h, [], model.apply, tx, clients, cfg)
    with pytest.raises(ValueError, match="memory"):
        mj.fedrecover(h, [4], model.apply, tx, clients, cfg, memory=0)
    with pytest.raises(ValueError, match="alpha"):
        mj.fedrecover(h, [4], model.apply, tx, clients, cfg, alpha=1.0)


def test_a_non_finite_recovery_is_an_error_and_a_diverged_one_a_warning():
    ds, clients, model, params0, tx, cfg, run = setup()
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params0)
    with pytest.raises(FloatingPointError, match="non-finite"):
        R._recovery(bad, 0, clients, cfg, [4])
    huge = jax.tree.map(lambda x: x * 1e5, params0)
    with pytest.warns(RuntimeWarning, match="recovery diverged"):
        R._recovery(huge, 0, clients, cfg, [4], start=params0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        R._recovery(jax.tree.map(lambda x: x * 10, params0), 0, clients, cfg, [4], start=params0)


def bfgs_reference(S, Y, v):
    """B v from m dense BFGS updates of B0 = sigma I (sigma = y's/s's of the newest pair), in float64."""
    S, Y, v = (np.asarray(a, np.float64) for a in (S, Y, v))
    B = (Y[-1] @ S[-1]) / (S[-1] @ S[-1]) * np.eye(len(v))
    for s, y in zip(S, Y):
        Bs = B @ s
        B = B - np.outer(Bs, Bs) / (s @ Bs) + np.outer(y, y) / (y @ s)
    return B @ v


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(4, 12), st.integers(0, 2**31 - 1), st.floats(1e-3, 1e3))
def test_lbfgs_hvp_matches_dense_bfgs(m, d, seed, scale):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d))
    H = A @ A.T / d + 0.1 * np.eye(d)  # SPD: every pair has positive curvature
    S = scale * rng.normal(size=(m, d))
    Y = S @ H.T
    v = rng.normal(size=d)
    got = hvp(jnp.asarray(S, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.int32(m), jnp.asarray(v, jnp.float32))
    want = bfgs_reference(S, Y, v)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-2, atol=2e-2 * np.abs(want).max())
    # the secant condition of the newest pair: B s = y
    bs = hvp(jnp.asarray(S, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.int32(m), jnp.asarray(S[-1], jnp.float32))
    np.testing.assert_allclose(np.asarray(bs, np.float64), Y[-1], rtol=2e-2, atol=2e-2 * np.abs(Y[-1]).max())


def test_lbfgs_hvp_ignores_invalid_older_pairs():
    rng = np.random.default_rng(0)
    S, Y, v = rng.normal(size=(3, 5)), rng.normal(size=(3, 5)), rng.normal(size=5)
    Y = S * 2.0
    one = hvp(jnp.asarray(S[-1:], jnp.float32), jnp.asarray(Y[-1:], jnp.float32), jnp.int32(1), jnp.asarray(v, jnp.float32))
    junk = S.copy()
    junk[:2] = 1e6
    got = hvp(jnp.asarray(junk, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.int32(1), jnp.asarray(v, jnp.float32))
    np.testing.assert_allclose(np.asarray(got), np.asarray(one), rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(hvp(jnp.asarray(S, jnp.float32), jnp.asarray(Y, jnp.float32), jnp.int32(0),
                                          jnp.asarray(v, jnp.float32))) == 0)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 7), st.integers(1, 40), st.integers(0, 2**31 - 1), st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
       st.floats(0.0, 1.0))
def test_round_tau_is_the_exact_order_statistic(k, d, seed, scale, zero_frac):
    rng = np.random.default_rng(seed)
    x = (rng.standard_cauchy(size=(k, d)) * scale).astype(np.float32)
    x[rng.random(size=x.shape) < zero_frac] = 0.0
    valid = rng.random(size=k) < 0.7
    valid[0] = True
    a = np.sort(np.abs(x[valid]).ravel())[::-1]
    allowed = int(rng.integers(0, a.size))
    tau = float(R._round_tau(jnp.asarray(x), jnp.asarray(valid), allowed))
    assert tau == a[allowed]  # the (allowed + 1)-th largest: at most `allowed` entries exceed it
    assert np.sum(a > tau) <= allowed


def test_abnormality_threshold_is_the_max_over_rounds():
    ds, clients, model, params0, tx, cfg, run = setup()
    h = run.histories["f32"]
    msgs = h.expand()
    want = -np.inf
    for t in range(h.num_rounds):
        rows = np.concatenate([np.asarray(r[t]).reshape(K, -1) for r in jax.tree.leaves(msgs.rows)], 1)
        a = np.sort(np.abs(rows[np.asarray(msgs.present[t])]).ravel())[::-1]
        want = max(want, a[int(0.01 * a.size)])
    assert R.abnormality_threshold(h, 0.01) == pytest.approx(want, rel=1e-6)
    assert R.abnormality_threshold(h, 0.0) == np.inf


def test_methods_that_need_every_round_refuse_a_selective_history():
    ds, clients, model, params0, tx, cfg, run = setup()
    sel = mj.train(model.apply, tx, params0, clients, mj.FedConfig(rounds=4, local_steps=2, batch_size=8),
                   {"e2": mj.identity()}, selections={"e2": mj.history.Selection(every=2)}).histories["e2"]
    for fn in (mj.fedrecover, mj.adaptive_recovery, mj.federaser):
        with pytest.raises(ValueError, match="needs a full history"):
            fn(sel, [4], model.apply, tx, clients, cfg)


def _pairs_reference(rounds, k, m, d):
    """NumPy (float64) reference of the per-client pair buffers over a sequence of exact rounds: each round
    (s, y, mask, run) adds (s, y_i) for the clients in mask whose pair has positive curvature; with ``run`` (the
    previous round was exact too, adaptive_recovery's run pairs) a client whose newest pair ended at the previous
    round sums this round into that pair instead of appending."""
    S, Y, count = [[] for _ in range(k)], [[] for _ in range(k)], np.zeros(k, int)
    ended = np.zeros(k, bool)
    for s, y, mask, run in rounds:
        now = np.zeros(k, bool)
        for i in range(k):
            if not mask[i]:
                continue
            ext = run and ended[i]
            s_i = s[i] if s.ndim == 2 else s  # one offset per client (stale offsets) or one for all
            si, yi = (S[i][-1] + s_i, Y[i][-1] + y[i]) if ext else (s_i, y[i])
            if yi @ si > 1e-12 * np.linalg.norm(si) * np.linalg.norm(yi):
                if ext:
                    S[i][-1], Y[i][-1] = si, yi
                else:
                    S[i], Y[i] = (S[i] + [si])[-m:], (Y[i] + [yi])[-m:]
                    count[i] = min(count[i] + 1, m)
                now[i] = True
        ended = now
    def pad(b):  # the newest pair last, empty slots zero (the buffers' layout)
        return np.stack([np.concatenate([np.zeros((m - len(x), d)), np.reshape(x, (-1, d))]) for x in b])

    return pad(S), pad(Y), count


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 5), st.integers(1, 3), st.integers(2, 9), st.integers(1, 8), st.integers(0, 2**31 - 1))
def test_run_pairs_match_a_numpy_reference(k, m, d, n, seed):
    """_add_pairs over random rounds (masks, runs of consecutive exact rounds, pairs of both curvature signs, one
    offset for all clients or one each): the buffers and counts are the reference's; without runs every pair is
    appended (FedRecover's)."""
    rng = np.random.default_rng(seed)
    rounds = [(rng.normal(size=d if rng.random() < 0.5 else (k, d)).astype(np.float32),
               rng.normal(size=(k, d)).astype(np.float32), rng.random(k) < 0.7, bool(t and rng.random() < 0.6))
              for t in range(n)]
    for use_runs in (True, False):
        S, Y = jnp.zeros((k, m, d)), jnp.zeros((k, m, d))
        count, ended = jnp.zeros((k,), jnp.int32), jnp.zeros((k,), bool)
        for s, y, mask, run in rounds:
            extend = ended & run if use_runs else jnp.zeros((k,), bool)
            S, Y, count, ended = R._add_pairs(S, Y, count, jnp.asarray(s), jnp.asarray(y), jnp.asarray(mask), extend)
        ref = _pairs_reference([(s, y, mask, run and use_runs) for s, y, mask, run in rounds], k, m, d)
        np.testing.assert_array_equal(np.asarray(count), ref[2])
        for got, want in zip((S, Y), ref[:2]):
            np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=1e-6)


def test_stale_offsets_expand_each_row_around_the_model_it_was_computed_at():
    """adaptive_recovery(stale_offsets=True): a client's row, kept from an earlier round by sparsification or the
    threshold, is expanded around the original-trajectory model of the round that stored it (NumPy reference of
    that model per client); with every row fresh (float32) nothing changes, on the sparsified history it does."""
    ds, clients, model, params0, tx, cfg, run = setup()
    h = run.histories["medu"]
    state, w_o = R._init_state(h.compressor, h.like), R._flat(h.params0)
    rows_at, ref, stale = jnp.broadcast_to(w_o, (K, w_o.shape[0])), np.tile(np.asarray(w_o), (K, 1)), 0
    srv = R._Server(h, h.params0)
    for i, t, msg in R._messages(h):
        key = mj.compressor_key(h.seed, t)
        stored, valid, state = R._decode(h.compressor, msg, state, key)
        present = np.asarray(msg.present)
        rows_at, ref[present] = R._rows_at(rows_at, w_o, jnp.asarray(present)), np.asarray(w_o)
        np.testing.assert_array_equal(np.asarray(rows_at), ref)
        stale += int(np.sum(np.asarray(valid) & ~present))
        w_o = srv.step(w_o, stored, valid, jnp.asarray(h.weights)) + \
            R._correction(h.compressor, msg.correction, key, state)
    assert stale > 0  # the history does hold rows older than their round
    kw = dict(warmup=2, tune=2, drift=0.2, budget=0.6)
    for name in ("f32", "medu"):
        a, b = (mj.adaptive_recovery(run.histories[name], [4, 5], model.apply, tx, clients, cfg, stale_offsets=so,
                                     **kw) for so in (False, True))
        assert all(np.all(np.isfinite(x)) for x in leaves(b.params)) and b.client_cost <= 0.6 + 1e-9
        if name == "f32":
            close(a.params, b.params, rtol=1e-6, atol=1e-7)
        else:
            assert max(np.max(np.abs(x - y)) for x, y in zip(leaves(a.params), leaves(b.params))) > 1e-6


def test_interpolated_rows_match_a_numpy_reference():
    """stale_rows="interpolate": a row its round did not store, between stored rows of rounds p < t < q, is
    d_p + (t - p) / (q - p) (d_q - d_p) (float64 reference from the decoded rounds); rows before a user's first or
    after its last stored row stay as decoded; with every row stored (float32) recovery is the default's bit for
    bit; a history whose unstored rows are not the last stored ones is refused."""
    ds, clients, model, params0, tx, cfg, run = setup()
    h = run.histories["medu"]
    state, decoded = R._init_state(h.compressor, h.like), []
    for i, t, msg in R._messages(h):
        stored, valid, state = R._decode(h.compressor, msg, state, mj.compressor_key(h.seed, t))
        decoded.append((np.asarray(stored, np.float64), np.asarray(valid), np.asarray(msg.present) & np.asarray(valid)))
    interp, moved = R._Interpolator(h), 0
    for i, (stored, valid, present) in enumerate(decoded):
        want = stored.copy()
        for k in np.flatnonzero(valid & ~present):
            p = max((j for j in range(i) if decoded[j][2][k]), default=None)
            q = min((j for j in range(i + 1, len(decoded)) if decoded[j][2][k]), default=None)
            if p is not None and q is not None:
                np.testing.assert_array_equal(stored[k], decoded[p][0][k])  # missing="last": the row of round p
                want[k] = stored[k] + (i - p) / (q - p) * (decoded[q][0][k] - stored[k])
                moved += 1
        got = np.asarray(interp(i, jnp.asarray(stored, jnp.float32), jnp.asarray(valid)), np.float64)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert moved > 0
    kw = dict(warmup=2, tune=2, drift=0.2, budget=0.6)
    f32 = run.histories["f32"]
    a, b = (mj.adaptive_recovery(f32, [4, 5], model.apply, tx, clients, cfg, stale_rows=sr, **kw)
            for sr in ("last", "interpolate"))
    for x, y in zip(leaves(a.params), leaves(b.params)):
        np.testing.assert_array_equal(x, y)
    c = mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, stale_rows="interpolate", **kw)
    assert all(np.all(np.isfinite(x)) for x in leaves(c.params)) and c.client_cost <= 0.6 + 1e-9
    with pytest.raises(ValueError, match="stale_offsets"):
        mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, stale_rows="interpolate", stale_offsets=True)
    with pytest.raises(ValueError, match="remaining_corrections"):
        mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, stale_rows="interpolate",
                             remaining_corrections=True)
    short = mj.FedConfig(rounds=2, local_steps=1, batch_size=16, seed=5)
    ef = mj.train(model.apply, tx, params0, clients, short, {"ef": mj.medu(0.5, error_feedback=True)}).histories["ef"]
    with pytest.raises(ValueError, match="missing='last'"):
        mj.adaptive_recovery(ef, [4, 5], model.apply, tx, clients, short, stale_rows="interpolate")
    with pytest.raises(ValueError, match="stale_rows"):
        mj.adaptive_recovery(h, [4, 5], model.apply, tx, clients, cfg, stale_rows="zero")
