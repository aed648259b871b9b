"""Block thresholding: select/restore against a NumPy reference, closed loop = replay, stored bytes, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import medu_jax as mj
from medu_jax import thresholding as TH
from medu_jax.compressors import Like
from medu_jax.history import record_nbytes

SHAPES = ((5, 3), (7,), (1,), (13,), (2, 2, 3))  # odd leaf sizes, a one-entry leaf (one pytree: few compilations)


def reference_ids(n: int, block: int, dim: int) -> np.ndarray:
    """Block of each entry, written out: entry e sits in column e mod B of the leaf padded to a multiple of dim."""
    b = max(-(-n // dim), 1)
    return np.array([(e % b) // (block // dim) for e in range(n)], np.int64)


def tree(leaves):
    return {f"l{i}": x for i, x in enumerate(leaves)}


@settings(max_examples=20, deadline=None)
@given(shapes=st.just(SHAPES), k=st.just(4), geom=st.sampled_from([(6, 2), (3, 1)]),
       tau=st.sampled_from([0.0, 0.2, 0.5, 2.0]), magnitude=st.sampled_from([0.0, 1.0, 1e30, 1e-30]),
       seed=st.integers(0, 2**16))
def test_select_and_restore_match_a_numpy_reference(shapes, k, geom, tau, magnitude, seed):
    block, dim = geom
    rng = np.random.default_rng(seed)
    h = [(rng.normal(size=(k, *s)) * magnitude).astype(np.float32) for s in shapes]
    ref = [(rng.normal(size=(k, *s)) * magnitude).astype(np.float32) for s in shapes]
    for x in h:  # some entries equal to the reference (an exactly unchanged block at tau 0)
        x[rng.random(x.shape) < 0.3] = 0.0
    ref = [np.where(x == 0, 0, r) for x, r in zip(h, ref)]
    present = rng.random(k) < 0.7  # absent users: never skipped, never stored
    layer = TH.BlockThreshold(tau, block, dim)
    state = {"ref": tree(map(jnp.asarray, ref))}
    x, out_present, flags = layer.select(tree(map(jnp.asarray, h)), jnp.asarray(present), state, None)

    ids, base = [], 0
    for s in shapes:
        i = reference_ids(int(np.prod(s)), block, dim)
        ids.append(i + base)
        base += int(i.max()) + 1
    nb = base
    assert len(flags) == nb + 1
    skip = np.stack([np.asarray(flags[f"b{j}"]) for j in range(nb)], axis=1)
    delta = [a - r for a, r in zip(h, ref)]
    peak = np.max([np.abs(v).reshape(k, -1).max(axis=1, initial=0) for v in delta + h], axis=0).astype(np.float64)
    peak = np.where(peak > 0, peak, 1.0)
    e = np.zeros((k, nb))
    for d, i in zip(delta, ids):
        np.add.at(e.T, i, (d.reshape(k, -1).astype(np.float64) / peak[:, None]).T ** 2)
    budget = tau**2 * sum(np.sum((x.reshape(k, -1) / peak[:, None]) ** 2, axis=1) for x in h)
    for u in range(k):
        if not present[u]:
            assert not skip[u].any()
            continue
        order = np.argsort(e[u], kind="stable")
        s = skip[u][order]
        n = int(s.sum())
        assert s[:n].all(), "the skipped blocks are the least changed ones"
        assert e[u][order][:n].sum() <= budget[u] * (1 + 1e-5) + 1e-30, "within the budget tau^2 ||h||^2"
        if n < nb:  # and as many as fit
            assert e[u][order][: n + 1].sum() > budget[u] * (1 - 1e-5)
    assert np.array_equal(np.asarray(out_present), present & ~skip.all(axis=1))
    for xi, d, i in zip(jax.tree.leaves(x), delta, ids):
        want = np.where(skip[:, i].reshape(d.shape), 0, d)
        assert np.array_equal(np.asarray(xi), want)

    x_hat = [rng.normal(size=(k, *s)).astype(np.float32) for s in shapes]
    active = present | (rng.random(k) < 0.5)
    valid = np.asarray(out_present)
    full, stored_in, state = layer.restore(tree(map(jnp.asarray, x_hat)), jnp.asarray(valid), flags, state,
                                           jnp.asarray(active))
    whole = skip.all(axis=1)
    assert np.array_equal(np.asarray(flags["skipped"]), whole)
    assert np.array_equal(np.asarray(stored_in), valid | whole)
    for f, nr, r, xh, i in zip(jax.tree.leaves(full), jax.tree.leaves(state["ref"]), ref, x_hat, ids):
        want = r + np.where(skip[:, i].reshape(r.shape), 0, xh)
        assert np.array_equal(np.asarray(f), want)
        keep = (valid | whole).reshape((k,) + (1,) * (r.ndim - 1))
        assert np.array_equal(np.asarray(nr), np.where(keep, want, r))


def run_history(comp, rounds=4, k=6, seed=0):
    """A few rounds of slowly changing updates (leaves of 15, 7 and 1 entries, one leaf all zero) through
    ``comp``, recorded in a History; returns it with each round's (decoded, valid) from the encoder."""
    params = {"a": jnp.zeros((5, 3)), "b": {"c": jnp.zeros((7,)), "z": jnp.zeros((1,))}}
    like = Like.of(jax.tree.map(lambda p: jnp.zeros((k, *p.shape)), params))
    base = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), (k, *p.shape)), params)
    base["b"]["z"] = jnp.zeros((k, 1))
    h = mj.History(comp, like, seed, params, np.ones(k))
    state, enc, out = comp.init(like.zeros()), jax.jit(comp.encode), []
    for t in range(rounds):
        noise = jax.tree.map(lambda b: 0.1 * jax.random.normal(jax.random.key(10 + t), b.shape), base)
        noise["b"]["z"] = jnp.zeros((k, 1))
        msg, state, dec, valid, _ = enc(jax.tree.map(jnp.add, base, noise), state, mj.compressor_key(seed, t))
        h.append(msg)
        out.append((dec, valid))
    return h, out


def decode_all(h):
    """Each round's (decoded, valid) decoded from the History's stored records, round by round."""
    state, dec, out = h.compressor.init(h.like.zeros()), jax.jit(h.compressor.decode), []
    msgs = h.expand()
    for t in range(h.num_rounds):
        d, v, state = dec(jax.tree.map(lambda a: a[t], msgs), state, mj.compressor_key(h.seed, h.round_ids[t]))
        out.append((d, v))
    return out


def same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


CHAIN = mj.chain(mj.user_sparsification(0.5), mj.block_threshold(0.3, 4), mj.lattice_coding("A2", 2))


@functools.cache
def chain_history():
    """CHAIN's history of 4 rounds, shared by the tests (one compilation)."""
    return run_history(CHAIN)


def test_closed_loop_replay_and_stripped_records_decode_the_same_bits(tmp_path):
    h, enc = chain_history()
    assert TH.skip_rates(h)["entries"] > 0.3  # slowly changing updates: most blocks keep their reference
    assert same(enc, decode_all(h))
    h2 = TH.unstrip(h, TH.strip(h))
    assert not same([r["row:1"] for r in h.records], [r["row:1"] for r in h2.records])  # skipped codes now 0
    assert same(enc, decode_all(h2))  # every decoded row, hence any replay or recovery from them
    mj.save_history(h, str(tmp_path / "h"))  # a store rebuilds the chain from its config
    loaded = mj.load_history(str(tmp_path / "h"))
    assert loaded.compressor == CHAIN and same(enc, decode_all(loaded))
    assert mj.Compressor.from_config(CHAIN.config()) == CHAIN


def test_entropy_coded_records_strip_and_decode_the_same_bits():
    h, enc = run_history(mj.chain(mj.user_sparsification(0.5), mj.block_threshold(0.3, 4),
                                  mj.lattice_coding("A2", 3, entropy="ans")), rounds=3)
    assert any(name.startswith("ans:") for name in h.records[0])
    stripped = TH.strip(h)
    assert TH.stripped_nbytes(h) == sum(record_nbytes(r) for r in stripped) < h.nbytes
    assert same(enc, decode_all(TH.unstrip(h, stripped)))


def test_stripped_bytes_count_the_flags_and_only_the_kept_codes():
    h, _ = chain_history()
    layer = CHAIN.filters[1]
    ids, nb = TH._positions(h, layer)
    expected = 0
    for r, s in zip(h.records, TH.strip(h)):
        present = np.unpackbits(r["present"])[:6].astype(bool)
        skip = np.stack([np.unpackbits(r[f"flag:blocks/b{j}"])[:6].astype(bool) for j in range(nb)], axis=1)
        kept = int((~skip[present][:, ids]).sum())
        assert s["kept:1"].shape == (1, 2, -(-kept // 32))  # the kept codes as one packed row: 2 bit-planes
        expected += record_nbytes(r) - r["row:1"].nbytes + 4 * 2 * -(-kept // 32)
        assert sum(k.startswith("flag:blocks/b") for k in r) == nb  # one packed (K,) flag per block
    assert TH.stripped_nbytes(h) == expected < h.nbytes
    # tau 0 skips exactly the unchanged blocks: the all-zero leaf "z" (last in the pytree's order), every round
    h0, _ = run_history(mj.chain(mj.block_threshold(0.0, 4), mj.lattice_coding("A2", 2)), rounds=2)
    skip = np.stack([h0.masks().flags["blocks"][f"b{j}"] for j in range(nb)], axis=-1)
    assert skip[..., -1].all() and not skip[..., :-1].any()


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="tau"):
        mj.block_threshold(-0.1)
    with pytest.raises(ValueError, match="multiple of lattice_dim"):
        mj.block_threshold(0.3, 7)
    with pytest.raises(ValueError, match="lattice_dim"):
        mj.block_threshold(0.3, 8, 3)
    with pytest.raises(ValueError, match="at most once each"):
        mj.chain(mj.differential_threshold(0.3), mj.block_threshold(0.3))
    with pytest.raises(ValueError, match="MEDU's order"):
        mj.chain(mj.block_threshold(0.3), mj.user_sparsification(0.5))
    h, _ = run_history(mj.chain(mj.block_threshold(0.3, 4, 1), mj.lattice_coding("A2", 2)), rounds=1)
    with pytest.raises(ValueError, match="not whole lattice blocks"):
        TH.strip(h)
    h, _ = chain_history()
    with pytest.raises(ValueError, match="naive replay"):
        mj.replay(h)


def test_an_unguarded_one_bit_coder_after_block_thresholding_is_refused():
    """Like the row threshold, the block threshold feeds decoded errors back through its reference: a 1-bit
    coder that decodes worse than zero would diverge, so the chain is refused at construction."""
    with pytest.raises(ValueError, match="blocks with 1-bit lattice coding cannot work"):
        mj.chain(mj.block_threshold(0.2), mj.lattice_coding("Z", 1))
    mj.chain(mj.block_threshold(0.2), mj.lattice_coding("Z", 1, guard=True))
