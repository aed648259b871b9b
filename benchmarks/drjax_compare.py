"""medu_jax's FedAvg round against the same round written with drjax's map/reduce building blocks (issue 18).

The same round three ways, with the same client math (``fedavg.local_update``, hence ``batch_indices``, the same
keys, participants, scaling and NaN/inf rejection), on digits-like shapes (64 inputs, 10 classes), MLP 128x128,
optax.sgd(0.1), 10 local steps of 32:

- ``ours``: ``mj.fed_round`` (vmapped clients, the weighted updates summed by ``fedavg.pairwise_sum``);
- ``drjax``: ``drjax.broadcast`` the params, ``drjax.map_fn`` the clients, ``drjax.reduce_weighted_mean``;
- ``drjax map + our sum``: ``drjax.map_fn`` for the clients, our pairwise sum for the aggregate.

Prints, per number of clients, with the clients on one device and sharded over 2 (ours: ``fed_round(mesh=...)``,
a shard_map; drjax: the mesh passed to ``broadcast``/``map_fn``, lowered through GSPMD): warm time per round
(median of interleaved repeats), compile time (first call minus the warm median) and whether the aggregated
params and the updates have the same bits as ours. Then what the layout does to the bits: each round on one
device against the clients sharded over 2 and 4 devices (ours compared with one device running the clients in
chunks of K / devices, as its guarantee states), and the reductions alone on fixed updates. jax starts with 4
host-platform devices (``XLA_FLAGS``); the one-device rows run on device 0.

    pip install drjax==0.2.1   # only for this benchmark; medu_jax does not depend on it
    python benchmarks/drjax_compare.py            # K = 20 and 100 clients
    python benchmarks/drjax_compare.py --quick    # K = 20, MLP 32, fewer repeats
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import platform
import statistics
import sys
import time

if importlib.util.find_spec("drjax") is None:
    sys.exit("drjax is not installed: `pip install drjax==0.2.1` (only this benchmark needs it; medu_jax does not)")

DEVICES = 4
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={DEVICES}").strip()

import drjax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from absl import logging as absl_logging  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

import medu_jax as mj  # noqa: E402
from medu_jax.compressors import tree_where  # noqa: E402
from medu_jax.fedavg import (CLIENTS, _flat_weighted, _mean_from_sum, _normalized, local_update,  # noqa: E402
                             pairwise_sum, participants)

absl_logging.set_verbosity(absl_logging.ERROR)  # drjax warns on every trace without a 'clients' mesh


def drjax_round(model, tx, cfg: mj.FedConfig, k: int, our_sum: bool = False, mesh=None):
    """A jitted FedAvg round (params, data, t, exclude, scale, seed, server_lr) -> (params, updates, loss, metrics)
    written with drjax: the clients are a placement of size k. ``our_sum``: aggregate with ``pairwise_sum``
    instead of ``drjax.reduce_weighted_mean``. ``mesh``: a mesh with a 'clients' axis that drjax shards the
    placement over."""

    @drjax.program(placements={CLIENTS: k})
    def clients(params, x, y, n, keys):
        placed = drjax.broadcast(params, mesh=mesh)

        def one(p, x, y, n, kk):
            return local_update(model, tx, p, x, y, n, kk, cfg.local_steps, cfg.batch_size)

        return drjax.map_fn(one, (placed, x, y, n, keys), mesh=mesh)

    @drjax.program(placements={CLIENTS: k})
    def aggregate(tree, w):
        return drjax.reduce_weighted_mean(tree, jax.tree.map(lambda _: w, tree))

    @jax.jit
    def step(params, data, t, exclude, scale, seed, server_lr):
        rk = jax.random.fold_in(jax.random.key(seed), t)
        part = participants(jax.random.fold_in(rk, 0), k, cfg.participation) & ~exclude & (data.n > 0)
        ck = jax.random.fold_in(rk, 1)
        keys = jax.vmap(lambda u: jax.random.fold_in(ck, u))(jnp.arange(k))
        ups, _, losses, metrics = clients(params, data.x, data.y, data.n, keys)
        ups = jax.tree.map(lambda u: u * scale.reshape((k,) + (1,) * (u.ndim - 1)).astype(u.dtype), ups)
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(u.reshape(k, -1)), axis=1) for u in jax.tree.leaves(ups)]), 0)
        active = part & finite
        ups = tree_where(active, ups, jax.tree.map(jnp.zeros_like, ups))
        w = data.n.astype(jnp.float32) * active
        if our_sum:  # as fed_round: the pairwise sum, and the loss and metrics as a dot with normalized weights
            mean = _mean_from_sum(pairwise_sum(_flat_weighted(w, ups)), ups)
            wn = _normalized(data.n.astype(jnp.float32), active)
            loss, metrics = jax.tree.map(lambda v: jnp.tensordot(wn, v.astype(jnp.float32), axes=1), (losses, metrics))
        else:
            mean, loss, metrics = aggregate((ups, losses, metrics), w)
        new = jax.tree.map(lambda a, b: a + (server_lr * b).astype(a.dtype), params, mean)
        return new, ups, loss, metrics  # what fed_round returns too (so neither side's work is dropped)

    return step


def setup(k: int, hidden):
    ds = mj.data.load_digits()
    data = mj.data.make_clients(ds, k, alpha=0.3)
    model = mj.models.MLP(hidden, ds.num_classes)
    params = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    return model, data, params


def same_bits(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def bits_word(a, b) -> str:
    """'yes' when the two pytrees have the same bits, else how many entries differ and by how much (the largest
    difference relative to the largest magnitude of its leaf)."""
    if same_bits(a, b):
        return "yes"
    xs, ys = [np.asarray(x) for x in jax.tree.leaves(a)], [np.asarray(y) for y in jax.tree.leaves(b)]
    n = sum(int(np.sum(x != y)) for x, y in zip(xs, ys))
    rel = max(float(np.max(np.abs(x - y)) / max(float(np.max(np.abs(x))), 1e-30)) for x, y in zip(xs, ys))
    return f"no: {n:,} of {sum(x.size for x in xs):,} entries, max {rel:.1e} rel."


def timing(k: int, hidden, cfg: mj.FedConfig, tx, repeats: int, mesh=None):
    """{name: (compile s, warm median s, (params, updates, loss, metrics))} for the three ways of writing the
    round, timed interleaved; with ``mesh`` the clients are sharded over its devices (ours: ``fed_round(mesh=)``,
    a shard_map; drjax: the same program with the mesh passed to ``broadcast``/``map_fn``, lowered by GSPMD)."""
    model, data, params = setup(k, hidden)
    data = data if mesh is None else mj.shard_clients(data, mesh)
    excl, scale = jnp.zeros((k,), bool), jnp.ones((k,), jnp.float32)
    seed, lr = jnp.uint32(cfg.seed), jnp.float32(cfg.server_lr)
    ways = {
        "ours (fed_round)": lambda t: (lambda r: (r.params, r.updates, r.loss, r.metrics))(
            mj.fed_round(model.apply, tx, cfg, params, data, t, excl, scale, mesh=mesh)),
        "drjax (map_fn + reduce_weighted_mean)": (
            lambda f: lambda t: f(params, data, t, excl, scale, seed, lr))(
                drjax_round(model.apply, tx, cfg, k, mesh=mesh)),
        "drjax map_fn + our pairwise sum": (
            lambda f: lambda t: f(params, data, t, excl, scale, seed, lr))(
                drjax_round(model.apply, tx, cfg, k, our_sum=True, mesh=mesh)),
    }
    first, out, times = {}, {}, {name: [] for name in ways}
    for name, fn in ways.items():
        t0 = time.perf_counter()
        out[name] = jax.block_until_ready(fn(jnp.int32(0)))
        first[name] = time.perf_counter() - t0
    names = list(ways)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order: drift hits all alike
            t0 = time.perf_counter()
            jax.block_until_ready(ways[name](jnp.int32(0)))
            times[name].append(time.perf_counter() - t0)
    return {name: (first[name] - statistics.median(times[name]), statistics.median(times[name]), out[name])
            for name in names}


def layouts(k: int, hidden, cfg: mj.FedConfig, tx):
    """Rows (what, devices, same bits as one device) for a full round and for the reductions alone."""
    model, data, params = setup(k, hidden)
    excl, scale = jnp.zeros((k,), bool), jnp.ones((k,), jnp.float32)
    seed, lr = jnp.uint32(cfg.seed), jnp.float32(cfg.server_lr)
    rows = []
    one_dj_params, one_dj_ups, *_ = drjax_round(model.apply, tx, cfg, k)(params, data, 0, excl, scale, seed, lr)
    for d in (2, 4):
        if k % d:
            continue
        mesh = mj.client_mesh(jax.devices()[:d])
        chunked = mj.fed_round(model.apply, tx, dataclasses.replace(cfg, client_chunk=k // d), params,
                               data, 0, excl, scale)
        sharded = mj.fed_round(model.apply, tx, cfg, params, mj.shard_clients(data, mesh), 0, excl, scale, mesh=mesh)
        rows.append((f"ours: round, clients in chunks of K/{d} on one device vs sharded over {d} devices", d,
                     bits_word(chunked.params, sharded.params), bits_word(chunked.updates, sharded.updates)))
        dj_params, dj_ups, *_ = drjax_round(model.apply, tx, cfg, k, mesh=mesh)(
            params, mj.shard_clients(data, mesh), 0, excl, scale, seed, lr)
        rows.append((f"drjax: round, one device vs under a {d}-device 'clients' mesh (GSPMD)", d,
                     bits_word(one_dj_params, dj_params), bits_word(one_dj_ups, dj_ups)))
        rows.append((f"drjax under the {d}-device mesh vs ours sharded over {d} devices", d,
                     bits_word(sharded.params, dj_params), bits_word(sharded.updates, dj_ups)))
    # the reductions alone, on fixed updates of the round's shapes (d floats per client), one device vs sharded
    ups = [jax.random.normal(jax.random.key(i), u.shape, jnp.float32)
           for i, u in enumerate(jax.tree.leaves(one_dj_ups))]
    w = data.n.astype(jnp.float32)

    @drjax.program(placements={CLIENTS: k})
    def dj_mean(ups, w):
        return drjax.reduce_weighted_mean(ups, [w] * len(ups))

    ours_mean = lambda ups, w: _mean_from_sum(pairwise_sum(_flat_weighted(w, ups)), ups)  # noqa: E731
    ref_dj, ref_ours = jax.jit(dj_mean)(ups, w), jax.jit(ours_mean)(ups, w)
    rows.append(("reduction alone, one device: drjax's weighted mean vs ours", 1, bits_word(ref_dj, ref_ours), "-"))
    for d in (2, 4):
        if k % d:
            continue
        sh = NamedSharding(mj.client_mesh(jax.devices()[:d]), P(CLIENTS))
        ups_d, w_d = jax.device_put(ups, sh), jax.device_put(w, sh)
        rows.append((f"reduction alone: drjax.reduce_weighted_mean, input sharded over {d} devices vs one", d,
                     bits_word(ref_dj, jax.jit(dj_mean)(ups_d, w_d)), "-"))
        rows.append((f"reduction alone: our pairwise_sum, input sharded over {d} devices (GSPMD) vs one", d,
                     bits_word(ref_ours, jax.jit(ours_mean)(ups_d, w_d)), "-"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="K = 20 only, MLP 32, 5 repeats")
    ap.add_argument("--repeats", type=int, default=None, help="warm rounds per way (default 15, --quick 5)")
    args = ap.parse_args()
    hidden, ks = ((32,), (20,)) if args.quick else ((128, 128), (20, 100))
    repeats = args.repeats or (5 if args.quick else 15)
    cfg, tx = mj.FedConfig(rounds=1, local_steps=10, batch_size=32, seed=0), optax.sgd(0.1)
    print(f"MLP {hidden} on digits (64 inputs, 10 classes), optax.sgd(0.1), {cfg.local_steps} local steps of "
          f"{cfg.batch_size}; jax {jax.__version__}, drjax {drjax.__version__}, {len(jax.devices())} "
          f"{jax.devices()[0].platform} devices ({platform.machine()}, {os.cpu_count()} cores); "
          f"median of {repeats} warm rounds, interleaved")
    print()
    print("| K | clients on | way | warm s / round | vs ours | compile s | params: same bits as ours "
          "| updates: same bits as ours |")
    print("|---:|---|---|---:|---:|---:|---|---|")
    for k in ks:
        for where, mesh in (("1 device", None), ("2 devices", mj.client_mesh(jax.devices()[:2]))):
            res = timing(k, hidden, cfg, tx, repeats, mesh)
            ref_t, ref_p = res["ours (fed_round)"][1], res["ours (fed_round)"][2]
            for name, (comp, warm, (params, ups, *_)) in res.items():
                print(f"| {k} | {where} | {name} | {warm:.4f} | {warm / ref_t:.2f}x | {comp:.2f} "
                      f"| {bits_word(ref_p[0], params)} | {bits_word(ref_p[1], ups)} |", flush=True)
    print()
    print("| K | layout check | devices | params: same bits | updates: same bits |")
    print("|---:|---|---:|---|---|")
    for k in ks:
        for what, d, pb, ub in layouts(k, hidden, cfg, tx):
            print(f"| {k} | {what} | {d} | {pb} | {ub} |")


if __name__ == "__main__":
    main()
