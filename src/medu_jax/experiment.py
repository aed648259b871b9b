"""The federated unlearning experiment (``medu demo``, ``medu run``): its config, runner, table and outputs.

``run_experiment`` trains FedAvg with malicious users once while feeding every round's updates to each history
variant (float32, each MEDU layer alone, full MEDU), unlearns the malicious users from each history, retrains
from scratch without them as the reference, and returns one comparison table; ``write_outputs`` writes it as
table.csv, table.md, result.json and a plot of accuracy and attack success against stored bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax

from medu_jax import attacks, baselines as B, compressors as C, data as D, metrics, recovery as R, store as S
from medu_jax import tables as T
from medu_jax.fedavg import FedConfig, train
from medu_jax.history import Selection
from medu_jax.models import MLP
from medu_jax.timing import time_once, timed_against
from medu_jax.unlearn import corrected_replay, rebuild_error, replay

ATTACKS = ("backdoor", "label_flip", "scaled", "sign_flip", "none")
UNLEARN_METHODS = ("fedrecover", "adaptive", "federaser", "naive", "corrected", "crab")


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
    bits: int = 3
    entropy: str | None = "ans"  # the stored lattice codes ANS coded (None: bit-packed)
    correction: bool = True  # the MEDU history codes the per-round model correction (compressors.model_correction)
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
        D.check_dataset(self.dataset, self.data_path)
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
        """Every history the run keeps: the full ones, plus FedEraser's (every N) and Crab's selective ones (without
        the model correction, which needs every round)."""
        out = {m: METHODS[m](self) for m in self.methods}
        for sel_name in self.selections():
            out[sel_name] = dataclasses.replace(METHODS[sel_name.split("@")[0]](self), correction=None)
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
    "lattice": lambda c: C.lattice_coding(c.lattice, c.bits, entropy=c.entropy),
    "medu": lambda c: C.medu(c.fraction, c.tau, c.lattice, c.bits, entropy=c.entropy, correction=c.correction),
}


def run_experiment(cfg: ExperimentConfig, progress: bool = True) -> dict[str, Any]:
    """Trains with malicious users, unlearns them from every history, retrains; returns the table rows."""
    ds = D.load_dataset(cfg.dataset, cfg.seed, cfg.data_path)
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
    t_retrain = time_once(retrain)[1]  # warm

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
            rec, t_u, t_ref = timed_against(functools.partial(forget, um), retrain, hist,
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

    def cells(r: dict) -> list[str]:
        ratio = "" if r["ratio"] != r["ratio"] else f"{r['ratio']:.1f}x"
        nbytes = f"{r['bytes']:,}" if r["bytes"] else ""
        speed = "" if r["method"].startswith(("no unlearning", "retrain")) else f"{r['speedup']:.1f}x"
        return [r["method"], nbytes, ratio, f"{100 * r['accuracy']:.1f}%", T.pct(r["attack_success"], "%"),
                f"{r['dist_to_retrain']:.3f}", f"{100 * r['client_cost']:.0f}%", f"{r['seconds']:.3f}", speed]

    head = ["method", "bytes", "ratio vs float32", "clean acc", "attack success", "dist to retrain", "client cost",
            "time (s)", "speed-up vs retrain"]
    return T.markdown(head, map(cells, result["rows"]), "lrrrrrrrr")


def report(result: dict) -> str:
    """What ``medu demo`` / ``medu run`` print: the table, then the histories' sizes, overloads and rebuild errors."""
    lines = [format_table(result),
             f"\nfloat32 history would take {result['float32_bytes']:,} bytes; training took "
             f"{result['train_seconds']:.1f} s; lattice overloads: {result['overload']}; rejected non-finite updates: "
             f"{result['rejected_updates']}"]
    for name, h in result["histories"].items():
        lines.append(f"history {name}: rebuild error {100 * h['rebuild_error']:.2f}% (replay with nobody removed vs "
                     f"the trained model); rows stored {100 * h['stored']:.0f}%, sparsified "
                     f"{100 * h['sparsified']:.0f}%, thresholded {100 * h['thresholded']:.0f}%")
    return "\n".join(lines)


def to_json(result: dict) -> str:
    """The result as JSON text (result.json)."""
    return T.to_json(result)


def write_outputs(result: dict, out: str) -> list[str]:
    """table.csv, result.json, table.md and accuracy_vs_bytes.png in ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, "table.csv"), os.path.join(out, "result.json"), os.path.join(out, "table.md")]
    with open(paths[0], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(result["rows"][0]))
        w.writeheader()
        w.writerows(result["rows"])
    with open(paths[1], "w") as f:
        f.write(to_json(result))
    with open(paths[2], "w") as f:
        f.write(format_table(result) + "\n")
    paths.append(plot(result, os.path.join(out, "accuracy_vs_bytes.png")))
    return paths


def plot(result: dict, path: str) -> str:
    """Clean accuracy and attack success of every unlearned model against its history's bytes."""
    rows = [r for r in result["rows"] if r["bytes"]]
    ref = next(r for r in result["rows"] if r["method"].startswith("retrain"))
    with T.figure(path, (6, 4)) as ax:
        xs = [r["bytes"] for r in rows]
        ax.plot(xs, [100 * r["accuracy"] for r in rows], "o", label="clean accuracy (unlearned)")
        ax.plot(xs, [100 * r["attack_success"] for r in rows], "s", label="attack success (unlearned)")
        for r in rows:
            ax.annotate(r["method"].replace("history: ", ""), (r["bytes"], 100 * r["accuracy"]), fontsize=8)
        ax.axhline(100 * ref["accuracy"], ls="--", c="C0", lw=1, label="retrain accuracy")
        ax.set_xscale("log")
        ax.set_xlabel("stored history bytes")
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
    return path
