"""medu_jax: memory-efficient federated unlearning (MEDU) in JAX.

FedAvg keeps a lossy-compressed history of every user's updates (user sparsification, differential
thresholding, dithered lattice coding); unlearning replays that history without the removed users.
"""

from medu_jax import attacks, baselines, data, metrics, models, recovery, rum, s3t, store, suite, zoga
from medu_jax.compressors import (
    Compressor,
    Message,
    Stats,
    chain,
    check_updates,
    differential_threshold,
    error_feedback,
    identity,
    lattice_coding,
    medu,
    model_correction,
    user_sparsification,
)
from medu_jax.dither import QuantizerSpec, dequantize, entropy_clip, quantize
from medu_jax.fedavg import (ClientData, FedConfig, PackedClientData, RoundResult, ServerState, client_mesh, fed_round,
                             fed_rounds, init_server, recalibrate_state, server_update, shard_clients, train)
from medu_jax.objectives import Classifier, Objective, Regressor, from_linen, from_nnx
from medu_jax.history import History, compressor_key
from medu_jax.lattices import A2, D4, E8, Z, Lattice, get_lattice
from medu_jax.packing import pack_bits, unpack_bits
from medu_jax.store import HistoryFileError, load_history, save_history
from medu_jax.thresholding import block_threshold
from medu_jax.recovery import Recovery, adaptive_recovery, federaser, fedrecover, finetune_baseline, unlearn
from medu_jax.unlearn import corrected_replay, finetune, rebuild_error, replay

__version__ = "0.1.0"

__all__ = [
    "A2", "Classifier", "ClientData", "Objective", "PackedClientData", "Regressor", "RoundResult", "ServerState",
    "from_linen", "from_nnx", "init_server", "recalibrate_state", "server_update", "Recovery", "adaptive_recovery", "federaser", "fedrecover", "finetune_baseline", "recovery", "suite", "Compressor", "D4", "E8", "FedConfig", "History", "HistoryFileError", "Lattice", "Message", "QuantizerSpec",
    "Stats", "Z", "attacks", "baselines", "chain", "check_updates", "client_mesh", "compressor_key", "corrected_replay", "data", "dequantize",
    "block_threshold", "differential_threshold", "entropy_clip", "error_feedback", "fed_round", "fed_rounds", "finetune", "get_lattice", "rebuild_error", "identity", "lattice_coding", "load_history", "medu", "model_correction",
    "metrics", "models", "pack_bits", "quantize", "replay", "rum", "s3t", "save_history", "shard_clients", "store", "train", "unlearn", "unpack_bits", "user_sparsification", "zoga",
]
