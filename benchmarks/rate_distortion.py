"""Rate-distortion of the dithered lattice codes on Gaussian vectors, against D(R) = sigma^2 2^(-2R).

For every lattice (Z, A2, D4, E8), bit width and scale rule, codes N(0, 1) vectors and reports the MSE
(relative to the input's variance) against the real stored bits per entry: the packed code words plus the
float32 scales (and the padding), divided by the number of entries; D(R) is evaluated at that real rate, and
the gap to it in dB is 10 log10(MSE / D(R)).

    python benchmarks/rate_distortion.py             # the table in docs/codec.md (about a minute on 2 cores)
    python benchmarks/rate_distortion.py --quick     # seconds: Z at 1 and 2 bits, three rules, 2^14 entries
    python benchmarks/rate_distortion.py --fit --n 32768 --lattices Z   # the clip search behind dither.FIT_CLIP
    python benchmarks/rate_distortion.py --entropy --n 65536  # entropy-coded rows (lattice_coding(entropy="ans"))
    python benchmarks/rate_distortion.py --codecs --n 262144  # lossless coders of the stored codes, side by side
    python benchmarks/rate_distortion.py --history            # real updates: a digits run's histories, packed / ANS

Rules (all available as options; the library default is "maxabs"):
  maxabs         s = max |x|, clip 1 (the default)
  maxabs-cover   s = max |x|, clip="cover" (the coarse cell holds the max-abs cube: no overload)
  rms            s = RMS, clip 3
  rms-fit        s = RMS, clip="fit" (the table fitted here)
  rms-fit-gain   s = RMS, clip="fit", gain="wiener" (decoder shrinkage 1 / (1 + error variance): biased)

Entropy-coded rows (--entropy): the same codes stored as History records of lattice_coding(..., entropy="ans")
store them (medu_jax.entropy: one ANS stream per vector with its model); rate = that array's bytes + the scales.
  <rule>+ans     the fixed-rate rule's codes, ANS coded (maxabs, rms-fit and rms-fit-gain)
  Z8-ans@r       Z, 8-bit code words, rms, clip=dither.entropy_clip(r, 8): a step whose entropy is r bits
  Z8-ans-gain@r  the same with gain="wiener"
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numcodecs
import numpy as np

from medu_jax.dither import QuantizerSpec, dequantize, entropy_clip, quantize
from medu_jax.entropy import decode_words, encode_words, pack_codes, unpack_codes
from medu_jax.packing import pack_bits

RULES = {
    "maxabs": dict(scale="maxabs"),
    "maxabs-cover": dict(scale="maxabs", clip="cover"),
    "rms": dict(scale="rms"),
    "rms-fit": dict(scale="rms", clip="fit"),
    "rms-fit-gain": dict(scale="rms", clip="fit", gain="wiener"),
}


def measure(spec: QuantizerSpec, x: jax.Array, seed: int = 1, entropy: bool = False) -> tuple[float, float, int]:
    """(MSE / variance, stored bits per entry, overloaded blocks) of one vector x ~ N(0, 1); with ``entropy``,
    the codes are stored as ``entropy.encode_words`` codes them (checked lossless here)."""
    key = jax.random.key(seed)
    q = jax.jit(quantize, static_argnums=2)(x, key, spec)
    xh = jax.jit(dequantize, static_argnums=(3, 4))(q.codes, q.scales, key, spec, x.shape[0])
    xd, xhd = np.asarray(x, np.float64), np.asarray(xh, np.float64)
    mse = float(np.mean((xhd - xd) ** 2) / np.mean(xd**2))
    words = np.asarray(pack_bits(q.codes, spec.bits))
    if entropy:
        coded = encode_words(words, spec.bits)
        assert np.array_equal(decode_words(coded, spec.bits, words.shape), words)
        words = coded
    stored = words.nbytes + q.scales.nbytes
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


def entropy_table(n: int, group: int | None, rates=(1, 2, 3, 4), width: int = 8) -> list[dict]:
    """Entropy-coded rows: the maxabs and rms-fit(-gain) codes of Z and A2 at 1-4 bits ANS coded, and Z codes ``width``
    bits wide at the step of each target rate (``dither.entropy_clip``), with and without the Wiener gain."""
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    rows = []

    def row(lat: str, bits: int, rule: str, spec: QuantizerSpec):
        mse, rate, over = measure(spec, x, entropy=True)
        rows.append(dict(lattice=lat, bits=bits, rule=rule, clip=round(float(spec.clip), 3), rate=rate,
                         mse=mse, d_r=2.0 ** (-2 * rate), gap_db=gap_db(mse, rate), overload=over))

    for lat in ("Z", "A2"):
        for bits in (1, 2, 3, 4):
            for rule in ("maxabs", "rms-fit", "rms-fit-gain"):
                row(lat, bits, f"{rule}+ans", QuantizerSpec(lat, bits, group_size=group, **RULES[rule]))
    for r in rates:
        for gain in (None, "wiener"):
            row("Z", width, f"Z{width}-ans{'-gain' if gain else ''}@{r:g}",
                QuantizerSpec("Z", width, "rms", entropy_clip(r, width), group, gain=gain))
    return rows


def _best(fn, repeat: int = 3) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


CODEC_SETTINGS = {  # real stored codes: (lattice, bits, QuantizerSpec options)
    "A2 2 maxabs (default)": ("A2", 2, dict(scale="maxabs")),
    "Z 2 rms-fit": ("Z", 2, dict(scale="rms", clip="fit")),
    "A2 3 rms-fit": ("A2", 3, dict(scale="rms", clip="fit")),
    "Z 4 rms-fit": ("Z", 4, dict(scale="rms", clip="fit")),
    "Z8 @2 (entropy_clip)": ("Z", 8, dict(scale="rms", clip=None, rate=2.0)),
}


def codecs(n: int) -> list[dict]:
    """Lossless coders of the packed code words (words -> stored bytes -> the same words), side by side:
    none (the packed words), zstd level 1 on the packed words (what the store's frames do), zstd 1/19 and LZMA
    on the codes unpacked to one byte each, and ANS (``entropy.encode_words``). Throughput in millions of
    entries per second, end to end (unpacking and packing on the host included), best of 3."""
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)

    def bytewise(codec):
        return (lambda w, b: codec.encode(unpack_codes(w, b).astype(np.uint8)),
                lambda blob, b, shape: pack_codes(np.frombuffer(codec.decode(blob), np.uint8).reshape(
                    *shape[:-2], 32 * shape[-1]).astype(np.int32), b))

    z1, z19, lzma = numcodecs.Zstd(level=1), numcodecs.Zstd(level=19), numcodecs.LZMA()
    coders = {
        "none (packed words)": (lambda w, b: w.copy(), lambda c, b, shape: c.copy()),
        "zstd-1 packed (the store)": (lambda w, b: z1.encode(w),
                                      lambda c, b, shape: np.frombuffer(z1.decode(c), np.uint32).reshape(shape)),
        "zstd-1 bytes": bytewise(z1),
        "zstd-19 bytes": bytewise(z19),
        "lzma bytes": bytewise(lzma),
        "ans (medu_jax.entropy)": (encode_words, decode_words),
    }
    rows = []
    for name, (lat, bits, opts) in CODEC_SETTINGS.items():
        opts = dict(opts)
        rate = opts.pop("rate", None)
        if rate is not None:
            opts["clip"] = entropy_clip(rate, bits)
        spec = QuantizerSpec(lat, bits, **opts)
        q = jax.jit(quantize, static_argnums=2)(x, jax.random.key(1), spec)
        words = np.asarray(pack_bits(q.codes, bits))[None]  # one row, as in a record
        counts = np.bincount(np.asarray(q.codes, np.int64))
        p = counts[counts > 0] / counts.sum()
        for cname, (enc, dec) in coders.items():
            t_enc, blob = _best(lambda: enc(words, bits))
            t_dec, back = _best(lambda: dec(blob, bits, words.shape))
            assert np.array_equal(back, words), (name, cname)
            rows.append(dict(setting=name, codec=cname, entropy=float(-np.sum(p * np.log2(p))),
                             bits_per_entry=8.0 * len(memoryview(blob).cast("B")) / n,
                             enc_meps=n / t_enc / 1e6, dec_meps=n / t_dec / 1e6))
    return rows


def histories(rounds: int, users: int) -> list[dict]:
    """Real stored codes: one digits run (MLP 32, Dir(0.3)) recorded by MEDU's chain (keep 0.5 of the users,
    tau 0.3) with several coders side by side, packed and entropy coded; the History's own bytes (its ratio to
    float32), the mean relative squared error of the decoded updates, and the host time of coding into the
    History (all rounds) and of decoding it back (``History.payload``)."""
    import optax

    import medu_jax as mj
    from medu_jax.compressors import chain, differential_threshold, user_sparsification

    ds = mj.data.load_digits(0)
    clients = mj.data.make_clients(ds, users, seed=0, alpha=0.3)
    model = mj.models.MLP((32,), ds.num_classes)
    params0 = model.init(jax.random.key(0), jnp.zeros((1, 64)))
    cfg = mj.FedConfig(rounds=rounds, local_steps=5, batch_size=16, seed=1)
    coders = {
        "A2 2 maxabs (the default)": mj.lattice_coding("A2", 2),
        "A2 2 maxabs + ans": mj.lattice_coding("A2", 2, entropy="ans"),
        "Z 2 rms-fit + ans": mj.lattice_coding("Z", 2, "rms", "fit", entropy="ans"),
        "Z8 @2 + ans": mj.lattice_coding("Z", 8, "rms", entropy_clip(2.0, 8), entropy="ans"),
        "Z8 @1 gain + ans": mj.lattice_coding("Z", 8, "rms", entropy_clip(1.0, 8), gain="wiener", entropy="ans"),
    }
    comps = {name: chain(user_sparsification(0.5), differential_threshold(0.3), c) for name, c in coders.items()}
    run = mj.train(model.apply, optax.sgd(0.1), params0, clients, cfg, comps)
    rows = []
    for name, hist in run.histories.items():
        msgs = hist.expand()
        t = time.perf_counter()
        hist.payload()
        t_dec = time.perf_counter() - t
        t = time.perf_counter()
        copy = type(hist)(hist.compressor, hist.like, hist.seed, hist.params0, hist.weights)
        for i in range(hist.num_rounds):
            copy.append(jax.tree.map(lambda a: a[i], msgs), i)
        t_enc = time.perf_counter() - t
        assert copy.nbytes == hist.nbytes
        summary = hist.summary()
        rows.append(dict(history=name, bytes=summary["bytes"], ratio=summary["ratio"],
                         rel_error=float(np.mean(run.log["rel_error"][name])), append_s=t_enc, payload_s=t_dec))
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


def report(title: str, head: list, cells: list, rows: list[dict], start: float, json_path: str | None) -> None:
    """Prints a table (the title line, then Markdown) and the elapsed time; writes the rows to ``json_path``."""
    print(title)
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for c in cells:
        print("| " + " | ".join(str(x) for x in c) + " |")
    print(f"({time.perf_counter() - start:.1f} s)")
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="Z at 1-2 bits, 2^14 entries: seconds")
    ap.add_argument("--fit", action="store_true", help="search the rms clip per lattice and bit width")
    ap.add_argument("--n", type=int, default=None, help="entries per vector (default 2^18, quick 2^14)")
    ap.add_argument("--group", type=int, default=None, help="entries per scale (default: one scale per vector)")
    ap.add_argument("--lattices", default=None, help="comma-separated subset, e.g. Z,E8")
    ap.add_argument("--entropy", action="store_true", help="the entropy-coded rows (ANS-coded stored codes)")
    ap.add_argument("--codecs", action="store_true", help="lossless coders of the stored codes, side by side")
    ap.add_argument("--history", action="store_true", help="real updates: a digits run's histories, packed and ANS")
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    n = args.n or (2**14 if args.quick else 2**18)
    if args.history:
        start = time.perf_counter()
        rows = histories(30, 20)
        report("digits, 20 users Dir(0.3), 30 rounds; every chain: keep 0.5 of the users, tau 0.3, then the coder",
               ["coder", "bytes", "ratio to float32", "mean rel. sq. error", "append (s)", "payload (s)"],
               [[r["history"], r["bytes"], f"{r['ratio']:.1f}x", f"{r['rel_error']:.4f}", f"{r['append_s']:.2f}",
                 f"{r['payload_s']:.2f}"] for r in rows], rows, start, args.json)
        return
    if args.codecs:
        start = time.perf_counter()
        rows = codecs(n)
        report(f"Lossless coding of the packed code words of one N(0,1) vector of {n} entries; bits per stored "
               "entry (codes only, model and headers included) and end-to-end throughput (M entries/s, best of 3)",
               ["codes", "entropy", "coder", "bits/entry", "encode", "decode"],
               [[r["setting"], f"{r['entropy']:.3f}", r["codec"], f"{r['bits_per_entry']:.3f}",
                 f"{r['enc_meps']:.0f}", f"{r['dec_meps']:.0f}"] for r in rows], rows, start, args.json)
        return
    lattices = ["Z"] if args.quick else ["Z", "A2", "D4", "E8"]
    lattices = args.lattices.split(",") if args.lattices else lattices
    bit_widths = [1, 2] if args.quick else [1, 2, 3, 4]
    start = time.perf_counter()
    if args.fit:
        best = fit(lattices, bit_widths, n, args.group, "wiener")
        print(json.dumps({lat: {b: c for b, (c, _) in v.items()} for lat, v in best.items()}))
        return
    rules = ["maxabs", "rms", "rms-fit-gain"] if args.quick else list(RULES)
    rows = entropy_table(n, args.group) if args.entropy else table(lattices, bit_widths, rules, n, args.group)
    report(f"Gaussian N(0,1), {n} entries per vector, "
           f"{'one scale per vector' if args.group is None else f'one scale per {args.group} entries'}; "
           "MSE relative to the variance; rate = stored bits per entry (codes + scales + padding)",
           ["lattice", "bits", "rule", "clip", "rate", "MSE", "D(R)", "gap dB", "overload"],
           [[r["lattice"], r["bits"], r["rule"], f"{r['clip']:g}", f"{r['rate']:.4f}", f"{r['mse']:.4f}",
             f"{r['d_r']:.4f}", f"{r['gap_db']:+.2f}", r["overload"]] for r in rows], rows, start, args.json)


if __name__ == "__main__":
    main()
