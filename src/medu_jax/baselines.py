"""Crab (Jiang et al., 2024): selective storage and rollback, over the same (float32 or compressed) history.

The history keeps informative rounds and users with model checkpoints (``Selection``); unlearning rolls back
to the checkpoint before the removed users' influence started, then recovers with FedEraser's calibration
(``recovery.calibrated_replay``). FedRecover, FedEraser and fine-tuning live in ``medu_jax.recovery``. This is
the project's reading of the paper (only its abstract and code could be read).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from medu_jax.fedavg import ClientData, FedConfig, check_user_ids
from medu_jax.history import History
from medu_jax.recovery import Recovery, calibrated_replay
from medu_jax.unlearn import replay


def influence_start(history: History, remove: Iterable[int]) -> int:
    """Crab's rollback point: the first kept record of a round in which a removed user took part (the
    ``participants`` mask when the selection filtered users, else ``active``); ``num_rounds`` if none did."""
    removed = check_user_ids(remove, history.num_users)
    for i, r in enumerate(history.records):
        mask = np.unpackbits(r.get("participants", r["active"]))[: history.num_users].astype(bool)
        if mask[removed].any():
            return i
    return history.num_rounds


def crab(history: History, remove: Iterable[int], apply_fn, tx, data: ClientData, cfg: FedConfig,
         cal_steps: int = 2) -> Recovery:
    """Crab-style unlearning: roll back to the checkpoint before the removed users' influence started, then
    calibrated recovery over the kept rounds from there (build the history with Selection(checkpoints=True),
    optionally min_change / user_fraction for Crab's informative rounds and users)."""
    remove = list(remove)
    if not remove:
        raise ValueError("crab: the remove set is empty")
    start = influence_start(history, remove)
    if start == history.num_rounds:  # the removed users never mattered in the kept rounds
        return Recovery(replay(history, remove), 0, 0.0, 0, 0)
    return calibrated_replay(history, remove, apply_fn, tx, data, cfg, cal_steps, 1, start, history.checkpoint(start),
                             False, "crab")
