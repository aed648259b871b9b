"""The scenario suite (its CI-sized run through the CLI), the targeted flip attack and the suite's metrics."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import medu_jax as mj
from medu_jax import suite as S
from medu_jax.cli import main


@pytest.mark.slow
def test_quick_suite_through_the_cli(tmp_path, capsys):
    out = str(tmp_path / "suite")
    assert main(["suite", "--quick", "--out", out]) == 0
    printed = capsys.readouterr().out
    cfg = S.quick_config()
    cells = S.load_cells(out)
    assert sorted(c["name"] for c in cells) == sorted(S.cell_name(c) for c in cfg.cells())
    for c in cells:
        rows = {(r["method"], r.get("history", "")) for r in c["rows"]}
        assert {("attacked", ""), ("retrain", "")} <= rows
        assert {(m, h) for m in cfg.methods for h in ("float32", "medu")} <= rows
        assert sum(1 for r in c["rows"] if r.get("equal_cost")) == 1  # fine-tuning at the default method's cost
        for r in c["rows"]:
            if r.get("history") == "medu":
                assert r["ratio"] > 25 and 0 < r["rebuild_error"] < 1
            if r["method"] == "fedrecover":
                assert 0 < r["client_cost"] <= 0.5 and np.isfinite(r["accuracy"])
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert len(summary) == len(cells) and all(set(s["checks"]) == {"accuracy", "attack", "distance", "cost", "ratio"}
                                              for s in summary)
    assert all(s["pass"] == all(s["checks"].values()) for s in summary)
    assert os.path.getsize(os.path.join(out, "accuracy_vs_cost.png")) > 1000
    assert "PASS" in printed or "FAIL" in printed
    # a rerun resumes: every cell is read back, none is run again
    stamp = {n: os.path.getmtime(os.path.join(out, "cells", n)) for n in os.listdir(os.path.join(out, "cells"))}
    assert main(["suite", "--quick", "--out", out]) == 0
    assert stamp == {n: os.path.getmtime(os.path.join(out, "cells", n)) for n in stamp}
    # a cell run with another config is not reused, nor summarized as this config's
    other = S.SuiteConfig(**{**S.quick_config().__dict__, "rounds": 59})
    assert S.load_cells(out, other) == [] and len(S.load_cells(out, cfg)) == len(cells)


def test_suite_rejects_bad_settings(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown suite attacks"):
        S.SuiteConfig(attacks=("backdoor", "magic"))
    with pytest.raises(ValueError, match="default method"):
        S.SuiteConfig(methods=("naive",))
    with pytest.raises(ValueError, match="malicious share"):
        S.SuiteConfig(shares=(0.001,))
    assert main(["suite", "--quick", "--dataset", "mnist1d", "--out", str(tmp_path)]) == 2
    assert "not in this suite's data sets" in capsys.readouterr().err
    assert main(["suite", "--report-only", "--out", str(tmp_path / "none")]) == 2
    os.makedirs(tmp_path / "empty" / "cells")
    assert main(["suite", "--report-only", "--quick", "--out", str(tmp_path / "empty")]) == 2
    assert "no cells of this suite's config" in capsys.readouterr().err


def test_suite_options_from_the_command_line(tmp_path, capsys):
    """--medu name=value pairs reach compressors.medu (the four main ones in ``medu``, the rest in
    ``medu_options``), the sign-flip scale and the ratio bar reach the config; bad ones fail before any cell."""
    cfg = S.with_options(S.quick_config(), "fraction=0.25,bits=1,guard=true,scale=rms,clip=fit", 2.0, 100,
                         "adaptive,naive")
    assert cfg.methods == ("adaptive", "naive")
    assert cfg.medu == (0.25, 0.3, "A2", 1) and dict(cfg.medu_options) == {"guard": True, "scale": "rms",
                                                                          "clip": "fit", "entropy": "ans",
                                                                          "correction": True}
    assert cfg.sign_flip_scale == 2.0 and cfg.min_ratio == 100.0
    assert cfg.compressor() == mj.medu(0.25, 0.3, "A2", 1, guard=True, scale="rms", clip="fit", entropy="ans")
    assert S._config_json(cfg) != S._config_json(S.quick_config())  # stored cells of another setting are not reused
    with pytest.raises(ValueError, match="name=value"):
        S.with_options(S.quick_config(), "bits")
    with pytest.raises(ValueError, match="unknown suite methods"):
        S.with_options(S.quick_config(), methods="adaptive,magic")
    with pytest.raises(ValueError, match="sign_flip_scale must be > 0"):
        S.SuiteConfig(sign_flip_scale=-1.0)
    assert main(["suite", "--quick", "--medu", "bits=1", "--out", str(tmp_path)]) == 2  # unguarded 1 bit refused
    assert "1-bit lattice coding cannot work" in capsys.readouterr().err


def test_targeted_flip_relabels_only_the_source_class_of_the_malicious_users():
    x = jnp.zeros((3, 5, 2))
    y = jnp.asarray([[1, 2, 1, 0, 1], [1, 1, 3, 0, 0], [1, 2, 3, 1, 1]], jnp.int32)
    data = mj.ClientData(x, y, jnp.asarray([5, 5, 3], jnp.int32))
    out = np.asarray(mj.attacks.targeted_flip(data, [0, 2], 1, 7).y)
    np.testing.assert_array_equal(out[0], [7, 2, 7, 0, 7])
    np.testing.assert_array_equal(out[1], np.asarray(y[1]))  # honest user untouched
    np.testing.assert_array_equal(out[2], [7, 2, 3, 1, 1])  # padding past n stays as it was
    with pytest.raises(ValueError, match="must differ"):
        mj.attacks.targeted_flip(data, [0], 2, 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**31 - 1), st.integers(1, 6))
def test_auc_matches_scikit_learn(npos, nneg, seed, levels):
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    pos, neg = rng.integers(0, levels, npos).astype(float), rng.integers(0, levels, nneg).astype(float)  # ties
    want = roc_auc_score(np.r_[np.ones(npos), np.zeros(nneg)], np.r_[pos, neg])
    assert mj.metrics.auc(pos, neg) == pytest.approx(want)


def test_membership_auc_and_flip_success():
    w = {"params": {"b": jnp.asarray([0.0, 5.0, 0.0])}}
    apply_fn = lambda p, x: jnp.broadcast_to(p["params"]["b"], (x.shape[0], 3)) + x  # noqa: E731
    x = jnp.zeros((4, 3))
    y_members, y_non = np.asarray([1, 1, 1, 1]), np.asarray([0, 0, 2, 2])
    assert mj.metrics.membership_auc(apply_fn, w, x, y_members, x, y_non) == 1.0  # members: low loss
    assert mj.metrics.membership_auc(apply_fn, w, x, y_non, x, y_non) == 0.5
    assert mj.metrics.flip_success(apply_fn, w, np.zeros((3, 3)), np.asarray([0, 0, 2]), 0, 1) == 1.0
    with pytest.raises(ValueError, match="no sample of class 5"):
        mj.metrics.flip_success(apply_fn, w, np.zeros((3, 3)), np.asarray([0, 0, 2]), 5, 1)
    with pytest.raises(ValueError, match="non-empty"):
        mj.metrics.auc([], [1.0])


def test_cnn_scenario_config_and_cli_filters(tmp_path, capsys):
    """The convolutional scenario's matrix (its run: `medu suite --model cnn --quick`, ~1 min, not in CI); the
    default suite's cells and stored config are unchanged by the model fields."""
    cfg = S.cnn_config()
    assert cfg.model == "cnn" and cfg.num_users == 100 and cfg.datasets == ("digits",) and len(cfg.cells()) == 32
    assert {S.cell_name(c)[:4] for c in cfg.cells()} == {"cnn-"}
    assert S._scenario(cfg.cells()[0]).startswith("digits CNN ")
    default = S.SuiteConfig()
    assert all("model" not in c for c in default.cells())
    assert S.cell_name(default.cells()[0]) == "digits-iid-backdoor-10pct-seed0"
    assert "model" not in S._config_json(default) and "conv_features" not in S._config_json(default)
    assert S._config_json(cfg)["model"] == "cnn"
    with pytest.raises(ValueError, match="unknown suite model"):
        S.SuiteConfig(model="resnet")
    with pytest.raises(ValueError, match="needs images"):
        S.SuiteConfig(model="cnn")  # the default data sets include mnist1d
    assert main(["suite", "--model", "cnn", "--attacks", "magic", "--out", str(tmp_path)]) == 2
    assert "--attacks ['magic'] not in" in capsys.readouterr().err
    # seeds outside the suite's make a suite of those seeds (fresh seeds): here none of its cells are there yet
    os.makedirs(tmp_path / "fresh" / "cells")
    assert main(["suite", "--model", "cnn", "--seeds", "7", "--report-only", "--out", str(tmp_path / "fresh")]) == 2
    err = capsys.readouterr().err
    assert "no cells of this suite's config" in err and "--seeds" not in err
    assert main(["suite", "--model", "cnn", "--seeds", "0,7", "--report-only", "--out", str(tmp_path / "fresh")]) == 2
    assert "--seeds [7] not in" in capsys.readouterr().err  # a mix of the suite's seeds and fresh ones


def test_distances_print_readably_when_a_model_diverged():
    from medu_jax import tables as T

    assert T.dist(0.1234) == "0.123" and T.dist(999.0) == "999.000"
    assert T.dist(1.8e22) == "1.8e+22" and T.dist(float("inf")) == "inf" and T.dist(float("nan")) == "nan"
