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
  of Σ σ over the *whole* vector. (If even that is 0, the agreement test
  ``torch.where(σ > 0, x > 0, x < 0)`` keeps the negative entries; reproduced too.)
* **Disjoint merge** keeps only entries whose sign equals σ: ``sum`` adds them (the variant the
  AdaMerging / Concrete / CART papers report, λ = 0.3), ``mean`` divides by their count (the
  Ties repository's default), ``max`` keeps the largest magnitude with sign σ.

At CLIP scale (8 × 87.5M float32) the original stacks every task vector and calls ``kthvalue``,
which allocates int64 indices and runs out of memory. Here the threshold is found exactly with
bounded memory (:func:`topk_threshold`), and the merge streams key by key (:class:`TiesStream`):
one pass that trims, elects and merges each tensor, then patches the few columns whose trimmed
values cancel once the global majority sign is known. ``benchmarks/ties.py`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

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
    "agreeing_entries",
    "TiesStream",
    "TiesKey",
    "merge_agreeing",
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


def _shrink_lambda(threshold: float, dtype: torch.dtype) -> float:
    # hardshrink zeroes |x| <= λ; with λ the next value below t in x's dtype that is exactly |x| >= t,
    # in one fused pass instead of abs + compare + where.
    t = torch.tensor(threshold, dtype=dtype)
    return torch.nextafter(t, torch.zeros((), dtype=dtype)).item()


def trim(x: torch.Tensor, threshold: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """Ties' trim (Alg. 1 step 1): ``x`` where ``|x| >= threshold``, else 0 (a new tensor, or ``out``)."""
    if threshold <= 0:
        return x.clone() if out is None else out.copy_(x)
    lam = _shrink_lambda(threshold, x.dtype)
    return F.hardshrink(x, lam) if out is None else torch.hardshrink(x, lam, out=out)


def elect_sign(trimmed: torch.Tensor, majority: float | None = None) -> torch.Tensor:
    """σ = sign(Σ_k trimmed_k) over dim 0, zeros set to the majority sign (Ties Alg. 1 step 2)."""
    sign = torch.sign(trimmed.sum(dim=0))
    if majority is None:
        majority = float(torch.sign(sign.sum()))
    return torch.where(sign == 0, torch.full_like(sign, majority), sign)


def _selection_sign(sign: torch.Tensor) -> torch.Tensor:
    # The original keeps x > 0 where σ > 0 and x < 0 elsewhere, σ = 0 included (torch.where(σ > 0, ...)).
    return (sign > 0).to(sign.dtype) * 2 - 1


def agreeing_entries(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Each row's entries whose sign agrees with σ, others 0: the Φ(T_k) rows of AdaMerging §3.1."""
    sel = _selection_sign(sign)
    return torch.relu(trimmed * sel) * sel


def disjoint_merge(trimmed: torch.Tensor, sign: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """Merge only the entries of ``trimmed`` [K, ...] whose sign equals ``sign`` (Ties Alg. 1 step 3)."""
    if method not in DISJOINT_METHODS:
        raise _err(f"disjoint merge {method!r} is unknown: use one of {', '.join(DISJOINT_METHODS)}")
    # relu(σ·x) is |x| where x agrees with σ and 0 elsewhere; multiplying by σ = ±1 is exact, so
    # σ·Σ relu(σ·x) is bit-identical to the original Σ x·[agree].
    sel = _selection_sign(sign)
    agree = torch.relu(trimmed * sel)
    if method == "sum":
        return agree.sum(dim=0) * sel
    if method == "mean":
        count = (agree != 0).sum(dim=0).clamp(min=1)
        return agree.sum(dim=0) / count * sel
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
    """|x| of each key, flattened. A yielded tensor may be a reused buffer: use it before the next one."""
    buf: torch.Tensor | None = None
    for k in keys:
        if isinstance(tv, TaskVectorView) and _dtype_of(tv, k) == dtype:
            # ft − pre and its abs written into one reused buffer: no fresh pages per key
            ft, pre = tv._ft[k].reshape(-1), tv._pre[k].reshape(-1)
            if buf is None or buf.numel() < ft.numel() or buf.device != ft.device:
                size = max(_numel(tv, key) for key in keys)
                buf = torch.empty(size, dtype=dtype, device=ft.device)
            out = buf[:ft.numel()]
            torch.sub(ft, pre, out=out)
            yield out.abs_()
            continue
        x = tv[k].reshape(-1)
        yield x.to(dtype).abs_() if x.dtype != dtype else x.abs()


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
        m = n >= lo
        le_hi = n <= hi
        above = n.size - int(np.count_nonzero(le_hi))
        np.logical_and(m, le_hi, out=m)
        cand = torch.from_numpy(n[m])  # [lo, hi]: a small fraction of the entries
    else:
        le_hi = a <= hi
        above = a.numel() - int(torch.count_nonzero(le_hi))
        cand = a[(a >= lo) & le_hi]
    eq_hi = int(torch.count_nonzero(cand == hi))
    eq_lo = int(torch.count_nonzero(cand == lo)) if lo != hi else 0
    return above, eq_hi, eq_lo, cand[(cand > lo) & (cand < hi)]


def _kth_largest_sort(chunks: Callable[[], Iterator[torch.Tensor]], d: int, r: int) -> float:
    # The original's own call: kthvalue at ascending position d − r + 1 of the gathered magnitudes.
    a = torch.cat([c.clone() for c in chunks()])  # chunks may share one buffer
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
                   keys: Sequence[str] | None = None, *, method: str = "auto", extra_zeros: int = 0) -> float:
    """Exact global magnitude threshold of Ties' trim (Alg. 1 step 1): keep ``|x| >= t``.

    ``t`` is the ``(int(d·k) + 1)``-th largest ``|x|`` over all ``keys`` of one task vector (the
    original's ``kthvalue(|x|, d − int(d·k))``), so ``|x| >= t`` keeps the top ``int(d·k)``
    entries plus every entry tied with the threshold. ``k = 1`` keeps everything (t = 0).

    ``method``: ``"auto"`` brackets t from a strided sample, then counts and gathers only the
    entries inside the bracket in one pass (exact; falls back to ``"radix"`` if the bracket missed);
    ``"radix"`` is an exact bit-histogram selection, one pass per 16 bits; ``"sort"`` gathers
    everything and calls ``kthvalue`` (the original, memory-hungry; for tests).

    ``extra_zeros`` adds that many zero entries to the population without materialising them: the
    original's whole-CLIP checkpoints carry the text tower's leftovers (25,599,489 entries for
    ViT-B/32, delta 0), so its global top-20% keeps about 25.8% of the vision entries.
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
    if isinstance(extra_zeros, bool) or int(extra_zeros) != extra_zeros or extra_zeros < 0:
        raise _err(f"Ties extra_zeros = {extra_zeros!r} is out of range: it counts zero-delta entries outside these "
                   "tensors (a whole-CLIP checkpoint's text tower), a non-negative integer")
    # The zeros are the smallest magnitudes, so the threshold is the same rank among the real entries.
    n_keep = keep_count(d + int(extra_zeros), k)
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


def _key_layout(tvs: Sequence[Mapping[str, torch.Tensor]], key: str) -> tuple[torch.Size, torch.dtype, torch.device]:
    first = tvs[0]
    if isinstance(first, TaskVectorView):
        return first.shape(key), _dtype_of(first, key), first._pre[key].device
    x0 = first[key]
    return x0.shape, x0.dtype, x0.device


def _trimmed_stack(tvs: Sequence[Mapping[str, torch.Tensor]], key: str, thresholds: Sequence[float] | None,
                   buffer: torch.Tensor | None = None) -> torch.Tensor:
    """[K, ...] stack of every task's trimmed vector of ``key``, written in place (into ``buffer`` if given)."""
    shape, dtype, device = _key_layout(tvs, key)
    size = len(tvs) * math.prod(shape)
    if buffer is not None and buffer.numel() >= size and buffer.dtype == dtype and buffer.device == device:
        stack = buffer[:size].view(len(tvs), *shape)
    else:
        stack = torch.empty((len(tvs), *shape), dtype=dtype, device=device)
    for i, tv in enumerate(tvs):
        row = stack[i]
        if isinstance(tv, TaskVectorView):
            torch.sub(tv._ft[key], tv._pre[key], out=row)
            x = row
        else:
            x = tv[key]
        if thresholds is None:
            if x is not row:
                row.copy_(x)
        else:
            trim(x, thresholds[i], out=row)
    return stack


class TiesKey(NamedTuple):
    """What :class:`TiesStream` yields for one key."""

    key: str
    trimmed: torch.Tensor  # [K, ...] trimmed task vectors
    sign: torch.Tensor  # σ = sign(Σ_k trimmed_k); 0 where undecided until the majority is known
    sel: torch.Tensor  # ±1: the sign an entry must have to be kept (the original treats σ = 0 as −)
    agree: torch.Tensor  # [K, ...] |x| where x agrees with sel, else 0
    agree_sum: torch.Tensor  # Σ_k agree_k


class TiesStream:
    """One pass over ``keys`` yielding a :class:`TiesKey` (trimmed stack, σ, agreeing magnitudes).

    Where Σ_k trimmed_k = 0 the original uses the *global* majority sign, known only after the
    last key. Those columns (usually none: an all-zero column never matters) are kept in
    :attr:`pending` as ``key -> (flat indices, trimmed columns [K, m])``, and the consumer
    recomputes them from :meth:`patches` after the pass. One pass instead of elect-then-merge
    halves the reads of the fine-tuned weights.
    """

    def __init__(self, tvs: Sequence[Mapping[str, torch.Tensor]], keys: Sequence[str],
                 thresholds: Sequence[float] | None):
        self.tvs, self.keys, self.thresholds = tvs, list(keys), thresholds
        self.balance = 0  # Σ σ over every participating entry, counted exactly
        self.pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.done = False

    def __iter__(self) -> Iterator[TiesKey]:
        # Two [K, largest tensor] buffers are reused for every key: the yielded `trimmed` and
        # `agree` are only valid until the next key (copy what you keep).
        layouts = {key: _key_layout(self.tvs, key) for key in self.keys}
        stack_buf = agree_buf = None
        for key in self.keys:
            shape, dtype, device = layouts[key]
            if stack_buf is None or stack_buf.dtype != dtype or stack_buf.device != device:
                size = len(self.tvs) * max(math.prod(sh) for sh, dt, dv in layouts.values() if (dt, dv) == (dtype, device))
                stack_buf = torch.empty(size, dtype=dtype, device=device)
                agree_buf = torch.empty(size, dtype=dtype, device=device)
            stack = _trimmed_stack(self.tvs, key, self.thresholds, stack_buf)
            s = stack.sum(dim=0)
            sign = torch.sign(s)
            # Σ of ±1/0 over one tensor (< 2^24 entries) is exact in float32 whatever the order.
            self.balance += int(sign.sum(dtype=torch.float64)) if sign.numel() >= 1 << 24 else int(sign.sum())
            zero = s == 0
            sel = torch.where(zero, -1.0, sign)  # the original keeps negatives where σ = 0
            agree = torch.mul(stack, sel, out=agree_buf[:stack.numel()].view(stack.shape)).relu_()
            agree_sum = agree.sum(dim=0)
            # A cancelled column (Σ = 0) that is not all zero has a negative entry, so with sel = −1
            # there it has agree_sum > 0: a cheap test that needs no scan of the whole stack.
            undecided = zero.logical_and_(agree_sum > 0)
            if int(torch.count_nonzero(undecided)):
                idx = torch.nonzero(undecided.reshape(-1)).squeeze(1)
                self.pending[key] = (idx, stack.reshape(stack.shape[0], -1)[:, idx])
            yield TiesKey(key, stack, sign, sel, agree, agree_sum)
        self.done = True

    @property
    def majority(self) -> float:
        """sign(Σ σ) over all participating entries (Ties' ``resolve_zero_signs(..., "majority")``)."""
        if not self.done:
            raise RuntimeError("the majority sign is known only after the whole pass")
        return float(np.sign(self.balance))

    def patches(self) -> Iterator[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(key, flat indices, trimmed columns [K, m], σ = majority [m])`` to recompute after the pass."""
        for key, (idx, cols) in self.pending.items():
            yield key, idx, cols, torch.full((cols.shape[1],), self.majority, dtype=cols.dtype, device=cols.device)


def merge_agreeing(t: TiesKey, method: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Disjoint merge of one streamed key, optionally with per-task weights (``max`` takes none)."""
    if weights is None:
        if method == "sum":
            return t.agree_sum * t.sel
        if method == "mean":
            return t.agree_sum / (t.agree != 0).sum(dim=0).clamp(min=1) * t.sel
        return t.agree.amax(dim=0) * t.sign
    w = weights.to(t.agree).reshape(-1, *([1] * (t.agree.dim() - 1)))
    d = (t.agree * w).sum(dim=0)
    if method == "mean":
        d = d / (t.agree != 0).sum(dim=0).clamp(min=1)
    return d * t.sel


def ties_key(trimmed: torch.Tensor, sign: torch.Tensor) -> TiesKey:
    """A :class:`TiesKey` for given trimmed columns and signs (used to patch undecided columns)."""
    sel = _selection_sign(sign)
    agree = torch.relu(trimmed * sel)
    return TiesKey("", trimmed, sign, sel, agree, agree.sum(dim=0))


def ties_thresholds(tvs: Sequence[Mapping[str, torch.Tensor]], k: float | None,
                    keys: Sequence[str], extra_zeros: int = 0) -> list[float] | None:
    """Each task's global trim threshold over ``keys`` (None when ``k`` is None: no trim)."""
    if k is None:
        return None
    return [topk_threshold(tv, k, keys, extra_zeros=extra_zeros) for tv in tvs]


def ties_task_vectors(task_vectors: Sequence[Mapping[str, torch.Tensor]], k: float = 0.2,
                      keys: Sequence[str] | None = None, extra_zeros: int = 0) -> list[StateDict]:
    """Φ(T_k) of AdaMerging §3.1: each task's trimmed (top-k global) and sign-agreeing vector.

    Σ_k Φ(T_k) is Ties' ``sum`` disjoint merge, so θ_pre + λ Σ_k Φ(T_k) is Ties-Merging and
    θ_pre + Σ_k λ_k^(l) Φ(T_k^(l)) is AdaMerging++. Only ``keys`` (default: every floating
    tensor) take part and appear in the result. ``extra_zeros``: see :func:`topk_threshold`.
    """
    if len(task_vectors) == 0:
        raise _err("ties_task_vectors needs at least one task vector")
    ks = _keys_of(task_vectors[0], keys)
    thresholds = ties_thresholds(task_vectors, k, ks, extra_zeros)
    out: list[StateDict] = [{} for _ in task_vectors]
    stream = TiesStream(task_vectors, ks, thresholds)
    with torch.no_grad():
        for t in stream:
            for i, row in enumerate((t.agree * t.sel).unbind(0)):
                out[i][t.key] = row
        for key, idx, cols, sign in stream.patches():
            fixed = agreeing_entries(cols, sign)
            for i in range(len(task_vectors)):
                out[i][key].view(-1)[idx] = fixed[i]
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
              Param("extra_zeros", 0, "int", "zero-delta entries counted in the global trim population but not "
                    "given (the trim population option): 0 trims over the given tensors (vision-only towers); a "
                    "whole-CLIP checkpoint of the original also holds the text tower's leftovers, "
                    "mergebook.layout.openclip_text_numel(...) = 25,599,489 for ViT-B/32", low=0),
          ])
def ties_merging(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                 k: float = 0.2, scaling_coef: float = 0.3, disjoint: str = "sum",
                 keys: Sequence[str] | None = None, extra_zeros: int = 0) -> StateDict:
    """Ties-Merging (Yadav et al. 2023, Alg. 1): θ_pre + λ · disjoint_merge(trim_k(τ), elect(τ)).

    Defaults are the setting the AdaMerging, Concrete and CART papers report for Ties (k = 20%,
    ``sum``, λ = 0.3); the Ties repository's own default is ``mean`` with λ tuned in 0.8–2.5.
    ``keys`` (default: every floating tensor) take part in the global trim and the merge; the
    others keep their pretrained values, as in the original (which drops them from the vector).
    """
    from .task_arithmetic import combine

    tvs = [TaskVectorView(ft, pretrained, keys) for ft in finetuned]
    return combine(pretrained, tvs, scaling_coef, keys=keys, sparsify=k, consensus=disjoint, trim_extra_zeros=extra_zeros)
