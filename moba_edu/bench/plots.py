"""Drawing helpers shared by the suites' figures (each suite module draws its own figure with them).

Imports matplotlib: suite modules import this inside their plot functions only, so measuring on a
machine without matplotlib still works.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, NullFormatter

PLAIN = FuncFormatter(lambda value, _: f"{value:g}")


def s_axes(*axes, legend_loc: str = "best") -> None:
    """Sequence length on a log2 x axis, a light grid and a small legend."""
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length S (tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc=legend_loc)


def plain_log_y(ax, ticks) -> None:
    """A log y axis labelled with plain numbers at the given ticks (no 10^n, no minor labels)."""
    ax.set_yticks(ticks)
    ax.yaxis.set_major_formatter(PLAIN)
    ax.yaxis.set_minor_formatter(NullFormatter())


def label_points(ax, labels, *, gap_pt: float = 10.0, dx_pt: float = 7.0, fontsize: float = 7) -> None:
    """Write each label beside its point, right of it, on a white box (lines may pass behind); labels at
    one x that would overlap are pushed apart vertically (at least gap_pt points between centres), the
    lowest one staying at its point.

    labels: [(x, y, text, color)] in data coordinates. Call after the axes' limits are final.
    """
    by_x = defaultdict(list)
    for label in labels:
        by_x[label[0]].append(label)
    to_points = 72 / ax.figure.dpi
    for column in by_x.values():
        column.sort(key=lambda label: label[1])
        last = None
        for x, y, text, color in column:
            here = ax.transData.transform((x, y))[1] * to_points
            shown = here if last is None else max(here, last + gap_pt)
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx_pt, shown - here), ha="left",
                        va="center", fontsize=fontsize, color=color,
                        bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.85))
            last = shown


def gpu_title(records: list[dict], what: str) -> str:
    """A figure title naming the GPU and versions of the first record."""
    machine = records[0]["machine"]
    return (f"{what} on {machine.get('gpu', '?')}: bf16, B = 1, head dim {records[0]['shape']['D']}; "
            f"torch {machine['torch']}, triton {machine['triton']}")


def save(fig, path: Path, dpi: int = 110) -> list[Path]:
    """Write and close the figure; returns [path]."""
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return [Path(path)]
