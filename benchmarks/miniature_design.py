"""Is it the task design or the prototype heads that makes entropy mislead? (issue 10, item 7)

Layer-wise AdaMerging lowers two miniature tasks, housenum and signs, below Task Arithmetic. The
earlier studies tested the logit scale, the backbone and the fine-tuning regime. This one tests the
two explanations left: the *design* of those two tasks (housenum's neighbouring digits and photo
clutter, signs' photo clutter), and the *prototype heads* (three images per class). Each variant
re-renders or re-heads only what it names, re-fine-tunes the tasks it changes exactly as the book
does (``TinyConfig``: 400 steps, lr 3e-4, same seeds), keeps the committed fine-tunes of the
others, and merges: Task Arithmetic (λ 0.3), layer-wise AdaMerging (entropy, 300 × 1, lr 1e-3)
and the layer-wise oracle λ (cross-entropy on the test labels, 300 steps, lr 1e-2; a ceiling,
never a method). Rows go to ``lib/mergebook/assets/studies/miniature_design.csv`` with a record in
``miniature_design.json``; chapter 02 reads them and never reruns the study.

    OMP_NUM_THREADS=1 python benchmarks/miniature_design.py [--quick] [--variants ...]
    # two processes at once, then collect:
    ... --variants first-design housenum-without-neighbours --part a ; ... --part b ; ... --collect
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from mergebook.adaptation import supervised_coefficients  # noqa: E402
from mergebook.artifacts import atomic_write  # noqa: E402
from mergebook.data import render as R  # noqa: E402
from mergebook.data import tiny_suite  # noqa: E402
from mergebook.evaluate import evaluate  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.methods.adamerging import adamerging, adamerging_space  # noqa: E402
from mergebook.models import tiny  # noqa: E402
from mergebook.models.suite import TaskData  # noqa: E402
from mergebook.models.tiny_train import to_tensor  # noqa: E402

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"
PARTS = ROOT / "runs" / "design"
SIZE = R.SIZE


def housenum_with_neighbours(rng, label, split):
    """The first design of housenum: up to two neighbouring digits, as tall as the centre one and
    15 px away, cut by the frame (the book drops them since this study)."""
    bg = R.background(rng, ["noise", "photo", "gradient"][int(rng.integers(3))],
                      tiny_suite._photos(tiny_suite.CLUTTER_SOURCES))
    fonts = tiny_suite._fonts_for(tuple("0123456789"))
    col = R.contrasting_color(rng, bg.mean(axis=(0, 1)), 0.5)
    for dx in (-15, 15):
        if rng.random() < 0.7:
            nb = R.place(R.glyph(fonts[int(rng.integers(len(fonts)))], str(int(rng.integers(10)))), rng,
                         height=(0.55, 0.75), rotate=8, shift=1.5,
                         center=(SIZE / 2 - 0.5, SIZE / 2 - 0.5 + dx))
            bg = R.composite(bg, nb, col)
    m = R.place(R.glyph(fonts[int(rng.integers(len(fonts)))], str(label)), rng,
                height=(0.55, 0.75), rotate=8, shift=2)
    img = R.composite(bg, m, col)
    return R.finish(rng, img, noise=0.04, blur=rng.uniform(0, 0.8), jitter=0.2)


def _plain_backgrounds(fn):
    """``fn`` with its photo/noise backgrounds replaced by plain or gradient ones."""
    def wrapped(rng, label, split):
        real = R.background

        def background(rng_, kind, photos=None):
            return real(rng_, "plain" if kind in ("photo", "noise") and rng_.random() < 0.5 else
                        ("gradient" if kind in ("photo", "noise") else kind), photos)
        R.background = background
        try:
            return fn(rng, label, split)
        finally:
            R.background = real
    return wrapped


# variant -> (renderers that replace the book's, prototypes per class or None for the book's 3).
# The study was run before the book dropped housenum's neighbours, against that first design:
# every variant but "housenum without neighbours" (now the book itself) draws them explicitly, so
# a rerun reproduces the recorded rows.
FIRST = "first design (housenum with neighbours)"
NO_NEIGHBOURS = "housenum without neighbours (the book since)"
VARIANTS = {
    FIRST: ({"housenum": housenum_with_neighbours}, None),
    NO_NEIGHBOURS: ({}, None),
    "housenum on plain backgrounds": ({"housenum": _plain_backgrounds(housenum_with_neighbours)}, None),
    "signs on plain backgrounds": ({"housenum": housenum_with_neighbours,
                                    "signs": _plain_backgrounds(tiny_suite._signs)}, None),
    "housenum + signs redesigned": ({"housenum": _plain_backgrounds(tiny_suite._housenum),
                                     "signs": _plain_backgrounds(tiny_suite._signs)}, None),
    "heads from 20 images per class": ({"housenum": housenum_with_neighbours}, 20),
}
# the variant names under which the parts were first recorded (before the book changed)
RECORDED_AS = {"book": FIRST, "housenum without neighbours": NO_NEIGHBOURS}
SLUG = {name: name.split(" (")[0].replace(" + ", "-").replace(" ", "-") for name in VARIANTS}
SLUG[FIRST] = "first-design"


def _generate(task, fn, split, n, seed):
    real = tiny_suite.TASK_SPECS[task]
    tiny_suite.TASK_SPECS[task] = (fn, real[1])
    try:
        return tiny_suite.generate(task, split, n, seed=seed)
    finally:
        tiny_suite.TASK_SPECS[task] = real


def variant_suite(book, name, cfg):
    """The book's suite with the variant's tasks re-rendered/re-headed and re-fine-tuned."""
    renderers, protos = VARIANTS[name]
    if not renderers and protos is None:
        return book, {}
    pre = book.pretrained
    model = book.model
    changed = list(book.tasks) if protos is not None else list(renderers)
    data = {}
    for task in changed:
        fn = renderers.get(task, tiny_suite.TASK_SPECS[task][0])
        k = tiny_suite.num_classes(task)
        sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test,
                 "proto": (protos or cfg.protos_per_class) * k}
        data[task] = {}
        for split, n in sizes.items():
            x, y = _generate(task, fn, split, n, cfg.data_seed)
            data[task][split] = (x, torch.from_numpy(y))
    heads = dict(book.heads)
    heads.update(tiny.build_heads(model, pre, data, book.meta["logit_scale"], tuple(changed)))
    finetuned, test, val = dict(book.finetuned), dict(book.test), dict(book.val)
    for task in changed:
        i = list(book.tasks).index(task)
        finetuned[task] = tiny._train(model, pre, tiny._batches([data[task]["train"]], cfg.ft_batch, cfg.ft_seed + i),
                                      [heads[task]], cfg.ft_steps, cfg.ft_lr, cfg.ft_weight_decay, cfg.ft_warmup,
                                      f"fine-tune {task} ({name})", True)
        test[task] = TaskData(to_tensor(data[task]["test"][0]), data[task]["test"][1])
        val[task] = TaskData(to_tensor(data[task]["val"][0]), data[task]["val"][1])
    suite = replace(book, finetuned=finetuned, heads=heads, test=test, val=val).derived(design=name)
    return suite, {"changed": changed}


def run_variant(book, name, cfg, steps, seed):
    t0 = time.time()
    suite, info = variant_suite(book, name, cfg)
    pre, fts, tasks = suite.pretrained, suite.finetuned_list(), suite.tasks
    zero = evaluate(suite, pre)
    ind = {t: evaluate(suite, suite.finetuned[t], [t])[t] for t in tasks}
    ta = evaluate(suite, merge("task_arithmetic", pre, fts, scaling_coef=0.3))
    res = adamerging(suite, "layer", False, steps=steps, lr=1e-3, batches_per_step=1, seed=seed,
                     device="cpu", eval_every=10**9, progress=True)
    space = adamerging_space(suite, False, device="cpu")
    lam = supervised_coefficients(suite, space, "test", granularity="layer", steps=steps, lr=1e-2,
                                  seed=seed, log_every=100)
    with torch.no_grad():
        oracle = evaluate(suite, space.merge(lam))
    am = evaluate(suite, res.state_dict())
    base = {"variant": name, "changed": " ".join(info.get("changed", [])) or "none"}
    rows = [{**base, "method": "Pretrained", **zero},
            {**base, "method": "Individual", **ind, "avg": float(np.mean(list(ind.values())))},
            {**base, "method": "Task Arithmetic (λ 0.3)", **ta},
            {**base, "method": "Layer-wise AdaMerging", **am},
            {**base, "method": "Layer-wise oracle λ", **oracle}]
    for r in rows:
        r["seconds"] = round(time.time() - t0, 1)
    below = sum(am[t] < ta[t] for t in tasks)
    print(f"{name}: zero-shot {zero['avg']:.1f}, individual {rows[1]['avg']:.1f}, TA {ta['avg']:.1f}, "
          f"LW AM {am['avg']:.1f} ({am['avg'] - ta['avg']:+.1f}, {below} below TA; housenum {ta['housenum']:.1f}"
          f" -> {am['housenum']:.1f}, signs {ta['signs']:.1f} -> {am['signs']:.1f}), oracle {oracle['avg']:.1f}"
          f" ({time.time() - t0:.0f} s)", flush=True)
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10-step merges (the fine-tunes run in full)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(SLUG.values()), choices=list(SLUG.values()))
    p.add_argument("--part", help="write runs/design/<part>.csv only (run parts in parallel, then --collect)")
    p.add_argument("--collect", action="store_true", help="join runs/design/*.csv into the recorded study")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    steps = 10 if args.quick else 300
    t_start = time.time()
    if args.collect:
        parts = sorted(PARTS.glob("*.csv"))
        frame = pd.concat([pd.read_csv(f) for f in parts], ignore_index=True)
        frame["variant"] = frame["variant"].replace(RECORDED_AS)
        order = {n: i for i, n in enumerate(VARIANTS)}
        frame = frame.sort_values("variant", key=lambda s: s.map(order), kind="stable").reset_index(drop=True)
        meta = [json.loads(f.with_suffix(".json").read_text()) for f in parts]
        seconds = {RECORDED_AS.get(k, k): v for m in meta for k, v in m["seconds_per_variant"].items()}
        record = {**meta[0], "command": "OMP_NUM_THREADS=1 python benchmarks/miniature_design.py --part a|b "
                  "(two processes at once, one thread each), then --collect", "recorded_as": RECORDED_AS,
                  "parts": [m["command"] for m in meta], "seconds_per_variant": seconds,
                  "seconds": round(sum(seconds.values()), 1)}
    else:
        book = tiny.load_suite(progress=True)
        cfg = tiny.TinyConfig()
        names = [n for n, s in SLUG.items() if s in args.variants]
        rows, seconds = [], {}
        for name in names:
            t0 = time.time()
            rows += run_variant(book, name, cfg, steps, args.seed)
            seconds[name] = round(time.time() - t0, 1)
        frame = pd.DataFrame(rows)
        cmd = "OMP_NUM_THREADS=1 python benchmarks/miniature_design.py" + (" --quick" if args.quick else "")
        if args.part:
            cmd += " --variants " + " ".join(SLUG[n] for n in names) + f" --part {args.part}"
        record = {"command": cmd, "seed": args.seed, "quick": args.quick, "steps": steps,
                  "protos_per_class": cfg.protos_per_class, "ft_steps": cfg.ft_steps, "ft_lr": cfg.ft_lr,
                  "seconds_per_variant": seconds,
                  "device": f"cpu ({platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads)",
                  "date": time.strftime("%Y-%m-%d"), "seconds": round(time.time() - t_start, 1)}
        if args.part:
            PARTS.mkdir(parents=True, exist_ok=True)
            atomic_write(PARTS / f"{args.part}.csv", lambda tmp: frame.to_csv(tmp, index=False))
            atomic_write(PARTS / f"{args.part}.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
            print(f"wrote {PARTS / args.part}.csv ({len(frame)} rows)")
            return
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "miniature_design.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write(args.out / "miniature_design.json", lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    print(f"wrote {args.out / 'miniature_design.csv'} ({len(frame)} rows) in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
