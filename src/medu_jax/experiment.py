"""One end-to-end experiment: FedAvg with malicious users, compressed histories, unlearning, retraining.

``run_experiment`` trains once while feeding every round's updates to each history variant (float32, each
MEDU layer alone, full MEDU), unlearns the malicious users from each history, retrains from scratch without
them as the reference, and returns one comparison table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medu_jax import attacks, baselines as B, compressors as C, data as D, metrics, recovery as R, store as S
from medu_jax.fedavg import FedConfig, train
from medu_jax.models import MLP
from medu_jax.history import Selection
from medu_jax.unlearn import corrected_replay, finetune, rebuild_error, replay

ATTACKS = ("backdoor", "label_flip", "scaled", "sign_flip", "none")
UNLEARN_METHODS = ("fedrecover", "adaptive", "federaser", "naive", "corrected", "crab")
DATASETS = ("digits", "mnist1d", "mnist")


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "tuple": (list, tuple),
          "None": (type(None),)}


def check_types(cls, d: dict) -> None:
    """Every value of ``d`` has its field's annotated type (a JSON config's "3" or 2.5 for an int, a list for a
    string...): an error that names the key, instead of a failure deep inside the run."""
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        names = [t.strip() for t in str(f.type).split("|")]
        allowed = tuple(t for n in names for t in _TYPES.get(n, (object,)))
        v = d[f.name]
        if not isinstance(v, allowed) or (isinstance(v, bool) and bool not in allowed):
            raise ValueError(f"config key {f.name!r} must be {' or '.join(names)}, got {v!r} "
                             f"({type(v).__name__})")


def check_dataset(dataset: str, data_path: str | None) -> None:
    """Validates a data set choice (shared by every experiment config)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {DATASETS}")
    if dataset == "mnist" and not data_path:
        raise ValueError("dataset 'mnist' needs data_path (--data-path): a folder of the four IDX files or an .npz")


@dataclasses.dataclass
class ExperimentConfig:
    """Everything an experiment needs; JSON-able (``medu run --config file.json`` reads these keys)."""

    dataset: str = "digits"
    data_path: str | None = None
    num_users: int = 20
    num_malicious: int = 4
    attack: str = "backdoor"
    target: int = 0
    poison_fraction: float = 0.5
    attack_scale: float = 5.0
    alpha: float | None = None
    rounds: int = 60
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    participation: float = 1.0
    hidden: tuple = (64,)
    seed: int = 0
    fraction: float = 0.5
    tau: float = 0.3
    lattice: str = "A2"
    bits: int = 2
    methods: tuple = ("float32", "sparsify", "threshold", "lattice", "medu")
    unlearn_methods: tuple = ("adaptive",)
    tune_rounds: int = 2
    fedrecover_warmup: int = 5
    fedrecover_period: int = 10
    fedrecover_tune: int = 5
    federaser_every: int = 2
    federaser_ratio: float = 0.5
    cal_steps: int = 2
    crab_min_change: float = 0.01
    crab_users: float = 0.5
    store: str | None = None
    resume: bool = False

    def __post_init__(self):
        check_dataset(self.dataset, self.data_path)
        if isinstance(self.unlearn_methods, str):
            self.unlearn_methods = tuple(m.strip() for m in self.unlearn_methods.split(",") if m.strip())
        bad = [m for m in self.unlearn_methods if m not in UNLEARN_METHODS]
        if bad or not self.unlearn_methods:
            raise ValueError(f"unknown unlearn_methods {bad}: choose one or more of {list(UNLEARN_METHODS)}")
        self.unlearn_methods = tuple(self.unlearn_methods)
        if int(self.federaser_every) < 1 or int(self.cal_steps) < 1:
            raise ValueError("federaser_every and cal_steps must be >= 1")
        self.selections()  # validates crab_users / crab_min_change
        if int(self.tune_rounds) < 0:
            raise ValueError(f"tune_rounds must be >= 0, got {self.tune_rounds}")
        if self.attack not in ATTACKS:
            raise ValueError(f"unknown attack {self.attack!r}: choose one of {ATTACKS}")
        if not 0 <= self.num_malicious < self.num_users:
            raise ValueError(
                f"num_malicious must be in [0, num_users) = [0, {self.num_users}), got {self.num_malicious}"
            )
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown history methods {unknown}: choose from {sorted(METHODS)}")
        self.hidden = tuple(self.hidden)
        self.methods = tuple(self.methods)
        self.compressors()  # validates lattice, bits, tau, fraction early

    @classmethod
    def from_dict(cls, d: dict) -> "ExperimentConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; valid keys are {sorted(names)}")
        check_types(cls, d)
        return cls(**d)

    def compressors(self) -> dict[str, C.Compressor]:
        """Every history the run keeps: the full ones, plus FedEraser's (every N) and Crab's selective ones."""
        out = {m: METHODS[m](self) for m in self.methods}
        for sel_name in self.selections():
            out[sel_name] = METHODS[sel_name.split("@")[0]](self)
        return out

    def selections(self) -> dict[str, Selection]:
        sel = {}
        for m in self.methods:
            if "crab" in self.unlearn_methods:
                sel[f"{m}@crab"] = Selection(min_change=float(self.crab_min_change),
                                             user_fraction=float(self.crab_users), checkpoints=True)
        return sel

    def history_for(self, unlearn_method: str, method: str) -> str:
        """The name of the history an unlearning method reads."""
        return f"{method}@crab" if unlearn_method == "crab" else method


METHODS = {
    "float32": lambda c: C.identity(),
    "sparsify": lambda c: C.user_sparsification(c.fraction),
    "threshold": lambda c: C.differential_threshold(c.tau),
    "lattice": lambda c: C.lattice_coding(c.lattice, c.bits),
    "medu": lambda c: C.medu(c.fraction, c.tau, c.lattice, c.bits),
}


def load_dataset(cfg: "ExperimentConfig | SampleUnlearningConfig") -> D.Dataset:
    if cfg.dataset == "digits":
        return D.load_digits(cfg.seed)
    if cfg.dataset == "mnist1d":
        return D.load_mnist1d(seed=cfg.seed)
    return D.load_mnist(cfg.data_path)


def _time_once(fn, *args) -> tuple[Any, float]:
    """(result, wall seconds) of one call, waiting for the device."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - t0


def _warm_timed(fn, repeats: int) -> tuple[Any, float]:
    """(result, best seconds of ``repeats`` calls) after one warm-up (compiling) call."""
    jax.block_until_ready(fn())
    best, out = float("inf"), None
    for _ in range(repeats):
        out, t = _time_once(fn)
        best = min(best, t)
    return out, best


def _timed_against(fn, reference, *args, repeats: int = 5) -> tuple[Any, float, float]:
    """(result, best seconds of fn, best seconds of reference) from warm runs of the two interleaved, so a
    drift in machine speed hits both sides of the ratio alike."""
    out = jax.block_until_ready(fn(*args))
    best, best_ref = float("inf"), float("inf")
    for _ in range(repeats):
        best_ref = min(best_ref, _time_once(reference)[1])
        best = min(best, _time_once(fn, *args)[1])
    return out, best, best_ref


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> dict[str, Any]:
    """Trains with malicious users, unlearns them from every history, retrains; returns the table rows."""
    ds = load_dataset(cfg)
    clients = D.make_clients(ds, cfg.num_users, cfg.seed, cfg.alpha)
    bad = list(range(cfg.num_users - cfg.num_malicious, cfg.num_users))
    pixels, value = attacks.default_trigger(int(ds.x_train[0].size))
    scale = None
    if cfg.attack == "backdoor":
        clients = attacks.backdoor(clients, bad, cfg.target, cfg.poison_fraction, pixels, value, cfg.seed)
    elif cfg.attack == "label_flip":
        clients = attacks.label_flip(clients, bad, ds.num_classes)
    elif cfg.attack in ("scaled", "sign_flip"):
        f = cfg.attack_scale if cfg.attack == "scaled" else -cfg.attack_scale
        scale = attacks.update_scale(cfg.num_users, bad, f)

    model = MLP(cfg.hidden, ds.num_classes)
    apply_fn = model.apply
    params0 = model.init(jax.random.key(cfg.seed), jnp.zeros((1, *ds.x_train.shape[1:])))
    tx = optax.sgd(cfg.lr)
    fed = FedConfig(cfg.rounds, cfg.local_steps, cfg.batch_size, cfg.participation, 1.0, cfg.seed)

    trained = train(apply_fn, tx, params0, clients, fed, cfg.compressors(), update_scale=scale, progress=progress,
                    desc="train (with attackers)", store=cfg.store, resume=cfg.resume, selections=cfg.selections(),
                    offload=bool(cfg.store))
    histories = dict(trained.histories)
    if cfg.store:  # unlearn from what is on disk (checksums verified), as a server restarted later would
        histories.update({m: S.load_history(os.path.join(cfg.store, m), params0) for m in cfg.methods})
    retrain = lambda: train(apply_fn, tx, params0, clients, fed, exclude=bad, update_scale=scale).params  # noqa: E731
    w_retrain = jax.block_until_ready(retrain())
    t_retrain = _time_once(retrain)[1]  # warm

    def evaluate(params) -> dict:
        row = {"accuracy": metrics.accuracy(apply_fn, params, ds.x_test, ds.y_test)}
        row["attack_success"] = (
            metrics.attack_success(apply_fn, params, ds.x_test, ds.y_test, cfg.target, pixels, value)
            if cfg.attack == "backdoor" else float("nan")
        )
        row["dist_to_retrain"] = metrics.relative_distance(params, w_retrain)
        return row

    rows = [
        {"method": "no unlearning (trained with attackers)", "bytes": 0, "ratio": float("nan"),
         **evaluate(trained.params), "seconds": 0.0, "speedup": float("nan"), "client_cost": 0.0},
        {"method": "retrain from scratch (reference)", "bytes": 0, "ratio": float("nan"),
         **evaluate(w_retrain), "seconds": t_retrain, "speedup": 1.0, "client_cost": 1.0},
    ]

    def forget(method: str, hist) -> R.Recovery:
        if not bad:
            return R.Recovery(replay(hist), 0, 0.0, 0, 0)
        if method in ("naive", "corrected"):  # server-only replay, then exact tuning rounds
            w = (replay if method == "naive" else corrected_replay)(hist, bad)
            return R.finetune_baseline(w, bad, apply_fn, tx, clients, fed, cfg.tune_rounds)
        if method == "fedrecover":
            return R.fedrecover(hist, bad, apply_fn, tx, clients, fed, cfg.fedrecover_warmup, cfg.fedrecover_period,
                                cfg.fedrecover_tune)
        if method == "adaptive":
            return R.adaptive_recovery(hist, bad, apply_fn, tx, clients, fed, cfg.fedrecover_warmup,
                                       cfg.fedrecover_tune)
        if method == "federaser":
            return R.federaser(hist, bad, apply_fn, tx, clients, fed, cfg.federaser_every, cfg.federaser_ratio)
        return B.crab(hist, bad, apply_fn, tx, clients, fed, cfg.cal_steps)

    f32_full = histories[cfg.methods[0]].float32_nbytes if cfg.methods else 0
    for um in cfg.unlearn_methods:
        for name in cfg.methods:
            hist = histories[cfg.history_for(um, name)]
            # methods with client work take seconds: fewer timing repeats than the millisecond replays
            rec, t_u, t_ref = _timed_against(functools.partial(forget, um), retrain, hist,
                                             repeats=5 if um in ("naive", "corrected") else 1)
            t_retrain = min(t_retrain, t_ref)
            label = f"history: {name}" if len(cfg.unlearn_methods) == 1 else f"{um} / {name}"
            rows.append({"method": label, "bytes": hist.nbytes, "ratio": f32_full / max(hist.nbytes, 1),
                         **evaluate(rec.params), "seconds": t_u, "speedup": t_ref / t_u,
                         "client_cost": rec.client_cost})
    rows[1]["seconds"] = t_retrain
    return {
        "config": dataclasses.asdict(cfg),
        "malicious": bad,
        "float32_bytes": f32_full,
        "train_seconds": trained.seconds,
        "rows": rows,
        "overload": {n: int(sum(v)) for n, v in trained.log["overload"].items()},
        "rejected_updates": int(sum(len(r) for r in trained.log["rejected"])),
        "histories": {m: {"rebuild_error": rebuild_error(histories[m], trained.params), **histories[m].skip_rates()}
                      for m in cfg.methods},
    }


def format_table(result: dict) -> str:
    """The comparison table as Markdown (paste-able into the README)."""
    head = ("| method | bytes | ratio vs float32 | clean acc | attack success | dist to retrain | client cost | time (s) |"
            " speed-up vs retrain |")
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = "" if r["ratio"] != r["ratio"] else f"{r['ratio']:.1f}x"
        nbytes = f"{r['bytes']:,}" if r["bytes"] else ""
        asr = "" if r["attack_success"] != r["attack_success"] else f"{100 * r['attack_success']:.1f}%"
        speed = "" if r["method"].startswith(("no unlearning", "retrain")) else f"{r['speedup']:.1f}x"
        lines.append(
            f"| {r['method']} | {nbytes} | {ratio} | {100 * r['accuracy']:.1f}% | {asr} | "
            f"{r['dist_to_retrain']:.3f} | {100 * r['client_cost']:.0f}% | {r['seconds']:.3f} | {speed} |"
        )
    return "\n".join(lines)


def to_json(result: dict) -> str:
    return json.dumps(result, indent=2, default=float)


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
        check_dataset(self.dataset, self.data_path)
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
    from medu_jax import zoga

    ds = load_dataset(cfg)
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
        w_u, t = _warm_timed(fn, 3)
        rows.append(row(f"{prefix}{method.upper()}-GA ({cfg.steps} steps)", w_u, t, peak))
    return {"config": dataclasses.asdict(cfg), "forget_samples": int(n_forget), "malicious": bad, "rows": rows,
            "memory": mem}


def format_sample_table(result: dict) -> str:
    """The sample-unlearning table as Markdown."""
    lines = ["| method | forget acc | retain acc | test acc | attack success | ToW vs retrain | time (s) | peak step bytes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        peak = f"{r['peak_bytes']:,}" if r["peak_bytes"] else ""
        lines.append(f"| {r['method']} | {100 * r['forget_acc']:.1f}% | {100 * r['retain_acc']:.1f}% | "
                     f"{100 * r['test_acc']:.1f}% | {100 * r['attack_success']:.1f}% | {r['tow']:.3f} | "
                     f"{r['seconds']:.3f} | {peak} |")
    return "\n".join(lines)


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
        from medu_jax.rum import PROXIES

        check_dataset(self.dataset, self.data_path)
        if self.proxy not in PROXIES:
            raise ValueError(f"unknown proxy {self.proxy!r}: choose one of {PROXIES}")
        if not 0.0 < self.forget_fraction < 1.0 or int(self.steps) < 1 or int(self.epochs) < 1:
            raise ValueError("forget_fraction must be in (0, 1), steps and epochs >= 1")
        self.hidden = tuple(self.hidden)


def run_rum(cfg: RUMConfig) -> dict[str, Any]:
    """Trains with proxies, then forgets a random subset by fine-tuning, random labels, NegGrad+ and RUM
    (NegGrad+ over low/mid/high memorization groups in turn), each with the same step budget; one table with
    forget/retain/test accuracy, membership inference accuracy (forget vs test), ToW against retraining."""
    from medu_jax import rum as R

    ds = load_dataset(cfg)
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
        p, t = _warm_timed(fn, 1)
        rows.append({"method": name, **accs(p), "seconds": t})
    for r in rows:
        r["tow"] = R.tug_of_war(r, ref)
    sizes = [len(g) for g in groups]
    return {"config": dataclasses.asdict(cfg), "forget": int(len(forget)), "groups": sizes, "rows": rows}


def format_rum_table(result: dict) -> str:
    """The RUM table as Markdown."""
    lines = ["| method | forget acc | retain acc | test acc | MIA acc | ToW vs retrain | time (s) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {100 * r['forget_acc']:.1f}% | {100 * r['retain_acc']:.1f}% | "
                     f"{100 * r['test_acc']:.1f}% | {100 * r['mia']:.1f}% | {r['tow']:.3f} | {r['seconds']:.3f} |")
    return "\n".join(lines)


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
        check_dataset(self.dataset, self.data_path)
        if not 1 <= self.orders <= self.slices:
            raise ValueError(f"orders must be in 1..slices={self.slices}, got {self.orders}")
        if self.shards < 1 or self.deletions < 0:
            raise ValueError("shards must be >= 1 and deletions >= 0")


def run_s3t(cfg: S3TConfig) -> dict[str, Any]:
    """Trains S3T heads on a base trained on a public split; deletes random samples; compares accuracy of the
    served prefix checkpoints with retraining the affected shards, and simulates deletions absorbed (S3T with
    1..B orders; one order is SISA) before a shard must retrain."""
    import flax.linen as nn

    from medu_jax import rum as R, s3t

    ds = load_dataset(cfg)
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
    """The S3T tables as Markdown."""
    lines = ["| model | test acc | checkpoints served |", "|---|---:|---|"]
    lines += [f"| {r['method']} | {100 * r['test_acc']:.1f}% | {r['served']} |" for r in result["rows"]]
    lines += ["", "| slice orders per shard | deletions absorbed before a shard must retrain (mean of 200) |",
              "|---:|---:|"]
    lines += [f"| {b}{' (SISA)' if b == 1 else ''} | {v:.2f} |" for b, v in result["absorbed"].items()]
    return "\n".join(lines)
