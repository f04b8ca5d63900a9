"""What every picture of this package shares: matplotlib figures drawn off-screen (the Agg
canvas, no pyplot and so no global figure state or display), one title form naming the run and
step, and one way to save them."""
from __future__ import annotations

import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

DPI = 120  # 1-inch text lines of 8-10 pt stay sharp; a 8x5 in figure is 960x600 px

# The papers' binary activation maps: active yellow, inactive purple (viridis ends).
ACTIVE, INACTIVE = "#fde725", "#440154"


def new_figure(width_in: float, height_in: float, dpi: int = DPI) -> Figure:
    fig = Figure(figsize=(width_in, height_in), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def run_title(what: str, run: str, step: int | None) -> str:
    """'<what>' over 'run <run>, step <step>', the title form of every picture (two lines, so
    that narrow pictures keep it whole)."""
    where = f"run {run}" if run else "run (unnamed)"
    return f"{what}\n{where}" + (f", step {step:,}" if step is not None else "")


def run_name(workdir: str) -> str:
    """The name a run is shown under: its directory's name."""
    return os.path.basename(os.path.normpath(os.path.abspath(workdir)))


def save(fig: Figure, path: str) -> Figure:
    """Writes `fig` as a PNG at its own size and dpi; returns it for callers that inspect it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, facecolor="white")
    return fig


def captioned_grid(images, captions, title: str, path: str, ncols: int = 8) -> Figure:
    """uint8 [N, H, W, C] images in a grid, each under its (wrapped) caption: text-to-image
    samples beside the prompts they were drawn for."""
    import math
    import textwrap

    n = len(images)
    ncols = min(ncols, n)
    nrows = math.ceil(n / ncols)
    fig = new_figure(1.6 * ncols, 2.0 * nrows + 0.5)
    fig.suptitle(title, fontsize=10)
    for i, (image, caption) in enumerate(zip(images, captions)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        gray = image.shape[-1] == 1
        ax.imshow(image[..., 0] if gray else image, cmap="gray" if gray else None,
                  vmin=0, vmax=255, interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(str(caption), 22)[:3]), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    return save(fig, path)
