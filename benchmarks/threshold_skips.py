"""Thresholding that skips (issue 15, item 4): skip rate, bytes, rebuild error and unlearning against tau.

Trains each cell once with several histories side by side: float32, the suite's MEDU (row thresholding
``differential_threshold(0.3)``) and MEDU with ``block_threshold(tau)`` in its place for each tau (the same
user sparsification 0.5 and coder: A2 3-bit codes ANS coded, or with --packed2 the earlier default, A2 2-bit
codes packed; blocks of 128 entries). For each history: the skip rates, the bytes ratio to
float32 of the History (``nbytes``: full rows) and of its stored form (``thresholding.strip``: the codes of
skipped blocks removed), the rebuild error (decoded round by round with the chain's decoder, which any restore
allows; ``unlearn.replay``'s row weights take per-user restores only) and ``adaptive_recovery``'s unlearned
model (accuracy, attack success, distance to retraining).

    python benchmarks/threshold_skips.py --changes # why rows are not skipped: the change ||h - r|| / ||h|| of
                                                   # rows and blocks, digits and MNIST-1D (~3 min)
    python benchmarks/threshold_skips.py --quick   # one digits cell (Dir 0.3, backdoor), tau 0, 0.3 (~1 min)
    python benchmarks/threshold_skips.py           # the quick suite's 4 digits cells + MNIST-1D Dir 0.3 targeted
                                                   # flip 10% (the suite's default setup), 6 taus and blocks
                                                   # of 64 and 256 at tau 0.3 (~12 min on 2 CPU cores)
    python benchmarks/threshold_skips.py --packed2 # the same with A2 2-bit packed codes (docs/codec.md's table)

Cells are built as ``suite.run_cell`` builds them (same data, attackers, model and seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import medu_jax as mj
from medu_jax import attacks, data as D, metrics, suite as S, thresholding as TH
from medu_jax.suite import SuiteConfig, _dataset, _model_and_optimizer, _pad
from medu_jax.trees import relative_distance

U = importlib.import_module("medu_jax.unlearn")  # the module (medu_jax.unlearn is also recovery's function)

BLOCK = 128


def histories(taus: tuple, cfg: SuiteConfig, blocks: tuple = ()) -> dict:
    """float32, the suite's MEDU, and MEDU with block thresholding in the threshold's place (same sparsification
    and coder, its entropy coding included) at each tau (blocks of 128), and at tau 0.3 with each of ``blocks``."""
    frac, tau, lattice, bits = cfg.medu
    options = dict(cfg.medu_options)
    if set(options) - {"entropy"}:
        raise ValueError(f"the block chains copy MEDU's lattice, bits and entropy, not {set(options) - {'entropy'}}")
    out = {"float32": mj.identity(), f"row tau {tau}": cfg.compressor()}
    for b, t in [(BLOCK, t) for t in taus] + [(b, 0.3) for b in blocks]:
        out[f"block{b} tau {t}"] = mj.chain(mj.user_sparsification(frac), mj.block_threshold(t, b),
                                            mj.lattice_coding(lattice, bits, entropy=options.get("entropy")))
    return out


def rebuild_error(history, trained) -> float:
    """||replay - trained|| / ||trained|| with the chain's decoder round by round (FedAvg's step)."""
    rebuilt = U._replay(history, (), None, U._ServerStep(None), None)
    return relative_distance(rebuilt, trained)


def run_cell(cell: dict, cfg: SuiteConfig, taus: tuple, blocks: tuple = ()) -> list[dict]:
    ds = _dataset(cell["dataset"], cell["seed"], cfg)
    k = cfg.num_users
    clients = _pad(D.make_clients(ds, k, cell["seed"], cell["alpha"]))
    bad = list(range(k - int(round(cell["share"] * k)), k))
    pixels, value = attacks.default_trigger(int(ds.x_train[0].size))
    scale = None
    if cell["attack"] == "backdoor":
        clients = attacks.backdoor(clients, bad, cfg.target, cfg.poison_fraction, pixels, value, cell["seed"])
        success = lambda p: metrics.attack_success(model.apply, p, ds.x_test, ds.y_test, cfg.target, pixels, value)
    elif cell["attack"] == "targeted_flip":
        clients = attacks.targeted_flip(clients, bad, cfg.source, cfg.flip_target)
        success = lambda p: metrics.flip_success(model.apply, p, ds.x_test, ds.y_test, cfg.source, cfg.flip_target)
    else:
        scale = attacks.update_scale(k, bad, -cfg.sign_flip_scale)
        success = lambda p: float("nan")
    model, tx = _model_and_optimizer(tuple(cfg.hidden), ds.num_classes, float(cfg.lr))
    params0 = model.init(jax.random.key(cell["seed"]), jnp.zeros((1, *ds.x_train.shape[1:])))
    fed = mj.FedConfig(cfg.rounds, cfg.local_steps, cfg.batch_size, 1.0, 1.0, cell["seed"])
    trained = mj.train(model.apply, tx, params0, clients, fed, histories(taus, cfg, blocks), update_scale=scale)
    retrained = mj.train(model.apply, tx, params0, clients, fed, exclude=bad, update_scale=scale).params
    f32 = trained.histories["float32"].float32_nbytes
    rows = [{"history": "retrain", "accuracy": metrics.accuracy(model.apply, retrained, ds.x_test, ds.y_test),
             "attack_success": success(retrained)}]
    for name, h in trained.histories.items():
        t0 = time.perf_counter()
        rec = mj.adaptive_recovery(h, bad, model.apply, tx, clients, fed)
        row = {"history": name, "ratio": f32 / h.nbytes, "rebuild_error": rebuild_error(h, trained.params),
               "accuracy": metrics.accuracy(model.apply, rec.params, ds.x_test, ds.y_test),
               "attack_success": success(rec.params),
               "dist_to_retrain": metrics.relative_distance(rec.params, retrained), "client_cost": rec.client_cost}
        if name.startswith("block"):
            rates = TH.skip_rates(h)
            row.update(stored_ratio=f32 / TH.stripped_nbytes(h), skipped_blocks=rates["blocks"],
                       skipped_entries=rates["entries"], skipped_rows=rates["rows"])
        elif name.startswith("row"):
            row.update(stored_ratio=row["ratio"], skipped_rows=h.skip_rates()["thresholded"])
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return [{"cell": S.cell_name(cell), **r} for r in rows]


def changes(name: str, cfg: SuiteConfig) -> dict:
    """The change of user-rounds in one run (Dir(0.3), seed 0, no attackers): h from a float32 history, r the
    previous round's exact update, or MEDU's closed-loop reference before the round (its decoder's state)."""
    ds = _dataset(name, 0, cfg)
    clients = _pad(D.make_clients(ds, cfg.num_users, 0, 0.3))
    model, tx = _model_and_optimizer(tuple(cfg.hidden), ds.num_classes, float(cfg.lr))
    params0 = model.init(jax.random.key(0), jnp.zeros((1, *ds.x_train.shape[1:])))
    fed = mj.FedConfig(cfg.rounds, cfg.local_steps, cfg.batch_size, 1.0, 1.0, 0)
    hs = mj.train(model.apply, tx, params0, clients, fed, {"f": mj.identity(), "m": cfg.compressor()}).histories
    f, m = hs["f"], hs["m"]
    k, n_leaves = f.num_users, len(f.like.leaves)
    h = np.stack([np.concatenate([r[f"row:{i}"].reshape(k, -1) for i in range(n_leaves)], axis=1)
                  for r in f.records])  # (rounds, K, d): every user is active in every round
    ids, nb = TH.BlockThreshold(0.3, BLOCK, 2).geometry(m.like)
    ids = np.concatenate(ids)

    def blocks(v):  # (n, d) -> (n, blocks) sums
        out = np.zeros((v.shape[0], nb))
        np.add.at(out.T, ids, v.T)
        return out

    exact = np.linalg.norm(h[1:] - h[:-1], axis=2) / np.linalg.norm(h[1:], axis=2)
    comp, msgs = m.compressor, m.expand()
    state, decode = comp.init(m.like.zeros()), jax.jit(comp.decode)
    rows, own = [], []
    for t in range(m.num_rounds):
        th = state["filters"][1]  # the threshold's reference: the users' last stored, decoded updates
        msg = jax.tree.map(lambda a: a[t], msgs)
        sel = np.asarray(msg.flags["sparsify"]["selected"] & th["has"])  # rows the threshold decided on
        ref = np.concatenate([np.asarray(x).reshape(k, -1) for x in jax.tree.leaves(th["ref"])], axis=1)
        d, x = (h[t] - ref)[sel], h[t][sel]
        rows += list(np.linalg.norm(d, axis=1) / np.linalg.norm(x, axis=1))
        own += list((np.sqrt(blocks(d**2)) / np.maximum(np.sqrt(blocks(x**2)), 1e-30)).ravel())
        _, _, state = decode(msg, state, mj.compressor_key(m.seed, m.round_ids[t]))
    rows, own = np.array(rows), np.array(own)
    stats = {"exact median": np.median(exact), "exact p1": np.percentile(exact, 1), "closed median": np.median(rows),
             "closed p10": np.percentile(rows, 10), "rows < 0.3": np.mean(rows < 0.3),
             "blocks < 0.3": np.mean(own < 0.3), "zero entries": np.mean(h == 0)}
    return {"data": name, **{key: float(v) for key, v in stats.items()}}


def table(rows: list[dict], cols: list[str]) -> str:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            cells.append(f"{v:.3g}" if isinstance(v, float) else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one digits cell, two taus")
    ap.add_argument("--changes", action="store_true", help="the change of rows and blocks, no unlearning")
    ap.add_argument("--packed2", action="store_true",
                    help="MEDU's earlier default coder (A2 2-bit codes, packed) instead of the suite's")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    coder = {"medu": (0.5, 0.3, "A2", 2), "medu_options": (("entropy", None),)} if args.packed2 else {}
    m1d = SuiteConfig(datasets=("mnist1d",), alphas=(0.3,), attacks=("targeted_flip",), shares=(0.1,), seeds=(0,),
                      methods=("adaptive",), finetune_costs=(), **coder)
    quick = dataclasses.replace(S.quick_config(), **coder)
    if args.changes:
        rows = [changes("digits", quick), changes("mnist1d", m1d)]
        print(table(rows, list(rows[0])))
        return
    if args.quick:
        cells = [c for c in quick.cells() if c["alpha"] is not None and c["attack"] == "backdoor"]
        plan = [(quick, cells, (0.0, 0.3), ())]
    else:
        taus = (0.0, 0.1, 0.2, 0.3, 0.5, 0.7)
        plan = [(quick, quick.cells(), taus, (64, 256)), (m1d, m1d.cells(), taus, (64, 256))]
    rows = []
    for cfg, cells, taus, blocks in plan:
        for cell in cells:
            t0 = time.perf_counter()
            rows += run_cell(cell, cfg, taus, blocks)
            print(f"{S.cell_name(cell)}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(table(rows, ["cell", "history", "skipped_entries", "skipped_rows", "ratio", "stored_ratio",
                       "rebuild_error", "accuracy", "attack_success", "dist_to_retrain"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
