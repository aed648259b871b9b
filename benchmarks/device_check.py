"""Accelerator check, one short script for a lent GPU: same bits as the CPU, then the codec vs a copy at 2^28.

    PYTHONPATH=src python3 benchmarks/device_check.py            # a few minutes on an H100 (jax, flax, optax there)
    PYTHONPATH=src python3 benchmarks/device_check.py --quick    # bits only, no 2^28 timing

Prints, for every lattice, whether encode (codes and scales) and decode give the same bits on the default device as
on the CPU; then whether a 3-round MEDU training run stores the same records and whether replaying one history
gives the same model on both; then the codec table at 2^28 entries (Z and A2, 2 bits). Mismatches are reported,
not raised, so one run shows all of them.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import medu_jax as mj  # noqa: E402
from medu_jax.compressors import Like  # noqa: E402


def same(a, b) -> bool:
    """Bitwise equality of two pytrees (NaN-safe: compares the raw bytes)."""
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    return len(la) == len(lb) and all(np.asarray(x).tobytes() == np.asarray(y).tobytes() for x, y in zip(la, lb))


def codec_bits(cpu, acc) -> list[str]:
    """Encode and decode of an odd-sized stacked update on each device."""
    out = []
    x = {"w": jax.random.normal(jax.random.key(0), (16, 65537)), "b": jax.random.normal(jax.random.key(1), (16, 7))}
    like, users = Like.of(x), jnp.arange(16)
    for lat in ("Z", "A2", "D4", "E8"):
        coder = mj.lattice_coding(lat, 2).coder
        enc = jax.jit(lambda v: coder.encode(v, jax.random.key(3), like, users)[0])
        dec = jax.jit(lambda r: coder.decode(r, jax.random.key(3), like, users))
        r_cpu, r_acc = enc(jax.device_put(x, cpu)), enc(jax.device_put(x, acc))
        d_cpu, d_acc = dec(jax.device_put(r_cpu, cpu)), dec(jax.device_put(r_cpu, acc))
        out.append(f"{lat}: encode same bits: {same(r_cpu, r_acc)}; decode same bits: {same(d_cpu, d_acc)}")
    return out


def training_bits(cpu, acc) -> list[str]:
    """A 3-round MEDU run on each device, and replay of the CPU run's history on each."""
    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, 8, 0)
    model = mj.models.MLP((16,), ds.num_classes)
    p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    cfg = mj.FedConfig(rounds=3, local_steps=2, batch_size=16, seed=5)
    runs = {}
    for name, dev in (("cpu", cpu), ("acc", acc)):
        with jax.default_device(dev):
            runs[name] = mj.train(model.apply, optax.sgd(0.1), p0, jax.device_put(clients, dev), cfg,
                                  {"medu": mj.medu(0.5, 0.3, "A2", 2)})
    ra, rb = runs["cpu"].histories["medu"].records, runs["acc"].histories["medu"].records
    recs = all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(ra, rb))
    h = runs["cpu"].histories["medu"]
    with jax.default_device(cpu):
        w_cpu = mj.replay(h, [1])
    with jax.default_device(acc):
        w_acc = mj.replay(h, [1])
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(runs["cpu"].params), jax.tree.leaves(runs["acc"].params)))
    return [f"training: same params: {same(runs['cpu'].params, runs['acc'].params)} (max |diff| {diff:.2e}); "
            f"same stored records: {recs}",
            f"replay of one history: same bits: {same(w_cpu, w_acc)}"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="bits only, no 2^28 codec timing")
    args = ap.parse_args(argv)
    cpu, acc = jax.devices("cpu")[0], jax.devices()[0]
    print(f"jax {jax.__version__}; default device {acc.platform} ({getattr(acc, 'device_kind', '')}) vs cpu", flush=True)
    if acc.platform == "cpu":
        print("no accelerator: both sides are the CPU, so the bit checks below compare the CPU with itself")
    for line in codec_bits(cpu, acc) + training_bits(cpu, acc):
        print(line, flush=True)
    if not args.quick:
        from run import codec_table

        print("| entries | lattice | bits | copy (ms) | encode+pack (ms) | ratio | GB/s | unpack+decode (ms) | ratio "
              "| GB/s |", flush=True)
        codec_table([2 ** 28], 16, ["Z", "A2"], [2])  # prints each row as it is measured
    return 0


if __name__ == "__main__":
    sys.exit(main())
