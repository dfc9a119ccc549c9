"""Does the miniature's fine-tuning regime compress the learned-coefficient gain? (issue 10, item 7)

CLIP's task vectors come from a long, gentle fine-tune (task_vectors: lr 1e-5, thousands of steps),
and stay small beside the pretrained weights. The miniature fine-tunes 400 steps at lr 3e-4. This
study re-fine-tunes the committed backbone's eight tasks at other learning rates (everything else
as the book: ``TinyConfig``), and for each regime measures the individual and Task Arithmetic
(λ = 0.3) averages, the relative task-vector norm ‖τ_k‖ / ‖θ_pre‖, the mean pairwise cosine,
layer-wise AdaMerging (entropy, 300 × 1, lr 1e-3) and the labelled ceiling of the layer-wise
space (``supervised_coefficients`` on the test labels, 300 steps, lr 1e-2). One row per regime and
quantity goes to ``lib/mergebook/assets/studies/miniature_regime.csv`` with its record in
``miniature_regime.json``. Chapter 02 reads both and never reruns the study (about 23 minutes on
one CPU thread: each new regime fine-tunes eight tasks; the recorded one ran ``--lrs 3e-4 1e-3``
and ``--lrs 3e-3`` as two one-thread processes and concatenated their rows).

    OMP_NUM_THREADS=1 python benchmarks/miniature_regime.py [--quick] [--lrs 3e-4 1e-3 3e-3]
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

from mergebook.adaptation import supervised_coefficients  # noqa: E402
from mergebook.analysis import mean_off_diagonal, task_vector_cosines  # noqa: E402
from mergebook.artifacts import write_study  # noqa: E402
from mergebook.evaluate import evaluate  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.methods.adamerging import adamerging, adamerging_space  # noqa: E402
from mergebook.models import tiny  # noqa: E402
from mergebook.statedict import float_keys  # noqa: E402

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10-step merges (the fine-tunes run in full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    steps = 10 if args.quick else 300
    book_lr = tiny.TinyConfig().ft_lr
    rows, seconds, t_start = [], {}, time.time()
    for ft_lr in args.lrs:
        t0 = time.time()
        suite = tiny.load_suite(tiny.TinyConfig(ft_lr=ft_lr), progress=True)
        pre, fts, tasks = suite.pretrained, suite.finetuned_list(), suite.tasks
        base = {"ft_lr": ft_lr, "book": ft_lr == book_lr}
        keys = float_keys(pre)
        pre_norm = torch.sqrt(sum((pre[k].double() ** 2).sum() for k in keys))
        rel = {t: float(torch.sqrt(sum(((ft[k].double() - pre[k].double()) ** 2).sum() for k in keys)) / pre_norm)
               for t, ft in zip(tasks, fts)}
        cos = task_vector_cosines(pre, fts, tasks)
        ind = {t: evaluate(suite, suite.finetuned[t], [t])[t] for t in tasks}
        ta = evaluate(suite, merge("task_arithmetic", pre, fts, scaling_coef=0.3))
        res = adamerging(suite, "layer", False, steps=steps, lr=1e-3, batches_per_step=1, seed=args.seed,
                         device="cpu", eval_every=10**9, progress=True)
        space = adamerging_space(suite, False, device="cpu")
        lam = supervised_coefficients(suite, space, "test", granularity="layer", steps=steps, lr=1e-2,
                                      seed=args.seed, log_every=100)
        with torch.no_grad():
            oracle = evaluate(suite, space.merge(lam))
        measured = [("relative task-vector norm", {**rel, "avg": sum(rel.values()) / len(rel)}),
                    ("task-vector cosine, mean off-diagonal", {"avg": mean_off_diagonal(cos)}),
                    ("Individual", {**ind, "avg": sum(ind.values()) / len(ind)}),
                    ("Task Arithmetic (λ 0.3)", ta),
                    ("Layer-wise AdaMerging", evaluate(suite, res.state_dict())),
                    ("Layer-wise oracle λ", oracle)]
        for method, values in measured:
            rows.append({**base, "method": method, **values})
        seconds[f"{ft_lr:g}"] = round(time.time() - t0, 1)
        am, orc = measured[4][1]["avg"], oracle["avg"]
        print(f"ft lr {ft_lr:g}: individual {measured[2][1]['avg']:.1f}, TA {ta['avg']:.1f}, LW AM {am:.1f}, "
              f"oracle {orc:.1f}, |τ|/|θ| {measured[0][1]['avg']:.4f} ({seconds[f'{ft_lr:g}']:.0f} s)", flush=True)
    frame = pd.DataFrame(rows)
    record = write_study(args.out, "miniature_regime", frame, {
        "command": "OMP_NUM_THREADS=1 python benchmarks/miniature_regime.py" + (" --quick" if args.quick else ""),
        "seed": args.seed, "quick": args.quick, "steps": steps, "book_ft_lr": book_lr,
        "ft_steps": tiny.TinyConfig().ft_steps, "seconds_per_regime": seconds,
        "seconds": round(time.time() - t_start, 1)})
    print(f"wrote {args.out / 'miniature_regime.csv'} ({len(frame)} rows) in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
