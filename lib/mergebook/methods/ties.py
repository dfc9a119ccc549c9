"""Ties-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

    θ = θ_pre + λ · τ_m,   τ_m = disjoint_merge(trim_k(τ_1..τ_K), elect_sign(...))   (Ties §3, Alg. 1)

AdaMerging writes the per-task result of trim + elect + "only agreeing entries" as Φ(T_k), so that
Ties ``sum`` is θ_pre + λ Σ_k Φ(T_k) and AdaMerging++ is θ_pre + Σ_k λ_k Φ(T_k) (AdaMerging §3.1,
§3.2.1); :func:`ties_task_vectors` returns those Φ(T_k).

Facts of the original code reproduced here (prateeksr/ties-merging, reused by AdaMerging):

* **Trim is global per task**: the threshold is taken over the task's whole flattened vector (all
  participating keys at once), keeping the ``int(d·k)`` largest magnitudes *and every entry tied
  with the threshold* (``|x| >= kthvalue(|x|, d − int(d·k))``).
* **Elect**: σ = sign(Σ_k trimmed_k); entries where that is 0 take the majority sign, i.e. the sign
  of Σ σ over the *whole* vector.
* **Disjoint merge** keeps only entries whose sign equals σ: ``sum`` adds them (the variant the
  AdaMerging / Concrete / CART papers report, λ = 0.3), ``mean`` divides by their count (the
  Ties repository's default), ``max`` keeps the largest magnitude with sign σ.

At CLIP scale (8 × 87.5M float32) the original stacks every task vector and calls ``kthvalue``,
which allocates int64 indices and runs out of memory. Here the threshold is found exactly with
bounded memory (:func:`topk_threshold`), and the merge streams key by key.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..statedict import StateDict, TaskVectorView, float_keys
from .registry import MergeError, Param, register

__all__ = [
    "keep_count",
    "topk_threshold",
    "trim",
    "elect_sign",
    "disjoint_merge",
    "ties_task_vectors",
    "ties_merging",
    "DISJOINT_METHODS",
]

DISJOINT_METHODS = ("sum", "mean", "max")

# Sample this many magnitudes per task to bracket the threshold before the exact pass.
_SAMPLE = 1 << 18
# Below this many entries a task vector is simply gathered and selected in memory.
_SMALL = 1 << 21


def _err(msg: str) -> Exception:
    return MergeError(msg)


# ----------------------------------------------------------------------------------------------
# Small pure helpers (Ties §3, Alg. 1)


def keep_count(d: int, k: float) -> int:
    """How many entries Ties keeps out of ``d`` at fraction ``k``: ``int(d * k)``, as the original."""
    return int(d * k)


def trim(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Ties' trim (Alg. 1 step 1): ``x`` where ``|x| >= threshold``, else 0 (a new tensor)."""
    if threshold <= 0:
        return x.clone()
    # hardshrink zeroes |x| <= λ; with λ the next value below t in x's dtype that is exactly |x| >= t,
    # in one fused pass instead of abs + compare + where.
    t = torch.tensor(threshold, dtype=x.dtype)
    below = torch.nextafter(t, torch.zeros((), dtype=x.dtype)).item()
    return F.hardshrink(x, below)


def elect_sign(trimmed: torch.Tensor, majority: float | None = None) -> torch.Tensor:
    """σ = sign(Σ_k trimmed_k) over dim 0, zeros set to the majority sign (Ties Alg. 1 step 2)."""
    sign = torch.sign(trimmed.sum(dim=0))
    if majority is None:
        majority = float(torch.sign(sign.sum()))
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Merge only the entries of ``trimmed`` [K, ...] whose sign equals ``sign`` (Ties Alg. 1 step 3)."""
    if method not in DISJOINT_METHODS:
        raise _err(f"disjoint merge {method!r} is unknown: use one of {', '.join(DISJOINT_METHODS)}")
    # relu(σ·x) is |x| where x agrees with σ and 0 elsewhere; multiplying by σ = ±1 is exact, so
    # σ·Σ relu(σ·x) is bit-identical to the original Σ x·[agree].
    agree = torch.relu(trimmed * sign)
    if method == "sum":
        return agree.sum(dim=0) * sign
    if method == "mean":
        count = (agree != 0).sum(dim=0).clamp(min=1)
        return agree.sum(dim=0) / count * sign
    return agree.amax(dim=0) * sign


# ----------------------------------------------------------------------------------------------
# Exact global threshold with bounded memory


def _keys_of(tv: Mapping[str, torch.Tensor], keys: Sequence[str] | None) -> list[str]:
    if keys is not None:
        return list(keys)
    if isinstance(tv, TaskVectorView):
        return list(tv)
    return float_keys(tv)


def _work_dtype(dtypes) -> torch.dtype:
    # float16/bfloat16/float32 widen to float32 exactly; float64 needs float64 to stay exact.
    return torch.float64 if torch.float64 in set(dtypes) else torch.float32


def _abs_chunks(tv: Mapping[str, torch.Tensor], keys: Sequence[str], dtype: torch.dtype) -> Iterator[torch.Tensor]:
    fresh = isinstance(tv, TaskVectorView)
    for k in keys:
        x = tv[k].reshape(-1)
        if x.dtype != dtype:
            yield x.to(dtype).abs_()
        elif fresh:
            yield x.abs_()  # the view computed a new tensor: safe to overwrite
        else:
            yield x.abs()


def _sample_abs(tv: Mapping[str, torch.Tensor], keys: Sequence[str], step: int, dtype: torch.dtype) -> torch.Tensor:
    parts = []
    for k in keys:
        if isinstance(tv, TaskVectorView):
            s = tv.strided(k, step)
        else:
            s = tv[k].reshape(-1)[::step]
        parts.append(s.to(dtype).abs())
    return torch.cat(parts)


def _numel(tv: Mapping[str, torch.Tensor], k: str) -> int:
    return math.prod(tv.shape(k)) if isinstance(tv, TaskVectorView) else tv[k].numel()


def _dtype_of(tv: Mapping[str, torch.Tensor], k: str) -> torch.dtype:
    if isinstance(tv, TaskVectorView):
        return torch.promote_types(tv._ft[k].dtype, tv._pre[k].dtype)
    return tv[k].dtype


def _bracket_stats(a: torch.Tensor, lo: float, hi: float) -> tuple[int, int, int, torch.Tensor]:
    """(#> hi, #== hi, #== lo, values strictly inside (lo, hi)) of a 1-D magnitude tensor."""
    if a.device.type == "cpu":
        # NumPy's compare/count kernels are several times faster than torch's on CPU here, and
        # .numpy() shares memory, so this costs nothing extra.
        n = a.numpy()
        above = int(np.count_nonzero(n > hi))
        eq_hi = int(np.count_nonzero(n == hi))
        eq_lo = int(np.count_nonzero(n == lo)) if lo != hi else 0
        inside = torch.from_numpy(n[(n > lo) & (n < hi)])
        return above, eq_hi, eq_lo, inside
    above = int(torch.count_nonzero(a > hi))
    eq_hi = int(torch.count_nonzero(a == hi))
    eq_lo = int(torch.count_nonzero(a == lo)) if lo != hi else 0
    return above, eq_hi, eq_lo, a[(a > lo) & (a < hi)]


def _kth_largest_sort(chunks: Callable[[], Iterator[torch.Tensor]], d: int, r: int) -> float:
    # The original's own call: kthvalue at ascending position d − r + 1 of the gathered magnitudes.
    a = torch.cat(list(chunks()))
    return float(torch.kthvalue(a.cpu(), d - r + 1).values)


def _kth_largest_radix(chunks: Callable[[], Iterator[torch.Tensor]], r: int, dtype: torch.dtype) -> float:
    """Exact r-th largest magnitude by radix selection on the float bits (16 bits per pass)."""
    # Non-negative IEEE floats order like their bit patterns read as signed integers.
    itype, nbits = (torch.int64, 63) if dtype == torch.float64 else (torch.int32, 31)
    prefix, known = 0, 0  # the top `known` bits of the answer
    while known < nbits:
        width = min(16, nbits - known)
        shift = nbits - known - width
        hist = torch.zeros(1 << width, dtype=torch.int64)
        for a in chunks():
            b = a.view(itype).to(torch.int64)
            if known:
                b = b[(b >> (shift + width)) == prefix]
            hist += torch.bincount((b >> shift) & ((1 << width) - 1), minlength=1 << width).cpu()
        above = torch.cumsum(hist.flip(0), 0).flip(0)  # above[j] = #entries with digit >= j
        digit = int(torch.nonzero(above >= r).max())
        r -= int(above[digit + 1]) if digit + 1 < (1 << width) else 0
        prefix = (prefix << width) | digit
        known += width
    return float(torch.tensor(prefix, dtype=itype).view(dtype))


def _kth_largest_bracket(chunks: Callable[[], Iterator[torch.Tensor]], sample: torch.Tensor, d: int, r: int,
                         dtype: torch.dtype) -> float | None:
    """Exact r-th largest magnitude via a sample-based bracket and one counting pass; None if missed."""
    ss = torch.sort(sample, descending=True).values.cpu()
    n_s = ss.numel()
    f = r / d
    pos = (r - 1) * n_s / d
    margin = int(math.ceil(6.0 * math.sqrt(n_s * f * (1.0 - f)))) + 8
    hi_i, lo_i = int(math.floor(pos)) - margin, int(math.ceil(pos)) + margin
    hi = float(ss[hi_i]) if hi_i >= 0 else math.inf
    lo = float(ss[lo_i]) if lo_i < n_s else 0.0
    above = eq_hi = eq_lo = 0
    inside = []
    for a in chunks():
        s = _bracket_stats(a, lo, hi)
        above, eq_hi, eq_lo = above + s[0], eq_hi + s[1], eq_lo + s[2]
        inside.append(s[3])
    # Descending order: [> hi] [== hi] (lo, hi) [== lo] [< lo]
    if r <= above:
        return None
    if r <= above + eq_hi:
        return hi
    vals = torch.cat(inside) if inside else torch.empty(0, dtype=dtype)
    n_in = vals.numel()
    if r <= above + eq_hi + n_in:
        j = r - above - eq_hi  # 1-based rank among `vals`, descending
        return float(torch.kthvalue(vals.cpu(), n_in - j + 1).values)
    if r <= above + eq_hi + n_in + eq_lo:
        return lo
    return None


def topk_threshold(task_vector: torch.Tensor | Mapping[str, torch.Tensor], k: float = 0.2,
                   keys: Sequence[str] | None = None, *, method: str = "auto") -> float:
    """Exact global magnitude threshold of Ties' trim (Alg. 1 step 1): keep ``|x| >= t``.

    ``t`` is the ``(int(d·k) + 1)``-th largest ``|x|`` over all ``keys`` of one task vector (the
    original's ``kthvalue(|x|, d − int(d·k))``), so ``|x| >= t`` keeps the top ``int(d·k)``
    entries plus every entry tied with the threshold. ``k = 1`` keeps everything (t = 0).

    ``method``: ``"auto"`` brackets t from a strided sample, then counts and gathers only the
    entries inside the bracket in one pass (exact; falls back to ``"radix"`` if the bracket missed);
    ``"radix"`` is an exact bit-histogram selection, one pass per 16 bits; ``"sort"`` gathers
    everything and calls ``kthvalue`` (the original, memory-hungry; for tests).
    """
    if not (0 < k <= 1) or isinstance(k, bool):
        raise _err(f"Ties k = {k!r} is out of range: k is the fraction of entries kept per task, in (0, 1] "
                   "(use 0.2 for the papers' 20%)")
    if method not in ("auto", "radix", "sort"):
        raise _err(f"topk_threshold method {method!r} is unknown: use 'auto', 'radix' or 'sort'")
    tv: Mapping[str, torch.Tensor] = {"x": task_vector} if isinstance(task_vector, torch.Tensor) else task_vector
    ks = ["x"] if isinstance(task_vector, torch.Tensor) else _keys_of(tv, keys)
    if not ks:
        raise _err("Ties: no keys to trim: the task vector has no floating tensors")
    d = sum(_numel(tv, key) for key in ks)
    if d == 0:
        raise _err("Ties: the task vector has no entries")
    n_keep = keep_count(d, k)
    if n_keep >= d:
        return 0.0
    r = n_keep + 1  # 1-based descending rank of the threshold
    dtype = _work_dtype(_dtype_of(tv, key) for key in ks)

    def chunks() -> Iterator[torch.Tensor]:
        return _abs_chunks(tv, ks, dtype)

    if method == "sort" or (method == "auto" and d <= _SMALL):
        return _kth_largest_sort(chunks, d, r)
    if method == "radix":
        return _kth_largest_radix(chunks, r, dtype)
    step = max(1, d // _SAMPLE)
    t = _kth_largest_bracket(chunks, _sample_abs(tv, ks, step, dtype), d, r, dtype)
    return _kth_largest_radix(chunks, r, dtype) if t is None else t


# ----------------------------------------------------------------------------------------------
# Streaming Ties over state dicts


def _check_disjoint(disjoint: str) -> None:
    if disjoint not in DISJOINT_METHODS:
        raise _err(f"Ties disjoint = {disjoint!r} is unknown: use one of {', '.join(DISJOINT_METHODS)}")


def _trimmed_stack(tvs: Sequence[Mapping[str, torch.Tensor]], key: str, thresholds: Sequence[float] | None) -> torch.Tensor:
    rows = [tv[key] for tv in tvs]
    if thresholds is not None:
        rows = [trim(x, t) for x, t in zip(rows, thresholds)]
    return torch.stack(rows)


def elect_signs(tvs: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str],
                thresholds: Sequence[float] | None) -> tuple[dict[str, torch.Tensor], float]:
    """Per-key σ = sign(Σ_k trimmed_k) with zeros filled by the global majority sign (Ties Alg. 1 step 2)."""
    signs: dict[str, torch.Tensor] = {}
    balance = 0  # Σ σ over every participating entry, counted exactly
    for key in keys:
        s = torch.sign(_trimmed_stack(tvs, key, thresholds).sum(dim=0))
        balance += int(torch.count_nonzero(s > 0)) - int(torch.count_nonzero(s < 0))
        signs[key] = s.to(torch.int8)  # a quarter of the memory of the float sign
    majority = float(np.sign(balance))
    for key, s in signs.items():
        if majority != 0:
            s[s == 0] = int(majority)
    return signs, majority


def ties_thresholds(tvs: Sequence[Mapping[str, torch.Tensor]], k: float | None,
                    keys: Sequence[str]) -> list[float] | None:
    """Each task's global trim threshold over ``keys`` (None when ``k`` is None: no trim)."""
    if k is None:
        return None
    return [topk_threshold(tv, k, keys) for tv in tvs]


def ties_task_vectors(task_vectors: Sequence[Mapping[str, torch.Tensor]], k: float = 0.2,
                      keys: Sequence[str] | None = None) -> list[StateDict]:
    """Φ(T_k) of AdaMerging §3.1: each task's trimmed (top-k global) and sign-agreeing vector.

    Σ_k Φ(T_k) is Ties' ``sum`` disjoint merge, so θ_pre + λ Σ_k Φ(T_k) is Ties-Merging and
    θ_pre + Σ_k λ_k^(l) Φ(T_k^(l)) is AdaMerging++. Only ``keys`` (default: every floating
    tensor) take part and appear in the result.
    """
    if len(task_vectors) == 0:
        raise _err("ties_task_vectors needs at least one task vector")
    ks = _keys_of(task_vectors[0], keys)
    thresholds = ties_thresholds(task_vectors, k, ks)
    signs, _ = elect_signs(task_vectors, ks, thresholds)
    out: list[StateDict] = [{} for _ in task_vectors]
    for key in ks:
        stack = _trimmed_stack(task_vectors, key, thresholds)
        sign = signs.pop(key).to(stack.dtype)
        phi = torch.relu(stack * sign) * sign  # the agreeing entries of each task, others 0
        for i, row in enumerate(phi.unbind(0)):
            out[i][key] = row
    return out


@register("ties", summary="θ_pre + λ · disjoint_merge(trim_k(τ), elect(τ))", url="https://arxiv.org/abs/2306.01708",
          paper="Yadav et al. 2023, TIES-Merging (Alg. 1); AdaMerging §3.1 writes it θ_pre + λ Σ_k Φ(T_k)",
          params=[
              Param("k", 0.2, "float", "fraction of entries kept per task by the global magnitude trim (0.2 = 20%)",
                    low=0.0, high=1.0, low_open=True),
              Param("scaling_coef", 0.3, "float", "λ on the merged vector (0.3 in the AdaMerging/Concrete/CART "
                    "tables; the Ties repo tunes 0.8-2.5 with mean)", low=-10.0, high=10.0),
              Param("disjoint", "sum", "choice", "how agreeing entries combine: sum (papers' tables), mean (Ties "
                    "repo default) or max", choices=DISJOINT_METHODS),
              Param("keys", None, "keys", "keys that take part in the global trim and the merge; others keep "
                    "pretrained values", optional=True),
          ])
def ties_merging(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                 k: float = 0.2, scaling_coef: float = 0.3, disjoint: str = "sum",
                 keys: Sequence[str] | None = None) -> StateDict:
    """Ties-Merging (Yadav et al. 2023, Alg. 1): θ_pre + λ · disjoint_merge(trim_k(τ), elect(τ)).

    Defaults are the setting the AdaMerging, Concrete and CART papers report for Ties (k = 20%,
    ``sum``, λ = 0.3); the Ties repository's own default is ``mean`` with λ tuned in 0.8–2.5.
    ``keys`` (default: every floating tensor) take part in the global trim and the merge; the
    others keep their pretrained values, as in the original (which drops them from the vector).
    """
    from .task_arithmetic import combine

    tvs = [TaskVectorView(ft, pretrained, keys) for ft in finetuned]
    return combine(pretrained, tvs, scaling_coef, keys=keys, sparsify=k, consensus=disjoint)
