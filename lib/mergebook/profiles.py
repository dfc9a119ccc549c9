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
    ),
    "vit-b-16": Profile(
        name="vit-b-16", backend="clip_hf", tasks=PAPER_TASKS, model_id="openai/clip-vit-base-patch16",
        description="CLIP ViT-B/16, eight tasks (AdaMerging Table 5)", paper_table={"adamerging": "5"},
    ),
    "vit-l-14": Profile(
        name="vit-l-14", backend="clip_hf", tasks=PAPER_TASKS, model_id="openai/clip-vit-large-patch14",
        description="CLIP ViT-L/14, eight tasks (AdaMerging Table 2)", paper_table={"adamerging": "2"},
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
    if p.backend == "tiny":
        from .models.tiny import load_suite as tiny_suite

        suite = tiny_suite(progress=progress, with_mtl=with_mtl, **backend_kw)
    else:
        from .models.clip_hf import load_suite as hf_suite

        from .adaptation import resolve_device

        suite = hf_suite(p, device=str(resolve_device(device)), progress=progress, **backend_kw)
    return suite
