"""Named profiles: which backend, which tasks, and the default hyperparameters of each scale.

``tiny`` is the offline miniature that CI and most readers run. The paper profiles load the real
CLIP checkpoints and datasets from the Hugging Face hub (GPU and internet needed).
"""

from __future__ import annotations

from dataclasses import dataclass, field

PAPER_TASKS = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]


@dataclass(frozen=True)
class Profile:
    """One scale of the book: backend, tasks, and method defaults reported by the papers."""

    name: str
    backend: str  # "tiny" | "clip_hf"
    tasks: list[str]
    description: str
    model_id: str | None = None  # hub id of the pretrained CLIP for clip_hf backends
    paper_table: dict[str, str] = field(default_factory=dict)  # paper -> table id of this scale
    offline: bool = False
    # Ties' global trim population: "vision" (the given image-tower tensors) or "whole_clip" (also
    # the zero-delta text-tower leftovers of the original task_vectors checkpoints, which the quoted
    # 72.4 and AdaMerging++ were computed with). See mergebook.layout.openclip_text_numel.
    ties_population: str = "vision"
    hub: str | None = None  # "pico": resolve every hub id to the local hub-pico snapshot
    load_kw: dict = field(default_factory=dict)  # defaults for the backend's load_suite


PROFILES: dict[str, Profile] = {
    "tiny": Profile(
        name="tiny", backend="tiny", offline=True,
        tasks=["digits", "housenum", "letters", "greek", "signs", "textures", "shapes", "patterns"],
        description="offline miniature: 1.2M-parameter CLIP-layout ViT, eight 32-px procedural tasks",
        paper_table={"adamerging": "1"},
    ),
    "vit-b-32": Profile(
        name="vit-b-32", backend="clip_hf", tasks=PAPER_TASKS, model_id="openai/clip-vit-base-patch32",
        description="CLIP ViT-B/32, eight tasks (AdaMerging Table 1)", paper_table={"adamerging": "1"},
        ties_population="whole_clip",
    ),
    "vit-b-16": Profile(
        name="vit-b-16", backend="clip_hf", tasks=PAPER_TASKS, model_id="openai/clip-vit-base-patch16",
        description="CLIP ViT-B/16, eight tasks (AdaMerging Table 5)", paper_table={"adamerging": "5"},
        ties_population="whole_clip",
    ),
    "vit-l-14": Profile(
        name="vit-l-14", backend="clip_hf", tasks=PAPER_TASKS, model_id="openai/clip-vit-large-patch14",
        description="CLIP ViT-L/14, eight tasks (AdaMerging Table 2)", paper_table={"adamerging": "2"},
        ties_population="whole_clip",
    ),
    # The paper path, offline: the same clip_hf backend and hub ids as vit-b-32, resolved to a local
    # snapshot of a pico CLIP and eight tiny datasets (mergebook.hub_pico). Chance-level numbers.
    "hub-pico": Profile(
        name="hub-pico", backend="clip_hf", tasks=PAPER_TASKS, model_id="openai/clip-vit-base-patch32",
        description="the vit-b-32 code path on a local pico hub snapshot (random weights, noise images)",
        paper_table={"adamerging": "1"}, offline=True, hub="pico", ties_population="whole_clip",
        load_kw={"n_val": None},
    ),
    # True shapes, random weights and images, no network: for GPU benchmarks of the real sizes.
    "random-b32": Profile(
        name="random-b32", backend="random", tasks=PAPER_TASKS, offline=True,
        description="ViT-B/32 shapes (152 tensors, 87.8M parameters), random weights and images",
        load_kw={"arch": "ViT-B/32"},
    ),
    "random-l14": Profile(
        name="random-l14", backend="random", tasks=PAPER_TASKS, offline=True,
        description="ViT-L/14 shapes (296 tensors, 303M parameters), random weights and images",
        load_kw={"arch": "ViT-L/14"},
    ),
    # The language chapter (07): a real text encoder offline, and Flan-T5 + LoRA at paper scale.
    "tiny-lm": Profile(
        name="tiny-lm", backend="tiny_lm", offline=True,
        tasks=["colors", "cities", "language", "code", "docs", "grammar", "unicode", "pyref"],
        description="offline language miniature: all-MiniLM-L6-v2 (PyPI wheel), peft LoRA, eight text tasks",
        paper_table={"concrete_subspace": "4"},
    ),
    "flan-t5-base-lora": Profile(
        name="flan-t5-base-lora", backend="flan_t5_lora", model_id="google/flan-t5-base",
        tasks=["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"],
        description="Flan-T5-base, LoRA-16 adapters on eight GLUE tasks (Concrete Tables 4 and 8)",
        paper_table={"concrete_subspace": "4"},
    ),
    "flan-t5-large-lora": Profile(
        name="flan-t5-large-lora", backend="flan_t5_lora", model_id="google/flan-t5-large",
        tasks=["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"],
        description="Flan-T5-large, LoRA-16 adapters on eight GLUE tasks (Concrete Tables 5 and 9)",
        paper_table={"concrete_subspace": "5"},
    ),
    # The Flan-T5 path offline: same backend and ids, resolved to a tiny random T5 the library writes.
    "flan-t5-pico": Profile(
        name="flan-t5-pico", backend="flan_t5_lora", model_id="google/flan-t5-base", offline=True, hub="pico",
        tasks=["cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb"],
        description="tiny random T5 and LoRA adapters under the Flan-T5 ids (code path only, chance numbers)",
        paper_table={"concrete_subspace": "4"},
    ),
}


class UnknownProfileError(ValueError):
    """A profile name that is not in :data:`PROFILES`."""


def get_profile(name: str) -> Profile:
    """Look up a profile by name; an unknown name is an error listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown profile {name!r}; known profiles: {', '.join(PROFILES)}. "
            "Pass one of these as the notebook's `profile` parameter (papermill -p profile NAME)."
        ) from None


def load_suite(profile: str, *, device: str = "auto", progress: bool = True, with_mtl: bool = False, **backend_kw):
    """Build the Suite of a profile (offline for ``tiny``; hub downloads for the CLIP profiles).

    ``backend_kw`` go to the backend (for ``clip_hf``: ``n_test``, ``cache_dir``, ...).
    """
    p = get_profile(profile)
    from .adaptation import resolve_device

    kw = {**p.load_kw, **backend_kw}
    if p.backend in ("tiny_lm", "flan_t5_lora"):
        from .models.text_backends import load_text_suite

        return load_text_suite(p, device=str(resolve_device(device)), progress=progress, **kw)
    if p.backend == "tiny":
        from .models.tiny import load_suite as tiny_suite

        suite = tiny_suite(progress=progress, with_mtl=with_mtl, **kw)
    elif p.backend == "random":
        from .models.random_clip import load_suite as random_suite

        suite = random_suite(p, device=str(resolve_device(device)), progress=progress, **kw)
    else:
        from .models.clip_hf import load_suite as hf_suite

        if p.hub == "pico":
            from . import hub_pico

            snap = hub_pico.snapshot()
            kw.setdefault("model_source", snap.model_source)
            kw.setdefault("dataset_loader", snap.dataset_loader)
        suite = hf_suite(p, device=str(resolve_device(device)), progress=progress, **kw)
    suite.meta.setdefault("ties_population", p.ties_population)
    if p.ties_population == "whole_clip":
        suite.meta["ties_extra_zeros"] = int(suite.meta.get("openclip_text_numel", 0))
    elif p.ties_population == "vision":
        suite.meta["ties_extra_zeros"] = 0
    else:
        raise ValueError(f"profile {p.name!r}: unknown ties_population {p.ties_population!r}; use 'vision' or "
                         "'whole_clip'")
    return suite
