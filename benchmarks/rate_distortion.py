"""Rate-distortion of the dithered lattice codes on Gaussian vectors, against D(R) = sigma^2 2^(-2R).

For every lattice (Z, A2, D4, E8), bit width and scale rule, codes N(0, 1) vectors and reports the MSE
(relative to the input's variance) against the real stored bits per entry: the packed code words plus the
float32 scales (and the padding), divided by the number of entries; D(R) is evaluated at that real rate, and
the gap to it in dB is 10 log10(MSE / D(R)).

    python benchmarks/rate_distortion.py             # the table in docs/codec.md (about a minute on 2 cores)
    python benchmarks/rate_distortion.py --quick     # seconds: Z at 1 and 2 bits, three rules, 2^14 entries
    python benchmarks/rate_distortion.py --fit --n 32768 --lattices Z   # the clip search behind dither.FIT_CLIP

Rules (all available as options; the library default is "maxabs"):
  maxabs         s = max |x|, clip 1 (the default)
  maxabs-cover   s = max |x|, clip="cover" (the coarse cell holds the max-abs cube: no overload)
  rms            s = RMS, clip 3
  rms-fit        s = RMS, clip="fit" (the table fitted here)
  rms-fit-gain   s = RMS, clip="fit", gain="wiener" (decoder shrinkage 1 / (1 + error variance): biased)
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.dither import QuantizerSpec, dequantize, quantize
from medu_jax.packing import pack_bits

RULES = {
    "maxabs": dict(scale="maxabs"),
    "maxabs-cover": dict(scale="maxabs", clip="cover"),
    "rms": dict(scale="rms"),
    "rms-fit": dict(scale="rms", clip="fit"),
    "rms-fit-gain": dict(scale="rms", clip="fit", gain="wiener"),
}


def measure(spec: QuantizerSpec, x: jax.Array, seed: int = 1) -> tuple[float, float, int]:
    """(MSE / variance, stored bits per entry, overloaded blocks) of one vector x ~ N(0, 1)."""
    key = jax.random.key(seed)
    q = jax.jit(quantize, static_argnums=2)(x, key, spec)
    xh = jax.jit(dequantize, static_argnums=(3, 4))(q.codes, q.scales, key, spec, x.shape[0])
    xd, xhd = np.asarray(x, np.float64), np.asarray(xh, np.float64)
    mse = float(np.mean((xhd - xd) ** 2) / np.mean(xd**2))
    stored = pack_bits(q.codes, spec.bits).nbytes + q.scales.nbytes
    return mse, 8.0 * stored / x.shape[0], int(q.overload)


def gap_db(mse: float, rate: float) -> float:
    return 10.0 * math.log10(mse / 2.0 ** (-2.0 * rate))


def table(lattices, bit_widths, rules, n: int, group: int | None) -> list[dict]:
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    rows = []
    for lat in lattices:
        for bits in bit_widths:
            for rule in rules:
                spec = QuantizerSpec(lat, bits, group_size=group, **RULES[rule])
                mse, rate, over = measure(spec, x)
                rows.append(dict(lattice=lat, bits=bits, rule=rule, clip=round(float(spec.clip), 3), rate=rate,
                                 mse=mse, d_r=2.0 ** (-2 * rate), gap_db=gap_db(mse, rate), overload=over))
    return rows


def fit(lattices, bit_widths, n: int, group: int | None, gain: str | None) -> dict:
    """The clip (rms units) with the least MSE per lattice and bit width, on a grid of 0.25."""
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    best = {}
    for lat in lattices:
        for bits in bit_widths:
            grid = np.round(np.arange(1.0, 4.01, 0.25), 2)
            mses = [measure(QuantizerSpec(lat, bits, "rms", float(c), group, gain=gain), x)[0] for c in grid]
            i = int(np.argmin(mses))
            best.setdefault(lat, {})[bits] = (float(grid[i]), mses[i])
            print(f"{lat} {bits} bits: clip {grid[i]:.1f} mse {mses[i]:.4f} ({gap_db(mses[i], bits):+.2f} dB at R={bits})",
                  flush=True)
    return best


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Z at 1-2 bits, 2^14 entries: seconds")
    ap.add_argument("--fit", action="store_true", help="search the rms clip per lattice and bit width")
    ap.add_argument("--n", type=int, default=None, help="entries per vector (default 2^18, quick 2^14)")
    ap.add_argument("--group", type=int, default=None, help="entries per scale (default: one scale per vector)")
    ap.add_argument("--lattices", default=None, help="comma-separated subset, e.g. Z,E8")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    n = args.n or (2**14 if args.quick else 2**18)
    lattices = ["Z"] if args.quick else ["Z", "A2", "D4", "E8"]
    lattices = args.lattices.split(",") if args.lattices else lattices
    bit_widths = [1, 2] if args.quick else [1, 2, 3, 4]
    start = time.perf_counter()
    if args.fit:
        best = fit(lattices, bit_widths, n, args.group, "wiener")
        print(json.dumps({lat: {b: c for b, (c, _) in v.items()} for lat, v in best.items()}))
        return
    rules = ["maxabs", "rms", "rms-fit-gain"] if args.quick else list(RULES)
    rows = table(lattices, bit_widths, rules, n, args.group)
    print(f"Gaussian N(0,1), {n} entries per vector, "
          f"{'one scale per vector' if args.group is None else f'one scale per {args.group} entries'}; "
          "MSE relative to the variance; rate = stored bits per entry (codes + scales + padding)")
    print("| lattice | bits | rule | clip | rate | MSE | D(R) | gap dB | overload |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['lattice']} | {r['bits']} | {r['rule']} | {r['clip']:g} | {r['rate']:.4f} | {r['mse']:.4f} | "
              f"{r['d_r']:.4f} | {r['gap_db']:+.2f} | {r['overload']} |")
    print(f"({time.perf_counter() - start:.1f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
