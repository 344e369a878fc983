"""Every benchmark suite, registered by importing its module, and `plot_all` (`make figures`).

Registration order is run order: the ceilings first (the GPU suites' floors read them), then the
CPU suites, then the GPU suites, dense baselines before the kernels compared with them.
"""

from __future__ import annotations

from pathlib import Path

from . import floors, cpu, explorer, gpu_forward, gpu_backward, gpu_split, decode  # noqa: F401, I001  (run order; importing registers)
from .harness import SUITES, read_points


def plot_all(out_dir: Path) -> list[Path]:
    """Re-draw every benchmark figure from the JSON under out_dir (no measuring). Returns the PNGs."""
    written = []
    for suite in SUITES.values():
        records = read_points(out_dir, suite)
        if records and suite.plot is not None:
            written += suite.plot(records, Path(out_dir))
    return written
