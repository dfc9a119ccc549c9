"""Wall time of an 8-point ``tiny`` sweep on 1 and on 2 local workers, and the speed-up.

The sweep is the book's own: ``mergebook/assets/sweeps/merge_point.py`` (one training-free merge,
evaluated on a seeded test sample) over Task Arithmetic and Ties-Merging × λ ∈ {0.2, 0.4} × two
seeds. Each configuration runs into a fresh run folder (nothing is resumed) and is timed end to end
from the caller's side: the LocalCluster's start, every point's papermill kernel, and the parquet
writes. The fine-tuned models must already be cached (run chapter 00 or ``make book`` once), or
the first point would train them. Prints figures; asserts nothing. The goal is a ratio ≥ 1.8 on
2 cores; on a machine that other jobs share, the figure says more about them than about the sweep.

    python benchmarks/sweep.py                # 1 and 2 workers
    python benchmarks/sweep.py --workers 1,2,4 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

GRID = {"profile": "tiny", "seeds": [0, 1],
        "grid": {"method": ["task_arithmetic", "ties"], "scaling_coef": [0.2, 0.4]},
        "fixed": {"eval_per_task": 300}}


def time_sweep(workers: int, root: Path) -> tuple[float, float, float]:
    """Seconds for the whole 8-point sweep on ``workers`` workers, the mean seconds per point inside
    its worker, and their sum (busy seconds: busy / wall is how many points ran at once)."""
    from mergebook import sweep

    out = Path(tempfile.mkdtemp(prefix=f"w{workers}-", dir=root))
    start = time.perf_counter()
    df = sweep.run_sweep(sweep.EXAMPLE_NOTEBOOK, GRID, out, workers=workers, progress=False)
    wall = time.perf_counter() - start
    failed = df[df["status"] != "ok"]
    if len(failed):
        raise SystemExit(f"{len(failed)} points failed, e.g. {failed['error'].iloc[0]}")
    return wall, float(df["wall_time_s"].mean()), float(df["wall_time_s"].sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts (default 1,2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per worker count (the best is kept)")
    args = parser.parse_args()
    counts = [int(w) for w in args.workers.split(",")]
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    print(f"machine: {os.cpu_count()} cores, load average {load} (1, 5, 15 min) before the runs")
    print("sweep: 8 points (TA, Ties × λ 0.2, 0.4 × seeds 0, 1) of mergebook/assets/sweeps/merge_point.py")
    results: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="mergebook-bench-sweep-") as tmp:
        for w in counts:
            best = None
            for r in range(args.repeats):
                wall, per_point, busy = time_sweep(w, Path(tmp))
                print(f"  {w} worker{'s' if w > 1 else ' '}  run {r + 1}: {wall:6.1f} s wall, "
                      f"{per_point:5.1f} s per point (inside its worker), {busy / wall:4.2f} points at once",
                      flush=True)
                best = wall if best is None else min(best, wall)
            results[w] = best
    base = results.get(1)
    print("\nworkers  wall (s)  speed-up vs 1")
    for w, wall in results.items():
        ratio = f"{base / wall:.2f}x" if base else "-"
        print(f"{w:>7}  {wall:8.1f}  {ratio:>13}")
    try:
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    except OSError:
        pass


if __name__ == "__main__":
    main()
