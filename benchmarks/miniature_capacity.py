"""Study: does a wider or deeper miniature backbone let task vectors interfere less?

The miniature's backbone is a 1.2M-parameter ViT (width 128, 6 blocks). This study pretrains two
larger ones on the same recipe as ``miniature_pilot.py`` (label smoothing 0.1, seed 0, same
40000-image pretraining set, default fine-tune settings) and asks whether Task Arithmetic (λ 0.3)
and layer-wise AdaMerging (300 steps x 1 batch, lr 1e-3) behave differently on them:

- wide: width 256, 6 blocks, 8 heads, output 128
- deep: width 128, 12 blocks, 4 heads, output 128

The 128x6 baseline at 2000 steps is not rerun: its rows are copied from the committed pilot
(``assets/studies/miniature_pilot.csv``, label smoothing 0.1) with ``backbone`` "128x6 (pilot)";
the pilot did not record task-vector cosines, so those are empty for it. Per backbone it records
the parameter count, learned logit scale, Pretrained, Individual, TA, the mean off-diagonal cosine
of the task vectors (and each task's mean cosine with the other seven), the column sums of
∂H/∂λ at TA (``analysis.entropy_coupling``) and layer-wise AdaMerging. Scratch files go to
``--work`` (the pretraining data is shared with the pilot's cache file when it exists); the
committed assets and the book's cache are never touched. Results are written after every backbone,
so a run cut short leaves the finished ones.

    OMP_NUM_THREADS=1 python benchmarks/miniature_capacity.py [--backbones deep wide] [--quick]
"""

from __future__ import annotations

import argparse
import functools
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
from mergebook.analysis import entropy_coupling, mean_off_diagonal, task_vector_cosines  # noqa: E402
from mergebook.evaluate import evaluate  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.methods.adamerging import adamerging  # noqa: E402
from mergebook.models import tiny, tiny_train  # noqa: E402
from mergebook.models.vit import ViTConfig, VisionTransformer  # noqa: E402

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"
BACKBONES = {
    "wide": ViTConfig(image_size=32, patch_size=8, width=256, layers=6, heads=8, mlp_ratio=4, output_dim=128),
    "deep": ViTConfig(image_size=32, patch_size=8, width=128, layers=12, heads=4, mlp_ratio=4, output_dim=128),
}
PILOT_METHODS = ("Pretrained", "Individual", "Task Arithmetic (λ 0.3)", "dH/dλ column sum at TA")


def n_params(config: ViTConfig) -> int:
    return sum(p.numel() for p in VisionTransformer(config).parameters())


def pilot_rows(steps: int) -> list[dict]:
    """The committed pilot's label-smoothing-0.1 rows (the 128x6 baseline), AdaMerging 300x1 only."""
    path = OUT / "miniature_pilot.csv"
    if not path.exists():
        return []
    p = pd.read_csv(path)
    p = p[(p.label_smoothing == 0.1) & (p.pretrain_steps == steps)]
    keep = p.method.isin(PILOT_METHODS) | ((p.method == "Layer-wise AdaMerging") & (p.steps == 300) & (p.batches == 1))
    p = p[keep].copy()
    cfg = tiny_train.TINY_VIT
    p.insert(0, "backbone", "128x6 (pilot)")
    for i, (k, v) in enumerate([("width", cfg.width), ("layers", cfg.layers), ("heads", cfg.heads),
                                ("params", n_params(cfg))]):
        p.insert(1 + i, k, v)
    return p.to_dict("records")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbones", nargs="+", choices=sorted(BACKBONES), default=["deep", "wide"],
                   help="in this order (deep is the cheaper one)")
    p.add_argument("--steps", type=int, default=2000, help="pretraining steps per backbone")
    p.add_argument("--n-images", type=int, default=40000)
    p.add_argument("--quick", action="store_true", help="a few steps everywhere, to smoke-test the script")
    p.add_argument("--work", type=Path, default=Path("runs/capacity"))
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.n_images = 20, 512
    args.work.mkdir(parents=True, exist_ok=True)
    # one process only: the data generators would otherwise fan out over the cores
    tiny_train.generate_parallel = functools.partial(tiny_train.generate_parallel, workers=1)
    # the eight tasks' images do not depend on the backbone: generate them once for all backbones
    data_store = artifacts.Cache("capacity-data" + ("-quick" if args.quick else ""), root=args.work / "cache")
    task_data = tiny.task_data
    tiny.task_data = lambda cfg, cache, progress=True: task_data(cfg, data_store, progress)
    pilot_cache = Path("runs/pilot") / f"pretrain_data_{args.n_images}.npz"
    data_cache = pilot_cache if pilot_cache.exists() else args.work / f"pretrain_data_{args.n_images}.npz"
    rows = [] if args.quick else pilot_rows(args.steps)
    t_start, seconds = time.time(), {}
    name = "miniature_capacity" + ("_quick" if args.quick else "")
    args.out.mkdir(parents=True, exist_ok=True)

    def write(done: list[str]) -> None:
        frame = pd.DataFrame(rows)
        artifacts.atomic_write(args.out / f"{name}.csv", lambda tmp: frame.to_csv(tmp, index=False))
        record = {"command": "OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE nice -n 5 python benchmarks/miniature_capacity.py "
                             + " ".join(argv if argv is not None else sys.argv[1:]),
                  "seed": 0, "pretrain_steps": args.steps, "n_images": args.n_images, "label_smoothing": 0.1,
                  "adamerging": "layer-wise, 300 steps x 1 batch of 16 per task, lr 1e-3, init 0.3",
                  "backbones_requested": args.backbones, "backbones_done": done,
                  "complete": done == args.backbones,
                  "baseline": "128x6 rows copied from miniature_pilot.csv (label smoothing 0.1), not rerun; "
                              "no task-vector cosines recorded for it",
                  "pretrain_data": str(data_cache),
                  "device": f"cpu ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
                  "date": time.strftime("%Y-%m-%d"), "seconds_per_backbone": seconds,
                  "seconds": round(time.time() - t_start, 1)}
        artifacts.atomic_write(args.out / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        print(f"wrote {args.out / name}.csv ({len(frame)} rows; done: {', '.join(done) or 'none'})", flush=True)

    done: list[str] = []
    for bb in args.backbones:
        t0 = time.time()
        config = BACKBONES[bb]
        label = f"{config.width}x{config.layers}"
        ckpt = args.work / f"backbone_{label}_ls0.1_{args.steps}.safetensors"
        if not ckpt.exists():
            tiny_train.pretrain(ckpt, steps=args.steps, n_images=args.n_images, label_smoothing=0.1, seed=0,
                                config=config, warmup=min(500, args.steps // 10), data_cache=data_cache)
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(ckpt), "pt") as f:
            meta = dict(f.metadata() or {})
        sd = load_file(str(ckpt))
        if tiny.encoder_config(meta) != config:
            raise RuntimeError(f"{ckpt} holds {tiny.encoder_config(meta)}, not {config}")
        tiny.load_pretrained = lambda sd=sd, meta=meta: (sd, meta)  # this backbone, for this process only
        # the suite's cache keys hash the committed asset's record, not this backbone: one cache per backbone
        cache = artifacts.Cache(f"capacity-{label}-{args.steps}", root=args.work / "cache")
        cfg = tiny.TinyConfig(ft_steps=20 if args.quick else tiny.TinyConfig().ft_steps,
                              n_train=256 if args.quick else 2000)
        suite = tiny.load_suite(cfg, cache=cache, progress=True)
        assert sum(v.numel() for v in suite.pretrained.values()) == n_params(config)
        pre, fts = suite.pretrained, suite.finetuned_list()
        base = {"backbone": label, "width": config.width, "layers": config.layers, "heads": config.heads,
                "params": n_params(config), "label_smoothing": 0.1, "pretrain_steps": args.steps,
                "logit_scale": float(meta["logit_scale"])}
        zs = evaluate(suite, pre)
        ind = {t: evaluate(suite, suite.finetuned[t], [t])[t] for t in suite.tasks}
        ind["avg"] = sum(ind.values()) / len(suite.tasks)
        ta = evaluate(suite, merge("task_arithmetic", pre, fts, scaling_coef=0.3))
        cos = task_vector_cosines(pre, fts, suite.tasks)
        mean_cos = mean_off_diagonal(cos)
        n = len(suite.tasks)
        per_task_cos = {t: float((cos.loc[t].sum() - 1.0) / (n - 1)) for t in suite.tasks}
        rows.extend([{**base, "method": "Pretrained", **zs}, {**base, "method": "Individual", **ind},
                     {**base, "method": "Task Arithmetic (λ 0.3)", **ta},
                     {**base, "method": "task-vector cosine, mean with the other tasks (avg: mean off-diagonal)",
                      **per_task_cos, "avg": mean_cos}])
        cp = entropy_coupling(suite, 0.3)
        rows.append({**base, "method": "dH/dλ column sum at TA", **{t: float(cp[t].sum()) for t in suite.tasks}})
        am_steps, bpp, lr = (10 if args.quick else 300), 1, 1e-3
        res = adamerging(suite, "layer", False, steps=am_steps, lr=lr, batches_per_step=bpp, seed=0, device="cpu",
                         eval_every=10**9, progress=True)
        acc = evaluate(suite, res.state_dict())
        rows.append({**base, "method": "Layer-wise AdaMerging", "steps": am_steps, "batches": bpp, "lr": lr, **acc})
        seconds[label] = round(time.time() - t0, 1)
        done.append(bb)
        print(f"{label} ({base['params']} params, scale {base['logit_scale']:.1f}): pretrained {zs['avg']:.1f}, "
              f"individual {ind['avg']:.1f}, TA {ta['avg']:.1f}, LW AM {am_steps}x{bpp} {acc['avg']:.1f} "
              f"({sum(acc[t] < ta[t] for t in suite.tasks)} tasks below TA), mean cosine {mean_cos:.3f}, "
              f"{seconds[label]:.0f} s", flush=True)
        write(done)
    if not done:
        write(done)


if __name__ == "__main__":
    main()
