"""Does longer pretraining widen the miniature's merging gains? (issue 10, item 7)

Task arithmetic works on CLIP because its task vectors are *weight-disentangled*: each moves the
network only on its own task's inputs. Ortiz-Jiménez et al. (2023, "Task arithmetic in the tangent
space") find that this property emerges during pretraining. The miniature's backbone is a CPU
asset pretrained for 6000 steps; the pilots' 2000-step backbones gave smaller AdaMerging gains
than it does. Pretraining is paid once, off the book's clock (the backbone is committed), so if
longer pretraining widens the gains it is a lever the CI budget allows, unlike a larger backbone.

Each variant continues the committed backbone's pretraining for N more steps on the same 120,000
images (same recipe: AdamW, lr 1e-3 with a fresh 500-step warm-up and cosine decay, label smoothing
0.1, a new classifier), then fine-tunes the eight tasks exactly as the book does (``TinyConfig``)
and measures what the input-domain study measures (``miniature_domains.measure``): zero-shot,
individual, each task vector alone and Task Arithmetic at λ 0.3, layer-wise AdaMerging (entropy,
300 × 1) and the layer-wise oracle λ. The ``book`` row (the committed backbone and fine-tunes) is
copied from the input-domain study, which measured it the same way. Scratch files (the data cache,
backbones, fine-tunes) go under ``runs/pretraining/``; the committed assets are never touched.

    OMP_NUM_THREADS=1 python benchmarks/miniature_pretraining.py --prepare      # the 120,000 images, once
    OMP_NUM_THREADS=1 python benchmarks/miniature_pretraining.py --extra 3000 --part a &
    OMP_NUM_THREADS=1 python benchmarks/miniature_pretraining.py --extra 6000 --part b
    python benchmarks/miniature_pretraining.py --collect
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
os.environ["MERGEBOOK_RETRAIN"] = "1"  # never pick up the committed fine-tunes: they belong to the committed backbone

from mergebook import artifacts  # noqa: E402
from mergebook.analysis import recorded_study  # noqa: E402
from mergebook.artifacts import atomic_write, write_study  # noqa: E402
from mergebook.models import tiny, tiny_train  # noqa: E402
from mergebook.models.vit import VisionTransformer  # noqa: E402

OUT = ROOT / "lib" / "mergebook" / "assets" / "studies"
WORK = ROOT / "runs" / "pretraining"
N_IMAGES, BOOK_STEPS = 120_000, 6000


def _load(name):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def continued_backbone(extra: int, quick: bool) -> tuple[dict, dict]:
    """The committed encoder pretrained ``extra`` more steps (cached under WORK): (state dict, metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    ckpt = WORK / f"backbone_plus{extra}.safetensors"
    if not ckpt.exists():
        init, _ = tiny.load_pretrained()

        def from_init(config):  # pretrain() builds a fresh encoder; start it from the committed one instead
            model = VisionTransformer(config)
            model.load_state_dict(init)
            return model

        tiny_train.VisionTransformer = from_init
        n = 512 if quick else N_IMAGES
        tiny_train.pretrain(ckpt, steps=extra, n_images=n, seed=0, warmup=min(500, max(1, extra // 10)),
                            data_cache=None if quick else WORK / f"data_seed0_{N_IMAGES}.npz")
    with safe_open(str(ckpt), "pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(ckpt)), meta


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--extra", type=int, nargs="+", default=[3000, 6000], help="pretraining steps added")
    p.add_argument("--prepare", action="store_true", help="generate the pretraining images into WORK once")
    p.add_argument("--quick", action="store_true", help="a few steps everywhere, to smoke-test the script")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--part", help="write WORK/<part>.csv only (run parts in parallel, then --collect)")
    p.add_argument("--collect", action="store_true", help="join the parts and the book row into the recorded study")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    if args.prepare:
        x, y = tiny_train.generate_parallel("pretrain", "train", N_IMAGES, seed=0, desc="pretraining data")
        def save(tmp):  # a file object: np.savez would add ".npz" to a temp file's name
            with open(tmp, "wb") as fh:
                np.savez(fh, x=x, y=y)

        atomic_write(WORK / f"data_seed0_{N_IMAGES}.npz", save)
        return
    if args.collect:
        parts = sorted(WORK.glob("part-*.csv"))
        if not parts:
            p.error(f"no parts under {WORK}; run with --part first")
        domains, drec = recorded_study("miniature_domains")
        book = domains[domains["variant"] == "book"].assign(variant=f"book ({BOOK_STEPS} steps)")
        frame = pd.concat([book] + [pd.read_csv(f) for f in parts], ignore_index=True)
        meta = [json.loads(f.with_suffix(".json").read_text()) for f in parts]
        seconds = {k: v for m in meta for k, v in m["seconds_per_variant"].items()}
        record = {**meta[0], "command": "OMP_NUM_THREADS=1 python benchmarks/miniature_pretraining.py --prepare; "
                  "then --extra N --part X per process (one thread each); then --collect",
                  "parts": [m["command"] for m in meta], "seconds_per_variant": seconds,
                  "seconds": round(sum(seconds.values()), 1), "book_row_from": f"miniature_domains ({drec.get('date')})"}
        write_study(args.out, "miniature_pretraining", frame, record)
        print(f"wrote {args.out / 'miniature_pretraining.csv'} ({len(frame)} rows)")
        return
    domains = _load("miniature_domains")
    steps = 10 if args.quick else 300
    rows, seconds = [], {}
    for extra in args.extra:
        t0 = time.time()
        sd, meta = continued_backbone(extra, args.quick)
        tiny.load_pretrained = lambda sd=sd, meta=meta: (sd, meta)  # this backbone, for this process only
        cfg = tiny.TinyConfig(ft_steps=20 if args.quick else tiny.TinyConfig().ft_steps,
                              n_train=256 if args.quick else 2000)
        suite = tiny.load_suite(cfg, cache=artifacts.Cache(f"pretraining-plus{extra}", root=WORK / "cache"))
        name = f"+{extra} steps ({BOOK_STEPS + extra})"
        r, s = domains.measure(suite, name, steps, args.seed, t0)
        rows += [{**row, "logit_scale": float(meta["logit_scale"])} for row in r]
        seconds[name] = s
    frame = pd.DataFrame(rows)
    cmd = "OMP_NUM_THREADS=1 python benchmarks/miniature_pretraining.py" + (" --quick" if args.quick else "")
    cmd += " --extra " + " ".join(map(str, args.extra)) + (f" --part {args.part}" if args.part else "")
    record = {"command": cmd, "seed": args.seed, "quick": args.quick, "steps": steps, "n_images": N_IMAGES,
              "book_pretrain_steps": BOOK_STEPS, "ft_steps": cfg.ft_steps, "seconds_per_variant": seconds,
              "device": f"cpu (torch {torch.__version__}, {torch.get_num_threads()} threads)",
              "date": time.strftime("%Y-%m-%d")}
    part = WORK / f"part-{args.part or 'all'}"
    atomic_write(part.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write(part.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    print(f"wrote {part}.csv ({len(frame)} rows)")


if __name__ == "__main__":
    main()
