"""Matplotlib for every job's PNGs: the headless Agg backend, imported on first use (no side effect at import)."""

from __future__ import annotations


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (no display needed; MPLCONFIGDIR is set by the CLI and the Makefile)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
