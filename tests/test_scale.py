"""Clients sharded over devices (8 fake CPU devices, in a subprocess) and chunked with lax.map: same bits,
with 2 clients per device (device-local pairwise sums) and 3 (the weighted updates are gathered)."""

import subprocess
import sys
import textwrap

import pytest

import medu_jax as mj

SCRIPT = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax, jax.numpy as jnp, numpy as np, optax
    import medu_jax as mj
    assert len(jax.devices()) == 8
    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, 16, 0)
    model = mj.models.MLP((16,), 10)
    p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    tx = optax.sgd(0.1)
    cfg = mj.FedConfig(rounds=3, local_steps=2, batch_size=16, participation=0.75, seed=4)
    comps = {"m": mj.medu(0.5, 0.2, "A2", 2), "f": mj.identity()}
    same = lambda x, y: all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
    mesh = mj.client_mesh()
    # 16 clients over 8 devices: 2 per device, the same as one device running them in chunks of 2
    one = mj.train(model.apply, tx, p0, clients, mj.FedConfig(**{**cfg.__dict__, "client_chunk": 2}), comps)
    shard = mj.train(model.apply, tx, p0, clients, mj.FedConfig(**{**cfg.__dict__, "client_chunk": 2}), comps,
                     mesh=mesh)
    assert same(one.params, shard.params), "sharded params differ"
    for n in comps:
        assert all(same(a, b) for a, b in zip(one.histories[n].records, shard.histories[n].records)), n
    # the checks below are about the training step's sharding; a float32 history keeps their compiles small
    plain = {"f": mj.identity()}
    one_plain = mj.train(model.apply, tx, p0, clients, mj.FedConfig(**{**cfg.__dict__, "client_chunk": 2}), plain)
    shard_vmap = mj.train(model.apply, tx, p0, clients, cfg, plain, mesh=mesh)
    assert all(np.allclose(u, v, atol=1e-6) for u, v in zip(jax.tree.leaves(one_plain.params),
                                                            jax.tree.leaves(shard_vmap.params)))
    by_round = mj.train(model.apply, tx, p0, clients, mj.FedConfig(**{**cfg.__dict__, "client_chunk": 2}), plain,
                        mesh=mesh, rounds_per_call=1)
    assert same(by_round.params, one_plain.params), "sharded rounds one by one differ from one scanned block"
    # 24 clients: 3 per device, so the weighted updates themselves are gathered for the pairwise sum
    c24 = mj.data.make_clients(ds, 24, 0)
    one = mj.train(model.apply, tx, p0, c24, mj.FedConfig(**{**cfg.__dict__, "client_chunk": 3}), plain)
    shard = mj.train(model.apply, tx, p0, c24, cfg, plain, mesh=mesh)
    assert same(one.params, shard.params), "sharded params differ (3 clients per device)"
    sharded = mj.shard_clients(clients, mesh)
    assert len(sharded.x.sharding.device_set) == 8
    try:
        mj.shard_clients(mj.data.make_clients(ds, 12, 0), mesh)
    except ValueError as e:
        assert "cannot be split evenly over 8 devices" in str(e)
    else:
        raise AssertionError("uneven split accepted")
    print("OK")
    """
)


def test_sharded_clients_give_the_same_bits_as_one_device():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]


def test_client_chunks_give_the_same_bits_as_vmap():
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, 7, 0)
    model = mj.models.MLP((16,), 10)
    p0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    base = dict(rounds=2, local_steps=2, batch_size=16, seed=2)
    a = mj.train(model.apply, optax.sgd(0.1), p0, clients, mj.FedConfig(**base))
    b = mj.train(model.apply, optax.sgd(0.1), p0, clients, mj.FedConfig(**base, client_chunk=3))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
    with pytest.raises(ValueError, match="client_chunk"):
        mj.FedConfig(client_chunk=0)
