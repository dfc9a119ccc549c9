"""The language profiles' entry point (``tiny-lm``, ``flan-t5-*-lora``, ``flan-t5-pico``), kept out of profiles.py."""

from __future__ import annotations

from typing import Any

from .suite import Suite


def load_text_suite(profile: Any, *, device: str = "cpu", progress: bool = True, **kw) -> Suite:
    """Build the Suite of a language profile (``tiny_lm`` or ``flan_t5_lora`` backend)."""
    if profile.backend == "tiny_lm":
        from .tiny_lm import load_suite

        return load_suite(progress=progress, device=device, **kw)
    from . import flan_t5_lora

    if profile.hub == "pico":
        from ..artifacts import cache_root

        root = cache_root() / profile.name / "snapshot"
        ms, dl = flan_t5_lora.build_pico_t5(root, base_id=profile.model_id)
        kw.setdefault("model_source", ms)
        kw.setdefault("dataset_loader", dl)
        kw.setdefault("max_length", 48)
    return flan_t5_lora.load_suite(profile.model_id, profile.tasks, device=device, profile=profile.name,
                                   progress=progress, **kw)
