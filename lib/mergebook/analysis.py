"""Analyses behind the CART chapter: the loss-landscape plane, task-subset sampling, spectra and energy rank.

* :func:`landscape_plane` is the plane of CART's Fig. 4 (and Figs. 7-8): through the weight average
  θ_avg, spanned by the first two principal directions of the fine-tuned weights around it. Those
  are the principal directions of the *centered* task vectors τ_k − mean(τ) = θ_k − θ_avg, which
  is Li et al. (2018)'s PCA construction applied to the models being merged; it keeps the
  fine-tuned models, θ_avg and (nearly) the merge paths in view, where random directions would not.
* :func:`subsets` draws the task subsets of CART's Fig. 6 (accuracy against the number of merged
  tasks): all of them when there are few, else a fixed, seeded sample per size.
* :func:`energy_rank` is the rank that keeps a fraction of a matrix's spectral energy;
  :func:`task_vector_spectra` gives the singular values of centered or original task vectors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .statedict import flatten, float_keys, unflatten

StateDict = dict[str, torch.Tensor]
Point = Mapping[str, torch.Tensor] | torch.Tensor


# ------------------------------------------------------------------------------------ landscape plane
@dataclass(frozen=True)
class Plane:
    """A 2-D affine plane in weight space: ``origin + a·basis[0] + b·basis[1]`` (orthonormal rows)."""

    origin: torch.Tensor  # [P] flat weights at (0, 0)
    basis: torch.Tensor  # [2, P], orthonormal rows
    like: Mapping[str, torch.Tensor]  # template for shapes, dtypes and the non-float tensors
    keys: tuple[str, ...]
    explained: tuple[float, float]  # share of the points' variance along each direction

    def _flat(self, point: Point) -> torch.Tensor:
        if isinstance(point, torch.Tensor):
            v = point.reshape(-1)
        else:
            missing = [k for k in self.keys if k not in point]
            if missing:
                raise KeyError(f"point lacks {len(missing)} tensors of the plane, e.g. {missing[:3]}; "
                               "pass a state dict with the same keys as the plane's center")
            v = flatten(point, list(self.keys))
        if v.numel() != self.origin.numel():
            raise ValueError(f"point has {v.numel()} entries but the plane lives in {self.origin.numel()} dimensions")
        return v.to(self.origin.dtype)

    def coordinates(self, point: Point) -> np.ndarray:
        """(a, b) of the orthogonal projection of ``point`` (state dict or flat vector) onto the plane."""
        return (self.basis @ (self._flat(point) - self.origin)).double().cpu().numpy()

    def residual(self, point: Point) -> float:
        """Distance from ``point`` to the plane (0 for points on it)."""
        d = self._flat(point) - self.origin
        return float((d - self.basis.T @ (self.basis @ d)).norm())

    def flat(self, a: float, b: float) -> torch.Tensor:
        """The flat weight vector at plane coordinates (a, b)."""
        return self.origin + float(a) * self.basis[0] + float(b) * self.basis[1]

    def state_dict(self, a: float, b: float) -> StateDict:
        """The state dict at plane coordinates (a, b) (non-float tensors copied from the center)."""
        out = {k: v for k, v in self.like.items()}
        out.update(unflatten(self.flat(a, b), self.like, list(self.keys)))
        return out

    def project(self, points: Iterable[Point]) -> np.ndarray:
        """Coordinates [N, 2] of a path of points (CART as its rank grows, TA as λ grows)."""
        rows = [self.coordinates(p) for p in points]
        return np.stack(rows) if rows else np.zeros((0, 2))

    def grid(self, xs: Sequence[float], ys: Sequence[float],
             fn: Callable[[StateDict], float | Mapping[str, float]]) -> dict[str, np.ndarray] | np.ndarray:
        """``fn`` at every grid point: [len(ys), len(xs)] (a dict of those if ``fn`` returns a dict)."""
        values = [[fn(self.state_dict(a, b)) for a in xs] for b in ys]
        first = values[0][0] if values and values[0] else None
        if isinstance(first, Mapping):
            return {k: np.array([[v[k] for v in row] for row in values], dtype=float) for k in first}
        return np.array(values, dtype=float)


def landscape_plane(center: Point, vectors: Sequence[Point], like: Mapping[str, torch.Tensor] | None = None,
                    centered: bool = True) -> Plane:
    """The plane through ``center`` spanned by the first two principal directions of ``vectors``.

    ``center`` is θ_avg (a state dict, or a flat vector with ``like`` for shapes). ``vectors`` are
    task vectors or fine-tuned weights (a shift of all of them does not change the directions):
    their mean is removed before the SVD (``centered=False`` keeps it, giving the top singular
    directions of the raw vectors instead). The rows of ``basis`` are orthonormal; signs are fixed
    so the first vector has non-negative coordinates, making plots deterministic.
    """
    if isinstance(center, torch.Tensor):
        if like is None:
            raise ValueError("a flat center needs like= (a state dict giving the shapes); or pass a state dict")
        keys = float_keys(like)
        origin = center.reshape(-1)
        template = like
    else:
        keys = float_keys(center)
        origin = flatten(center, keys)
        template = center
    if len(vectors) < 2:
        raise ValueError(f"landscape_plane needs at least 2 vectors to find 2 directions, got {len(vectors)}")
    # float64 for the Gram matrix: K is small, P large, so X Xᵀ (K x K) is the cheap, exact route
    x = torch.stack([(v.reshape(-1) if isinstance(v, torch.Tensor) else flatten(v, keys)).double()
                     for v in vectors])
    if x.shape[1] != origin.numel():
        raise ValueError(f"vectors have {x.shape[1]} entries but the center has {origin.numel()}")
    if centered:
        x = x - x.mean(0, keepdim=True)
    evals, evecs = torch.linalg.eigh(x @ x.T)
    order = torch.argsort(evals, descending=True)
    evals, evecs = evals[order].clamp_min(0), evecs[:, order]
    if evals[1] <= 1e-12 * max(float(evals[0]), 1e-300):
        raise ValueError("the vectors span fewer than 2 directions (after centering); a plane needs two "
                         "independent task vectors, or pass centered=False for two tasks")
    basis = (evecs[:, :2].T @ x) / evals[:2].sqrt()[:, None]  # right singular vectors
    # Gram–Schmidt once more: exact orthonormality in float64 after the eigen route
    basis[0] /= basis[0].norm()
    basis[1] -= (basis[1] @ basis[0]) * basis[0]
    basis[1] /= basis[1].norm()
    signs = torch.sign(basis @ x[0])
    basis = basis * torch.where(signs == 0, torch.ones_like(signs), signs)[:, None]
    total = float(evals.sum())
    explained = (float(evals[0]) / total, float(evals[1]) / total)
    return Plane(origin.double(), basis, template, tuple(keys), explained)


# --------------------------------------------------------------------------------------- task subsets
def _unrank(rank: int, n: int, k: int) -> tuple[int, ...]:
    """The ``rank``-th k-subset of range(n) in lexicographic order (combinatorial number system)."""
    out, x = [], 0
    for i in range(k, 0, -1):
        while True:
            c = math.comb(n - x - 1, i - 1)
            if rank < c:
                break
            rank -= c
            x += 1
        out.append(x)
        x += 1
    return tuple(out)


def subsets(n_tasks: int | Sequence[str], size: int, max_per_size: int | None = None,
            seed: int = 0) -> list[tuple]:
    """Subsets of ``size`` tasks: all of them (lexicographic) if at most ``max_per_size``, else a seeded sample.

    ``n_tasks`` is a count (subsets of indices) or a list of task names (subsets of names). The
    sample is uniform without replacement, drawn from ``seed`` and ``size`` only, so asking for
    other sizes never changes it; it is returned in lexicographic order.
    """
    names = None if isinstance(n_tasks, int) else list(n_tasks)
    n = n_tasks if names is None else len(names)
    if not 1 <= size <= n:
        raise ValueError(f"subset size must be between 1 and the number of tasks ({n}), got {size}")
    if max_per_size is not None and max_per_size < 1:
        raise ValueError(f"max_per_size must be ≥ 1 (or None for all subsets), got {max_per_size}")
    total = math.comb(n, size)
    if max_per_size is None or total <= max_per_size:
        ranks = range(total)
    else:
        rng = np.random.default_rng([int(seed), int(size), int(n)])
        ranks = sorted(int(r) for r in rng.choice(total, size=max_per_size, replace=False))
    out = [_unrank(r, n, size) for r in ranks]
    return out if names is None else [tuple(names[i] for i in s) for s in out]


def subsets_by_size(n_tasks: int | Sequence[str], sizes: Iterable[int], max_per_size: int | None = None,
                    seed: int = 0) -> dict[int, list[tuple]]:
    """:func:`subsets` for each size (CART Fig. 6 uses sizes 2 to 8)."""
    return {int(s): subsets(n_tasks, int(s), max_per_size, seed) for s in sizes}


# ------------------------------------------------------------------------------- spectra, energy rank
def energy_rank(s: Any, fraction: float = 0.9) -> int | np.ndarray:
    """Smallest k with Σ_{i<k} s_i² ≥ fraction · Σ s_i² (per row for a 2-D array; 0 for all-zero)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], e.g. 0.9 for 90% of the energy; got {fraction}")
    a = s.detach().cpu().double().numpy() if isinstance(s, torch.Tensor) else np.asarray(s, dtype=float)
    if a.ndim == 0 or a.ndim > 2:
        raise ValueError(f"energy_rank takes singular values [r] or a batch [n, r], got shape {a.shape}")
    if (a < 0).any():
        raise ValueError("singular values are non-negative; pass torch.linalg.svdvals(m), not eigenvalues")
    e = np.sort(a ** 2, axis=-1)[..., ::-1]  # largest first, whatever order they came in
    cum = np.cumsum(e, axis=-1)
    tot = cum[..., -1:]
    # a relative tolerance keeps fraction=1.0 from failing on rounding in the cumulative sum
    k = np.sum(cum < fraction * tot * (1 - 1e-12), axis=-1) + 1
    k = np.where(tot[..., 0] > 0, k, 0)
    return int(k) if a.ndim == 1 else k.astype(int)


def task_vector_spectra(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                        keys: Sequence[str], centered: bool) -> dict[str, np.ndarray]:
    """Singular values [K, r] of each task's vector for each 2-D ``key``: τ_k, or τ_k − mean τ if ``centered``."""
    out = {}
    for key in keys:
        base = pretrained[key]
        if base.dim() != 2:
            raise ValueError(f"{key!r} has shape {tuple(base.shape)}; spectra need 2-D weight matrices")
        tv = torch.stack([ft[key].double() - base.double() for ft in finetuned])
        if centered:
            tv = tv - tv.mean(0, keepdim=True)
        out[key] = torch.linalg.svdvals(tv).numpy()
    return out


__all__ = ["Plane", "energy_rank", "landscape_plane", "subsets", "subsets_by_size", "task_vector_spectra"]


# --------------------------------------------------------------------------------------------------
# Entropy coupling: which task vector lowers or raises which task's entropy (AdaMerging's objective)
# --------------------------------------------------------------------------------------------------
def entropy_coupling(suite: Any, coefficient: float = 0.3, n: int = 256, temperature: float = 1.0,
                     seed: int = 0) -> "pd.DataFrame":
    """∂H_i/∂λ_j at the task-arithmetic point λ = ``coefficient`` for every task (row i) and task
    vector (column j): the task-wise AdaMerging gradient, split by the task whose entropy it comes from.

    ``H_i`` is the mean prediction entropy of ``n`` seeded test images of task ``i`` (unlabelled,
    as AdaMerging sees them), with task ``i``'s head divided by ``temperature``. Task-wise
    AdaMerging's gradient on λ_j is the column sum: a positive sum means Adam shrinks λ_j. A large
    positive off-diagonal entry says that adding task j's vector makes task i's predictions less
    certain, so the summed objective trades task j's accuracy for task i's confidence.
    """
    import pandas as pd
    from torch.func import functional_call

    from .evaluate import entropy, head_logits

    if not math.isfinite(coefficient):
        raise ValueError(f"entropy_coupling: coefficient must be finite, got {coefficient!r}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"entropy_coupling: temperature must be a positive finite number, got {temperature!r}")
    if int(n) < 1:
        raise ValueError(f"entropy_coupling: n must be at least 1, got {n!r}")
    tasks = list(suite.tasks)
    pre = suite.pretrained
    keys = float_keys(pre)
    vectors = [{k: suite.finetuned[t][k].to(pre[k].dtype) - pre[k] for k in keys} for t in tasks]
    lam = torch.full((len(tasks),), float(coefficient), dtype=pre[keys[0]].dtype, requires_grad=True)
    rows = []
    for t in tasks:
        params = dict(pre)
        params.update({k: pre[k] + sum(lam[j] * vectors[j][k] for j in range(len(tasks))) for k in keys})
        x = suite.test[t].sample(int(n), seed).images
        logits = head_logits(functional_call(suite.model, params, (x,)), suite.heads[t].to(pre[keys[0]].dtype))
        h = entropy(logits / temperature).mean()
        (g,) = torch.autograd.grad(h, lam)
        rows.append(g.detach().double().cpu().numpy())
    frame = pd.DataFrame(np.stack(rows), index=pd.Index(tasks, name="entropy of"),
                         columns=pd.Index(tasks, name="task vector"))
    return frame


def recorded_study(name: str) -> tuple["pd.DataFrame", dict]:
    """A committed study (``assets/studies/<name>.csv`` and its record ``<name>.json``: command,
    seed, device, date), written by a script under ``benchmarks/``; chapters read it, never rerun it."""
    import json
    from pathlib import Path

    import pandas as pd

    base = Path(__file__).resolve().parent / "assets" / "studies"
    csv, rec = base / f"{name}.csv", base / f"{name}.json"
    if not csv.is_file() or not rec.is_file():
        known = sorted(p.stem for p in base.glob("*.csv")) if base.is_dir() else []
        raise FileNotFoundError(f"no recorded study {name!r} under {base} (known: {', '.join(known) or 'none'}); "
                                f"run the script named in benchmarks/README.md to write it")
    return pd.read_csv(csv), json.loads(rec.read_text())


def task_vector_cosines(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                        names: Sequence[str] | None = None) -> "pd.DataFrame":
    """Pairwise cosine similarity of the flattened task vectors τ_k = θ_k − θ_pre (float tensors)."""
    import pandas as pd

    keys = float_keys(pretrained)
    flat = torch.stack([torch.cat([(ft[k].double() - pretrained[k].double()).flatten() for k in keys])
                        for ft in finetuned])
    norms = flat.norm(dim=1, keepdim=True)
    if (norms == 0).any():
        raise ValueError("task_vector_cosines: a task vector is all zeros (fine-tuned equals pretrained); "
                         "its cosine is undefined")
    unit = flat / norms
    names = list(names) if names is not None else [f"task {i}" for i in range(len(finetuned))]
    return pd.DataFrame((unit @ unit.T).cpu().numpy(), index=names, columns=names)


def mean_off_diagonal(frame: "pd.DataFrame") -> float:
    """Mean of a square frame's off-diagonal entries."""
    v = np.asarray(frame, dtype=float)
    n = v.shape[0]
    return float((v.sum() - np.trace(v)) / (n * n - n))


_STUDY_TASKS = ("housenum", "signs")


def entropy_study_table(study: "pd.DataFrame", focus: Sequence[str] = _STUDY_TASKS) -> "pd.DataFrame":
    """The miniature entropy study (``benchmarks/miniature_entropy.py``) as a display table: one row
    per Task Arithmetic / layer-wise AdaMerging run, with Δ against that variant's Task Arithmetic."""
    import pandas as pd

    tasks = [c for c in study.columns if c not in ("variant", "head_scale", "method", "temperature", "steps",
                                                     "batches", "lr", "seconds", "avg")]
    rows = []
    for variant, part in study.groupby("variant", sort=False):
        ta = part[part["method"].str.startswith("Task Arithmetic")].iloc[0]
        for _, r in part.iterrows():
            if r["method"].startswith("dH/dλ") or r["method"] == "Individual":
                continue
            is_ta = r["method"].startswith("Task Arithmetic")
            rec = {"variant": variant, "run": r["method"],
                   "T": "" if is_ta else f"{r['temperature']:.3g}",
                   "schedule": "" if is_ta else f"{int(r['steps'])} × {int(r['batches'])}, lr {r['lr']:g}",
                   "avg": f"{r['avg']:.1f}", "Δ avg": "" if is_ta else f"{r['avg'] - ta['avg']:+.1f}"}
            for t in focus:
                rec[t] = f"{r[t]:.1f}" + ("" if is_ta else f" ({r[t] - ta[t]:+.1f})")
            rec["below TA"] = "" if is_ta else f"{int(sum(r[t] < ta[t] for t in tasks))} of {len(tasks)}"
            rows.append(rec)
    return pd.DataFrame(rows)


def entropy_study_numbers(study: "pd.DataFrame", record: Mapping[str, Any], focus: str = "housenum") -> dict[str, str]:
    """The values chapter 02 quotes from the miniature entropy study, formatted for ``glue``."""
    default, retrained = list(dict.fromkeys(study["variant"]))[:2]
    d, r = study[study["variant"] == default], study[study["variant"] == retrained]

    def one(frame, method_prefix, **match):
        sel = frame[frame["method"].str.startswith(method_prefix)]
        for k, v in match.items():
            sel = sel[np.isclose(sel[k].astype(float), v)]
        if len(sel) != 1:
            raise ValueError(f"entropy study: expected one {method_prefix!r} row with {match}, found {len(sel)}")
        return sel.iloc[0]

    import json

    from .models.tiny_train import ASSET_RECORD

    t_clip = float(record["clip_temperature"])
    long = dict(steps=int(d["steps"].max()), batches=int(d["batches"].max()), lr=1e-3)
    return {
        "st_date": str(record["date"]), "st_device": str(record["device"]),
        "st_scale": f"{float(d['head_scale'].iloc[0]):.1f}", "st_t": f"{t_clip:.3f}",
        "st_hn_sum_1": f"{one(d, 'dH/dλ', temperature=1.0)[focus]:+.2f}",
        "st_hn_sum_t": f"{one(d, 'dH/dλ', temperature=t_clip)[focus]:+.2f}",
        "st_hn_am_1": f"{one(d, 'Layer-wise', temperature=1.0, **long)[focus]:.1f}",
        "st_hn_am_t": f"{one(d, 'Layer-wise', temperature=t_clip, **long)[focus]:.1f}",
        "st_hn_ta": f"{one(d, 'Task Arithmetic')[focus]:.1f}",
        "st_ta_1": f"{one(d, 'Task Arithmetic')['avg']:.1f}",
        "st_ind_100": f"{one(r, 'Individual')['avg']:.1f}",
        "st_ta_100": f"{one(r, 'Task Arithmetic')['avg']:.1f}",
        "st_am_100": f"{one(r, 'Layer-wise')['avg']:.1f}",
        "st_am_100_gain": f"{one(r, 'Layer-wise')['avg'] - one(r, 'Task Arithmetic')['avg']:+.1f}",
        "st_pretrain_min": f"{float(json.loads(ASSET_RECORD.read_text())['wall_minutes']):.0f}",
    }


def pilot_table(pilot: "pd.DataFrame", focus: str = "housenum") -> "pd.DataFrame":
    """The backbone pilot (``benchmarks/miniature_pilot.py``) as one row per pretrained backbone."""
    import pandas as pd

    tasks = [c for c in pilot.columns if c not in ("label_smoothing", "pretrain_steps", "logit_scale", "method",
                                                     "steps", "batches", "lr", "avg")]
    rows = []
    for ls, part in pilot.groupby("label_smoothing", sort=False):
        get = {m: part[part["method"] == m] for m in part["method"].unique()}
        ta = get["Task Arithmetic (λ 0.3)"].iloc[0]
        rec = {"label smoothing": f"{ls:g}", "learned logit scale": f"{part['logit_scale'].iloc[0]:.1f}",
               "pretrained": f"{get['Pretrained'].iloc[0]['avg']:.1f}",
               "individual": f"{get['Individual'].iloc[0]['avg']:.1f}", "TA": f"{ta['avg']:.1f}",
               f"{focus} ∂H/∂λ sum": f"{get['dH/dλ column sum at TA'].iloc[0][focus]:+.2f}"}
        for _, r in get["Layer-wise AdaMerging"].iterrows():
            sched = f"{int(r['steps'])} × {int(r['batches'])}"
            rec[f"LW AM {sched}"] = f"{r['avg']:.1f} ({r['avg'] - ta['avg']:+.1f})"
            rec[f"below TA ({sched})"] = f"{int(sum(r[t] < ta[t] for t in tasks))} of {len(tasks)}"
        rows.append(rec)
    return pd.DataFrame(rows)


CAPACITY_COSINE = "task-vector cosine, mean with the other tasks (avg: mean off-diagonal)"


def capacity_table(capacity: "pd.DataFrame", focus: str = "housenum") -> "pd.DataFrame":
    """The width/depth study (``benchmarks/miniature_capacity.py``) as one row per backbone:
    parameters, learned logit scale, pretrained / individual / Task Arithmetic averages, the mean
    task-vector cosine, the ``focus`` column sum of the coupling matrix, and layer-wise AdaMerging
    with its gain over Task Arithmetic and the tasks it leaves below it."""
    import pandas as pd

    tasks = [c for c in capacity.columns if c not in ("backbone", "width", "layers", "heads", "params",
                                                        "label_smoothing", "pretrain_steps", "logit_scale",
                                                        "method", "steps", "batches", "lr", "avg")]
    rows = []
    for name, part in capacity.groupby("backbone", sort=False):
        get = {m: part[part["method"] == m] for m in part["method"].unique()}
        ta = get["Task Arithmetic (λ 0.3)"].iloc[0]
        cos = get.get(CAPACITY_COSINE)
        rec = {"backbone (width × blocks)": name, "parameters": f"{int(part['params'].iloc[0]) / 1e6:.2f}M",
               "learned logit scale": f"{part['logit_scale'].iloc[0]:.1f}",
               "pretrained": f"{get['Pretrained'].iloc[0]['avg']:.1f}",
               "individual": f"{get['Individual'].iloc[0]['avg']:.1f}", "TA": f"{ta['avg']:.1f}",
               "mean cosine": "–" if cos is None or cos.empty else f"{cos.iloc[0]['avg']:.3f}",
               f"{focus} ∂H/∂λ sum": f"{get['dH/dλ column sum at TA'].iloc[0][focus]:+.2f}"}
        for _, r in get["Layer-wise AdaMerging"].iterrows():
            sched = f"{int(r['steps'])} × {int(r['batches'])}"
            rec[f"LW AM {sched}"] = f"{r['avg']:.1f} ({r['avg'] - ta['avg']:+.1f})"
            rec[f"below TA ({sched})"] = f"{int(sum(r[t] < ta[t] for t in tasks))} of {len(tasks)}"
        rows.append(rec)
    return pd.DataFrame(rows)


def capacity_numbers(capacity: "pd.DataFrame", record: Mapping[str, Any], margin: float = 1.0) -> dict[str, str]:
    """The values chapter 02 quotes from the width/depth study, for ``glue`` (``cap_*``): the
    backbones run (the first is the baseline), their gains over Task Arithmetic, the largest, and
    whether any larger backbone beats the baseline's gain by more than ``margin`` points."""
    gains, names = [], []
    for name, part in capacity.groupby("backbone", sort=False):
        ta = part[part["method"] == "Task Arithmetic (λ 0.3)"].iloc[0]["avg"]
        am = part[part["method"] == "Layer-wise AdaMerging"]["avg"].max()
        gains.append(am - ta)
        names.append(str(name))
    missing = sorted(set(record.get("backbones_requested", [])) - set(record.get("backbones_done", [])))
    wider = [f"{n} ({g - gains[0]:+.1f} points)" for n, g in zip(names[1:], gains[1:]) if g > gains[0] + margin]
    return {"cap_steps": f"{int(record['pretrain_steps'])}", "cap_backbones": ", ".join(names),
            "cap_gains": ", ".join(f"{g:+.1f}" for g in gains), "cap_best_gain": f"{max(gains):+.1f}",
            "cap_minutes": ", ".join(f"{k} {v / 60:.0f} min" for k, v in record.get("seconds_per_backbone", {}).items()),
            "cap_effect": (f"a larger backbone widens it by more than {margin:g} point over the {names[0]} one: "
                           + ", ".join(wider)) if wider else
                          f"no larger backbone widens it by more than {margin:g} point over the {names[0]} one",
            "cap_missing": (f"Not run, for want of CPU time: {', '.join(missing)}." if missing
                            else "Every backbone the script asks for ran.")}


HEADROOM_META = ("method", "objective", "granularity", "steps", "lr", "seconds", "avg")


def _headroom_rows(headroom: "pd.DataFrame") -> tuple[list[str], "pd.Series", "pd.Series"]:
    tasks = [c for c in headroom.columns if c not in HEADROOM_META]
    get = {m: headroom[headroom["method"] == m] for m in headroom["method"].unique()}
    return tasks, get["Individual"].iloc[0], get["Task Arithmetic (λ 0.3)"].iloc[0]


def headroom_table(headroom: "pd.DataFrame", focus: Sequence[str] = ("housenum", "signs")) -> "pd.DataFrame":
    """The headroom study (``benchmarks/miniature_headroom.py``) as one row per run: how λ was
    learned, the average with its gain over Task Arithmetic (λ = 0.3), the share of the TA →
    individual gap it closes, the ``focus`` tasks, and how many tasks it leaves below TA."""
    import pandas as pd

    tasks, ind, ta = _headroom_rows(headroom)
    gap = ind["avg"] - ta["avg"]
    rows = []
    for _, r in headroom.iterrows():
        learned = not pd.isna(r["lr"])
        rec = {"run": r["method"], "λ learned from": r["objective"] if learned else "–",
               "steps × lr": f"{int(r['steps'])} × {r['lr']:g}" if learned else "–",
               "avg (Δ TA)": f"{r['avg']:.1f} ({r['avg'] - ta['avg']:+.1f})",
               "TA → individual gap closed": f"{100 * (r['avg'] - ta['avg']) / gap:.0f}%"}
        rec.update({t: f"{r[t]:.1f}" for t in focus})
        rec["below TA"] = f"{int(sum(r[t] < ta[t] for t in tasks))} of {len(tasks)}" if learned else "–"
        rows.append(rec)
    return pd.DataFrame(rows)


def headroom_numbers(headroom: "pd.DataFrame", record: Mapping[str, Any], reported_gain: float,
                     reported_gap: float) -> dict[str, str]:
    """The values chapter 02 quotes from the headroom study, for ``glue`` (``hr_*``).

    ``reported_gain`` is the paper's layer-wise AdaMerging gain over Task Arithmetic (points) and
    ``reported_gap`` its individual − TA gap, so the shares compare like with like. For each
    granularity the best learning rate of each labelled objective counts (the ceiling). The
    conclusion ``hr_effect`` is computed: if even the oracle λ gains less than the reported
    entropy-learned gain, the coefficient space itself is what compresses the effect.
    """
    _, ind, ta = _headroom_rows(headroom)
    gap = ind["avg"] - ta["avg"]

    def best(granularity: str, prefix: str) -> float:
        part = headroom[(headroom["granularity"] == granularity) & headroom["method"].str.contains(prefix)]
        return float(part["avg"].max()) - ta["avg"]

    out = {"hr_steps": f"{int(record['steps'])}", "hr_date": str(record.get("date", "undated")),
           "hr_long_steps": f"{int(headroom['steps'].max())}", "hr_ta": f"{ta['avg']:.1f}", "hr_ind": f"{ind['avg']:.1f}"}
    gains = {}
    for g, short in (("task", "tw"), ("layer", "lw")):
        for prefix, name in (("AdaMerging", "am"), ("supervised", "sup"), ("oracle", "oracle")):
            gains[f"{short}_{name}"] = best(g, prefix)
            out[f"hr_{short}_{name}"] = f"{gains[f'{short}_{name}']:+.1f}"
    out["hr_gap_oracle"] = f"{100 * gains['lw_oracle'] / gap:.0f}%"
    out["hr_gap_am"] = f"{100 * gains['lw_am'] / gap:.0f}%"
    out["hr_gap_rep"] = f"{100 * reported_gain / reported_gap:.0f}%"
    out["hr_am_share"] = (f"{100 * gains['lw_am'] / gains['lw_oracle']:.0f}%" if gains["lw_oracle"] > 0 else "–")
    if gains["lw_oracle"] < reported_gain:
        out["hr_effect"] = (f"even the test labels find layer-wise coefficients only {gains['lw_oracle']:+.1f} points "
                            f"above Task Arithmetic, less than the {reported_gain:+.1f} that entropy alone finds on "
                            "CLIP: the miniature's coefficient space, not only its objective, compresses the effect")
    else:
        out["hr_effect"] = (f"the test labels find layer-wise coefficients {gains['lw_oracle']:+.1f} points above Task "
                            f"Arithmetic, as much as the {reported_gain:+.1f} reported on CLIP: the room is there, and "
                            "it is the entropy objective that does not find it")
    return out


def regime_table(regime: "pd.DataFrame") -> "pd.DataFrame":
    """The fine-tuning regime study (``benchmarks/miniature_regime.py``) as one row per fine-tuning
    learning rate: the relative task-vector norm, the mean cosine, the individual and Task
    Arithmetic averages, layer-wise AdaMerging and the oracle λ with their gains over TA, and the
    share of the TA → individual gap each closes."""
    import pandas as pd

    rows = []
    for lr, part in regime.groupby("ft_lr", sort=False):
        get = {m: part[part["method"] == m].iloc[0] for m in part["method"].unique()}
        ind, ta = get["Individual"]["avg"], get["Task Arithmetic (λ 0.3)"]["avg"]
        rec = {"fine-tune lr": f"{lr:g}" + (" (book)" if bool(part["book"].iloc[0]) else ""),
               "‖τ‖ / ‖θ_pre‖": f"{get['relative task-vector norm']['avg']:.3f}",
               "mean cosine": f"{get['task-vector cosine, mean off-diagonal']['avg']:.3f}",
               "individual": f"{ind:.1f}", "TA": f"{ta:.1f}"}
        for m, short in (("Layer-wise AdaMerging", "LW AM"), ("Layer-wise oracle λ", "LW oracle λ")):
            v = get[m]["avg"]
            rec[f"{short} (Δ TA)"] = f"{v:.1f} ({v - ta:+.1f})"
            rec[f"{short}: gap closed"] = f"{100 * (v - ta) / (ind - ta):.0f}%"
        rows.append(rec)
    return pd.DataFrame(rows)


def regime_numbers(regime: "pd.DataFrame", record: Mapping[str, Any], margin: float = 1.0) -> dict[str, str]:
    """The values chapter 02 quotes from the regime study, for ``glue`` (``rg_*``): the learning
    rates, their relative norms and gains, and whether any other regime's layer-wise AdaMerging
    gain beats the book's by more than ``margin`` points (``rg_effect``, computed)."""
    lrs, norms, am, orc, tas, ams, book = [], [], [], [], [], [], None
    for lr, part in regime.groupby("ft_lr", sort=False):
        get = {m: part[part["method"] == m].iloc[0]["avg"] for m in part["method"].unique()}
        ta = get["Task Arithmetic (λ 0.3)"]
        lrs.append(float(lr))
        norms.append(get["relative task-vector norm"])
        tas.append(ta)
        ams.append(get["Layer-wise AdaMerging"])
        am.append(get["Layer-wise AdaMerging"] - ta)
        orc.append(get["Layer-wise oracle λ"] - ta)
        if bool(part["book"].iloc[0]):
            book = len(lrs) - 1
    if book is None:
        raise ValueError("the regime study has no row of the book's fine-tuning learning rate (book=True)")
    # A wider gain can come from a weaker Task Arithmetic rather than a stronger merge: say which.
    better = [f"lr {lrs[i]:g} ({am[i] - am[book]:+.1f} points; its Task Arithmetic is "
              f"{tas[i] - tas[book]:+.1f} and its layer-wise AdaMerging {ams[i] - ams[book]:+.1f} points "
              f"against the book's, so the merge itself is {'better' if ams[i] > ams[book] else 'not better'})"
              for i in range(len(lrs)) if i != book and am[i] > am[book] + margin]
    return {"rg_lrs": ", ".join(f"{v:g}" for v in lrs), "rg_norms": ", ".join(f"{v:.3f}" for v in norms),
            "rg_am_gains": ", ".join(f"{v:+.1f}" for v in am), "rg_oracle_gains": ", ".join(f"{v:+.1f}" for v in orc),
            "rg_book_lr": f"{lrs[book]:g}", "rg_date": str(record.get("date", "undated")), "rg_ft_steps": f"{int(record['ft_steps'])}",
            "rg_minutes": ", ".join(f"lr {k} {v / 60:.0f} min" for k, v in record.get("seconds_per_regime", {}).items()),
            "rg_effect": ("another regime widens the gain by more than "
                          f"{margin:g} point: " + ", ".join(better)) if better else
                         f"no other regime widens the gain by more than {margin:g} point over the book's"}


DESIGN_METHODS = ("Pretrained", "Individual", "Task Arithmetic (λ 0.3)", "Layer-wise AdaMerging", "Layer-wise oracle λ")


def _design_rows(design: "pd.DataFrame", methods: Sequence[str] = DESIGN_METHODS, study: str = "miniature_design"):
    """(task columns, {variant: {method: row}}) of a per-variant study; a missing row names the rerun."""
    tasks = [c for c in design.columns if c not in ("variant", "changed", "method", "avg", "seconds", "logit_scale")]
    out = {}
    for variant, part in design.groupby("variant", sort=False):
        got = {m: part[part["method"] == m] for m in methods}
        missing = [m for m, rows in got.items() if rows.empty]
        if missing:
            raise ValueError(f"the {study.replace('miniature_', '')} study's variant {variant!r} has no row for "
                             f"{missing}; rerun benchmarks/{study}.py for it")
        out[variant] = {m: rows.iloc[0] for m, rows in got.items()}
    return tasks, out


def design_table(design: "pd.DataFrame", focus: Sequence[str] = ("housenum", "signs")) -> "pd.DataFrame":
    """The task-design study (``benchmarks/miniature_design.py``) as one row per variant: what it
    changed, the zero-shot, individual and Task Arithmetic (λ = 0.3) averages, the ``focus`` tasks
    under TA → layer-wise AdaMerging, AdaMerging's and the oracle λ's gain over TA with the share
    of the TA → individual gap each closes, and how many tasks AdaMerging leaves below TA."""
    import pandas as pd

    tasks, variants = _design_rows(design)
    rows = []
    for variant, get in variants.items():
        ind, ta = get["Individual"]["avg"], get["Task Arithmetic (λ 0.3)"]
        am, orc = get["Layer-wise AdaMerging"], get["Layer-wise oracle λ"]
        changed = str(get["Individual"]["changed"])
        rec = {"variant": variant, "re-fine-tuned": f"all {len(tasks)}" if len(changed.split()) == len(tasks) else changed,
               "zero-shot": f"{get['Pretrained']['avg']:.1f}", "individual": f"{ind:.1f}", "TA": f"{ta['avg']:.1f}"}
        rec.update({f"{t}: TA → LW AM": f"{ta[t]:.1f} → {am[t]:.1f}" for t in focus})
        for short, r in (("LW AM", am), ("LW oracle λ", orc)):
            rec[f"{short} (Δ TA)"] = f"{r['avg']:.1f} ({r['avg'] - ta['avg']:+.1f})"
            rec[f"{short}: gap closed"] = f"{100 * (r['avg'] - ta['avg']) / (ind - ta['avg']):.0f}%"
        rec["LW AM below TA"] = f"{int(sum(am[t] < ta[t] for t in tasks))} of {len(tasks)}"
        rows.append(rec)
    return pd.DataFrame(rows)


def design_numbers(design: "pd.DataFrame", record: Mapping[str, Any], margin: float = 1.0,
                   baseline: str | None = None) -> dict[str, str]:
    """The values chapter 02 quotes from the task-design study, for ``glue`` (``ds_*``): each
    variant's layer-wise AdaMerging gain and tasks below TA, and two computed conclusions:
    ``ds_collapse`` names the variants where no task ends below Task Arithmetic, ``ds_effect``
    those whose gain beats the ``baseline`` variant's (default: the first) by more than ``margin``
    points."""
    tasks, variants = _design_rows(design)
    baseline = baseline or next(iter(variants))
    if baseline not in variants:
        raise ValueError(f"the design study has no variant {baseline!r} to compare against; it has "
                         f"{list(variants)}")
    gains, below, orc = {}, {}, {}
    for variant, get in variants.items():
        ta, am = get["Task Arithmetic (λ 0.3)"], get["Layer-wise AdaMerging"]
        gains[variant] = am["avg"] - ta["avg"]
        orc[variant] = get["Layer-wise oracle λ"]["avg"] - ta["avg"]
        below[variant] = [t for t in tasks if am[t] < ta[t]]
    others = [v for v in variants if v != baseline]
    clean = [v for v in variants if not below[v]]
    wider = [v for v in others if gains[v] > gains[baseline] + margin]
    return {
        "ds_date": str(record.get("date", "undated")), "ds_steps": f"{int(record['steps'])}",
        "ds_variants": "; ".join(f"{v} {gains[v]:+.1f}" for v in variants),
        "ds_oracle": "; ".join(f"{v} {orc[v]:+.1f}" for v in variants),
        "ds_below": "; ".join(f"{v}: {', '.join(below[v]) or 'none'}" for v in variants),
        "ds_minutes": f"{sum(record.get('seconds_per_variant', {}).values()) / 60:.0f} min",
        "ds_collapse": ("no variant leaves every task at or above Task Arithmetic" if not clean else
                        "every task ends at or above Task Arithmetic only in: " + ", ".join(clean)),
        "ds_baseline": baseline, "ds_base_gain": f"{gains[baseline]:+.1f}",
        "ds_effect": (f"no variant widens the gain by more than {margin:g} point" if not wider else
                      f"the gain is wider by more than {margin:g} point in: "
                      + ", ".join(f"{v} ({gains[v]:+.1f})" for v in wider)),
    }


def pilot_numbers(pilot: "pd.DataFrame", record: Mapping[str, Any]) -> dict[str, str]:
    """The values chapter 02 quotes from the backbone pilot, formatted for ``glue`` (``pl_*``)."""
    out = {"pl_steps": f"{int(record['pretrain_steps'])}", "pl_images": f"{int(record['n_images']):,}"}
    gains = {}
    for i, (ls, part) in enumerate(pilot.groupby("label_smoothing", sort=False)):
        ta = part[part["method"] == "Task Arithmetic (λ 0.3)"].iloc[0]["avg"]
        am = part[part["method"] == "Layer-wise AdaMerging"]
        best = am.loc[am["avg"].idxmax()]
        gains[i] = best["avg"] - ta
        out.update({f"pl_ls_{i}": f"{ls:g}", f"pl_scale_{i}": f"{part['logit_scale'].iloc[0]:.1f}",
                    f"pl_pre_{i}": f"{part[part['method'] == 'Pretrained'].iloc[0]['avg']:.1f}",
                    f"pl_gain_{i}": f"{gains[i]:+.1f}"})
    out["pl_effect"] = "helps" if gains[1] > gains[0] else "does not help"
    return out



def _budget_row(budget: "pd.DataFrame", method: str, mask_steps: int, tta_steps: int, mask_lr: float) -> "pd.Series":
    hit = budget[(budget["method"] == method) & (budget["mask_steps"] == mask_steps)
                 & (budget["tta_steps"] == tta_steps) & np.isclose(budget["mask_lr"], mask_lr)]
    if hit.empty:
        raise ValueError(f"the Concrete budget study has no run of {method!r} with {mask_steps} mask steps, "
                         f"{tta_steps} adaptation steps and mask lr {mask_lr:g}; rerun benchmarks/concrete_budget.py")
    return hit.iloc[0]


def concrete_budget_table(budget: "pd.DataFrame") -> "pd.DataFrame":
    """The Concrete budget study (``benchmarks/concrete_budget.py``), one row per run: its mask and
    adaptation steps and mask lr, how far the logits moved (mean |logit|, their start is 0), the share
    kept (p > 0.5), the accuracy where the learned part starts (Concrete TA: step 0, plain TA;
    Concrete AdaMerging: the frozen mask at λ = 0.3 before adaptation) and at the end."""
    import pandas as pd

    rows = []
    for _, r in budget.iterrows():
        rows.append({"run": r["run"], "mask steps": int(r["mask_steps"]),
                     "adaptation steps": int(r["tta_steps"]) or "–", "mask lr": f"{r['mask_lr']:g}",
                     "mean |logit|": f"{r['mean_abs_logit']:.3f}", "kept (%)": f"{100 * r['kept']:.1f}",
                     "start": f"{r['start_avg']:.1f}", "final": f"{r['avg']:.1f}",
                     "Δ": f"{r['avg'] - r['start_avg']:+.1f}"})
    return pd.DataFrame(rows)


def concrete_budget_numbers(budget: "pd.DataFrame", record: Mapping[str, Any], paper_lr: float = 1e-3,
                            margin: float = 0.0) -> dict[str, str]:
    """The values chapter 03 quotes from the Concrete budget study (``cb_*``): the mask's travel and
    the final accuracy at the paper's mask lr and at the largest one in the study, for Concrete TA
    (its 200-step run) and layer-wise Concrete AdaMerging (100 mask + 200 adaptation steps); the
    former chapter setting (100 + 100 at the paper's lr); and ``cb_effect``, a computed conclusion:
    whether the larger mask lr is ahead by more than ``margin`` points on both methods (one seed:
    a point estimate). ``cb_minutes`` is the CPU time, summed over the runs."""
    ta, am = "Concrete TA", "Layer-wise Concrete AdaMerging"
    hi = float(budget["mask_lr"].max())
    if np.isclose(hi, paper_lr):
        raise ValueError("the Concrete budget study has no mask lr above the paper's; rerun benchmarks/concrete_budget.py")
    rows = {"ta_lo": _budget_row(budget, ta, 200, 0, paper_lr), "ta_hi": _budget_row(budget, ta, 200, 0, hi),
            "am_lo": _budget_row(budget, am, 100, 200, paper_lr), "am_hi": _budget_row(budget, am, 100, 200, hi),
            "am_before": _budget_row(budget, am, 100, 100, paper_lr)}
    cpu = float(budget["seconds"].sum()) if "seconds" in budget else float(record.get("seconds", 0))
    out = {"cb_date": str(record.get("date", "undated")), "cb_minutes": f"{cpu / 60:.0f} min",
           "cb_paper_lr": f"{paper_lr:g}", "cb_hi_lr": f"{hi:g}"}
    for key, r in rows.items():
        out[f"cb_{key}"] = f"{r['avg']:.1f}"
        out[f"cb_{key}_logit"] = f"{r['mean_abs_logit']:.3f}"
        out[f"cb_{key}_start"] = f"{r['start_avg']:.1f}"
    gains = {m: rows[f"{m}_hi"]["avg"] - rows[f"{m}_lo"]["avg"] for m in ("ta", "am")}
    by = f" by more than {margin:g} point" if margin > 0 else ""
    both = f"(Concrete TA {gains['ta']:+.1f}, Concrete AdaMerging {gains['am']:+.1f} points; one seed)"
    out["cb_effect"] = (f"the larger mask lr is ahead{by} on both {both}" if min(gains.values()) > margin else
                        f"the larger mask lr is not ahead{by} on both {both}")
    return out


def _disentangle_means(part: "pd.DataFrame") -> tuple[float, float, float]:
    """Averages over tasks of (individual, alone, task_arithmetic) for one λ of the study."""
    return tuple(float(part[c].mean()) for c in ("individual", "alone", "task_arithmetic"))


def disentangle_table(study: "pd.DataFrame") -> "pd.DataFrame":
    """The disentangling study (``benchmarks/miniature_disentangle.py``) as one row per λ: the
    averages over tasks of the individual models, of each task vector *alone* (pre + λ·τ_t) and of
    Task Arithmetic, and the individual − TA gap split into its scaling loss (individual − alone)
    and interference (alone − TA), with the interference share of the gap."""
    import pandas as pd

    need = {"task", "lambda", "individual", "alone", "task_arithmetic"}
    if missing := need - set(study.columns):
        raise KeyError(f"disentangle_table: the study lacks columns {sorted(missing)}")
    rows = []
    for lam, part in study.groupby("lambda", sort=True):
        ind, alone, ta = _disentangle_means(part)
        gap = ind - ta
        rows.append({"λ": f"{lam:g}", "Individual": round(ind, 1), "Alone (pre + λτ_t)": round(alone, 1),
                     "Task Arithmetic": round(ta, 1), "Gap (Ind − TA)": round(gap, 1),
                     "Scaling loss (Ind − Alone)": round(ind - alone, 1),
                     "Interference (Alone − TA)": round(alone - ta, 1),
                     "Interference share": f"{100 * (alone - ta) / gap:.0f}%" if gap > 0 else "–",
                     "tasks": int(part["task"].nunique())})
    return pd.DataFrame(rows)


def disentangle_numbers(study: "pd.DataFrame", record: Mapping[str, Any], book_lambda: float = 0.3,
                        reported_gap: float | None = None) -> dict[str, str]:
    """The values chapter 02 quotes from the disentangling study, for ``glue`` (``dt_*``).

    At the book's λ (``book_lambda``) the gap's two parts; at the largest λ studied, what raising
    a *uniform* λ does to each. ``dt_effect`` is computed: if raising λ adds more interference than
    it removes scaling loss, a single λ cannot close the gap and only coefficients that differ
    between layers or tasks can; the task with the most interference is named. With
    ``reported_gap`` (the paper's individual − TA average, points) ``dt_gap_compare`` says whether
    the miniature's gap is about as large (within a quarter of it), larger or smaller.
    """
    lams = sorted(float(v) for v in study["lambda"].unique())
    if book_lambda not in lams:
        raise ValueError(f"disentangle_numbers: the study has no rows at the book's λ {book_lambda:g} (has {lams})")
    at = study[study["lambda"] == book_lambda]
    top = study[study["lambda"] == lams[-1]]

    ind0, alone0, ta0 = _disentangle_means(at)
    ind1, alone1, ta1 = _disentangle_means(top)
    s0, i0 = ind0 - alone0, alone0 - ta0
    s1, i1 = ind1 - alone1, alone1 - ta1
    worst = at.assign(inter=at["alone"] - at["task_arithmetic"]).sort_values("inter").iloc[-1]
    out = {"dt_date": str(record.get("date", "undated")), "dt_lambda": f"{book_lambda:g}", "dt_top": f"{lams[-1]:g}",
           "dt_scaling": f"{s0:.1f}", "dt_inter": f"{i0:.1f}", "dt_share": f"{100 * i0 / (s0 + i0):.0f}%",
           "dt_scaling_top": f"{s1:.1f}", "dt_inter_top": f"{i1:.1f}", "dt_ta_top": f"{ta1:.1f}",
           "dt_worst": str(worst["task"]), "dt_worst_inter": f"{float(worst['inter']):.1f}"}
    out["dt_gap"] = f"{ind0 - ta0:.1f}"
    if reported_gap is not None:
        if not (math.isfinite(reported_gap) and reported_gap > 0):
            raise ValueError(f"disentangle_numbers: reported_gap must be a positive number of points, got {reported_gap}")
        ratio = (ind0 - ta0) / reported_gap
        out["dt_gap_rep"] = f"{reported_gap:.1f}"
        out["dt_gap_compare"] = ("about as large as" if abs(ratio - 1) <= 0.25 else
                                 "larger than" if ratio > 1 else "smaller than")
    if (i1 - i0) > (s0 - s1):
        out["dt_effect"] = (f"raising a uniform λ from {book_lambda:g} to {lams[-1]:g} removes {s0 - s1:.1f} points of "
                            f"scaling loss but adds {i1 - i0:.1f} of interference, so no single λ closes the gap; only "
                            "coefficients that differ between layers and tasks can win back the scaling loss, and "
                            "only where they do not bring the interference back")
    else:
        out["dt_effect"] = (f"raising a uniform λ from {book_lambda:g} to {lams[-1]:g} removes {s0 - s1:.1f} points of "
                            f"scaling loss and adds only {i1 - i0:.1f} of interference, so a larger uniform λ alone "
                            "would close much of the gap")
    return out


DOMAINS_METHODS = (*DESIGN_METHODS, "Alone (λ 0.3)")


def _domain_parts(get: Mapping[str, "pd.Series"]) -> dict[str, float]:
    """One domains-study variant's averages and the split of the individual − TA gap."""
    ind, alone = get["Individual"]["avg"], get["Alone (λ 0.3)"]["avg"]
    ta = get["Task Arithmetic (λ 0.3)"]["avg"]
    return {"zero": get["Pretrained"]["avg"], "ind": ind, "ta": ta, "gap": ind - ta, "scaling": ind - alone,
            "inter": alone - ta, "am": get["Layer-wise AdaMerging"]["avg"] - ta,
            "oracle": get["Layer-wise oracle λ"]["avg"] - ta}


def _variant_numbers(study: "pd.DataFrame", record: Mapping[str, Any], name: str, prefix: str
                     ) -> tuple[dict[str, dict[str, float]], str, Callable[[str, str], str], dict[str, str]]:
    """What the domains and pretraining views share: each variant's :func:`_domain_parts`, the
    baseline (first) variant, a formatter of one quantity over the variants ("v1 x; v2 y") and the
    record's date, steps and minutes with the baseline and the other variants' names as glue values."""
    _, variants = _design_rows(study, DOMAINS_METHODS, name)
    parts = {v: _domain_parts(get) for v, get in variants.items()}
    base = next(iter(parts))

    def fmt(key: str, spec: str) -> str:
        return "; ".join(f"{v} {format(p[key], spec)}" for v, p in parts.items())

    header = {
        f"{prefix}_date": str(record.get("date", "undated")), f"{prefix}_steps": f"{int(record['steps'])}",
        f"{prefix}_minutes": (f"{float(record['seconds']) / 60:.0f} min" if "seconds" in record
                              else "an unrecorded time"),
        f"{prefix}_baseline": base, f"{prefix}_variants": ", ".join(v for v in parts if v != base),
    }
    return parts, base, fmt, header


def domains_table(domains: "pd.DataFrame", study: str = "miniature_domains") -> "pd.DataFrame":
    """The input-domain study (``benchmarks/miniature_domains.py``) as one row per variant: zero-shot,
    individual and Task Arithmetic (λ 0.3) averages, TA's gap split into scaling loss (individual −
    each vector alone) and interference (alone − TA), layer-wise AdaMerging's and the oracle λ's gain
    over TA, and how many tasks AdaMerging leaves below TA. The pretraining study measures the same
    (``study`` names it in errors)."""
    import pandas as pd

    tasks, variants = _design_rows(domains, DOMAINS_METHODS, study)
    rows = []
    for variant, get in variants.items():
        p = _domain_parts(get)
        am, ta = get["Layer-wise AdaMerging"], get["Task Arithmetic (λ 0.3)"]
        rows.append({"variant": variant, "zero-shot": round(p["zero"], 1), "individual": round(p["ind"], 1),
                     "TA": round(p["ta"], 1), "scaling loss": round(p["scaling"], 1),
                     "interference": round(p["inter"], 1), "LW AM (Δ TA)": f"{am['avg']:.1f} ({p['am']:+.1f})",
                     "LW oracle λ (Δ TA)": f"{get['Layer-wise oracle λ']['avg']:.1f} ({p['oracle']:+.1f})",
                     "LW AM below TA": f"{int(sum(am[t] < ta[t] for t in tasks))} of {len(tasks)}"})
    return pd.DataFrame(rows)


def domains_numbers(domains: "pd.DataFrame", record: Mapping[str, Any], margin: float = 1.0) -> dict[str, str]:
    """The values chapter 02 quotes from the input-domain study, for ``glue`` (``dm_*``).

    Against the first variant (the book's tasks): ``dm_effect`` names the variants that cut Task
    Arithmetic's interference by more than ``margin`` points and says, for each, whether layer-wise
    AdaMerging's gain over TA widened (by more than ``margin``), narrowed or held; ``dm_broken``
    names the variants whose zero-shot average falls more than ten times ``margin`` below the
    baseline's (the backbone no longer reads the images).
    """
    parts, base, fmt, header = _variant_numbers(domains, record, "miniature_domains", "dm")
    b = parts[base]
    effects = []
    for v, p in parts.items():
        if v == base or b["inter"] - p["inter"] <= margin:
            continue
        change = p["am"] - b["am"]
        how = ("widens" if change > margin else "narrows" if change < -margin else "leaves") + \
            f" layer-wise AdaMerging's gain ({b['am']:+.1f} → {p['am']:+.1f})"
        effects.append(f"{v} cuts the interference from {b['inter']:.1f} to {p['inter']:.1f} points and {how}")
    broken = [f"{v} ({p['zero']:.1f} against {b['zero']:.1f})" for v, p in parts.items()
              if b["zero"] - p["zero"] > 10 * margin]
    return {
        **header, "dm_ta": fmt("ta", ".1f"), "dm_inter": fmt("inter", ".1f"), "dm_gains": fmt("am", "+.1f"),
        "dm_oracle": fmt("oracle", "+.1f"), "dm_zero": fmt("zero", ".1f"),
        "dm_effect": ("; ".join(effects) if effects else
                      f"no variant cuts the interference by more than {margin:g} point"),
        "dm_broken": ("no variant breaks the backbone's zero-shot reading" if not broken else
                      "the backbone no longer reads the images of " + ", ".join(broken)),
    }


def pretraining_table(study: "pd.DataFrame") -> "pd.DataFrame":
    """The pretraining-length study (``benchmarks/miniature_pretraining.py``): :func:`domains_table`'s
    columns per backbone, after the backbone's learned logit scale (– where not recorded)."""
    table = domains_table(study, "miniature_pretraining")
    scales = study.groupby("variant", sort=False)["logit_scale"].first() if "logit_scale" in study else {}
    table.insert(1, "logit scale", [f"{scales[v]:.1f}" if v in scales and math.isfinite(scales[v]) else "–"
                                    for v in table["variant"]])
    return table


def pretraining_numbers(study: "pd.DataFrame", record: Mapping[str, Any], margin: float = 1.0,
                        reported_gap: float | None = None) -> dict[str, str]:
    """The values chapter 02 quotes from the pretraining-length study, for ``glue`` (``pt_*``).

    Against the first row (the committed backbone), ``pt_effect`` says for each longer-pretrained
    backbone whether layer-wise AdaMerging's gain over Task Arithmetic and the oracle λ's gain
    widened or narrowed by more than ``margin`` points, or held. With ``reported_gap`` (the paper's
    individual − TA average) ``pt_closest`` names the backbone whose gap is nearest to it.
    """
    parts, base, fmt, header = _variant_numbers(study, record, "miniature_pretraining", "pt")
    b = parts[base]

    def move(before: float, after: float) -> str:
        return ("widens" if after - before > margin else "narrows" if after - before < -margin else "holds") + \
            f" ({before:+.1f} → {after:+.1f})"

    effects = [f"{v}: AdaMerging's gain over TA {move(b['am'], p['am'])}, the oracle's {move(b['oracle'], p['oracle'])}"
               for v, p in parts.items() if v != base]
    out = {
        **header, "pt_zero": fmt("zero", ".1f"), "pt_ind": fmt("ind", ".1f"), "pt_ta": fmt("ta", ".1f"),
        "pt_inter": fmt("inter", ".1f"), "pt_gains": fmt("am", "+.1f"), "pt_oracle": fmt("oracle", "+.1f"),
        "pt_effect": "; ".join(effects) or "no longer-pretrained backbone was measured",
        "pt_gap": fmt("gap", ".1f"),
    }
    if reported_gap is not None:
        if not (math.isfinite(reported_gap) and reported_gap > 0):
            raise ValueError(f"pretraining_numbers: reported_gap must be a positive number of points, got {reported_gap}")
        out["pt_gap_rep"] = f"{reported_gap:.1f}"
        out["pt_closest"] = min(parts, key=lambda v: abs(parts[v]["gap"] - reported_gap))
    return out


# The recorded miniature studies the chapters show (02: the miniature's design; 03: the Concrete
# budget): name -> (table view, quoted numbers).
STUDY_VIEWS: dict[str, tuple[Callable[..., Any], Callable[..., dict[str, str]]]] = {
    "miniature_design": (design_table, design_numbers),
    "miniature_entropy": (entropy_study_table, entropy_study_numbers),
    "miniature_pilot": (pilot_table, pilot_numbers),
    "miniature_capacity": (capacity_table, capacity_numbers),
    "miniature_headroom": (headroom_table, headroom_numbers),
    "miniature_regime": (regime_table, regime_numbers),
    "miniature_disentangle": (disentangle_table, disentangle_numbers),
    "miniature_domains": (domains_table, domains_numbers),
    "miniature_pretraining": (pretraining_table, pretraining_numbers),
    "concrete_budget": (concrete_budget_table, concrete_budget_numbers),
}


def publish_study(name: str, glue: Callable[..., Any], table_key: str, csv: str | Path,
                  **numbers_kw: Any) -> tuple["pd.DataFrame", dict]:
    """Show one recorded study in a chapter: glue its table view as ``table_key``, write the view
    to ``csv`` (the page's download) and glue every value its ``*_numbers`` function returns.

    ``glue`` is the chapter's ``myst_nb.glue`` (passed in so the library does not import myst-nb);
    ``numbers_kw`` go to the numbers function (e.g. the reported gains for the headroom study).
    Returns the raw study frame and its record.
    """
    if name not in STUDY_VIEWS:
        raise KeyError(f"publish_study: no view for study {name!r}; known: {', '.join(sorted(STUDY_VIEWS))}")
    table_fn, numbers_fn = STUDY_VIEWS[name]
    frame, record = recorded_study(name)
    view = table_fn(frame)
    glue(table_key, view.set_index(view.columns[0]), display=False)  # the row labels, not 0, 1, ...
    view.to_csv(csv, index=False)
    for key, value in numbers_fn(frame, record, **numbers_kw).items():
        glue(key, value, display=False)
    return frame, record
