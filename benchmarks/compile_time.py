"""Compile time of the training rounds against the number of histories, and what a new seed or server_lr costs.

For 0, 1, 3 and 6 histories (MEDU settings that differ, as a rate-distortion sweep would use), times the first
``train`` call (compile + run) and a second call with another seed and server_lr (run only: both are traced), in
one process, side by side. Also times a new client optimizer object (static: recompiles) for reference.

    python benchmarks/compile_time.py            # MLP 128x128 on digits, 50 clients
    python benchmarks/compile_time.py --quick    # MLP 32, 10 clients
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import optax

import medu_jax as mj

SETTINGS = [mj.medu(), mj.medu(bits=3), mj.medu(lattice="Z"), mj.medu(fraction=0.25), mj.medu(tau=0.5),
            mj.medu(lattice="D4", bits=2)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    hidden, users, rounds = ((32,), 10, 3) if args.quick else ((128, 128), 50, 10)
    ds = mj.data.load_digits()
    clients = mj.data.make_clients(ds, users, alpha=0.3)
    model = mj.models.MLP(hidden, 10)
    p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.sgd(0.1)
    print(f"MLP {hidden}, {users} clients, {rounds} rounds per call, jax {jax.__version__} on {jax.devices()[0].platform}")
    print("| histories | first call (compile + run) s | new seed + server_lr s | new optax.sgd object s |")
    print("|---|---|---|---|")
    for n in (0, 1, 3, 6):
        comps = {f"h{i}": SETTINGS[i] for i in range(n)}
        cfg = mj.FedConfig(rounds=rounds, local_steps=5, batch_size=32, seed=n)
        t0 = time.perf_counter()
        mj.train(model.apply, tx, p0, clients, cfg, comps)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        mj.train(model.apply, tx, p0, clients, mj.FedConfig(rounds=rounds, local_steps=5, batch_size=32, seed=n + 100,
                                                            server_lr=0.5), comps)
        again = time.perf_counter() - t0
        t0 = time.perf_counter()
        mj.train(model.apply, optax.sgd(0.1), p0, clients, cfg, comps)
        new_tx = time.perf_counter() - t0
        print(f"| {n} | {first:.2f} | {again:.2f} | {new_tx:.2f} |")


if __name__ == "__main__":
    main()
