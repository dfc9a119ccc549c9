"""Why does entropy minimisation hurt housenum and signs on the miniature? (issue 10, item 7)

Runs layer-wise AdaMerging on the ``tiny`` suite under several settings and two objective
temperatures, plus a miniature whose fine-tunes were retrained against heads at CLIP's logit scale
(100 instead of the pretraining's learned 12.8), and writes one row per run to
``lib/mergebook/assets/studies/miniature_entropy.csv`` with its record (command, seed, device, date) in
``miniature_entropy.json``. Chapter 02 reads both files; it never reruns this study (about 15
minutes on one CPU thread, plus 5 minutes to fine-tune the retrained variant once).

    OMP_NUM_THREADS=1 python benchmarks/miniature_entropy.py [--quick]

``temperature`` divides every head inside the entropy objective only (the argmax, hence accuracy
at fixed weights, is unchanged): 1 is the method as published; 12.78/100 = 0.128 is what CLIP's
logit scale would give. It is a diagnostic, not a change to AdaMerging.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from mergebook.analysis import entropy_coupling  # noqa: E402
from mergebook.artifacts import write_study  # noqa: E402
from mergebook.evaluate import evaluate  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.methods.adamerging import adamerging  # noqa: E402
from mergebook.models import tiny  # noqa: E402

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20-step runs, to smoke-test the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rows, t_start = [], time.time()
    clip_t = None
    settings = [(300, 1, 1e-3), (300, 1, 1e-2), (500, 2, 1e-3)]
    variants = [("learned scale (book default)", {}), ("fine-tuned against heads at 100", {"head_logit_scale": 100.0})]
    for variant, extra in variants:
        suite = tiny.load_suite(tiny.TinyConfig(extra=extra), progress=True)
        scale = float(suite.meta["logit_scale"])
        clip_t = clip_t or float(tiny.load_pretrained()[1]["logit_scale"]) / 100.0
        pre, fts = suite.pretrained, suite.finetuned_list()
        ta = evaluate(suite, merge("task_arithmetic", pre, fts, scaling_coef=0.3))
        ind = {t: evaluate(suite, suite.finetuned[t], [t])[t] for t in suite.tasks}
        ind["avg"] = sum(ind.values()) / len(suite.tasks)
        base = {"variant": variant, "head_scale": round(scale, 3)}
        rows.append({**base, "method": "Individual", **ind})
        rows.append({**base, "method": "Task Arithmetic (λ 0.3)", **ta})
        temps = [1.0, clip_t] if not extra else [1.0]
        for temp in temps:
            cp = entropy_coupling(suite, coefficient=0.3, temperature=temp)
            # the column sums: the task-wise gradient on each λ_j at the TA point (> 0: Adam shrinks λ_j)
            rows.append({**base, "method": f"dH/dλ column sum at TA (T={temp:.3f})", "temperature": temp,
                         **{t: float(cp[t].sum()) for t in suite.tasks}})
            for steps, bpp, lr in (settings if not extra else settings[:1]):
                if args.quick:
                    steps = 20
                s = suite if temp == 1.0 else replace(suite, heads={k: h / temp for k, h in suite.heads.items()})
                t0 = time.time()
                res = adamerging(s, "layer", False, steps=steps, lr=lr, batches_per_step=bpp, seed=args.seed,
                                 device="cpu", eval_every=10**9, progress=True)
                acc = evaluate(suite, res.state_dict())
                rows.append({**base, "method": "Layer-wise AdaMerging", "temperature": temp, "steps": steps,
                             "batches": bpp, "lr": lr, "seconds": round(time.time() - t0, 1), **acc})
                print(f"{variant} T={temp:.3f} {steps}x{bpp} lr {lr}: avg {acc['avg']:.1f} "
                      f"(TA {ta['avg']:.1f}), housenum {acc['housenum']:.1f}, signs {acc['signs']:.1f}", flush=True)
    frame = pd.DataFrame(rows)
    record = write_study(args.out, "miniature_entropy", frame, {
        "command": "OMP_NUM_THREADS=1 python benchmarks/miniature_entropy.py" + (" --quick" if args.quick else ""),
        "seed": args.seed, "quick": args.quick, "clip_temperature": clip_t,
        "seconds": round(time.time() - t_start, 1)})
    print(f"wrote {args.out / 'miniature_entropy.csv'} ({len(frame)} rows) in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
