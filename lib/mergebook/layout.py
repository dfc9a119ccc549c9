"""One weight layout for every CLIP: open_clip's visual tower (the *canonical* layout).

Every per-matrix rule in the papers was written against open_clip's ``VisionTransformer``: CART
truncates the fused ``attn.in_proj_weight`` (Q, K and V stacked, one SVD), ``attn.out_proj``,
``mlp.c_fc`` and ``mlp.c_proj``; AdaMerging learns one coefficient per state-dict tensor (152 of them
for ViT-B/32's visual tower); Ties trims one global population. transformers' CLIP keeps Q, K and V
apart and calls the MLP ``fc1``/``fc2``, so the same rules give other answers there (200 "layers",
three SVDs per attention). Rather than write every rule twice, weights are converted on load,
exactly (concatenation, a transpose and renaming only), and converted back on the way out:

========================================================  =======================================
transformers (``CLIPVisionModelWithProjection``)           canonical (open_clip ``visual``)
========================================================  =======================================
``vision_model.embeddings.class_embedding``                ``class_embedding``
``vision_model.embeddings.patch_embedding.weight``         ``conv1.weight``
``vision_model.embeddings.position_embedding.weight``      ``positional_embedding``
``vision_model.pre_layrnorm.{weight,bias}``                ``ln_pre.{weight,bias}``
``...layers.{i}.layer_norm1.*`` / ``layer_norm2.*``         ``transformer.resblocks.{i}.ln_1.*`` / ``ln_2.*``
``...layers.{i}.self_attn.{q,k,v}_proj.weight``            ``...attn.in_proj_weight`` (rows q, k, v)
``...layers.{i}.self_attn.{q,k,v}_proj.bias``              ``...attn.in_proj_bias``
``...layers.{i}.self_attn.out_proj.*``                     ``...attn.out_proj.*``
``...layers.{i}.mlp.fc1.*`` / ``mlp.fc2.*``                ``...mlp.c_fc.*`` / ``mlp.c_proj.*``
``vision_model.post_layernorm.*``                          ``ln_post.*``
``visual_projection.weight`` ([P, D])                      ``proj`` ([D, P], the transpose)
========================================================  =======================================

:class:`mergebook.models.vit.VisionTransformer` runs the canonical layout; it equals open_clip's
ViT-B-32 and transformers' CLIP vision tower to float tolerance (tests). A state dict of the
original task_vectors checkpoints (``model.visual.*`` keys of a whole open_clip model) maps to the
canonical layout by dropping its prefix (:func:`openclip_visual`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]

CANONICAL = "openclip"
HF_CLIP = "hf_clip"
LAYOUTS = (CANONICAL, HF_CLIP)

_HF_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.(.+)$")
_CANON_BLOCK = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")

# Per-block renames (everything except the fused q/k/v).
_HF_BLOCK_TO_CANON = {
    "layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight", "layer_norm2.bias": "ln_2.bias",
    "self_attn.out_proj.weight": "attn.out_proj.weight", "self_attn.out_proj.bias": "attn.out_proj.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight", "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight", "mlp.fc2.bias": "mlp.c_proj.bias",
}
_QKV = ("q_proj", "k_proj", "v_proj")
_HF_GLOBAL_TO_CANON = {
    "vision_model.embeddings.class_embedding": "class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "positional_embedding",
    "vision_model.pre_layrnorm.weight": "ln_pre.weight", "vision_model.pre_layrnorm.bias": "ln_pre.bias",
    "vision_model.post_layernorm.weight": "ln_post.weight", "vision_model.post_layernorm.bias": "ln_post.bias",
}
_CANON_GLOBAL_TO_HF = {v: k for k, v in _HF_GLOBAL_TO_CANON.items()}
_CANON_BLOCK_TO_HF = {v: k for k, v in _HF_BLOCK_TO_CANON.items()}

#: HF key suffixes and the canonical suffix each one lives in (for translating suffix rules).
HF_TO_CANONICAL_SUFFIX = {
    **{f"self_attn.{p}.weight": "attn.in_proj_weight" for p in _QKV},
    **{f"self_attn.{p}.bias": "attn.in_proj_bias" for p in _QKV},
    **{"layer_norm1.weight": "ln_1.weight", "layer_norm1.bias": "ln_1.bias"},
    **_HF_BLOCK_TO_CANON,
    "visual_projection.weight": "proj",
}


class LayoutError(ValueError):
    """A state dict in no known CLIP layout, or one that cannot be converted as asked."""


@dataclass(frozen=True)
class LayoutInfo:
    """How a state dict arrived, so that merged weights can go back out the same way."""

    layout: str
    keys: tuple[str, ...] = ()  # the original key order
    prefix: str = ""  # "vision_model." was absent (bare CLIPVisionModel) when "" for HF ...
    has_projection: bool = True
    extra: dict = field(default_factory=dict)


def _strip_hf_prefix(key: str) -> str:
    if key.startswith(("vision_model.", "visual_projection.")):
        return key
    if key.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")):
        return "vision_model." + key
    return key


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``"openclip"`` (canonical) or ``"hf_clip"``; anything else is a :class:`LayoutError`."""
    keys = list(sd)
    if any(k.startswith("transformer.resblocks.") for k in keys) and "conv1.weight" in sd:
        return CANONICAL
    if any(_HF_LAYER.match(_strip_hf_prefix(k)) for k in keys):
        return HF_CLIP
    raise LayoutError(
        "these weights are in no CLIP vision layout this library knows: expected open_clip's visual tower "
        "(conv1.weight, transformer.resblocks.{i}.attn.in_proj_weight, ...) or transformers' CLIP vision tower "
        f"(vision_model.encoder.layers.{{i}}.self_attn.q_proj.weight, ...); first keys: {keys[:4]}. "
        "For a whole task_vectors/open_clip checkpoint run `mergebook convert --trust-pickle IN OUT` first"
    )


def is_clip_layout(sd: Mapping[str, torch.Tensor]) -> str | None:
    """The layout name if ``sd`` is a CLIP vision tower in a known layout, else None (no error)."""
    try:
        return detect_layout(sd)
    except LayoutError:
        return None


def hf_to_canonical(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, LayoutInfo]:
    """transformers CLIP vision weights -> open_clip's visual layout (exact), plus how to go back."""
    named = {_strip_hf_prefix(k): v for k, v in sd.items()}
    bare = not any(k.startswith("vision_model.") for k in sd)
    out: StateDict = {}
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    used: set[str] = set()
    for k, v in named.items():
        if k in _HF_GLOBAL_TO_CANON:
            out[_HF_GLOBAL_TO_CANON[k]] = v
            used.add(k)
        elif k == "visual_projection.weight":
            used.add(k)
        else:
            m = _HF_LAYER.match(k)
            if m:
                blocks.setdefault(int(m.group(1)), {})[m.group(2)] = v
                used.add(k)
    unknown = sorted(set(named) - used)
    if unknown:
        raise LayoutError(f"transformers CLIP vision weights with keys this library cannot place in open_clip's "
                          f"layout: {unknown[:5]}; pass only the image tower (vision_model.*, visual_projection.*)")
    for i in sorted(blocks):
        b, pre = blocks[i], f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            trio = [b.get(f"self_attn.{p}.{part}") for p in _QKV]
            if any(t is None for t in trio):
                missing = [p for p, t in zip(_QKV, trio) if t is None]
                raise LayoutError(f"layer {i} lacks self_attn.{{{','.join(missing)}}}.{part}: Q, K and V are fused "
                                  "into one in_proj tensor, so all three are needed")
            if len({t.dtype for t in trio}) > 1:
                raise LayoutError(f"layer {i}: q/k/v_proj.{part} have different dtypes {[t.dtype for t in trio]}; "
                                  "cast the checkpoint to one dtype first")
            out[pre + ("attn.in_proj_weight" if part == "weight" else "attn.in_proj_bias")] = torch.cat(trio, 0)
        for hk, ck in _HF_BLOCK_TO_CANON.items():
            if hk in b:
                out[pre + ck] = b[hk]
            else:
                raise LayoutError(f"layer {i} lacks {hk!r}; the checkpoint is not a complete CLIP vision tower")
    has_projection = "visual_projection.weight" in named
    if has_projection:
        out["proj"] = named["visual_projection.weight"].t().contiguous()
    order = [k for k in _canonical_order(out)]
    info = LayoutInfo(HF_CLIP, tuple(sd), prefix="" if bare else "vision_model.", has_projection=has_projection)
    return {k: out[k] for k in order}, info


def _canonical_order(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """open_clip's module order: class/positional embedding, proj, conv1, ln_pre, blocks 0..L-1, ln_post."""
    head = [k for k in ("class_embedding", "positional_embedding", "proj", "conv1.weight", "ln_pre.weight",
                        "ln_pre.bias") if k in sd]
    per_block = ["ln_1.weight", "ln_1.bias", "attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                 "attn.out_proj.bias", "ln_2.weight", "ln_2.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                 "mlp.c_proj.weight", "mlp.c_proj.bias"]
    idx = sorted({int(m.group(1)) for k in sd if (m := _CANON_BLOCK.match(k))})
    body = [f"transformer.resblocks.{i}.{p}" for i in idx for p in per_block if f"transformer.resblocks.{i}.{p}" in sd]
    tail = [k for k in ("ln_post.weight", "ln_post.bias") if k in sd]
    rest = [k for k in sd if k not in set(head + body + tail)]
    return head + body + tail + rest


def canonical_to_hf(sd: Mapping[str, torch.Tensor], info: LayoutInfo | None = None) -> StateDict:
    """open_clip's visual layout -> transformers CLIP vision names (inverse of :func:`hf_to_canonical`)."""
    out: StateDict = {}
    for k, v in sd.items():
        if k in _CANON_GLOBAL_TO_HF:
            out[_CANON_GLOBAL_TO_HF[k]] = v
        elif k == "proj":
            if info is None or info.has_projection:
                out["visual_projection.weight"] = v.t().contiguous()
        else:
            m = _CANON_BLOCK.match(k)
            if not m:
                raise LayoutError(f"{k!r} is not a key of open_clip's visual tower; cannot name it for transformers")
            i, rest = m.group(1), m.group(2)
            pre = f"vision_model.encoder.layers.{i}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                part = "weight" if rest.endswith("weight") else "bias"
                if v.shape[0] % 3:
                    raise LayoutError(f"{k} has {v.shape[0]} rows, not a multiple of 3: cannot split it into q, k, v")
                for p, chunk in zip(_QKV, v.chunk(3, dim=0)):
                    out[pre + f"self_attn.{p}.{part}"] = chunk.contiguous()
            elif rest in _CANON_BLOCK_TO_HF:
                out[pre + _CANON_BLOCK_TO_HF[rest]] = v
            else:
                raise LayoutError(f"{k!r} is not a key of open_clip's visual tower; cannot name it for transformers")
    if info is not None and info.keys:
        named = {(_strip_hf_prefix(k)): k for k in info.keys}
        missing = sorted(set(named) - set(out))
        if missing:
            raise LayoutError(f"cannot restore the original layout: missing {missing[:5]}")
        return {named_k: out[canon] for canon, named_k in ((_strip_hf_prefix(k), k) for k in info.keys)}
    return out


def to_canonical(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, LayoutInfo]:
    """Any known CLIP vision layout -> canonical, with the :class:`LayoutInfo` to go back."""
    layout = detect_layout(sd)
    if layout == CANONICAL:
        return dict(sd), LayoutInfo(CANONICAL, tuple(sd))
    return hf_to_canonical(sd)


def from_canonical(sd: Mapping[str, torch.Tensor], info: LayoutInfo) -> StateDict:
    """Canonical weights back into the layout recorded in ``info``."""
    if info.layout == CANONICAL:
        return dict(sd)
    if info.layout == HF_CLIP:
        return canonical_to_hf(sd, info)
    raise LayoutError(f"unknown layout {info.layout!r}; known layouts: {', '.join(LAYOUTS)}")


def canonical_keys(keys: Sequence[str], info: LayoutInfo) -> list[str]:
    """Translate a list of state-dict keys given in ``info``'s layout into canonical keys.

    Q, K and V are one canonical tensor, so naming only some of a layer's q/k/v is an error.
    """
    if info.layout == CANONICAL:
        return list(keys)
    out: list[str] = []
    groups: dict[str, set[str]] = {}
    for key in keys:
        k = _strip_hf_prefix(key)
        m = _HF_LAYER.match(k)
        if k in _HF_GLOBAL_TO_CANON:
            c = _HF_GLOBAL_TO_CANON[k]
        elif k == "visual_projection.weight":
            c = "proj"
        elif m and m.group(2) in _HF_BLOCK_TO_CANON:
            c = f"transformer.resblocks.{m.group(1)}.{_HF_BLOCK_TO_CANON[m.group(2)]}"
        elif m and m.group(2).startswith("self_attn.") and m.group(2).split(".")[1] in _QKV:
            part = m.group(2).rsplit(".", 1)[1]
            c = f"transformer.resblocks.{m.group(1)}.attn.in_proj_{part}"
            groups.setdefault(c, set()).add(m.group(2).split(".")[1])
        else:
            raise LayoutError(f"key {key!r} is not a transformers CLIP vision key")
        if c not in out:
            out.append(c)
    _require_full_qkv(groups, "the keys")
    return out


def _require_full_qkv(groups: Mapping[str, set[str]], what: str) -> None:
    """Q, K and V are one in_proj tensor in the canonical layout: naming only some of them is an error."""
    for c, g in groups.items():
        if g != set(_QKV):
            raise LayoutError(f"{what} name only part of q/k/v (missing {sorted(set(_QKV) - g)}): in open_clip's "
                              f"layout they are one tensor {c!r}; name all three, or the canonical name")


def canonical_suffixes(suffixes: Sequence[str]) -> tuple[str, ...]:
    """Translate key suffixes of transformers' CLIP (``mlp.fc1.weight``) into canonical ones.

    Suffixes that are already canonical pass through. q/k/v suffixes must come as a full trio.
    """
    out: list[str] = []
    qkv: dict[str, set[str]] = {}
    for s in suffixes:
        hit = next((hf for hf in HF_TO_CANONICAL_SUFFIX if s == hf or s.endswith("." + hf)), None)
        if hit is None:
            c = s
        else:
            c = HF_TO_CANONICAL_SUFFIX[hit]
            for p in _QKV:
                if p in hit:
                    qkv.setdefault(c, set()).add(p)
        if c not in out:
            out.append(c)
    _require_full_qkv(qkv, "the rule's suffixes")
    return tuple(out)


def openclip_visual(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, dict[str, int]]:
    """The canonical visual tower of a whole open_clip state dict, and what else it held.

    The original task_vectors checkpoints are whole ``ImageEncoder`` objects: ``model.visual.*``
    plus the text tower's leftovers (``model.token_embedding.weight``, ``model.positional_embedding``,
    ``model.ln_final.*``, ``model.text_projection``, ``model.logit_scale``; the text transformer
    itself is deleted). Their delta is zero, but they enlarge Ties' global trim population; the
    count is returned as ``{"text_numel": N}``.
    """
    prefixes = ("model.visual.", "visual.")
    prefix = next((p for p in prefixes if any(k.startswith(p) for k in sd)), None)
    if prefix is None:
        if detect_layout(sd) == CANONICAL:
            return dict(sd), {"text_numel": 0}
        raise LayoutError("not an open_clip state dict: no 'model.visual.*' or 'visual.*' keys")
    outer = prefix[: -len("visual.")]
    vis = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    other = {k: v for k, v in sd.items() if not k.startswith(prefix) and k.startswith(outer)}
    text_numel = sum(v.numel() for v in other.values() if v.is_floating_point())
    return {k: vis[k] for k in _canonical_order(vis)}, {"text_numel": int(text_numel)}


def openclip_text_numel(vocab_size: int, context_length: int, width: int, embed_dim: int) -> int:
    """Floating entries of the text-tower leftovers in a task_vectors checkpoint (see :func:`openclip_visual`).

    token_embedding (vocab × width) + positional_embedding (context × width) + ln_final (2 × width)
    + text_projection (width × embed_dim) + logit_scale (1). For ViT-B/32 and B/16 (vocab 49408,
    context 77, width 512, embed 512) that is 25,599,489; for ViT-L/14 (width 768, embed 768) 38,595,841.
    """
    return vocab_size * width + context_length * width + 2 * width + width * embed_dim + 1


def vit_config_from_hf(vision_config, projection_dim: int | None = None):
    """The :class:`~mergebook.models.vit.ViTConfig` of a transformers ``CLIPVisionConfig``."""
    from .models.vit import ViTConfig

    c = vision_config
    act = getattr(c, "hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise LayoutError(f"this CLIP vision tower uses activation {act!r}; the canonical ViT runs CLIP's quick_gelu only")
    if c.intermediate_size % c.hidden_size:
        raise LayoutError(f"intermediate_size {c.intermediate_size} is not a multiple of hidden_size {c.hidden_size}")
    eps = getattr(c, "layer_norm_eps", 1e-5)
    if abs(eps - 1e-5) > 1e-12:
        raise LayoutError(f"layer_norm_eps {eps} differs from open_clip's 1e-5")
    return ViTConfig(image_size=c.image_size, patch_size=c.patch_size, width=c.hidden_size,
                     layers=c.num_hidden_layers, heads=c.num_attention_heads,
                     mlp_ratio=c.intermediate_size // c.hidden_size,
                     output_dim=projection_dim or getattr(c, "projection_dim", c.hidden_size),
                     in_channels=getattr(c, "num_channels", 3))
