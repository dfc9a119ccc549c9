"""The eight paper tasks on the Hugging Face hub: dataset ids, loading, and CLIP preprocessing.

Dataset ids and splits follow FusionBench (``config/dataset/image_classification/test/*.yaml``),
whose fine-tuned checkpoints (``tanganke/clip-vit-*_<key>``) were trained on these datasets. Images
are preprocessed like ``transformers.CLIPImageProcessor``: convert to RGB, resize the shortest edge
to 224 with PIL bicubic, centre crop 224 x 224 (offsets rounded down, as transformers does;
torchvision's ``CenterCrop`` in task_vectors rounds to nearest: a one-pixel shift at most), scale to
[0, 1] and normalise with the OpenAI mean and std. The crop is kept as uint8, which is exactly what
the processor holds before rescaling, so caching uint8 loses nothing and takes a quarter of the
space.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm  # console bars: tqdm.auto warns without ipywidgets in the book's kernels

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value transformers stores as `resample`


@dataclass(frozen=True)
class HubTask:
    """One paper task on the hub: our name, FusionBench's key, and where its test split lives."""

    name: str  # task_vectors' name, as in the profiles: "Cars"
    key: str  # FusionBench's name, the suffix of the fine-tuned checkpoint ids: "stanford-cars"
    dataset: str  # hub dataset id
    config: str | None = None  # dataset configuration ("cropped_digits" for SVHN)
    split: str = "test"
    image_column: str = "image"
    label_column: str = "label"


HUB_TASKS: dict[str, HubTask] = {
    t.name: t
    for t in [
        HubTask("SUN397", "sun397", "tanganke/sun397"),
        HubTask("Cars", "stanford-cars", "tanganke/stanford_cars"),
        HubTask("RESISC45", "resisc45", "tanganke/resisc45"),
        HubTask("EuroSAT", "eurosat", "tanganke/eurosat"),
        HubTask("SVHN", "svhn", "ufldl-stanford/svhn", config="cropped_digits"),
        HubTask("GTSRB", "gtsrb", "tanganke/gtsrb"),
        HubTask("MNIST", "mnist", "ylecun/mnist"),
        HubTask("DTD", "dtd", "tanganke/dtd"),
    ]
}


class UnknownTaskError(ValueError):
    """A task name that no hub task matches."""


class HubUnavailableError(RuntimeError):
    """A checkpoint or dataset could not be fetched from the Hugging Face hub."""


def hub_task(name: str) -> HubTask:
    """Look up a task by our name or FusionBench's key, ignoring case; unknown names list the known."""
    wanted = name.lower().replace("_", "-")
    for t in HUB_TASKS.values():
        if wanted in (t.name.lower(), t.key):
            return t
    raise UnknownTaskError(
        f"unknown task {name!r} for the clip_hf backend; known tasks: {', '.join(HUB_TASKS)} "
        f"(FusionBench keys {', '.join(t.key for t in HUB_TASKS.values())} work too)"
    )


_NETWORK_ERROR_NAMES = {
    "LocalEntryNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError", "ConnectError",
    "TransportError", "TimeoutException", "ConnectionError",
}


def is_network_error(err: BaseException) -> bool:
    """Whether ``err`` means the hub could not be reached (offline, DNS, timeout, HTTP failure)."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    names = {c.__name__ for c in type(err).__mro__}
    module = type(err).__module__ or ""
    return bool(names & _NETWORK_ERROR_NAMES) or module.startswith(("httpx", "httpcore", "requests", "urllib3"))


def hub_unavailable(what: str, err: BaseException) -> HubUnavailableError:
    """The one message for every hub failure: what failed, why, and the offline alternative."""
    return HubUnavailableError(
        f"could not fetch {what!r} from the Hugging Face hub ({type(err).__name__}: {err}). "
        "The paper profiles (vit-b-32, vit-b-16, vit-l-14) download CLIP checkpoints and datasets "
        "from the hub: they need internet, and a GPU is recommended. Without internet, use the "
        'offline miniature, profile="tiny" (the default). If the files are already in the Hugging '
        "Face cache, set HF_HUB_OFFLINE=1 to use them without a connection."
    )


def load_split(task: HubTask, split: str | None = None, cache_dir: str | Path | None = None) -> Any:
    """One split of ``task`` as a ``datasets.Dataset`` (downloaded once into the HF cache)."""
    import datasets

    try:
        return datasets.load_dataset(task.dataset, task.config, split=split or task.split,
                                     cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as err:
        if is_network_error(err):
            raise hub_unavailable(task.dataset, err) from err
        raise


@dataclass(frozen=True)
class Preprocess:
    """CLIP's evaluation transform: resize the shortest edge, centre crop, normalise."""

    resize: int = 224  # shortest edge after resizing
    crop: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    resample: int = PIL_BICUBIC

    @classmethod
    def from_processor_config(cls, path: str | Path, image_size: int | None = None) -> Preprocess:
        """Read a ``preprocessor_config.json`` (old int or new dict sizes); defaults if it is absent."""
        path = Path(path)
        if not path.exists():
            size = image_size or 224
            return cls(resize=size, crop=size)
        d = json.loads(path.read_text())
        size, crop = d.get("size", 224), d.get("crop_size", d.get("size", 224))
        if isinstance(size, dict):
            size = size.get("shortest_edge") or min(size.get("height", 224), size.get("width", 224))
        if isinstance(crop, dict):
            if crop.get("height") != crop.get("width"):
                raise ValueError(f"{path}: only square crops are supported, got {crop}")
            crop = crop["height"]
        return cls(resize=int(size), crop=int(crop), mean=tuple(d.get("image_mean", OPENAI_MEAN)),
                   std=tuple(d.get("image_std", OPENAI_STD)), resample=int(d.get("resample", PIL_BICUBIC)))


def _to_pil(image: Any):
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        return Image.fromarray(image)
    if isinstance(image, dict) and image.get("bytes") is not None:
        import io

        return Image.open(io.BytesIO(image["bytes"]))
    raise TypeError(f"expected a PIL image, an array or an encoded image dict, got {type(image).__name__}")


def crop_uint8(image: Any, prep: Preprocess) -> np.ndarray:
    """RGB, shortest edge resized with PIL, centre-cropped: uint8 ``[3, crop, crop]``."""
    img = _to_pil(image)
    if img.mode != "RGB":
        img = img.convert("RGB")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = prep.resize, int(prep.resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), resample=prep.resample)
    arr = np.asarray(img, dtype=np.uint8)
    if new_h < prep.crop or new_w < prep.crop:
        raise ValueError(f"image of {new_w}x{new_h} after resizing is smaller than the {prep.crop}-pixel crop")
    top, left = (new_h - prep.crop) // 2, (new_w - prep.crop) // 2
    return np.ascontiguousarray(arr[top : top + prep.crop, left : left + prep.crop].transpose(2, 0, 1))


def normalize(images: torch.Tensor, prep: Preprocess) -> torch.Tensor:
    """uint8 ``[N, 3, H, W]`` to float32 scaled to [0, 1] and normalised with ``prep``'s mean/std."""
    mean = torch.tensor(prep.mean, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(prep.std, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def subset_indices(n: int, n_max: int | None, seed: int = 0) -> list[int]:
    """All of ``range(n)``, or ``n_max`` of them drawn without replacement (sorted, seeded)."""
    if n_max is None or n_max >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    return sorted(int(i) for i in rng.choice(n, size=n_max, replace=False))


def num_classes(dataset: Any, task: HubTask) -> int | None:
    """The label feature's class count, when the dataset declares one."""
    features = getattr(dataset, "features", None) or {}
    return getattr(features.get(task.label_column), "num_classes", None)


def preprocess_split(
    dataset: Any, task: HubTask, prep: Preprocess, n_max: int | None = None, seed: int = 0,
    progress: bool = True, what: str = "test",
) -> dict[str, torch.Tensor]:
    """uint8 crops ``[N, 3, crop, crop]`` and int64 labels of (a seeded subset of) a split."""
    idx = subset_indices(len(dataset), n_max, seed)
    rows = dataset.select(idx) if hasattr(dataset, "select") else [dataset[i] for i in idx]
    images = torch.empty((len(idx), 3, prep.crop, prep.crop), dtype=torch.uint8)
    labels = torch.empty(len(idx), dtype=torch.int64)
    bar = tqdm(rows, total=len(idx), desc=f"{task.name} {what} images", disable=not progress, leave=False)
    for i, row in enumerate(bar):
        images[i] = torch.from_numpy(crop_uint8(row[task.image_column], prep))
        labels[i] = int(row[task.label_column])
    return {"images": images, "labels": labels}
