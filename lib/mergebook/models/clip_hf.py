"""The paper-scale backend: CLIP ViT-B/32, B/16 and L/14 through ``transformers``.

Pipeline (hub downloads go to the Hugging Face cache; heads and test images are cached under
``.cache/mergebook/<profile>/`` keyed by their config and code):

1. the pretrained CLIP (``profile.model_id``, e.g. ``openai/clip-vit-base-patch32``): its image tower
   is the architecture and the pretrained state dict, its text tower makes the heads;
2. one fine-tuned image tower per task, ``tanganke/<arch>_<task key>`` (FusionBench's checkpoints,
   e.g. ``tanganke/clip-vit-base-patch32_stanford-cars``);
3. zero-shot heads, built as task_vectors builds them (see :mod:`mergebook.data.templates`);
4. the test split of every task from the hub, preprocessed like ``CLIPImageProcessor``.

Checkpoints arrive with the transformers key names (``vision_model.encoder.layers.{i}.self_attn.
q_proj.weight``, ..., ``visual_projection.weight``) and are converted on load, exactly, to the one
canonical layout of this library, open_clip's visual tower (:mod:`mergebook.layout`: Q, K and V
fused into ``attn.in_proj_weight``, ``mlp.c_fc``/``c_proj``, ``proj``), which
:class:`mergebook.models.vit.VisionTransformer` runs. So every per-matrix rule (CART's four
matrices, Ties' global trim, AdaMerging's one coefficient per tensor: 152 for ViT-B/32, as the
original) is the same rule on every backend. Only floating tensors are kept: the integer
``position_ids`` buffers are left out, so task vectors never see them. FusionBench loads its
fine-tuned checkpoints as ``CLIPVisionModel`` towers, without the projection (its fine-tuning keeps
the projection frozen), so their state dicts carry the pretrained projection and its task vector is
zero; a checkpoint that does hold a projection keeps its own. ``suite.meta["layout_info"]`` records
how to write merged weights back in transformers' names (:func:`mergebook.layout.from_canonical`).

Validation split: held out from the train split as task_vectors holds it out (``torch.utils.data.
random_split`` with ``torch.Generator().manual_seed(0)``: the last ``min(int(0.1·N), 5000)``
indices of a seeded permutation), then a seeded subset of ``n_val`` of them for speed.

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
from .. import layout as L
from .suite import Suite, TaskData
from .vit import ViTConfig, VisionTransformer

StateDict = dict[str, torch.Tensor]

#: Suffixes of the attention and MLP weight matrices of HF CLIP, as the checkpoints name them.
#: Suites hold the canonical layout, where these are ``attn.in_proj_weight`` (Q, K and V fused),
#: ``attn.out_proj.weight``, ``mlp.c_fc.weight`` and ``mlp.c_proj.weight``
#: (:func:`mergebook.layout.canonical_suffixes` translates).
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
    """Whether an HF-named ``key`` is an attention or MLP weight matrix (CART's low-rank targets)."""
    return key.endswith(HF_CLIP_MATRIX_KEYS)


def finetuned_id(model_id: str, task: str) -> str:
    """Hub id of FusionBench's fine-tuned image tower of ``task`` for the CLIP ``model_id``."""
    return f"{FINETUNED_OWNER}/{model_id.rsplit('/', 1)[-1]}_{hub.hub_task(task).key}"


class CLIPVisionEncoder(VisionTransformer):
    """CLIP's image tower in the canonical (open_clip) layout, returning projected image embeddings.

    ``forward(images)`` is open_clip's ``encode_image``. Float images are taken as already
    normalised; uint8 images are scaled and normalised inside with the processor's mean and std
    (non-persistent buffers, never in a state dict). Inputs move to the weights' device, so test
    sets may stay on the CPU.
    """

    def __init__(self, config: ViTConfig, preprocess: Preprocess | None = None):
        super().__init__(config)
        prep = preprocess or Preprocess(resize=config.image_size, crop=config.image_size)
        self.register_buffer("pixel_mean", torch.tensor(prep.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(prep.std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # noqa: D102
        weight = self.proj
        images = images.to(weight.device)
        if images.dtype == torch.uint8:
            mean, std = self.pixel_mean.to(weight.device), self.pixel_std.to(weight.device)
            images = (images.float() / 255.0 - mean) / std
        return super().forward(images.to(weight.dtype))


def hf_vision_shapes(vision_config: Any) -> dict[str, torch.Size]:
    """Float tensor shapes of transformers' ``CLIPVisionModelWithProjection`` (built on the meta device)."""
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        hf = CLIPVisionModelWithProjection(vision_config)
    return {k: v.shape for k, v in hf.state_dict().items() if v.is_floating_point()}


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


def download_plan(model_id: str, finetuned: Mapping[str, str], tasks: Any) -> str:
    """What a CLIP profile downloads, as commands to fetch it ahead of time (then HF_HUB_OFFLINE=1 works)."""
    lines = ["It needs these hub repositories (about 0.6 GB per ViT-B checkpoint, 1.7 GB per ViT-L/14):",
             f"  hf download {model_id}"]
    lines += [f"  hf download {fid}" for fid in finetuned.values()]
    for spec in tasks:
        lines.append(f"  hf download --repo-type dataset {spec.dataset}" + (f"  # config {spec.config}" if spec.config
                                                                           else ""))
    return "\n".join(lines)


VAL_FRACTION = 0.1
VAL_MAX = 5000
VAL_SEED = 0


def heldout_val_indices(n_train: int, fraction: float = VAL_FRACTION, max_samples: int = VAL_MAX,
                        seed: int = VAL_SEED) -> list[int]:
    """Indices of the train split that task_vectors holds out for validation.

    ``split_train_into_train_val`` in mlfoundations/task_vectors: ``val_size = min(int(N·fraction),
    max_samples)``, then ``torch.utils.data.random_split(train, [N − val_size, val_size],
    generator=torch.Generator().manual_seed(seed))``, whose val part is the tail of
    ``torch.randperm(N, generator=...)``. (The hub copies may order their rows differently from
    torchvision's folders, so the procedure, not the exact images, is what is reproduced.)
    """
    val_size = min(int(n_train * fraction), max_samples)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n_train - val_size:]


def load_suite(
    profile: Any,
    device: str = "cpu",
    progress: bool = True,
    cache_dir: str | Path | None = None,
    n_test: int | None = None,
    *,
    n_val: int | None = 1000,
    seed: int = 0,
    data_device: str = "cpu",
    uint8_images: bool = False,
    model_source: Callable[[str], str | Path] | None = None,
    dataset_loader: Callable[[HubTask, str], Any] | None = None,
    cache: artifacts.Cache | None = None,
    finetuned_ids: Mapping[str, str] | None = None,
    text_batch_size: int = 256,
) -> Suite:
    """The Suite of a CLIP profile: hub checkpoints (canonical layout), zero-shot heads, val and test sets.

    Args:
        profile: a :class:`~mergebook.profiles.Profile` (backend ``clip_hf``) or its name.
        device: where the architecture, state dicts and heads live.
        progress: show tqdm bars while checkpoints load and images are preprocessed.
        cache_dir: the Hugging Face cache for downloads (default: the usual one under ``$HF_HOME``).
        n_test: at most this many test images per task, a seeded random subset (None: all of them;
            the eight full test sets are ~87k images, ~52 GB as float32 at 224 px, ~13 GB as uint8).
        n_val: at most this many images of each task's held-out validation split
            (:func:`heldout_val_indices`), a seeded subset (None: all, up to 5000 per task).
        seed: seed of those subsets.
        data_device: where images and labels live (CPU by default; the model moves batches).
        uint8_images: keep images as uint8 crops (4x less memory); the model normalises them
            itself. The default is normalised float32, as the Suite documents.
        model_source: maps a hub model id to a local checkpoint directory (default: download it
            with :func:`hub_snapshot`); tests, ``hub-pico`` and air-gapped machines pass their own.
        dataset_loader: maps a :class:`~mergebook.data.hub.HubTask` and a split name (``"test"`` or
            ``"train"``) to a sequence of ``{"image": PIL, "label": int}`` rows such as a
            ``datasets.Dataset`` (default: :func:`mergebook.data.hub.load_split`).
        cache: where heads and image tensors are cached (default: ``Cache(profile.name)``).
        finetuned_ids: per task, a hub id replacing FusionBench's ``tanganke/<arch>_<key>``.
        text_batch_size: prompts per text-tower batch when building heads.

    Raises:
        HubUnavailableError: the hub could not be reached (the message lists what to download).
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
    loader = dataset_loader or (lambda task, split: hub.load_split(task, split, cache_dir=cache_dir))
    cache = cache or artifacts.Cache(p.name)
    ids = {t: (finetuned_ids or {}).get(t) or finetuned_id(p.model_id, t) for t in p.tasks}

    # 1. the pretrained CLIP: architecture, pretrained image tower (canonical layout), preprocessing
    try:
        pre_dir = Path(source(p.model_id))
    except HubUnavailableError as err:  # fail at the start, with everything the profile needs
        raise HubUnavailableError(f"{err}\n{download_plan(p.model_id, ids, specs.values())}") from None
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
    vit_cfg = L.vit_config_from_hf(vcfg, config.projection_dim)
    model = CLIPVisionEncoder(vit_cfg, prep)
    shapes = hf_vision_shapes(vcfg)
    is_vision = lambda k: vision_key(k) is not None  # noqa: E731
    pretrained_hf = vision_state_dict(read_checkpoint(pre_dir, is_vision), shapes, p.model_id)
    pretrained, info = L.hf_to_canonical(pretrained_hf)
    model.load_state_dict(pretrained)
    model.eval()

    # 2. fine-tuned image towers (FusionBench's have no projection: the pretrained one is used)
    finetuned: dict[str, StateDict] = {}
    projection_from_pretrained = []
    for t in tqdm(p.tasks, desc="fine-tuned checkpoints", disable=not progress, leave=False):
        sd = vision_state_dict(read_checkpoint(Path(source(ids[t])), is_vision), shapes, ids[t],
                               optional=("visual_projection.weight",))
        if "visual_projection.weight" not in sd:
            sd["visual_projection.weight"] = pretrained_hf["visual_projection.weight"].clone()
            projection_from_pretrained.append(t)
        canon, _ = L.hf_to_canonical({k: sd[k] for k in pretrained_hf})
        finetuned[t] = {k: canon[k] for k in pretrained}  # same key order as the pretrained
    del pretrained_hf

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

    # 4. test and validation images (cached as uint8 crops and labels)
    def split_tensors(task: str, split: str) -> StateDict:
        spec = specs[task]
        ds = loader(spec, "test" if split == "test" else "train")
        k = hub.num_classes(ds, spec)
        if k is not None and k != len(templates.CLASSNAMES[spec.name]):
            raise ValueError(f"{spec.dataset} has {k} classes but the {spec.name} head has "
                             f"{len(templates.CLASSNAMES[spec.name])}: the label order cannot be trusted")
        if split == "test":
            return hub.preprocess_split(ds, spec, prep, n_test, seed, progress)
        held = heldout_val_indices(len(ds))
        pick = hub.subset_indices(len(held), n_val, seed)
        rows = ds.select([held[i] for i in pick]) if hasattr(ds, "select") else [ds[held[i]] for i in pick]
        return hub.preprocess_split(rows, spec, prep, None, seed, progress, what="val")

    def images_of(task: str, split: str) -> TaskData:
        spec = specs[task]
        key = artifacts.make_key({"dataset": asdict(spec), "split": split, "n": n_test if split == "test" else n_val,
                                  "seed": seed, "preprocess": asdict(prep),
                                  "val": [VAL_FRACTION, VAL_MAX, VAL_SEED]}, [hub])
        d = cache.tensors(f"{split}-{spec.key}", key, lambda: split_tensors(task, split))
        images = d["images"] if uint8_images else hub.normalize(d["images"], prep)
        return TaskData(images=images.to(data_device), labels=d["labels"].to(data_device))

    test = {t: images_of(t, "test") for t in p.tasks}
    val = {t: images_of(t, "val") for t in p.tasks}
    text_cfg = config.text_config

    return Suite(
        profile=p.name,
        tasks=list(p.tasks),
        model=model.to(device),
        pretrained={k: v.to(device) for k, v in pretrained.items()},
        finetuned={t: {k: v.to(device) for k, v in sd.items()} for t, sd in finetuned.items()},
        heads=heads,
        test=test,
        val=val,
        class_names={t: list(templates.CLASSNAMES[specs[t].name]) for t in p.tasks},
        meta={
            "backend": "clip_hf",
            "model_id": p.model_id,
            "finetuned_ids": ids,
            "datasets": {t: {"dataset": specs[t].dataset, "config": specs[t].config, "split": specs[t].split}
                         for t in p.tasks},
            "n_test": n_test,
            "n_val": n_val,
            "seed": seed,
            "test_sizes": {t: len(test[t]) for t in p.tasks},
            "val_sizes": {t: len(val[t]) for t in p.tasks},
            "val_split": (f"held out from train as task_vectors does ({VAL_FRACTION:.0%}, at most {VAL_MAX}, "
                          f"seed {VAL_SEED}), then {n_val if n_val else 'all'} of them (seed {seed})"),
            "preprocess": asdict(prep),
            "n_tensors": len(pretrained),
            "pretrained_dir": str(pre_dir),
            "layout": L.CANONICAL,
            "layout_info": info,
            "vit_config": vit_cfg.to_dict(),
            # Ties' global trim in the original counts the text-tower leftovers of its whole-CLIP
            # checkpoints (zero delta); the profile decides whether to count them.
            "openclip_text_numel": L.openclip_text_numel(text_cfg.vocab_size, text_cfg.max_position_embeddings,
                                                         text_cfg.hidden_size, config.projection_dim),
            "projection_from_pretrained": projection_from_pretrained,
            "uint8_images": uint8_images,
            "fingerprint": artifacts.make_key({"model_id": p.model_id, "checkpoint": fingerprint, "ids": ids,
                                               "n_test": n_test, "n_val": n_val, "seed": seed}),
        },
    )
