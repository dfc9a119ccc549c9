"""Where does the miniature lose accuracy when it merges? (issue 10, item 7)

The gap between a fine-tuned model and Task Arithmetic on its task has two parts, and a benchmark
designer who wants the papers' large AdaMerging gains needs to know which one the miniature has:

- **scaling loss**: ``Individual(t) - Alone(t, λ)``, where ``Alone(t, λ)`` is the pretrained
  model plus λ·τ_t, task t's vector *alone*, scaled as the merge scales it; no other task is present;
- **interference**: ``Alone(t, λ) - TA(t, λ)``, what the other seven task vectors cost task t at
  the same λ.

Coefficient learning (AdaMerging) can win back the scaling loss by raising λ for a layer or task,
but only where raising it does not bring the interference back. A miniature whose gap is mostly
scaling loss rewards any λ search; one whose gap is mostly interference rewards only λ that separate
the tasks. Evaluation only (no training). It writes one row per (task, λ) to
``lib/mergebook/assets/studies/miniature_disentangle.csv`` and its record (command, seed, device,
date) to ``miniature_disentangle.json``.

    OMP_NUM_THREADS=1 python benchmarks/miniature_disentangle.py [--lambdas 0.3 0.5 1.0]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from mergebook.artifacts import write_study  # noqa: E402
from mergebook.evaluate import evaluate  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.models import tiny  # noqa: E402
from mergebook.statedict import check_compatible, task_vector  # noqa: E402

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"


def scaled_alone(pre: dict, ft: dict, lam: float) -> dict:
    """pre + λ·(ft − pre) for one task (the registry refuses a one-model merge, rightly for users)."""
    check_compatible(pre, [ft])
    return {**pre, **{k: pre[k] + lam * tau for k, tau in task_vector(ft, pre).items()}}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lambdas", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    bad = [v for v in args.lambdas if not (0.0 < v <= 2.0)]
    if bad:
        p.error(f"--lambdas must lie in (0, 2], got {bad}")
    torch.manual_seed(args.seed)
    t_start = time.time()
    suite = tiny.load_suite(tiny.TinyConfig(), progress=True)
    pre, fts = suite.pretrained, suite.finetuned_list()
    tasks = list(suite.tasks)
    individual = {t: evaluate(suite, suite.finetuned[t], [t])[t] for t in tasks}
    pretrained = evaluate(suite, pre)
    rows = []
    for lam in args.lambdas:
        ta = evaluate(suite, merge("task_arithmetic", pre, fts, scaling_coef=lam))
        for i, t in enumerate(tasks):
            alone = evaluate(suite, scaled_alone(pre, fts[i], lam), [t])[t]
            rows.append({"task": t, "lambda": lam, "pretrained": pretrained[t], "individual": individual[t],
                         "alone": alone, "task_arithmetic": ta[t],
                         "scaling_loss": individual[t] - alone, "interference": alone - ta[t]})
        sub = pd.DataFrame([r for r in rows if r["lambda"] == lam])
        print(f"λ {lam:.2f}: TA avg {sub.task_arithmetic.mean():.1f}, alone avg {sub.alone.mean():.1f}; "
              f"scaling loss {sub.scaling_loss.mean():.1f}, interference {sub.interference.mean():.1f} points",
              flush=True)
    frame = pd.DataFrame(rows)
    record = write_study(args.out, "miniature_disentangle", frame, {
        "command": "OMP_NUM_THREADS=1 python benchmarks/miniature_disentangle.py --lambdas "
                   + " ".join(f"{v:g}" for v in args.lambdas),
        "seed": args.seed, "seconds": round(time.time() - t_start, 1)})
    print(f"wrote {args.out / 'miniature_disentangle.csv'} ({len(frame)} rows) in {record['seconds']:.0f} s")

if __name__ == "__main__":
    main()
