"""Ctrl-C during ``medu demo``: SIGINT at a random moment, N tries; counts exit codes (130 wanted, never a
signal such as SIGSEGV, which a JAX thread at interpreter shutdown can cause) and checks stderr has no traceback.

    python benchmarks/ctrl_c.py --tries 10            # SIGINT between 1 s and 25 s after the start
    python benchmarks/ctrl_c.py --tries 10 --store    # with --store (the store must keep its committed rounds)

Prints one line per try and a summary; exits 1 if any try did not exit 130 with a one-line message.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time


def one(delay: float, store: str | None, rounds: int) -> tuple[int, str]:
    cmd = [sys.executable, "-m", "medu_jax.cli", "demo", "--rounds", str(rounds), "--quiet"]
    if store:
        cmd += ["--store", store]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, err


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tries", type=int, default=10)
    p.add_argument("--min", type=float, default=1.0, help="earliest SIGINT (s after the start)")
    p.add_argument("--max", type=float, default=25.0, help="latest SIGINT (s after the start)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--store", action="store_true", help="run the demo with --store (a fresh folder per try)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    codes, bad = collections.Counter(), 0
    for i in range(a.tries):
        delay = rng.uniform(a.min, a.max)
        store = os.path.join(tempfile.mkdtemp(prefix="ctrl_c-"), "s") if a.store else None
        code, err = one(delay, store, a.rounds)
        name = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
        lines = [line for line in err.strip().splitlines() if line]
        clean = code == 130 and len(lines) == 1 and "Traceback" not in err
        bad += not clean
        codes[name] += 1
        print(f"try {i + 1}: SIGINT after {delay:.1f} s -> {name}; stderr {len(lines)} line(s)"
              + ("" if clean else f": {err.strip()[-400:]!r}"), flush=True)
        if store and os.path.exists(store):
            from medu_jax import store as S

            for name_ in sorted(os.listdir(store)):
                if not name_.startswith("."):
                    info = S.store_info(os.path.join(store, name_))
                    print(f"  store {name_}: {info.rounds} of {info.planned} rounds committed, readable", flush=True)
    print(f"{a.tries} tries: {dict(codes)}; {a.tries - bad} clean (exit 130, one line on stderr)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
