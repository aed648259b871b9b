"""medu_jax benchmarks: every figure is a ratio against a baseline measured in the same run.

    python benchmarks/run.py                 # everything (codec at 1e6 .. 3e8 entries), writes benchmarks/results.md
    python benchmarks/run.py --sizes 1e6 1e7 # a 3-minute run
    python benchmarks/run.py --out results_gpu.md                           # on a GPU
    python benchmarks/run.py --sections codec --sizes 268435456 --lattices Z A2 --bits 2 --out gpu_codec.md

Sections: (1) encode+pack and unpack+decode of a stacked user update vs a float32 copy of it, per lattice and
bit width; (2) FedAvg rounds/s, vmapped clients vs a per-client Python loop of the same model and data;
(3) unlearning (replay, and replay + 2 tuning rounds) vs retraining, same rounds; (4) history bytes vs a
float32 history as users and rounds grow.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time

# one host-platform device per core, so the sharded FedAvg row can put clients on every core (single-device rows
# use device 0 as usual; on a GPU machine the GPUs stay the default devices)
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={os.cpu_count() or 1}").strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import medu_jax as mj  # noqa: E402
from medu_jax.compressors import Like  # noqa: E402
from medu_jax.fedavg import cross_entropy  # noqa: E402
from medu_jax.history import compact, record_nbytes  # noqa: E402
from medu_jax.timing import timed_against  # noqa: E402


def best(fn, *args, repeats: int = 5) -> float:
    """Best wall time (s) of ``repeats`` warm calls."""
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return min(ts)


def codec_table(sizes: list[int], users: int, lattices: list[str], bits: list[int]) -> list[str]:
    rows = ["| entries | lattice | bits | copy (ms) | encode+pack (ms) | ratio | GB/s | unpack+decode (ms) | ratio | GB/s |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    copy = jax.jit(lambda a: a * 1.0)
    for n in sizes:
        per = -(-n // users)
        x = {"w": jax.random.normal(jax.random.key(0), (users, per))}
        like = Like.of(x)
        t_copy = best(copy, x["w"])
        gb = users * per * 4 / 1e9
        for lat in lattices:
            for b in bits:
                coder = mj.lattice_coding(lat, b).coder
                users_ids = jnp.arange(users)
                enc = jax.jit(lambda v: coder.encode(v, jax.random.key(1), like, users_ids)[0])
                rows_ = enc(x)
                dec = jax.jit(lambda r: coder.decode(r, jax.random.key(1), like, users_ids))
                t_e, t_d = best(enc, x), best(dec, rows_)
                rows.append(f"| {users * per:,} | {lat} | {b} | {t_copy * 1e3:.2f} | {t_e * 1e3:.2f} | "
                            f"{t_e / t_copy:.1f}x | {gb / t_e:.2f} | {t_d * 1e3:.2f} | {t_d / t_copy:.1f}x | {gb / t_d:.2f} |")
                print(rows[-1], flush=True)
    return rows


def _setup(users: int, rounds: int, hidden=(64,), local_steps: int = 10, batch_size: int = 32):
    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, users, 0)
    model = mj.models.MLP(hidden, ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.sgd(0.1)
    cfg = mj.FedConfig(rounds=rounds, local_steps=local_steps, batch_size=batch_size, seed=0)
    return ds, clients, model, params0, tx, cfg


def fedavg_row(users: int, rounds: int, hidden, local_steps: int, batch_size: int, sharded: bool = False) -> str:
    """Rounds/s of the vmapped jitted round (on one device, or ``sharded`` over all devices) vs the per-client
    Python loop (a jitted step per batch)."""
    ds, clients, model, params0, tx, cfg = _setup(users, rounds, hidden, local_steps, batch_size)
    x, y, n = np.asarray(clients.x), np.asarray(clients.y), np.asarray(clients.n)

    @jax.jit
    def sgd_step(p, o, xb, yb):
        g = jax.grad(functools.partial(cross_entropy, model.apply))(p, xb, yb)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    def loop_round(params, t):
        rng = np.random.default_rng(t)
        ups, ws = [], []
        for k in range(users):
            p, o = params, tx.init(params)
            for _ in range(cfg.local_steps):
                idx = rng.integers(0, max(n[k], 1), cfg.batch_size)
                p, o = sgd_step(p, o, x[k, idx], y[k, idx])
            ups.append(jax.tree.map(lambda a, b: a - b, p, params))
            ws.append(n[k])
        w = np.asarray(ws, np.float32) / np.sum(ws)
        agg = jax.tree.map(lambda *u: sum(wk * uk for wk, uk in zip(w, u)), *ups)
        return jax.tree.map(lambda a, b: a + b, params, agg)

    def loop_train():
        p = params0
        for t in range(rounds):
            p = loop_round(p, t)
        return p

    mesh = mj.client_mesh() if sharded else None
    ours = lambda: mj.train(model.apply, tx, params0, clients, cfg, mesh=mesh).params  # noqa: E731
    jax.block_until_ready(loop_train())  # compiles the loop's step; timed_against warms ``ours`` itself
    _, t_ours, t_loop = timed_against(ours, loop_train, repeats=3)
    where = f"{len(jax.devices())} {jax.devices()[0].platform} devices, sharded" if sharded else "1 device"
    return (f"| {users} | MLP{tuple(hidden)} | {local_steps} x {batch_size} | {where} | {rounds / t_ours:.1f} | "
            f"{rounds / t_loop:.2f} | {t_loop / t_ours:.1f}x |")


def fedavg_table(rounds: int) -> list[str]:
    """Three regimes: the demo's (compute-bound on CPU) and many small clients (the loop is dispatch-bound); the
    last again with the clients sharded over every device (one per CPU core here) when there are several."""
    rows = ["| users | model | local steps x batch | medu_jax on | medu_jax (rounds/s) | per-client loop (rounds/s) "
            "| speed-up |", "|---:|---|---|---|---:|---:|---:|"]
    runs = [(20, (64,), 10, 32, False), (100, (32,), 5, 16, False), (200, (16,), 5, 8, False)]
    n_dev = len(jax.devices())
    if n_dev > 1:
        runs.append((200 - 200 % n_dev, (16,), 5, 8, True))
    for users, hidden, steps, batch, sharded in runs:
        rows.append(fedavg_row(users, rounds, hidden, steps, batch, sharded))
        print(rows[-1], flush=True)
    return rows


def replay_table(users: int, rounds: int, local_steps: tuple[int, ...]) -> list[str]:
    """Unlearning vs retraining the same rounds, as local work grows: replay's cost does not depend on it."""
    rows = ["| local steps x batch | history | retrain (ms) | replay (ms) | speed-up | replay + 2 tuning rounds (ms) "
            "| speed-up |", "|---|---|---:|---:|---:|---:|---:|"]
    for steps in local_steps:
        ds, clients, model, params0, tx, cfg = _setup(users, rounds, local_steps=steps)
        bad = list(range(users - 4, users))
        run = mj.train(model.apply, tx, params0, clients, cfg,
                       {"medu": mj.medu(0.5, 0.3, "A2", 2), "float32": mj.identity()})
        retrain = lambda: mj.train(model.apply, tx, params0, clients, cfg, exclude=bad).params  # noqa: E731
        for name, h in run.histories.items():
            tune = lambda: mj.finetune(model.apply, tx, mj.replay(h, bad), clients, cfg, bad, 2)  # noqa: E731
            # retraining runs the training program already compiled above, so it is warm
            _, t_rp, t_re = timed_against(lambda: mj.replay(h, bad), retrain, repeats=7)
            _, t_ft, t_re2 = timed_against(tune, retrain, repeats=7)
            t_re = min(t_re, t_re2)
            rows.append(f"| {steps} x {cfg.batch_size} | {name} | {t_re * 1e3:.0f} | {t_rp * 1e3:.1f} | "
                        f"{t_re / t_rp:.1f}x | {t_ft * 1e3:.1f} | {t_re / t_ft:.1f}x |")
            print(rows[-1], flush=True)
    return rows


def bytes_table(runs: list[tuple[int, int]]) -> list[str]:
    """Stored bytes after (users, rounds) of synthetic updates of the digits MLP vs a float32 history, and the
    peak: the history plus the encoder's closed-loop state (float32 references, constant in rounds)."""
    _, _, model, params0, _, _ = _setup(2, 1)
    rows = ["| users | rounds | float32 history (B) | MEDU history (B) | ratio | encoder state (B) | "
            "peak: history + state (B) | ratio |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    comp = mj.medu(0.5, 0.3, "A2", 2)
    enc = jax.jit(comp.encode)
    for k, rounds in runs:
        tmpl = jax.tree.map(lambda p: jnp.zeros((k, *p.shape), p.dtype), params0)
        state = comp.init(tmpl)
        state_b = sum(a.nbytes for a in jax.tree.leaves(state["filters"]))
        total = 0
        for t in range(rounds):
            ups = jax.tree.map(lambda p: 0.01 * jax.random.normal(jax.random.fold_in(jax.random.key(t), p.size),
                                                                 (k, *p.shape)), params0)
            msg, state, *_ = enc(ups, state, mj.compressor_key(0, t))
            total += record_nbytes(compact(msg))
        f32 = rounds * k * sum(p.size for p in jax.tree.leaves(params0)) * 4
        rows.append(f"| {k} | {rounds} | {f32:,} | {total:,} | {f32 / total:.1f}x | {state_b:,} | "
                    f"{total + state_b:,} | {f32 / (total + state_b):.1f}x |")
        print(rows[-1], flush=True)
    return rows


SECTIONS = ("codec", "fedavg", "replay", "bytes")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8, 3e8],
                    help="entries per stacked update (3e8 needs ~7 GB of memory)")
    ap.add_argument("--users", type=int, default=16, help="users in the stacked update of the codec table")
    ap.add_argument("--lattices", nargs="+", default=["Z", "A2", "D4", "E8"])
    ap.add_argument("--bits", nargs="+", type=int, default=[2, 4])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS),
                    help="which tables to run (e.g. only codec on a GPU with little time)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.md"))
    args = ap.parse_args(argv)
    dev = jax.devices()[0]
    head = [f"# medu_jax benchmarks", "",
            f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, jax {jax.__version__} on "
            f"{dev.platform} ({getattr(dev, 'device_kind', '')}); python {sys.version.split()[0]}; "
            f"{time.strftime('%Y-%m-%d')}", ""]
    tables = {
        "codec": lambda: ["## Codec vs a float32 copy", ""] + codec_table(
            [int(x) for x in args.sizes], args.users, args.lattices, args.bits),
        "fedavg": lambda: ["## FedAvg: vmapped clients vs a per-client Python loop", ""] + fedavg_table(10),
        "replay": lambda: ["## Unlearning vs retraining (digits, 20 users, 4 removed, 60 rounds)", ""]
        + replay_table(20, 60, (10, 50)),
        "bytes": lambda: ["## History bytes as users and rounds grow (digits MLP, 4,810 parameters; MEDU 0.5, "
                          "tau 0.3, A2 2 bits)", ""]
        + bytes_table([(1, 10), (10, 10), (100, 10), (1000, 10), (100, 1), (100, 100), (20, 60)]),
    }
    out = head
    for name in args.sections:
        out += tables[name]() + [""]
    text = "\n".join(out) + "\n"
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
