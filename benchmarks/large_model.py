"""A model of >= 1M parameters, 100 users, 100 rounds, the MEDU history offloaded to disk.

    python benchmarks/large_model.py --quick     # 10 users x 5 rounds of an 85k-parameter MLP, about a minute
    python benchmarks/large_model.py             # 100 users x 100 rounds, MLP 64-1024-1024-10 (1,126,410 params)

What is measured (one process, wall clock; figures in docs/performance.md):

1. ``mj.train(..., store=DIR, offload=True)`` with the MEDU history (keep 50% of users per round, tau 0.3, A2,
   2 bits): host memory holds no round of the history, each round is committed to ``DIR/medu`` as it ends. A
   thread watches the store's commit log (one line per committed round), so the steady rate (rounds/s from the
   first commit to the last) is reported apart from the whole run's wall time, which includes compilation.
2. Peak host memory: the process's resident-set high-water mark (``VmHWM`` of /proc/self/status), reset
   before each phase (``/proc/self/clear_refs`` = 5) so that training's and replay's peaks are apart. Device
   memory: what ``jax.devices()[0].memory_stats()`` reports (on the CPU backend it reports nothing: device
   arrays live in the same process memory, so the host peak includes them).
3. Bytes stored: the files' sizes under ``DIR`` (history records, commit log, the training state of the last
   round), against the history's own bytes (``History.nbytes``) and a float32 history's (``float32_nbytes``).
4. Replay from disk: the store's pages evicted from the page cache (``posix_fadvise(DONTNEED)``), then
   ``mj.replay`` of the offloaded history (every round read from the files and decoded), with no user removed
   (the rebuild error against the trained model is printed as a check), twice: the first call includes
   compiling replay's programs, the second (pages evicted again) is the steady time; then with 10% of the users
   removed (compiled, cold pages).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import medu_jax as mj

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from store_scale import evict, files_and_bytes  # noqa: E402


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return -1


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class CommitWatch(threading.Thread):
    """Polls ``path`` (a store's commits.jsonl) and records when each committed round's line appeared."""

    def __init__(self, path: str, every: float = 0.05):
        super().__init__(daemon=True)
        self.path, self.every, self.times, self.stop = path, every, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    n = f.read().count(b"\n")
            except OSError:
                n = 0
            now = time.perf_counter()
            self.times.extend([now] * (n - len(self.times)))
            self.stop.wait(self.every)


def mib(kib: int) -> str:
    return f"{kib / 1024:,.0f} MiB"


def device_memory() -> str:
    stats = jax.devices()[0].memory_stats()
    if not stats:
        return f"{jax.devices()[0].platform}: memory_stats() reports nothing (CPU: device arrays are process memory)"
    return f"peak_bytes_in_use {stats.get('peak_bytes_in_use', 0) / 2**20:,.0f} MiB, bytes_in_use " \
           f"{stats.get('bytes_in_use', 0) / 2**20:,.0f} MiB"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10 users x 5 rounds, MLP 64-256-256-10")
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=100)
    ap.add_argument("--hidden", default="1024,1024", help="the MLP's hidden widths")
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--store", help="folder for the history store (default: a temporary folder, removed after)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.users, args.rounds, args.hidden = 10, 5, "256,256"
    hidden = tuple(int(h) for h in args.hidden.split(","))

    ds = mj.data.load_digits(args.seed)
    clients = mj.data.make_clients(ds, args.users, args.seed, alpha=0.3)
    model = mj.models.MLP(hidden, ds.num_classes)
    params0 = model.init(jax.random.key(args.seed), jnp.zeros((1, ds.x_train.shape[1])))
    nparams = sum(int(a.size) for a in jax.tree.leaves(params0))
    tx = optax.sgd(args.lr)
    cfg = mj.FedConfig(args.rounds, args.local_steps, args.batch_size, seed=args.seed)
    comp = {"medu": mj.medu(fraction=0.5, tau=0.3, lattice="A2", bits=2)}
    root = args.store or tempfile.mkdtemp(prefix="medu_large_")
    store = os.path.join(root, "run")
    if os.path.exists(store):
        shutil.rmtree(store)
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, jax {jax.__version__} {jax.devices()[0].platform}; "
          f"MLP {hidden}: {nparams:,} parameters; {args.users} users (digits, Dirichlet 0.3), {args.rounds} rounds "
          f"of {args.local_steps} local steps of batch {args.batch_size}; MEDU 50% users, tau 0.3, A2, 2 bits; "
          f"store {store}", flush=True)
    rss0 = status_kib("VmRSS")

    resettable = reset_peak()
    watch = CommitWatch(os.path.join(store, "medu", "commits.jsonl"))
    watch.start()
    t0 = t0_train = time.perf_counter()
    run = mj.train(model.apply, tx, params0, clients, cfg, comp, store=store, offload=True)
    jax.block_until_ready(run.params)
    t_train = time.perf_counter() - t0
    time.sleep(0.2)
    watch.stop.set()
    watch.join()
    times = watch.times
    peak_train, rss_train = status_kib("VmHWM"), status_kib("VmRSS")
    dev_train = device_memory()
    h = run.histories["medu"]
    nfiles, disk = files_and_bytes(store)
    folder = os.path.join(store, "medu")
    parts = {f: os.path.getsize(os.path.join(folder, f)) for f in sorted(os.listdir(folder))}
    acc = mj.metrics.accuracy(model.apply, run.params, ds.x_test, ds.y_test)

    evict(store)
    reset_peak()
    t0 = time.perf_counter()
    w = jax.block_until_ready(mj.replay(h))
    t_replay_first = time.perf_counter() - t0
    evict(store)
    t0 = time.perf_counter()
    w = jax.block_until_ready(mj.replay(h))
    t_replay = time.perf_counter() - t0
    peak_replay = status_kib("VmHWM")
    rebuild = mj.metrics.relative_distance(w, run.params)
    remove = list(range(args.users - max(1, args.users // 10), args.users))
    evict(store)
    t0 = time.perf_counter()
    jax.block_until_ready(mj.replay(h, remove))
    t_replay_rm = time.perf_counter() - t0

    f32 = h.float32_nbytes
    steady = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")
    first = times[0] - t0_train if times else float("nan")
    print(f"training: {args.rounds} rounds in {t_train:.1f} s wall ({args.rounds / t_train:.3f} rounds/s with "
          f"compilation); first round committed after {first:.1f} s (compilation + one round); steady "
          f"{steady:.3f} rounds/s ({len(times)} commits watched); test accuracy {100 * acc:.1f}%")
    print(f"peak host RSS during training: {mib(peak_train)} (RSS before training {mib(rss0)}, after "
          f"{mib(rss_train)}; peak reset per phase: {resettable})")
    print(f"device memory: {dev_train}")
    print(f"stored: {disk / 2**20:,.1f} MiB in {nfiles} files on disk; history records {h.nbytes / 2**20:,.1f} MiB; "
          f"a float32 history would be {f32 / 2**20:,.1f} MiB ({f32 / max(h.nbytes, 1):.1f}x the records, "
          f"{f32 / max(disk, 1):.1f}x the files)")
    print("  files of the history store: " + ", ".join(f"{f} {n / 2**20:,.1f} MiB" for f, n in parts.items()))
    print(f"replay from disk (cold page cache), no user removed: first call {t_replay_first:.1f} s (with "
          f"compilation), then {t_replay:.1f} s ({args.rounds / t_replay:.1f} "
          f"rounds/s), rebuild error vs the trained model {100 * rebuild:.1f}%; peak host RSS during replay "
          f"{mib(peak_replay)}")
    print(f"replay from disk, {len(remove)} users removed: {t_replay_rm:.1f} s")
    if not args.store:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
