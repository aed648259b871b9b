"""Entropy coding of the stored code words (lattice_coding(..., entropy="ans")): lossless, real bytes, same bits."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import medu_jax as mj
from medu_jax import store as S
from medu_jax.compressors import Compressor, chain, differential_threshold, lattice_coding, user_sparsification
from medu_jax.dither import QuantizerSpec, dithered_entropy, entropy_clip, quantize
from medu_jax.entropy import ANS, RAW, decode_words, encode_words, pack_codes, unpack_codes
from medu_jax.history import History, compact, compressor_key, record_nbytes
from medu_jax.packing import num_words, pack_bits


def words_of(codes: np.ndarray, bits: int) -> np.ndarray:
    return np.asarray(pack_bits(jnp.asarray(codes, jnp.uint32), bits))


@st.composite
def word_arrays(draw):
    """Packed words (rows, bits, W): random bits everywhere (padding included), or codes drawn from a peaked
    distribution around 0 (as the rms scale's codes are), or one constant code; 0 rows and odd sizes too."""
    bits = draw(st.integers(1, 16))
    rows = draw(st.integers(0, 4))
    n = draw(st.integers(0, 100))
    kind = draw(st.sampled_from(["raw", "peaked", "constant"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "raw":
        return rng.integers(0, 2**32, (rows, bits, num_words(n)), dtype=np.uint64).astype(np.uint32), bits
    if kind == "peaked":
        codes = np.round(rng.normal(0, draw(st.floats(0.1, 20.0)), (rows, n))).astype(np.int64) % 2**bits
    else:
        codes = np.full((rows, n), draw(st.integers(0, 2**bits - 1)))
    return words_of(codes, bits), bits


@settings(max_examples=60)
@given(word_arrays())
def test_property_decode_gives_back_the_exact_words(case):
    words, bits = case
    coded = encode_words(words, bits)
    assert coded.dtype == np.uint32 and coded.ndim == 1
    assert coded.nbytes <= words.nbytes + 4  # never more than the packed words and a format word
    back = decode_words(coded, bits, words.shape)
    assert back.dtype == np.uint32 and back.shape == words.shape and np.array_equal(back, words)


@pytest.mark.parametrize("bits", [1, 3, 8, 16])
@pytest.mark.parametrize("n", [0, 1, 31, 33, 100])
def test_numpy_packing_is_the_jitted_packing(bits, n):
    codes = np.random.default_rng(bits * 1000 + n).integers(0, 2**bits, (3, n))
    words = words_of(codes, bits)
    unpacked = unpack_codes(words, bits)
    assert unpacked.shape == (3, 32 * num_words(n)) and np.array_equal(unpacked[:, :n], codes)
    assert not unpacked[:, n:].any()  # the packer pads with code 0
    assert np.array_equal(pack_codes(unpacked, bits), words)


def test_ans_costs_the_entropy_of_the_codes():
    """Peaked 8-bit codes cost their empirical entropy plus the model, far below 8 bits per entry."""
    codes = np.round(np.random.default_rng(0).normal(0, 2.0, 1 << 15)).astype(np.int64) % 256
    words = words_of(codes[None], 8)
    p = np.bincount(codes) / codes.size
    h = -np.sum(p[p > 0] * np.log2(p[p > 0]))
    coded = encode_words(words, 8)
    assert coded[0] == ANS
    stream = coded[3 + 2 * int(coded[2]) :]  # after the header and the model (code values and counts)
    assert h < 32 * stream.size / codes.size < h + 0.005
    assert coded.nbytes == 4 * (3 + 2 * np.count_nonzero(p) + stream.size)


def test_uniform_codes_are_stored_packed():
    """Where the model would cost more than it saves (uniform codes), the array is the packed words + 4 bytes."""
    words = np.random.default_rng(1).integers(0, 2**32, (2, 3, 5), dtype=np.uint64).astype(np.uint32)
    coded = encode_words(words, 3)
    assert coded[0] == RAW and coded.nbytes == words.nbytes + 4


def test_the_coded_format_is_pinned():
    """A fixed input's coded bytes: fails if a constriction version changed the stream (stored histories would
    no longer decode), so that the dependency's pin is revisited, not stored data silently broken."""
    codes = np.round(np.random.default_rng(7).normal(0, 1.5, (2, 300))).astype(np.int64) % 16
    coded = encode_words(words_of(codes, 4), 4)
    assert coded[0] == ANS
    assert (coded.nbytes, zlib.crc32(coded.tobytes())) == (292, 0x7D5FF61D)


def test_bad_arrays_raise_clear_errors():
    codes = np.round(np.random.default_rng(3).normal(0, 1.0, (2, 200))).astype(np.int64) % 16
    words = words_of(codes, 4)
    coded = encode_words(words, 4)
    assert coded[0] == ANS
    with pytest.raises(ValueError, match="entropy-coded"):
        decode_words(coded, 4, (3, 4, words.shape[-1]))  # another number of codes
    with pytest.raises(ValueError, match="format"):
        decode_words(np.concatenate([[np.uint32(9)], coded[1:]]), 4, words.shape)
    with pytest.raises(ValueError, match="entropy-coded"):
        decode_words(coded[:-1], 4, words.shape)  # a cut stream
    with pytest.raises(ValueError, match="histogram"):
        bad = coded.copy()
        bad[3 + int(coded[2])] += 1  # the model's counts no longer add up to the number of codes
        decode_words(bad, 4, words.shape)
    with pytest.raises(ValueError, match="entropy-coded"):
        decode_words(coded.astype(np.int64), 4, words.shape)
    with pytest.raises(ValueError, match="shaped"):
        encode_words(words, 5)
    with pytest.raises(ValueError, match="unknown entropy coder"):
        lattice_coding("Z", 4, entropy="zip")


def test_the_option_is_opt_in_and_recorded():
    plain = lattice_coding("A2", 2)
    assert "entropy" not in plain.config()[-1]  # configs of chains without it are unchanged
    coded = lattice_coding("Z", 8, "rms", entropy_clip(2.0, 8), entropy="ans")
    assert coded.config()[-1]["entropy"] == "ans"
    assert Compressor.from_config(coded.config()) == coded


def test_entropy_clip_gives_the_rate_it_names():
    """The exact dithered entropy matches the codes' measured entropy, and entropy_clip's step hits the rate."""
    x = jax.random.normal(jax.random.key(0), (1 << 15,), jnp.float32)
    for rate in (1.0, 2.0, 3.0):
        clip = entropy_clip(rate, 8)
        assert abs(dithered_entropy(2 * clip / 2**8) - rate) < 1e-6
        q = quantize(x, jax.random.key(1), QuantizerSpec("Z", 8, "rms", clip))
        p = np.bincount(np.asarray(q.codes)) / q.codes.shape[0]
        assert abs(-np.sum(p[p > 0] * np.log2(p[p > 0])) - rate) < 0.03
    with pytest.raises(ValueError, match="more bits"):
        entropy_clip(3.0, 4)  # a 4-bit codebook at that step spans only +-4 rms
    with pytest.raises(ValueError, match="rate"):
        entropy_clip(0.0, 8)


def test_history_counts_the_coded_bytes_and_gives_back_the_rows():
    """Same jitted messages as the chain without entropy (same bits); the History stores them coded, counts
    exactly the stored arrays, and expand() gives back every row (from memory and from a store, lazy too)."""
    k = 6
    tmpl = {"a": jnp.zeros((k, 37)), "b": jnp.zeros((k, 5, 3))}
    clip = entropy_clip(2.0, 8)
    comp = chain(user_sparsification(0.5), differential_threshold(0.1),
                 lattice_coding("Z", 8, "rms", clip, entropy="ans"))
    ref = chain(user_sparsification(0.5), differential_threshold(0.1), lattice_coding("Z", 8, "rms", clip))
    hists = {}
    for c in (comp, ref):
        state = c.init(tmpl)
        hist = History(c, state["like"].value, 0, jax.tree.map(lambda a: np.zeros(a.shape[1:], np.float32), tmpl),
                       np.ones(k, np.float32))
        msgs, encode = [], jax.jit(c.encode)
        for t in range(3):
            x = jax.tree.map(lambda a: jax.random.normal(jax.random.key(t), a.shape), tmpl)
            m, state, *_ = encode(x, state, compressor_key(0, t))
            msgs.append(jax.device_get(m))
            hist.append(m, t)
        hists[c] = hist, msgs
    (hist, msgs), (ref_hist, ref_msgs) = hists[comp], hists[ref]
    for m, r in zip(msgs, ref_msgs):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(m), jax.tree.leaves(r)))
    for rec, m in zip(hist.records, msgs):
        assert "ans:1" in rec and "row:1" not in rec
        assert np.array_equal(rec["ans:1"], compact(m, comp)["ans:1"])
        assert record_nbytes(rec) == sum(a.nbytes for a in rec.values())
    assert hist.nbytes == sum(a.nbytes for r in hist.records for a in r.values())
    assert hist.nbytes < ref_hist.nbytes
    full = jax.device_get(hist.expand())
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(ref_hist.expand())))
    for t, m in enumerate(msgs):
        n = int(np.sum(m.present))
        for a, b in zip(jax.tree.leaves(m.rows), jax.tree.leaves(full.rows)):
            assert np.array_equal(np.asarray(a)[:n], b[t, :n])


def test_a_trained_history_replays_bit_exactly_with_entropy_coding(tmp_path):
    """train + store + replay: the entropy-coded history replays to the very model the packed one does."""
    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, 5, seed=0)
    model = mj.models.MLP((8,), ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    cfg = mj.FedConfig(rounds=3, local_steps=2, batch_size=8, seed=1)
    clip = entropy_clip(2.0, 8)
    comps = {"packed": lattice_coding("Z", 8, "rms", clip), "ans": lattice_coding("Z", 8, "rms", clip, entropy="ans")}
    run = mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, comps, store=str(tmp_path / "s"))
    packed, coded = run.histories["packed"], run.histories["ans"]
    loaded = S.load_history(str(tmp_path / "s" / "ans"), params0, lazy=True)
    assert coded.nbytes == loaded.nbytes == sum(a.nbytes for r in coded.records for a in r.values())
    assert coded.nbytes < 0.5 * packed.nbytes
    want = mj.replay(packed, [2])
    for h in (coded, loaded):
        assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mj.replay(h, [2])), jax.tree.leaves(want)))
