"""Pilot: does the miniature's pretraining objective set how well entropy minimisation works?

The committed backbone was pretrained with label smoothing 0.1, which keeps CLIP's learnable
temperature low (it ends at 12.8; CLIP's climbs to its cap of 100). This pilot pretrains two short
backbones that differ only in label smoothing, fine-tunes the eight tasks on each, and runs Task
Arithmetic and layer-wise AdaMerging on both. Everything goes to a scratch cache (``--work``); the
committed assets and the book's cache are never touched. One row per backbone and run goes to
``lib/mergebook/assets/studies/miniature_pilot.csv`` with its record.

    OMP_NUM_THREADS=1 python benchmarks/miniature_pilot.py [--steps 2000] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
os.environ["MERGEBOOK_RETRAIN"] = "1"  # never pick up the committed fine-tunes: they belong to another backbone

from mergebook import artifacts  # noqa: E402
from mergebook.analysis import entropy_coupling  # noqa: E402
from mergebook.evaluate import evaluate  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.methods.adamerging import adamerging  # noqa: E402
from mergebook.models import tiny, tiny_train  # noqa: E402

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="pretraining steps per backbone")
    p.add_argument("--n-images", type=int, default=40000)
    p.add_argument("--smoothing", type=float, nargs="+", default=[0.1, 0.0])
    p.add_argument("--quick", action="store_true", help="a few steps everywhere, to smoke-test the script")
    p.add_argument("--work", type=Path, default=Path("runs/pilot"))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_images = 20, 512
    args.work.mkdir(parents=True, exist_ok=True)
    rows, t_start = [], time.time()
    data_cache = args.work / f"pretrain_data_{args.n_images}.npz"
    for ls in args.smoothing:
        ckpt = args.work / f"backbone_ls{ls:g}_{args.steps}.safetensors"
        if not ckpt.exists():
            tiny_train.pretrain(ckpt, steps=args.steps, n_images=args.n_images, label_smoothing=ls, seed=0,
                                warmup=min(500, args.steps // 10), data_cache=data_cache)
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(ckpt), "pt") as f:
            meta = dict(f.metadata() or {})
        sd = load_file(str(ckpt))
        tiny.load_pretrained = lambda sd=sd, meta=meta: (sd, meta)  # the pilot's backbone, for this process only
        cache = artifacts.Cache(f"pilot-ls{ls:g}-{args.steps}", root=args.work / "cache")
        cfg = tiny.TinyConfig(ft_steps=20 if args.quick else tiny.TinyConfig().ft_steps, n_train=256 if args.quick else 2000)
        suite = tiny.load_suite(cfg, cache=cache, progress=True)
        pre, fts = suite.pretrained, suite.finetuned_list()
        base = {"label_smoothing": ls, "pretrain_steps": args.steps, "logit_scale": float(meta["logit_scale"])}
        zs = evaluate(suite, pre)
        ind = {t: evaluate(suite, suite.finetuned[t], [t])[t] for t in suite.tasks}
        ind["avg"] = sum(ind.values()) / len(suite.tasks)
        ta = evaluate(suite, merge("task_arithmetic", pre, fts, scaling_coef=0.3))
        rows += [{**base, "method": "Pretrained", **zs}, {**base, "method": "Individual", **ind},
                 {**base, "method": "Task Arithmetic (λ 0.3)", **ta}]
        cp = entropy_coupling(suite, 0.3)
        rows.append({**base, "method": "dH/dλ column sum at TA", **{t: float(cp[t].sum()) for t in suite.tasks}})
        for steps, bpp, lr in [(300, 1, 1e-3), (500, 2, 1e-3)]:
            steps = 10 if args.quick else steps
            res = adamerging(suite, "layer", False, steps=steps, lr=lr, batches_per_step=bpp, seed=0, device="cpu",
                             eval_every=10**9, progress=True)
            acc = evaluate(suite, res.state_dict())
            rows.append({**base, "method": "Layer-wise AdaMerging", "steps": steps, "batches": bpp, "lr": lr, **acc})
            print(f"label smoothing {ls:g} (scale {base['logit_scale']:.1f}): pretrained {zs['avg']:.1f}, "
                  f"individual {ind['avg']:.1f}, TA {ta['avg']:.1f}, LW AM {steps}x{bpp} {acc['avg']:.1f} "
                  f"({sum(acc[t] < ta[t] for t in suite.tasks)} tasks below TA)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    name = "miniature_pilot" + ("_quick" if args.quick else "")
    artifacts.atomic_write(args.out / f"{name}.csv", lambda tmp: frame.to_csv(tmp, index=False))
    record = {"command": "OMP_NUM_THREADS=1 python benchmarks/miniature_pilot.py " + " ".join(argv or sys.argv[1:]),
              "seed": 0, "pretrain_steps": args.steps, "n_images": args.n_images,
              "device": f"cpu ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
              "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t_start, 1)}
    artifacts.atomic_write(args.out / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    print(f"wrote {args.out / name}.csv ({len(frame)} rows) in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
