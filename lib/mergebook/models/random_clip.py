"""True-shape random CLIP suites (``random-b32``, ``random-l14``): the papers' sizes, no network.

For timing and memory only: the pretrained encoder is a randomly initialised canonical-layout ViT at
ViT-B/32 or ViT-L/14 shapes, each "fine-tuned" model adds seeded noise of the magnitude real task
vectors have (relative 1e-3), heads are random unit rows × 100 (CLIP's logit scale), and images
are Gaussian noise. Accuracies are chance-level by construction.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .suite import Suite, TaskData
from .vit import ViTConfig, VisionTransformer

ARCHS: dict[str, ViTConfig] = {
    "ViT-B/32": ViTConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12, mlp_ratio=4, output_dim=512),
    "ViT-B/16": ViTConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12, mlp_ratio=4, output_dim=512),
    "ViT-L/14": ViTConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16, mlp_ratio=4,
                          output_dim=768),
}
N_CLASSES = {"SUN397": 397, "Cars": 196, "RESISC45": 45, "EuroSAT": 10, "SVHN": 10, "GTSRB": 43, "MNIST": 10,
             "DTD": 47}


def load_suite(profile: Any, device: str = "cpu", progress: bool = True, *, arch: str = "ViT-B/32",
               n_test: int = 64, n_val: int = 16, seed: int = 0, relative_noise: float = 1e-3,
               dtype: torch.dtype = torch.float32) -> Suite:
    """A Suite at ``arch``'s true shapes with random weights, heads and images, built on ``device``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
    cfg = ARCHS[arch]
    g = torch.Generator(device="cpu").manual_seed(seed)
    torch.manual_seed(seed)
    with torch.device(device):
        model = VisionTransformer(cfg).to(dtype).eval()
    pretrained = {k: v.detach() for k, v in model.state_dict().items() if v.is_floating_point()}
    tasks = list(profile.tasks)
    finetuned = {}
    for i, t in enumerate(tasks):
        gi = torch.Generator(device=device).manual_seed(seed + 1 + i)
        finetuned[t] = {k: v + relative_noise * v.abs().mean() * torch.randn(v.shape, generator=gi, device=device,
                                                                          dtype=v.dtype)
                        for k, v in pretrained.items()}
    heads = {t: 100.0 * F.normalize(torch.randn(N_CLASSES.get(t, 10), cfg.output_dim, generator=g), dim=-1).to(device)
             for t in tasks}

    def data(n: int, t: str) -> TaskData:
        return TaskData(torch.randn(n, 3, cfg.image_size, cfg.image_size, generator=g),
                        torch.randint(0, N_CLASSES.get(t, 10), (n,), generator=g))

    return Suite(profile=profile.name, tasks=tasks, model=model, pretrained=pretrained, finetuned=finetuned,
                 heads=heads, test={t: data(n_test, t) for t in tasks}, val={t: data(n_val, t) for t in tasks},
                 class_names={t: [str(c) for c in range(N_CLASSES.get(t, 10))] for t in tasks},
                 meta={"backend": "random", "arch": arch, "vit_config": cfg.to_dict(), "layout": "openclip",
                       "n_tensors": len(pretrained), "fingerprint": f"random-{arch}-{seed}-{n_test}-{n_val}"})
