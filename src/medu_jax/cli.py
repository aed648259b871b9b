"""The ``medu`` command: ``medu demo`` and ``medu run --config file.json``.

Both train with malicious users, unlearn them from every history variant, retrain from scratch as the
reference, and print one Markdown comparison table; ``--out DIR`` also writes table.csv, result.json and a
plot of accuracy and attack success against stored bytes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from medu_jax.experiment import ExperimentConfig, format_table, run_experiment, to_json


def _write_outputs(result: dict, out: str) -> list[str]:
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
    paths.append(_plot(result, os.path.join(out, "accuracy_vs_bytes.png")))
    return paths


def _plot(result: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["bytes"]]
    ref = next(r for r in result["rows"] if r["method"].startswith("retrain"))
    fig, ax = plt.subplots(figsize=(6, 4))
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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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


def main(argv: list[str] | None = None) -> int:
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
    su.add_argument("--dataset", help="run only the cells of this data set (digits or mnist1d)")
    su.add_argument("--report-only", action="store_true", help="summarize the cells already in --out, run none")
    args = parser.parse_args(argv)
    if args.command == "suite":
        return _suite(args)
    if args.command == "s3t":
        return _s3t(args)
    if args.command == "zoga":
        return _zoga(args)
    if args.command == "rum":
        return _rum(args)

    def experiment():
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

    result, code = _guarded(experiment)
    if code:
        return code
    print(format_table(result))
    print(
        f"\nfloat32 history would take {result['float32_bytes']:,} bytes; training took {result['train_seconds']:.1f} s"
        f"; lattice overloads: {result['overload']}; rejected non-finite updates: {result['rejected_updates']}"
    )
    for name, h in result["histories"].items():
        print(f"history {name}: rebuild error {100 * h['rebuild_error']:.2f}% (replay with nobody removed vs the "
              f"trained model); rows stored {100 * h['stored']:.0f}%, sparsified {100 * h['sparsified']:.0f}%, "
              f"thresholded {100 * h['thresholded']:.0f}%")
    if args.out:
        paths, code = _guarded(_write_outputs, result, args.out)
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


def _suite(args) -> int:
    from medu_jax import suite

    def go():
        cfg = suite.quick_config() if args.quick else suite.SuiteConfig()
        if args.dataset and args.dataset not in cfg.datasets:
            raise ValueError(f"--dataset {args.dataset!r} is not in this suite's data sets {cfg.datasets}")
        if not args.report_only:
            only = (lambda c: c["dataset"] == args.dataset) if args.dataset else None
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
    from medu_jax.experiment import S3TConfig, format_s3t_table, run_s3t

    result, code = _guarded(lambda: run_s3t(S3TConfig(
        dataset=args.dataset, data_path=args.data_path, shards=args.shards, slices=args.slices, orders=args.orders,
        deletions=args.deletions, seed=args.seed)))
    if code:
        return code
    print(format_s3t_table(result))
    return 0


def _rum(args) -> int:
    from medu_jax.experiment import RUMConfig, format_rum_table, run_rum

    result, code = _guarded(lambda: run_rum(RUMConfig(
        dataset=args.dataset, data_path=args.data_path, proxy=args.proxy, steps=args.steps, epochs=args.epochs,
        seed=args.seed)))
    if code:
        return code
    print(format_rum_table(result))
    print(f"\nforget set: {result['forget']} samples, memorization groups {result['groups']}")
    return 0


def _zoga(args) -> int:
    from medu_jax.experiment import SampleUnlearningConfig, format_sample_table, run_sample_unlearning

    result, code = _guarded(lambda: run_sample_unlearning(SampleUnlearningConfig(
        dataset=args.dataset, data_path=args.data_path, steps=args.steps, ga_lr=args.ga_lr, q=args.q,
        rounds=args.rounds, seed=args.seed)))
    if code:
        return code
    print(format_sample_table(result))
    m = result["memory"]
    print(f"\nremoved users {result['malicious']} with the MEDU history, then forgot {result['forget_samples']} "
          f"samples of user {result['config']['user']}; peak step memory first-order / ZO = "
          f"{m['ratio']:.2f}x (XLA memory analysis)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
