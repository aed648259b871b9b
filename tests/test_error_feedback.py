"""Error feedback (issue 15, item 3): each user's decoded updates add up to its true updates, up to its carry.

The references are float64 NumPy sums of the true updates and of the decoded rows the encoder returned.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings, strategies as st

import medu_jax as mj
from medu_jax.compressors import Compressor, ErrorFeedback, LatticeCoding, UserSparsification

EPS32 = float(np.finfo(np.float32).eps)


def _flat(tree) -> np.ndarray:
    leaves = jax.tree.leaves(tree)
    return np.concatenate([np.asarray(x, np.float64).reshape(x.shape[0], -1) for x in leaves], axis=1)


def _walk(rng, sizes, k, rounds, magnitude, zero_rounds, drift=0.3):
    """Correlated rounds (a drifting mean plus noise, like SGD updates), per-round magnitudes, some rounds zero."""
    mean = [rng.standard_normal((k, n)) for n in sizes]
    out = []
    for t in range(rounds):
        mean = [m + drift * rng.standard_normal(m.shape) for m in mean]
        amp = 0.0 if t in zero_rounds else magnitude * float(rng.choice([0.5, 1.0, 2.0]))
        out.append({f"l{i}": jnp.asarray(amp * (m + 0.5 * rng.standard_normal(m.shape)), jnp.float32)
                    for i, m in enumerate(mean)})
    return out


def _run(comp, updates, seed, active=None, check_decoder=True):
    """Encodes the rounds with ``comp`` (compiled) and decodes them with a fresh decoder state, checking that the
    decoder gives the encoder's rows bit for bit. Returns (float64 true updates, decoded rows, messages, carry)."""
    state = dstate = comp.init(updates[0])
    enc, dec = jax.jit(comp.encode), jax.jit(comp.decode)
    hs, ds, msgs = [], [], []
    for t, ups in enumerate(updates):
        key = mj.compressor_key(seed, t)
        act = None if active is None else jnp.asarray(active[t])
        msg, state, d, valid, _ = enc(ups, state, key, act)
        if check_decoder:
            d2, valid2, dstate = dec(msg, dstate, key)
            assert np.array_equal(np.asarray(valid), np.asarray(valid2))
            for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(d2)):
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        hs.append(_flat(ups)), ds.append(_flat(d)), msgs.append(msg)
    carry = _flat(state["filters"][0]["carry"]) if comp.feedback is not None else None
    return np.stack(hs), np.stack(ds), msgs, carry


def _check_carry_is_the_sum_error(h, d, carry, active=None):
    """The encoder's carry is sum(true) - sum(decoded) of each user (float64 reference; the carry is float32
    arithmetic, one rounding per round)."""
    if active is not None:
        h = h * np.asarray(active, np.float64)[:, :, None]
    ref = h.sum(0) - d.sum(0)
    scale = np.maximum(np.abs(h).max(axis=(0, 2)), np.abs(d).max(axis=(0, 2)))[:, None]
    assert np.all(np.abs(carry - ref) <= 4 * len(h) * EPS32 * scale), np.abs(carry - ref).max()
    return ref


@settings(max_examples=4, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # each shape recompiles (E8: slow)
@given(
    sizes=st.lists(st.sampled_from([1, 2, 3, 7, 33, 130]), min_size=1, max_size=3),
    k=st.integers(1, 5),
    lattice=st.sampled_from(["Z", "A2", "D4", "E8"]),
    bits=st.sampled_from([2, 3, 4, 8]),
    magnitude=st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
    zero_rounds=st.sets(st.integers(0, 9), max_size=3),
    seed=st.integers(0, 2**20),
)
def test_property_the_sum_error_stays_about_one_rounds_coding_error(sizes, k, lattice, bits, magnitude,
                                                                     zero_rounds, seed):
    """EF + lattice coding over 10 rounds: sum(decoded) - sum(true) is the carry, and stays within 3x the
    largest error of one round coded alone (the same coder and key on that round's update, no feedback)."""
    rng = np.random.default_rng(seed)
    updates = _walk(rng, sizes, k, 10, magnitude, zero_rounds)
    comp = mj.chain(mj.error_feedback(), mj.lattice_coding(lattice, bits))
    h, d, _, carry = _run(comp, updates, seed, check_decoder=False)  # (the other tests check the decoder)
    err = np.linalg.norm(_check_carry_is_the_sum_error(h, d, carry), axis=1)
    # one round's error: each round's own update coded alone, i.e. with a zero carry (the same coder and key as
    # the plain lattice_coding(lattice, bits), and the same compiled program)
    enc = jax.jit(comp.encode)
    one = np.stack([np.linalg.norm(_flat(enc(u, comp.init(u), mj.compressor_key(seed, t))[2]) - h[t], axis=1)
                    for t, u in enumerate(updates)]).max(0)
    assert np.all(np.isfinite(d))
    assert np.all(err <= 3 * one + 1e-30 * magnitude + 1e-45), (err, one)
    if magnitude == 0.0:
        assert np.all(d == 0) and np.all(carry == 0)


@settings(max_examples=6, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    sizes=st.lists(st.sampled_from([1, 3, 7, 33, 130]), min_size=1, max_size=3),
    k=st.integers(1, 6),
    fraction=st.sampled_from([None, 0.3, 0.5]),
    tau=st.sampled_from([None, 0.0, 0.3, 0.9]),
    lattice=st.sampled_from(["Z", "A2", "D4"]),
    bits=st.sampled_from([2, 4]),
    magnitude=st.sampled_from([0.0, 1e-30, 1.0, 1e30]),
    seed=st.integers(0, 2**20),
)
def test_property_nothing_is_lost_sparsified_and_thresholded_rounds_are_carried(sizes, k, fraction, tau, lattice,
                                                                               bits, magnitude, seed):
    """With sparsification (missing="zero") and thresholding, a user's sum error is exactly what its rows left
    out since its last stored row: the true updates of the rounds after it, plus that row's own error (the
    target it coded, update + carry, minus what it decoded to). Users drop out of rounds (inactive)."""
    rng = np.random.default_rng(seed)
    updates = _walk(rng, sizes, k, 8, magnitude, set())
    active = rng.random((8, k)) < 0.8
    layers = [mj.error_feedback()]
    if fraction is not None:
        layers.append(mj.user_sparsification(fraction, missing="zero"))
    if tau is not None:
        layers.append(mj.differential_threshold(tau, reset=True))
    comp = mj.chain(*layers, mj.lattice_coding(lattice, bits))
    h, d, msgs, carry = _run(comp, updates, seed, active)
    sum_err = _check_carry_is_the_sum_error(h, d, carry, active)
    ha = h * active[:, :, None]
    # float64 replay of the carry recursion: target = update + carry, carry' = target - decoded (active users)
    c = np.zeros_like(ha[0])
    for t in range(len(ha)):
        target = ha[t] + c
        # users whose row the round stored or skipped by the threshold decode their target up to the coding
        # error or tau; sparsified (and inactive) users decode zero
        stored = np.asarray(msgs[t].present)
        skipped = np.asarray(msgs[t].flags["threshold"]["skipped"]) if tau is not None else np.zeros(k, bool)
        out = active[t] & ~stored & ~skipped
        assert np.all(d[t][out] == 0)
        c = np.where(active[t][:, None], target - d[t], c)
        if tau is not None and tau > 0:  # a skipped row's error is below tau times its target
            n_err, n_tgt = np.linalg.norm((target - d[t])[skipped], axis=1), np.linalg.norm(target[skipped], axis=1)
            assert np.all(n_err <= tau * n_tgt * (1 + 1e-5) + 1e-38)
    scale = np.abs(ha).max() + np.abs(d).max()
    np.testing.assert_allclose(c, sum_err, rtol=0, atol=8 * len(ha) * EPS32 * scale + 1e-45)


def _sum_errors(comp, rounds, k=8, n=257, seed=0):
    rng = np.random.default_rng(seed)
    updates = _walk(rng, [n], k, rounds, 1.0, set(), drift=0.0)  # stationary: every round of the same size
    h, d, _, _ = _run(comp, updates, seed)
    return np.linalg.norm(h.sum(0) - d.sum(0), axis=1), np.linalg.norm(h, axis=2).mean()


def test_error_feedback_keeps_the_sum_error_flat_in_rounds_where_plain_coding_grows():
    ef = mj.chain(mj.error_feedback(), mj.lattice_coding("A2", 2))
    plain = mj.lattice_coding("A2", 2)
    e15, h15 = _sum_errors(ef, 15)
    e60, h60 = _sum_errors(ef, 60)
    p60, _ = _sum_errors(plain, 60)
    # flat: about one round's error (A2 at 2 bits: ~0.6-0.75 of the round's norm) after 15 and 60 rounds
    assert e60.mean() < 1.3 * e15.mean() and e60.mean() < h60
    assert p60.mean() > 4 * e60.mean()  # plain coding: every round's error adds up (a random walk)


def test_medu_with_error_feedback_keeps_the_sum_error_bounded():
    comp = mj.medu(0.5, 0.3, "A2", 2, error_feedback=True)
    e60, h = _sum_errors(comp, 60)
    base, _ = _sum_errors(mj.medu(0.5, 0.3, "A2", 2), 60)
    # the carry holds the rounds skipped since the last stored row (one on average at fraction 0.5)
    assert e60.mean() < 3 * h and base.mean() > 2 * e60.mean()


def test_decoder_ignores_the_carry_and_replays_the_encoder_bit_for_bit():
    comp = mj.medu(0.5, 0.3, "D4", 3, error_feedback=True)
    rng = np.random.default_rng(1)
    updates = _walk(rng, [5, 33], 6, 6, 1.0, set())
    _run(comp, updates, 3)  # asserts bit-for-bit equality round by round
    # a decoder state whose carry holds garbage decodes the same rows: the decoder never reads it
    state = comp.init(updates[0])
    msg, *_ = jax.jit(comp.encode)(updates[0], state, mj.compressor_key(3, 0))
    junk = {**state, "filters": (jax.tree.map(lambda c: c + 7.0, state["filters"][0]),) + state["filters"][1:]}
    dec = jax.jit(comp.decode)
    a = dec(msg, state, mj.compressor_key(3, 0))[0]
    b, _, st2 = dec(msg, junk, mj.compressor_key(3, 0))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(st2["filters"][0]),
                                                     jax.tree.leaves(junk["filters"][0])))



def test_the_replay_decoder_state_holds_no_carry_and_decodes_the_same_bits():
    """unlearn._init_state (the state replay and recovery decode with) leaves the encoder-only carry out; decoding
    every round from it gives the encoder's rows bit for bit, as from the full state."""
    from medu_jax.compressors import Like
    from medu_jax.unlearn import _init_state

    comp = mj.medu(0.5, 0.3, "A2", 2, error_feedback=True)
    updates = _walk(np.random.default_rng(5), [7, 33], 6, 6, 1.0, set())
    _, ds, msgs, _ = _run(comp, updates, 2, check_decoder=False)
    small, full = _init_state(comp, Like.of(updates[0])), comp.init(updates[0])
    assert small["filters"][0] == {} and full["filters"][0]["carry"]
    nbytes = lambda st: sum(a.nbytes for a in jax.tree.leaves(st["filters"]))  # noqa: E731
    assert nbytes(full) - nbytes(small) == 6 * 40 * 4  # the (K, d) float32 carry
    dec = jax.jit(comp.decode)
    for t, msg in enumerate(msgs):
        a, va, full = dec(msg, full, mj.compressor_key(2, t))
        b, vb, small = dec(msg, small, mj.compressor_key(2, t))
        assert np.array_equal(np.asarray(va), np.asarray(vb)) and small["filters"][0] == {}
        assert np.array_equal(_flat(a), _flat(b)) and np.array_equal(_flat(b), ds[t])

def test_the_chain_without_feedback_keeps_its_bits_and_selections():
    """error_feedback adds no key position: the same sparsification draws, and with a zero carry (first round)
    the same message as the chain without it (what the property test above relies on for one round's error)."""
    rng = np.random.default_rng(2)
    ups = _walk(rng, [7, 33], 6, 1, 1.0, set())[0]
    plain = mj.chain(mj.user_sparsification(0.5, missing="zero"), mj.differential_threshold(0.3, reset=True),
                     mj.lattice_coding("A2", 2))
    ef = mj.medu(0.5, 0.3, "A2", 2, error_feedback=True)
    key = mj.compressor_key(0, 0)
    m1 = jax.jit(plain.encode)(ups, plain.init(ups), key)[0]
    m2 = jax.jit(ef.encode)(ups, ef.init(ups), key)[0]
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)))


def test_config_round_trip_state_size_and_refusals():
    comp = mj.medu(0.5, 0.3, "A2", 2, error_feedback=True)
    cfg = comp.config()
    assert cfg[0] == {"layer": "ErrorFeedback", "name": "feedback"}
    assert cfg[1]["missing"] == "zero" and cfg[2]["reset"] is True
    assert Compressor.from_config(cfg) == comp and hash(Compressor.from_config(cfg)) == hash(comp)
    assert mj.medu().config() == mj.medu(error_feedback=False).config()  # the default is unchanged
    # encoder state: the carry (float32 (K, d)) and the threshold's reference (K, d) with its (K,) flags
    k, d = 4, 10
    tmpl = {"w": jnp.zeros((k, d))}
    nbytes = lambda c: sum(a.nbytes for a in jax.tree.leaves(c.init(tmpl)["filters"]))  # noqa: E731
    assert nbytes(comp) == 2 * k * d * 4 + k
    assert nbytes(mj.chain(mj.error_feedback(), mj.lattice_coding())) == k * d * 4
    # bfloat16 leaves: the carry is float32
    st16 = mj.chain(mj.error_feedback(), mj.lattice_coding()).init({"w": jnp.zeros((k, d), jnp.bfloat16)})
    assert st16["filters"][0]["carry"]["w"].dtype == jnp.float32
    with pytest.raises(ValueError, match="missing='zero'"):
        mj.chain(mj.error_feedback(), mj.user_sparsification(0.5), mj.lattice_coding())
    with pytest.raises(ValueError, match="missing='zero'"):
        mj.medu(error_feedback=True, missing="reweight")
    with pytest.raises(ValueError, match="1-bit"):
        mj.chain(mj.error_feedback(), mj.lattice_coding("A2", 1))
    with pytest.raises(ValueError, match="MEDU's order"):
        Compressor((UserSparsification(0.5, missing="zero"), ErrorFeedback(), LatticeCoding()))
    with pytest.raises(ValueError, match="rms"):
        mj.chain(mj.error_feedback(), mj.lattice_coding("A2", 2, scale="rms"))
    mj.chain(mj.error_feedback(), mj.lattice_coding("A2", 1, guard=True))  # a guarded 1-bit coder is allowed


def test_low_precision_leaves_carry_their_rounding():
    """bfloat16 updates: the target is rounded to the leaf dtype, and what the rounding left out is carried."""
    k, n = 3, 50
    comp = mj.chain(mj.error_feedback(), mj.identity())
    rng = np.random.default_rng(4)
    ups = [{"w": jnp.asarray(rng.standard_normal((k, n)), jnp.bfloat16)} for _ in range(30)]
    h, d, _, carry = _run(comp, ups, 0)
    ref = h.sum(0) - d.sum(0)
    np.testing.assert_allclose(carry, ref, atol=1e-4)
    assert np.abs(ref).max() < 0.02  # one bfloat16 rounding of a sum of O(1) values, not 30 of them
