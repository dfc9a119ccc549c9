"""How much can merge coefficients gain on the miniature at all? (issue 10, item 7)

Layer-wise AdaMerging learns λ by entropy minimisation. Whether the miniature's compressed gain
comes from that *objective* or from the *coefficient space* (the miniature's task vectors, whatever
the λ) is separated by replacing the entropy with the cross-entropy on labelled images:

- ``supervised (val)``: labelled held-out val images (200 per task), evaluated on test; the best
  λ any label-free objective could hope to find, up to val/test sampling;
- ``oracle (test)``: labelled test images themselves; a transductive ceiling of the space.

Everything else is AdaMerging's loop (λ initialised at 0.3, clamped to [0, 1], Adam, batches of
16 per task per step, seeded). It writes one row per run to
``lib/mergebook/assets/studies/miniature_headroom.csv`` and its record (command, seed, device,
date) to ``miniature_headroom.json``. Chapter 02 reads both files and never reruns the study
(about 15 minutes on one CPU thread).

    OMP_NUM_THREADS=1 python benchmarks/miniature_headroom.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from mergebook.adaptation import supervised_coefficients  # noqa: E402
from mergebook.artifacts import atomic_write  # noqa: E402
from mergebook.evaluate import evaluate, head_logits  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.methods.adamerging import adamerging, adamerging_space  # noqa: E402
from mergebook.models import tiny  # noqa: E402

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"


def supervised(suite, space, split, granularity, steps, lr, seed):
    """The merged weights at λ from ``supervised_coefficients`` (cross-entropy on ``split``'s labels)."""
    lam = supervised_coefficients(suite, space, split, granularity=granularity, steps=steps, lr=lr,
                                  seed=seed, log_every=50)
    with torch.no_grad():
        return space.merge(lam)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10-step runs, to smoke-test the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--append-oracle", type=int, metavar="STEPS", default=0,
                   help="only run the layer-wise oracle (lr 1e-2) for STEPS steps and append its row to the "
                        "recorded study (does the 300-step ceiling still rise?)")
    args = p.parse_args(argv)
    if args.append_oracle:
        return append_oracle(args)
    torch.manual_seed(args.seed)
    steps = 10 if args.quick else 300
    t_start = time.time()
    suite = tiny.load_suite(tiny.TinyConfig(), progress=True)
    pre, fts = suite.pretrained, suite.finetuned_list()
    space = adamerging_space(suite, False, device="cpu")
    rows = []

    def add(method, objective, granularity, lr, acc, seconds=None):
        rows.append({"method": method, "objective": objective, "granularity": granularity,
                     "steps": steps if lr else None, "lr": lr, "seconds": seconds, **acc})
        print(f"{method}: avg {acc['avg']:.1f} (housenum {acc['housenum']:.1f}, signs {acc['signs']:.1f})", flush=True)

    ind = {t: evaluate(suite, suite.finetuned[t], [t])[t] for t in suite.tasks}
    ind["avg"] = sum(ind.values()) / len(suite.tasks)
    add("Individual", "-", "-", None, ind)
    add("Task Arithmetic (λ 0.3)", "-", "-", None, evaluate(suite, merge("task_arithmetic", pre, fts, scaling_coef=0.3)))
    for granularity in ("task", "layer"):
        t0 = time.time()
        res = adamerging(suite, granularity, False, steps=steps, lr=1e-3, batches_per_step=1, seed=args.seed,
                         device="cpu", eval_every=10**9, progress=True)
        add(f"{granularity.capitalize()}-wise AdaMerging", "entropy (test images, no labels)", granularity, 1e-3,
            evaluate(suite, res.state_dict()), round(time.time() - t0, 1))
        for split, objective in (("val", "cross-entropy, val labels"), ("test", "cross-entropy, test labels (oracle)")):
            for lr in (1e-3, 1e-2):
                t0 = time.time()
                merged = supervised(suite, space, split, granularity, steps, lr, args.seed)
                label = "supervised" if split == "val" else "oracle"
                add(f"{granularity.capitalize()}-wise {label} λ", objective, granularity, lr,
                    evaluate(suite, merged), round(time.time() - t0, 1))
    args.out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    atomic_write(args.out / "miniature_headroom.csv", lambda tmp: frame.to_csv(tmp, index=False))
    record = {"command": "OMP_NUM_THREADS=1 python benchmarks/miniature_headroom.py" + (" --quick" if args.quick else ""),
              "seed": args.seed, "quick": args.quick, "steps": steps, "batch_size": 16,
              "device": f"cpu ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
              "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t_start, 1)}
    atomic_write(args.out / "miniature_headroom.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    print(f"wrote {args.out / 'miniature_headroom.csv'} ({len(frame)} rows) in {record['seconds']:.0f} s")


def append_oracle(args) -> None:
    """One longer layer-wise oracle run, appended to the recorded CSV (its record notes the command)."""
    t0 = time.time()
    frame = pd.read_csv(args.out / "miniature_headroom.csv")
    record = json.loads((args.out / "miniature_headroom.json").read_text())
    suite = tiny.load_suite(tiny.TinyConfig(), progress=True)
    space = adamerging_space(suite, False, device="cpu")
    merged = supervised(suite, space, "test", "layer", args.append_oracle, 1e-2, args.seed)
    acc = evaluate(suite, merged)
    row = {"method": "Layer-wise oracle λ", "objective": "cross-entropy, test labels (oracle)", "granularity": "layer",
           "steps": args.append_oracle, "lr": 1e-2, "seconds": round(time.time() - t0, 1), **acc}
    frame = pd.concat([frame, pd.DataFrame([row])], ignore_index=True)
    atomic_write(args.out / "miniature_headroom.csv", lambda tmp: frame.to_csv(tmp, index=False))
    record.setdefault("appended", []).append(
        f"OMP_NUM_THREADS=1 python benchmarks/miniature_headroom.py --append-oracle {args.append_oracle}"
        f" ({time.strftime('%Y-%m-%d')}, {row['seconds']:.0f} s)")
    atomic_write(args.out / "miniature_headroom.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    print(f"layer-wise oracle {args.append_oracle} steps: avg {acc['avg']:.1f}; appended to {args.out}")


if __name__ == "__main__":
    main()
