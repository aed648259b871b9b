"""The compressor chain: closed loop, layer semantics, real bytes, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import Phase, given, settings, strategies as st

import medu_jax as mj
from medu_jax.compressors import Compressor, Like, check_template
from medu_jax.history import compact, record_nbytes


class SmallMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(128)(x))
        x = nn.relu(nn.Dense(64)(x))
        return nn.Dense(10)(x)


def stacked_updates(params, k, key, scale=0.01):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten([scale * jax.random.normal(kk, (k, *p.shape)) for kk, p in zip(keys, leaves)])


def run_rounds(comp, rounds, k=6, seed=0):
    params = {"a": jnp.zeros((5, 3)), "b": {"c": jnp.zeros((7,))}}
    state = comp.init(stacked_updates(params, k, jax.random.key(0)))
    enc = jax.jit(comp.encode)
    out = []
    base = stacked_updates(params, k, jax.random.key(seed))
    for t in range(rounds):
        ups = jax.tree.map(lambda b, n: b + 0.3 * n, base, stacked_updates(params, k, jax.random.key(100 + t)))
        key = mj.compressor_key(seed, t)
        msg, state, dec, valid, stats = enc(ups, state, key)
        out.append((ups, msg, dec, valid, stats, key))
    return out


def test_issue_acceptance_flax_mlp_32_users_a2_2bits_below_one_twelfth():
    model = SmallMLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    ups = stacked_updates(params, 32, jax.random.key(1))
    comp = mj.chain(mj.user_sparsification(0.5), mj.differential_threshold(0.1), mj.lattice_coding("A2", 2))
    state = comp.init(ups)
    msg, state2, dec, valid, stats = jax.jit(comp.encode)(ups, state, mj.compressor_key(0, 0))
    f32 = sum(x.size * 4 for x in jax.tree.leaves(ups))
    stored = record_nbytes(compact(msg))
    assert stored < f32 / 12, (stored, f32)
    # every leaf of the record is a real array: the bytes add up
    assert stored == sum(a.nbytes for a in compact(msg).values())
    # decoding the stored message alone reproduces the encoder's closed-loop reconstruction bit for bit
    dec2, valid2, _ = jax.jit(comp.decode)(msg, state, mj.compressor_key(0, 0))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(dec2)))
    assert np.array_equal(valid, valid2)
    # the stored users' distortion is what the quantizer's second moment predicts: sum_leaf n * s^2 * G V^(2/L) step^2
    sel = np.asarray(msg.present)
    spec = comp.coder.spec
    sizes = np.array([x[0].size for x in jax.tree.leaves(ups)])
    scales = np.asarray(msg.rows["scales"], np.float64)[: sel.sum()]  # slots hold the present users, in order
    predicted = np.sum(scales**2 * sizes) * spec.error_variance()
    measured = float(jnp.sum(stats.sq_error * sel))
    assert abs(measured / predicted - 1) < 0.1, (measured, predicted)


@pytest.mark.parametrize(
    "comp",
    [
        mj.identity(),
        mj.lattice_coding("E8", 3),
        mj.user_sparsification(count=2, mode="topk"),
        mj.differential_threshold(0.5),
        mj.medu(0.5, 0.4, "D4", 2),
        mj.chain(mj.user_sparsification(0.5, missing="reweight"), mj.lattice_coding("Z", 4)),
    ],
    ids=["identity", "lattice", "sparsify", "threshold", "medu", "reweight"],
)
def test_decoder_replays_the_encoder_bit_for_bit(comp):
    rounds = run_rounds(comp, 5)
    state = comp.init(rounds[0][0])
    decode = jax.jit(comp.decode)
    for ups, msg, dec, valid, stats, key in rounds:
        dec2, valid2, state = decode(msg, state, key)
        assert np.array_equal(valid, valid2)
        for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(dec2)):
            assert np.array_equal(a, b)
            # rows of users that do not count are zero
            assert np.all(np.asarray(a)[~np.asarray(valid)] == 0)


@settings(max_examples=8, deadline=None)
@given(tau=st.sampled_from([0.0, 0.3, 0.9]), fraction=st.sampled_from([0.3, 0.5, 1.0]),
       mode=st.sampled_from(["random", "topk"]), k=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_sparsify_then_threshold_share_one_reference_with_the_same_bits(tau, fraction, mode, k, seed):
    """MEDU's sparsify (missing="last") + threshold keep one (K, d) state: the result (messages, decoded rows,
    valid masks), round by round with users dropping out, must equal the chain that keeps both states."""
    comp = mj.chain(mj.user_sparsification(fraction, mode=mode), mj.differential_threshold(tau),
                    mj.lattice_coding("A2", 3))
    assert comp.shares_reference

    def run(shared: bool):
        orig = Compressor.shares_reference
        Compressor.shares_reference = property(lambda self: shared and orig.fget(self))
        try:
            params = {"a": jnp.zeros((5, 3)), "b": {"c": jnp.zeros((7,))}}
            state = comp.init(stacked_updates(params, k, jax.random.key(0)))
            nbytes = sum(a.nbytes for a in jax.tree.leaves(state["filters"]))
            enc = jax.jit(lambda *a: comp.encode(*a))  # a new function: traced here, under this shares_reference
            out = []
            for t in range(6):
                kt = jax.random.fold_in(jax.random.key(seed), t)
                ups = stacked_updates(params, k, kt)
                active = jax.random.bernoulli(jax.random.fold_in(kt, 1), 0.7, (k,))
                msg, state, dec, valid, _ = enc(ups, state, mj.compressor_key(seed, t), active)
                out.append((msg, dec, valid))
            return out, nbytes
        finally:
            Compressor.shares_reference = orig

    (a, shared_bytes), (b, both_bytes) = run(True), run(False)
    for x, y in zip(a, b):
        assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    d = 5 * 3 + 7
    assert both_bytes - shared_bytes == k * d * 4 + k  # one float32 (K, d) state and its (K,) bool flags fewer


def test_identity_is_exact():
    for ups, msg, dec, valid, stats, key in run_rounds(mj.identity(), 2):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(ups)))
        assert np.all(np.asarray(valid)) and float(jnp.sum(stats.sq_error)) == 0.0


def test_threshold_zero_never_skips_and_huge_always_skips_after_first():
    never = run_rounds(mj.differential_threshold(0.0), 3)
    assert all(int(r[1].flags["threshold"]["skipped"].sum()) == 0 for r in never)
    always = run_rounds(mj.differential_threshold(1e9), 3)
    assert int(always[0][1].flags["threshold"]["skipped"].sum()) == 0
    for ups, msg, dec, valid, stats, key in always[1:]:
        assert np.all(np.asarray(msg.flags["threshold"]["skipped"]))
        assert not np.any(np.asarray(msg.present))
        # skipped users decode to their reference (the first round's update)
        for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(always[0][2])):
            assert np.array_equal(a, b)


def test_threshold_skips_small_changes_only():
    k = 4
    x = {"w": jnp.ones((k, 50))}
    comp = mj.differential_threshold(0.1)
    state = comp.init(x)
    _, state, _, _, _ = comp.encode(x, state, jax.random.key(0))
    y = {"w": x["w"].at[0].multiply(1.05).at[1].multiply(2.0)}  # user 0 changes 5%, user 1 by 100%
    msg, _, dec, _, _ = comp.encode(y, state, jax.random.key(1))
    skipped = np.asarray(msg.flags["threshold"]["skipped"])
    assert skipped.tolist() == [True, False, True, True]
    np.testing.assert_allclose(dec["w"][1], y["w"][1])
    np.testing.assert_allclose(dec["w"][0], x["w"][0])


def test_sparsify_counts_topk_and_missing_policies():
    k = 8
    norms = jnp.arange(1.0, k + 1)
    x = {"w": jnp.ones((k, 10)) * norms[:, None]}
    top = mj.user_sparsification(count=3, mode="topk")
    st = top.init(x)
    msg, st, dec, valid, _ = top.encode(x, st, jax.random.key(0))
    assert np.flatnonzero(msg.present).tolist() == [5, 6, 7]
    assert np.flatnonzero(valid).tolist() == [5, 6, 7]  # nothing stored before: missing users are left out
    y = {"w": x["w"] * -1.0}
    sel_rand = mj.user_sparsification(fraction=0.25)
    # "last": next round, unselected users reuse their last stored update
    msg2, st, dec2, valid2, _ = top.encode({"w": x["w"].at[:, :].set(x["w"][::-1])}, st, jax.random.key(1))
    assert np.flatnonzero(msg2.present).tolist() == [0, 1, 2]
    assert np.flatnonzero(valid2).tolist() == [0, 1, 2, 5, 6, 7]
    np.testing.assert_array_equal(dec2["w"][5:], x["w"][5:])
    rw = mj.user_sparsification(count=3, mode="topk", missing="reweight")
    st = rw.init(x)
    _, st, _, _, _ = rw.encode(x, st, jax.random.key(0))
    _, _, _, valid3, _ = rw.encode(y, st, jax.random.key(1))
    assert int(valid3.sum()) == 3
    st = sel_rand.init(x)
    m = sel_rand.encode(y, st, jax.random.key(2))[0]
    assert int(m.present.sum()) == 2


def test_inactive_users_are_never_stored():
    x = {"w": jnp.ones((5, 4))}
    comp = mj.medu(1.0, 0.0, "A2", 3)
    active = jnp.array([True, False, True, False, True])
    msg, _, dec, valid, stats = comp.encode(x, comp.init(x), jax.random.key(0), active)
    assert np.array_equal(msg.present, active) and np.array_equal(valid, active)
    assert np.all(np.asarray(dec["w"])[~np.asarray(active)] == 0)
    assert record_nbytes(compact(msg)) < record_nbytes(compact(comp.encode(x, comp.init(x), jax.random.key(0))[0]))


@settings(max_examples=8, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # no shrinking: each shape recompiles
@given(
    sizes=st.lists(st.sampled_from([1, 2, 3, 7, 33, 97]), min_size=1, max_size=4),
    k=st.integers(1, 5),
    magnitude=st.sampled_from(["zero", "tiny", "one", "huge"]),
    dtype=st.sampled_from(["float32", "bfloat16", "float16"]),
)
def test_property_odd_pytrees_round_trip(sizes, k, magnitude, dtype):
    # "huge" is the largest magnitude that stays finite in the leaf dtype (a 6-sigma normal draw still fits).
    scale = {"zero": 0.0, "tiny": 1e-20, "one": 1.0, "huge": float(jnp.finfo(dtype).max) / 8}[magnitude]
    x = {f"l{i}": (jax.random.normal(jax.random.key(i), (k, n)) * scale).astype(dtype) for i, n in enumerate(sizes)}
    assert all(np.all(np.isfinite(np.asarray(a, np.float32))) for a in x.values())
    comp = mj.medu(0.6, 0.2, "D4", 4)
    msg, state, dec, valid, stats = jax.jit(comp.encode)(x, comp.init(x), jax.random.key(3))
    assert jax.tree.structure(dec) == jax.tree.structure(x)
    for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(x)):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert np.all(np.isfinite(np.asarray(a, np.float32)))
    if magnitude == "zero":
        assert all(np.all(np.asarray(a) == 0) for a in jax.tree.leaves(dec))
    rec = compact(msg)
    assert record_nbytes(rec) == sum(a.nbytes for a in rec.values())


def test_config_round_trip_and_hashable():
    comp = mj.medu(0.3, 0.2, "E8", 3)
    again = Compressor.from_config(comp.config())
    assert again == comp and hash(again) == hash(comp)
    with pytest.raises(ValueError, match="unknown compressor layer"):
        Compressor.from_config([{"layer": "Gzip"}])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: mj.lattice_coding("B12"), "unknown lattice"),
        (lambda: mj.lattice_coding("A2", bits=0), "bits must be"),
        (lambda: mj.lattice_coding("A2", bits=20), "bits must be"),
        (lambda: mj.user_sparsification(1.5), "fraction must be in"),
        (lambda: mj.user_sparsification(mode="lottery"), "unknown sparsification mode"),
        (lambda: mj.user_sparsification(missing="guess"), "unknown missing-update policy"),
        (lambda: mj.differential_threshold(-1.0), "tau must be"),
        (lambda: mj.chain(mj.lattice_coding(), mj.user_sparsification()), "coder layer .* must come last"),
        (lambda: mj.chain(mj.differential_threshold(), mj.user_sparsification()), "MEDU's order"),
        (lambda: mj.chain(mj.lattice_coding(), mj.identity()), "at most one coder"),
    ],
)
def test_bad_configuration_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_updates_errors():
    tmpl = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((3, 2))}
    with pytest.raises(ValueError, match="structure"):
        mj.check_updates({"a": jnp.zeros((3, 4))}, tmpl)
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(3, 5\)"):
        mj.check_updates({"a": jnp.zeros((3, 4)), "b": jnp.zeros((3, 5))}, tmpl)
    with pytest.raises(TypeError, match="floating point"):
        mj.check_updates({"a": jnp.zeros((3, 4), jnp.int32), "b": jnp.zeros((3, 2))}, tmpl)
    with pytest.raises(ValueError, match=r"NaN or inf values \(users \[1\]\)"):
        mj.check_updates({"a": jnp.zeros((3, 4)).at[1, 2].set(jnp.nan), "b": jnp.zeros((3, 2))}, tmpl)
    with pytest.raises(TypeError, match="floating point"):
        check_template({"a": jnp.zeros((3, 4), jnp.int32)})
    with pytest.raises(ValueError, match="users on axis 0"):
        check_template({"a": jnp.zeros((3, 4)), "b": jnp.zeros((2, 4))})
    with pytest.raises(ValueError, match="scalar"):
        mj.identity().init({"a": jnp.zeros(())})
    with pytest.raises(TypeError, match="chain\\(\\) takes compressors"):
        mj.chain("lattice")


def test_like_static_structure():
    x = {"a": jnp.zeros((3, 4)), "b": jnp.zeros((3, 2), jnp.bfloat16)}
    like = Like.of(x)
    assert like.num_users == 3 and like.leaves[1] == ((3, 2), "bfloat16")


# ------------------------------------------------------------------ issue 15: the guard (no silent divergence)


def _guarded_chain(fraction, tau, lattice, bits, scale):
    parts = []
    if fraction is not None:
        parts.append(mj.user_sparsification(fraction))
    if tau is not None:
        parts.append(mj.differential_threshold(tau, reset=True))
    parts.append(mj.lattice_coding(lattice, bits, scale, guard=True))
    return mj.chain(*parts)


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(
    fraction=st.sampled_from([None, 0.5]),
    tau=st.sampled_from([None, 0.0, 0.3, 0.9]),
    lattice=st.sampled_from(["Z", "A2", "D4", "E8"]),
    bits=st.sampled_from([1, 1, 2, 3, 5, 8, 16]),
    scale=st.sampled_from(["maxabs", "rms"]),
    sizes=st.lists(st.sampled_from([1, 3, 7, 33, 130]), min_size=1, max_size=3),
    magnitude=st.sampled_from([0.0, 1e-36, 1e-3, 1.0, 1e36]),
    seed=st.integers(0, 2**20),
)
def test_property_a_guarded_chain_never_stores_a_row_worse_than_zero(fraction, tau, lattice, bits, scale, sizes,
                                                                     magnitude, seed):
    comp = _guarded_chain(fraction, tau, lattice, bits, scale)
    k = 5
    rng = np.random.default_rng(seed)
    walk = [rng.standard_normal((k, n)) for n in sizes]
    state = comp.init({f"l{i}": jnp.zeros((k, n)) for i, n in enumerate(sizes)})
    enc, dec_fn = jax.jit(comp.encode), jax.jit(comp.decode)  # both compiled, as in training and replay
    dstate = state
    for t in range(4):
        walk = [w + 0.5 * rng.standard_normal(w.shape) for w in walk]  # correlated rounds, so some are skipped
        ups = {f"l{i}": jnp.asarray(w * magnitude, jnp.float32) for i, w in enumerate(walk)}
        key = mj.compressor_key(seed, t)
        msg, state, dec, valid, stats = enc(ups, state, key)
        # float64 reference of every stored or skipped row's error against its update's own norm
        h = np.concatenate([np.asarray(ups[f"l{i}"], np.float64) for i in range(len(sizes))], axis=1)
        d = np.concatenate([np.asarray(dec[f"l{i}"], np.float64) for i in range(len(sizes))], axis=1)
        assert np.all(np.isfinite(d))
        err, nrm = np.linalg.norm(d - h, axis=1), np.linalg.norm(h, axis=1)
        skipped = np.asarray(msg.flags["threshold"]["skipped"]) if tau is not None else np.zeros(k, bool)
        rows = np.asarray(msg.present) | skipped
        assert np.all(err[rows] <= nrm[rows] * (1 + 1e-4) + 1e-30 * magnitude), (err, nrm, rows)
        fell = np.asarray(stats.fallback)
        assert not np.any(fell & ~np.asarray(msg.present))
        # a fallen row is stored with scale 0 and decodes to exactly zero; the decoder replays the encoder
        dec2, _, dstate = dec_fn(msg, dstate, key)
        for a, b in zip(jax.tree.leaves(dec), jax.tree.leaves(dec2)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_guard_counts_one_bit_fallbacks_and_keeps_the_closed_loop_bounded():
    # 1 bit with the maxabs scale decodes with an error above the row's norm: the guard stores zeros instead and
    # counts them; over 30 rounds the relative error stays <= 1 (unguarded, this chain diverged to 2.5e7)
    comp = mj.medu(0.5, 0.3, "A2", 1, guard=True)
    out = run_rounds(comp, 30)
    rel = [float(jnp.sum(s.sq_error) / jnp.sum(s.sq_norm)) for _, _, _, _, s, _ in out]
    assert max(rel) <= 1.0 + 1e-5
    fell = sum(int(jnp.sum(s.fallback)) for _, _, _, _, s, _ in out)
    assert fell > 0
    for _, msg, dec, _, s, _ in out:
        slots = np.flatnonzero(np.asarray(msg.present))
        zero_rows = np.all(np.asarray(msg.rows["scales"])[: len(slots)] == 0, axis=1)
        assert np.array_equal(zero_rows, np.asarray(s.fallback)[slots])


def test_guard_changes_no_bits_where_nothing_falls_back():
    plain = mj.medu(0.5, 0.3, "A2", 2)
    guarded = mj.chain(mj.user_sparsification(0.5), mj.differential_threshold(0.3),
                       mj.lattice_coding("A2", 2, guard=True))
    for (u1, m1, d1, v1, s1, _), (u2, m2, d2, v2, s2, _) in zip(run_rounds(plain, 5), run_rounds(guarded, 5)):
        assert not np.any(np.asarray(s2.fallback)) and s1.fallback is None
        for a, b in zip(jax.tree.leaves((m1, d1, v1, s1.sq_error)), jax.tree.leaves((m2, d2, v2, s2.sq_error))):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_reset_codes_a_key_frame_when_the_reference_is_worse_than_zero():
    comp = mj.chain(mj.differential_threshold(0.1, reset=True), mj.lattice_coding("E8", 8, clip="cover", guard=True))
    x = {"w": jax.random.normal(jax.random.key(0), (3, 40))}
    state = comp.init(x)
    _, state, _, _, _ = comp.encode(x, state, jax.random.key(1))
    flipped = {"w": -x["w"]}  # the reference (x) is farther from -x than zero is
    msg, state, dec, _, _ = comp.encode(flipped, state, jax.random.key(2))
    assert np.all(np.asarray(msg.flags["threshold"]["reset"]))
    np.testing.assert_allclose(np.asarray(dec["w"]), np.asarray(flipped["w"]), atol=0.05)


def test_a_closed_loop_that_cannot_work_is_refused_at_construction():
    with pytest.raises(ValueError, match="cannot work"):
        mj.medu(bits=1)
    with pytest.raises(ValueError, match="cannot work"):
        mj.chain(mj.differential_threshold(0.2), mj.lattice_coding("Z", 1, "rms"))
    mj.medu(bits=1, guard=True)
    mj.chain(mj.differential_threshold(0.2), mj.lattice_coding("Z", 1, "rms", clip="fit", gain="wiener"))
    mj.lattice_coding("A2", 1)  # open loop: no feedback to diverge
    with pytest.raises(ValueError, match="guard must be"):
        mj.lattice_coding(guard=-1.0)


def test_default_configs_are_unchanged_and_new_options_round_trip():
    assert mj.medu().config() == [
        {"layer": "UserSparsification", "fraction": 0.5, "count": None, "mode": "random", "missing": "last",
         "name": "sparsify"},
        {"layer": "DifferentialThreshold", "tau": 0.3, "name": "threshold"},  # what the suite and the docs use
        {"layer": "LatticeCoding", "lattice": "A2", "bits": 3, "scale": "maxabs", "clip": 1.0, "group_size": None,
         "name": "lattice", "entropy": "ans"},
        {"layer": "ModelCorrection", "lattice": "A2", "bits": 3, "scale": "maxabs", "clip": 1.0, "group_size": None,
         "name": "lattice", "guard": 1.0, "entropy": "ans"},
    ]
    assert "entropy" not in mj.medu(bits=2, entropy=None, correction=False).config()[-1]  # the earlier default's
    for comp in (mj.medu(bits=1, guard=True), mj.medu(scale="rms", clip="fit", gain="wiener"),
                 mj.lattice_coding("E8", 16, clip="cover"), mj.medu(bits=3, entropy="ans")):
        again = Compressor.from_config(comp.config())
        assert again == comp and hash(again) == hash(comp)
