"""Data loaders, attacks, the experiment runner and the `medu` command, from the user's side."""

import gzip
import json
import os
import struct

import numpy as np
import pytest

import medu_jax as mj
from medu_jax import attacks, cli
from medu_jax.experiment import ExperimentConfig, format_table, run_experiment


def write_idx(path, arr, gz=False):
    arr = np.asarray(arr, np.uint8)
    raw = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape) + arr.tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:
        f.write(raw)


def fake_mnist(folder, gz=False):
    rng = np.random.default_rng(0)
    ext = ".gz" if gz else ""
    x_tr, y_tr = rng.integers(0, 256, (50, 28, 28)), rng.integers(0, 10, 50)
    x_te, y_te = rng.integers(0, 256, (20, 28, 28)), rng.integers(0, 10, 20)
    write_idx(os.path.join(folder, "train-images-idx3-ubyte" + ext), x_tr, gz)
    write_idx(os.path.join(folder, "train-labels-idx1-ubyte" + ext), y_tr, gz)
    write_idx(os.path.join(folder, "t10k-images-idx3-ubyte" + ext), x_te, gz)
    write_idx(os.path.join(folder, "t10k-labels-idx1-ubyte" + ext), y_te, gz)
    return x_tr, y_tr


@pytest.mark.parametrize("gz", [False, True])
def test_idx_folder_loads_exactly(tmp_path, gz):
    x_tr, y_tr = fake_mnist(tmp_path, gz)
    ds = mj.data.load_mnist(str(tmp_path))
    assert ds.x_train.shape == (50, 784) and ds.x_train.dtype == np.float32
    np.testing.assert_array_equal(ds.x_train, x_tr.reshape(50, -1).astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.y_train, y_tr)


def test_npz_loads_without_pickle_and_rejects_object_arrays(tmp_path):
    rng = np.random.default_rng(1)
    good = tmp_path / "m.npz"
    np.savez(good, x_train=rng.integers(0, 256, (5, 4, 4)), y_train=np.arange(5), x_test=np.zeros((2, 4, 4)),
             y_test=np.arange(2))
    ds = mj.data.load_mnist(str(good))
    assert ds.x_train.shape == (5, 16) and ds.num_classes == 5
    bad = tmp_path / "obj.npz"
    np.savez(bad, x_train=np.array([{"a": 1}], dtype=object), y_train=np.arange(1), x_test=np.zeros((1, 2)),
             y_test=np.arange(1))
    with pytest.raises(ValueError, match="pickle"):
        mj.data.load_mnist(str(bad))
    partial = tmp_path / "p.npz"
    np.savez(partial, x_train=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="lacks arrays"):
        mj.data.load_mnist(str(partial))


def test_mnist_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        mj.data.load_mnist(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="lacks train-images"):
        mj.data.load_mnist(str(tmp_path))
    fake_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        mj.data.load_mnist(str(tmp_path))
    path.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(ValueError, match="not an IDX file"):
        mj.data.load_mnist(str(tmp_path))


def test_offline_datasets_and_attacks():
    ds = mj.data.load_digits(0)
    assert ds.x_train.shape[1] == 64 and 0 <= ds.x_train.min() and ds.x_train.max() <= 1
    d1 = mj.data.load_mnist1d(num_samples=400, seed=0)
    assert d1.x_train.shape[1] == 40 and d1.num_classes == 10
    clients = mj.data.make_clients(ds, 5, seed=0)
    assert int(clients.n.sum()) == len(ds.y_train)
    pix, val = attacks.default_trigger(64)
    bd = attacks.backdoor(clients, [4], target=0, fraction=1.0, pixels=pix, value=val, seed=0)
    n4 = int(clients.n[4])
    assert np.all(np.asarray(bd.y[4, :n4]) == 0)
    assert np.all(np.asarray(bd.x[4, :n4])[:, pix] == val)
    np.testing.assert_array_equal(np.asarray(bd.x[:4]), np.asarray(clients.x[:4]))
    lf = attacks.label_flip(clients, [1], 10)
    np.testing.assert_array_equal(np.asarray(lf.y[1, : int(clients.n[1])]), 9 - np.asarray(clients.y[1, : int(clients.n[1])]))
    np.testing.assert_array_equal(attacks.update_scale(4, [2], -3.0), [1, 1, -3, 1])


def small_config(**kw):
    base = dict(num_users=6, num_malicious=2, rounds=4, local_steps=2, batch_size=16, hidden=(16,), tune_rounds=1,
                methods=("float32", "medu"))
    return ExperimentConfig(**{**base, **kw})


def test_experiment_table_has_every_row_and_real_bytes():
    res = run_experiment(small_config(), progress=False)
    names = [r["method"] for r in res["rows"]]
    assert names[:2] == ["no unlearning (trained with attackers)", "retrain from scratch (reference)"]
    assert names[2:] == ["history: float32", "history: medu"]
    f32, med = res["rows"][2], res["rows"][3]
    assert f32["bytes"] > 0 and med["bytes"] > 0 and med["ratio"] > 5 * f32["ratio"]
    assert res["rows"][1]["dist_to_retrain"] == 0.0
    table = format_table(res)
    assert table.count("\n") == len(res["rows"]) + 1 and "history: medu" in table


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="unknown lattice"):
        small_config(lattice="B12")
    with pytest.raises(ValueError, match="bits must be"):
        small_config(bits=40)
    with pytest.raises(ValueError, match="num_malicious"):
        small_config(num_malicious=6)
    with pytest.raises(ValueError, match="unknown config keys"):
        ExperimentConfig.from_dict({"roundz": 3})
    with pytest.raises(ValueError, match="needs data_path"):
        small_config(dataset="mnist")


def test_cli_demo_writes_outputs(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"num_users": 6, "num_malicious": 1, "rounds": 3, "local_steps": 2, "hidden": [8],
                               "methods": ["float32", "lattice"], "tune_rounds": 0}))
    out = tmp_path / "out"
    assert cli.main(["run", "--config", str(cfg), "--quiet", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| history: lattice |" in text
    for name in ("table.csv", "table.md", "result.json", "accuracy_vs_bytes.png"):
        assert (out / name).stat().st_size > 0
    res = json.loads((out / "result.json").read_text())
    assert len(res["rows"]) == 4


@pytest.mark.parametrize(
    "argv, match",
    [
        (["run", "--config", "/no/such.json"], "not found"),
        (["demo", "--lattice", "B7"], "unknown lattice"),
        (["demo", "--bits", "0"], "bits must be"),
        (["demo", "--dataset", "imagenet"], "unknown dataset"),
        (["demo", "--dataset", "mnist", "--data-path", "/no/such/dir"], "not found"),
        (["demo", "--unlearn-methods", "naive,magic"], "unknown unlearn_methods"),
    ],
)
def test_cli_errors_exit_2_with_a_message(argv, match, capsys):
    try:
        code = cli.main(argv + ["--quiet"])
    except SystemExit as e:  # argparse or config-file errors
        code = e.code if isinstance(e.code, int) else 2
        msg = str(e.code) + capsys.readouterr().err
    else:
        msg = capsys.readouterr().err
    assert code == 2 and match in msg, msg


def test_cli_bad_json(tmp_path, capsys):
    p = tmp_path / "bad.json"
    p.write_text("{rounds: 3")
    with pytest.raises(SystemExit, match="not valid JSON"):
        cli.main(["run", "--config", str(p)])
    p.write_text("[1, 2]")
    with pytest.raises(SystemExit, match="JSON object"):
        cli.main(["run", "--config", str(p)])


@pytest.mark.parametrize("key, value, want", [
    ("rounds", "3", "'rounds' must be int, got '3'"), ("rounds", 2.5, "'rounds' must be int"),
    ("lr", "0.1", "'lr' must be float"), ("alpha", "x", "'alpha' must be float or None"),
    ("hidden", 64, "'hidden' must be tuple"), ("resume", 1, "'resume' must be bool"),
    ("num_users", True, "'num_users' must be int, got True"),
])
def test_config_values_of_a_wrong_type_name_their_key(tmp_path, capsys, key, value, want):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({key: value}))
    assert cli.main(["run", "--config", str(path), "--quiet"]) == 2
    assert want in capsys.readouterr().err


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "run_experiment", interrupted)
    assert cli.main(["demo", "--quiet"]) == 130
    err = capsys.readouterr().err
    assert err.strip().startswith("medu: interrupted") and "Traceback" not in err


@pytest.mark.parametrize("kind", ["idx", "npz"])
def test_mnist_as_images_and_the_cnn_on_them(tmp_path, kind):
    """flatten=False keeps MNIST's 28x28 images (small files made here); models.CNN takes them and 8x8x1 digits."""
    import jax
    import jax.numpy as jnp

    if kind == "idx":
        x_tr, _ = fake_mnist(tmp_path)
        path = str(tmp_path)
    else:
        rng = np.random.default_rng(2)
        x_tr = rng.integers(0, 256, (50, 28, 28))
        path = str(tmp_path / "m.npz")
        np.savez(path, x_train=x_tr, y_train=rng.integers(0, 10, 50), x_test=rng.integers(0, 256, (20, 28, 28)),
                 y_test=rng.integers(0, 10, 20))
    ds = mj.data.load_mnist(path, flatten=False)
    assert ds.x_train.shape == (50, 28, 28) and ds.x_test.shape == (20, 28, 28)
    np.testing.assert_array_equal(ds.x_train, x_tr.astype(np.float32) / 255)
    np.testing.assert_array_equal(mj.data.load_mnist(path).x_train, ds.x_train.reshape(50, -1))
    cnn = mj.models.CNN((4, 8), 10)
    params = cnn.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    out = cnn.apply(params, jnp.asarray(ds.x_test))  # (N, 28, 28): a channel axis is added
    np.testing.assert_allclose(out, cnn.apply(params, jnp.asarray(ds.x_test)[..., None]))
    assert out.shape == (20, 10)
    assert sum(a.size for a in jax.tree.leaves(params)) == (4 * 9 + 4) + (8 * 36 + 8) + (7 * 7 * 8 * 10 + 10)
    with pytest.raises(ValueError, match="flatten=False"):
        cnn.apply(params, jnp.asarray(mj.data.load_mnist(path).x_test))


def test_digits_as_images_same_values_and_trigger():
    flat, img = mj.data.load_digits(0), mj.data.load_digits(0, flatten=False)
    assert img.x_train.shape[1:] == (8, 8, 1)
    np.testing.assert_array_equal(img.x_train.reshape(len(img.x_train), -1), flat.x_train)
    np.testing.assert_array_equal(img.y_test, flat.y_test)
    pix, val = attacks.default_trigger(int(img.x_train[0].size))
    stamped = attacks.add_trigger(img.x_test[:5], pix, val)
    assert stamped.shape == (5, 8, 8, 1) and (stamped[:, 6:, 6:, 0] == val).all()  # the bottom-right 2x2 corner
    np.testing.assert_array_equal(stamped.reshape(5, -1), attacks.add_trigger(flat.x_test[:5], pix, val))
    with pytest.raises(ValueError, match="not an image"):
        mj.data.load_dataset("mnist1d", flatten=False)


def test_conv3x3_equals_flax_conv():
    import flax.linen as nn
    import jax

    x = jax.random.normal(jax.random.key(1), (3, 7, 5, 2))
    conv = mj.models.Conv3x3(4)
    params = conv.init(jax.random.key(0), x)
    want = nn.Conv(4, (3, 3), padding="SAME").apply(params, x)
    np.testing.assert_allclose(conv.apply(params, x), want, rtol=1e-5, atol=1e-5)
