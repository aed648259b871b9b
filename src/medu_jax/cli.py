"""The ``medu`` command: flags to configs, one call to an experiment's runner, its report printed.

``medu demo`` and ``medu run --config file.json`` (``experiment``) train with malicious users, unlearn them from
every history variant, retrain from scratch as the reference, and print one Markdown comparison table; ``--out
DIR`` also writes table.csv, result.json and a plot of accuracy and attack success against stored bytes.
``medu zoga``, ``medu rum``, ``medu s3t`` and ``medu suite`` run ``zoga_experiment``, ``rum_experiment``,
``s3t_experiment`` and ``suite``. Each experiment's config, runner and table live in its own module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
from typing import Callable

from medu_jax import experiment
from medu_jax.experiment import ExperimentConfig, run_experiment


def _config_from_file(path: str) -> ExperimentConfig:
    if not os.path.exists(path):
        raise _exit2(f"medu: config file {path!r} not found")
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise _exit2(f"medu: config file {path!r} is not valid JSON: {e}") from e
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, not text
        raise _exit2(f"medu: config file {path!r} cannot be read: {e}") from e
    if not isinstance(d, dict):
        raise _exit2(f"medu: config file {path!r} must hold a JSON object of settings")
    return ExperimentConfig.from_dict(d)


def _exit2(message: str) -> SystemExit:
    """A user error found outside ``_guarded``: the message on stderr (one line), exit code 2."""
    print(message, file=sys.stderr)
    e = SystemExit(message)
    e.code = 2
    return e


def _check_folders(store: str | None, resume: bool, out: str | None) -> None:
    """Before any training: --resume needs --store, and --out / --store must be folders this user can create
    or write (a file in the way, or a parent that is a file or read-only, is an error now, not after the run)."""
    if resume and not store:
        raise ValueError("--resume continues the run saved in --store: give --store (or store in the config)")
    for flag, path in (("--out", out), ("--store", store)):
        if not path:
            continue
        probe = os.path.abspath(path)
        while not os.path.exists(probe):
            probe = os.path.dirname(probe)
        if not os.path.isdir(probe):
            raise NotADirectoryError(f"{flag} {path!r}: {probe!r} is a file, not a folder")
        if not os.access(probe, os.W_OK | os.X_OK):
            raise PermissionError(f"{flag} {path!r}: the folder {probe!r} is not writable")


def _on_sigint(signum, frame):
    """Ctrl-C: KeyboardInterrupt in the main thread, as Python's default handler does, except inside a garbage
    collector callback or ``__del__`` (JAX runs one at every collection), where Python would print it as
    "Exception ignored" and the run would go on (seen in 1 of 10 tries): there the signal is sent again 50 ms
    later."""
    f = frame
    while f is not None:
        if f.f_code.co_name in ("__del__", "_xla_gc_callback"):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
            return
        f = f.f_back
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """The ``medu`` command; ``argv`` None: the program itself (``sys.argv``). Then Ctrl-C ends the process with
    exit code 130 through ``os._exit`` once stdout and stderr are flushed: a normal interpreter shutdown after
    an interrupt crashed with SIGSEGV in 5 of 10 tries (JAX's threads; benchmarks/ctrl_c.py), and nothing is
    left to clean up (a store's lock goes with the process, its committed rounds are on disk)."""
    if argv is not None:
        return _main(argv)
    signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = _main(argv)
    except KeyboardInterrupt:  # outside a run (imports, argument parsing)
        print("medu: interrupted", file=sys.stderr)
        code = 130
    if code == 130:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return code


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="medu", description="Memory-efficient federated unlearning (MEDU) in JAX")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="digits, 20 users, 4 backdoor users: every history variant vs retraining")
    run = sub.add_parser("run", help="an experiment from a JSON config (keys of ExperimentConfig) and flags")
    run.add_argument("--config", help="JSON file of ExperimentConfig settings")
    for p in (demo, run):
        p.add_argument("--out", help="folder for table.csv, table.md, result.json and accuracy_vs_bytes.png")
        p.add_argument("--rounds", type=int, help="federated rounds")
        p.add_argument("--seed", type=int, help="run seed")
        p.add_argument("--dataset", help="digits, mnist1d or mnist (with --data-path)")
        p.add_argument("--data-path", help="MNIST IDX folder or .npz file")
        p.add_argument("--lattice", help="Z, A2, D4 or E8")
        p.add_argument("--bits", type=int, help="bits per entry for lattice coding (1..16)")
        p.add_argument("--unlearn-methods", help="comma list of naive, corrected, fedrecover, federaser, crab")
        p.add_argument("--methods", help="comma list of histories: float32, sparsify, threshold, lattice, medu")
        p.add_argument("--store", help="folder for the durable history stores (zarr); unlearning reads them back")
        p.add_argument("--resume", action="store_true", help="continue the training saved in --store")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    zo = sub.add_parser("zoga", help="MEDU removes backdoor users, then one user forgets samples with ZO-GA / "
                                     "first-order GA; vs retraining")
    zo.add_argument("--dataset", default="digits", help="digits, mnist1d or mnist (with --data-path)")
    zo.add_argument("--data-path", help="MNIST IDX folder or .npz file")
    zo.add_argument("--steps", type=int, default=10, help="gradient-ascent steps")
    zo.add_argument("--ga-lr", type=float, default=0.005, help="gradient-ascent step size")
    zo.add_argument("--q", type=int, default=8, help="SPSA directions per step")
    zo.add_argument("--rounds", type=int, default=30, help="federated training rounds before unlearning")
    zo.add_argument("--seed", type=int, default=0)
    rm = sub.add_parser("rum", help="forget a random subset: RUM (memorization groups) vs NegGrad+, fine-tune, "
                                     "random labels, retraining")
    rm.add_argument("--dataset", default="digits", help="digits, mnist1d or mnist (with --data-path)")
    rm.add_argument("--data-path", help="MNIST IDX folder or .npz file")
    rm.add_argument("--proxy", default="confidence", help="confidence, max_confidence, entropy or binary_accuracy")
    rm.add_argument("--steps", type=int, default=30, help="unlearning steps per memorization group")
    rm.add_argument("--epochs", type=int, default=20, help="training epochs")
    rm.add_argument("--seed", type=int, default=0)
    st = sub.add_parser("s3t", help="S3T shards/slices/orders: deletions served by prefix checkpoints vs SISA")
    st.add_argument("--dataset", default="digits", help="digits, mnist1d or mnist (with --data-path)")
    st.add_argument("--data-path", help="MNIST IDX folder or .npz file")
    st.add_argument("--shards", type=int, default=4)
    st.add_argument("--slices", type=int, default=4)
    st.add_argument("--orders", type=int, default=2, help="slice orders per shard (1 = SISA)")
    st.add_argument("--deletions", type=int, default=8)
    st.add_argument("--seed", type=int, default=0)
    su = sub.add_parser("suite", help="the scenario suite: data sets x partitions x attacks x shares x seeds, every "
                                      "unlearning method from float32 and MEDU histories vs retraining; pass/fail")
    su.add_argument("--out", required=True, help="folder for cells/*.json (a rerun resumes), summary.md/json, plot")
    su.add_argument("--quick", action="store_true", help="the CI-sized suite (a few digits cells, one seed)")
    su.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                    help="mlp: the default suite; cnn: the convolutional scenario (digits as 8x8x1 images, 100 users)")
    su.add_argument("--dataset", help="run only the cells of this data set (digits or mnist1d)")
    su.add_argument("--attacks", help="run only the cells of these attacks (comma-separated)")
    su.add_argument("--shares", help="run only the cells of these malicious shares (comma-separated, e.g. 0.2)")
    su.add_argument("--seeds", help="run only the cells of these seeds (comma-separated); seeds none of which are "
                                    "the suite's make a suite of those seeds (fresh seeds, to confirm a result: "
                                    "give it its own --out); a mix of both is an error")
    su.add_argument("--report-only", action="store_true", help="summarize the cells already in --out, run none")
    su.add_argument("--medu", help="the MEDU history's setting as name=value pairs of compressors.medu, e.g. "
                                   "'fraction=0.25,bits=1,error_feedback=true' (use its own --out folder)")
    su.add_argument("--sign-flip-scale", type=float, help="the sign flip sends -scale x its update (default 1)")
    su.add_argument("--min-ratio", type=float, help="the bar's least history bytes ratio (default 30)")
    su.add_argument("--methods", help="unlearning methods to run (comma-separated; adaptive, the default, is kept)")
    su.add_argument("--adaptive", help="adaptive_recovery options as name=value pairs, e.g. "
                                       "'remaining_corrections=true' (use its own --out folder)")
    args = parser.parse_args(argv)
    if args.command == "suite":
        return _suite(args)
    if args.command == "s3t":
        return _s3t(args)
    if args.command == "zoga":
        return _zoga(args)
    if args.command == "rum":
        return _rum(args)

    def federated():
        base = _config_from_file(args.config) if getattr(args, "config", None) else ExperimentConfig()
        overrides = {
            k: v for k, v in {
                "rounds": args.rounds, "seed": args.seed, "dataset": args.dataset, "data_path": args.data_path,
                "lattice": args.lattice, "bits": args.bits,
                "unlearn_methods": args.unlearn_methods.split(",") if args.unlearn_methods else None,
                "methods": args.methods.split(",") if args.methods else None, "store": args.store,
                "resume": args.resume or None,
            }.items() if v is not None
        }
        cfg = ExperimentConfig.from_dict({**base.__dict__, **overrides})
        _check_folders(cfg.store, cfg.resume, args.out)
        return run_experiment(cfg, progress=not args.quiet)

    result, code = _report(federated, experiment.report)
    if code:
        return code
    if args.out:
        paths, code = _guarded(experiment.write_outputs, result, args.out)
        if code:
            return code
        for p in paths:
            print(f"wrote {p}")
    return 0


USER_ERRORS = (ValueError, TypeError, OSError)  # OSError: files and folders (not found, exists, full disk, ...)


def _guarded(run, *args):
    """(result, exit code): a user error is printed as one line and gives exit code 2; Ctrl-C one line and
    130 (the shell's code for SIGINT), not a traceback. A store being written stays resumable (--resume)."""
    try:
        return run(*args), 0
    except USER_ERRORS as e:
        print(f"medu: error: {e}", file=sys.stderr)
        return None, 2
    except KeyboardInterrupt:
        print("medu: interrupted (a history store being written can be continued with --resume)", file=sys.stderr)
        return None, 130


def _report(run: Callable, report: Callable[[dict], str]) -> tuple[dict | None, int]:
    """(result, exit code) of ``run()`` under ``_guarded``, its ``report`` printed when it ran."""
    result, code = _guarded(run)
    if not code:
        print(report(result))
    return result, code


def _suite(args) -> int:
    from medu_jax import suite

    def go():
        if args.model == "cnn":
            cfg = suite.cnn_config(quick=args.quick)
        else:
            cfg = suite.quick_config() if args.quick else suite.SuiteConfig()
        cfg = suite.with_options(cfg, args.medu, args.sign_flip_scale, args.min_ratio, args.methods, args.adaptive)
        if args.dataset and args.dataset not in cfg.datasets:
            raise ValueError(f"--dataset {args.dataset!r} is not in this suite's data sets {cfg.datasets}")
        wanted = {"dataset": [args.dataset] if args.dataset else None}
        seeds = tuple(dict.fromkeys(int(v) for v in args.seeds.split(","))) if args.seeds else ()
        if seeds and not any(v in cfg.seeds for v in seeds):
            # seeds none of which are the suite's: a suite of those seeds (fresh seeds, to confirm a result; give
            # it its own --out: the cells of a suite are reused only by a suite with the same seeds)
            cfg = dataclasses.replace(cfg, seeds=seeds)
        for key, field, kind in (("attack", "attacks", str), ("share", "shares", float), ("seed", "seeds", int)):
            given = getattr(args, field)
            if given:
                vals = [kind(v) for v in given.split(",")]
                bad = [v for v in vals if v not in getattr(cfg, field)]
                if bad:
                    raise ValueError(f"--{field} {bad} not in this suite's {field} {getattr(cfg, field)}")
                wanted[key] = vals
        if not args.report_only:
            def only(c):  # a subset of the cells; the config (and so a later full run's reuse) is unchanged
                return all(v is None or c[k] in v for k, v in wanted.items())

            suite.run_suite(cfg, args.out, only, progress=lambda m: print(m, flush=True))
        cells = suite.load_cells(args.out, cfg)
        if not cells:
            raise FileNotFoundError(f"no cells of this suite's config in {args.out!r} (run it without --report-only)")
        return suite.write_report(cells, args.out)

    paths, code = _guarded(go)
    if code:
        return code
    with open(paths["md"]) as f:
        print(f.read())
    for p in paths.values():
        print(f"wrote {p}")
    return 0


def _s3t(args) -> int:
    from medu_jax import s3t_experiment as X

    return _report(lambda: X.run_s3t(X.S3TConfig(
        dataset=args.dataset, data_path=args.data_path, shards=args.shards, slices=args.slices, orders=args.orders,
        deletions=args.deletions, seed=args.seed)), X.report)[1]


def _rum(args) -> int:
    from medu_jax import rum_experiment as X

    return _report(lambda: X.run_rum(X.RUMConfig(
        dataset=args.dataset, data_path=args.data_path, proxy=args.proxy, steps=args.steps, epochs=args.epochs,
        seed=args.seed)), X.report)[1]


def _zoga(args) -> int:
    from medu_jax import zoga_experiment as X

    return _report(lambda: X.run_sample_unlearning(X.SampleUnlearningConfig(
        dataset=args.dataset, data_path=args.data_path, steps=args.steps, ga_lr=args.ga_lr, q=args.q,
        rounds=args.rounds, seed=args.seed)), X.report)[1]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
