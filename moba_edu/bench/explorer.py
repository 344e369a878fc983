"""CPU suite `explorer`: how long one slider update of the routing dashboard (`moba_edu.viz.explore`) takes.

At the dashboard's default sizes (S = 256, 4 heads of dim 16, block_size 32, top_k 3), for each control
(top_k, query, head, block_size): one pass over its values to warm the caches, then `REPEATS` timed
passes; one time is one `control.value = v`, which re-routes and redraws every view. The point keeps
every time and their median. The project's goal: an update well under a second on a 2-core CPU. The record keeps the machine's
load average too: on a shared machine other processes' work shows in these times.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import torch

from .harness import Suite, point_name, register

SEQ_LEN = 256
# Each value differs from the one before it (and the last from the default), so every set redraws.
VALUES = {"top_k": (4, 2, 5, 3, 6, 1, 8, 3), "query": (100, 200, 17, 150, 60, 230, 90, 30),
          "head": (1, 2, 3, 0, 2, 1, 3, 0), "block_size": (16, 64, 8, 32, 64, 16, 8, 32)}
REPEATS = 2
GOAL_S = 1.0


def points() -> list[tuple[str, dict]]:
    return [(point_name(control, S=SEQ_LEN), dict(control=control, values=values, repeats=REPEATS))
            for control, values in VALUES.items()]


def update_times(control: str, values, repeats: int) -> list[float]:
    """Seconds per update of `control` over `values`, `repeats` times, after one untimed pass."""
    from moba_edu import viz

    ex = viz.explore(seq_len=SEQ_LEN)
    widget = ex.controls[control]
    for value in values:
        widget.value = value
    times = []
    for _ in range(repeats):
        for value in values:
            start = time.perf_counter()
            widget.value = value
            times.append(time.perf_counter() - start)
    return times


def measure(params: dict, out_dir: Path) -> dict:
    times = update_times(params["control"], params["values"], params["repeats"])
    return {"control": params["control"], "values": list(params["values"]), "repeats": params["repeats"],
            "seq_len": SEQ_LEN, "times_s": times, "median_s": statistics.median(times),
            "torch_threads": torch.get_num_threads(), "goal_s": GOAL_S,
            "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def plot(records: list[dict], out_dir: Path) -> list[Path]:
    """Every update time per control (dots) and their median (bar), against the one-second goal."""
    import matplotlib.pyplot as plt

    from .plots import save

    fig, ax = plt.subplots(figsize=(7, 2.8))
    rows = range(len(records))
    ax.barh(rows, [r["median_s"] for r in records], color="C0", alpha=0.35, label="median")
    for row, r in zip(rows, records):
        ax.plot(r["times_s"], [row] * len(r["times_s"]), "o", color="C0", ms=3)
        ax.annotate(f"median {r['median_s']:.2g} s", (0, row), textcoords="offset points", xytext=(4, 0),
                    va="center", fontsize=7)
    ax.axvline(GOAL_S, color="k", ls="--", lw=1, label=f"goal: well under {GOAL_S:g} s")
    ax.set_yticks(list(rows), [r["control"] for r in records])
    loads = [r["load_average_1m"] for r in records if r.get("load_average_1m") is not None]
    slowest = max([GOAL_S] + [t for r in records for t in r["times_s"]])
    ax.set(xlabel="seconds per update (dots: every update)"
           + (f"; machine load {min(loads):.2g}-{max(loads):.2g} (1-minute average)" if loads else ""),
           xlim=(0, 1.15 * slowest), title=f"routing dashboard: one slider update, S = {records[0]['seq_len']}, "
           f"{records[0]['machine']['cpu']}, {records[0]['torch_threads']} thread(s)")
    ax.title.set_fontsize(9)
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save(fig, out_dir / "cpu_explorer.png")


EXPLORER = register(Suite("explorer", "cpu", points, measure, plot))
