# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # medu_jax in one sitting: train with attackers, compress the history, unlearn them
#
# This notebook (Colab-ready) trains federated averaging with 4 backdoor users out of 20, keeps the server's
# history of updates in float32 and MEDU-compressed forms, removes the attackers by recovering from the history
# without them, and compares with retraining from scratch. It then shows how to plug in your own flax model,
# optax optimizer, data and compressor chain. Sizes are small so it runs in about a minute on a CPU; raise
# `ROUNDS` for the README's numbers.
#
# On Colab, install first: `!pip install git+<this repository's URL>`.

# %%
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import medu_jax as mj

ROUNDS, USERS, BAD = 20, 20, [16, 17, 18, 19]

# %% [markdown]
# ## Data, clients and attackers
# scikit-learn's digits ship with the package (no download). Clients get IID shards (pass `alpha=0.3` for a
# Dirichlet non-IID split); the last 4 clients stamp a 2x2 trigger on half their samples and relabel them 0.

# %%
ds = mj.data.load_digits(seed=0)
clients = mj.data.make_clients(ds, USERS, seed=0)
pixels, value = mj.attacks.default_trigger(64)
clients = mj.attacks.backdoor(clients, BAD, target=0, fraction=0.5, pixels=pixels, value=value)
print(clients.x.shape, clients.n)


# %% [markdown]
# ## Your own model and optimizer
# Any flax module works: medu_jax only needs `apply_fn(params, x) -> logits` and an optax transformation.

# %%
class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(64)(x)))


model = Net()
params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
tx = optax.sgd(0.1)
cfg = mj.FedConfig(rounds=ROUNDS, local_steps=10, batch_size=32, seed=0)

# %% [markdown]
# ## Train once, keep several histories
# Every round's (K, ...) update pytree goes through each compressor chain into its own `History`.

# %%
histories = {
    "float32": mj.identity(),
    "lattice A2 1 bit": mj.lattice_coding("A2", bits=1),
    "lattice A2 2 bits": mj.lattice_coding("A2", bits=2),
    "lattice E8 3 bits": mj.lattice_coding("E8", bits=3),
    "medu": mj.medu(fraction=0.5, tau=0.3, lattice="A2", bits=2),
}
run = mj.train(model.apply, tx, params0, clients, cfg, histories, progress=True)
for name, h in run.histories.items():
    s = h.summary()
    print(f"{name:18s} {s['bytes']:>12,d} bytes  {s['ratio']:6.1f}x smaller than float32")

# %% [markdown]
# ## Unlearn the attackers and compare with retraining
# `unlearn` runs FedRecover over the history: a few exact rounds of the remaining users (warm-up, every 10th round,
# the last 5), and in the other rounds each remaining user's stored update corrected by its own L-BFGS estimate of
# how the update changes with the model. `client_cost` is the remaining users' local work over retraining's.

# %%
t0 = time.perf_counter()
w_retrain = mj.train(model.apply, tx, params0, clients, cfg, exclude=BAD).params
t_retrain = time.perf_counter() - t0


def evaluate(w):
    return (mj.metrics.accuracy(model.apply, w, ds.x_test, ds.y_test),
            mj.metrics.attack_success(model.apply, w, ds.x_test, ds.y_test, 0, pixels, value))


rows = []
for name, h in run.histories.items():
    rec = mj.unlearn(h, remove=BAD, apply_fn=model.apply, tx=tx, data=clients, cfg=cfg)
    w = rec.params
    acc, asr = evaluate(w)
    rows.append((name, h.nbytes, acc, asr, mj.metrics.relative_distance(w, w_retrain), rec.client_cost))
acc_r, asr_r = evaluate(w_retrain)
acc_a, asr_a = evaluate(run.params)
print(f"{'trained with attackers':24s} acc {acc_a:.3f}  attack success {asr_a:.3f}")
print(f"{'retrain from scratch':24s} acc {acc_r:.3f}  attack success {asr_r:.3f}")
for name, nbytes, acc, asr, dist, cost in rows:
    print(f"{name:24s} acc {acc:.3f}  attack success {asr:.3f}  dist {dist:.3f}  bytes {nbytes:,}  client cost {cost:.2f}")
assert asr_a > 0.5 and all(r[3] < 0.2 for r in rows)  # the backdoor works, and unlearning removes it

# %%
fig, ax = plt.subplots(figsize=(6, 4))
for name, nbytes, acc, asr, *_ in rows:
    ax.scatter(nbytes, 100 * acc, c="C0")
    ax.scatter(nbytes, 100 * asr, c="C3", marker="s")
    ax.annotate(name, (nbytes, 100 * acc), fontsize=8)
ax.axhline(100 * acc_r, ls="--", c="C0", lw=1, label="retrain accuracy")
ax.set(xscale="log", xlabel="stored history bytes", ylabel="% (circles: accuracy, squares: attack success)")
ax.legend()
plt.show()

# %% [markdown]
# ## Your own compressor chain, and the history on disk
# Layers compose in MEDU's order (sparsify, threshold, one coder). `store=` appends each history to a zarr store
# round by round (checksummed); `load_history` reads it back anywhere, and `resume=True` continues a crashed run.
# `offload=True` keeps the rounds on disk only (none in host memory): the returned history, like
# `load_history(..., lazy=True)`, reads each round when replay uses it, for histories larger than memory.

# %%
import tempfile

chain = mj.chain(mj.user_sparsification(count=8, mode="topk"), mj.differential_threshold(0.2),
                 mj.lattice_coding("D4", bits=3, scale="rms"))
folder = tempfile.mkdtemp()
small = mj.FedConfig(rounds=5, local_steps=5, batch_size=32, seed=1)
on_disk = mj.train(model.apply, tx, params0, clients, small, {"mine": chain}, store=folder, offload=True)
h = mj.load_history(f"{folder}/mine", template=params0)
print(h.summary(), chain.config())
lazy = on_disk.histories["mine"]  # reads from the store
assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(mj.replay(lazy)), jax.tree.leaves(mj.replay(h))))

# %% [markdown]
# ## Your own data
# Any arrays work: split them into shards of indices and pad them into `ClientData` (static shapes + counts).

# %%
x = np.random.default_rng(0).normal(size=(600, 64)).astype(np.float32)
y = (x[:, 0] > 0).astype(np.int32)
shards = mj.data.partition_dirichlet(y, 6, alpha=0.5, key=jax.random.key(0))
mine = mj.data.to_client_data(x, y, shards)
print(mine.x.shape, mine.n)
