"""Issue 15: the history's own measurements (skip rates, rebuild error) and the codec's rate-distortion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import medu_jax as mj
from medu_jax import data as D
from medu_jax.dither import QuantizerSpec, dequantize, quantize
from medu_jax.models import MLP
from medu_jax.packing import pack_bits

K = 6


@functools.lru_cache(maxsize=None)
def trained():
    ds = D.load_digits(0)
    clients = D.make_clients(ds, K, seed=0, alpha=0.5)
    model = MLP((16,), ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    cfg = mj.FedConfig(rounds=6, local_steps=3, batch_size=16, participation=1.0, seed=3)
    comps = {"f32": mj.identity(), "medu": mj.medu(0.5, 0.2, "A2", 3), "big_tau": mj.medu(0.5, 5.0, "A2", 3),
             "guard1": mj.medu(0.5, 0.3, "A2", 1, guard=True)}
    return mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, comps)


def test_skip_rates_count_the_masks_and_flags():
    run = trained()
    f32 = run.histories["f32"].skip_rates()
    assert f32 == {"active": K * 6, "stored": 1.0, "sparsified": 0.0, "thresholded": 0.0, "reset": 0.0,
                   "zero_rows": 0.0}
    medu = run.histories["medu"].skip_rates()
    # half of the users are selected each round (3 of 6), the other half sparsified out
    assert medu["sparsified"] == pytest.approx(0.5)
    assert medu["stored"] + medu["sparsified"] + medu["thresholded"] == pytest.approx(1.0)
    big = run.histories["big_tau"].skip_rates()
    # tau 5: every selected user with a reference is skipped (a flag only)
    m = run.histories["big_tau"].masks()
    expected = np.sum(m.flags["threshold"]["skipped"]) / np.sum(m.active)
    assert big["thresholded"] == pytest.approx(expected) and big["thresholded"] > 0.2
    g = run.histories["guard1"].skip_rates()
    assert g["zero_rows"] > 0  # 1-bit rows that would decode worse than zero are stored as zero


def test_rebuild_error_is_the_replay_distance_to_the_trained_model():
    run = trained()
    assert mj.rebuild_error(run.histories["f32"], run.params) < 1e-5
    e = mj.rebuild_error(run.histories["medu"], run.params)
    from medu_jax.unlearn import replay

    rebuilt = replay(run.histories["medu"])
    a = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(rebuilt)])
    b = np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(run.params)])
    assert e == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b)) and 1e-4 < e < 1.0
    # a guarded 1-bit history stays bounded (an unguarded one is refused at construction)
    assert mj.rebuild_error(run.histories["guard1"], run.params) < 1.0
    with pytest.raises(ValueError, match="parameters"):
        mj.rebuild_error(run.histories["f32"], {"w": np.zeros(3)})


def _mse_and_rate(spec, n=2**14):
    x = jax.random.normal(jax.random.key(0), (n,))
    q = quantize(x, jax.random.key(1), spec)
    xh = dequantize(q.codes, q.scales, jax.random.key(1), spec, n)
    mse = float(np.mean((np.asarray(xh, np.float64) - np.asarray(x, np.float64)) ** 2) / np.var(np.asarray(x)))
    rate = 8 * (pack_bits(q.codes, spec.bits).nbytes + q.scales.nbytes) / n
    return mse, rate


@pytest.mark.parametrize("bits", [2, 3])
def test_rms_beats_maxabs_and_stays_within_6_db_of_the_bound(bits):
    # the measurements behind docs/codec.md, at a small size: rms (fitted clip, Wiener gain) is closer to
    # D(R) = 2^-2R than the default maxabs, at the same real rate (codes + scales + padding)
    m0, r0 = _mse_and_rate(QuantizerSpec("A2", bits))
    m1, r1 = _mse_and_rate(QuantizerSpec("A2", bits, "rms", clip="fit", gain="wiener"))
    assert r0 == r1 and bits < r0 < bits + 0.01
    assert m1 < m0
    assert 10 * np.log10(m1 / 2.0 ** (-2 * r1)) < 6.0


def test_rate_distortion_benchmark_quick_runs(capsys):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parent.parent / "benchmarks" / "rate_distortion.py"
    spec = importlib.util.spec_from_file_location("rate_distortion", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["--quick", "--n", "4096"])
    out = capsys.readouterr().out
    assert "| Z | 1 | rms-fit-gain |" in out and "gap dB" in out
