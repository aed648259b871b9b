"""The scenario suite: unlearning judged over data sets x partitions x attacks x malicious shares x seeds.

Each cell trains FedAvg with attackers once while recording a float32 and a MEDU history, retrains from
scratch without the attackers (the reference), and unlearns them with every method from both histories, plus
fine-tuning the attacked model (no history) at the same client cost. Every cell writes ``cells/<name>.json``
as soon as it is done (a rerun skips finished cells), and ``summarize`` turns the cells into the pass/fail
table against the bar of ``BAR``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medu_jax import attacks, compressors as C, data as D, metrics, recovery as R, tables as T
from medu_jax.fedavg import ClientData, FedConfig, train
from medu_jax.models import CNN, MLP
from medu_jax.unlearn import rebuild_error, replay

SUITE_ATTACKS = ("backdoor", "targeted_flip", "scaled", "sign_flip")
METHODS = ("fedrecover", "adaptive", "federaser", "naive")
DEFAULT_METHOD = "adaptive"  # the default of mj.unlearn
# the bar the default method, from the MEDU history, must meet in every cell (mean over seeds)
BAR = {"accuracy_gap": 0.02, "attack_gap": 0.03, "client_cost": 0.30, "ratio": 30.0}
MODELS = ("mlp", "cnn")
# the model fields; left out of a cell's stored config at their defaults, so cells of the MLP suite stored before
# the CNN scenario existed are still reused
_MODEL_DEFAULTS = {"model": "mlp", "conv_features": (8, 16)}


@dataclasses.dataclass(frozen=True)
class SuiteConfig:
    """The matrix and the shared federated setup. ``alphas``: None = IID, a float = Dirichlet(alpha)."""

    datasets: tuple = ("digits", "mnist1d")
    alphas: tuple = (None, 0.3)
    attacks: tuple = SUITE_ATTACKS
    shares: tuple = (0.1, 0.2)
    seeds: tuple = (0, 1)
    num_users: int = 50
    rounds: int = 80
    local_steps: int = 10
    batch_size: int = 32
    lr: float = 0.1
    hidden: tuple = (128, 128)  # the MLP's hidden layers
    model: str = "mlp"  # "mlp" (flattened inputs) or "cnn" (models.CNN on images: digits as 8x8x1)
    conv_features: tuple = (8, 16)  # the CNN's 3x3 convolutions
    mnist1d_samples: int = 10000
    target: int = 0  # backdoor target
    source: int = 1  # targeted flip source -> flip_target
    flip_target: int = 7
    poison_fraction: float = 0.5
    attack_scale: float = 5.0  # the scaled attack's factor
    sign_flip_scale: float = 1.0  # the sign flip sends -sign_flip_scale x its update (1: the plain sign flip)
    medu: tuple = (0.5, 0.3, "A2", 3)  # user fraction, tau, lattice, bits
    medu_options: tuple = (("correction", True), ("entropy", "ans"))  # further compressors.medu keywords (sorted)
    min_ratio: float = BAR["ratio"]  # the bar's least history bytes ratio (float32 / MEDU)
    adaptive_options: tuple = ()  # recovery.adaptive_recovery keywords as sorted (name, value) pairs
    methods: tuple = METHODS
    finetune_costs: tuple = (0.1, 0.3)  # extra fine-tuning budgets for the plot (besides equal cost)

    def __post_init__(self):
        bad = [a for a in self.attacks if a not in SUITE_ATTACKS]
        if bad:
            raise ValueError(f"unknown suite attacks {bad}: choose from {SUITE_ATTACKS}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown suite methods {bad}: choose from {METHODS}")
        if DEFAULT_METHOD not in self.methods:
            raise ValueError(f"the suite judges the default method {DEFAULT_METHOD!r}: keep it in methods")
        for s in self.shares:
            if not 0 < float(s) < 1 or int(round(s * self.num_users)) < 1:
                raise ValueError(f"malicious share {s} must give between 1 and num_users - 1 users")
        if self.model not in MODELS:
            raise ValueError(f"unknown suite model {self.model!r}: choose from {MODELS}")
        if self.model == "cnn" and "mnist1d" in self.datasets:
            raise ValueError("the CNN scenario needs images: mnist1d is a 1-D signal (use datasets=('digits',))")
        for name in ("rounds", "local_steps", "num_users"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SuiteConfig.{name} must be >= 1")
        for name in ("attack_scale", "sign_flip_scale", "min_ratio"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"SuiteConfig.{name} must be > 0, got {getattr(self, name)!r}")
        self.compressor()  # a bad MEDU setting fails here, before any cell runs

    def compressor(self) -> C.Compressor:
        """The MEDU history's compressor: ``medu`` (fraction, tau, lattice, bits) and ``medu_options``."""
        frac, tau, lattice, bits = self.medu
        return C.medu(frac, tau, lattice, bits, **dict(self.medu_options))

    def cells(self) -> list[dict]:
        extra = {} if self.model == "mlp" else {"model": self.model}
        return [dict(dataset=d, alpha=a, attack=at, share=s, seed=sd, **extra) for d, a, at, s, sd in
                itertools.product(self.datasets, self.alphas, self.attacks, self.shares, self.seeds)]


def quick_config() -> SuiteConfig:
    """The CI-sized suite: four digits cells (IID and Dirichlet x backdoor and sign flip), one seed, 20 users,
    60 rounds."""
    return SuiteConfig(datasets=("digits",), alphas=(None, 0.3), attacks=("backdoor", "sign_flip"), shares=(0.2,),
                       seeds=(0,), num_users=20, rounds=60, hidden=(64,))


def cnn_config(quick: bool = False) -> SuiteConfig:
    """The convolutional scenario: models.CNN (3x3 convolutions of 8 and 16 channels, 1,898 parameters) on digits
    as 8x8x1 images, 100 users, the default suite's matrix and bar otherwise. ``quick``: one tiny cell (20 users,
    20 rounds of 5 steps, adaptive recovery and naive replay only), to check the pipeline in CI."""
    if quick:
        return SuiteConfig(datasets=("digits",), alphas=(None,), attacks=("backdoor",), shares=(0.2,), seeds=(0,),
                           num_users=20, rounds=20, local_steps=5, model="cnn", methods=("adaptive", "naive"),
                           finetune_costs=())
    return SuiteConfig(datasets=("digits",), num_users=100, model="cnn")


def _value(text: str):
    """A command-line value: true/false/none, an int, a float, else the string."""
    low = text.strip().lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def _pairs(text: str, flag: str) -> dict[str, Any]:
    """'name=value,...' as a dict of ``_value``s."""
    out = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{flag}: expected name=value pairs separated by commas, got {item!r}")
        out[name.strip()] = _value(value)
    return out


def with_options(cfg: SuiteConfig, medu: str | None = None, sign_flip_scale: float | None = None,
                 min_ratio: float | None = None, methods: str | None = None, adaptive: str | None = None
                 ) -> SuiteConfig:
    """``cfg`` with the command line's MEDU setting ('name=value,...' of ``compressors.medu``; fraction, tau,
    lattice and bits go to ``medu``, the rest to ``medu_options``), sign-flip scale, bytes-ratio bar and
    unlearning methods (comma-separated)."""
    changes: dict[str, Any] = {}
    if medu:
        main = dict(zip(("fraction", "tau", "lattice", "bits"), cfg.medu))
        extra = dict(cfg.medu_options)
        for name, value in _pairs(medu, "--medu").items():
            (main if name in main else extra)[name] = value
        changes.update(medu=tuple(main.values()), medu_options=tuple(sorted(extra.items())))
    if adaptive:
        opts = {**dict(cfg.adaptive_options), **_pairs(adaptive, "--adaptive")}
        known = set(inspect.signature(R.adaptive_recovery).parameters) - {"history", "remove", "apply_fn", "tx",
                                                                          "data", "cfg"}
        if set(opts) - known:
            raise ValueError(f"--adaptive: unknown adaptive_recovery options {sorted(set(opts) - known)}; "
                             f"choose from {sorted(known)}")
        changes["adaptive_options"] = tuple(sorted(opts.items()))
    if sign_flip_scale is not None:
        changes["sign_flip_scale"] = float(sign_flip_scale)
    if min_ratio is not None:
        changes["min_ratio"] = float(min_ratio)
    if methods:
        changes["methods"] = tuple(m.strip() for m in methods.split(","))
    return dataclasses.replace(cfg, **changes)


def cell_name(cell: dict) -> str:
    part = "iid" if cell["alpha"] is None else f"dir{cell['alpha']}"
    model = "" if cell.get("model", "mlp") == "mlp" else cell["model"] + "-"
    return f"{model}{cell['dataset']}-{part}-{cell['attack']}-{int(round(100 * cell['share']))}pct-seed{cell['seed']}"


def _pad(data: ClientData, multiple: int = 256) -> ClientData:
    """Pads every client to a multiple of ``multiple`` samples, so partitions share compiled programs."""
    n_max = data.x.shape[1]
    pad = -n_max % multiple
    if not pad:
        return data
    x = jnp.concatenate([data.x, jnp.zeros((data.x.shape[0], pad, *data.x.shape[2:]), data.x.dtype)], axis=1)
    y = jnp.concatenate([data.y, jnp.zeros((data.y.shape[0], pad), data.y.dtype)], axis=1)
    return ClientData(x, y, data.n)


@functools.lru_cache(maxsize=None)
def _model_and_optimizer(hidden: tuple, num_classes: int, lr: float, model: str = "mlp", conv_features: tuple = ()):
    """One model and optimizer object per setting, shared by every cell: jit keys its caches on ``apply_fn`` and
    ``tx`` (a new ``model.apply`` or ``optax.sgd`` per cell would recompile every program in every cell)."""
    net = CNN(tuple(conv_features), num_classes) if model == "cnn" else MLP(tuple(hidden), num_classes)
    return net, optax.sgd(lr)


def _dataset(name: str, seed: int, cfg: SuiteConfig) -> D.Dataset:
    if name not in ("digits", "mnist1d"):
        raise ValueError(f"unknown suite dataset {name!r}: choose digits or mnist1d")
    return D.load_dataset(name, seed, mnist1d_samples=cfg.mnist1d_samples, flatten=cfg.model != "cnn")


def _members(clients: ClientData, users: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The training samples (as the users hold them, poisoned or not) of ``users``."""
    n = np.asarray(clients.n)
    x = np.concatenate([np.asarray(clients.x[u, : n[u]]) for u in users])
    y = np.concatenate([np.asarray(clients.y[u, : n[u]]) for u in users])
    return x, y


class CellSetup(NamedTuple):
    """One scenario's attacked clients and federated setup (what ``run_cell`` and benchmarks train on)."""

    ds: Any  # the data set (test split for the metrics)
    clients: ClientData  # the attacked clients
    bad: list  # the malicious users
    scale: Any  # per-client update multipliers (scaled / sign flip), else None
    pixels: list  # the backdoor trigger
    value: float
    apply_fn: Callable
    tx: Any
    params0: Any
    fed: FedConfig

    def attack_success(self, params, attack: str, cfg: SuiteConfig) -> float:
        """The attack's own success on the test set: triggered samples predicted as the target (backdoor),
        source-class samples predicted as the flip target (targeted flip); NaN for the untargeted attacks
        (scaled / sign flip), whose measure is clean accuracy."""
        ds = self.ds
        if attack == "backdoor":
            return metrics.attack_success(self.apply_fn, params, ds.x_test, ds.y_test, cfg.target, self.pixels,
                                          self.value)
        if attack == "targeted_flip":
            return metrics.flip_success(self.apply_fn, params, ds.x_test, ds.y_test, cfg.source, cfg.flip_target)
        return float("nan")


def setup_cell(cell: dict, cfg: SuiteConfig) -> CellSetup:
    """The cell's data set, partition and attack, its model, optimizer and initial params."""
    ds = _dataset(cell["dataset"], cell["seed"], cfg)
    k = cfg.num_users
    clients = _pad(D.make_clients(ds, k, cell["seed"], cell["alpha"]))
    nb = int(round(cell["share"] * k))
    bad = list(range(k - nb, k))
    pixels, value = attacks.default_trigger(int(ds.x_train[0].size))
    scale, attack = None, cell["attack"]
    if attack == "backdoor":
        clients = attacks.backdoor(clients, bad, cfg.target, cfg.poison_fraction, pixels, value, cell["seed"])
    elif attack == "targeted_flip":
        clients = attacks.targeted_flip(clients, bad, cfg.source, cfg.flip_target)
    else:
        scale = attacks.update_scale(k, bad, cfg.attack_scale if attack == "scaled" else -cfg.sign_flip_scale)
    if cfg.model == "cnn":
        model, tx = _model_and_optimizer((), ds.num_classes, float(cfg.lr), "cnn", tuple(cfg.conv_features))
    else:
        model, tx = _model_and_optimizer(tuple(cfg.hidden), ds.num_classes, float(cfg.lr))
    params0 = model.init(jax.random.key(cell["seed"]), jnp.zeros((1, *ds.x_train.shape[1:])))
    fed = FedConfig(cfg.rounds, cfg.local_steps, cfg.batch_size, 1.0, 1.0, cell["seed"])
    return CellSetup(ds, clients, bad, scale, pixels, value, model.apply, tx, params0, fed)


def run_cell(cell: dict, cfg: SuiteConfig) -> dict[str, Any]:
    """One scenario: train with attackers, retrain, unlearn with every method from both histories."""
    setup = setup_cell(cell, cfg)
    ds, clients, bad, scale, _, _, apply_fn, tx, params0, fed = setup
    histories = {"float32": C.identity(), "medu": cfg.compressor()}
    trained = train(apply_fn, tx, params0, clients, fed, histories, update_scale=scale)
    t0 = time.perf_counter()
    w_retrain = jax.block_until_ready(train(apply_fn, tx, params0, clients, fed, exclude=bad, update_scale=scale).params)
    t_retrain = time.perf_counter() - t0

    xm, ym = _members(clients, bad)
    mia_n = min(len(ym), len(ds.y_test))  # as many members as non-members

    def evaluate(params) -> dict:
        return {
            "accuracy": metrics.accuracy(apply_fn, params, ds.x_test, ds.y_test),
            "attack_success": setup.attack_success(params, cell["attack"], cfg),
            "dist_to_retrain": metrics.relative_distance(params, w_retrain),
            "mia_auc": metrics.membership_auc(apply_fn, params, xm[:mia_n], ym[:mia_n], ds.x_test[:mia_n],
                                              ds.y_test[:mia_n]),
        }

    f32 = trained.histories["float32"]
    rows = [
        {"method": "attacked", "history": "", **evaluate(trained.params), "client_cost": 0.0, "seconds": 0.0},
        {"method": "retrain", "history": "", **evaluate(w_retrain), "client_cost": 1.0, "seconds": t_retrain},
    ]
    runners: dict[str, Callable] = {
        "fedrecover": lambda h: R.fedrecover(h, bad, apply_fn, tx, clients, fed),
        "adaptive": lambda h: R.adaptive_recovery(h, bad, apply_fn, tx, clients, fed, **dict(cfg.adaptive_options)),
        "federaser": lambda h: R.federaser(h, bad, apply_fn, tx, clients, fed),
        "naive": lambda h: R.Recovery(replay(h, bad), 0, 0.0, 0, 0),
    }
    rebuild = {}
    for hname, hist in trained.histories.items():
        rebuild[hname] = rebuild_error(hist, trained.params)
        info = {"history": hname, "bytes": hist.nbytes, "ratio": f32.float32_nbytes / max(hist.nbytes, 1),
                "rebuild_error": rebuild[hname]}
        for m in cfg.methods:
            t0 = time.perf_counter()
            try:
                rec = runners[m](hist)
                jax.block_until_ready(rec.params)
                row = {"method": m, **info, **evaluate(rec.params), "client_cost": rec.client_cost,
                       "exact_rounds": rec.exact_rounds, "fixed_updates": rec.fixed_updates,
                       "dropped_estimates": rec.dropped_estimates}
            except FloatingPointError as e:  # a diverged method is a failing row, not a crash
                row = {"method": m, **info, "accuracy": float("nan"), "attack_success": float("nan"),
                       "dist_to_retrain": float("nan"), "mia_auc": float("nan"), "client_cost": float("nan"),
                       "error": str(e)}
            row["seconds"] = time.perf_counter() - t0
            rows.append(row)
    default = next(r for r in rows if r["method"] == DEFAULT_METHOD and r["history"] == "medu")
    costs = sorted(set(cfg.finetune_costs) | ({default["client_cost"]} if math.isfinite(default["client_cost"])
                                                  else set()))
    for c in costs:
        n = max(1, int(round(c * cfg.rounds)))
        t0 = time.perf_counter()
        rec = R.finetune_baseline(trained.params, bad, apply_fn, tx, clients, fed, n)
        rows.append({"method": f"finetune {n} rounds", "history": "", **evaluate(rec.params),
                     "client_cost": rec.client_cost, "seconds": time.perf_counter() - t0,
                     "equal_cost": c == default["client_cost"]})
    return {"cell": cell, "name": cell_name(cell), "config": _config_json(cfg), "malicious": bad, "rows": rows,
            "rebuild_error": rebuild,
            "float32_bytes": f32.float32_nbytes, "overload": {n: int(sum(v)) for n, v in trained.log["overload"].items()}}


def _config_json(cfg: SuiteConfig) -> dict:
    """The config as JSON would give it back (tuples as lists), to compare with a stored cell's (the model fields
    only when they differ from the MLP suite's)."""
    d = dataclasses.asdict(cfg)
    if not d["adaptive_options"]:  # configs without them are what they were before the field existed
        del d["adaptive_options"]
    if cfg.model == "mlp":
        for k, v in _MODEL_DEFAULTS.items():
            if d[k] == v:
                del d[k]
    return json.loads(json.dumps(d))


def run_suite(cfg: SuiteConfig, out: str, only: Callable[[dict], bool] | None = None,
              progress: Callable[[str], None] = print) -> list[dict]:
    """Runs every cell of ``cfg`` not yet in ``out/cells`` (one JSON file per cell, so a rerun resumes). A stored
    cell is reused only if it was run with the same config; one from another config (e.g. ``--quick``) is rerun."""
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    results = []
    for cell in cfg.cells():
        if only is not None and not only(cell):
            continue
        path = os.path.join(out, "cells", cell_name(cell) + ".json")
        if os.path.exists(path):
            with open(path) as f:
                stored = json.load(f)
            if stored.get("config") == _config_json(cfg):
                results.append(stored)
                continue
        t0 = time.perf_counter()
        res = run_cell(cell, cfg)
        res["seconds"] = time.perf_counter() - t0
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(T.to_json(res, indent=1))
        os.replace(tmp, path)
        progress(f"{res['name']}: {res['seconds']:.0f} s")
        results.append(res)
    return results


def load_cells(out: str, cfg: SuiteConfig | None = None) -> list[dict]:
    """The cells stored in ``out`` (with ``cfg``: only those run with that config)."""
    folder = os.path.join(out, "cells")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no suite results in {out!r} (expected {folder})")
    want = None if cfg is None else _config_json(cfg)
    cells = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                cell = json.load(f)
            if want is None or cell.get("config") == want:
                cells.append(cell)
    return cells


def _scenario(cell: dict) -> str:
    part = "IID" if cell["alpha"] is None else f"Dir({cell['alpha']})"
    model = "" if cell.get("model", "mlp") == "mlp" else " " + cell["model"].upper()
    return f"{cell['dataset']}{model} {part} {cell['attack']} {int(round(100 * cell['share']))}%"


def summarize(results: list[dict]) -> list[dict]:
    """Per scenario (mean over seeds): every method's figures, and the default method's pass/fail."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(_scenario(r["cell"]), []).append(r)
    out = []
    for scen, runs in groups.items():
        def pick(method, history, key):
            vals = []
            for run in runs:
                row = next((x for x in run["rows"] if x["method"] == method and x.get("history", "") == history), None)
                if row is None:
                    continue
                v = row.get(key, float("nan"))
                vals.append(float("nan") if v is None else float(v))
            return float(np.mean(vals)) if vals else float("nan")

        def pick_eq(key):  # fine-tuning at the default method's client cost
            vals = [float(next(x for x in run["rows"] if x.get("equal_cost"))[key]) for run in runs
                    if any(x.get("equal_cost") for x in run["rows"])]
            return float(np.mean(vals)) if vals else float("nan")

        s = {"scenario": scen, "seeds": len(runs)}
        for key in ("accuracy", "attack_success", "dist_to_retrain", "mia_auc"):
            s[f"attacked_{key}"] = pick("attacked", "", key)
            s[f"retrain_{key}"] = pick("retrain", "", key)
            s[f"finetune_{key}"] = pick_eq(key)
        methods = sorted({x["method"] for run in runs for x in run["rows"] if x.get("history")})
        for m in methods:
            for h in ("float32", "medu"):
                for key in ("accuracy", "attack_success", "dist_to_retrain", "mia_auc", "client_cost", "ratio",
                            "rebuild_error", "seconds"):
                    s[f"{m}/{h}_{key}"] = pick(m, h, key)
        d = f"{DEFAULT_METHOD}/medu_"
        asr_ok = (math.isnan(s[d + "attack_success"]) and math.isnan(s["retrain_attack_success"])) or \
            s[d + "attack_success"] <= s["retrain_attack_success"] + BAR["attack_gap"]
        checks = {
            "accuracy": s[d + "accuracy"] >= s["retrain_accuracy"] - BAR["accuracy_gap"],
            "attack": bool(asr_ok),
            "distance": s[d + "dist_to_retrain"] < s["attacked_dist_to_retrain"],
            "cost": s[d + "client_cost"] <= BAR["client_cost"],
            "ratio": s[d + "ratio"] >= float(runs[0].get("config", {}).get("min_ratio", BAR["ratio"])),
        }
        s["checks"] = checks
        s["pass"] = all(checks.values())
        s["beats_finetune_distance"] = s[d + "dist_to_retrain"] < s["finetune_dist_to_retrain"]
        s["beats_finetune_mia"] = abs(s[d + "mia_auc"] - s["retrain_mia_auc"]) < \
            abs(s["finetune_mia_auc"] - s["retrain_mia_auc"])
        out.append(s)
    return out


def format_summary(summary: list[dict]) -> str:
    """The pass/fail matrix as Markdown: retraining, attacked, fine-tuning at equal cost, the default method."""
    d = f"{DEFAULT_METHOD}/medu_"
    head = ["scenario", "seeds", "retrain acc / ASR", "attacked acc / ASR / dist",
            "finetune (equal cost) acc / ASR / dist / MIA",
            f"**{DEFAULT_METHOD}-MEDU** acc / ASR / dist / MIA (retrain MIA)", "cost", "ratio", "rebuild", "pass",
            "beats finetune dist / MIA"]

    def cells(s: dict) -> list[str]:
        failed = [k for k, ok in s["checks"].items() if not ok]
        return [s["scenario"], s["seeds"], f"{T.pct(s['retrain_accuracy'])} / {T.pct(s['retrain_attack_success'])}",
                f"{T.pct(s['attacked_accuracy'])} / {T.pct(s['attacked_attack_success'])} / "
                f"{s['attacked_dist_to_retrain']:.3f}",
                f"{T.pct(s['finetune_accuracy'])} / {T.pct(s['finetune_attack_success'])} / "
                f"{s['finetune_dist_to_retrain']:.3f} / {s['finetune_mia_auc']:.3f}",
                f"{T.pct(s[d + 'accuracy'])} / {T.pct(s[d + 'attack_success'])} / {s[d + 'dist_to_retrain']:.3f} / "
                f"{s[d + 'mia_auc']:.3f} ({s['retrain_mia_auc']:.3f})",
                f"{T.pct(s[d + 'client_cost'])}%", f"{s[d + 'ratio']:.1f}x", f"{T.pct(s[d + 'rebuild_error'])}%",
                "PASS" if s["pass"] else "FAIL: " + ", ".join(failed),
                f"{'yes' if s['beats_finetune_distance'] else 'no'} / {'yes' if s['beats_finetune_mia'] else 'no'}"]

    return T.markdown(head, map(cells, summary))


def format_compact(summary: list[dict]) -> str:
    """The pass/fail matrix in few columns (the README's): the default method from the MEDU history vs retraining."""
    d = f"{DEFAULT_METHOD}/medu_"
    head = ["scenario", "acc: retrain / unlearned", "attack success: retrain / attacked / unlearned",
            "dist: attacked / unlearned", "client cost", "bytes ratio", "pass"]

    def cells(s: dict) -> list[str]:
        failed = [k for k, ok in s["checks"].items() if not ok]
        return [s["scenario"], f"{T.pct(s['retrain_accuracy'])} / {T.pct(s[d + 'accuracy']) or 'nan'}",
                f"{T.pct(s['retrain_attack_success']) or '-'} / {T.pct(s['attacked_attack_success']) or '-'} / "
                f"{T.pct(s[d + 'attack_success']) or '-'}",
                f"{T.dist(s['attacked_dist_to_retrain'])} / {T.dist(s[d + 'dist_to_retrain'])}",
                T.pct(s[d + 'client_cost'], "%") or "nan", f"{s[d + 'ratio']:.1f}x",
                "pass" if s["pass"] else "**FAIL** (" + ", ".join(failed) + ")"]

    return T.markdown(head, map(cells, summary), "llllrrl")


def format_methods(summary: list[dict]) -> str:
    """Every method x history per scenario: accuracy gap to retraining, distance, client cost."""
    methods = sorted({k.split("_")[0] for s in summary for k in s if "/" in k})

    def cells(s: dict) -> list[str]:
        return [s["scenario"]] + [f"{100 * (s[f'{m}_accuracy'] - s['retrain_accuracy']):+.1f} / "
                                  f"{T.dist(s[f'{m}_dist_to_retrain'])} / {T.pct(s[f'{m}_client_cost'])}" for m in methods]

    return T.markdown(["scenario", *methods], map(cells, summary),
                      note="  (each: acc gap to retrain (points) / dist / cost %)")


def plot(results: list[dict], path: str) -> str:
    """Accuracy gap to retraining vs client cost, one point per method (mean over every cell)."""
    pts: dict[str, list] = {}
    for run in results:
        ref = next(x for x in run["rows"] if x["method"] == "retrain")["accuracy"]
        for x in run["rows"]:
            if x["method"] in ("retrain",):
                continue
            label = x["method"] if x["method"].startswith(("finetune", "attacked")) else f"{x['method']}/{x['history']}"
            if label.startswith("finetune") and x.get("equal_cost"):
                label = "finetune (equal cost)"
            pts.setdefault(label, []).append((x["client_cost"], 100 * (x["accuracy"] - ref)))
    with T.figure(path, (7, 4.5)) as ax:
        for label, p in sorted(pts.items()):
            c, g = np.nanmean(np.asarray(p, float), axis=0)
            ax.plot(100 * c, g, "o")
            ax.annotate(label, (100 * c, g), fontsize=7)
        ax.axhline(0, ls="--", c="k", lw=0.8)
        ax.axhline(-100 * BAR["accuracy_gap"], ls=":", c="r", lw=0.8)
        ax.axvline(100 * BAR["client_cost"], ls=":", c="r", lw=0.8)
        ax.set_xlabel("client cost (% of retraining's local steps)")
        ax.set_ylabel("clean accuracy - retraining's (points, mean over cells)")
        ax.set_title("every method, mean over the suite's cells (NaN rows of diverged runs left out)", fontsize=8)
    return path


def write_report(results: list[dict], out: str) -> dict[str, str]:
    """summary.json, summary.md (pass/fail matrix and every method) and plot.png in ``out``."""
    summary = summarize(results)
    paths = {"json": os.path.join(out, "summary.json"), "md": os.path.join(out, "summary.md"),
             "plot": os.path.join(out, "accuracy_vs_cost.png")}
    with open(paths["json"], "w") as f:
        f.write(T.to_json(summary, indent=1))
    with open(paths["md"], "w") as f:
        f.write(format_summary(summary) + "\n\n" + format_methods(summary) + "\n")
    plot(results, paths["plot"])
    return paths
