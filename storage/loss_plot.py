"""The model card's picture: each quantized linear's GPTQ loss over its RTN loss, by block (loss-ratio.png).

The PNG is listed in the manifest, so the same report must give the same bytes (reruns and resumed jobs
are compared with `cmp`): a fixed size and DPI, matplotlib's own defaults instead of the machine's
matplotlibrc, no `Software` or date metadata, no randomness. matplotlib is imported inside
`render_loss_ratio_png` only: the driver's finish draws the picture, and workers never import it. The
driver starts that import while the blocks run (`import_matplotlib_in_background`): ~0.7 s of imports the
finish would otherwise pay after the last block.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from rayquant.storage.job_records import JobReport, LayerReport

if TYPE_CHECKING:  # the hint only: matplotlib is imported where the picture is drawn
    from matplotlib.axes import Axes

FIGURE_INCHES = (9.0, 4.5)
DPI = 100  # 900 x 450 pixels
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "<", ">", "*")  # with 10 colours: 100 distinct series
_DODGE = 0.6  # of one block's width: the kinds of one block sit side by side instead of on top of each other
_INDEX = re.compile(r"\d+")
_RENDER_MODULES = ("matplotlib.style", "matplotlib.backends.backend_agg", "matplotlib.figure", "matplotlib.ticker")


class MatplotlibMissing(ImportError):
    """The driver's environment lacks matplotlib, which draws the model card's picture."""


@dataclass(frozen=True)
class LayerRatio:
    """One quantized linear's GPTQ loss relative to round-to-nearest on the same grid (< 1: GPTQ did better)."""

    name: str  # e.g. model.layers.3.mlp.experts.5.down_proj
    block: int  # the name's first numeric part: 3
    kind: str  # the name after the block index, expert indices as `*`: mlp.experts.*.down_proj
    ratio: float | None  # gptq_loss / rtn_loss; None where rtn_loss is 0 (nothing to improve on)


def layer_ratios(layers: Sequence[LayerReport]) -> list[LayerRatio]:
    """Each layer's GPTQ / RTN loss ratio with its block and linear kind, in the layers' order.

    Raises:
        ValueError: a layer name has no block index (only block linears are quantized: a bug upstream).
    """
    return [_layer_ratio(layer) for layer in layers]


def _layer_ratio(layer: LayerReport) -> LayerRatio:
    parts = layer.name.split(".")
    at = next((i for i, part in enumerate(parts) if _INDEX.fullmatch(part)), None)
    if at is None:
        raise ValueError(f"layer {layer.name!r} has no block index; only linears inside blocks are quantized")
    kind = ".".join("*" if _INDEX.fullmatch(part) else part for part in parts[at + 1:])
    ratio = layer.gptq_loss / layer.rtn_loss if layer.rtn_loss > 0 else None
    return LayerRatio(name=layer.name, block=int(parts[at]), kind=kind, ratio=ratio)


def import_matplotlib_in_background() -> None:
    """Import what `render_loss_ratio_png` needs on a daemon thread; the render waits for an import still under
    way (Python's import lock) and reports a missing matplotlib itself."""
    threading.Thread(target=_import_matplotlib, name="import-matplotlib", daemon=True).start()


def _import_matplotlib() -> None:
    with contextlib.suppress(ImportError):
        for name in _RENDER_MODULES:
            importlib.import_module(name)


def render_loss_ratio_png(report: JobReport) -> bytes:
    """loss-ratio.png: GPTQ / RTN loss per layer (log y) by block, one marker series per linear kind, a line
    at 1 (RTN). The same report gives the same bytes.

    Raises:
        MatplotlibMissing: matplotlib is not installed where the job's driver runs.
    """
    try:
        import matplotlib
        import matplotlib.style
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise MatplotlibMissing(
            "matplotlib is not installed in the job driver's environment (it draws the model card's "
            "loss-ratio.png); install rayquant's dependencies there (pip install 'matplotlib>=3.9') and run "
            "the same command again: the job resumes at its finish"
        ) from err
    # matplotlib's defaults, not this machine's matplotlibrc
    with matplotlib.style.context("default"):
        figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
        FigureCanvasAgg(figure)
        _draw(figure.add_subplot(), report.job, layer_ratios(report.layers))
        png = io.BytesIO()
        figure.savefig(png, format="png", dpi=DPI, metadata={"Software": None})
    return png.getvalue()


def _draw(ax: Axes, job: str, ratios: list[LayerRatio]) -> None:
    """Markers per kind (sorted by name), dodged within a block; log y when there is something to plot."""
    from matplotlib.ticker import MaxNLocator

    plotted = [r for r in ratios if r.ratio is not None and r.ratio > 0]  # log scale: 0 has no place
    kinds = sorted({r.kind for r in plotted})
    for i, kind in enumerate(kinds):
        offset = (i - (len(kinds) - 1) / 2) * _DODGE / len(kinds)
        points = [(r.block + offset, r.ratio) for r in plotted if r.kind == kind]
        ax.plot([x for x, _ in points], [y for _, y in points], linestyle="none", marker=_MARKERS[i % len(_MARKERS)],
                markersize=4, color=f"C{i % 10}", label=kind)
    ax.axhline(1.0, color="0.35", linestyle="--", linewidth=1, label="RTN (ratio 1)")
    if plotted:
        _log_y(ax, min(r.ratio for r in plotted), max(r.ratio for r in plotted))
        blocks = [r.block for r in plotted]
        ax.set_xlim(min(blocks) - 0.5, max(blocks) + 0.5)
    else:
        ax.text(0.5, 0.5, "no layer with a positive RTN loss", transform=ax.transAxes, ha="center")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(True, which="major", alpha=0.3)
    ax.set_xlabel("block")
    ax.set_ylabel("GPTQ loss / RTN loss")
    # job and layer names are shown as written, never parsed as mathtext (a `$` in a name)
    ax.set_title(f"{job}: layer loss of GPTQ relative to round-to-nearest (lower is better)", fontsize="medium",
                 parse_math=False)
    legend = ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    for text in legend.get_texts():
        text.set_parse_math(False)


def _log_y(ax: Axes, low: float, high: float) -> None:
    """Log y from below the smallest ratio to above the largest, 1.0 always in view, ticks as plain numbers
    (0.5, not 5x10^-1); within ~1.5 decades the 2x, 3x and 5x ticks are labelled too."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = min(low, 1.0) / 1.5, max(high, 1.0) * 1.5
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    ax.yaxis.set_major_formatter(plain)
    if high / low < 30:
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 3.0, 5.0)))
        ax.yaxis.set_minor_formatter(plain)
    else:
        ax.yaxis.set_minor_formatter(NullFormatter())
