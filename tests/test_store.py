"""Durable history: round trip, crash mid-save and resume, corruption and foreign files."""

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings

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
    comps = {"medu": mj.medu(0.6, 0.2, "A2", 3, correction=True), "f32": mj.identity()}
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
        assert same(mj.replay(loaded, [4]), mj.replay(hist, [4]))
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
        orig = S._pwrite
        def dying_write(fd, data, offset, what):
            if what == "commit 3":   # halfway through committing round 3: half the line, then SIGKILL
                os.pwrite(fd, data[: len(data) // 2], offset)
                os.kill(os.getpid(), signal.SIGKILL)
            return orig(fd, data, offset, what)
        S._pwrite = dying_write
        mj.train(model.apply, tx, params0, clients, cfg, comps, store={str(crash)!r})
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    ns = setup()
    with pytest.warns(S.IncompleteHistoryWarning, match="holds 3 of 6 rounds"):
        h = S.load_history(str(crash / "medu"), ns["params0"])
    assert h.num_rounds == 3  # rounds 0..2 complete, round 3 was in flight
    assert S.store_info(str(crash / "medu"))[1:4] == (3, 6, False)
    resumed = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], ns["cfg"], ns["comps"],
                       store=str(crash), resume=True)
    full = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], ns["cfg"], ns["comps"])
    assert same(resumed.params, full.params)
    for name in full.histories:
        a, b = S.load_history(str(crash / name), ns["params0"]), full.histories[name]
        assert a.num_rounds == 6 and all(same(x, y) for x, y in zip(a.records, b.records))
        assert S.store_info(str(crash / name)).complete


@pytest.fixture(scope="module")
def saved_once(tmp_path_factory):
    ns = setup()
    cfg = mj.FedConfig(rounds=3, local_steps=1, batch_size=8, seed=2)
    run = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], cfg, {"m": ns["comps"]["medu"]})
    path = str(tmp_path_factory.mktemp("saved") / "h")
    S.save_history(run.histories["m"], path)
    return path, ns


@pytest.fixture
def saved(saved_once, tmp_path):
    """A 3-round store written by save_history, a fresh copy per test (tests damage it)."""
    path = str(tmp_path / "h")
    shutil.copytree(saved_once[0], path)
    return path, saved_once[1]


def commit_lines(path):
    with open(os.path.join(path, S.COMMITS_FILE), "rb") as f:
        return f.read().split(b"\n")[:-1]


def write_lines(path, lines):
    with open(os.path.join(path, S.COMMITS_FILE), "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines))


def place(path, t, key):
    """[offset, length, crc32] of round t's array ``key`` in rounds.bin, from its commit."""
    return json.loads(commit_lines(path)[t])["places"][f"rounds/{t}/{key}"]


def flip(path, t, key):
    """Flips a byte in the middle of round t's array ``key`` in rounds.bin."""
    off, n, _ = place(path, t, key)
    with open(os.path.join(path, S.ROUNDS_FILE), "r+b") as f:
        f.seek(off + n // 2)
        b = f.read(1)[0]
        f.seek(off + n // 2)
        f.write(bytes([b ^ 0xFF]))


def test_flipped_bytes_name_the_corrupted_array(saved):
    path, ns = saved
    flip(path, 1, "row:0")
    with pytest.raises(S.HistoryFileError, match=r"round 1: array 'rounds/1/row:0' is corrupted \(its bytes on disk do not match"):
        S.load_history(path)


def test_a_truncated_data_file_names_the_array(saved):
    path, _ = saved
    off, n, _ = place(path, 2, "present")
    os.truncate(os.path.join(path, S.ROUNDS_FILE), off + 1)
    with pytest.raises(S.HistoryFileError, match=r"round 2: array 'rounds/2/present' is truncated \(1 of its "):
        S.load_history(path)
    os.remove(os.path.join(path, S.ROUNDS_FILE))
    with pytest.raises(S.HistoryFileError, match=r"round 0: 'rounds.bin', which holds array 'rounds/0/active', is missing"):
        S.load_history(path)


def test_a_damaged_state_slot_is_named(tmp_path):
    ns = setup()
    cfg = mj.FedConfig(rounds=3, local_steps=1, batch_size=8, seed=2)
    run = mj.train(ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], cfg, {"m": ns["comps"]["medu"]},
                   store=str(tmp_path / "s"))
    path = str(tmp_path / "s" / "m")
    hist = S.load_history(path, ns["params0"])
    params, _ = S.load_state(path, hist, 2)
    assert same(params, run.params)
    with pytest.raises(S.HistoryFileError, match="do not match their checksum"):  # slot 0 now holds round 2's
        S.load_state(path, hist, 0)
    with open(os.path.join(path, "state.0"), "r+b") as f:
        f.write(b"\xff")
    with pytest.raises(S.HistoryFileError, match=r"state after round 2: array 'state/0/params/0' is corrupted"):
        S.load_state(path, hist, 2)


def test_truncated_chunk_and_torn_commit(saved):
    path, _ = saved
    # in a store marked complete, a torn last commit is damage; in one cut short, it is the round in flight
    lines = commit_lines(path)
    with open(os.path.join(path, S.COMMITS_FILE), "wb") as f:
        f.write(b"".join(line + b"\n" for line in lines[:2]) + lines[2][:40])
    with pytest.raises(S.HistoryFileError, match="commit of round 2 is corrupted"):
        S.load_history(path)
    os.remove(os.path.join(path, S.FINAL_FILE))
    with pytest.warns(S.IncompleteHistoryWarning, match="holds 2 of 3 rounds"):
        assert S.load_history(path).num_rounds == 2
    write_lines(path, [b"{"] + lines[1:])
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
            assert same(mj.replay(h, [4], chunk=chunk), mj.replay(ref, [4]))
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
    flip(path, 1, "row:0")
    assert lazy.masks().present.shape[0] == 3  # the masks are intact and read without the rows
    with pytest.raises(S.HistoryFileError, match=r"round 1: array 'rounds/1/row:0' is corrupted"):
        mj.replay(lazy)


# ------------------------------------------------------------------ every byte in one chain (issue 16)


def edit_json(path, fn, attrs=True):
    """Rewrites a zarr.json with fn applied to its attributes (attrs=False: to the whole document)."""
    with open(path) as f:
        doc = json.load(f)
    fn(doc["attributes"] if attrs else doc)
    with open(path, "w") as f:
        json.dump(doc, f)


def set_lattice(a, name):
    next(layer for layer in a["compressor"] if layer["layer"] == "LatticeCoding")["lattice"] = name


@pytest.mark.parametrize("key, change", [
    ("seed", lambda a: a.update(seed=3)),  # one flipped bit: 2 -> 3
    ("server_lr", lambda a: a.update(server_lr=2.0)),
    ("compressor", lambda a: set_lattice(a, "Z")),
    ("run", lambda a: a.update(run={"fed": {}})),
])
def test_a_changed_root_attribute_is_named(saved, key, change):
    path, _ = saved
    edit_json(os.path.join(path, "zarr.json"), change)
    with pytest.raises(S.HistoryFileError, match=f"root attribute '{key}' does not match its checksum"):
        S.load_history(path)


def test_a_changed_attribute_with_a_recomputed_checksum_breaks_the_commit_chain(saved):
    path, _ = saved

    def forge(a):
        a["seed"] = 3
        a["checks"]["seed"] = S._jcrc(3)

    edit_json(os.path.join(path, "zarr.json"), forge)
    with pytest.raises(S.HistoryFileError, match="commit of round 0 was written for other root attributes"):
        S.load_history(path)


@pytest.mark.parametrize("what, match", [
    ("params0/1", r"params0: array '1' does not match its committed checksum"),
    ("weights", r"array 'weights' does not match its committed checksum"),
])
def test_a_lost_chunk_of_params0_or_weights_is_named(saved, what, match):
    path, _ = saved
    for d, _, fs in os.walk(os.path.join(path, what, "c")):
        for f in fs:
            os.remove(os.path.join(d, f))  # zarr would read zeros
    with pytest.raises(S.HistoryFileError, match=match):
        S.load_history(path)


def test_a_deleted_middle_commit_is_a_gap(saved):
    path, _ = saved
    write_lines(path, [commit_lines(path)[i] for i in (0, 2)])
    with pytest.raises(S.HistoryFileError, match=r"commit of round 1 is missing, but rounds \[2\] are committed"):
        S.load_history(path)


def test_a_deleted_last_commit_is_not_a_shorter_finished_run(saved):
    path, _ = saved
    assert S.store_info(path)[1:4] == (3, 3, True)
    write_lines(path, commit_lines(path)[:2])
    with pytest.raises(S.HistoryFileError, match="marked complete with 3 rounds, but its commits hold 2"):
        S.load_history(path)
    os.remove(os.path.join(path, S.FINAL_FILE))  # and without the mark, the commits still say 3 rounds were planned
    assert S.store_info(path)[1:4] == (2, 3, False)
    with pytest.warns(S.IncompleteHistoryWarning, match="cut short: it holds 2 of 3 rounds"):
        S.load_history(path)


def test_a_replaced_commit_or_a_forged_completion_mark_is_named(saved):
    path, _ = saved
    final = os.path.join(path, S.FINAL_FILE)
    with open(final) as f:
        mark = json.load(f)
    with open(final, "w") as f:
        json.dump({**mark, "rounds": 2}, f)
    with pytest.raises(S.HistoryFileError, match=r"completion mark \('final'\) is corrupted"):
        S.load_history(path)
    os.remove(final)
    forge_commit(path, 1, lambda c: c.update(prev=12345))  # a valid checksum of its own, but not followed
    with pytest.raises(S.HistoryFileError, match="commit of round 1 does not follow the commit of round 0"):
        S.load_history(path)


def forge_commit(path, t, fn):
    """Rewrites commit t with fn applied and its own checksum recomputed (as a forger would)."""
    lines = commit_lines(path)
    c = json.loads(lines[t])
    fn(c)
    c["crc"] = S._jcrc({k: v for k, v in c.items() if k != "crc"})
    lines[t] = S._canon(c).encode()
    write_lines(path, lines)


def test_shapes_on_disk_are_checked_before_anything_is_allocated(saved):
    path, _ = saved
    # a zarr array header claiming 30000 x 30000: refused from the metadata, before reading
    saved_meta = open(os.path.join(path, "params0", "1", "zarr.json")).read()
    edit_json(os.path.join(path, "params0", "1", "zarr.json"), lambda d: d.update(shape=[30000, 30000]), attrs=False)
    with pytest.raises(S.HistoryFileError, match=r"params0: array '1' is \[30000, 30000\] .* on disk, "
                                                 r"but was written as"):
        S.load_history(path)
    open(os.path.join(path, "params0", "1", "zarr.json"), "w").write(saved_meta)
    # the last commit of a store cut short claiming a 30000 x 30000 round (its own checksum recomputed)
    os.remove(os.path.join(path, S.FINAL_FILE))
    forge_commit(path, 2, lambda c: c["arrays"]["rounds/2/row:0"].__setitem__(1, [30000, 30000]))
    with pytest.raises(S.HistoryFileError, match=r"commit of round 2 is impossible \(its arrays take \d+ bytes, "
                                                 r"more than a round"):
        S.load_history(path)

    def users(n):  # a store claiming n users, its checksums recomputed: still refused
        def forge(a):
            for leaf in a["like"]["leaves"]:
                leaf[0][0] = n
            a["checks"]["like"] = S._jcrc(a["like"])
        return forge

    root = os.path.join(path, "zarr.json")
    edit_json(root, users(10**12))
    with pytest.raises(S.HistoryFileError, match=r"impossible history \(1000000000000 users\)"):
        S.load_history(path)
    edit_json(root, users(6))  # K = 6 in the attributes, 5 weights on disk
    with pytest.raises(S.HistoryFileError, match=r"impossible history \(weights .* for 6 users\)"):
        S.load_history(path)


def test_a_pickle_codec_is_refused(saved):
    path, _ = saved
    meta = os.path.join(path, "weights", "zarr.json")
    edit_json(meta, lambda d: d.update(codecs=[{"name": "numcodecs.pickle", "configuration": {}}]), attrs=False)
    with pytest.raises(S.HistoryFileError, match=r"array 'weights' is corrupted \(UnknownCodecError"):
        S.load_history(path)


@pytest.fixture(scope="module")
def ref3(tmp_path_factory):
    """A stored 3-round run (two histories) as the reference of the crash, disk-full and lock tests."""
    ns = setup()
    cfg = mj.FedConfig(rounds=3, local_steps=1, batch_size=8, seed=2)
    args = (ns["model"].apply, ns["tx"], ns["params0"], ns["clients"], cfg, ns["comps"])
    return ns, args, mj.train(*args, store=str(tmp_path_factory.mktemp("ref3") / "s"))


def check_resumed(folder, ns, ref, run):
    assert same(run.params, ref.params)
    with warnings.catch_warnings():
        warnings.simplefilter("error", S.IncompleteHistoryWarning)  # complete: no warning
        for name, h in ref.histories.items():
            got = S.load_history(os.path.join(folder, name), ns["params0"])
            assert got.num_rounds == 3 and all(same(a, b) for a, b in zip(got.records, h.records))
    assert not [e for e in os.listdir(folder) if ".tmp-" in e or ".old-" in e]


class Crash(Exception):
    """The process stops here (no cleanup runs in the store code, as with SIGKILL)."""


def test_a_crash_at_any_write_of_creation_or_appending_resumes_bit_identically(ref3, tmp_path, monkeypatch):
    ns, args, ref = ref3
    from zarr.storage import LocalStore

    orig, orig_pwrite, calls = LocalStore.set, S._pwrite, {"n": 0, "at": None}

    async def set_or_crash(self, key, value):  # every file zarr writes (the stores' creation) goes through here
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise Crash(key)
        return await orig(self, key, value)

    def pwrite_or_crash(fd, data, offset, what):  # and every byte appended or replaced after it: a torn write
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            orig_pwrite(fd, bytes(data)[: len(data) // 2], offset, what)
            raise Crash(what)
        return orig_pwrite(fd, data, offset, what)

    monkeypatch.setattr(LocalStore, "set", set_or_crash)
    monkeypatch.setattr(S, "_pwrite", pwrite_or_crash)
    mj.train(*args, store=str(tmp_path / "count"))
    total = calls["n"]  # files written by a whole run (both stores' creation, 3 rounds, commits, marks)
    # inside the first store's creation, between the two stores, in the second's, at the first round, through the
    # rounds, the last commits and the completion marks
    points = sorted({1, 2, 12, 20, 25, 30, total // 3, total // 2, 2 * total // 3, total - 2, total - 1, total})
    for at in points:
        folder = str(tmp_path / f"crash{at}")
        calls.update(n=0, at=at)
        with pytest.raises(Crash):
            mj.train(*args, store=folder)
        calls["at"] = None
        for name, h in ref.histories.items():  # a reader sees committed rounds only
            if os.path.exists(os.path.join(folder, name)):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", S.IncompleteHistoryWarning)
                    got = S.load_history(os.path.join(folder, name), ns["params0"])
                assert all(same(a, b) for a, b in zip(got.records, h.records)), at
        with pytest.raises(FileExistsError, match="resume=True") if any(
                os.path.exists(os.path.join(folder, n)) for n in ref.histories) else contextlib.nullcontext():
            mj.train(*args, store=folder)  # a fresh run refuses what is there (the lock was released)
        check_resumed(folder, ns, ref, mj.train(*args, store=folder, resume=True))


def test_a_full_disk_stops_the_run_with_a_clear_error_and_resume_continues(ref3, tmp_path, monkeypatch):
    ns, args, ref = ref3
    folder = str(tmp_path / "s")
    orig = S._pwrite

    def full_disk(fd, data, offset, what):
        if what == "round 1":
            with pytest.raises(S.StoreBusyError, match="being written by another process"):
                S.StoreLock(folder)  # the run holds the lock while it writes
            orig(fd, bytes(data)[:3], offset, what)  # some bytes made it
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(fd, data, offset, what)

    monkeypatch.setattr(S, "_pwrite", full_disk)
    with pytest.raises(OSError, match=r"writing round 1 to the history store .* failed \(No space left on device\); "
                                      r"the store keeps its 1 committed rounds"):
        mj.train(*args, store=folder)
    monkeypatch.setattr(S, "_pwrite", orig)
    assert S.store_info(os.path.join(folder, "medu"))[1:4] == (1, 3, False)
    check_resumed(folder, ns, ref, mj.train(*args, store=folder, resume=True))


def test_a_second_writer_is_refused(ref3, tmp_path):
    ns, args, ref = ref3
    folder = tmp_path / "s"
    folder.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(folder / S.LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.pwrite(fd, b"pid %d" % os.getpid(), 0)
        print("locked", flush=True)
        time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for resume in (False, True):
            with pytest.raises(S.StoreBusyError, match=rf"being written by another process \(pid {holder.pid}\)"):
                mj.train(*args, store=str(folder), resume=resume)
    finally:
        holder.kill()
        holder.wait()
    mj.train(*args, store=str(folder))  # the OS released the dead holder's lock
    with S.StoreLock(str(folder)):  # and train released its own on return
        pass


def test_resume_refuses_another_configuration_naming_the_fields(tmp_path):
    ns = setup()
    store = str(tmp_path / "st")
    cfg = mj.FedConfig(rounds=2, local_steps=1, batch_size=8, seed=2)
    comps = {"m": ns["comps"]["medu"]}
    base = dict(model=ns["model"].apply, tx=ns["tx"], params0=ns["params0"], data=ns["clients"], cfg=cfg,
                compressors=comps)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        mj.train(**base, store=store, resume=True)
    mj.train(**base, store=store)
    other_data = mj.data.make_clients(mj.data.load_digits(0), 5, seed=1)
    cases = [
        ({"tx": optax.sgd(0.2)}, "optimizer.probe"),  # learning rate
        ({"tx": optax.sgd(optax.exponential_decay(0.1, 1, 0.5))}, "optimizer"),  # a schedule, same first step
        ({"tx": optax.adam(0.1)}, "optimizer"),
        ({"model": lambda p, x: 2 * ns["model"].apply(p, x)}, "model.probe"),  # same parameters, other model
        ({"cfg": mj.FedConfig(rounds=4, local_steps=2, batch_size=8, seed=2)}, "fed.local_steps"),
        ({"cfg": mj.FedConfig(rounds=2, local_steps=1, batch_size=8, seed=2, server_lr=0.5)}, "server_lr"),
        ({"params0": ns["model"].init(jax.random.key(1), jnp.zeros((1, 64)))}, "params0"),
        ({"data": other_data}, "data.x"),
        ({"exclude": [1]}, "users.exclude"),
        ({"update_scale": np.array([1, 1, 1, 1, -1.0])}, "users.update_scale"),
    ]
    for change, field in cases:
        with pytest.raises(S.HistoryFileError, match=rf"written by a different run \(.*{field}.* differ\)"):
            mj.train(**{**base, **change}, store=store, resume=True)
    # the same run resumes (and with more rounds, extends the store; client_chunk is a memory knob)
    more = mj.FedConfig(rounds=3, local_steps=1, batch_size=8, seed=2, client_chunk=5)
    mj.train(**{**base, "cfg": more}, store=store, resume=True)
    assert S.store_info(os.path.join(store, "m"))[1:4] == (3, 3, True)


@pytest.mark.parametrize("kw, err, match", [
    ({"server_lr": float("nan")}, ValueError, "FedConfig.server_lr must be finite"),
    ({"server_lr": float("inf")}, ValueError, "FedConfig.server_lr must be finite"),
    ({"rounds": 2.5}, TypeError, "FedConfig.rounds must be an integer, got 2.5"),
    ({"rounds": "3"}, TypeError, "FedConfig.rounds must be an integer, got '3'"),
    ({"local_steps": True}, TypeError, "FedConfig.local_steps must be an integer"),
    ({"batch_size": 0}, ValueError, "FedConfig.batch_size must be >= 1"),
    ({"seed": 1.0}, TypeError, "FedConfig.seed must be an integer"),
    ({"participation": "0.5"}, TypeError, "FedConfig.participation must be a number"),
    ({"participation": float("nan")}, ValueError, "FedConfig.participation must be finite"),
    ({"client_chunk": 2.0}, TypeError, "FedConfig.client_chunk must be an integer"),
])
def test_fedconfig_names_the_bad_field(kw, err, match):
    with pytest.raises(err, match=match):
        mj.FedConfig(**kw)


def test_fedconfig_accepts_numpy_numbers():
    cfg = mj.FedConfig(rounds=np.int64(3), participation=np.float32(0.5), server_lr=1, seed=np.int32(4))
    assert cfg.rounds == 3


def test_a_run_in_which_no_update_enters_the_aggregate_warns():
    ns = setup()
    cfg = mj.FedConfig(rounds=1, local_steps=1, batch_size=8, seed=2)
    args = (ns["model"].apply, ns["tx"], ns["params0"])
    with pytest.warns(RuntimeWarning, match="every update was rejected as non-finite"):
        run = mj.train(*args, ns["clients"], cfg, update_scale=np.full(5, np.nan))
    assert same(run.params, ns["params0"]) and run.log["rejected"] == [[0, 1, 2, 3, 4]]
    with pytest.warns(RuntimeWarning, match="no client has data"):
        mj.train(*args, ns["clients"]._replace(n=jnp.zeros_like(ns["clients"].n)), cfg)
    with pytest.warns(RuntimeWarning, match="no client has data"):
        mj.train(*args, ns["clients"], cfg, exclude=range(5))


@pytest.mark.parametrize("argv, match", [
    (["run", "--resume"], "--resume continues the run saved in --store"),
    (["demo", "--out", "{file}/sub"], "is a file, not a folder"),
    (["demo", "--store", "{file}"], "is a file, not a folder"),
    (["run", "--config", "{dir}"], "cannot be read"),
    (["demo", "--store", "{dir}/none", "--resume", "--rounds", "1"], "nothing to resume"),
])
def test_cli_store_and_folder_errors_are_one_line_with_exit_code_2(argv, match, tmp_path, capsys):
    from medu_jax import cli

    (tmp_path / "f").write_text("x")
    argv = [a.format(file=tmp_path / "f", dir=tmp_path) for a in argv]
    try:
        code = cli.main(argv + ["--quiet"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------------ scale and durability (issue 16)


def write_rounds(path, hist, rounds, **kw):
    """Appends ``rounds`` rounds (hist's records in turn) with a training state after each, then marks them."""
    w = S.HistoryWriter(path, hist, planned=rounds, **kw)
    state = hist.compressor.init(hist.like.zeros())
    for t in range(rounds):
        w.append(t, hist.records[t % hist.num_rounds], hist.params0, state)
    w.finish()
    return w


def files_under(path):
    return sum(len(fs) for _, _, fs in os.walk(path))


def test_the_number_of_files_does_not_grow_with_the_rounds(saved, tmp_path):
    path, ns = saved
    hist = S.load_history(path, ns["params0"])
    counts = {n: files_under(write_rounds(str(tmp_path / f"r{n}"), hist, n).path) for n in (10, 50)}
    assert counts[10] == counts[50] <= 20, counts
    got = S.load_history(str(tmp_path / "r50"), ns["params0"], lazy=True)
    assert len(got.records) == 50 and same(dict(got.records[49]), hist.records[49 % 3])


def test_a_commit_is_fsynced_after_its_data(saved, tmp_path, monkeypatch):
    path, ns = saved
    hist = S.load_history(path, ns["params0"])
    synced = []
    for name in ("fsync", "fdatasync"):
        def sync(fd, orig=getattr(os, name)):
            synced.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
            return orig(fd)
        monkeypatch.setattr(os, name, sync)
    w = write_rounds(str(tmp_path / "a"), hist, 0)
    assert {S.ROUNDS_FILE, S.COMMITS_FILE, "state.0", "zarr.json", "a"} <= set(synced)  # creation: every file
    synced.clear()
    state = hist.compressor.init(hist.like.zeros())
    w.append(0, hist.records[0], hist.params0, state)
    assert synced == [S.ROUNDS_FILE, "state.0", S.COMMITS_FILE]  # the data and the state, then the commit
    synced.clear()
    w = write_rounds(str(tmp_path / "b"), hist, 3, fsync=False)
    assert synced == [] and S.store_info(w.path)[1:4] == (3, 3, True)


def test_a_store_of_the_old_format_is_refused_naming_the_version(saved):
    path, _ = saved

    def old(a):
        a["version"] = 2
        a["checks"]["version"] = S._jcrc(2)

    edit_json(os.path.join(path, "zarr.json"), old)
    with pytest.raises(S.HistoryFileError, match=r"has history format version 2, this is 3 \(written by an older"):
        S.load_history(path)
