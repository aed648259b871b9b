"""Data sets that need no download, a loader for local MNIST-style files, and client partitions.

Every data set is a ``Dataset`` of float32 features and int32 labels. Partitions (IID, Dirichlet non-IID)
draw their randomness from jax.random keys, and produce static-shaped ``ClientData`` (padded, with counts).
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.fedavg import ClientData, PackedClientData, pad_shards


class Dataset(NamedTuple):
    """A train/test split: x float32 (n, ...), y int32 (n,)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str = ""


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, name: str) -> Dataset:
    perm = np.asarray(jax.random.permutation(jax.random.key(seed), len(y)))
    n_test = int(round(test_fraction * len(y)))
    te, tr = perm[:n_test], perm[n_test:]
    x, y = x.astype(np.float32), y.astype(np.int32)
    return Dataset(x[tr], y[tr], x[te], y[te], int(y.max()) + 1, name)


def load_digits(seed: int = 0, test_fraction: float = 0.2, flatten: bool = True) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, shipped with the package), values in [0, 1]: 64 features, or with
    ``flatten=False`` images of shape (8, 8, 1) (the same values and split, for a convolutional net)."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = d.data / 16.0 if flatten else d.images.reshape(-1, 8, 8, 1) / 16.0
    return _split(x, d.target, test_fraction, seed, "digits")


def load_mnist1d(num_samples: int = 4000, seed: int = 0) -> Dataset:
    """MNIST-1D (Greydanus 2020), generated offline by the mnist1d package: 40 features, 10 classes."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("mnist1d is not installed: pip install mnist1d (or medu_jax[data])") from e
    args = get_dataset_args()
    args.num_samples, args.seed = int(num_samples), int(seed)
    d = make_dataset(args)
    return Dataset(
        d["x"].astype(np.float32), d["y"].astype(np.int32), d["x_test"].astype(np.float32),
        d["y_test"].astype(np.int32), 10, "mnist1d",
    )


def _read_idx(path: str) -> np.ndarray:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    shape = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: IDX header says shape {shape} but the file holds {body.size} values (truncated?)")
    return body.reshape(shape)


def load_mnist(path: str, flatten: bool = True) -> Dataset:
    """MNIST or Fashion-MNIST from local files: a folder of the four IDX files (.gz or not) or one .npz.
    Images come flattened (N, 784), or with ``flatten=False`` as stored ((N, 28, 28) for MNIST).

    The .npz needs x_train, y_train, x_test, y_test (as in keras' mnist.npz); it is read without pickle.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"MNIST data not found at {path!r}: give a folder of IDX files or an .npz file")
    if os.path.isdir(path):
        names = {
            "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
            "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
        }
        arrays = {}
        for key, stem in names.items():
            cands = [os.path.join(path, stem + ext) for ext in ("", ".gz")]
            found = [c for c in cands if os.path.exists(c)]
            if not found:
                raise FileNotFoundError(f"{path!r} lacks {stem}[.gz] (need the four MNIST IDX files)")
            arrays[key] = _read_idx(found[0])
    else:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in z.files]
            if missing:
                raise ValueError(f"{path!r} lacks arrays {missing}; it has {z.files}")
            arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    prep = (lambda a: a.reshape(len(a), -1)) if flatten else (lambda a: a)
    return Dataset(
        prep(arrays["x_train"]).astype(np.float32) / 255.0, arrays["y_train"].astype(np.int32),
        prep(arrays["x_test"]).astype(np.float32) / 255.0, arrays["y_test"].astype(np.int32),
        int(arrays["y_train"].max()) + 1, "mnist",
    )


DATASETS = ("digits", "mnist1d", "mnist")


def check_dataset(dataset: str, data_path: str | None) -> None:
    """Validates a data set choice (shared by every experiment's config)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {DATASETS}")
    if dataset == "mnist" and not data_path:
        raise ValueError("dataset 'mnist' needs data_path (--data-path): a folder of the four IDX files or an .npz")


def load_dataset(dataset: str, seed: int = 0, data_path: str | None = None, mnist1d_samples: int = 4000,
                 flatten: bool = True) -> Dataset:
    """A data set by its name in ``DATASETS``, as the experiments' configs name it (``data_path`` for mnist).
    ``flatten=False``: digits and mnist as images (for a convolutional net); mnist1d has no image form."""
    check_dataset(dataset, data_path)
    if dataset == "digits":
        return load_digits(seed, flatten=flatten)
    if dataset == "mnist1d":
        if not flatten:
            raise ValueError("mnist1d is a 1-D signal, not an image: use flatten=True (an MLP) or digits/mnist")
        return load_mnist1d(mnist1d_samples, seed)
    return load_mnist(data_path, flatten=flatten)


def partition_iid(num_samples: int, num_clients: int, key: jax.Array) -> list[np.ndarray]:
    """Indices of a uniform random split into near-equal client shards."""
    perm = np.asarray(jax.random.permutation(key, num_samples))
    return [np.sort(s) for s in np.array_split(perm, num_clients)]


def partition_dirichlet(labels: np.ndarray, num_clients: int, alpha: float, key: jax.Array) -> list[np.ndarray]:
    """Non-IID split: each class is spread over clients with proportions ~ Dirichlet(alpha)."""
    if not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be positive, got {alpha!r}")
    labels = np.asarray(labels)
    shards: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        kc = jax.random.fold_in(key, int(c))
        idx = np.asarray(labels == c).nonzero()[0]
        idx = idx[np.asarray(jax.random.permutation(jax.random.fold_in(kc, 0), len(idx)))]
        p = np.asarray(jax.random.dirichlet(jax.random.fold_in(kc, 1), jnp.full((num_clients,), alpha)), np.float64)
        cuts = (np.cumsum(p)[:-1] * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            shards[k].extend(part.tolist())
    return [np.sort(np.asarray(s, np.int64)) for s in shards]


def _label_dtype(y: np.ndarray):
    """int32 for integer labels (classification), float32 for real targets (regression)."""
    y = np.asarray(y)
    if np.issubdtype(y.dtype, np.integer) or y.dtype == bool:
        return np.int32
    if np.issubdtype(y.dtype, np.floating):
        return np.float32
    raise TypeError(f"labels must be integers or real numbers, got dtype {y.dtype}")


def to_client_data(x: np.ndarray, y: np.ndarray, shards: list[np.ndarray]) -> ClientData:
    """Pads client shards to a common length into static-shaped ClientData (n holds the true counts). Labels
    keep their kind: integers become int32, real targets float32 (see ``from_clients`` for no padding)."""
    x, y = np.asarray(x), np.asarray(y)
    return pad_shards(x, y, shards, np.float32, _label_dtype(y))


def make_clients(ds, num_clients: int, seed: int = 0, alpha: float | None = None,
                 packed: bool = False) -> ClientData | PackedClientData:
    """Splits a data set's training part (a ``Dataset`` or a tuple (x, y)) over clients: IID (alpha None) or
    Dirichlet(alpha), padded (``ClientData``) or, with ``packed``, without padding (``PackedClientData``)."""
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    x, y = (ds.x_train, ds.y_train) if isinstance(ds, Dataset) else _pair(ds, "make_clients")
    key = jax.random.fold_in(jax.random.key(seed), 7)
    if alpha is None:
        shards = partition_iid(len(y), num_clients, key)
    else:
        shards = partition_dirichlet(y, num_clients, alpha, key)
    if packed:
        return from_clients([(x[s], y[s]) for s in shards])
    return to_client_data(x, y, shards)


def _pair(xy, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) as NumPy arrays, checked to hold the same number of samples."""
    if not isinstance(xy, (tuple, list)) or len(xy) != 2:
        raise TypeError(f"{what}: expected (x, y) arrays, got {type(xy).__name__}")
    x, y = np.asarray(xy[0]), np.asarray(xy[1])
    if x.shape[:1] != y.shape[:1]:
        raise ValueError(f"{what}: x has {x.shape[:1]} samples, y {y.shape[:1]}")
    return x, y


def from_clients(clients) -> PackedClientData:
    """Client data already split per client, without padding: a list of (x, y) pairs (client k = position k)
    or a dict {name: (x, y)} (clients in the dict's order). Arrays are anything NumPy reads: NumPy, JAX, a
    Hugging Face dataset's columns (``ds.with_format("numpy")``), ``tfds.as_numpy`` batches. Samples are stored
    back to back (memory = the samples themselves; the padded ``ClientData`` holds n_max per client)."""
    items = list(clients.values()) if isinstance(clients, dict) else list(clients)
    if not items:
        raise ValueError("from_clients: no clients")
    pairs = [_pair(c, f"from_clients (client {i})") for i, c in enumerate(items)]
    shapes = {(x.shape[1:], y.shape[1:]) for x, y in pairs}
    if len(shapes) > 1:
        raise ValueError(f"from_clients: clients' samples differ in shape: {sorted(shapes)}")
    kinds = {_label_dtype(y) for _, y in pairs if len(y)}
    if len(kinds) > 1:
        raise TypeError("from_clients: some clients have integer labels, others real ones")
    n = np.asarray([len(y) for _, y in pairs], np.int32)
    offset = np.concatenate([[0], np.cumsum(n)[:-1]]).astype(np.int32)
    x = np.concatenate([x for x, _ in pairs]).astype(np.float32)
    y = np.concatenate([y for _, y in pairs]).astype(kinds.pop() if kinds else np.int32)
    if not len(y):
        raise ValueError("from_clients: no client has a sample")
    return PackedClientData(jnp.asarray(x), jnp.asarray(y), jnp.asarray(n), jnp.asarray(offset))
