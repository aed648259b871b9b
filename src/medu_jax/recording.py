"""Recording a run: the histories that consume each round's compressed messages, host-side selections
(FedEraser's interval, Crab's informative rounds and users) and the run's log. ``fedavg.train`` composes the
compiled rounds, a ``Recorder`` and the stores."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from medu_jax.history import History, Selection, compressor_key
from medu_jax.trees import relative_distance, tree_norm

PyTree = Any


def rel_error(stats) -> jax.Array:
    """A round's relative squared compression error: sum ||decoded - update||^2 / sum ||update||^2."""
    return jnp.sum(stats.sq_error) / jnp.maximum(jnp.sum(stats.sq_norm), 1e-30)


def to_host(tree: PyTree) -> PyTree:
    """``jax.device_get``; arrays that span other processes' devices (a multi-process run's sharded outputs) are
    gathered first (``process_allgather``: a collective, so every process must call it at the same point)."""
    if all(getattr(a, "is_fully_addressable", True) for a in jax.tree.leaves(tree)):
        return jax.device_get(tree)
    from jax.experimental.multihost_utils import process_allgather

    return jax.tree.map(lambda a: process_allgather(a, tiled=True) if not getattr(a, "is_fully_addressable", True)
                        else jax.device_get(a), tree)


def _select(sel: Selection, t: int, prev: PyTree, new: PyTree, ups: PyTree, active, last: PyTree | None):
    """The users round t keeps under ``sel`` ((K,) bool), or None when the round is not kept."""
    if t % sel.every:
        return None
    if sel.min_change > 0 and last is not None:
        if relative_distance(prev, last) < sel.min_change:
            return None
    active = np.asarray(active, bool)
    if sel.user_fraction >= 1.0 or not active.any():
        return jnp.asarray(active)
    k = active.shape[0]
    flat = np.concatenate([np.asarray(u, np.float64).reshape(k, -1) for u in jax.tree.leaves(ups)], axis=1)
    g = np.concatenate([np.ravel(np.asarray(a, np.float64) - np.asarray(b, np.float64))
                        for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(prev))])
    cos = flat @ g / (np.linalg.norm(flat, axis=1) * np.linalg.norm(g) + 1e-30)
    n = max(1, int(np.ceil(sel.user_fraction * active.sum())))
    keep = np.argsort(np.where(active, -cos, np.inf), kind="stable")[:n]
    out = np.zeros(k, bool)
    out[keep] = True
    return jnp.asarray(out & active)



class Recorder:
    """One History per compressor, the compressors' closed-loop states and the log of a run.

    Full histories are encoded inside the compiled rounds (``scanned``); histories with a ``Selection`` are
    chosen and encoded on the host after each round (``partial``: the rounds then run one per call).
    """

    def __init__(self, params0: PyTree, data, cfg, compressors: dict, selections: dict, server_tx=None,
                 model_state=None):
        k = data.num_clients
        unknown = sorted(set(selections) - set(compressors))
        if unknown:
            raise ValueError(f"selections for unknown histories {unknown}; histories are {sorted(compressors)}")
        for name, comp in compressors.items():  # (a server optimizer is refused by fed_rounds)
            if comp.correction is not None and name in selections and not selections[name].keeps_all:
                raise ValueError(f"history {name!r}: model_correction needs every round (a correction carries the "
                                 f"rounds before it); it has {selections[name]}: use a compressor without it "
                                 "(e.g. medu(correction=False))")
        like = jax.tree.map(lambda p: jnp.zeros((k, *jnp.shape(p)), jnp.result_type(p)), params0)
        self.compressors, self.seed = compressors, cfg.seed
        self.states = {name: comp.init(like) for name, comp in compressors.items()}
        self.histories = {
            name: History(comp, self.states[name]["like"].value, cfg.seed, jax.device_get(params0),
                          np.asarray(data.n, np.float32), cfg.server_lr, server_tx=server_tx,
                          model_state0=model_state)
            for name, comp in compressors.items()}
        for name, sel in selections.items():
            self.histories[name].selection = sel
        self.log = {"loss": [], "rejected": [], "overload": {n: [] for n in compressors}, "rel_error": {n: [] for n in compressors},
                    "model_gap": {n: [] for n in compressors if compressors[n].correction is not None}}
        self.partial = [n for n, h in self.histories.items() if not h.selection.keeps_all]
        self.scanned = tuple(n for n in compressors if n not in self.partial)
        self.per_round = bool(self.partial)  # a host-side choice after every round
        self._encoders = {n: jax.jit(compressors[n].encode) for n in self.partial}
        self._last_kept: dict = {name: None for name in compressors}
        self.entered = 0  # updates that entered the aggregate

    @property
    def scanned_histories(self) -> list[History]:
        return [self.histories[n] for n in self.scanned]

    @property
    def scanned_states(self) -> tuple:
        return tuple(self.states[n] for n in self.scanned)

    @property
    def scanned_compressors(self) -> tuple:
        return tuple(self.compressors[n] for n in self.scanned)

    def record_block(self, t0: int, n: int, states: tuple, out, offloaded=frozenset()):
        """Appends a block of ``n`` rounds (``fed_rounds``' outputs, one transfer to the host) to the full
        histories and the log; yields (name, round, record) for the stores. ``offloaded`` histories keep no
        record in memory."""
        self.states.update(zip(self.scanned, states))
        host = to_host(out._replace(updates=None))  # the updates stay on the device
        self.entered += int(np.sum(host.active))
        for i in range(n):
            self.log["rejected"].append(np.flatnonzero(host.rejected[i]).tolist())
            self.log["loss"].append(float(host.loss[i]))
            for j, name in enumerate(self.scanned):
                record = self.histories[name].append(jax.tree.map(lambda a: a[i], host.messages[j]), t0 + i,
                                                     keep=name not in offloaded)
                self.log["overload"][name].append(int(host.overload[j][i]))
                self.log["rel_error"][name].append(float(host.rel_error[j][i]))
                if name in self.log["model_gap"]:
                    self.log["model_gap"][name].append(float(host.model_gap[j][i]))
                yield name, t0 + i, record

    def continue_from(self, result, cfg):
        """Takes over a previous ``train`` result of the same run (its histories, compressor states and log) and
        returns its server state, so training continues where it stopped."""
        if result.server is None or result.codec_states is None:
            raise ValueError("start= needs a TrainResult returned by train")
        if set(result.histories) != set(self.histories):
            raise ValueError(f"start= holds histories {sorted(result.histories)}, this run {sorted(self.histories)}")
        if int(result.server.seed) != cfg.seed or float(result.server.server_lr) != np.float32(cfg.server_lr):
            raise ValueError("start= comes from a run with another seed or server_lr")
        if int(result.server.round) > cfg.rounds:
            raise ValueError(f"start= has run {int(result.server.round)} rounds, more than cfg.rounds={cfg.rounds}")
        for name, hist in result.histories.items():
            if hist.compressor != self.compressors[name] or hist.selection != self.histories[name].selection:
                raise ValueError(f"start=: history {name!r} was recorded with another compressor or selection")
        if self.partial:
            raise ValueError(f"start= continues full histories only; {self.partial} have a Selection")
        # copies: the earlier result keeps its own rounds
        self.histories = {n: dataclasses.replace(h, records=list(h.records)) for n, h in result.histories.items()}
        self.states = dict(result.codec_states)
        self.log = {k: ({n: list(x) for n, x in v.items()} if isinstance(v, dict) else list(v))
                    for k, v in result.log.items()}
        return result.server

    def record_selected(self, t: int, prev: PyTree, params: PyTree, out) -> None:
        """Round ``t`` (a block of one) for the histories with a Selection: choose its users on the host, then
        encode them."""
        for name in self.partial:
            ups, active = jax.tree.map(lambda a: a[0], out.updates), out.active[0]
            hist = self.histories[name]
            sel = hist.selection
            act = _select(sel, t, prev, params, ups, active, self._last_kept[name])
            if act is None:
                continue
            self._last_kept[name] = prev
            msg, self.states[name], _, _, stats = self._encoders[name](ups, self.states[name],
                                                                       compressor_key(self.seed, t), act)
            hist.append(msg, t, prev if sel.checkpoints else None, active if sel.user_fraction < 1 else None)
            self.log["overload"][name].append(int(stats.overload))
            self.log["rel_error"][name].append(float(rel_error(stats)))

    def warn_if_diverged(self, params0: PyTree, params: PyTree, growth: float = 1e4) -> None:
        """A model whose norm grew more than ``growth``-fold over the run (or turned non-finite) has diverged
        (e.g. sign-flipping attackers outweighing the honest clients): say so instead of returning it silently."""
        n0, n1 = tree_norm(params0), tree_norm(params)
        if not np.isfinite(n1) or n1 > growth * max(n0, 1e-30):
            warnings.warn(f"train: the model diverged: its norm went from {n0:.3g} to {n1:.3g} (a growth above "
                          f"{growth:g}x); check the learning rates and the clients' updates (update_scale)",
                          RuntimeWarning, stacklevel=3)

    def warn_if_history_diverged(self, bound: float = 1e3) -> None:
        """A history whose decoded updates were more than ``bound`` times (in squared norm) farther from the true
        updates than the updates' own size, or non-finite, in some round has a closed loop that blew up even if
        the model did not: say which history and round. (Error feedback's rows legitimately reach ~100x, with
        the rounds they carry; a diverged 1-bit loop reached 2.5e7.)"""
        for name, errs in self.log["rel_error"].items():
            e = np.asarray(errs, np.float64)
            bad = np.flatnonzero(~(e <= bound))
            if bad.size:
                warnings.warn(f"train: history {name!r} diverged: in {bad.size} round(s), first round {int(bad[0])}, "
                              f"its decoded updates were {e[bad[0]]:.3g}x the updates' squared norm away from them "
                              f"(bound {bound:g}); its replay will not rebuild the model: use more bits, "
                              "guard=True or a chain without the closed loop", RuntimeWarning, stacklevel=3)

    def warn_if_model_gap(self, params: PyTree, bound: float = 0.25) -> None:
        """A model correction whose replayed model ended more than ``bound`` (relative) from the trained one, or
        non-finite, did not do its job (e.g. a coarse correction coder that kept falling back to zero): say so.
        (The default's gap is 0.0-0.3%; a 2-bit correction of 1-bit rows after 6 rounds of a tiny model, ~10%.)"""
        norm = max(tree_norm(params), 1e-30)
        for name, gaps in self.log["model_gap"].items():
            if gaps and not gaps[-1] / norm <= bound:
                warnings.warn(f"train: history {name!r}: its replay ends {gaps[-1] / norm:.3g} (relative) from the "
                              f"trained model (bound {bound:g}) although it codes a model correction; use more bits "
                              "for the correction", RuntimeWarning, stacklevel=3)

    def warn_if_idle(self, data, excl: np.ndarray, t0: int, rounds: int) -> None:
        """A run in which no update entered the aggregate did not train: say so, and why."""
        if self.entered or rounds <= t0:
            return
        has_data = np.any((np.asarray(data.n) > 0) & ~excl)
        why = ("no client has data, or every client with data is excluded" if not has_data else
               "every update was rejected as non-finite" if any(self.log["rejected"]) else
               "no participating client had data")
        warnings.warn(f"train: no update entered the aggregate in rounds {t0}..{rounds - 1} ({why}): "
                      "the model did not change", RuntimeWarning, stacklevel=3)
