"""The S3T experiment (``medu s3t``): its config, runner and tables.

S3T heads (shards x slices x slice orders) on a frozen base serve deletions from prefix checkpoints; compared
with retraining the affected shards, and the deletions absorbed before a shard must retrain (one order is SISA).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from medu_jax import data as D, rum as R, s3t, tables as T
from medu_jax.models import MLP


@dataclasses.dataclass
class S3TConfig:
    """S3T on a frozen base: shards x slices x slice orders, deletions served by prefix checkpoints."""

    dataset: str = "digits"
    data_path: str | None = None
    shards: int = 4
    slices: int = 4
    orders: int = 2
    steps_per_slice: int = 60
    deletions: int = 8
    public_fraction: float = 0.2
    seed: int = 0

    def __post_init__(self):
        D.check_dataset(self.dataset, self.data_path)
        if not 1 <= self.orders <= self.slices:
            raise ValueError(f"orders must be in 1..slices={self.slices}, got {self.orders}")
        if self.shards < 1 or self.deletions < 0:
            raise ValueError("shards must be >= 1 and deletions >= 0")


def run_s3t(cfg: S3TConfig) -> dict[str, Any]:
    """Trains S3T heads on a base trained on a public split; deletes random samples; compares accuracy of the
    served prefix checkpoints with retraining the affected shards, and simulates deletions absorbed (S3T with
    1..B orders; one order is SISA) before a shard must retrain."""
    ds = D.load_dataset(cfg.dataset, cfg.seed, cfg.data_path)
    key = jax.random.key(cfg.seed)
    n = len(ds.y_train)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), n))
    n_pub = int(round(cfg.public_fraction * n))
    pub, priv = np.sort(perm[:n_pub]), np.sort(perm[n_pub:])
    base = MLP((64,), ds.num_classes)
    bp = base.init(jax.random.fold_in(key, 2), jnp.zeros((1, *ds.x_train.shape[1:])))
    bp, _ = R.train_with_proxies(base.apply, optax.sgd(0.05, momentum=0.9), bp, ds.x_train[pub], ds.y_train[pub], 30,
                                 32, jax.random.fold_in(key, 3))
    d0 = bp["params"]["Dense_0"]
    features = lambda x: nn.relu(x.reshape(x.shape[0], -1) @ d0["kernel"] + d0["bias"])  # noqa: E731
    head = nn.Dense(ds.num_classes)
    head0 = {"params": bp["params"]["Dense_1"]}
    x, y = ds.x_train[priv], ds.y_train[priv]
    tx = optax.sgd(0.05)
    model = s3t.train_s3t(features, head.apply, head0, tx, x, y, cfg.shards, cfg.slices, cfg.orders,
                          jax.random.fold_in(key, 4), cfg.steps_per_slice)
    acc = lambda scores: float(jnp.mean(jnp.argmax(scores, 1) == jnp.asarray(ds.y_test)))  # noqa: E731
    gone = np.asarray(jax.random.choice(jax.random.fold_in(key, 5), len(y), (cfg.deletions,), replace=False))
    deleted, served = s3t.delete(model, gone)
    keep = np.setdiff1d(np.arange(len(y)), gone)
    # exact reference: the affected shards retrained on what they keep (same shard/slice assignment)
    affected = [s for s, d in enumerate(deleted) if d]
    ref_ck = [list(c) for c in model.checkpoints]
    for s in affected:
        mask = np.zeros(len(y), np.float32)
        mask[np.intersect1d(np.concatenate(model.slices[s]), keep)] = 1.0
        p = s3t._train_head(head.apply, tx, head0, jnp.asarray(features(jnp.asarray(x))), jnp.asarray(y),
                            jnp.asarray(mask), jax.random.fold_in(key, 6 + s), cfg.steps_per_slice * cfg.slices, 32)
        ref_ck[s] = [[p] * cfg.slices for _ in range(cfg.orders)]
    retrained = s3t.S3TModel(model.orders, ref_ck, model.slices)
    rows = [
        {"method": "S3T before deletions", "test_acc": acc(s3t.predict(model, features, head.apply, ds.x_test)),
         "served": f"{cfg.slices}/{cfg.slices} slices, every shard"},
        {"method": f"S3T after {cfg.deletions} deletions (prefix fallback, no training)",
         "test_acc": acc(s3t.predict(model, features, head.apply, ds.x_test, served)),
         "served": ", ".join(f"{n}" for _, n in served) + " slices per shard"},
        {"method": f"retrain the {len(affected)} affected shards", "test_acc":
            acc(s3t.predict(retrained, features, head.apply, ds.x_test)), "served": "full, retrained"},
    ]
    sim = {b: s3t.deletions_absorbed(cfg.shards, cfg.slices, b, jax.random.fold_in(key, 7), 200)
           for b in range(1, cfg.slices + 1)}
    return {"config": dataclasses.asdict(cfg), "rows": rows, "absorbed": sim}


def format_s3t_table(result: dict) -> str:
    """The S3T tables as Markdown: the served models' accuracy, then the deletions absorbed per slice orders."""
    served = T.markdown(["model", "test acc", "checkpoints served"],
                        ([r["method"], f"{100 * r['test_acc']:.1f}%", r["served"]] for r in result["rows"]), "lrl")
    absorbed = T.markdown(["slice orders per shard", "deletions absorbed before a shard must retrain (mean of 200)"],
                          ([f"{b}{' (SISA)' if b == 1 else ''}", f"{v:.2f}"] for b, v in result["absorbed"].items()),
                          "rr")
    return served + "\n\n" + absorbed


report = format_s3t_table  # what ``medu s3t`` prints
