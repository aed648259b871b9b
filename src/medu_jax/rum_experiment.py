"""The RUM experiment (``medu rum``): its config, runner and table.

A model trained with memorization proxies forgets a random subset by fine-tuning, random labels, NegGrad+ and
RUM (NegGrad+ over low / mid / high memorization groups in turn), against retraining without the subset.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medu_jax import data as D, metrics, rum as R, tables as T
from medu_jax.models import MLP
from medu_jax.rum import PROXIES
from medu_jax.timing import warm_timed


@dataclasses.dataclass
class RUMConfig:
    """Memorization-proxy unlearning (RUM) of a random forget set, against retraining without it."""

    dataset: str = "digits"
    data_path: str | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 0.05
    hidden: tuple = (64,)
    seed: int = 0
    forget_fraction: float = 0.1
    proxy: str = "confidence"
    steps: int = 30
    beta: float = 0.5
    unlearn_lr: float = 0.05

    def __post_init__(self):
        D.check_dataset(self.dataset, self.data_path)
        if self.proxy not in PROXIES:
            raise ValueError(f"unknown proxy {self.proxy!r}: choose one of {PROXIES}")
        if not 0.0 < self.forget_fraction < 1.0 or int(self.steps) < 1 or int(self.epochs) < 1:
            raise ValueError("forget_fraction must be in (0, 1), steps and epochs >= 1")
        self.hidden = tuple(self.hidden)


def run_rum(cfg: RUMConfig) -> dict[str, Any]:
    """Trains with proxies, then forgets a random subset by fine-tuning, random labels, NegGrad+ and RUM
    (NegGrad+ over low/mid/high memorization groups in turn), each with the same step budget; one table with
    forget/retain/test accuracy, membership inference accuracy (forget vs test), ToW against retraining."""
    ds = D.load_dataset(cfg.dataset, cfg.seed, cfg.data_path)
    key = jax.random.key(cfg.seed)
    n = len(ds.y_train)
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(key, 1), n))
    forget = np.sort(perm[: max(3, int(round(cfg.forget_fraction * n)))])
    retain = np.setdiff1d(np.arange(n), forget)
    model = MLP(cfg.hidden, ds.num_classes)
    init = model.init(jax.random.fold_in(key, 2), jnp.zeros((1, *ds.x_train.shape[1:])))
    tx = optax.sgd(cfg.lr, momentum=0.9)
    x, y = ds.x_train, ds.y_train
    w, proxies = R.train_with_proxies(model.apply, tx, init, x, y, cfg.epochs, cfg.batch_size, jax.random.fold_in(key, 3))
    w_ref, _ = R.train_with_proxies(model.apply, tx, init, x[retain], y[retain], cfg.epochs, cfg.batch_size,
                                    jax.random.fold_in(key, 3))

    def accs(p) -> dict:
        a = lambda idx: metrics.accuracy(model.apply, p, x[idx], y[idx])  # noqa: E731
        return {"forget_acc": a(forget), "retain_acc": a(retain),
                "test_acc": metrics.accuracy(model.apply, p, ds.x_test, ds.y_test),
                "mia": R.mia_accuracy(model.apply, p, x[forget], y[forget], ds.x_test, ds.y_test)}

    ref = accs(w_ref)
    utx = optax.sgd(cfg.unlearn_lr)
    steps3 = 3 * int(cfg.steps)  # every method gets the budget RUM spends on its three groups
    xf, yf, xr, yr = (jnp.asarray(a) for a in (x[forget], y[forget], x[retain], y[retain]))
    y_rand = R.relabel(y, forget, ds.num_classes, jax.random.fold_in(key, 4))
    mix = np.concatenate([retain, forget])
    xm, ym = jnp.asarray(x[mix]), jnp.asarray(y_rand[mix])
    groups = R.split_by_memorization(proxies.memorization(cfg.proxy), forget)
    k = jax.random.fold_in(key, 5)
    methods = {
        "fine-tune on retain": lambda: R.neggrad_plus(model.apply, utx, w, xf, yf, xr, yr, k, steps3, cfg.batch_size, 1.0),
        "random labels": lambda: R.neggrad_plus(model.apply, utx, w, xf, yf, xm, ym, k, steps3, cfg.batch_size, 1.0),
        "NegGrad+ (whole forget set)": lambda: R.neggrad_plus(model.apply, utx, w, xf, yf, xr, yr, k, steps3,
                                                              cfg.batch_size, cfg.beta),
        f"RUM: NegGrad+ low -> mid -> high ({cfg.proxy})": lambda: R.rum(model.apply, utx, w, x, y, groups, retain, k,
                                                                       cfg.steps, cfg.batch_size, cfg.beta),
    }
    rows = [{"method": "original (no unlearning)", **accs(w), "seconds": 0.0},
            {"method": "retrain without the forget set", **ref, "seconds": 0.0}]
    for name, fn in methods.items():
        p, t = warm_timed(fn, 1)
        rows.append({"method": name, **accs(p), "seconds": t})
    for r in rows:
        r["tow"] = R.tug_of_war(r, ref)
    sizes = [len(g) for g in groups]
    return {"config": dataclasses.asdict(cfg), "forget": int(len(forget)), "groups": sizes, "rows": rows}


def format_rum_table(result: dict) -> str:
    """The RUM table as Markdown."""

    def cells(r: dict) -> list[str]:
        return [r["method"], f"{100 * r['forget_acc']:.1f}%", f"{100 * r['retain_acc']:.1f}%",
                f"{100 * r['test_acc']:.1f}%", f"{100 * r['mia']:.1f}%", f"{r['tow']:.3f}", f"{r['seconds']:.3f}"]

    head = ["method", "forget acc", "retain acc", "test acc", "MIA acc", "ToW vs retrain", "time (s)"]
    return T.markdown(head, map(cells, result["rows"]), "lrrrrrr")


def report(result: dict) -> str:
    """What ``medu rum`` prints: the table, then the forget set's size and memorization groups."""
    return (f"{format_rum_table(result)}\n\nforget set: {result['forget']} samples, memorization groups "
            f"{result['groups']}")
