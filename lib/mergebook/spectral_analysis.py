"""What the spectral-family chapter measures: selection on val, merged-update spectra, interference, timings.

Every function works on state dicts (or the per-matrix updates taken from them), so any merge
method's output can be analysed the same way:

* :func:`select_and_score`: pick a method's coefficient on the validation split (cheap), then score
  only the chosen point on test with per-sample correctness (for bootstrap intervals); cached.
* :func:`matrix_updates`: ΔW = θ_merged − θ_pre for the matrices of a rule, in forward order.
* :func:`effective_rank`: the entropy effective rank exp(H(σ/Σσ)) (Roy & Vetterli 2007).
* :func:`energy_rank`: the Iso code's rank at which sqrt(cumulative σ² share) first exceeds a
  threshold (``fig_3a.py::calc_rank``, used by the subspace alignment ratio).
* :func:`subspace_alignment_ratio`: Iso's SAR of a task matrix onto the top-k left singular
  subspace of a merged update, ‖Π_k Δ_t‖_F / ‖Δ_t‖_F (``fig_3a.py::alignment_ratio``).
* :func:`singular_task_interference`: TSV's STI = ‖(UᵀU − I) Σ (VᵀV − I)‖₁ over the tasks' stacked
  top-k singular vectors (entrywise L1 norm), here divided by Σσ so that layers compare.
* :func:`spectral_report`: all of the above for several methods' merged models, as tidy frames.
* :func:`time_merges` and :func:`recorded_benchmark`: live wall times of the merges on the active
  suite, and the ViT-B/32 figures (time and peak memory) recorded by ``benchmarks/spectral.py``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .methods import merge
from .methods.cart import MatrixRule, _as_rule, cumulative_energy
from .methods.spectral import all_2d_rule, tsv_rank

__all__ = [
    "select_and_score",
    "matrix_updates",
    "effective_rank",
    "energy_rank",
    "subspace_alignment_ratio",
    "singular_task_interference",
    "spectral_report",
    "time_merges",
    "recorded_benchmark",
    "recorded_benchmark_frame",
    "RECORDED_BENCHMARK",
]

RECORDED_BENCHMARK = Path(__file__).resolve().parent / "assets" / "benchmarks" / "spectral_cpu.json"


# ----------------------------------------------------------------------------------------------
# Selection on val, scoring on test


def select_and_score(suite: Any, method: str, grid: Sequence[float], *, param: str = "scaling_coef",
                     name: str | None = None, **params: Any) -> dict[str, Any]:
    """Val average at each grid value of ``param``; the best one scored on test with packed correctness (cached).

    Returns ``{"val": {value: avg}, "chosen": value, "test": accuracies, "correct": packed}``; only
    the chosen point touches test labels, and only to be scored.
    """
    from .evaluate import correctness, evaluate
    from .experiment import pack_by_task
    from .results import cached_result

    grid = [float(g) for g in grid]
    if not grid:
        raise ValueError(f"select_and_score({method!r}): empty grid; pass the values of {param!r} to try")
    pre, fts, tasks = suite.pretrained, suite.finetuned_list(), list(suite.tasks)

    def compute() -> dict[str, Any]:
        val = {f"{g:g}": evaluate(suite, merge(method, pre, fts, **params, **{param: g}), tasks, split="val")["avg"]
               for g in grid}
        best = max(val, key=val.get)  # first on ties, in grid order
        c = correctness(suite, merge(method, pre, fts, **params, **{param: float(best)}), tasks)
        test = {t: 100.0 * float(c[t].mean()) for t in tasks}
        test["avg"] = float(np.mean([test[t] for t in tasks]))
        return {"val": val, "chosen": float(best), "test": test, "correct": pack_by_task(c)}

    return cached_result(suite, name or f"select-{method}", {"grid": grid, "param": param, **params}, compute)


# ----------------------------------------------------------------------------------------------
# Per-matrix measures


def matrix_updates(pretrained: Mapping[str, torch.Tensor], merged: Mapping[str, torch.Tensor],
                   rule: MatrixRule | Sequence[str] | None = all_2d_rule) -> dict[str, torch.Tensor]:
    """ΔW = merged − pretrained (float64) for every key the rule selects, in state-dict order."""
    r = _as_rule(rule)
    return {k: (merged[k].double() - pretrained[k].double()) for k, v in pretrained.items()
            if v.is_floating_point() and r(k, v)}


def effective_rank(s: torch.Tensor) -> float:
    """Entropy effective rank exp(−Σ p log p), p = σ/Σσ (Roy & Vetterli 2007); r for a flat spectrum."""
    s = s.double().clamp_min(0)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def energy_rank(s: torch.Tensor, threshold: float = 0.95) -> int:
    """Iso's ``calc_rank``: the first index where sqrt(cumsum(σ²)/Σσ²) > threshold (0-based, as the code)."""
    e = torch.sqrt(torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp_min(1e-300))
    above = (e > threshold).nonzero()
    return int(above[0]) if len(above) else len(s)


def subspace_alignment_ratio(task: torch.Tensor, merged_update: torch.Tensor, threshold: float = 0.95) -> float:
    """Iso's SAR: ‖U_k U_kᵀ Δ_t‖_F / ‖Δ_t‖_F, U_k the merged update's top left singular vectors at ``energy_rank``."""
    u, s, _ = torch.linalg.svd(merged_update.double(), full_matrices=False)
    k = energy_rank(s, threshold)
    uk = u[:, :k]
    t = task.double()
    denom = torch.linalg.norm(t)
    return float(torch.linalg.norm(uk @ (uk.T @ t)) / denom) if denom > 0 else float("nan")


def singular_task_interference(tasks: torch.Tensor, k: int | None = None, normalise: bool = True) -> float:
    """TSV's STI of task matrices [T, m, n]: ‖(UᵀU − I) Σ (VᵀV − I)‖₁ (entrywise), top-k per task (default r/T).

    U = [U_1,k … U_T,k] and V = [V_1,k … V_T,k] are the column-stacked singular vectors and Σ the
    block diagonal of singular values; zero when the tasks' singular vectors are mutually orthogonal.
    ``normalise`` divides by Σσ (the ‖Σ‖₁ of the kept values) so that matrices of different scale compare.
    """
    x = tasks.double()
    t, m, n = x.shape
    k = tsv_rank((m, n), t) if k is None else int(k)
    if k <= 0:
        return 0.0
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    uu = u[..., :k].movedim(0, 1).reshape(m, t * k)
    vv = vh[:, :k, :].reshape(t * k, n).T
    ss = s[:, :k].reshape(t * k)
    eye = torch.eye(t * k, dtype=x.dtype)
    sti = ((uu.T @ uu - eye) * ss) @ (vv.T @ vv - eye)
    val = sti.abs().sum()
    return float(val / ss.sum()) if normalise else float(val)


# ----------------------------------------------------------------------------------------------
# The chapter's report


def _layer_of(key: str) -> int:
    """Forward position of a key: -1 before the blocks, the block index inside, a large number after."""
    parts = key.split(".")
    if "resblocks" in parts:
        return int(parts[parts.index("resblocks") + 1])
    return 10_000 if key in ("proj",) or key.startswith("ln_post") else -1


def _kind(key: str) -> str:
    for suffix, name in (("in_proj_weight", "attn in_proj (QKV)"), ("out_proj.weight", "attn out_proj"),
                         ("c_fc.weight", "mlp c_fc"), ("c_proj.weight", "mlp c_proj")):
        if key.endswith(suffix):
            return name
    return key


def spectral_report(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                    merged: Mapping[str, Mapping[str, torch.Tensor]], *,
                    rule: MatrixRule | Sequence[str] | None = all_2d_rule, energy_at: float = 0.12,
                    threshold: float = 0.95) -> dict[str, Any]:
    """Per method and matrix: spectrum, effective rank, energy in the top ``energy_at`` share, SAR per task; STI per matrix.

    ``merged`` maps a method name to its merged state dict. Returns a dict of frames:
    ``matrices`` (method, key, layer, kind, rank, effective_rank, eff_rank_share, energy_top,
    sar_mean), ``sar`` (method, key, task index, sar), ``sti`` (key, layer, kind, sti_topk,
    sti_full) and ``spectra`` (method → key → normalised singular values σ/σ_max, as lists).
    """
    keys = list(matrix_updates(pretrained, pretrained, rule))
    deltas = {k: torch.stack([ft[k].double() - pretrained[k].double() for ft in finetuned]) for k in keys}
    rows, sar_rows, spectra = [], [], {}
    for method, sd in merged.items():
        upd = matrix_updates(pretrained, sd, keys)
        spectra[method] = {}
        for k in keys:
            u, s, _ = torch.linalg.svd(upd[k], full_matrices=False)
            r = len(s)
            top = max(1, int(energy_at * r))
            uk = u[:, :energy_rank(s, threshold)]
            # SAR of every task at once against this update's top subspace (one SVD per update)
            sars = (torch.linalg.norm(uk @ (uk.T @ deltas[k]), dim=(-2, -1))
                    / torch.linalg.norm(deltas[k], dim=(-2, -1))).tolist()
            sar_rows += [{"method": method, "key": k, "task": t, "sar": v} for t, v in enumerate(sars)]
            er = effective_rank(s)
            rows.append({"method": method, "key": k, "layer": _layer_of(k), "kind": _kind(k), "rank": r,
                         "effective_rank": er, "eff_rank_share": er / r,
                         "energy_top": float(cumulative_energy(s)[top - 1]), "sar_mean": float(np.mean(sars))})
            spectra[method][k] = (s / s.max().clamp_min(1e-300)).tolist()
    sti_rows = [{"key": k, "layer": _layer_of(k), "kind": _kind(k),
                 "sti_topk": singular_task_interference(deltas[k]),
                 "sti_full": singular_task_interference(deltas[k], k=min(deltas[k].shape[1:]))} for k in keys]
    return {"matrices": pd.DataFrame(rows), "sar": pd.DataFrame(sar_rows), "sti": pd.DataFrame(sti_rows),
            "spectra": spectra}


# ----------------------------------------------------------------------------------------------
# Timings


def time_merges(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                methods: Mapping[str, tuple[str, Mapping[str, Any]]], repeats: int = 1) -> pd.DataFrame:
    """Wall seconds (best of ``repeats``) of each ``merge(name, **kw)``; ``methods`` maps a label to (name, params).

    Memory is not measured here (torch's CPU allocator is invisible to ``tracemalloc``, and RSS
    needs a fresh process): ``benchmarks/spectral.py`` measures peak RSS and GPU memory.
    """
    rows = []
    for label, (name, kw) in methods.items():
        best = float("inf")
        for _ in range(max(1, int(repeats))):
            t = time.perf_counter()
            out = merge(name, pretrained, finetuned, **dict(kw))
            best = min(best, time.perf_counter() - t)
            del out
        rows.append({"method": label, "wall_s": best})
    return pd.DataFrame(rows).set_index("method")


def recorded_benchmark(path: str | Path | None = None) -> dict[str, Any] | None:
    """The figures ``benchmarks/spectral.py --json`` recorded at ViT-B/32 shapes (None if the file is absent)."""
    p = Path(path) if path is not None else RECORDED_BENCHMARK
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def recorded_benchmark_frame(path: str | Path | None = None,
                             labels: Mapping[str, str] | None = None) -> pd.DataFrame:
    """The recorded figures as method × (wall s as run, wall s for 12 blocks, peak MiB above inputs)."""
    r = recorded_benchmark(path)
    cols = ["wall_s", "wall_s_12_blocks", "peak_above_inputs_mib"]
    if r is None:
        return pd.DataFrame(columns=cols)
    df = pd.DataFrame(r["methods"]).T[cols]
    if labels:
        df.index = [labels.get(i, i) for i in df.index]
    df.index.name = "method"
    df.attrs.update({k: r[k] for k in ("blocks", "tasks", "threads", "device", "torch", "where", "params") if k in r})
    return df




# ----------------------------------------------------------------------------------------------
# The chapter's method table: selection, merged models, reported rows, figures

#: label -> (paper, table, row, column) of the reported CLIP ViT-B/32 average shown beside our rows.
REPORTED_B32 = {
    "Task Arithmetic": ("adamerging", "1", "Task Arithmetic", "Avg Acc"),
    "Ties-Merging (sum)": ("adamerging", "1", "Ties-Merging", "Avg Acc"),
    "CART": ("cart", "1", "CART (Ours)", "Average"),
    "TSV-M": ("spectral", "tsv-results:ViT-B-32", "TSV-M", "Average"),
    "Iso-C": ("spectral", "fusionbench-docs:clip-vit-base-patch32", "ISO-C (scaling factor=1.5)", "Average"),
    "Iso-CTS": ("spectral", "fusionbench-docs:clip-vit-base-patch32", "ISO-CTS (scaling factor=1.5)", "Average"),
}


def reported_averages(labels: Sequence[str], rows: Mapping[str, tuple[str, str, str, str]] = REPORTED_B32
                      ) -> dict[str, float]:
    """The reported ViT-B/32 average of each label that has one (see :data:`REPORTED_B32`)."""
    from .reference import reported

    return {lab: reported(*rows[lab]) for lab in labels if lab in rows}


def select_methods(suite: Any, specs: Mapping[str, tuple[str, Sequence[float], Mapping[str, Any]]],
                   cache_prefix: str = "ch06") -> dict[str, dict[str, Any]]:
    """:func:`select_and_score` for every label → (method, grid of scaling_coef, fixed params)."""
    return {lab: select_and_score(suite, m, grid, name=f"{cache_prefix}-{m}-{lab}", **dict(kw))
            for lab, (m, grid, kw) in specs.items()}


def chosen_frame(selections: Mapping[str, Mapping[str, Any]]) -> pd.DataFrame:
    """Label × (grid searched, chosen coefficient, its val average, its test average)."""
    return pd.DataFrame({lab: {"grid (val)": ", ".join(s["val"]), "chosen": f"{s['chosen']:g}",
                               "val avg": round(s["val"][f"{s['chosen']:g}"], 1), "test avg": round(s["test"]["avg"], 1)}
                         for lab, s in selections.items()}).T


def merged_models(suite: Any, specs: Mapping[str, tuple[str, Sequence[float], Mapping[str, Any]]],
                  selections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, torch.Tensor]]:
    """Each label's merged state dict at its chosen coefficient."""
    pre, fts = suite.pretrained, suite.finetuned_list()
    return {lab: merge(m, pre, fts, scaling_coef=selections[lab]["chosen"], **dict(kw))
            for lab, (m, _, kw) in specs.items()}


def method_summary(report: Mapping[str, Any]) -> pd.DataFrame:
    """Per method, means over matrices: effective-rank share, energy in the top share, SAR (and its min over tasks)."""
    mats = report["matrices"]
    out = mats.groupby("method", sort=False)[["eff_rank_share", "energy_top", "sar_mean"]].mean()
    sar_task = report["sar"].groupby(["method", "task"], sort=False)["sar"].mean().groupby("method", sort=False).min()
    out["sar_worst_task"] = sar_task
    return out


def plot_example_spectra(ax: Any, report: Mapping[str, Any], key: str, color: Any) -> None:
    """σ/σ_max of one matrix's merged update for every method, against the direction's share of the rank."""
    for method, spec in report["spectra"].items():
        s = np.asarray(spec[key])
        ax.plot(100 * np.arange(1, len(s) + 1) / len(s), s, color=color(method), label=method, lw=1.4)
    ax.set_yscale("log")
    ax.set_xlabel("singular direction, % of rank")
    ax.set_ylabel("σ / σ_max of the merged update")


def plot_layer_metric(ax: Any, report: Mapping[str, Any], metric: str, color: Any, kind: str | None = None) -> None:
    """A per-matrix metric against the block index (forward order) for every method; mean over kinds unless ``kind``."""
    mats = report["matrices"]
    mats = mats[(mats["layer"] >= 0) & (mats["layer"] < 10_000)]
    if kind is not None:
        mats = mats[mats["kind"] == kind]
    per = mats.groupby(["method", "layer"], sort=False)[metric].mean()
    for method in dict.fromkeys(mats["method"]):
        s = per.loc[method].sort_index()
        ax.plot(s.index, s.values, "o-", ms=3, color=color(method), label=method)
    ax.set_xlabel("residual block (input → output)")


def plot_recorded_times(ax: Any, frame: pd.DataFrame, color: Any) -> None:
    """Horizontal bars of the recorded ViT-B/32 merge times (12-block extrapolation), one colour per method."""
    if frame.empty:
        ax.text(0.5, 0.5, "no recorded benchmark", ha="center", va="center", transform=ax.transAxes)
        return
    y = np.arange(len(frame))
    ax.barh(y, frame["wall_s_12_blocks"].to_numpy(float), color=[color(m) for m in frame.index])
    ax.set_yticks(y, list(frame.index))
    ax.invert_yaxis()
    ax.set_xlabel("merge wall time at ViT-B/32 shapes, 8 tasks (s, CPU)")


__all__ += ["REPORTED_B32", "reported_averages", "select_methods", "chosen_frame", "merged_models", "method_summary",
            "plot_example_spectra", "plot_layer_metric", "plot_recorded_times"]


def correct_by_method(selections: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """Label → packed per-sample test correctness of its chosen point (for ``experiment.results_frame``)."""
    return {lab: s["correct"] for lab, s in selections.items()}


def chosen_specs(specs: Mapping[str, tuple[str, Sequence[float], Mapping[str, Any]]],
                 selections: Mapping[str, Mapping[str, Any]]) -> dict[str, tuple[str, dict[str, Any]]]:
    """Label → (method, parameters with the chosen scaling_coef), as :func:`time_merges` takes them."""
    return {lab: (m, {**dict(kw), "scaling_coef": selections[lab]["chosen"]}) for lab, (m, _, kw) in specs.items()}


def sti_by_block(report: Mapping[str, Any]) -> pd.DataFrame:
    """Mean normalised STI (top-r/T and full rank) of the matrices of each residual block."""
    sti = report["sti"]
    return sti[(sti["layer"] >= 0) & (sti["layer"] < 10_000)].groupby("layer")[["sti_topk", "sti_full"]].mean()


def sar_by_task(report: Mapping[str, Any], tasks: Sequence[str]) -> pd.DataFrame:
    """Method × task mean subspace alignment ratio over matrices (task indices named by ``tasks``)."""
    sar = report["sar"].copy()
    sar["task"] = [tasks[i] for i in sar["task"]]
    return sar.pivot_table(index="method", columns="task", values="sar", aggfunc="mean", sort=False)[list(tasks)]


def plot_results(ax: Any, frame: pd.DataFrame, color: Any) -> None:
    """Each method's average as a dot in its colour with its interval, and the reported average as a diamond."""
    y = np.arange(len(frame))
    # dots, not bars: the axis does not start at 0, and a truncated bar would exaggerate differences
    ax.errorbar(frame["avg"], y, xerr=[frame["avg"] - frame["lo"], frame["hi"] - frame["avg"]], fmt="none",
                ecolor="black", capsize=3, lw=1)
    ax.scatter(frame["avg"], y, s=60, color=[color(m) for m in frame.index], zorder=3, label="this run")
    if "reported" in frame.columns:
        ax.scatter(frame["reported"], y, marker="D", color="white", edgecolor="black", zorder=3,
                   label="reported (ViT-B/32)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(y, list(frame.index))
    ax.invert_yaxis()
    lo = np.nanmin(np.r_[frame["lo"].to_numpy(float), frame.get("reported", frame["lo"]).to_numpy(float)])
    ax.set_xlim(max(0.0, lo - 5), 100)
    ax.set_xlabel("average test accuracy over the tasks (%)")


__all__ += ["correct_by_method", "chosen_specs", "sti_by_block", "sar_by_task", "plot_results"]
