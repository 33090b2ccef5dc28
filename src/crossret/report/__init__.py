"""Reports: plots (P-R curves, precision@N, MAP vs bits) of run metrics, of one run or overlaying several.

Names are imported lazily so that ``import crossret.report`` does not import matplotlib.
"""

from __future__ import annotations

from crossret.lazy_exports import lazy_getattr

_EXPORTS = {
    "plot_pr_curves": "crossret.report.plots",
    "plot_precision_at_n": "crossret.report.plots",
    "plot_map_vs_bits": "crossret.report.plots",
    "write_run_plots": "crossret.report.plots",
    "plan_overlay_plots": "crossret.report.overlay",
    "draw_overlay_plot": "crossret.report.overlay",
    "write_overlay_plots": "crossret.report.overlay",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr("crossret.report", _EXPORTS)
