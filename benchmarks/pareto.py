"""Bytes ratio vs rebuild error vs unlearned accuracy of MEDU settings: issue 15's Pareto front.

Per scenario (cells of the suite, same setup), trains once with every setting's history side by side, retrains
without the attackers, and unlearns with the default method (adaptive recovery) from each history. Per setting:
bytes ratio (float32 history / this history), peak ratio (float32 history / (history + the encoder's
closed-loop state, the server's memory while training)), rebuild error, skip rates, unlearned accuracy gap to
retraining, distance to retraining (the attacked model's next to it) and client cost.

    python benchmarks/pareto.py --out runs/pareto     # the table and plot in docs/codec.md (~15 min on 2 cores)
    python benchmarks/pareto.py --quick               # a minute: one digits cell, 20 users, 30 rounds, 3 settings

A setting is medu() keywords over its defaults (keep 0.5, tau 0.3, A2 3-bit codes ANS coded, the model
correction); ``--settings`` picks some by name.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import jax
import numpy as np

from medu_jax import compressors as C, metrics, recovery as R, suite, tables as T
from medu_jax.dither import entropy_clip
from medu_jax.fedavg import train
from medu_jax.unlearn import rebuild_error

SETTINGS = {
    "default": {},  # A2 3-bit codes, ANS coded, with the model correction
    "no correction": dict(correction=False),  # the default before the model correction
    "A2 2 packed (old default)": dict(bits=2, entropy=None, correction=False),
    "A2 2 ANS": dict(bits=2),
    "Z8 r2": dict(lattice="Z", bits=8, scale="rms", clip=entropy_clip(2.0, 8)),
    "Z8 r1 wiener": dict(lattice="Z", bits=8, scale="rms", clip=entropy_clip(1.0, 8), gain="wiener"),
    "EF": dict(error_feedback=True),
    "keep 0.25 A2 2 ANS": dict(fraction=0.25, bits=2),
    "keep 0.2": dict(fraction=0.2),
    "keep 0.2 A2 2 ANS": dict(fraction=0.2, bits=2),
    "keep 0.25 Z8 r1.2": dict(fraction=0.25, lattice="Z", bits=8, scale="rms", clip=entropy_clip(1.2, 8)),
    "keep 0.25 EF": dict(fraction=0.25, error_feedback=True),
    "keep 0.15": dict(fraction=0.15),
    "keep 0.2 Z8 r1.3": dict(fraction=0.2, lattice="Z", bits=8, scale="rms", clip=entropy_clip(1.3, 8)),
    # adaptive recovery's options under "recovery" (a setting with the same medu() keywords shares the history)
    "default stale": dict(recovery=dict(stale_offsets=True)),
    "keep 0.2 A2 2 ANS rc": dict(fraction=0.2, bits=2, recovery=dict(remaining_corrections=True)),
    "keep 0.2 A2 2 ANS stale": dict(fraction=0.2, bits=2, recovery=dict(stale_offsets=True)),
    "keep 0.2 A2 2 ANS rc stale": dict(fraction=0.2, bits=2,
                                       recovery=dict(remaining_corrections=True, stale_offsets=True)),
    "keep 0.15 stale": dict(fraction=0.15, recovery=dict(stale_offsets=True)),
    # issue 15, session 14: 7 users a round with the budget's tail; interpolated stale rows
    "keep 0.14 tail": dict(fraction=0.14, recovery=dict(exact_tail=True)),
    "keep 0.14 tail interp": dict(fraction=0.14, recovery=dict(exact_tail=True, stale_rows="interpolate")),
    "keep 0.14 tail drift 1": dict(fraction=0.14, recovery=dict(exact_tail=True, drift=1.0)),
}
CELLS = (("digits", 0.3, "backdoor", 0.2), ("digits", None, "sign_flip", 0.2),
         ("mnist1d", 0.3, "targeted_flip", 0.1), ("mnist1d", None, "backdoor", 0.1))


def medu_options(options: dict) -> dict:
    """A setting's medu() keywords (everything but its adaptive-recovery options)."""
    return {k: v for k, v in options.items() if k != "recovery"}


def compressor(options: dict) -> C.Compressor:
    return C.medu(**medu_options(options))


def history_key(options: dict) -> str:
    """Settings that differ only in their recovery options share one history."""
    return json.dumps(medu_options(options), sort_keys=True)


def state_nbytes(state) -> int:
    return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(state)))


def run_cell(cell: dict, cfg: suite.SuiteConfig, settings: dict) -> list[dict]:
    setup = suite.setup_cell(cell, cfg)
    ds, clients, bad, scale, _, _, apply_fn, tx, params0, fed = setup
    comps = {history_key(opts): compressor(opts) for opts in settings.values()}
    trained = train(apply_fn, tx, params0, clients, fed, comps, update_scale=scale)
    w_retrain = train(apply_fn, tx, params0, clients, fed, exclude=bad, update_scale=scale).params

    def evaluate(w) -> dict:
        return {"accuracy": metrics.accuracy(apply_fn, w, ds.x_test, ds.y_test),
                "dist_to_retrain": metrics.relative_distance(w, w_retrain),
                "attack_success": setup.attack_success(w, cell["attack"], cfg)}

    ref, attacked = evaluate(w_retrain), evaluate(trained.params)
    rows = []
    for name, opts in settings.items():
        key = history_key(opts)
        h = trained.histories[key]
        t0 = time.perf_counter()
        try:
            rec = R.adaptive_recovery(h, bad, apply_fn, tx, clients, fed, **opts.get("recovery", {}))
            got, cost = evaluate(rec.params), rec.client_cost
        except FloatingPointError:
            got, cost = {"accuracy": math.nan, "dist_to_retrain": math.nan}, math.nan
        peak = h.nbytes + state_nbytes(trained.codec_states[key])
        rows.append({"scenario": suite._scenario(cell), "seed": cell["seed"], "setting": name, "options": opts,
                     "ratio": h.float32_nbytes / max(h.nbytes, 1), "peak_ratio": h.float32_nbytes / max(peak, 1),
                     "rebuild_error": rebuild_error(h, trained.params), "skips": h.skip_rates(),
                     "max_rel_error": float(np.max(trained.log["rel_error"][key])),
                     "retrain": ref, "attacked": attacked, "unlearned": got, "client_cost": cost,
                     "seconds": time.perf_counter() - t0})
    return rows


def table(rows: list[dict]) -> str:
    head = ["scenario", "setting", "bytes ratio", "peak ratio", "rebuild", "stored", "acc retrain / unlearned",
            "dist attacked / unlearned", "cost"]
    return T.markdown(head, ([r["scenario"], r["setting"], f"{r['ratio']:.1f}x", f"{r['peak_ratio']:.1f}x",
                              f"{T.pct(r['rebuild_error'])}%", f"{T.pct(r['skips']['stored'])}%",
                              f"{T.pct(r['retrain']['accuracy'])} / {T.pct(r['unlearned']['accuracy'])}",
                              f"{T.dist(r['attacked']['dist_to_retrain'])} / {T.dist(r['unlearned']['dist_to_retrain'])}",
                              f"{T.pct(r['client_cost'])}%"] for r in rows), "llrrrrllr")


def plot(rows: list[dict], path: str) -> None:
    """Bytes ratio vs the unlearned model's distance to retraining over the attacked model's (mean over
    scenarios; the bar is below 1), one point per setting labelled with its rebuild error; the Pareto front (no
    other setting both smaller and closer) joined."""
    pts = {}
    for r in rows:
        pts.setdefault(r["setting"], []).append((r["ratio"], r["unlearned"]["dist_to_retrain"] /
                                                 r["attacked"]["dist_to_retrain"], r["rebuild_error"]))
    mean = {k: np.nanmean(np.asarray(v, float), axis=0) for k, v in pts.items()}
    front = sorted((k for k, (x, y, _) in mean.items()
                    if not any(x2 >= x and y2 <= y and (x2, y2) != (x, y) for x2, y2, _ in mean.values())),
                   key=lambda k: mean[k][0])
    with T.figure(path, (7, 4.5)) as ax:
        for k, (x, y, e) in mean.items():
            ax.plot(x, y, "o", c="C1" if k in front else "C0")
            ax.annotate(f"{k} ({100 * e:.1f}%)", (x, y), fontsize=7)
        ax.plot([mean[k][0] for k in front], [mean[k][1] for k in front], "-", c="C1", lw=0.8)
        ax.axhline(1.0, ls=":", c="r", lw=0.8)
        ax.axvline(100, ls=":", c="r", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("history bytes ratio (float32 / MEDU)")
        ax.set_ylabel("distance to retraining / attacked model's")
        ax.set_title("adaptive recovery from each history, mean over scenarios (label: rebuild error)", fontsize=8)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/pareto")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--settings", help="comma-separated names of SETTINGS")
    p.add_argument("--report-only", action="store_true", help="table and plot from --out/pareto.json, run nothing")
    p.add_argument("--cells", help="semicolon-separated dataset:alpha:attack:share cells (alpha 'iid' or a float) "
                                   "in place of the four default ones")
    p.add_argument("--seeds", default="0", help="comma-separated seeds of every cell")
    args = p.parse_args(argv)
    if args.report_only:
        with open(os.path.join(args.out, "pareto.json")) as f:
            rows = json.load(f)
        plot(rows, os.path.join(args.out, "pareto.png"))
        print(table(rows))
        return
    names = args.settings.split(",") if args.settings else list(SETTINGS)
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"unknown settings {unknown}: choose from {list(SETTINGS)}")
    if args.quick:
        names = names[:3] if not args.settings else names
        cfg = suite.SuiteConfig(datasets=("digits",), num_users=20, rounds=30, hidden=(64,))
        cells = [dict(dataset="digits", alpha=0.3, attack="backdoor", share=0.2, seed=0)]
    else:
        cfg = suite.SuiteConfig()
        spec = CELLS if not args.cells else [
            (d, None if a == "iid" else float(a), at, float(sh)) for d, a, at, sh in
            (c.split(":") for c in args.cells.split(";"))]
        cells = [dict(dataset=d, alpha=a, attack=at, share=s, seed=int(sd)) for d, a, at, s in spec
                 for sd in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for cell in cells:
        t0 = time.perf_counter()
        rows += run_cell(cell, cfg, {n: SETTINGS[n] for n in names})
        print(f"{suite.cell_name(cell)}: {time.perf_counter() - t0:.0f} s", flush=True)
        with open(os.path.join(args.out, "pareto.json"), "w") as f:  # after every cell: a long run keeps its part
            f.write(T.to_json(rows, indent=1))
    md = table(rows)
    with open(os.path.join(args.out, "pareto.md"), "w") as f:
        f.write(md + "\n")
    plot(rows, os.path.join(args.out, "pareto.png"))
    print(md)


if __name__ == "__main__":
    main()
