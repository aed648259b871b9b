"""Lossless entropy coding of the lattice code words, on the host, on the way into a History (opt-in).

The jitted encoder packs R-bit codes as bit-planes (``packing.pack_bits``): exactly R bits per entry, whatever
their distribution. With the rms scale and a step finer than the data, the codes are far from uniform (a
Gaussian group's codes peak at 0), and a fixed-rate code wastes the difference. ``lattice_coding(...,
entropy="ans")`` makes the History store each round's code words as one ANS stream instead
(``constriction``'s ``AnsCoder`` with a static categorical model: the round's histogram of code values), which
costs the empirical entropy of the codes plus a few bytes (measured: within 0.001 bit per entry; zstd on the
same codes, level 1, takes 0.1-0.6 bit more, see docs/codec.md). The jitted encode and its bits do not change:
coding runs on the NumPy record after the message reaches the host, and decoding gives back the exact words.

A coded array is uint32: [ANS, number of codes N, number of distinct code values m, the m code values
(increasing), their m counts, the ANS stream]. The model is the counts, so decoding rebuilds exactly the
encoder's model (constriction quantizes a float64 copy of the counts the same way on both sides). Where that
would not pay (codes close to uniform, e.g. the maxabs scale's, or a round too small for its model), the array is
[RAW, the packed words]: never more than 4 bytes above the packed words.
"""

from __future__ import annotations

import constriction
import numpy as np

from medu_jax.packing import check_bits

ENTROPY_CODERS = ("ans",)
RAW, ANS = 0, 1  # the first word of a coded array: its format
HEADER = 3  # words of an ANS array before its model: ANS, N, m


def check_entropy(entropy: str | None) -> str | None:
    """Validates an entropy coder name (None: the packed words are stored as they are)."""
    if entropy is not None and entropy not in ENTROPY_CODERS:
        raise ValueError(f"unknown entropy coder {entropy!r}: None or one of {ENTROPY_CODERS}")
    return entropy


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """NumPy ``packing.unpack_bits`` over all 32 W positions: uint32 words (..., bits, W) to codes (..., 32 W)
    as int32 (padding positions included, so that ``pack_codes`` gives back the very same words)."""
    bits = check_bits(bits)
    w = np.ascontiguousarray(words, dtype="<u4")
    if w.ndim < 2 or w.shape[-2] != bits:
        raise ValueError(f"packed words must be shaped (..., {bits}, W), got {w.shape}")
    planes = np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")  # (..., bits, 32 W)
    codes = np.zeros(planes.shape[:-2] + planes.shape[-1:], np.int32)
    for p in range(bits):
        codes |= planes[..., p, :].astype(np.int32) << p
    return codes


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``unpack_codes``: codes (..., 32 W) with values in [0, 2**bits) to uint32 words (..., bits, W)."""
    bits = check_bits(bits)
    c = np.asarray(codes)
    if c.shape[-1] % 32:
        raise ValueError(f"codes come in whole words of 32 entries, got {c.shape[-1]} per row")
    planes = ((c[..., None, :] >> np.arange(bits)[:, None]) & 1).astype(np.uint8)  # (..., bits, 32 W)
    packed = np.packbits(planes, axis=-1, bitorder="little")  # (..., bits, 4 W) bytes
    return np.ascontiguousarray(packed).view("<u4").astype(np.uint32)


def _model(counts: np.ndarray):
    # perfect=False: constriction's fast quantization of the probabilities (the same on both sides); set
    # explicitly, since constriction's default for this flag has changed across versions
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def encode_words(words: np.ndarray, bits: int) -> np.ndarray:
    """The packed code words (..., bits, W) as one ANS-coded uint32 array (see the module docstring)."""
    codes = unpack_codes(words, bits).reshape(-1)
    n = codes.shape[0]
    if n >= 2**32:
        raise ValueError(f"{n} code words in one array: at most 2**32 - 1 can be entropy coded at once")
    counts = np.bincount(codes, minlength=1)
    symbols = np.flatnonzero(counts)
    counts = counts[symbols]
    stream = np.zeros(0, np.uint32)
    if len(symbols) > 1:  # a single code value needs no stream: every entry is that value
        index = np.zeros(2**bits, np.int32)
        index[symbols] = np.arange(len(symbols), dtype=np.int32)
        coder = constriction.stream.stack.AnsCoder()
        coder.encode_reverse(index[codes], _model(counts))
        stream = coder.get_compressed()
    head = np.array([ANS, n, len(symbols)], np.uint32)
    coded = np.concatenate([head, symbols.astype(np.uint32), counts.astype(np.uint32), stream.astype(np.uint32)])
    if coded.nbytes >= words.nbytes + 4:
        return np.concatenate([np.array([RAW], np.uint32), np.ravel(words).astype(np.uint32)])
    return coded


def decode_words(coded: np.ndarray, bits: int, shape: tuple) -> np.ndarray:
    """The exact packed words (``shape`` = (..., bits, W), uint32) back from ``encode_words``' array; raises
    ValueError when the array is not such an array of that many words."""
    bits = check_bits(bits)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or shape[-2] != bits:
        raise ValueError(f"packed words must be shaped (..., {bits}, W), got {shape}")
    n = int(np.prod(shape[:-2], dtype=np.int64)) * 32 * shape[-1]
    a = np.asarray(coded)

    def bad(why: str):
        return ValueError(f"not an entropy-coded array of {n} {bits}-bit codes: {why}")

    if a.dtype != np.uint32 or a.ndim != 1 or a.shape[0] < 1:
        raise bad(f"got a {a.dtype} array of shape {a.shape}")
    if int(a[0]) == RAW:
        if a.shape[0] - 1 != n // 32 * bits:
            raise bad(f"it holds {a.shape[0] - 1} packed words")
        return a[1:].reshape(shape).copy()
    if int(a[0]) != ANS or a.shape[0] < HEADER:
        raise bad(f"format {int(a[0])}, this version reads {RAW} (packed words) and {ANS} (ANS)")
    if int(a[1]) != n:
        raise bad(f"it holds {int(a[1])} codes")
    m = int(a[2])
    if a.shape[0] < HEADER + 2 * m or m > 2**bits or (n > 0) != (m > 0):
        raise bad(f"its model of {m} code values does not fit")
    symbols = a[HEADER : HEADER + m].astype(np.int64)
    counts = a[HEADER + m : HEADER + 2 * m]
    stream = a[HEADER + 2 * m :]
    if np.any(np.diff(symbols) <= 0) or (m and symbols[-1] >= 2**bits) or np.any(counts == 0) \
            or int(np.sum(counts, dtype=np.int64)) != n:
        raise bad("its model is not a histogram of the codes")
    if m <= 1:
        if stream.size:
            raise bad("a stream follows a single code value")
        codes = np.full(n, symbols[0] if m else 0, np.int32)
    else:
        coder = constriction.stream.stack.AnsCoder(np.ascontiguousarray(stream))
        try:
            index = coder.decode(_model(counts), n)
        except ValueError as e:  # constriction's own check of the stream
            raise bad(str(e)) from e
        if not coder.is_empty():
            raise bad("words are left over after the last code")
        codes = symbols.astype(np.int32)[index]
    return pack_codes(codes.reshape(*shape[:-2], 32 * shape[-1]), bits)
