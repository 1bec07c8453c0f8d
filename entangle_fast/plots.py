"""Shared plotting: token heat-maps and per-layer bar charts, written as PNG files.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure`` + ``FigureCanvasAgg``), never
through ``pyplot``: nothing here touches the interactive backend of the caller, and it works without a display.

Colours: a diverging map centred at 0 (blue negative, red positive) with limits symmetric about 0, so white always
means 0 and a token pair that pushes the two log-probs the same way (K > 0, entangling) reads red.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

DIVERGING_CMAP = "RdBu_r"
# Above this many tokens on an axis, only every k-th token is labelled (the cells are still all drawn).
MAX_LABELLED_TOKENS = 96
_CELL_INCHES = 0.26
_MAX_INCHES = 40.0
# Approximate width of one character at 10 pt (DejaVu Sans averages ~0.55 em): used to keep the title, the axis titles
# and the colour-bar label inside a figure whose axes are only a few cells (a 2-token response).
_CHAR_INCHES_10PT = 0.085
_MIN_WIDTH_INCHES = 4.8



def _save(fig, path) -> Path:
    """Lay out and write the figure, creating its folder. The saved area is grown to every label (``bbox_inches``),
    so nothing is clipped even when a label is longer than its axis."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.1)
    return path


def _wrap(text: str, width_inches: float, fontsize: float) -> str:
    """``text`` broken at spaces into lines that fit ``width_inches`` at ``fontsize`` points."""
    import textwrap

    chars = max(int(width_inches / (_CHAR_INCHES_10PT * fontsize / 10)), 12)
    return "\n".join(textwrap.wrap(text, chars)) if text else text

def _as_array(matrix) -> np.ndarray:
    if hasattr(matrix, "detach"):
        matrix = matrix.detach().to("cpu").double().numpy()
    return np.asarray(matrix, dtype=np.float64)


def display_token(token: str) -> str:
    """A decoded token as a readable tick label: control characters escaped, spaces shown as a middle dot,
    ``$`` escaped (matplotlib would start mathtext), the empty string as ``''``."""
    if token == "":
        return "''"
    out = token.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")
    out = out.replace(" ", "\u00b7").replace("$", r"\$")
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in out)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(min(width, _MAX_INCHES), min(height, _MAX_INCHES)), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _symmetric_limit(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    lim = float(np.abs(finite).max()) if finite.size else 0.0
    return lim if lim > 0 else 1.0


def _tick_step(n: int) -> int:
    return max(1, int(np.ceil(n / MAX_LABELLED_TOKENS)))


def token_heatmap(matrix, chosen_tokens: list[str], rejected_tokens: list[str], *, title: str, path,
                  cbar_label: str = "", ylabel: str = "chosen response tokens",
                  xlabel: str = "rejected response tokens") -> Path:
    """Draw a ``[T_w, T_l]`` token matrix (rows: chosen tokens, columns: rejected tokens) and save it as a PNG.

    Args:
        matrix: ``[T_w, T_l]`` torch tensor or array-like; NaN cells are drawn grey.
        chosen_tokens / rejected_tokens: decoded tokens labelling the rows / columns (lengths T_w / T_l).
        title: figure title. path: where the PNG goes (parent folders are created). cbar_label: colour-bar label.
        ylabel / xlabel: axis titles.

    Returns:
        ``Path(path)``.
    """
    values = _as_array(matrix)
    if values.ndim != 2:
        raise ValueError(f"matrix must be 2-D [T_w, T_l], got shape {values.shape}")
    tw, tl = values.shape
    if len(chosen_tokens) != tw or len(rejected_tokens) != tl:
        raise ValueError(f"matrix is [{tw}, {tl}] but {len(chosen_tokens)} chosen and {len(rejected_tokens)} "
                         "rejected tokens were given")
    lim = _symmetric_limit(values)
    longest = max([len(display_token(t)) for t in list(chosen_tokens) + list(rejected_tokens)] + [1])
    label_inches = min(0.075 * longest + 0.3, 2.5)
    width = max(_CELL_INCHES * tl + label_inches + 1.8, _MIN_WIDTH_INCHES)
    # Vertical texts (the y-axis title, the colour-bar label) need the axes about as tall as they are long.
    vertical = max(len(ylabel), len(cbar_label)) * _CHAR_INCHES_10PT * 0.9
    height = max(_CELL_INCHES * tw + label_inches + 1.0, vertical + label_inches + 1.0)
    fig = _figure(width, height)
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib

    cmap = matplotlib.colormaps[DIVERGING_CMAP].with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto",
                      interpolation="nearest")
    fontsize = 8 if max(tw, tl) <= 48 else 6
    axes = ((ax.set_yticks, chosen_tokens, tw, 0), (ax.set_xticks, rejected_tokens, tl, 90))
    for axis_ticks, labels, n, rotate in axes:
        step = _tick_step(n)
        idx = list(range(0, n, step))
        axis_ticks(idx, [display_token(labels[i]) for i in idx], fontsize=fontsize, rotation=rotate)
    ax.set_ylabel(ylabel)
    ax.set_xlabel(xlabel)
    ax.set_title(_wrap(title, min(width, _MAX_INCHES) - 0.6, 10), fontsize=10)
    cbar = fig.colorbar(image, ax=ax, fraction=0.046 if tl > 8 else 0.1, pad=0.02)
    if cbar_label:
        cbar.set_label(cbar_label, fontsize=9)
    return _save(fig, path)


def position_heatmap(matrix, chosen_tokens: Sequence[str], rejected_tokens: Sequence[str], *, title: str, path,
                     cbar_label: str = "") -> Path:
    """:func:`token_heatmap` for a ``[P_w, P_l]`` matrix over every position of the two rows (prompt included);
    the labels are the rows' input tokens."""
    return token_heatmap(matrix, list(chosen_tokens), list(rejected_tokens), title=title, path=path,
                         cbar_label=cbar_label, ylabel="chosen row: input token at each position",
                         xlabel="rejected row: input token at each position")


def layer_bar_chart(values: Mapping[str, float], *, title: str, path, xlabel: str = "") -> Path:
    """Horizontal bars, one per layer (in the mapping's order), red for positive values and blue for negative.

    Args:
        values: layer name -> value (NaN drawn as an empty bar). title, path: as in :func:`token_heatmap`.
        xlabel: the value's name.
    """
    names = list(values)
    vals = np.array([float(values[n]) for n in names], dtype=np.float64)
    fig = _figure(7.5, max(2.0, 0.22 * len(names) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    colors = ["#b2182b" if v > 0 else "#2166ac" for v in np.nan_to_num(vals)]
    ax.barh(np.arange(len(names)), np.nan_to_num(vals), color=colors)
    ax.set_yticks(np.arange(len(names)), [n.replace("$", r"\$") for n in names], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel)
    return _save(fig, path)
