"""The history store at scale: appended rounds/s, replay throughput from disk, bytes and files on disk.

    python benchmarks/store_scale.py --quick      # 200 rounds x 100 users, seconds
    python benchmarks/store_scale.py              # 10,000 rounds x 1,000 users (see docs/store.md for figures)

What is measured (one process, wall clock, this machine's disk):

1. ``train(store=...)`` for ``--train-rounds`` rounds against the same training without a store (both warm):
   the store's cost inside a real run (MEDU compressor, small MLP on digits, every round committed).
2. ``HistoryWriter.append`` of ``--rounds`` rounds, each with its training state (global params and the
   compressor's per-user state), once with ``fsync=True`` (the default: a commit is on the disk when append
   returns) and once with ``fsync=False``. The records are the real MEDU records of step 1's run, taken in turn
   (their ``round`` entry set to the round appended), so a 10,000-round store does not need 10,000 rounds of
   training (this machine trains 1,000 users at a few rounds/s).
3. Reading the store back: ``load_history(lazy=True)`` (the commit chain), then every array of every round
   (crc32 of the bytes on disk, zstd decode, crc32 of the array), with the store's pages in the page cache
   ("warm") and after ``posix_fadvise(DONTNEED)`` evicted them ("cold": read from the disk); then ``mj.replay``
   of the whole history from disk (decode every stored row and aggregate), cold.
4. Bytes on disk (the files' sizes), the number of files, and the records' own bytes (``History.nbytes``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import medu_jax as mj
from medu_jax import store as S


def files_and_bytes(path: str) -> tuple[int, int]:
    n = size = 0
    for d, _, fs in os.walk(path):
        for f in fs:
            n += 1
            size += os.path.getsize(os.path.join(d, f))
    return n, size


def evict(path: str) -> None:
    """Drops a store's file pages from the page cache (they are clean after fsync), so reads go to the disk."""
    for d, _, fs in os.walk(path):
        for f in fs:
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def setup(users: int, hidden: int, seed: int = 0):
    ds = mj.data.load_digits(seed)
    clients = mj.data.make_clients(ds, users, seed=seed)
    model = mj.models.MLP((hidden,), ds.num_classes)
    params0 = model.init(jax.random.key(seed), jnp.zeros((1, ds.x_train.shape[1])))
    return model, params0, clients


def timed_train(args, rounds: int, store: str | None):
    model, params0, clients, comp = args
    cfg = mj.FedConfig(rounds=rounds, local_steps=1, batch_size=8, seed=0)
    t0 = time.perf_counter()
    run = mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, {"medu": comp}, store=store)
    jax.block_until_ready(run.params)
    return run, time.perf_counter() - t0


def append_rounds(path: str, hist, rounds: int, fsync: bool) -> float:
    """Seconds to append ``rounds`` rounds (hist's records in turn) with a training state each, and finish."""
    state = hist.compressor.init(hist.like.zeros())
    recs = [dict(r) for r in hist.records]
    t0 = time.perf_counter()
    w = S.HistoryWriter(path, hist, planned=rounds, fsync=fsync)
    for t in range(rounds):
        rec = dict(recs[t % len(recs)])
        rec["round"] = np.array([t], np.int32)
        w.append(t, rec, hist.params0, state)
    w.finish()
    return time.perf_counter() - t0


def read_all(path: str) -> tuple[float, float, int]:
    """(seconds to open a store lazily (attributes and commit chain), seconds to read and check every array of
    every round, decoded bytes)."""
    t0 = time.perf_counter()
    h = S.load_history(path, lazy=True)
    t_open = time.perf_counter() - t0
    t0 = time.perf_counter()
    n = 0
    for rec in h.records:
        for k in rec:
            n += rec[k].nbytes
    return t_open, time.perf_counter() - t0, n


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="200 rounds x 100 users (seconds)")
    p.add_argument("--rounds", type=int, help="rounds appended by the writer (default 10000; quick 200)")
    p.add_argument("--users", type=int, help="users (default 1000; quick 100)")
    p.add_argument("--train-rounds", type=int, help="rounds of real training, with and without a store "
                   "(default 50; quick 20); their records are the writer's")
    p.add_argument("--hidden", type=int, default=4, help="hidden units of the MLP on digits (4: 310 parameters)")
    p.add_argument("--dir", help="folder for the stores (default: a temporary folder, removed after)")
    a = p.parse_args(argv)
    rounds = a.rounds or (200 if a.quick else 10_000)
    users = a.users or (100 if a.quick else 1_000)
    train_rounds = a.train_rounds or (20 if a.quick else 50)
    base = a.dir or tempfile.mkdtemp(prefix="store_scale-")
    os.makedirs(base, exist_ok=True)
    model, params0, clients = setup(users, a.hidden)
    comp = mj.medu(fraction=0.5, tau=0.3, lattice="A2", bits=2)
    nparams = sum(np.size(x) for x in jax.tree.leaves(params0))
    print(f"# store_scale: {rounds} rounds x {users} users, MLP({a.hidden}) on digits ({nparams} parameters), "
          f"MEDU (keep 50%, tau 0.3, A2, 2 bits); {platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}; folder {base}")
    try:
        args = (model, params0, clients, comp)
        timed_train(args, train_rounds, None)  # compile both paths first (same rounds: the same programs)
        timed_train(args, train_rounds, os.path.join(base, "warm"))
        run, t_mem = timed_train(args, train_rounds, None)
        run_s, t_store = timed_train(args, train_rounds, os.path.join(base, "train"))
        hist = run_s.histories["medu"]
        per = (t_store - t_mem) / train_rounds * 1e3
        print(f"train {train_rounds} rounds: {train_rounds / t_mem:.1f} rounds/s without a store, "
              f"{train_rounds / t_store:.1f} rounds/s with one ({per:+.1f} ms/round)")

        rows = {}
        for fsync in (True, False):
            path = os.path.join(base, f"w{int(fsync)}")
            rows[fsync] = append_rounds(path, hist, rounds, fsync)
            print(f"append {rounds} rounds, fsync={fsync}: {rounds / rows[fsync]:.0f} rounds/s "
                  f"({rows[fsync] / rounds * 1e3:.2f} ms/round)")
        path = os.path.join(base, "w1")
        nfiles, nbytes = files_and_bytes(path)
        rec_bytes = hist.nbytes / hist.num_rounds
        state_bytes = os.path.getsize(os.path.join(path, "state.0"))
        print(f"on disk: {nbytes / 2**20:.1f} MiB in {nfiles} files (rounds.bin "
              f"{os.path.getsize(os.path.join(path, S.ROUNDS_FILE)) / 2**20:.1f} MiB, commits.jsonl "
              f"{os.path.getsize(os.path.join(path, S.COMMITS_FILE)) / 2**20:.1f} MiB, two state slots of "
              f"{state_bytes / 2**20:.2f} MiB); a record is {rec_bytes / 1024:.1f} KiB in memory")
        data_bytes = os.path.getsize(os.path.join(path, S.ROUNDS_FILE))
        read_all(path)  # first use of the reading code
        for what in ("warm (page cache)", "cold (evicted)"):
            if what.startswith("cold"):
                evict(path)
            t_open, t, decoded = read_all(path)
            print(f"open lazily (commit chain) {what}: {t_open:.2f} s; read every array: {rounds / t:.0f} "
                  f"rounds/s, {data_bytes / t / 1e6:.1f} MB/s from rounds.bin ({decoded / t / 1e6:.1f} MB/s "
                  "decoded)")
        for what in ("cold, compiling", "cold, compiled"):
            evict(path)
            t0 = time.perf_counter()
            h = S.load_history(path, lazy=True)
            jax.block_until_ready(mj.replay(h))
            t_replay = time.perf_counter() - t0
            print(f"replay from disk ({what}; opening included): {rounds / t_replay:.0f} rounds/s "
                  f"({t_replay:.1f} s, {data_bytes / t_replay / 1e6:.1f} MB/s from rounds.bin)")
        t0 = time.perf_counter()
        mem = S.load_history(path)
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        jax.block_until_ready(mj.replay(mem))
        t_mem = time.perf_counter() - t0
        print(f"the same history in memory: load_history {t_load:.1f} s, then replay {rounds / t_mem:.0f} rounds/s "
              f"({t_mem:.1f} s)")
    finally:
        if not a.dir:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
