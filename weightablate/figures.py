"""Headless matplotlib figures for the reports (reporting.py, report_pruning.py): never pyplot,
never the user's backend."""
from __future__ import annotations

import io

DPI = 100
_BLUE, _RED, _GREY = "#1f77b4", "#d62728", "#7f7f7f"


def _figure(w=10.0, h=4.0, ncols=1, nrows=1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # headless: never pyplot, never the user's backend
    axes = [fig.add_subplot(nrows, ncols, k + 1) for k in range(nrows * ncols)]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()
