"""Durable history: round trip, crash mid-save and resume, corruption and foreign files."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import medu_jax as mj
from medu_jax import store as S

SETUP = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, optax
    import medu_jax as mj
    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, 5, seed=0)
    model = mj.models.MLP((8,), ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.sgd(0.1)
    cfg = mj.FedConfig(rounds=6, local_steps=2, batch_size=8, seed=1)
    comps = {"medu": mj.medu(0.6, 0.2, "A2", 3), "f32": mj.identity()}
    """
)


def setup():
    ns: dict = {}
    exec(SETUP, ns)
    return ns


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_store_round_trip_is_exact(tmp_path):
    ns = setup()
    run = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], ns["cfg"], ns["comps"],
                   store=str(tmp_path / "s"))
    for name, hist in run.histories.items():
        loaded = S.load_history(str(tmp_path / "s" / name), ns["params0"])
        assert loaded.num_rounds == hist.num_rounds and loaded.nbytes == hist.nbytes
        assert loaded.compressor == hist.compressor and loaded.like == hist.like
        for r1, r2 in zip(loaded.records, hist.records):
            assert r1.keys() == r2.keys() and all(np.array_equal(r1[k], r2[k]) and r1[k].dtype == r2[k].dtype
                                                  for k in r1)
        assert same(mj.unlearn(loaded, [4]), mj.unlearn(hist, [4]))
        # without a template, flax's nested dicts are rebuilt from the stored paths
        assert same(mj.replay(S.load_history(str(tmp_path / "s" / name))), mj.replay(hist))
    with pytest.raises(FileExistsError, match="resume=True"):
        mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], ns["cfg"], ns["comps"],
                 store=str(tmp_path / "s"))


def test_killed_mid_save_reloads_to_last_complete_round_and_resumes_bit_identically(tmp_path):
    crash = tmp_path / "crash"
    script = SETUP + textwrap.dedent(
        f"""
        import os, signal
        from medu_jax import store as S
        orig = S._write
        count = {{"n": 0}}
        def dying_write(group, name, a):
            if "rounds/3" in str(group.path):   # halfway through saving round 3: SIGKILL, no cleanup
                count["n"] += 1
                if count["n"] == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            return orig(group, name, a)
        S._write = dying_write
        mj.train(model.apply, tx, params0, clients, cfg, comps, store={str(crash)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ns = setup()
    h = S.load_history(str(crash / "medu"), ns["params0"])
    assert h.num_rounds == 3  # rounds 0..2 complete, round 3 was in flight
    resumed = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], ns["cfg"], ns["comps"],
                       store=str(crash), resume=True)
    full = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], ns["cfg"], ns["comps"])
    assert same(resumed.params, full.params)
    for name in full.histories:
        a, b = S.load_history(str(crash / name), ns["params0"]), full.histories[name]
        assert a.num_rounds == 6 and all(same(x, y) for x, y in zip(a.records, b.records))


@pytest.fixture
def saved(tmp_path):
    ns = setup()
    cfg = mj.FedConfig(rounds=3, local_steps=1, batch_size=8, seed=2)
    run = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], cfg, {"m": ns["comps"]["medu"]})
    path = str(tmp_path / "h")
    S.save_history(run.histories["m"], path)
    return path, ns


def test_flipped_bytes_name_the_corrupted_array(saved):
    path, ns = saved
    chunk = os.path.join(path, "rounds", "1", "row:0", "c", "0", "0", "0")
    if not os.path.exists(chunk):  # chunk key depth follows the array's rank
        chunk = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "rounds", "1", "row:0", "c"))
                     for f in fs)
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    with pytest.raises(S.HistoryFileError, match=r"round 1: array 'rounds/1/row:0' is corrupted \(ValueError: Stored and computed checksum"):
        S.load_history(path)


def test_lost_chunk_is_caught_by_the_commit_checksum(saved):
    path, _ = saved
    folder = os.path.join(path, "rounds", "2", "present", "c")
    for d, _, fs in os.walk(folder):
        for f in fs:
            os.remove(os.path.join(d, f))  # zarr would silently read the fill value
    with pytest.raises(S.HistoryFileError, match="does not match its committed checksum"):
        S.load_history(path)


def test_truncated_chunk_and_torn_commit(saved):
    path, _ = saved
    # a torn last commit (the round in flight) is dropped; a torn earlier commit is corruption
    last = os.path.join(path, "commits", "2", "zarr.json")
    open(last, "w").write('{"attributes": {"rou')
    assert S.load_history(path).num_rounds == 2
    first = os.path.join(path, "commits", "0", "zarr.json")
    open(first, "w").write("{")
    with pytest.raises(S.HistoryFileError, match="commit of round 0 is corrupted"):
        S.load_history(path)


def test_foreign_missing_and_wrong_model(saved, tmp_path):
    path, ns = saved
    with pytest.raises(FileNotFoundError, match="no history store"):
        S.load_history(str(tmp_path / "nothing"))
    import zarr

    zarr.open_group(str(tmp_path / "other"), mode="w", attributes={"format": "someone.else"})
    with pytest.raises(S.HistoryFileError, match="not a medu_jax history"):
        S.load_history(str(tmp_path / "other"))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "zarr.json").write_text("not json")
    with pytest.raises(S.HistoryFileError, match="not a readable zarr group"):
        S.load_history(str(tmp_path / "junk"))
    other = mj.models.MLP((9,), 10).init(jax.random.key(0), jnp.zeros((1, 64)))
    with pytest.raises(ValueError, match="different model"):
        S.load_history(path, other)


def test_resume_refuses_a_different_run(saved, tmp_path):
    ns = setup()
    store = str(tmp_path / "st")
    cfg = mj.FedConfig(rounds=2, local_steps=1, batch_size=8, seed=2)
    mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], cfg, {"m": ns["comps"]["medu"]}, store=store)
    with pytest.raises(S.HistoryFileError, match="different run"):
        mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], cfg, {"m": mj.medu(0.6, 0.2, "D4", 3)},
                 store=store, resume=True)


def test_rounds_that_store_no_rows_round_trip(tmp_path):
    ns = setup()
    # tau = 10: after round 0 every user is skipped (only flags stored), so the payload arrays have 0 rows
    cfg = mj.FedConfig(rounds=3, local_steps=1, batch_size=8, seed=2)
    run = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], cfg, {"t": mj.medu(1.0, 10.0, "A2", 2)},
                   store=str(tmp_path / "s"))
    hist = run.histories["t"]
    assert hist.records[2]["row:0"].shape[0] == 0
    loaded = S.load_history(str(tmp_path / "s" / "t"), ns["params0"])
    assert all(same(a, b) for a, b in zip(loaded.records, hist.records))
    assert same(mj.replay(loaded), mj.replay(hist))


def test_offloaded_training_keeps_rounds_on_disk_and_replays_the_same_bits(tmp_path):
    ns = setup()
    args = (ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], ns["cfg"], ns["comps"])
    mem = mj.train(*args)
    off = mj.train(*args, store=str(tmp_path / "s"), offload=True)
    assert same(off.params, mem.params)
    for name, h in off.histories.items():
        assert isinstance(h.records, S.StoredRecords) and len(h.records) == ns["cfg"].rounds
        ref = mem.histories[name]
        assert h.nbytes == ref.nbytes and h.round_ids == ref.round_ids
        assert same(h.masks(), ref.masks())
        for chunk in (None, 2):  # chunked replay reads two rounds of rows at a time from disk
            assert same(mj.unlearn(h, [4], chunk=chunk), mj.unlearn(ref, [4]))
        with pytest.raises(TypeError, match="read-only"):
            h.records.append({})
        lazy = S.load_history(str(tmp_path / "s" / name), ns["params0"], lazy=True)
        assert isinstance(lazy.records, S.StoredRecords) and same(mj.replay(lazy), mj.replay(ref))
    with pytest.raises(ValueError, match="needs store="):
        mj.train(*args, offload=True)
    # resuming an offloaded run: the first 3 rounds stay on disk, the next 3 are appended there
    half = mj.FedConfig(**{**ns["cfg"].__dict__, "rounds": 3})
    mj.train(*args[:4], half, ns["comps"], store=str(tmp_path / "r"), offload=True)
    resumed = mj.train(*args, store=str(tmp_path / "r"), resume=True, offload=True)
    assert same(resumed.params, mem.params)
    for name, h in resumed.histories.items():
        assert isinstance(h.records, S.StoredRecords) and h.round_ids == list(range(ns["cfg"].rounds))
        assert same(mj.replay(h), mj.replay(mem.histories[name]))


def test_a_lazy_history_finds_corruption_when_replay_reads_the_round(saved):
    path, _ = saved
    lazy = S.load_history(path, lazy=True)  # opening reads the commits only
    chunk = next(os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "rounds", "1", "row:0", "c"))
                 for f in fs)
    data = bytearray(open(chunk, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(chunk, "wb").write(bytes(data))
    assert lazy.masks().present.shape[0] == 3  # the masks are intact and read without the rows
    with pytest.raises(S.HistoryFileError, match=r"round 1: array 'rounds/1/row:0' is corrupted"):
        mj.replay(lazy)
