"""Rebuild error vs rounds, with and without error feedback (issue 15, item 3).

Trains FedAvg once for the long horizon with several histories recorded side by side, and measures each
history's rebuild error (replay with nobody removed vs the trained model, ``mj.rebuild_error``) after the short
and the long horizon: the short one from the first rounds of the same history (the closed loop is causal, and
round t's randomness depends only on (seed, t), so they are the history of a run that stopped there) against
the model of a run of that many rounds. Also prints each history's bytes ratio to float32, its skip rates and
the encoder's closed-loop state (the peak server memory is history + state).

    python benchmarks/error_feedback.py                 # MNIST-1D, 50 users, Dir(0.3) and IID, 60 vs 240 rounds
    python benchmarks/error_feedback.py --quick         # digits, 20 users, 15 vs 60 rounds (about a minute)
    python benchmarks/error_feedback.py --suite         # the suite's MNIST-1D targeted flip 10% cells, with and
                                                        # without error feedback (suite.run_cell; ~25 min)
    python benchmarks/error_feedback.py --suite --datasets mnist1d digits --attacks backdoor scaled --seeds 0

The setup is the scenario suite's (``medu_jax.suite``: MLP 128x128, 10 local steps of 32, lr 0.1, 10%
targeted label flippers); the MEDU histories keep 0.5 of the users at tau 0.3, at A2 2 bits bit-packed (the
default until 51a10a9), at A2 3 bits ANS coded, without and with (the default) the model correction.
``--suite`` uses the suite's own MEDU setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import medu_jax as mj
from medu_jax import attacks, data as D, suite as S
from medu_jax.suite import SuiteConfig, _dataset, _model_and_optimizer, _pad


def histories() -> dict:
    return {
        "float32": mj.identity(),
        "sparsify 0.5": mj.user_sparsification(0.5),
        "sparsify 0.5 + EF": mj.chain(mj.error_feedback(), mj.user_sparsification(0.5, missing="zero")),
        "A2 2 bits": mj.lattice_coding("A2", 2),
        "A2 2 bits + EF": mj.chain(mj.error_feedback(), mj.lattice_coding("A2", 2)),
        # the default until 51a10a9 (codes bit-packed), the setting of the docs' table
        "MEDU 2 bits": mj.medu(0.5, 0.3, "A2", 2, entropy=None, correction=False),
        "MEDU 2 bits + EF": mj.medu(0.5, 0.3, "A2", 2, error_feedback=True, entropy=None, correction=False),
        # a measured caveat: a guard (rows worse than zero stored as zero, the residual kept)
        "MEDU 2 bits + EF, guard": mj.medu(0.5, 0.3, "A2", 2, error_feedback=True, guard=True, entropy=None,
                                           correction=False),
        "MEDU A2 3 bits, ANS (the default until the model correction)": mj.medu(correction=False),
        "MEDU A2 3 bits, ANS + EF": mj.medu(error_feedback=True, correction=False),
        "MEDU (default: A2 3 bits, ANS, model correction)": mj.medu(),
        # scale="rms" with error feedback (refused at construction since: rebuild error 15% -> 28%) ran as
        # mj.chain(mj.error_feedback(), mj.lattice_coding("A2", 2, scale="rms"))
    }


def state_bytes(comp, like) -> int:
    state = jax.eval_shape(comp.init, like.zeros())  # the filters' states and the model correction's carry
    return int(sum(np.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves((state["filters"],
                                                                                   state.get("correction")))))


def run(dataset: str, alpha, cfg: SuiteConfig, short: int, long: int, seed: int = 0) -> list[dict]:
    ds = _dataset(dataset, seed, cfg)
    k = cfg.num_users
    clients = _pad(D.make_clients(ds, k, seed, alpha))
    bad = list(range(k - int(round(0.1 * k)), k))
    clients = attacks.targeted_flip(clients, bad, cfg.source, cfg.flip_target)
    model, tx = _model_and_optimizer(tuple(cfg.hidden), ds.num_classes, float(cfg.lr))
    params0 = model.init(jax.random.key(seed), jnp.zeros((1, *ds.x_train.shape[1:])))
    fed = lambda rounds: mj.FedConfig(rounds, cfg.local_steps, cfg.batch_size, 1.0, 1.0, seed)  # noqa: E731
    t0 = time.perf_counter()
    trained = mj.train(model.apply, tx, params0, clients, fed(long), histories())
    params_short = mj.train(model.apply, tx, params0, clients, fed(short)).params
    t_train = time.perf_counter() - t0
    out = []
    for name, h in trained.histories.items():
        h_short = dataclasses.replace(h, records=h.records[:short])
        skips = h.skip_rates()
        row = {
            "data": f"{dataset} {'IID' if alpha is None else f'Dir({alpha})'}", "history": name,
            f"rebuild@{short}": mj.rebuild_error(h_short, params_short),
            f"rebuild@{long}": mj.rebuild_error(h, trained.params),
            "ratio": h.float32_nbytes / max(h.nbytes, 1),
            "history_bytes": h.nbytes, "state_bytes": state_bytes(h.compressor, h.like),
            "stored": skips["stored"], "thresholded": skips["thresholded"], "train_s": t_train,
        }
        row["peak_ratio"] = h.float32_nbytes / max(h.nbytes + row["state_bytes"], 1)
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


def table(rows: list[dict], short: int, long: int) -> str:
    lines = [f"| data | history | rebuild error, {short} rounds | {long} rounds | bytes ratio | encoder state "
             f"| peak ratio (history + state) | stored | thresholded |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['data']} | {r['history']} | {100 * r[f'rebuild@{short}']:.2f}% | "
                     f"{100 * r[f'rebuild@{long}']:.2f}% | {r['ratio']:.1f}x | {r['state_bytes'] / 2**20:.1f} MiB | "
                     f"{r['peak_ratio']:.1f}x | {100 * r['stored']:.0f}% | {100 * r['thresholded']:.1f}% |")
    return "\n".join(lines)


def suite_cells(cfg: SuiteConfig, cells: list[dict], out: str | None) -> list[dict]:
    """The suite's cells with and without error feedback: the default method's figures from the MEDU history,
    the bar's checks (one seed per cell here; the suite's table averages two)."""
    rows = []
    for cell in cells:
        for ef in (False, True):
            t0 = time.perf_counter()
            res = S.run_cell(cell, dataclasses.replace(cfg, medu_options=(("error_feedback", ef),)))
            row = {"cell": S.cell_name(cell), "error_feedback": ef, "seconds": time.perf_counter() - t0,
                   "rebuild_error": res["rebuild_error"]["medu"]}
            get = lambda m, h: next(x for x in res["rows"] if x["method"] == m and x.get("history", "") == h)  # noqa: E731
            att, ret = get("attacked", ""), get("retrain", "")
            for m, h in (("adaptive", "medu"), ("adaptive", "float32"), ("naive", "medu"), ("fedrecover", "medu")):
                r = get(m, h)
                for key in ("accuracy", "attack_success", "dist_to_retrain", "client_cost", "fixed_updates",
                            "dropped_estimates"):
                    row[f"{m}/{h}_{key}"] = r.get(key)
            row.update({"attacked_dist": att["dist_to_retrain"], "retrain_accuracy": ret["accuracy"],
                        "retrain_attack_success": ret["attack_success"], "ratio": get("adaptive", "medu")["ratio"]})
            row["distance_ok"] = row["adaptive/medu_dist_to_retrain"] < row["attacked_dist"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out:
                with open(out, "w") as f:
                    json.dump(rows, f, indent=1)
    return rows


def suite_table(rows: list[dict]) -> str:
    lines = ["| cell | error feedback | rebuild error | dist: attacked / adaptive (MEDU) / adaptive (float32) | "
             "accuracy: retrain / adaptive (MEDU) | attack success: retrain / adaptive (MEDU) | client cost | "
             "naive replay dist | distance check |", "|---|---|---:|---|---|---|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['cell']} | {'yes' if r['error_feedback'] else 'no'} | {100 * r['rebuild_error']:.1f}% | "
            f"{r['attacked_dist']:.3f} / {r['adaptive/medu_dist_to_retrain']:.3f} / "
            f"{r['adaptive/float32_dist_to_retrain']:.3f} | {100 * r['retrain_accuracy']:.1f} / "
            f"{100 * r['adaptive/medu_accuracy']:.1f} | {100 * r['retrain_attack_success']:.1f} / "
            f"{100 * r['adaptive/medu_attack_success']:.1f} | {100 * r['adaptive/medu_client_cost']:.1f}% | "
            f"{r['naive/medu_dist_to_retrain']:.3f} | {'pass' if r['distance_ok'] else 'FAIL'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="digits, 20 users, hidden 64, 15 vs 60 rounds")
    ap.add_argument("--short", type=int, default=60)
    ap.add_argument("--long", type=int, default=240)
    ap.add_argument("--datasets", nargs="+", default=["mnist1d"])
    ap.add_argument("--alphas", nargs="+", default=["0.3", "iid"], help="Dirichlet alphas, or iid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--suite", action="store_true", help="the suite's cells (10%% attackers) instead")
    ap.add_argument("--attacks", nargs="+", default=["targeted_flip"], help="with --suite")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="with --suite")
    args = ap.parse_args(argv)
    cfg = SuiteConfig()
    if args.suite:
        cells = [dict(dataset=d, alpha=None if a == "iid" else float(a), attack=at, share=0.1, seed=s)
                 for d in args.datasets for at in args.attacks for a in args.alphas for s in args.seeds]
        print(suite_table(suite_cells(cfg, cells, args.json)))
        return 0
    short, long = args.short, args.long
    datasets = args.datasets
    if args.quick:
        cfg = dataclasses.replace(cfg, num_users=20, hidden=(64,))
        short, long, datasets = 15, 60, ["digits"]
    rows = []
    for dataset in datasets:
        for a in args.alphas:
            rows += run(dataset, None if a == "iid" else float(a), cfg, short, long, args.seed)
    print(table(rows, short, long))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
