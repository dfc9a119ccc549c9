"""How far does the Concrete mask move in the chapter's short runs? (issue 10, item 7)

The papers train the Concrete mask logits with Adam at lr 1e-3 for 2000 steps (Concrete TA; the
meta-learning phase of Concrete AdaMerging), then adapt λ for 1000 steps, as many as their
layer-wise AdaMerging baseline. Adam moves a logit by at most about lr per step, so the paper's
logits can travel about 2 from their start at 0, while the chapter's 100-200 steps at the same lr
allow 0.1-0.2 (keep probability 0.5 → at most 0.6 at temperature 0.5). This study runs, on the
``tiny`` suite (seed 0, batches of 16 per task), Concrete TA and layer-wise Concrete AdaMerging at
the paper's mask lr and at ten times it, and Concrete AdaMerging with the adaptation budget of the
chapter's former setting (100 steps) and of its layer-wise AdaMerging baseline (200). It writes
one row per run to ``lib/mergebook/assets/studies/concrete_budget.csv`` and its record (command,
seed, device, date) to ``concrete_budget.json``; chapter 03 reads both and never reruns it (about
10 minutes of CPU, run as two one-thread processes).

    OMP_NUM_THREADS=1 python benchmarks/concrete_budget.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"

# name -> (granularity, mask steps, adaptation steps, mask lr); "none" is Concrete TA
RUNS = {
    "Concrete TA · 200 steps, mask lr 1e-3 (paper's lr)": ("none", 200, 0, 1e-3),
    "Concrete TA · 200 steps, mask lr 1e-2": ("none", 200, 0, 1e-2),
    "Concrete AM · 100 + 100 steps, mask lr 1e-3 (chapter before)": ("layer", 100, 100, 1e-3),
    "Concrete AM · 100 + 200 steps, mask lr 1e-3": ("layer", 100, 200, 1e-3),
    "Concrete AM · 100 + 200 steps, mask lr 1e-2 (chapter now)": ("layer", 100, 200, 1e-2),
}


def one(job: tuple[str, bool, int]) -> dict:
    """Run one configuration on one thread; a row of the study."""
    import torch

    from mergebook.methods.concrete import concrete_adamerging, concrete_task_arithmetic
    from mergebook.profiles import load_suite

    name, quick, seed = job
    torch.set_num_threads(1)
    granularity, mask_steps, tta_steps, mask_lr = RUNS[name]
    if quick:
        mask_steps, tta_steps = min(mask_steps, 4), min(tta_steps, 4)
    suite = load_suite("tiny", device="cpu")
    t0 = time.perf_counter()
    # evaluate only the first and the last step of each phase
    common = dict(seed=seed, device="cpu", eval_every=max(mask_steps, tta_steps), progress=False)
    if granularity == "none":
        res = concrete_task_arithmetic(suite, steps=mask_steps, lr=mask_lr, **common)
    else:
        res = concrete_adamerging(suite, granularity, meta_steps=mask_steps, tta_steps=tta_steps, outer_lr=mask_lr,
                                  **common)
    # Concrete TA: its step 0 (plain TA, a mask of p = 0.5); Concrete AM: the adaptation phase's
    # step 0, the learned mask's frozen sample at λ = 0.3 before any λ is adapted
    start = res.history.accuracy[0]["avg"]
    stats = res.mask_stats["overall"]
    logits = torch.cat([x.flatten().double() for x in res.mask_logits.values()])
    row = {"run": name, "method": "Concrete TA" if granularity == "none" else "Layer-wise Concrete AdaMerging",
           "mask_steps": mask_steps, "tta_steps": tta_steps, "mask_lr": mask_lr,
           "kept": stats["kept"], "mean_p": stats["mean_p"], "mean_abs_logit": float(logits.abs().mean()),
           "max_abs_logit": float(logits.abs().max()), "start_avg": start,
           **{t: res.accuracy[t] for t in suite.tasks}, "avg": res.accuracy["avg"],
           "seconds": round(time.perf_counter() - t0, 1)}
    print(f"{name}: {row['avg']:.2f} ({row['seconds']:.0f} s)", flush=True)
    return row


def main(argv=None) -> None:
    import pandas as pd
    import torch

    from mergebook.artifacts import atomic_write

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4-step runs, to smoke-test the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="one-thread processes (default 2)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    jobs = [(name, args.quick, args.seed) for name in RUNS]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        rows = pool.map(one, jobs, chunksize=1)
    frame = pd.DataFrame(rows)
    record = {"command": "OMP_NUM_THREADS=1 python benchmarks/concrete_budget.py" + (" --quick" if args.quick else ""),
              "seed": args.seed, "quick": args.quick, "batch_size": 16,
              "device": f"cpu ({platform.machine()}, torch {torch.__version__}, {args.workers} one-thread processes)",
              "date": date.today().isoformat(), "seconds": round(time.perf_counter() - t0, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "concrete_budget.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write(args.out / "concrete_budget.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    print(frame[["run", "start_avg", "avg", "kept", "mean_abs_logit", "seconds"]].to_string(index=False))


if __name__ == "__main__":
    main()
