"""Do the miniature's task vectors interfere because its eight tasks share one image domain? (issue 10, item 7)

CLIP's eight tasks come from eight image domains (MNIST's grey digits, SVHN's street photos,
EuroSAT's satellite tiles, DTD's textures, ...), so a fine-tune mostly changes how the backbone
treats *its own* domain's inputs. The miniature draws all eight tasks the same way: a glyph or
shape on a clutter background, through the same photometric finish. The disentangling study
(``miniature_disentangle.py``) found that interference, not only scaling, makes up a large part
of Task Arithmetic's gap. If interference comes from shared inputs, giving every task its own
domain should shrink it, and with it the compression of every method's gain.

Each variant re-renders *all eight tasks* through a fixed, task-specific domain transform,
re-fine-tunes them exactly as the book does (``TinyConfig``), keeps the committed backbone, and
measures: zero-shot, individual, Task Arithmetic (λ 0.3), each task vector alone at λ 0.3 (so the
gap splits into scaling loss and interference as in the disentangling study), layer-wise
AdaMerging (entropy, 300 × 1, lr 1e-3) and the layer-wise oracle λ (test labels; a ceiling, never
a method). Variants:

- ``book``: the book's tasks (baseline; no re-fine-tune);
- ``palettes``: each task's image is half blended with a task-specific duotone of its luminance
  (a dark and a light colour per task), the way a dataset's camera and subject give it a colour cast;
- ``frames``: a 3-px border in a task-specific colour pair (a constant "domain signature" a
  ViT can read from its border patches), the image otherwise unchanged.

One row per (variant, quantity) goes to ``lib/mergebook/assets/studies/miniature_domains.csv``
with its record in ``miniature_domains.json``.

    OMP_NUM_THREADS=1 python benchmarks/miniature_domains.py --variants book palettes --part a
    OMP_NUM_THREADS=1 python benchmarks/miniature_domains.py --variants frames --part b
    python benchmarks/miniature_domains.py --collect
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from mergebook.adaptation import supervised_coefficients  # noqa: E402
from mergebook.artifacts import atomic_write, write_study  # noqa: E402
from mergebook.data import tiny_suite  # noqa: E402
from mergebook.evaluate import evaluate  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.methods.adamerging import adamerging, adamerging_space  # noqa: E402
from mergebook.models import tiny  # noqa: E402


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


design = _load("miniature_design")          # variant_suite: re-render, re-head, re-fine-tune
disentangle = _load("miniature_disentangle")  # scaled_alone: pre + λ·τ_t

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"
PARTS = ROOT / "runs" / "domains"
# one (dark, light) colour pair per task, far apart in RGB; fixed, so every split shares it
PAIRS = [((0.05, 0.05, 0.05), (0.95, 0.95, 0.95)),   # digits: grey, as MNIST
         ((0.10, 0.05, 0.30), (1.00, 0.85, 0.40)),   # housenum
         ((0.00, 0.25, 0.10), (0.75, 1.00, 0.75)),   # letters
         ((0.35, 0.00, 0.00), (1.00, 0.75, 0.70)),   # greek
         ((0.00, 0.10, 0.35), (0.70, 0.90, 1.00)),   # signs
         ((0.25, 0.15, 0.00), (0.95, 0.85, 0.60)),   # textures
         ((0.30, 0.00, 0.30), (1.00, 0.70, 1.00)),   # shapes
         ((0.00, 0.30, 0.30), (0.70, 1.00, 1.00))]   # patterns
LUMA = np.array([0.299, 0.587, 0.114])


def _palette(fn, dark, light, alpha=0.5):
    dark, light = np.asarray(dark), np.asarray(light)

    def wrapped(rng, label, split):
        x = fn(rng, label, split).astype(np.float64) / 255
        duo = dark + (x @ LUMA)[..., None] * (light - dark)
        return (np.clip(alpha * x + (1 - alpha) * duo, 0, 1) * 255 + 0.5).astype(np.uint8)
    return wrapped


def _frame(fn, outer, inner, width=3):
    outer = (np.asarray(outer) * 255 + 0.5).astype(np.uint8)
    inner = (np.asarray(inner) * 255 + 0.5).astype(np.uint8)

    def wrapped(rng, label, split):
        x = fn(rng, label, split).copy()
        x[:width], x[-width:], x[:, :width], x[:, -width:] = outer, outer, outer, outer
        x[1, 1:-1], x[-2, 1:-1], x[1:-1, 1], x[1:-1, -2] = inner, inner, inner, inner
        return x
    return wrapped


def _all_tasks(wrap):
    return {t: wrap(tiny_suite.TASK_SPECS[t][0], *PAIRS[i]) for i, t in enumerate(tiny_suite.TASKS)}


VARIANTS = {"book": {}, "palettes": _all_tasks(_palette), "frames": _all_tasks(_frame)}


def run_variant(book, name, cfg, steps, seed):
    t0 = time.time()
    design.VARIANTS[name] = (VARIANTS[name], None)
    suite, _ = design.variant_suite(book, name, cfg)
    return measure(suite, name, steps, seed, t0)


def measure(suite, name, steps, seed, t0):
    """Zero-shot, individual, each vector alone and TA at λ 0.3, layer-wise AdaMerging (entropy,
    ``steps`` × 1) and the layer-wise oracle λ of one suite: rows of the study, and seconds since t0."""
    pre, fts, tasks = suite.pretrained, suite.finetuned_list(), list(suite.tasks)
    zero = evaluate(suite, pre)
    ind = {t: evaluate(suite, suite.finetuned[t], [t])[t] for t in tasks}
    alone = {t: evaluate(suite, disentangle.scaled_alone(pre, fts[i], 0.3), [t])[t] for i, t in enumerate(tasks)}
    ta = evaluate(suite, merge("task_arithmetic", pre, fts, scaling_coef=0.3))
    res = adamerging(suite, "layer", False, steps=steps, lr=1e-3, batches_per_step=1, seed=seed,
                     device="cpu", eval_every=10**9, progress=True)
    am = evaluate(suite, res.state_dict())
    space = adamerging_space(suite, False, device="cpu")
    lam = supervised_coefficients(suite, space, "test", granularity="layer", steps=steps, lr=1e-2,
                                  seed=seed, log_every=100)
    with torch.no_grad():
        oracle = evaluate(suite, space.merge(lam))
    avg = lambda d: float(np.mean([d[t] for t in tasks]))  # noqa: E731
    ind["avg"], alone["avg"] = avg(ind), avg(alone)
    measured = {"Pretrained": zero, "Individual": ind, "Alone (λ 0.3)": alone, "Task Arithmetic (λ 0.3)": ta,
                "Layer-wise AdaMerging": am, "Layer-wise oracle λ": oracle}
    rows = [{"variant": name, "method": m, **{t: r[t] for t in tasks + ["avg"]}} for m, r in measured.items()]
    seconds = round(time.time() - t0, 1)
    print(f"{name}: zero-shot {zero['avg']:.1f}, individual {ind['avg']:.1f}, alone {alone['avg']:.1f}, "
          f"TA {ta['avg']:.1f} (scaling loss {ind['avg'] - alone['avg']:.1f}, interference "
          f"{alone['avg'] - ta['avg']:.1f}), LW AM {am['avg']:.1f} ({am['avg'] - ta['avg']:+.1f}, "
          f"{sum(am[t] < ta[t] for t in tasks)} below TA), oracle {oracle['avg']:.1f} ({seconds:.0f} s)", flush=True)
    return rows, seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10-step merges (the fine-tunes run in full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--part", help="write runs/domains/<part>.csv only (run parts in parallel, then --collect)")
    p.add_argument("--collect", action="store_true", help="join runs/domains/*.csv into the recorded study")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    steps = 10 if args.quick else 300
    t_start = time.time()
    if args.collect:
        parts = sorted(PARTS.glob("*.csv"))
        if not parts:
            p.error(f"no parts under {PARTS}; run with --part first")
        frame = pd.concat([pd.read_csv(f) for f in parts], ignore_index=True)
        order = {n: i for i, n in enumerate(VARIANTS)}
        frame = frame.sort_values("variant", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
        meta = [json.loads(f.with_suffix(".json").read_text()) for f in parts]
        seconds = {k: v for m in meta for k, v in m["seconds_per_variant"].items()}
        record = {**meta[0], "command": "OMP_NUM_THREADS=1 python benchmarks/miniature_domains.py --part a|b "
                  "(two processes at once, one thread each), then --collect",
                  "parts": [m["command"] for m in meta], "seconds_per_variant": seconds,
                  "seconds": round(sum(seconds.values()), 1)}
        write_study(args.out, "miniature_domains", frame, record)
        print(f"wrote {args.out / 'miniature_domains.csv'} ({len(frame)} rows)")
        return
    book = tiny.load_suite(progress=True)
    cfg = tiny.TinyConfig()
    rows, seconds = [], {}
    for name in args.variants:
        r, s = run_variant(book, name, cfg, steps, args.seed)
        rows += r
        seconds[name] = s
    frame = pd.DataFrame(rows)
    cmd = "OMP_NUM_THREADS=1 python benchmarks/miniature_domains.py" + (" --quick" if args.quick else "")
    cmd += " --variants " + " ".join(args.variants) + (f" --part {args.part}" if args.part else "")
    record = {"command": cmd, "seed": args.seed, "quick": args.quick, "steps": steps, "ft_steps": cfg.ft_steps,
              "ft_lr": cfg.ft_lr, "seconds_per_variant": seconds, "seconds": round(time.time() - t_start, 1)}
    if args.part:
        PARTS.mkdir(parents=True, exist_ok=True)
        atomic_write(PARTS / f"{args.part}.csv", lambda tmp: frame.to_csv(tmp, index=False))
        atomic_write(PARTS / f"{args.part}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        print(f"wrote {PARTS / args.part}.csv ({len(frame)} rows)")
        return
    write_study(args.out, "miniature_domains", frame, record)
    print(f"wrote {args.out / 'miniature_domains.csv'} ({len(frame)} rows) in {record['seconds']:.0f} s")


if __name__ == "__main__":
    main()
