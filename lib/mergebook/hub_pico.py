"""``hub-pico``: a local, offline stand-in for the Hugging Face hub, so the paper path really runs.

The paper profiles (``vit-b-32`` ...) download a CLIP, eight fine-tuned image towers and eight
datasets. CI has no network, yet that path must execute end to end, or its crashes go unseen. This
module writes, at pico scale, everything the ``clip_hf`` backend downloads, in the formats the hub
serves, and resolves the very same hub ids to it:

* a full ``CLIPModel`` checkpoint (hidden 32, 2 layers, 2 heads, 32-px images, 16-px patches,
  projection 16) with a byte-level CLIP tokenizer and a processor config, as
  ``openai/clip-vit-base-patch32``;
* one fine-tuned image tower per task, ``tanganke/clip-vit-base-patch32_<key>``, in the formats
  that exist on the hub: a projection-less ``CLIPVisionModel`` in safetensors (FusionBench's), a
  ``CLIPVisionModelWithProjection`` in safetensors, and a weights-only ``pytorch_model.bin``;
* each dataset (``tanganke/sun397``, ``ylecun/mnist``, ``ufldl-stanford/svhn`` ...) as parquet
  files of a ``train`` and a ``test`` split with a ``ClassLabel`` feature, read back through
  ``datasets.load_dataset`` as the hub copies are.

The weights are random and the images noise, so every accuracy is chance-level: hub-pico proves that
the code path runs (conversion, heads from the text tower, preprocessing, caching, every chapter),
not any number. The snapshot is deterministic under its seed and is built once into the cache.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import artifacts

PRETRAINED_ID = "openai/clip-vit-base-patch32"
IMAGE_SIZE = 32
LOGIT_SCALE = math.log(50.0)
#: how a task's fine-tuned tower is saved (the three formats the clip_hf backend must read)
FORMATS = {"MNIST": "vision", "EuroSAT": "vision_with_projection", "GTSRB": "bin"}
SNAPSHOT_VERSION = 1


@dataclass
class PicoHub:
    """Local stand-ins for hub ids, with counters of what was asked for."""

    root: Path
    models: dict[str, Path]
    datasets: dict[str, dict[str, Any]]  # dataset id -> split -> Dataset or parquet path
    calls: Counter = field(default_factory=Counter)

    def model_source(self, repo_id: str) -> Path:
        """Resolve a model id as ``hub_snapshot`` would, without a network."""
        self.calls[repo_id] += 1
        if repo_id not in self.models:
            raise KeyError(f"hub-pico has no model {repo_id!r}; it holds {sorted(self.models)}")
        return self.models[repo_id]

    def dataset_loader(self, task, split: str = "test") -> Any:
        """One split of a ``HubTask``, as ``hub.load_split`` returns it (a ``datasets.Dataset``)."""
        self.calls[task.dataset] += 1
        entry = self.datasets[task.dataset][split]
        if isinstance(entry, (str, Path)):
            import datasets

            return datasets.load_dataset("parquet", data_files={split: str(entry)}, split=split)
        return entry


def split_path(root: Path, spec, split: str) -> Path:
    """Where the snapshot keeps one split of a hub dataset: ``datasets/<id>/<config>/<split>-00000-of-00001.parquet``."""
    return root / "datasets" / spec.dataset / (spec.config or "default") / f"{split}-00000-of-00001.parquet"


def write_tokenizer(directory: Path) -> tuple[int, int, int]:
    """A byte-level CLIP BPE vocabulary without merges; returns (vocab size, bos id, eos id)."""
    from tokenizers import pre_tokenizers

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab), len(vocab) - 2, len(vocab) - 1


def pico_config(vocab_size: int, bos: int, eos: int):
    """The pico ``CLIPConfig``."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, projection_dim=16,
                         bos_token_id=bos, eos_token_id=eos, pad_token_id=eos),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=IMAGE_SIZE, patch_size=16, projection_dim=16),
        projection_dim=16, logit_scale_init_value=LOGIT_SCALE,
    )


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def pico_dataset(task: str, n: int, seed: int):
    """``n`` noise images of mixed sizes and modes with random labels of ``task``'s classes."""
    import datasets
    from PIL import Image

    from .data.templates import CLASSNAMES

    rng = np.random.default_rng(seed)
    names = list(CLASSNAMES[task])
    images, labels = [], []
    for i in range(n):
        h, w = int(rng.integers(33, 60)), int(rng.integers(33, 60))  # odd and even, both orientations
        if i % 4 == 0:  # grayscale, as MNIST's are
            images.append(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), mode="L"))
        else:
            images.append(Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)))
        labels.append(int(rng.integers(0, len(names))))
    features = datasets.Features(image=datasets.Image(), label=datasets.ClassLabel(names=names))
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def build(root: str | Path, tasks: tuple[str, ...] | list[str] | None = None, n_test: int = 10, n_train: int = 0,
          seed: int = 0, parquet: bool = False) -> PicoHub:
    """Write the pico CLIP, one fine-tuned tower per task and the dataset splits under ``root``.

    ``n_train`` > 0 also writes a train split (the held-out validation split comes from it).
    With ``parquet`` the splits are parquet files read back with ``datasets.load_dataset``;
    otherwise they stay in memory (fast, for unit tests).
    """
    import transformers
    from transformers import CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

    from .data.hub import hub_task
    from .models.clip_hf import finetuned_id
    from .profiles import PAPER_TASKS

    tasks = tuple(tasks or PAPER_TASKS)
    transformers.logging.set_verbosity_error()  # the partial loads below report unused text weights
    root = Path(root)
    pre = root / "models" / PRETRAINED_ID
    pre.mkdir(parents=True)
    vocab_size, bos, eos = write_tokenizer(pre)
    torch.manual_seed(seed)
    CLIPModel(pico_config(vocab_size, bos, eos)).save_pretrained(pre, safe_serialization=True)
    (pre / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": IMAGE_SIZE},
        "resample": 3, "do_center_crop": True, "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    }))
    models = {PRETRAINED_ID: pre}
    data: dict[str, dict[str, Any]] = {}
    for i, task in enumerate(tasks):
        fid = finetuned_id(PRETRAINED_ID, task)
        d = root / "models" / fid
        fmt = FORMATS.get(task, "vision")
        cls = CLIPVisionModelWithProjection if fmt == "vision_with_projection" else CLIPVisionModel
        tower = cls.from_pretrained(pre)
        _perturb(tower, seed=100 + i)
        if fmt == "bin":
            d.mkdir(parents=True)
            tower.config.save_pretrained(d)
            torch.save(tower.state_dict(), d / "pytorch_model.bin")
        else:
            tower.save_pretrained(d, safe_serialization=True)
        models[fid] = d
        spec = hub_task(task)
        splits = {"test": pico_dataset(task, n_test, seed + i)}
        if n_train:
            splits["train"] = pico_dataset(task, n_train, seed + 1000 + i)
        if parquet:
            for split, ds in list(splits.items()):
                path = split_path(root, spec, split)
                path.parent.mkdir(parents=True, exist_ok=True)
                ds.to_parquet(str(path))
                splits[split] = path
        data[spec.dataset] = splits
    return PicoHub(root=root, models=models, datasets=data)


def snapshot(cache_root: Path | None = None, n_test: int = 24, n_train: int = 100, seed: int = 0) -> PicoHub:
    """The ``hub-pico`` snapshot for the eight paper tasks, built once (atomically) under the cache."""
    from .data.hub import hub_task
    from .models.clip_hf import finetuned_id
    from .profiles import PAPER_TASKS

    base = (cache_root or artifacts.cache_root()) / "hub-pico"
    final = base / f"snapshot-v{SNAPSHOT_VERSION}-n{n_test}-{n_train}-s{seed}"
    if not (final / "COMPLETE").exists():
        base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=base))
        try:
            build(tmp, PAPER_TASKS, n_test=n_test, n_train=n_train, seed=seed, parquet=True)
            (tmp / "COMPLETE").write_text("ok\n")
            if final.exists():  # a stale, incomplete copy: never trusted
                shutil.rmtree(final)
            tmp.rename(final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    models = {PRETRAINED_ID: final / "models" / PRETRAINED_ID}
    data: dict[str, dict[str, Any]] = {}
    for t in PAPER_TASKS:
        fid = finetuned_id(PRETRAINED_ID, t)
        models[fid] = final / "models" / fid
        spec = hub_task(t)
        data[spec.dataset] = {s: split_path(final, spec, s) for s in ("train", "test")}
    return PicoHub(root=final, models=models, datasets=data)
