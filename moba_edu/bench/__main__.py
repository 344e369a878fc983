"""The runner: `python -m moba_edu.bench --cpu|--gpu [--only NAME ...] [--out DIR] [--list]`.

Measures every selected point of the device's suites (`--only`: fnmatch patterns over "suite" or
"suite/point", e.g. `--only "torch_vs_naive/naive-*"`), writing each point's JSON under
<out>/cpu/ or <out>/h200/ as soon as it is measured, so a long run can be split or interrupted
without losing what it measured; then re-plots every figure from the JSON. `--list` prints the
selected points ("suite/point") and measures nothing.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .harness import BENCH_DIR, listed, run
from .suites import plot_all


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moba_edu.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    device = parser.add_mutually_exclusive_group(required=True)
    device.add_argument("--cpu", action="store_true", help="run the CPU suites")
    device.add_argument("--gpu", action="store_true", help="run the GPU suites")
    parser.add_argument("--only", nargs="+", metavar="NAME", help='suites or "suite/point" (fnmatch patterns)')
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="folder for JSON and plots (figures/bench)")
    parser.add_argument("--list", action="store_true", help="print the selected points; measure nothing")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "gpu"
    if args.list:
        print("\n".join(listed(device, args.only)))
        return
    import matplotlib

    matplotlib.use("Agg")
    run(device, args.only, args.out)
    for path in plot_all(args.out):
        print(path)


if __name__ == "__main__":
    main()
