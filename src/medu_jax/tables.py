"""The experiments' one writer: Markdown tables, percentages, JSON, and a matplotlib figure saved as PNG.

Every experiment (``experiment``, ``zoga_experiment``, ``rum_experiment``, ``s3t_experiment``) and the scenario
``suite`` format their tables and plots with these, so a table is its header, its column alignment and a row
function, nothing more.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterable, Iterator, Sequence


def pct(x: float, unit: str = "") -> str:
    """``x`` as a percentage with one decimal (0.123 -> "12.3" + unit), or "" for NaN."""
    return "" if x != x else f"{100 * x:.1f}{unit}"


def dist(x: float) -> str:
    """A distance with three decimals; a diverged one (>= 1e3 or inf) in scientific notation, NaN as "nan"."""
    if x != x:
        return "nan"
    return f"{x:.3f}" if abs(x) < 1e3 else f"{x:.1e}"


def row(cells: Iterable[Any]) -> str:
    """One Markdown table row: ``| a | b |``."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def markdown(header: Sequence[str], rows: Iterable[Sequence[Any]], align: str = "", note: str = "") -> str:
    """A Markdown table. ``align`` has a letter a column: "r" right-aligns it (numbers), anything else (or a
    missing letter) leaves it left-aligned; ``note`` is text after the header row."""
    rule = "|" + "".join("---:|" if a == "r" else "---|" for a in align.ljust(len(header)))
    return "\n".join([row(header) + note, rule, *(row(r) for r in rows)])


def to_json(obj: Any, indent: int = 2) -> str:
    """JSON text of a result (numpy and jax scalars as floats)."""
    return json.dumps(obj, indent=indent, default=float)


@contextlib.contextmanager
def figure(path: str, figsize: tuple[float, float]) -> Iterator[Any]:
    """``with figure(path, (w, h)) as ax:`` draws on one matplotlib axes (Agg, no display), then saves the figure
    as a PNG at 120 dpi to ``path`` and closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
