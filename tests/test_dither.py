"""Statistical and property tests of the subtractive dithered lattice quantizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from medu_jax import dither as dither_mod
from medu_jax.dither import QuantizerSpec, dequantize, dither, quantize, uniform01
from medu_jax.lattices import A2, D4, E8, Z

ALL = ["Z", "A2", "D4", "E8"]


def roundtrip(x, key, spec):
    q = jax.jit(quantize, static_argnums=2)(x, key, spec)
    xh = jax.jit(dequantize, static_argnums=(3, 4, 5))(q.codes, q.scales, key, spec, x.shape[0], x.dtype)
    return q, xh


def error_stats(x, e, step):
    """Mean, variance, corr(e, x) and corr(e, frac(x/step)) -- the last is what a missing dither violates."""
    frac = x / step - np.round(x / step)
    return np.mean(e), np.var(e), np.corrcoef(e, x)[0, 1], np.corrcoef(e, frac)[0, 1]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bits", [2, 4])
def test_error_is_zero_mean_uncorrelated_with_predicted_variance(name, bits):
    n = 120_000
    spec = QuantizerSpec(name, bits, scale="rms", clip=16.0)  # wide codebook: no overload in this test
    x = jax.random.normal(jax.random.key(0), (n,)) * 3.0
    q, xh = roundtrip(x, jax.random.key(42), spec)
    assert int(q.overload) == 0
    s = float(q.scales[0])
    e = np.asarray(xh - x, np.float64) / s
    mean, var, c_x, c_frac = error_stats(np.asarray(x, np.float64) / s, e, spec.step)
    sd = np.sqrt(spec.error_variance())
    assert abs(mean) < 5 * sd / np.sqrt(n)
    assert abs(var / spec.error_variance() - 1) < 0.03
    assert abs(c_x) < 5 / np.sqrt(n) and abs(c_frac) < 5 / np.sqrt(n)


def test_statistics_detect_a_missing_or_wrong_dither():
    # the same statistics flag an undithered quantizer (error a function of x) and a decoder using another key.
    n = 120_000
    spec = QuantizerSpec("Z", 4, scale="rms", clip=16.0)
    x = np.asarray(jax.random.normal(jax.random.key(0), (n,)), np.float64) * 3.0
    s = np.sqrt(np.mean(x**2))
    u = x / s
    e_nodither = (np.round(u / spec.step) - u / spec.step) * spec.step
    assert abs(error_stats(u, e_nodither, spec.step)[3]) > 0.5
    q = quantize(jnp.asarray(x, jnp.float32), jax.random.key(1), spec)
    xh = dequantize(q.codes, q.scales, jax.random.key(2), spec, n)
    e_wrong = (np.asarray(xh, np.float64) - x) / s
    assert np.var(e_wrong) > 1.5 * spec.error_variance()  # an independent dither adds its own variance


@pytest.mark.parametrize("name", ALL)
def test_error_is_uniform_over_the_voronoi_cell(name):
    spec = QuantizerSpec(name, 3, scale="rms", clip=16.0)
    lat = spec.lattice
    n = 96_000
    x = jax.random.normal(jax.random.key(3), (n,))
    q, xh = roundtrip(x, jax.random.key(4), spec)
    assert int(q.overload) == 0
    s = float(q.scales[0])
    # blocks are strided: block j holds entries j, j + B, ...; error in lattice units, shape (L, B)
    e = np.asarray(xh - x, np.float64).reshape(lat.dim, -1) / (s * spec.step)
    # inside the Voronoi cell: its nearest lattice point is 0
    assert np.all(np.asarray(lat.nearest(jnp.asarray(e, jnp.float32))) == 0)
    # uniform over the cell <=> its basis coordinates mod 1 are uniform on the unit cube
    frac = np.mod(np.linalg.solve(lat.generator, e), 1.0)
    for coord in frac:
        hist, _ = np.histogram(coord, bins=20, range=(0, 1))
        expected = coord.size / 20
        chi2 = np.sum((hist - expected) ** 2 / expected)
        assert chi2 < 50, chi2  # 19 degrees of freedom: p < 1e-4 beyond 50
    if lat.dim == 2:
        hist, _, _ = np.histogram2d(frac[0], frac[1], bins=8, range=[[0, 1], [0, 1]])
        expected = frac.shape[1] / 64
        assert np.sum((hist - expected) ** 2 / expected) < 120  # 63 dof


def test_dither_is_deterministic_and_key_dependent():
    spec = QuantizerSpec("E8", 2)
    a, b = dither(jax.random.key(5), spec, 1000), dither(jax.random.key(5), spec, 1000)
    c = dither(jax.random.fold_in(jax.random.key(5), 1), spec, 1000)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    u = np.asarray(uniform01(jax.random.key(0), 200_000))
    assert u.min() >= 0 and u.max() < 1 and abs(u.mean() - 0.5) < 0.003 and abs(u.var() - 1 / 12) < 0.001


@pytest.mark.parametrize("name", ALL)
def test_same_key_same_bits_and_jit_equals_eager(name):
    spec = QuantizerSpec(name, 3)
    x = jax.random.normal(jax.random.key(0), (1001,))
    q1 = quantize(x, jax.random.key(9), spec)
    q2 = jax.jit(quantize, static_argnums=2)(x, jax.random.key(9), spec)
    q3 = quantize(x, jax.random.key(10), spec)
    assert np.array_equal(q1.codes, q2.codes) and np.array_equal(q1.scales, q2.scales)
    assert not np.array_equal(q1.codes, q3.codes)
    assert int(q1.codes.max()) < 2**3


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=10)  # each new (n, bits, group, scale) compiles a program
@given(
    n=st.integers(1, 700),
    bits=st.integers(1, 8),
    magnitude=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e4, 1e30]),
    group=st.sampled_from([None, 8, 64]),
    scale=st.sampled_from(["maxabs", "rms"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_error_bounded_per_block_except_overload(name, n, bits, magnitude, group, scale, seed):
    spec = QuantizerSpec(name, bits, scale=scale, group_size=group)
    lat = spec.lattice
    x = jax.random.normal(jax.random.key(seed), (n,)) * magnitude
    q, xh = roundtrip(x, jax.random.key(seed + 1), spec)
    layout = spec.layout(n)
    npad = layout.padded
    assert q.codes.shape == (npad,) and q.scales.shape == (layout.num_groups,)
    assert np.all(np.isfinite(np.asarray(xh))) and xh.shape == (n,) and xh.dtype == x.dtype
    if magnitude == 0.0:
        assert np.all(np.asarray(xh) == 0)
        return
    # per block: ||error / scale|| <= covering radius * step, unless the block overloaded. Blocks are strided
    # over the padded vector: block j holds entries j, j + B, ..., j + (L - 1) B.
    err = np.zeros(npad)
    err[:n] = np.asarray(xh, np.float64) - np.asarray(x, np.float64)
    s = np.asarray(q.scales, np.float64)[layout.seg_ids]
    err_units = (err / np.where(s > 0, s, 1)).reshape(lat.dim, -1)
    block_norm = np.linalg.norm(err_units, axis=0) / spec.step
    assert np.sum(block_norm > lat.covering_radius * (1 + 1e-3) + 1e-3) <= int(q.overload)


@pytest.mark.parametrize("name", ["D4", "E8"])
def test_gathered_ladder_equals_the_dense_ladder(name, monkeypatch):
    # a large segment with overload: the ladder on gathered blocks gives the same codes as on every block
    spec = QuantizerSpec(name, 3, scale="rms", clip=2.5)
    x = jax.random.normal(jax.random.key(0), (8 * 600,))
    sparse = quantize(x, jax.random.key(1), spec)
    monkeypatch.setattr(dither_mod, "LADDER_DENSE_BLOCKS", 10**9)
    dense = quantize(x, jax.random.key(1), spec)
    assert 0 < int(sparse.overload) <= -(-x.shape[0] // spec.lattice.dim // dither_mod.LADDER_SHARE)
    assert int(sparse.overload) == int(dense.overload)
    np.testing.assert_array_equal(np.asarray(sparse.codes), np.asarray(dense.codes))


def test_float64_and_low_precision_leaves():
    spec = QuantizerSpec("D4", 6)
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(0), (300,), jnp.float64)
        q, xh = roundtrip(x, jax.random.key(1), spec)
        assert xh.dtype == jnp.float64
        assert np.max(np.abs(np.asarray(xh - x))) < 4 * spec.step * float(q.scales[0])
    xb = jax.random.normal(jax.random.key(0), (300,)).astype(jnp.bfloat16)
    q = quantize(xb, jax.random.key(1), spec)
    xh = dequantize(q.codes, q.scales, jax.random.key(1), spec, 300, jnp.bfloat16)
    assert xh.dtype == jnp.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lattice="Q9"), "unknown lattice"),
        (dict(lattice="A2", bits=0), "bits must be"),
        (dict(lattice="A2", bits=33), "bits must be"),
        (dict(lattice="A2", scale="median"), "unknown scale mode"),
        (dict(lattice="A2", clip=-1.0), "clip must be positive"),
        (dict(lattice="A2", ladder=(0.5, 0.0)), "ladder must start"),
        (dict(lattice="A2", group_size=0), "group_size"),
    ],
)
def test_bad_quantizer_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizerSpec(**kwargs)


@pytest.mark.parametrize("name", ["Z", "E8"])
def test_coder_rows_are_the_packed_per_user_quantizer_codes(name):
    # the batched coder (vmapped, with a fusion boundary before packing) and the 1-D quantizer give the same bits
    from medu_jax.compressors import LatticeCoding, Like
    from medu_jax.packing import pack_bits

    coder = LatticeCoding(name, 3)
    x = {"w": jax.random.normal(jax.random.key(0), (3, 37)), "b": jax.random.normal(jax.random.key(1), (3, 5))}
    users = jnp.array([4, 0, 7])
    rows, overload = jax.jit(lambda v: coder.encode(v, jax.random.key(2), Like.of(v), users))(x)
    layout = coder.layout(Like.of(x))
    assert int(overload) >= 0
    for i, u in enumerate(users):
        segments = [leaf[i].reshape(-1) for leaf in jax.tree.leaves(x)]
        q = dither_mod.quantize_segments(segments, jax.random.fold_in(jax.random.key(2), u), coder.spec, layout)
        np.testing.assert_array_equal(np.asarray(rows["words"][i]), np.asarray(pack_bits(q.codes, 3)))
        np.testing.assert_array_equal(np.asarray(rows["scales"][i]), np.asarray(q.scales))


def test_materialize_is_a_fusion_boundary_that_the_cpu_compiler_keeps():
    # if XLA folded the conditional away, the quantizer would again be fused into (and recomputed by) the packer
    f = jax.jit(lambda x, t: dither_mod.materialize(x * 2.0 + 1.0, t).sum())
    x = jnp.arange(10.0)
    assert float(f(x, jnp.int32(3))) == float((x * 2 + 1).sum())
    hlo = f.lower(x, jnp.int32(3)).compile().as_text()
    assert ("conditional(" in hlo) == (jax.default_backend() == "cpu")  # elsewhere a no-op


# ------------------------------------------------------------------ issue 15: tiny scales, cover, gain, bits kept


def _digest(*arrays) -> str:
    import hashlib

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.asarray(a).tobytes())
    return h.hexdigest()[:16]


# sha256 prefixes of (codes, scales, overload, decoded) of a fixed N(0, 0.01^2) vector of 3001 entries, key 3,
# computed with the quantizer before the issue-15 changes: the defaults (and every option that existed) keep
# their bits for normal-range inputs.
GOLDEN = {
    ("A2", 2, "maxabs", None): "c8f65b2ea7e30fcf",
    ("Z", 16, "maxabs", None): "fef9e0f73de637e6",
    ("E8", 3, "rms", 64): "031b4d6e1abead05",
    ("D4", 1, "rms", None): "140f5c8ae716e0e9",
}


def _golden_case(lat, bits, scale, group):
    x = jax.random.normal(jax.random.key(7), (3001,)) * 0.01
    spec = QuantizerSpec(lat, bits, scale, group_size=group)
    q = quantize(x, jax.random.key(3), spec)
    xh = dequantize(q.codes, q.scales, jax.random.key(3), spec, x.shape[0])
    return _digest(q.codes, q.scales, q.overload, xh)


@pytest.mark.parametrize("case", list(GOLDEN))
def test_defaults_keep_their_bits_on_normal_inputs(case):
    assert _golden_case(*case) == GOLDEN[case]


def _rel_err(x, xh):
    x64 = np.asarray(x, np.float64)
    return np.linalg.norm(np.asarray(xh, np.float64) - x64) / np.linalg.norm(x64)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("peak", [1e-37, 1e-34, 1e-25])
def test_tiny_vectors_code_at_16_bits(name, peak):
    # (1/step)/scale overflowed float32 for a max below ~1e-34 at 16 bits: the vector decoded to ~0 (error 1)
    spec = QuantizerSpec(name, 16, clip="cover")
    x = jax.random.normal(jax.random.key(0), (500,))
    x = x / jnp.max(jnp.abs(x)) * peak
    q, xh = roundtrip(x, jax.random.key(1), spec)
    assert int(q.overload) == 0
    assert np.all(np.isfinite(np.asarray(xh)))
    # float64 reference: the 16-bit error bound (covering radius x step x scale per block), far below 1
    assert _rel_err(x, xh) < 1e-3


def test_tiny_groups_next_to_normal_groups_keep_the_normal_groups_bits():
    spec = QuantizerSpec("A2", 16, clip="cover", group_size=64)
    x = jax.random.normal(jax.random.key(0), (256,))
    tiny = x.at[:64].multiply(1e-36)
    q0, xh0 = roundtrip(x, jax.random.key(1), spec)
    q1, xh1 = roundtrip(tiny, jax.random.key(1), spec)
    np.testing.assert_array_equal(np.asarray(q0.codes)[64:], np.asarray(q1.codes)[64:])
    np.testing.assert_array_equal(np.asarray(xh0)[64:], np.asarray(xh1)[64:])
    assert _rel_err(tiny[:64], xh1[:64]) < 1e-3


@pytest.mark.parametrize("name", ["A2", "D4", "E8"])
def test_cover_clip_removes_the_high_rate_overload_of_maxabs(name):
    # a block at a corner of the max-abs cube lies outside the coarse cell of clip 1 (A2's hexagon of the square's
    # area cuts its corners): shrunk by 0.75, a 16-bit code then has a 25% error there. clip="cover" fits the cube.
    lat = QuantizerSpec(name).lattice
    n = 64 * lat.dim
    x = np.array(jax.random.uniform(jax.random.key(0), (n,), minval=-1, maxval=1))
    x.reshape(lat.dim, -1)[:, :8] = 0.999  # eight blocks at the corner (blocks are strided)
    x = jnp.asarray(x)
    q0, xh0 = roundtrip(x, jax.random.key(1), QuantizerSpec(name, 16))
    q1, xh1 = roundtrip(x, jax.random.key(1), QuantizerSpec(name, 16, clip="cover"))
    assert int(q0.overload) >= 8 and _rel_err(x, xh0) > 1e-2
    assert int(q1.overload) == 0 and _rel_err(x, xh1) < 1e-4


@pytest.mark.parametrize("name", ALL)
@settings(max_examples=6, deadline=None)
@given(bits=st.sampled_from([4, 6, 9, 12, 16]), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1),
       magnitude=st.sampled_from([1e-36, 1e-3, 1.0, 1e35]))
def test_property_cover_never_overloads_where_it_pays_the_margin(name, bits, n, seed, magnitude):
    spec = QuantizerSpec(name, bits, clip="cover")
    from medu_jax.dither import cover_clip, _cell_geometry

    normals, rho, zmax = _cell_geometry(spec.lattice)
    if (zmax + spec.lattice.covering_radius) / (rho * 2.0**bits) > 0.2:  # below the margin's threshold
        return
    x = jax.random.uniform(jax.random.key(seed), (n,), minval=-1, maxval=1) * magnitude
    q, xh = roundtrip(x, jax.random.key(seed + 1), spec)
    assert int(q.overload) == 0
    assert np.all(np.isfinite(np.asarray(xh)))
    assert spec.clip == pytest.approx(cover_clip(spec.lattice, bits))


def test_cover_clip_values():
    from medu_jax.dither import cover_clip
    from medu_jax.lattices import LATTICES

    asym = {"Z": 1.0, "A2": 2 * 0.5 * (1 + 3**0.5) / 2 * (3**0.5 / 2) ** 0.5 / 1.0 / 1.0, "D4": 2**0.25, "E8": 2.0}
    # A2: h = 1.366 (normal (1/2, sqrt3/2)), V^(1/2) = (sqrt3/2)^(1/2), packing radius 1/2 -> 1.271
    assert cover_clip(LATTICES["A2"], 16) == pytest.approx(1.2712, abs=1e-3)
    for name, c in asym.items():
        assert cover_clip(LATTICES[name], 16) == pytest.approx(c, rel=1e-3), name
        assert cover_clip(LATTICES[name], 8) >= cover_clip(LATTICES[name], 16)


@pytest.mark.parametrize("name", ["Z", "A2"])
def test_wiener_gain_makes_one_bit_codes_beat_storing_zeros(name):
    # every unbiased 1-bit option has an MSE above the variance (zeros); the shrinkage on decode goes below it
    x = jax.random.normal(jax.random.key(0), (40_000,))
    for kw in (dict(scale="maxabs"), dict(scale="rms")):
        _, xh = roundtrip(x, jax.random.key(1), QuantizerSpec(name, 1, **kw))
        assert np.mean((np.asarray(xh, np.float64) - np.asarray(x)) ** 2) > 1.0
    spec = QuantizerSpec(name, 1, "rms", clip="fit", gain="wiener")
    _, xh = roundtrip(x, jax.random.key(1), spec)
    mse = np.mean((np.asarray(xh, np.float64) - np.asarray(x, np.float64)) ** 2) / np.var(np.asarray(x))
    assert mse < 0.8
    assert spec.decode_gain == pytest.approx(1 / (1 + spec.error_variance()))


def test_gain_scales_the_unbiased_reconstruction():
    x = jax.random.normal(jax.random.key(0), (999,))
    _, xh = roundtrip(x, jax.random.key(1), QuantizerSpec("E8", 3, "rms"))
    _, xg = roundtrip(x, jax.random.key(1), QuantizerSpec("E8", 3, "rms", gain=0.5))
    np.testing.assert_allclose(np.asarray(xg), 0.5 * np.asarray(xh), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lattice="A2", clip="big"), "unknown clip rule"),
        (dict(lattice="A2", clip="cover", scale="rms"), "needs scale=\"maxabs\""),
        (dict(lattice="A2", clip="fit"), "scale=\"rms\""),
        (dict(lattice="A2", gain="wiener"), "needs scale=\"rms\""),
        (dict(lattice="A2", gain=1.5), "gain must be"),
        (dict(lattice="A2", gain=0.0), "gain must be"),
        (dict(lattice="A2", gain="loud", scale="rms"), "unknown gain rule"),
        (dict(lattice="A2", clip=float("inf")), "clip must be positive"),
    ],
)
def test_bad_new_quantizer_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantizerSpec(**kwargs)


def test_d4_high_rate_jit():
    # with the shrink ladder unrolled, jitted D4 at >= 12 bits coded a block of some vectors hundreds of steps
    # off (eager was right; not understood, an xfail until then); with the ladder in a lax.scan the jitted codes
    # are within one step of the eager ones (1 of 500 entries differs by 1: a float tie at 16 bits)
    spec = QuantizerSpec("D4", 16, clip=1.3)
    qf = jax.jit(quantize, static_argnums=2)
    df = jax.jit(dequantize, static_argnums=(3, 4, 5))
    worst = 0.0
    for k in range(12):
        x = jax.random.normal(jax.random.key(k), (500,))
        x = x / jnp.max(jnp.abs(x))
        q = qf(x, jax.random.key(1), spec)
        eager = np.asarray(quantize(x, jax.random.key(1), spec).codes).astype(np.int64)
        assert np.max(np.abs(np.asarray(q.codes).astype(np.int64) - eager)) <= 1
        worst = max(worst, float(jnp.max(jnp.abs(df(q.codes, q.scales, jax.random.key(1), spec, 500, x.dtype) - x))))
    assert worst < 50 * spec.step
