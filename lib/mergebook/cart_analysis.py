"""The experiments of the CART chapter (04): rank sweeps, routing, loss landscape, task count, spectra.

Every function here is one figure or table of Choi et al. (2024), cached with
:func:`mergebook.results.cached_result`, and returns JSON-able numbers with per-sample test
correctness where an interval is drawn from it:

* :func:`rank_sweep` merges at every rank ratio with centered or original vectors, keeping the top
  or the lowest singular directions (Figs. 1-2 and the per-task curves of Fig. 5);
* :func:`routing` evaluates each task with only its own low-rank vector (Eq. 5, Figs. 3a-3b);
* :func:`landscape` evaluates the loss on a grid of the plane through θ_avg (Fig. 4, Figs. 7-8) and
  projects CART's path (rank grows) and Task Arithmetic's (λ grows) onto it;
* :func:`task_count` merges sampled task subsets of each size (Fig. 6);
* :func:`spectra` gives singular values of centered and original task vectors per matrix, and the
  rank that holds 90% of their energy.

Endpoints that are the same model are evaluated once: at ratio 0 every centered merge is θ_avg and
every original one θ_pre, and at full rank top and reverse order keep the same directions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .analysis import energy_rank, landscape_plane, subsets_by_size
from .evaluate import evaluate, predict
from .experiment import Interval, average_interval, pack_by_task, scored, unpack_by_task
from .methods import merge
from .methods.cart import cart_route, cumulative_energy, singular_values
from .results import cached_result

VECTORS = ("centered", "original")
ORDERS = ("top", "reverse")
CURVE_LABELS = {
    ("centered", "top"): "centered θ_t − θ_avg, top directions (CART)",
    ("centered", "reverse"): "centered θ_t − θ_avg, lowest directions",
    ("original", "top"): "original τ_t, top directions",
    ("original", "reverse"): "original τ_t, lowest directions",
}
# The rank of a square attention/MLP side at the papers' scales (the width of the residual stream)
REFERENCE_WIDTH = {"ViT-B/32": 768, "ViT-B/16": 768, "ViT-L/14": 1024}
MATRIX_KINDS = {"attn.in_proj_weight": "attention in-proj (Q, K, V)", "attn.out_proj.weight": "attention out-proj",
                "mlp.c_fc.weight": "MLP c_fc", "mlp.c_proj.weight": "MLP c_proj"}


def _r(ratio: float) -> str:
    return f"{float(ratio):g}"


def _effective_order(ratio: float, order: str) -> str:
    """Top and reverse order are the same merge at ratio 0 (nothing kept) and at full rank."""
    return "top" if float(ratio) in (0.0, 1.0) else order


def _accuracy(correct: Mapping[str, np.ndarray], tasks: Sequence[str]) -> dict[str, float]:
    acc = {t: 100.0 * float(np.asarray(correct[t]).mean()) for t in tasks}
    acc["avg"] = float(np.mean([acc[t] for t in tasks]))
    return acc


# ----------------------------------------------------------------------------------- rank sweep
def rank_sweep(suite: Any, ratios: Sequence[float], cart_lambda: float, ta_lambda: float, *,
               matrix_rule: Any = None) -> dict[str, dict[str, dict[str, Any]]]:
    """``{vectors: {order: {ratio: {"accuracy", "correct"}}}}``: CART Figs. 1-2 (and Fig. 5's per-task curves).

    Centered vectors are merged as CART with ``cart_lambda`` around θ_avg, original ones around θ_pre
    with Task Arithmetic's ``ta_lambda``; ``order`` keeps the top or the lowest singular directions.
    """
    pre, fts = suite.pretrained, suite.finetuned_list()
    ratios = [float(r) for r in ratios]

    def compute() -> dict[str, Any]:
        memo: dict[tuple, dict[str, Any]] = {}
        out: dict[str, Any] = {}
        for vectors, lam in (("centered", cart_lambda), ("original", ta_lambda)):
            out[vectors] = {}
            for order in ORDERS:
                curve = {}
                for r in ratios:
                    key = (vectors, _effective_order(r, order), r)
                    if key not in memo:
                        sd = merge("cart", pre, fts, scaling_coef=lam, ratio=r, centered=vectors == "centered",
                                   reverse=key[1] == "reverse", matrix_rule=matrix_rule)
                        memo[key] = scored(suite, sd)
                    curve[_r(r)] = memo[key]
                out[vectors][order] = curve
        return out

    return cached_result(suite, "cart_rank_sweep", {"ratios": ratios, "lam": float(cart_lambda),
                                                    "ta": float(ta_lambda), "rule": str(matrix_rule),
                                                    "format": 2}, compute)


def curve_frame(result: Mapping[str, Any], vectors: str, order: str, tasks: Sequence[str]) -> pd.DataFrame:
    """One curve of :func:`rank_sweep` or :func:`routing` as rank kept (%) × (tasks..., avg)."""
    curve = result[vectors][order]
    df = pd.DataFrame({100 * float(r): v["accuracy"] for r, v in curve.items()}).T.sort_index()
    df.index.name = "rank kept (% of full rank)"
    return df[list(tasks) + ["avg"]]


def curve_interval(result: Mapping[str, Any], vectors: str, order: str, ratio: float, label: str = "") -> Interval:
    """The average accuracy at one point of a curve, with its 95% bootstrap interval."""
    return average_interval(unpack_by_task(result[vectors][order][_r(ratio)]["correct"]), label=label)


def curve_intervals(result: Mapping[str, Any], vectors: str, order: str) -> pd.DataFrame:
    """Rank ratio × (avg, lo, hi): every point of a curve with its 95% bootstrap interval."""
    rows = {float(r): curve_interval(result, vectors, order, float(r)) for r in result[vectors][order]}
    df = pd.DataFrame({r: {"avg": iv.mean, "lo": iv.lo, "hi": iv.hi} for r, iv in rows.items()}).T.sort_index()
    df.index.name = "ratio"
    return df


def rank_axis(ax: Any, ratios: Sequence[float], label: str = "rank kept, % of full rank") -> None:
    """An x axis with one evenly spaced tick per rank ratio, labelled in % (no negative range, no symlog ticks)."""
    ratios = sorted(float(r) for r in ratios)
    ax.set_xticks(range(len(ratios)), [f"{100 * r:g}" for r in ratios])
    ax.set_xlim(-0.3, len(ratios) - 0.7)
    ax.set_xlabel(label)


def plot_curve(ax: Any, intervals: pd.DataFrame, color: str, label: str, *, marker: str = "o",
               linestyle: str = "-") -> None:
    """One curve of :func:`curve_intervals` on a :func:`rank_axis`, its 95% interval shaded."""
    x = np.arange(len(intervals))
    ax.plot(x, intervals["avg"], marker=marker, ls=linestyle, color=color, label=label, ms=4)
    ax.fill_between(x, intervals["lo"], intervals["hi"], color=color, alpha=0.2, lw=0)


def plot_task_curves(ax: Any, frame: pd.DataFrame, tasks: Sequence[str], avg_color: str) -> None:
    """Per-task accuracy against rank (thin lines, one colour per task) and the average (thick)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    x = np.arange(len(frame))
    for i, t in enumerate(tasks):
        ax.plot(x, frame[t], color=cmap(i % 10), lw=1.1, alpha=0.85, label=t)
    ax.plot(x, frame["avg"], color=avg_color, lw=3, label="average")


def plot_task_count(ax: Any, frame: pd.DataFrame, colors: Mapping[str, str]) -> None:
    """Mean subset accuracy against the number of merged tasks, min-max over subsets shaded (CART Fig. 6)."""
    for lab in dict.fromkeys(frame.index.get_level_values(0)):
        f = frame.loc[lab]
        ax.plot(f.index, f["mean"], "o-", color=colors[lab], label=lab, ms=4)
        ax.fill_between(f.index, f["min"], f["max"], color=colors[lab], alpha=0.15, lw=0)
    ax.set_xlabel("number of merged tasks")
    ax.set_ylabel("average accuracy on the merged tasks (%)")


def plot_spectrum(ax: Any, spec: Mapping[str, Any], key: str, colors: Mapping[str, str]) -> None:
    """Singular values of one matrix's centered and original task vectors, one line per task (log scale)."""
    for v in VECTORS:
        s = np.asarray(spec["examples"][key][v])
        x = np.arange(1, s.shape[1] + 1) / s.shape[1] * 100
        for i, row in enumerate(s):
            ax.semilogy(x, np.maximum(row, 1e-12), color=colors[v], alpha=0.5, lw=1,
                        label=(("θ_t − θ_avg (centered)" if v == "centered" else "τ_t (original)") if i == 0 else None))
    ax.set_title(layer_label(key), fontsize=9)


def curves_table(result: Mapping[str, Any], tasks: Sequence[str]) -> pd.DataFrame:
    """Average accuracy of every curve, one readable column per curve (rank kept in % as the index)."""
    cols = {CURVE_LABELS[(v, o)]: curve_frame(result, v, o, tasks)["avg"] for v in VECTORS for o in ORDERS
            if v in result and o in result[v]}
    return pd.DataFrame(cols)


def peak(result: Mapping[str, Any], vectors: str = "centered", order: str = "top") -> tuple[float, float]:
    """(ratio, average accuracy) of the highest point of a curve."""
    curve = {float(r): v["accuracy"]["avg"] for r, v in result[vectors][order].items()}
    r = max(curve, key=curve.get)
    return r, curve[r]


# --------------------------------------------------------------------------------------- routing
def routing(suite: Any, ratios: Sequence[float], *, matrix_rule: Any = None) -> dict[str, dict[str, dict[str, Any]]]:
    """CART Eq. 5 (Figs. 3a-3b): each task scored with only its own rank-r vector; same shape as :func:`rank_sweep`.

    Centered: θ_avg + SVD_r(θ_t − θ_avg); original: θ_pre + SVD_r(τ_t); ``order`` keeps the top
    (Fig. 3a) or the lowest (Fig. 3b) singular directions.
    """
    pre, fts, tasks = suite.pretrained, suite.finetuned_list(), list(suite.tasks)
    ratios = [float(r) for r in ratios]

    def compute() -> dict[str, Any]:
        memo: dict[tuple, dict[str, Any]] = {}
        out: dict[str, Any] = {}
        for vectors in VECTORS:
            out[vectors] = {}
            for order in ORDERS:
                curve = {}
                for r in ratios:
                    key = (vectors, _effective_order(r, order), r)
                    if key not in memo:
                        correct = {}
                        for i, t in enumerate(tasks):
                            sd = cart_route(pre, fts, i, ratio=r, centered=vectors == "centered",
                                            reverse=key[1] == "reverse", matrix_rule=matrix_rule)
                            correct[t] = _correct(suite, sd, t, suite.test[t])
                        memo[key] = {"accuracy": _accuracy(correct, tasks), "correct": pack_by_task(correct)}
                    curve[_r(r)] = memo[key]
                out[vectors][order] = curve
        return out

    return cached_result(suite, "cart_routing", {"ratios": ratios, "rule": str(matrix_rule), "format": 2}, compute)


def _correct(suite: Any, sd: Mapping[str, torch.Tensor], task: str, data: Any) -> np.ndarray:
    logits = predict(suite.model, sd, suite.heads[task], data.images)
    return (logits.argmax(-1).cpu() == data.labels.cpu()).numpy().astype(bool)


def rank_to_reach(result: Mapping[str, Any], target: float, vectors: str, order: str = "top") -> float:
    """The smallest ratio whose average reaches ``target`` (NaN if none does)."""
    for r, v in sorted(result[vectors][order].items(), key=lambda kv: float(kv[0])):
        if v["accuracy"]["avg"] >= target:
            return float(r)
    return float("nan")


# ------------------------------------------------------------------------------------ landscape
def _loss(suite: Any, sd: Mapping[str, torch.Tensor], data: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for t, d in data.items():
        logits = predict(suite.model, sd, suite.heads[t], d.images)
        out[t] = float(F.cross_entropy(logits, d.labels.to(logits.device)))
    out["mean"] = float(np.mean([out[t] for t in data]))
    return out


def landscape(suite: Any, *, ratios: Sequence[float], cart_lambda: float, ta_lambdas: Sequence[float],
              grid_size: int = 7, n_images: int = 32, margin: float = 0.15, seed: int = 0,
              matrix_rule: Any = None) -> dict[str, Any]:
    """CART Fig. 4 / Figs. 7-8: loss on a ``grid_size``² grid of the plane through θ_avg, and the merge paths.

    The plane is :func:`mergebook.analysis.landscape_plane` through θ_avg, spanned by the first two
    principal directions of the fine-tuned weights around θ_avg (the centered task vectors). Losses
    are mean cross-entropy on a fixed seeded sample of ``n_images`` validation images per task.
    The paths are CART at each rank ratio (with ``cart_lambda``) and Task Arithmetic at each λ of
    ``ta_lambdas``, projected; ``off_plane`` is each path point's distance from the plane relative
    to its distance from θ_avg (0: on the plane).
    """
    pre, fts, tasks = suite.pretrained, suite.finetuned_list(), list(suite.tasks)

    def compute() -> dict[str, Any]:
        avg = merge("weight_averaging", pre, fts)
        plane = landscape_plane(avg, fts)
        points = {"fine-tuned": plane.project(fts), "θ_pre": plane.project([pre])}
        paths = {"CART": [merge("cart", pre, fts, scaling_coef=cart_lambda, ratio=float(r), matrix_rule=matrix_rule)
                          for r in ratios],
                 "Task Arithmetic": [merge("task_arithmetic", pre, fts, scaling_coef=float(lam)) for lam in ta_lambdas]}
        coords = {k: plane.project(v) for k, v in paths.items()}
        off = {k: [plane.residual(p) / max(float(np.linalg.norm(plane.coordinates(p))) + plane.residual(p), 1e-12)
                   for p in v] for k, v in paths.items()}
        allpts = np.concatenate([points["fine-tuned"], points["θ_pre"], *coords.values(), np.zeros((1, 2))])
        lo, hi = allpts.min(0), allpts.max(0)
        pad = margin * (hi - lo)
        xs = np.linspace(lo[0] - pad[0], hi[0] + pad[0], grid_size)
        ys = np.linspace(lo[1] - pad[1], hi[1] + pad[1], grid_size)
        data = {t: suite.val[t].sample(n_images, seed) for t in tasks}
        grid = plane.grid(xs, ys, lambda sd: _loss(suite, sd, data))
        return {"xs": xs.tolist(), "ys": ys.tolist(), "loss": {k: v.tolist() for k, v in grid.items()},
                "fine_tuned": dict(zip(tasks, points["fine-tuned"].tolist())), "pre": points["θ_pre"][0].tolist(),
                "paths": {k: v.tolist() for k, v in coords.items()}, "off_plane": off,
                "path_values": {"CART": [float(r) for r in ratios], "Task Arithmetic": [float(x) for x in ta_lambdas]},
                "explained": list(plane.explained)}

    return cached_result(suite, "cart_landscape", {"ratios": [float(r) for r in ratios], "lam": float(cart_lambda),
                                                   "ta": [float(x) for x in ta_lambdas], "grid": int(grid_size),
                                                   "n": int(n_images), "margin": float(margin), "seed": int(seed),
                                                   "rule": str(matrix_rule)}, compute)


def plot_landscape(ax: Any, result: Mapping[str, Any], surface: str, colors: Mapping[str, str], *,
                   paths: bool = True, levels: int = 12) -> Any:
    """Contours of one task's loss (or ``"mean"``) with θ_avg, the fine-tuned models and the two paths."""
    xs, ys = np.asarray(result["xs"]), np.asarray(result["ys"])
    z = np.asarray(result["loss"][surface])
    cs = ax.contourf(xs, ys, np.log10(z), levels=levels, cmap="viridis_r")
    ax.contour(xs, ys, np.log10(z), levels=levels, colors="white", linewidths=0.3, alpha=0.6)
    ax.plot(0, 0, marker="*", color="white", mec="black", ms=11, ls="none", label="θ_avg")
    ft = result["fine_tuned"]
    if surface in ft:
        ax.plot(*ft[surface], marker="o", color="black", mfc="white", ms=6, ls="none", label="θ_t (this task)")
    others = np.array([v for t, v in ft.items() if t != surface])
    ax.plot(others[:, 0], others[:, 1], marker="o", color="black", ms=3, ls="none", label="other θ_t")
    if paths:
        for name, pts in result["paths"].items():
            p = np.asarray(pts)
            ax.plot(p[:, 0], p[:, 1], "-o", color=colors[name], ms=3, lw=1.5, label=f"{name} path")
            ax.plot(*p[-1], marker=">", color=colors[name], ms=6, ls="none")
    ax.set_xlim(xs[0], xs[-1])
    ax.set_ylim(ys[0], ys[-1])
    ax.grid(False)
    return cs


# ----------------------------------------------------------------------------------- task count
def task_count(suite: Any, methods: Mapping[str, tuple[str, Mapping[str, Any]]], sizes: Sequence[int],
               per_size: int, *, n_images: int = 200, seed: int = 0) -> dict[str, Any]:
    """CART Fig. 6: average accuracy of merges of task subsets, ``per_size`` seeded subsets per size.

    ``methods`` maps a label to ``(merge name, fixed params)``; each subset's fine-tuned models are
    merged and scored on the subset's own tasks, on a fixed seeded sample of ``n_images`` test
    images per task (the same images for every method and subset). Returns ``{"subsets": {size:
    [tasks...]}, "accuracy": {label: {size: [subset average, ...]}}}``.
    """
    pre, tasks = suite.pretrained, list(suite.tasks)
    by_size = subsets_by_size(tasks, sizes, per_size, seed)

    def compute() -> dict[str, Any]:
        data = {t: suite.test[t].sample(n_images, seed) for t in tasks}
        acc: dict[str, dict[str, list[float]]] = {lab: {} for lab in methods}
        for size, subs in by_size.items():
            for sub in subs:
                fts = [suite.finetuned[t] for t in sub]
                for lab, (method, kw) in methods.items():
                    sd = merge(method, pre, fts, **dict(kw))
                    acc[lab].setdefault(str(size), []).append(
                        float(np.mean([100.0 * _correct(suite, sd, t, data[t]).mean() for t in sub])))
        return {"subsets": {str(k): [list(s) for s in v] for k, v in by_size.items()}, "accuracy": acc}

    return cached_result(suite, "cart_task_count", {"methods": {k: [m, dict(kw)] for k, (m, kw) in methods.items()},
                                                    "sizes": [int(s) for s in sizes], "per": int(per_size),
                                                    "n": int(n_images), "seed": int(seed)}, compute)


def task_count_frame(result: Mapping[str, Any]) -> pd.DataFrame:
    """(method, number of tasks) × (mean, min, max, subsets) of :func:`task_count`'s subset averages."""
    rows = []
    for lab, by_size in result["accuracy"].items():
        for size, vals in by_size.items():
            v = np.asarray(vals, dtype=float)
            rows.append({"method": lab, "tasks merged": int(size), "mean": v.mean(), "min": v.min(), "max": v.max(),
                         "subsets": v.size})
    return pd.DataFrame(rows).set_index(["method", "tasks merged"])


# -------------------------------------------------------------------------------------- spectra
def _block(key: str) -> int:
    m = re.search(r"resblocks\.(\d+)\.", key)
    return int(m.group(1)) if m else -1


def _kind(key: str) -> str:
    for suffix, label in MATRIX_KINDS.items():
        if key.endswith(suffix):
            return label
    return key.rsplit(".", 1)[0]


def layer_label(key: str) -> str:
    """``"block 3 · MLP c_fc"`` for ``transformer.resblocks.3.mlp.c_fc.weight``."""
    b = _block(key)
    return f"block {b} · {_kind(key)}" if b >= 0 else key


def spectra(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
            fraction: float = 0.9, examples: Sequence[str] = ("attn.in_proj_weight", "mlp.c_fc.weight"),
            matrix_rule: Any = None) -> dict[str, Any]:
    """Singular values of centered and original task vectors, energy curves and the rank for ``fraction`` of energy.

    Returns ``{"energy": {vectors: mean share of ‖·‖² in the top r, r = 1..n}, "examples": {key:
    {vectors: [T, n] singular values}}, "rank": {key: {vectors: mean over tasks of the rank holding
    fraction of the energy}}, "full": {key: full rank}}``; the examples are the first, middle and
    last block's matrices named in ``examples``.
    """
    out: dict[str, Any] = {"energy": {}, "examples": {}, "rank": {}, "full": {}, "fraction": float(fraction)}
    sv = {v: singular_values(pretrained, finetuned, centered=v == "centered", matrix_rule=matrix_rule)
          for v in VECTORS}
    keys = list(sv["centered"])
    blocks = sorted({_block(k) for k in keys if _block(k) >= 0})
    chosen = {blocks[0], blocks[len(blocks) // 2], blocks[-1]} if blocks else set()
    for v in VECTORS:
        out["energy"][v] = torch.stack([cumulative_energy(s).double().mean(0) for s in sv[v].values()]
                                       ).mean(0).tolist()
    for k in keys:
        out["rank"][k] = {v: float(np.mean(energy_rank(sv[v][k], fraction))) for v in VECTORS}
        out["full"][k] = int(sv["centered"][k].shape[-1])
        if _block(k) in chosen and any(k.endswith(e) for e in examples):
            out["examples"][k] = {v: sv[v][k].double().tolist() for v in VECTORS}
    return out


def energy_rank_frame(spec: Mapping[str, Any]) -> pd.DataFrame:
    """Per matrix: block, kind, the rank holding the energy share for centered and original vectors, full rank."""
    pct = f"{100 * spec['fraction']:g}%"
    rows = [{"block": _block(k), "matrix": _kind(k), f"rank for {pct}, centered": r["centered"],
             f"rank for {pct}, original": r["original"], "full rank": spec["full"][k]}
            for k, r in spec["rank"].items()]
    return pd.DataFrame(rows).set_index(["block", "matrix"])


def reported_table(paper: str, profile: Any, methods: Sequence[str]) -> pd.DataFrame:
    """The printed rows of ``paper``'s main table at the profile's scale for ``methods``, per task as printed."""
    from .reference import paper_row, paper_table, paper_table_wide

    table = paper_table(paper, profile)
    wide = paper_table_wide(paper, table)
    canon = {"Ties-Merging (sum)": "Ties-Merging"}
    rows = {m: paper_row(paper, table, canon.get(m, m)) for m in methods}
    out = wide.loc[[r for r in rows.values() if r is not None]]
    out.index = [m for m, r in rows.items() if r is not None]
    out.index.name = f"{paper} Table {table}"
    return out


# ------------------------------------------------------------------------------ adaptation rows
def correct_from_accuracy(accuracy: Mapping[str, float], sizes: Mapping[str, int]) -> dict[str, np.ndarray]:
    """Per-task correctness arrays with the same counts as ``accuracy`` (% per task) on ``sizes`` images.

    The task-stratified bootstrap of :mod:`mergebook.experiment` depends on each task's count of
    correct images and its size only, so a run that recorded accuracies (an adaptation history)
    gets exactly the interval its per-sample correctness would give.
    """
    out = {}
    for t, n in sizes.items():
        k = int(round(float(accuracy[t]) * int(n) / 100.0))
        if not 0 <= k <= n:
            raise ValueError(f"task {t!r}: accuracy {accuracy[t]} is not a share of {n} images")
        out[t] = np.arange(int(n)) < k
    return out


def cartpp_row(suite: Any, *, ratio: float, init: float, steps: int, batch_size: int, seed: int, device: Any,
               matrix_rule: Any = None) -> dict[str, Any]:
    """CART++ (Eq. 6) adapted for ``steps`` steps from CART's λ: ``{"accuracy", "correct", "history"}`` (cached)."""
    from .methods.adamerging import cart_plus_plus

    tasks = list(suite.tasks)

    def compute() -> dict[str, Any]:
        res = cart_plus_plus(suite, "layer", ratio=ratio, init=init, steps=steps, batch_size=batch_size,
                             batches_per_step=1, seed=seed, device=device, matrix_rule=matrix_rule,
                             eval_every=max(1, steps // 4), progress=False).to_dict()
        acc = {t: float(res["accuracy"][t]) for t in tasks}
        acc["avg"] = float(np.mean([acc[t] for t in tasks]))
        sizes = {t: len(suite.test[t]) for t in tasks}
        return {"accuracy": acc, "correct": pack_by_task(correct_from_accuracy(acc, sizes)),
                "history": {"steps": res["history"]["eval_steps"],
                            "avg": [a["avg"] for a in res["history"]["accuracy"]]}}

    return cached_result(suite, "cart_pp_row", {"ratio": float(ratio), "init": float(init), "steps": int(steps),
                                                "bs": int(batch_size), "seed": int(seed), "rule": str(matrix_rule)},
                         compute)


def suite_spectra(suite: Any, *, fraction: float, matrix_rule: Any = None) -> dict[str, Any]:
    """:func:`spectra` of the suite's task vectors (cached; CART Figs. 3-4 and the energy-rank table)."""
    return cached_result(suite, "cart_spectra", {"fraction": float(fraction), "rule": str(matrix_rule), "format": 2},
                         lambda: spectra(suite.pretrained, suite.finetuned_list(), fraction=fraction,
                                         matrix_rule=matrix_rule))


def cart_lambda_on_val(suite: Any, lambdas: Sequence[float], *, ratio: float, matrix_rule: Any = None) -> dict[str, float]:
    """CART's validation average (%) at rank ``ratio`` for each λ in ``lambdas`` (cached), keyed by
    ``f"{λ:g}"``; the chapter takes the best as CART's λ, as the paper selects it on validation data."""
    lambdas = [float(x) for x in lambdas]
    if not lambdas:
        raise ValueError("cart_lambda_on_val: no λ given; pass the grid to choose CART's λ from")

    def compute() -> dict[str, float]:
        return {f"{lam:g}": evaluate(suite, merge("cart", suite.pretrained, suite.finetuned_list(), scaling_coef=lam,
                                                  ratio=ratio, matrix_rule=matrix_rule), split="val")["avg"]
                for lam in lambdas}

    return cached_result(suite, "cart_lambda_val", {"grid": lambdas, "ratio": float(ratio), "rule": str(matrix_rule)},
                         compute)


def cart_table_rows(suite: Any, sweep: Mapping[str, Any], *, ratio: float, lambdas: Sequence[float],
                    cart_lambda: float, steps: int, batch_size: int, seed: int, device: Any,
                    matrix_rule: Any = None) -> dict[str, dict[str, Any]]:
    """Chapter 04's Table 1 rows (cached under the key the summary chapter reads): ``"CART"``, the
    rank sweep's centered top-``ratio`` point at the val-chosen ``cart_lambda``, and ``"CART++"``,
    :func:`cartpp_row` adapted from it; each with ``accuracy``, ``correct`` and a ``setting`` label."""
    from .summary import cart_table_params

    point = sweep["centered"]["top"].get(_r(ratio))
    if point is None:
        raise KeyError(f"cart_table_rows: the rank sweep has no centered point at ratio {ratio:g} "
                       f"(has {sorted(sweep['centered']['top'])}); add it to the chapter's ratios")
    params = cart_table_params({"cart_ratio": ratio, "cart_lambdas": lambdas, "cartpp_steps": steps,
                                "cartpp_batch_size": batch_size, "seed": seed})
    return cached_result(suite, "cart_table1", params, lambda: {
        "CART": {**point, "setting": f"λ={cart_lambda:g}, rank {100 * ratio:g}%"},
        "CART++": {**cartpp_row(suite, ratio=ratio, init=cart_lambda, steps=steps, batch_size=batch_size, seed=seed,
                                device=device, matrix_rule=matrix_rule), "setting": f"{steps} steps"}})


__all__ = ["CURVE_LABELS", "REFERENCE_WIDTH", "cart_lambda_on_val", "cart_table_rows", "correct_from_accuracy", "cartpp_row", "curve_frame", "curve_interval",
           "curve_intervals", "curves_table", "plot_curve", "plot_spectrum", "plot_task_count", "plot_task_curves",
           "rank_axis", "reported_table",
           "energy_rank_frame", "landscape", "layer_label", "peak", "plot_landscape", "rank_sweep", "rank_to_reach",
           "routing", "spectra", "suite_spectra", "task_count", "task_count_frame"]
