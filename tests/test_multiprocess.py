"""Multi-process training on JAX's own distributed runtime: two processes on this machine (CPU, gloo collectives
over localhost, 2 devices each), the 8 clients sharded over all 4 devices. The trained model, both processes'
histories and logs, and the store (written by process 0 alone, under its lock) have the same bits as one
process running the clients in chunks of K / devices. Each run is a subprocess of tests/multiprocess_worker.py.
"""

import os
import pickle
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import medu_jax as mj

WORKER = os.path.join(os.path.dirname(__file__), "multiprocess_worker.py")
TIMEOUT = 300  # s for one run of the worker(s); the whole test: 70-95 s wall, ~50 s CPU on the 2-core VM under load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run(out: str, nproc: int, local_devices: int = 2) -> list[dict]:
    os.makedirs(out)
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)
    procs = [subprocess.Popen([sys.executable, WORKER, out, str(i), str(nproc), str(port), str(local_devices)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(nproc)]
    deadline, logs = time.monotonic() + TIMEOUT, []
    try:
        for p in procs:
            try:
                logs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                logs.append(("", "TIMED OUT"))
    finally:
        for p in procs:  # one that failed leaves the other waiting in a collective: end it
            if p.poll() is None:
                p.kill()
                logs.append(p.communicate())
    report = "\n".join(f"--- process {i}: rc {p.returncode}\n{o}\n{e[-4000:]}"
                       for i, (p, (o, e)) in enumerate(zip(procs, logs)))
    assert all(p.returncode == 0 for p in procs), report
    results = []
    for i in range(nproc):
        with open(os.path.join(out, f"result{i}.pkl"), "rb") as f:
            results.append(pickle.load(f))
    return results


def _same(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y)
                                      for x, y in zip(la, lb))


def test_two_processes_give_the_same_bits_as_one(tmp_path):
    ref, = _run(str(tmp_path / "one"), 1)
    two = _run(str(tmp_path / "two"), 2)
    for i, r in enumerate(two):
        assert _same(r["params"], ref["params"]), f"process {i}: the trained model differs from one process's"
        for name, recs in ref["records"].items():
            assert len(r["records"][name]) == len(recs) == 3
            assert all(_same(a, b) for a, b in zip(r["records"][name], recs)), f"process {i}: history {name}"
        assert r["log"]["rejected"] == ref["log"]["rejected"] and r["log"]["overload"] == ref["log"]["overload"]
        # the mean loss and the coding error are diagnostics summed over clients in a layout-dependent order
        # (not the pairwise sum the model uses): equal up to the last bits
        assert np.allclose(r["log"]["loss"], ref["log"]["loss"], rtol=1e-5, atol=0), f"process {i}: loss"
        assert all(np.allclose(r["log"]["rel_error"][n], e, rtol=1e-5, atol=0)
                   for n, e in ref["log"]["rel_error"].items()), f"process {i}: rel_error"
    # the store: written by process 0 alone (its lock file names it), the same rounds as the histories
    store = tmp_path / "two" / "store"
    assert sorted(os.listdir(store)) == sorted([".medu.lock", *ref["records"]]), os.listdir(store)
    assert (store / ".medu.lock").read_text().split() == ["pid", str(two[0]["pid"])]
    for name, recs in ref["records"].items():
        h = mj.load_history(str(store / name))
        assert h.num_rounds == 3 and all(_same(a, b) for a, b in zip(h.records, recs)), name
