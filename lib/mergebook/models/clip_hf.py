"""The paper-scale backend: CLIP ViT-B/32, B/16 and L/14 through ``transformers``.

Pipeline (hub downloads go to the Hugging Face cache; heads and test images are cached under
``.cache/mergebook/<profile>/`` keyed by their config and code):

1. the pretrained CLIP (``profile.model_id``, e.g. ``openai/clip-vit-base-patch32``): its image tower
   is the architecture and the pretrained state dict, its text tower makes the heads;
2. one fine-tuned image tower per task, ``tanganke/<arch>_<task key>`` (FusionBench's checkpoints,
   e.g. ``tanganke/clip-vit-base-patch32_stanford-cars``);
3. zero-shot heads, built as task_vectors builds them (see :mod:`mergebook.data.templates`);
4. the test split of every task from the hub, preprocessed like ``CLIPImageProcessor``.

State dicts use the transformers key names (``vision_model.encoder.layers.{i}.self_attn.q_proj.weight``,
..., ``visual_projection.weight``) and hold only floating tensors: the integer ``position_ids``
buffers are left out, so task vectors never see them. FusionBench loads its fine-tuned checkpoints
as ``CLIPVisionModel`` towers, without the projection (its fine-tuning keeps the projection frozen),
so their state dicts carry the pretrained ``visual_projection.weight`` and its task vector is zero;
a checkpoint that does hold a projection keeps its own. An
image tower has 200 tensors for the ViT-B models (199 plus the projection) and 392 for ViT-L/14,
more than the open_clip count behind AdaMerging's "158 x 8", because HF keeps Q, K and V apart.

Loading is safe: weights are read with ``safetensors`` where a checkpoint has them, else with
``torch.load(weights_only=True)``, which refuses to unpickle anything but tensors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import pickle
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm  # console bars: tqdm.auto warns without ipywidgets in the book's kernels

from .. import artifacts
from ..data import hub, templates
from ..data.hub import HubTask, HubUnavailableError, Preprocess  # noqa: F401  (re-exported)
from .suite import Suite, TaskData

StateDict = dict[str, torch.Tensor]

#: Suffixes of the attention and MLP weight matrices of HF CLIP. HF keeps Q, K and V as separate
#: projections, where open_clip stacks them in one ``in_proj_weight``; pass these as CART's matrix
#: rule (``key.endswith(HF_CLIP_MATRIX_KEYS)``), which then truncates Q, K and V one SVD each.
HF_CLIP_MATRIX_KEYS = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.out_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight",
)
FINETUNED_OWNER = "tanganke"
_VISION_PARTS = ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm.")
_WEIGHT_GLOBS = ("*.safetensors", "pytorch_model*.bin")


class CheckpointError(ValueError):
    """A checkpoint that is missing, unsafe to load, or does not fit the pretrained architecture."""


def is_matrix_key(key: str) -> bool:
    """Whether ``key`` is an attention or MLP weight matrix (CART's low-rank targets)."""
    return key.endswith(HF_CLIP_MATRIX_KEYS)


def finetuned_id(model_id: str, task: str) -> str:
    """Hub id of FusionBench's fine-tuned image tower of ``task`` for the CLIP ``model_id``."""
    return f"{FINETUNED_OWNER}/{model_id.rsplit('/', 1)[-1]}_{hub.hub_task(task).key}"


class CLIPImageEncoder(nn.Module):
    """CLIP's image tower under the transformers key names, returning projected image embeddings.

    ``forward(images)`` is open_clip's ``encode_image``: the pooled, layer-normed class token
    times ``visual_projection``. Float images are taken as already normalised; uint8 images are
    scaled and normalised inside with the processor's mean and std (non-persistent buffers, never
    in a state dict). Inputs move to the weights' device, so test sets may stay on the CPU.
    """

    def __init__(self, config: Any, preprocess: Preprocess | None = None):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        hf = CLIPVisionModelWithProjection(config)
        self.config = config
        self.vision_model = hf.vision_model
        self.visual_projection = hf.visual_projection
        prep = preprocess or Preprocess(resize=config.image_size, crop=config.image_size)
        self.register_buffer("pixel_mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        weight = self.visual_projection.weight
        images = images.to(weight.device)
        if images.dtype == torch.uint8:
            mean, std = self.pixel_mean.to(weight.device), self.pixel_std.to(weight.device)
            images = (images.float() / 255.0 - mean) / std
        pooled = self.vision_model(pixel_values=images.to(weight.dtype)).pooler_output
        return self.visual_projection(pooled)


def float_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Shapes of the floating tensors of ``model``'s state dict (what merging operates on)."""
    return {k: v.shape for k, v in model.state_dict().items() if v.is_floating_point()}


# ----------------------------------------------------------------------------------------------
# Checkpoints


def hub_snapshot(repo_id: str, cache_dir: str | Path | None = None, local_files_only: bool = False) -> Path:
    """Download the config, tokenizer and weights of ``repo_id`` (safetensors, else .bin only)."""
    from huggingface_hub import snapshot_download

    kw = dict(cache_dir=None if cache_dir is None else str(cache_dir), local_files_only=local_files_only)
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.txt", "*.safetensors"], **kw))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=["*.json", "pytorch_model*.bin"], **kw))
    except Exception as err:
        if hub.is_network_error(err):
            raise hub.hub_unavailable(repo_id, err) from err
        raise
    return path


def _weight_files(directory: Path) -> list[Path]:
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (directory / single).exists():
            return [directory / single]
        if (directory / index).exists():
            shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            return [directory / s for s in shards]
    found = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else "no such directory"
    raise CheckpointError(f"no model.safetensors or pytorch_model.bin (or a sharded index) in {directory}; "
                          f"found: {found}")


def read_checkpoint(directory: str | Path, keep: Callable[[str], bool] | None = None) -> StateDict:
    """Tensors of a transformers checkpoint directory, safely (safetensors, or weights-only pickle)."""
    from safetensors import safe_open

    out: StateDict = {}
    for f in _weight_files(Path(directory)):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as s:
                out.update({k: s.get_tensor(k) for k in s.keys() if keep is None or keep(k)})
            continue
        try:
            sd = torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{f} holds more than tensors; refusing to unpickle it "
                                  f"(torch.load with weights_only=True): {err}") from err
        out.update({k: v for k, v in sd.items() if keep is None or keep(k)})
    return out


def vision_key(key: str) -> str | None:
    """The transformers image-tower name of a checkpoint key, or None for text-tower keys."""
    if key.startswith(("vision_model.", "visual_projection.")):
        return key
    if key.startswith(_VISION_PARTS):  # a bare CLIPVisionModel saved without its prefix
        return "vision_model." + key
    return None


def vision_state_dict(raw: Mapping[str, torch.Tensor], shapes: Mapping[str, torch.Size], source: str,
                      optional: tuple[str, ...] = (), dtype: torch.dtype = torch.float32) -> StateDict:
    """The floating image-tower tensors of a checkpoint, checked against the architecture's shapes."""
    sd = {}
    for k, v in raw.items():
        name = vision_key(k)
        if name is not None and v.is_floating_point():  # integer buffers (position_ids) are skipped
            sd[name] = v.to(dtype)
    missing = sorted(set(shapes) - set(sd) - set(optional))
    unexpected = sorted(set(sd) - set(shapes))
    wrong = sorted(k for k in set(sd) & set(shapes) if sd[k].shape != shapes[k])
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"checkpoint {source} does not fit the pretrained image tower: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}, "
            f"wrong shapes {[(k, tuple(sd[k].shape), tuple(shapes[k])) for k in wrong[:5]]}"
        )
    return {k: sd[k] for k in shapes if k in sd}  # the module's order: embeddings, layers 0..L-1, head


def _fingerprint(directory: Path) -> str:
    """A cheap identity of a checkpoint directory: resolved file names (HF blobs are content
    hashes), sizes and modification times; content is not re-hashed on every load."""
    h = hashlib.sha256()
    for p in sorted(directory.iterdir()):
        if p.is_file() and p.suffix in (".safetensors", ".bin", ".json", ".txt"):
            st = p.stat()
            h.update(f"{p.name}:{Path(p).resolve().name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Heads


def text_tower(config: Any, raw: Mapping[str, torch.Tensor]) -> nn.Module:
    """The pretrained CLIP text tower with its projection (``text_embeds`` out), in eval mode."""
    from transformers import CLIPTextModelWithProjection

    tcfg = copy.deepcopy(config.text_config)
    tcfg.projection_dim = config.projection_dim
    model = CLIPTextModelWithProjection(tcfg)
    shapes = float_shapes(model)
    missing = sorted(k for k in shapes if k not in raw)
    if missing:
        raise CheckpointError(f"the pretrained checkpoint lacks text-tower tensors {missing[:5]}; "
                              "zero-shot heads need a full CLIPModel checkpoint")
    model.load_state_dict({k: raw[k].float() for k in shapes}, strict=False)
    return model.eval()


@torch.no_grad()
def zero_shot_head(text_model: nn.Module, tokenizer: Any, classnames: list[str], task_templates: tuple[str, ...],
                   logit_scale: torch.Tensor, batch_size: int = 256, progress: bool = True,
                   desc: str = "head") -> torch.Tensor:
    """``[C, D]`` head: per class, the renormalised mean of normalised template embeddings, x scale."""
    device = next(text_model.parameters()).device
    texts = [t.format(c) for c in classnames for t in task_templates]
    max_len = text_model.config.max_position_embeddings
    embs = []
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
        enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_len,
                        return_tensors="pt")
        out = text_model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device))
        embs.append(out.text_embeds.float().cpu())
    per_class = F.normalize(torch.cat(embs), dim=-1).view(len(classnames), len(task_templates), -1).mean(1)
    return (F.normalize(per_class, dim=-1) * logit_scale.float().exp().cpu()).contiguous()


# ----------------------------------------------------------------------------------------------
# The Suite


def load_suite(
    profile: Any,
    device: str = "cpu",
    progress: bool = True,
    cache_dir: str | Path | None = None,
    n_test: int | None = None,
    *,
    seed: int = 0,
    data_device: str = "cpu",
    uint8_images: bool = False,
    model_source: Callable[[str], str | Path] | None = None,
    dataset_loader: Callable[[HubTask], Any] | None = None,
    cache: artifacts.Cache | None = None,
    finetuned_ids: Mapping[str, str] | None = None,
    text_batch_size: int = 256,
) -> Suite:
    """The Suite of a CLIP profile: hub checkpoints, zero-shot heads and preprocessed test sets.

    Args:
        profile: a :class:`~mergebook.profiles.Profile` (backend ``clip_hf``) or its name.
        device: where the architecture, state dicts and heads live.
        progress: show tqdm bars while checkpoints load and test sets are embedded.
        cache_dir: the Hugging Face cache for downloads (default: the usual one under ``$HF_HOME``).
        n_test: at most this many test images per task, a seeded random subset (None: all of them;
            the eight full test sets are ~87k images, ~52 GB as float32 at 224 px, ~13 GB as uint8).
        seed: seed of that subset.
        data_device: where test images and labels live (CPU by default; the model moves batches).
        uint8_images: keep test images as uint8 crops (4x less memory); the model normalises
            them itself. The default is normalised float32, as the Suite documents.
        model_source: maps a hub model id to a local checkpoint directory (default: download it
            with :func:`hub_snapshot`); tests and air-gapped machines pass their own.
        dataset_loader: maps a :class:`~mergebook.data.hub.HubTask` to its test split, a sequence
            of ``{"image": PIL, "label": int}`` rows such as a ``datasets.Dataset`` (default:
            :func:`mergebook.data.hub.load_split`).
        cache: where heads and test tensors are cached (default: ``Cache(profile.name)``).
        finetuned_ids: per task, a hub id replacing FusionBench's ``tanganke/<arch>_<key>``.
        text_batch_size: prompts per text-tower batch when building heads.

    Raises:
        HubUnavailableError: the hub could not be reached (the message says to use ``"tiny"``).
        UnknownTaskError: a profile task the backend does not know (the message lists the known).
        CheckpointError: a checkpoint that is unsafe or does not fit the pretrained architecture.
    """
    try:
        from transformers import AutoTokenizer, CLIPConfig
    except ImportError as err:
        raise ImportError("the clip_hf backend needs transformers and datasets: "
                          "pip install 'mergebook[hub]' (or use profile=\"tiny\", which needs neither)") from err
    from ..profiles import get_profile

    p = get_profile(profile) if isinstance(profile, str) else profile
    if not p.model_id:
        raise ValueError(f"profile {p.name!r} names no model_id; the clip_hf backend needs a CLIP hub id")
    specs = {t: hub.hub_task(t) for t in p.tasks}  # unknown tasks fail before any download
    source = model_source or (lambda repo: hub_snapshot(repo, cache_dir=cache_dir))
    loader = dataset_loader or (lambda task: hub.load_split(task, cache_dir=cache_dir))
    cache = cache or artifacts.Cache(p.name)
    ids = {t: (finetuned_ids or {}).get(t) or finetuned_id(p.model_id, t) for t in p.tasks}

    # 1. the pretrained CLIP: architecture, pretrained image tower, preprocessing
    pre_dir = Path(source(p.model_id))
    config_dict = json.loads((pre_dir / "config.json").read_text()) if (pre_dir / "config.json").exists() else {}
    if config_dict.get("model_type") != "clip":
        raise CheckpointError(f"{p.model_id} ({pre_dir}) is not a full CLIPModel checkpoint (model_type "
                              f"{config_dict.get('model_type')!r}); the heads need its text tower")
    config = CLIPConfig.from_pretrained(str(pre_dir))
    vcfg = copy.deepcopy(config.vision_config)
    vcfg.projection_dim = config.projection_dim
    prep = Preprocess.from_processor_config(pre_dir / "preprocessor_config.json", image_size=vcfg.image_size)
    if prep.crop != vcfg.image_size:
        raise CheckpointError(f"{pre_dir}: the processor crops {prep.crop} px, the model takes {vcfg.image_size}")
    model = CLIPImageEncoder(vcfg, prep)
    shapes = float_shapes(model)
    is_vision = lambda k: vision_key(k) is not None  # noqa: E731
    pretrained = vision_state_dict(read_checkpoint(pre_dir, is_vision), shapes, p.model_id)
    model.load_state_dict(pretrained, strict=False)
    model.eval()

    # 2. fine-tuned image towers (FusionBench's have no projection: the pretrained one is used)
    finetuned: dict[str, StateDict] = {}
    projection_from_pretrained = []
    for t in tqdm(p.tasks, desc="fine-tuned checkpoints", disable=not progress, leave=False):
        sd = vision_state_dict(read_checkpoint(Path(source(ids[t])), is_vision), shapes, ids[t],
                               optional=("visual_projection.weight",))
        if "visual_projection.weight" not in sd:
            sd["visual_projection.weight"] = pretrained["visual_projection.weight"].clone()
            projection_from_pretrained.append(t)
        finetuned[t] = {k: sd[k] for k in pretrained}  # same key order as the pretrained

    # 3. zero-shot heads (cached; the text tower is loaded only if some head must be built)
    fingerprint = _fingerprint(pre_dir)
    tower: dict[str, Any] = {}

    def head(task: str) -> StateDict:
        if not tower:
            is_text = lambda k: k.startswith(("text_model.", "text_projection.", "logit_scale"))  # noqa: E731
            raw = read_checkpoint(pre_dir, is_text)
            tower["model"] = text_tower(config, raw).to(device)
            tower["tokenizer"] = AutoTokenizer.from_pretrained(str(pre_dir))
            tower["logit_scale"] = raw["logit_scale"]
        name = specs[task].name
        return {"head": zero_shot_head(tower["model"], tower["tokenizer"], list(templates.CLASSNAMES[name]),
                                       templates.TEMPLATES[name], tower["logit_scale"], text_batch_size,
                                       progress, desc=f"{name} head")}

    heads = {}
    for t in p.tasks:
        name = specs[t].name
        key = artifacts.make_key({"model_id": p.model_id, "checkpoint": fingerprint, "task": name,
                                  "templates": templates.TEMPLATES[name],
                                  "classnames": templates.CLASSNAMES[name]}, [templates, sys.modules[__name__]])
        heads[t] = cache.tensors(f"head-{specs[t].key}", key, lambda t=t: head(t))["head"].to(device)
    tower.clear()

    # 4. test sets (cached as uint8 crops and labels)
    def test_split(task: str) -> StateDict:
        spec = specs[task]
        ds = loader(spec)
        k = hub.num_classes(ds, spec)
        if k is not None and k != len(templates.CLASSNAMES[spec.name]):
            raise ValueError(f"{spec.dataset} has {k} classes but the {spec.name} head has "
                             f"{len(templates.CLASSNAMES[spec.name])}: the label order cannot be trusted")
        return hub.preprocess_split(ds, spec, prep, n_test, seed, progress)

    test = {}
    for t in p.tasks:
        spec = specs[t]
        key = artifacts.make_key({"dataset": asdict(spec), "n_test": n_test, "seed": seed,
                                  "preprocess": asdict(prep)}, [hub])
        d = cache.tensors(f"test-{spec.key}", key, lambda t=t: test_split(t))
        images = d["images"] if uint8_images else hub.normalize(d["images"], prep)
        test[t] = TaskData(images=images.to(data_device), labels=d["labels"].to(data_device))

    return Suite(
        profile=p.name,
        tasks=list(p.tasks),
        model=model.to(device),
        pretrained={k: v.to(device) for k, v in pretrained.items()},
        finetuned={t: {k: v.to(device) for k, v in sd.items()} for t, sd in finetuned.items()},
        heads=heads,
        test=test,
        class_names={t: list(templates.CLASSNAMES[specs[t].name]) for t in p.tasks},
        meta={
            "backend": "clip_hf",
            "model_id": p.model_id,
            "finetuned_ids": ids,
            "datasets": {t: {"dataset": specs[t].dataset, "config": specs[t].config, "split": specs[t].split}
                         for t in p.tasks},
            "n_test": n_test,
            "seed": seed,
            "test_sizes": {t: len(test[t]) for t in p.tasks},
            "preprocess": asdict(prep),
            "n_tensors": len(pretrained),
            "matrix_keys": HF_CLIP_MATRIX_KEYS,
            "projection_from_pretrained": projection_from_pretrained,
            "uint8_images": uint8_images,
        },
    )
