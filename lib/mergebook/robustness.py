"""Suites whose test images are corrupted (AdaMerging Table 4, Fig. 6), from any backend's suite.

A suite's test images are what the encoder eats: float32 ``[N, 3, H, W]`` normalised with a
per-channel mean and std (the tiny miniature's ``tiny_train.to_tensor`` and the CLIP backends'
``data.hub.normalize`` both scale uint8 to [0, 1] and use CLIP's OpenAI mean/std; a hub profile
records its processor's own in ``meta["preprocess"]``), or uint8 ``[N, 3, H, W]`` when a CLIP
suite was loaded with ``uint8_images=True`` (its encoder normalises them). The corruptions of
:mod:`mergebook.data.corruptions` work on uint8 (or [0, 1]) images, channels last, so a corrupted
suite de-normalises each test image back to the uint8 crop it was made from, corrupts it, and
normalises it again. Both backends' images started as uint8 crops, so the round trip of a clean
image is exact up to float rounding (tests/test_generalisation_robustness.py checks it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .data import corruptions
from .models.suite import Suite, TaskData

CHUNK = 512  # images corrupted per call (memory at 224 px); the seeds follow the global index
CLEAN = "clean"


def pixel_stats(suite: Suite) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel (mean, std) the suite's float test images were normalised with."""
    from .data.hub import OPENAI_MEAN, OPENAI_STD

    prep = suite.meta.get("preprocess") or {}
    return tuple(prep.get("mean", OPENAI_MEAN)), tuple(prep.get("std", OPENAI_STD))


def _stats(mean: Sequence[float], std: Sequence[float], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = torch.tensor(mean, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=like.device).view(1, -1, 1, 1)
    return m, s


def to_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised float ``[N, C, H, W]`` (or uint8) → uint8 ``[N, H, W, C]`` in [0, 255] (numpy, CPU)."""
    if images.dtype == torch.uint8:
        return images.permute(0, 2, 3, 1).cpu().numpy()
    m, s = _stats(mean, std, images)
    x = (images.float() * s + m).mul_(255.0).round_().clamp_(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_uint8(images: np.ndarray, mean: Sequence[float], std: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` → the dtype, layout and device of ``like`` (normalised unless uint8)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).to(like.device)
    if like.dtype == torch.uint8:
        return x.contiguous()
    m, s = _stats(mean, std, like)
    return ((x.float() / 255.0 - m) / s).to(like.dtype).contiguous()


def corrupt_images(images: torch.Tensor, corruption: str, severity: int, seed: int,
                   mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """De-normalise → corrupt (:func:`mergebook.data.corruptions.corrupt`) → re-normalise, in chunks.

    ``corruption="clean"`` returns the round trip without corrupting (the identity up to float
    rounding). Image ``i`` is corrupted with the seeds of index ``i`` whatever the chunk size.
    """
    name = CLEAN if str(corruption).lower() == CLEAN else corruptions.canonical(corruption)
    out = []
    for start in range(0, images.shape[0], CHUNK):
        u8 = to_uint8(images[start:start + CHUNK], mean, std)
        if name != CLEAN:
            u8 = corruptions.corrupt(u8, name, severity=severity, seed=seed, start=start)
        out.append(from_uint8(u8, mean, std, images))
    return torch.cat(out) if out else images.clone()


def corrupted_key(suite: Suite, corruption: str, severity: int = 3, seed: int = 0) -> Suite:
    """The suite under the cache key :func:`corrupted_suite` gives it, without corrupting anything
    (its test images are still clean: use it only to look results up)."""
    if str(corruption).lower() == CLEAN:
        return suite
    return suite.derived(corruption=corruptions.canonical(corruption), severity=int(severity),
                         corruption_seed=int(seed))


def corrupted_suite(suite: Suite, corruption: str, severity: int = 3, seed: int = 0,
                    progress: bool = False) -> Suite:
    """The suite with every task's *test* images corrupted (labels, weights, heads and val kept).

    Test-time adaptation reads ``suite.unlabeled`` (the test images), so an adaptive merge on the
    result adapts on the corrupted images, as in AdaMerging's Table 4. The copy carries its own
    cache key (``meta["fingerprint"]`` records the corruption, severity and seed). ``"clean"``
    returns the suite itself.
    """
    if str(corruption).lower() == CLEAN:
        return suite
    name = corruptions.canonical(corruption)
    mean, std = pixel_stats(suite)
    tasks = suite.tasks
    if progress:
        from tqdm import tqdm

        tasks = tqdm(tasks, desc=f"corrupt test images ({name}, severity {severity})", leave=False)
    test = {t: TaskData(corrupt_images(suite.test[t].images, name, severity, seed, mean, std), suite.test[t].labels)
            for t in tasks}
    out = corrupted_key(suite, name, severity, seed)
    out.test = test
    out.meta["corruption"] = {"name": name, "severity": int(severity), "seed": int(seed)}
    return out


def corruption_samples(suite: Suite, tasks: Sequence[str], names: Sequence[str], severity: int = 3, seed: int = 0,
                       index: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``{corruption: {task: uint8 [H, W, C]}}``: test image ``index`` of each task, clean and under
    each corruption exactly as :func:`corrupted_suite` corrupts it (for a sample grid, Fig. 6)."""
    mean, std = pixel_stats(suite)
    out: dict[str, dict[str, np.ndarray]] = {}
    for name in names:
        out[name] = {}
        for t in tasks:
            img = suite.test[t].images[index:index + 1]
            u8 = to_uint8(img, mean, std)
            if str(name).lower() != CLEAN:
                u8 = corruptions.corrupt(u8, name, severity=severity, seed=seed, start=index)
            out[name][t] = u8[0]
    return out


__all__ = ["CLEAN", "corrupt_images", "corrupted_key", "corrupted_suite", "corruption_samples", "from_uint8", "pixel_stats",
           "to_uint8"]
