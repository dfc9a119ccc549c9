"""Training loops of the offline miniature: pretraining (CLIP's part), fine-tuning, joint MTL.

The pretrained encoder is an asset, like CLIP's weights: ``python -m mergebook.models.tiny_train
pretrain`` produced the committed file, and CI reruns the same code only as a short smoke run.
Fine-tuning and joint multi-task training always run (they are cached by ``artifacts``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # console bars: tqdm.auto warns without ipywidgets in the book's kernels

from ..artifacts import sha256_file
from ..data import tiny_suite
from .vit import ViTConfig, VisionTransformer

# OpenAI CLIP's normalisation constants, kept so the miniature's preprocessing mirrors CLIP's.
MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

TINY_VIT = ViTConfig(image_size=32, patch_size=8, width=128, layers=6, heads=4, mlp_ratio=4, output_dim=128)
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets"
ASSET = ASSET_DIR / "tiny_vit_pretrained.safetensors"
ASSET_RECORD = ASSET_DIR / "tiny_vit_pretrained.json"


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> normalised float32 N x 3 x H x W."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - MEAN) / STD


def _gen_chunk(args: tuple[str, str, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    task, split, n, seed, start = args
    return tiny_suite.generate(task, split, n, seed=seed, start=start)


def generate_parallel(task: str, split: str, n: int, seed: int = 0, workers: int | None = None,
                      chunk: int = 2000, desc: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``tiny_suite.generate`` split into chunks over processes; identical output to the serial call."""
    workers = workers or min(4, os.cpu_count() or 1)
    jobs = [(task, split, min(chunk, n - s), seed, s) for s in range(0, n, chunk)]
    bar = tqdm(total=n, desc=desc or f"generate {task}/{split}", unit="img", leave=False)
    parts = []
    if workers <= 1 or len(jobs) == 1:
        for j in jobs:
            parts.append(_gen_chunk(j))
            bar.update(j[2])
    else:
        with ProcessPoolExecutor(workers) as ex:
            for p, j in zip(ex.map(_gen_chunk, jobs), jobs):
                parts.append(p)
                bar.update(j[2])
    bar.close()
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pad`` pixels (reflect padding), a cheap augmentation."""
    if pad <= 0:
        return x
    n, _, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h)).view(n, 1, h, 1).expand(n, x.shape[1], h, w + 2 * pad)
    xp = torch.gather(xp, 2, rows)
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w)).view(n, 1, 1, w).expand(n, x.shape[1], h, w)
    return torch.gather(xp, 3, cols)


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero, as a multiplier of the base learning rate."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def pretrain(
    out: Path, *, steps: int, n_images: int, batch_size: int = 128, lr: float = 1e-3,
    weight_decay: float = 0.05, warmup: int = 500, seed: int = 0, config: ViTConfig = TINY_VIT,
    label_smoothing: float = 0.1, checkpoint_every: int = 1000, log: Callable[[str], None] = print,
    data_cache: Path | None = None,
) -> dict:
    """Pretrain the miniature encoder with a CLIP-like cosine classifier on the disjoint mixture.

    The classifier is ``scale * normalize(f) @ normalize(W).T`` with CLIP's learnable temperature
    (initialised at 1/0.07, capped at 100); its learned scale becomes the heads' logit scale.
    """
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    if data_cache is not None and data_cache.exists():
        with np.load(data_cache) as z:  # plain arrays only (allow_pickle is False by default)
            x_np, y_np = z["x"], z["y"]
        if len(y_np) != n_images:
            raise ValueError(f"{data_cache} holds {len(y_np)} images, not {n_images}; delete it to regenerate")
    else:
        x_np, y_np = generate_parallel("pretrain", "train", n_images, seed=seed, desc="pretraining data")
        if data_cache is not None:
            tmp = data_cache.with_name(data_cache.name + ".tmp.npz")
            np.savez(tmp, x=x_np, y=y_np)
            os.replace(tmp, data_cache)
    x_all, y_all = torch.from_numpy(x_np), torch.from_numpy(y_np)
    model = VisionTransformer(config)
    k = tiny_suite.num_classes("pretrain")
    cls_w = torch.nn.Parameter(torch.randn(k, config.output_dim) * config.output_dim**-0.5)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([
        {"params": decay + [cls_w], "weight_decay": weight_decay},
        {"params": no_decay + [log_scale], "weight_decay": 0.0},
    ], lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n_images, generator=gen)
    pos = 0
    t0 = time.time()
    bar = tqdm(range(steps), desc="pretrain", unit="step")
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr * cosine_lr(step, steps, warmup)
        if pos + batch_size > n_images:
            perm, pos = torch.randperm(n_images, generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        xb = random_shift(to_tensor(x_all[idx].numpy()), 2, gen)
        feats = F.normalize(model(xb), dim=-1)
        logits = log_scale.exp() * feats @ F.normalize(cls_w, dim=-1).T
        loss = F.cross_entropy(logits, y_all[idx], label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(model.parameters()) + [cls_w], 1.0)
        opt.step()
        with torch.no_grad():
            log_scale.clamp_(max=math.log(100.0))
        if step % 50 == 0:
            acc = (logits.argmax(-1) == y_all[idx]).float().mean().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}", scale=f"{log_scale.exp().item():.1f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            meta = {
                "config": json.dumps(config.to_dict()), "logit_scale": f"{log_scale.exp().item():.6f}",
                "steps_done": str(step + 1), "steps": str(steps), "seed": str(seed),
                "n_images": str(n_images), "batch_size": str(batch_size), "lr": str(lr),
                "device": f"cpu ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads)",
                "command": " ".join(["python -m mergebook.models.tiny_train"] + sys.argv[1:]),
            }
            tmp = out.with_suffix(".tmp")
            save_file({k_: v.detach().contiguous() for k_, v in model.state_dict().items()}, str(tmp), meta)
            os.replace(tmp, out)
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} scale {log_scale.exp().item():.2f} "
                f"elapsed {time.time() - t0:.0f}s -> {out}")
    return {"seconds": time.time() - t0, "final_loss": loss.item(), "logit_scale": log_scale.exp().item()}


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``pretrain`` the miniature encoder (``--smoke`` for CI), or ``verify`` the shipped asset."""
    p = argparse.ArgumentParser(prog="python -m mergebook.models.tiny_train")
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("pretrain", help="pretrain the miniature encoder")
    pp.add_argument("--out", type=Path, default=ASSET)
    pp.add_argument("--steps", type=int, default=12000)
    pp.add_argument("--n-images", type=int, default=120000)
    pp.add_argument("--batch-size", type=int, default=128)
    pp.add_argument("--lr", type=float, default=1e-3)
    pp.add_argument("--seed", type=int, default=0)
    pp.add_argument("--threads", type=int, default=0)
    pp.add_argument("--data-cache", type=Path, default=None,
                    help="reuse (or write) the generated pretraining images here (.npz); same seed and size only")
    pp.add_argument("--smoke", action="store_true", help="tiny run for CI: checks the script, not the asset")
    sub.add_parser("verify", help="check that the shipped encoder loads and matches its recorded sha256")
    a = p.parse_args(argv)
    if a.cmd == "verify":
        from .tiny import load_pretrained

        sd, meta = load_pretrained()
        print(f"ok: {ASSET.name} sha256 matches the record; {sum(v.numel() for v in sd.values())} params, "
              f"logit scale {float(meta['logit_scale']):.2f}")
        return
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.smoke:
        a.steps, a.n_images, a.batch_size = 20, 512, 32
        if a.out == ASSET:
            raise SystemExit("--smoke must not overwrite the shipped asset; pass --out somewhere else")
    res = pretrain(a.out, steps=a.steps, n_images=a.n_images, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                   warmup=min(500, max(1, a.steps // 10)), data_cache=a.data_cache)
    print(json.dumps(res))
    if not a.smoke:
        record = {"file": a.out.name, "sha256": sha256_file(a.out), **res,
                  "command": " ".join(["python -m mergebook.models.tiny_train"] + list(argv or sys.argv[1:]))}
        (a.out.parent / (a.out.stem + ".json")).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
