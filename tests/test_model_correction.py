"""The per-round model correction: its closed loop against a NumPy reference, its error bound on random inputs,
and a trained history whose replay follows the trained model (and whose unlearning replay leaves it out)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import Phase, given, settings, strategies as st

import medu_jax as mj
from medu_jax.compressors import Message


def _comp(bits=3, entropy=None):
    return mj.chain(mj.user_sparsification(0.5), mj.lattice_coding("A2", 3),
                    mj.model_correction("A2", bits, entropy=entropy))


def _message(k=4):
    return Message(jnp.ones((k,), bool), jnp.ones((k,), bool), {}, None)


def test_correct_matches_a_numpy_reference_of_the_closed_loop():
    """c = e + step - replayed is coded, the carry becomes c - c^, and decode_correction gives c^ back."""
    comp = _comp()
    tmpl = {"b": jnp.zeros((4, 3)), "w": jnp.zeros((4, 5, 7))}
    state = comp.init(tmpl)
    rng = np.random.default_rng(0)
    e = np.zeros(38)
    like = state["like"].value
    for t in range(5):
        step = {"b": rng.normal(size=3).astype(np.float32), "w": rng.normal(size=(5, 7)).astype(np.float32)}
        rep = jax.tree.map(lambda x: (x + 0.3 * rng.normal(size=x.shape)).astype(np.float32), step)
        key = mj.compressor_key(3, t)
        msg, state, (en, cn) = comp.correct(_message(), state, step, rep, key)
        c_hat = comp.decode_correction(msg.correction, key, like)
        flat = lambda tr: np.concatenate([np.ravel(tr["b"]), np.ravel(tr["w"])]).astype(np.float64)  # noqa: E731
        c = e + flat(step) - flat(rep)
        np.testing.assert_allclose(flat(jax.tree.map(np.asarray, state["correction"])), c - flat(c_hat), atol=1e-5)
        np.testing.assert_allclose(float(cn), np.linalg.norm(c), rtol=1e-4)
        np.testing.assert_allclose(float(en), np.linalg.norm(c - flat(c_hat)), rtol=1e-3, atol=1e-9)
        e = c - flat(c_hat)
    # the replayed model (sum of replayed steps and decoded corrections) is the trained one up to the last carry
    assert np.linalg.norm(e) < 0.5 * np.linalg.norm(c)


@settings(max_examples=5, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(sizes=st.lists(st.integers(1, 9), min_size=1, max_size=3), log_scale=st.sampled_from([-30, 0, 30]),
       bits=st.sampled_from([2, 3, 4]), zero=st.booleans(), seed=st.integers(0, 2**16))
def test_the_gap_stays_one_rounds_error_on_random_chains(sizes, log_scale, bits, zero, seed):
    """Over 30 rounds of random steps and replays (odd leaf sizes, zero, tiny and huge values) the gap between
    the trained and the replayed model stays below one round's correction, never growing with rounds."""
    comp = _comp(bits)
    tmpl = {f"l{i}": jnp.zeros((2, n)) for i, n in enumerate(sizes)}
    state = comp.init(tmpl)
    rng = np.random.default_rng(seed)
    scale = np.float32(10.0**log_scale)
    trained = replayed = biggest = 0.0

    @jax.jit
    def correct(state, step, rep, key):
        msg, state, norms = comp.correct(_message(2), state, step, rep, key)
        return state, norms, comp.decode_correction(msg.correction, key, state["like"].value)

    for t in range(30):
        step = {k: (0.0 if zero else scale) * rng.normal(size=v.shape[1:]).astype(np.float32) for k, v in tmpl.items()}
        rep = {k: v + (0.0 if zero else scale) * rng.normal(size=v.shape).astype(np.float32) for k, v in step.items()}
        key = mj.compressor_key(seed, t)
        state, (en, cn), c_hat = correct(state, step, rep, key)
        trained = trained + np.concatenate([np.ravel(step[k]) for k in sorted(step)]).astype(np.float64)
        replayed = replayed + np.concatenate([np.ravel(rep[k]) + np.ravel(c_hat[k]) for k in sorted(step)])
        assert np.isfinite(float(en)) and float(en) <= float(cn)  # guarded: the carry never grows in a round
        biggest = max(biggest, float(cn))
    gap = np.linalg.norm(trained - replayed)
    assert gap <= float(en) * (1 + 1e-3) + 1e-5 * np.linalg.norm(trained)  # the gap is the last carry ...
    assert gap <= biggest  # ... which is below the largest single correction, however many rounds ran
    if zero:
        assert gap == 0.0


def test_refusals():
    from medu_jax.compressors import Identity, LatticeCoding
    with pytest.raises(ValueError, match="1-bit"):  # unguarded; model_correction() guards its coder
        mj.Compressor((Identity(),), LatticeCoding("A2", 1))
    with pytest.raises(ValueError, match="at most one model_correction"):
        mj.chain(mj.model_correction(), mj.lattice_coding(), mj.model_correction())
    from medu_jax.recording import Recorder
    rec = object.__new__(Recorder)  # train's end-of-run check, on a log whose replay ended 50% off
    rec.log = {"model_gap": {"m": [0.1, 1.0]}}
    with pytest.warns(RuntimeWarning, match="history 'm': its replay ends 0.5"):
        rec.warn_if_model_gap({"w": jnp.full((4,), 1.0)})
    rec.log = {"model_gap": {"m": [0.01]}}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.warn_if_model_gap({"w": jnp.full((4,), 1.0)})
    comp = _comp()
    assert mj.Compressor.from_config(comp.config()) == comp
    assert mj.Compressor.from_config(mj.medu().config()) == mj.medu()
    plain = mj.medu(correction=False)  # configs without it are what they were before it existed
    assert mj.Compressor.from_config(plain.config()) == plain and "ModelCorrection" not in str(plain.config())


@pytest.fixture(scope="module")
def run():
    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, 6, seed=0, alpha=0.5)
    model = mj.models.MLP((16,), ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    cfg = mj.FedConfig(rounds=12, local_steps=3, batch_size=16, seed=2)
    comps = {"rows": mj.medu(correction=False), "corr": mj.medu()}
    return model, params0, clients, cfg, mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, comps)


def test_a_corrected_history_replays_the_trained_model(run):
    model, params0, clients, cfg, res = run
    rows, corr = res.histories["rows"], res.histories["corr"]
    assert corr.has_corrections and not rows.has_corrections
    e_rows = mj.rebuild_error(rows, res.params)
    e_corr = mj.rebuild_error(corr, res.params)
    assert e_corr < 0.1 * e_rows and e_corr < 0.01, (e_corr, e_rows)
    # the rows are the same bits: without corrections both histories replay the same model
    assert mj.rebuild_error(corr, res.params, corrections=False) == e_rows
    # the log's gap after the last round is the rebuild error's numerator (float32 replay in another order)
    from medu_jax.trees import tree_norm
    assert abs(res.log["model_gap"]["corr"][-1] / tree_norm(res.params) - e_corr) < 0.2 * e_corr + 1e-6
    # the corrections' bytes are counted, and small: one row per round against ~3 stored rows
    s = corr.summary()
    assert 0 < s["correction_bytes"] < 0.4 * s["bytes"] and s["bytes"] == rows.nbytes + s["correction_bytes"]
    # removing users leaves the corrections out unless asked; chunked replay adds them in the same round order
    same = lambda a, b: all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))  # noqa
    assert same(mj.replay(corr, [5]), mj.replay(rows, [5]))
    assert not same(mj.replay(corr, [5], corrections=True), mj.replay(rows, [5]))
    for a, b in zip(jax.tree.leaves(mj.replay(corr, chunk=4)), jax.tree.leaves(mj.replay(corr))):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="codes no model corrections"):
        mj.replay(rows, corrections=True)
    # a round appended from encode alone (no correction) makes the trajectory unknown: refused, not dropped
    import dataclasses
    mixed = dataclasses.replace(corr, records=list(corr.records))
    state = corr.compressor.init(jax.tree.map(lambda p: jnp.zeros((6, *p.shape)), params0))
    ups = jax.tree.map(lambda p: jnp.ones((6, *p.shape)), params0)
    mixed.append(corr.compressor.encode(ups, state, mj.compressor_key(cfg.seed, 12))[0], 12)
    with pytest.raises(ValueError, match="some rounds only"):
        mj.replay(mixed)


def test_corrections_need_fedavgs_step_and_every_round(run):
    model, params0, clients, cfg, _ = run
    with pytest.raises(ValueError, match="server optimizer"):
        mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, {"c": mj.medu(correction=True)},
                 server_tx=optax.sgd(1.0, momentum=0.9))
    with pytest.raises(ValueError, match="needs every round"):
        mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, {"c": mj.medu(correction=True)},
                 selections={"c": mj.history.Selection(every=2)})
