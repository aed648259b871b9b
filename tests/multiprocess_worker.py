"""One process of a multi-process run on JAX's distributed runtime (CPU, gloo collectives, localhost), or the
single-process reference; run by tests/test_multiprocess.py as a subprocess.

    python tests/multiprocess_worker.py OUT PROCESS_ID NUM_PROCESSES PORT LOCAL_DEVICES

Trains the tiny run below with the clients sharded over every process's devices (``client_mesh()`` over
``jax.devices()``, the global list), writes its history store under OUT/store (process 0 only) and pickles
what it got (params, histories, log) to OUT/result<PROCESS_ID>.pkl. NUM_PROCESSES 1: no distributed runtime,
one device, the clients in chunks of K / (NUM_PROCESSES x LOCAL_DEVICES) = what a sharded run matches.
"""

import os
import pickle
import sys
import time

T0 = time.perf_counter()


def say(what):  # on stderr, which the test prints when a run fails
    print(f"[{time.perf_counter() - T0:6.1f} s] {what}", file=sys.stderr, flush=True)


out, pid, nproc, port, local = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
os.environ["JAX_PLATFORMS"] = "cpu"
if nproc > 1:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local}"

import jax  # noqa: E402

if nproc > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid,
                               initialization_timeout=120)
    say(f"process {pid}: distributed runtime up")
    assert jax.process_count() == nproc and len(jax.devices()) == nproc * local, jax.devices()

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import medu_jax as mj  # noqa: E402

K, DEVICES = 8, 4  # 8 clients over 2 processes x 2 devices: 2 clients per device
ds = mj.data.load_digits(0)
clients = mj.data.make_clients(ds, K, seed=1)  # IID: 180 or 179 samples each (unequal weights)
model = mj.models.MLP((16,), ds.num_classes)
params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
cfg = mj.FedConfig(rounds=3, local_steps=2, batch_size=16, participation=0.75, seed=3, client_chunk=K // DEVICES)
compressors = {"medu": mj.medu(0.5, 0.3, "A2", 2), "float32": mj.identity()}
say("training")
if nproc > 1:
    run = mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, compressors, mesh=mj.client_mesh(),
                   store=os.path.join(out, "store"))
else:
    run = mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, compressors)
say("trained")
result = {
    "pid": os.getpid(),
    "params": jax.tree.map(np.asarray, run.params),
    "records": {n: [dict(r) for r in h.records] for n, h in run.histories.items()},
    "log": run.log,
}
with open(os.path.join(out, f"result{pid}.pkl"), "wb") as f:
    pickle.dump(result, f)
say("done")
print("OK", flush=True)
