"""Regenerate every committed figure under figures/ (`make figures`, `python -m moba_edu.figures`).

Routing and cost figures come from `moba_edu.viz.gallery`; benchmark plots are re-drawn from the
committed JSON under figures/bench/ by `moba_edu.bench.suites.plot_all` (no re-measuring).
"""

from __future__ import annotations

import argparse
from pathlib import Path

FIGURES = Path(__file__).resolve().parent.parent / "figures"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=FIGURES, help="folder to write into (default: figures/)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    from .bench.suites import plot_all
    from .viz import gallery

    written = gallery.save_all(args.out) + plot_all(args.out / "bench")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
