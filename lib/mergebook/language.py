"""The language chapter's experiment layer (07_language_lora): Concrete Tables 4/5, 8/9 and Fig. 5c-d.

Every function takes a text Suite (``tiny-lm`` or a Flan-T5 LoRA profile), reuses the registered
merge methods and the adaptation engine, and caches its result (``results.cached_result``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import experiment as X
from .results import cached_result

# Our row names -> the Concrete paper's, per table (Table 5 spells the last row differently).
PAPER_ROWS = {
    "4": {"Individual": "Individual", "Weight Averaging": "Weight Averaging", "Task Arithmetic": "Task Arithmetic",
          "Ties-Merging": "Ties-Merging", "Concrete TA": "Concrete TA", "LW AdaMerging": "LW AM",
          "LW Concrete AM": "LW Concrete AM"},
    "5": {"Individual": "Individual", "Weight Averaging": "Weight Averaging", "Task Arithmetic": "Task Arithmetic",
          "Ties-Merging": "Ties-Merging", "Concrete TA": "Concrete TA", "LW AdaMerging": "LW AM",
          "LW Concrete AM": "Concrete LW AM"},
}
INDIVIDUAL_TABLE = {"4": "8", "5": "9"}

#: The book is built with one image profile for every chapter (``PROFILE=vit-b-32 make book``); the
#: language chapter runs that profile's language counterpart. Language profiles map to themselves.
TEXT_PROFILE = {"tiny": "tiny-lm", "hub-pico": "flan-t5-pico", "vit-b-32": "flan-t5-base-lora",
                "vit-b-16": "flan-t5-base-lora", "vit-l-14": "flan-t5-large-lora"}


def text_profile(profile: str) -> str:
    """The language profile this chapter runs for the book's ``profile`` (``tiny`` -> ``tiny-lm``)."""
    from .profiles import get_profile

    name = TEXT_PROFILE.get(profile, profile)
    p = get_profile(name)  # an unknown name is an error listing the known ones
    if "concrete_subspace" not in p.paper_table:
        raise ValueError(f"profile {profile!r} has no language counterpart: use one of "
                         f"{', '.join(sorted(set(TEXT_PROFILE.values())))} or an image profile of {sorted(TEXT_PROFILE)}")
    return name


def individual_matrix(suite: Any) -> pd.DataFrame:
    """Table 8/9: the pretrained model and each task's adapter evaluated on every task (%)."""
    from .evaluate import evaluate

    def compute() -> dict[str, dict[str, float]]:
        rows = {"pre-trained": evaluate(suite, suite.pretrained)}
        rows.update({t: evaluate(suite, suite.finetuned[t]) for t in suite.tasks})
        return rows

    rows = cached_result(suite, "lora_individual_matrix", {}, compute)
    return pd.DataFrame(rows).T[list(suite.tasks)]


def coefficient_sweeps(suite: Any, grid: Sequence[float], ties_k: float = 0.2) -> dict[str, dict]:
    """Fig. 5c-d: Task Arithmetic and Ties-Merging (sum, top-k) at every λ of ``grid`` (val and test)."""
    return {"Task Arithmetic": X.sweep(suite, "task_arithmetic", grid),
            "Ties-Merging": X.sweep(suite, "ties", grid, k=ties_k, disjoint="sum")}


def adaptive_runs(suite: Any, *, adamerging_steps: int, concrete_ta_steps: int, meta_steps: int, tta_steps: int,
                  batch_size: int = 16, seed: int = 0, device: str = "auto", eval_every: int = 50,
                  eval_mask: str = "soft", progress: bool = True) -> dict[str, dict[str, Any]]:
    """Concrete TA, layer-wise AdaMerging and layer-wise Concrete AdaMerging: accuracy, correctness, history."""
    from .methods.adamerging import adamerging
    from .methods.concrete import concrete_adamerging, concrete_task_arithmetic

    common = dict(batch_size=batch_size, seed=seed, device=device, eval_every=eval_every, progress=progress)
    params = dict(ada=adamerging_steps, ta=concrete_ta_steps, meta=meta_steps, tta=tta_steps, mask=eval_mask,
                  **{k: v for k, v in common.items() if k != "progress"})

    def record(result) -> dict[str, Any]:
        s = X.scored(suite, result.state_dict())
        return {"accuracy": s["accuracy"], "correct": s["correct"], "history": result.history.to_dict(),
                "seconds": result.seconds}

    def compute() -> dict[str, dict[str, Any]]:
        return {
            "Concrete TA": record(concrete_task_arithmetic(suite, steps=concrete_ta_steps, eval_mask=eval_mask,
                                                           **common)),
            "LW AdaMerging": record(adamerging(suite, "layer", steps=adamerging_steps, batches_per_step=1,
                                               **common)),
            "LW Concrete AM": record(concrete_adamerging(suite, "layer", meta_steps=meta_steps, tta_steps=tta_steps,
                                                         eval_mask=eval_mask, **common)),
        }

    return cached_result(suite, "lora_adaptive", params, compute)


def static_rows(suite: Any, sweeps: Mapping[str, dict]) -> dict[str, dict[str, Any]]:
    """Individual, Weight Averaging, and TA / Ties at their λ chosen on val: accuracy and correctness."""
    from .methods import merge

    ref = X.reference_rows(suite)
    rows = {"Individual": {"accuracy": ref["accuracy"]["Individual"], "correct": ref["correct"]["Individual"]}}
    wa = cached_result(suite, "lora_weight_averaging", {}, lambda: X.scored(
        suite, merge("weight_averaging", suite.pretrained, suite.finetuned_list())))
    rows["Weight Averaging"] = wa
    for name, res in sweeps.items():
        sel = X.select_on_val(res)
        rows[name] = {"accuracy": sel.test, "correct": X.pack_by_task(sel.correct), "lambda": sel.value}
    rows["Pretrained"] = {"accuracy": ref["accuracy"]["Pretrained"], "correct": ref["correct"]["Pretrained"]}
    return rows


def reported(table: str) -> dict[str, dict[str, float]]:
    """The paper's rows of Table ``table`` (4 or 5) under our row names: {row: {task..., "avg"}}."""
    from .reference import paper_table_wide

    wide = paper_table_wide("concrete_subspace", table)
    avg = [c for c in wide.columns if c.lower().startswith("avg")][0]
    out = {}
    for ours, theirs in PAPER_ROWS[table].items():
        r = wide.loc[theirs]
        out[ours] = {**{c: float(r[c]) for c in wide.columns if c != avg}, "avg": float(r[avg])}
    return out


def reported_sweep_peak(table: str) -> float:
    """The reported Task Arithmetic average of Table ``table`` (the paper's λ = 0.3 point of Fig. 5)."""
    return reported(table)["Task Arithmetic"]["avg"]


def mean_offdiagonal(matrix: pd.DataFrame, tasks: Sequence[str]) -> float:
    """Mean accuracy of adapters on the *other* tasks minus the pretrained model's there (points)."""
    pre = matrix.loc["pre-trained"]
    return float(np.mean([matrix.loc[a, t] - pre[t] for a in tasks for t in tasks if a != t]))
