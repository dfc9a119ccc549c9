"""The papers' own route: CLIP through ``open_clip_torch``, for readers who hold task_vectors checkpoints.

The AdaMerging, Concrete and CART numbers were computed with open_clip models (``ViT-B-32`` with
OpenAI weights, QuickGELU) and fine-tuned checkpoints saved by task_vectors. This backend builds
the pretrained model, tokenizer and text tower with open_clip, makes the zero-shot heads exactly as
task_vectors does, and takes each task's fine-tuned image tower from a safetensors file written by
``mergebook convert --trust-pickle`` (canonical layout: open_clip's visual tower itself, so no
conversion is needed on load). Images and splits come from the hub loaders of :mod:`mergebook.data.hub`.

open_clip imports torchvision. torchvision's PyPI wheels are CUDA builds: with a CPU torch their C
ops do not load and the import fails at two fake-kernel registrations; :func:`import_open_clip`
then defines those two op schemas and retries, so the Python side works on a CPU box. The CPU book
never imports this module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data import templates
from ..statedict import load_state_dict
from .suite import Suite

#: open_clip model names with the OpenAI activation (QuickGELU), as the papers used them
ARCHS = {"openai/clip-vit-base-patch32": "ViT-B-32-quickgelu", "openai/clip-vit-base-patch16": "ViT-B-16-quickgelu",
         "openai/clip-vit-large-patch14": "ViT-L-14-quickgelu"}


def import_open_clip():
    """``import open_clip``, working around a CUDA-built torchvision wheel on a CPU torch."""
    try:
        import open_clip  # noqa: F401
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "open_clip"))]:
            del sys.modules[name]
        for op in ("nms", "qnms"):
            try:
                torch.library.define(f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # already defined by an earlier attempt
        import open_clip  # noqa: F401
    except ImportError as err:
        raise ImportError("the open_clip backend needs open_clip_torch: pip install 'mergebook[openclip]' "
                          "(or use the clip_hf profiles, vit-b-32 ..., which need transformers only)") from err
    import open_clip

    return open_clip


@torch.no_grad()
def zero_shot_heads(model: Any, tokenizer: Callable, tasks: list[str], device: str = "cpu") -> dict[str, torch.Tensor]:
    """task_vectors' heads: per class, mean of normalised template embeddings, renormalised, × logit scale."""
    heads = {}
    scale = model.logit_scale.exp().float().cpu()
    for task in tasks:
        rows = []
        for c in templates.CLASSNAMES[task]:
            emb = model.encode_text(tokenizer(templates.prompts(task, c)).to(device)).float()
            e = F.normalize(emb, dim=-1).mean(0)
            rows.append(e / e.norm())
        heads[task] = (torch.stack(rows).cpu() * scale).contiguous()
    return heads


def load_suite(profile: Any, device: str = "cpu", progress: bool = True, *, finetuned_paths: Mapping[str, str | Path],
               pretrained: str | None = "openai", model_name: str | None = None, n_test: int | None = None,
               seed: int = 0, dataset_loader: Callable | None = None, with_data: bool = True) -> Suite:
    """A Suite from open_clip: pretrained model and heads from ``pretrained`` weights, fine-tuned towers from files.

    ``finetuned_paths`` maps each task to a canonical safetensors file (``mergebook convert``).
    ``pretrained=None`` builds random weights (tests). ``with_data=False`` skips the datasets.
    """
    from ..data import hub
    from .clip_hf import CLIPVisionEncoder
    from .suite import TaskData
    from .vit import ViTConfig

    oc = import_open_clip()
    name = model_name or ARCHS.get(getattr(profile, "model_id", None) or "", "ViT-B-32-quickgelu")
    model = oc.create_model(name, pretrained=pretrained).to(device).eval()
    tokenizer = oc.get_tokenizer(name)
    vis = model.visual
    cfg = ViTConfig(image_size=vis.image_size[0] if isinstance(vis.image_size, tuple) else vis.image_size,
                    patch_size=vis.patch_size[0] if isinstance(vis.patch_size, tuple) else vis.patch_size,
                    width=vis.conv1.out_channels, layers=len(vis.transformer.resblocks),
                    heads=vis.transformer.resblocks[0].attn.num_heads,
                    mlp_ratio=vis.transformer.resblocks[0].mlp.c_fc.out_features // vis.conv1.out_channels,
                    output_dim=vis.proj.shape[1])
    prep = hub.Preprocess(resize=cfg.image_size, crop=cfg.image_size)
    encoder = CLIPVisionEncoder(cfg, prep).to(device)
    pre = {k: v.detach().clone() for k, v in vis.state_dict().items() if v.is_floating_point()}
    encoder.load_state_dict(pre)
    tasks = list(profile.tasks)
    finetuned = {}
    for t in tasks:
        sd = load_state_dict(finetuned_paths[t])
        if set(sd) != set(pre):
            raise ValueError(f"{finetuned_paths[t]} is not {name}'s visual tower in the canonical layout "
                             f"(missing {sorted(set(pre) - set(sd))[:3]}); convert it with mergebook convert")
        finetuned[t] = {k: sd[k].to(device=device, dtype=pre[k].dtype) for k in pre}
    text_numel = sum(v.numel() for k, v in model.state_dict().items()
                     if not k.startswith("visual.") and not k.startswith("transformer.") and v.is_floating_point())
    heads = zero_shot_heads(model, tokenizer, [hub.hub_task(t).name for t in tasks], device)
    heads = {t: heads[hub.hub_task(t).name].to(device) for t in tasks}
    del model
    test: dict[str, TaskData] = {}
    if with_data:
        loader = dataset_loader or (lambda task, split: hub.load_split(task, split))
        for t in tasks:
            spec = hub.hub_task(t)
            d = hub.preprocess_split(loader(spec, "test"), spec, prep, n_test, seed, progress)
            test[t] = TaskData(hub.normalize(d["images"], prep), d["labels"])
    return Suite(profile=profile.name, tasks=tasks, model=encoder.eval(), pretrained=pre, finetuned=finetuned,
                 heads=heads, test=test, class_names={t: list(templates.CLASSNAMES[hub.hub_task(t).name])
                                                      for t in tasks},
                 meta={"backend": "open_clip", "model_name": name, "layout": "openclip",
                       "openclip_text_numel": int(text_numel), "n_tensors": len(pre)})
