"""One headless pyplot for every figure of a report, and one way to write a figure."""

from __future__ import annotations

from pathlib import Path

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on a cluster node). Imported when a figure is drawn, not
    with the study layer: matplotlib is the one heavy dependency only the report needs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, tight: bool = True) -> Path:
    """Write ``figure`` (PNG, 120 dpi) and close it; returns ``path``. ``tight``: lay it out first (figures with a
    shared colour bar lay out by their bounding box instead)."""
    if tight:
        figure.tight_layout()
        figure.savefig(path, dpi=120)
    else:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    pyplot().close(figure)
    return path
