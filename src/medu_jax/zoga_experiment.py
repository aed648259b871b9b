"""The sample unlearning experiment (``medu zoga``): its config, runner and table.

After FedAvg training (MEDU first removes backdoor users from its history), one user forgets a fraction of its
samples with ZO-GA and with first-order GA, against retraining without both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medu_jax import attacks, compressors as C, data as D, metrics, tables as T, zoga
from medu_jax.fedavg import FedConfig, train
from medu_jax.models import MLP
from medu_jax.timing import warm_timed
from medu_jax.unlearn import finetune, replay


@dataclasses.dataclass
class SampleUnlearningConfig:
    """Sample-level unlearning on one user's side (ZO-GA vs first-order GA), after FedAvg training; with
    ``num_malicious`` backdoor users, the MEDU history first removes them (user level), then the user forgets
    its samples (sample level), and the reference retrains without both."""

    dataset: str = "digits"
    data_path: str | None = None
    num_users: int = 10
    rounds: int = 30
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    hidden: tuple = (64,)
    seed: int = 0
    user: int = 0
    forget_fraction: float = 0.3
    steps: int = 10
    ga_lr: float = 0.005
    mu: float = 1e-3
    q: int = 8
    num_malicious: int = 2
    tune_rounds: int = 2

    def __post_init__(self):
        D.check_dataset(self.dataset, self.data_path)
        if not 0 <= self.num_malicious < self.num_users - 1:
            raise ValueError(f"num_malicious must be in [0, num_users - 1), got {self.num_malicious}")
        if not 0 <= self.user < self.num_users - self.num_malicious:
            raise ValueError(f"user must be an honest user in [0, {self.num_users - self.num_malicious}), got {self.user}")
        if not 0.0 < self.forget_fraction < 1.0:
            raise ValueError(f"forget_fraction must be in (0, 1), got {self.forget_fraction}")
        if int(self.q) < 1 or int(self.steps) < 0:
            raise ValueError("q must be >= 1 and steps >= 0")
        self.hidden = tuple(self.hidden)


def run_sample_unlearning(cfg: SampleUnlearningConfig) -> dict[str, Any]:
    """Trains FedAvg, forgets a fraction of one user's samples with ZO-GA and first-order GA on that user's
    side, retrains without those samples as the reference; returns rows of forget/retain/test accuracy, the
    tug-of-war score ToW = (1-|dFA|)(1-|dRA|)(1-|dTA|) against retraining, time and peak step memory."""
    ds = D.load_dataset(cfg.dataset, cfg.seed, cfg.data_path)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 7)
    shards = D.partition_iid(len(ds.y_train), cfg.num_users, key)
    mine = shards[cfg.user][np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), len(shards[cfg.user])))]
    n_forget = max(1, int(round(cfg.forget_fraction * len(mine))))
    forget_idx, keep_idx = np.sort(mine[:n_forget]), np.sort(mine[n_forget:])
    retain_all = np.setdiff1d(np.arange(len(ds.y_train)), forget_idx)
    bad = list(range(cfg.num_users - cfg.num_malicious, cfg.num_users))
    pixels, value = attacks.default_trigger(int(ds.x_train[0].size))

    def clients_of(shard_list):
        c = D.to_client_data(ds.x_train, ds.y_train, shard_list)
        return attacks.backdoor(c, bad, 0, 0.5, pixels, value, cfg.seed) if bad else c

    clients = clients_of(shards)
    clients_wo = clients_of([keep_idx if k == cfg.user else s for k, s in enumerate(shards)])
    model = MLP(cfg.hidden, ds.num_classes)
    params0 = model.init(jax.random.key(cfg.seed), jnp.zeros((1, *ds.x_train.shape[1:])))
    tx = optax.sgd(cfg.lr)
    fed = FedConfig(cfg.rounds, cfg.local_steps, cfg.batch_size, 1.0, 1.0, cfg.seed)
    run = train(model.apply, tx, params0, clients, fed, {"medu": C.medu(0.5, 0.3, "A2", 2)})
    trained = run.params
    w_ref = train(model.apply, tx, params0, clients_wo, fed, exclude=bad).params
    start = trained  # the model the user unlearns from: MEDU has removed the malicious users first
    if bad:
        start = finetune(model.apply, tx, replay(run.histories["medu"], bad), clients, fed, bad, cfg.tune_rounds)
    loss = zoga.classification_loss(model.apply)
    forget = (jnp.asarray(ds.x_train[forget_idx]), jnp.asarray(ds.y_train[forget_idx]))

    def accs(w) -> dict:
        acc = lambda idx: metrics.accuracy(model.apply, w, ds.x_train[idx], ds.y_train[idx])  # noqa: E731
        return {"forget_acc": acc(forget_idx), "retain_acc": acc(retain_all),
                "test_acc": metrics.accuracy(model.apply, w, ds.x_test, ds.y_test),
                "attack_success": metrics.attack_success(model.apply, w, ds.x_test, ds.y_test, 0, pixels, value)}

    ref = accs(w_ref)

    def row(name, w, seconds, peak):
        a = accs(w)
        tow = float(np.prod([1 - abs(a[k] - ref[k]) for k in ("forget_acc", "retain_acc", "test_acc")]))
        return {"method": name, **a, "tow": tow, "seconds": seconds, "peak_bytes": peak}

    mem = zoga.memory_ratio(loss, start, forget, cfg.q)
    rows = [row("original (no unlearning)", trained, 0.0, 0), row("retrain without users and samples", w_ref, 0.0, 0)]
    prefix = ""
    if bad:
        rows.append(row(f"MEDU removes users {bad} (replay + {cfg.tune_rounds} tuning rounds)", start, 0.0, 0))
        prefix = "MEDU + "
    for method, peak in (("zo", mem["zeroth_order_bytes"]), ("fo", mem["first_order_bytes"])):
        fn = functools.partial(zoga.unlearn_samples, loss, start, forget, jax.random.key(cfg.seed), cfg.steps,
                               cfg.ga_lr, cfg.mu, cfg.q, method)
        w_u, t = warm_timed(fn, 3)
        rows.append(row(f"{prefix}{method.upper()}-GA ({cfg.steps} steps)", w_u, t, peak))
    return {"config": dataclasses.asdict(cfg), "forget_samples": int(n_forget), "malicious": bad, "rows": rows,
            "memory": mem}


def format_sample_table(result: dict) -> str:
    """The sample-unlearning table as Markdown."""

    def cells(r: dict) -> list[str]:
        return [r["method"], f"{100 * r['forget_acc']:.1f}%", f"{100 * r['retain_acc']:.1f}%",
                f"{100 * r['test_acc']:.1f}%", f"{100 * r['attack_success']:.1f}%", f"{r['tow']:.3f}",
                f"{r['seconds']:.3f}", f"{r['peak_bytes']:,}" if r["peak_bytes"] else ""]

    head = ["method", "forget acc", "retain acc", "test acc", "attack success", "ToW vs retrain", "time (s)",
            "peak step bytes"]
    return T.markdown(head, map(cells, result["rows"]), "lrrrrrrr")


def report(result: dict) -> str:
    """What ``medu zoga`` prints: the table, then who was removed and the peak step memory ratio."""
    m = result["memory"]
    return (f"{format_sample_table(result)}\n\nremoved users {result['malicious']} with the MEDU history, then forgot "
            f"{result['forget_samples']} samples of user {result['config']['user']}; peak step memory first-order / "
            f"ZO = {m['ratio']:.2f}x (XLA memory analysis)")
