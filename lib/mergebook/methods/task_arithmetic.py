"""Task arithmetic and its family, as ONE parameterised core: :func:`combine`.

    θ^l = θ_0^l + Σ_k λ_k^l · A(τ_k^l)                       (Concrete subspace, Eq. 16)

* Task Arithmetic (Ilharco et al. 2023; AdaMerging §3.1): θ_0 = θ_pre, A = identity, one λ.
* Task-wise / layer-wise AdaMerging with given coefficients (AdaMerging §3.2.1): λ_k or λ_k^l.
* Ties-Merging (Yadav et al. 2023): A = trim + elect + disjoint merge (``sparsify=k``,
  ``consensus="sum" | "mean" | "max"``), see :mod:`mergebook.methods.ties`.
* Concrete TA (Tang et al. 2023, Alg. 2): A(τ) = τ ⊙ m / mean(m) per tensor (``mask=``).
* Centered task arithmetic (CART, Choi et al. 2024, Eq. 3-4): θ_0 = θ_avg and the vectors are
  (low-rank) θ_t − θ_avg, built by :mod:`mergebook.methods.cart`.
* DARE (Yu et al. 2024): A(τ) = τ ⊙ (1 − m) / (1 − p), m ~ Bernoulli(p) per entry, seeded
  (``drop=p``), before any of the above mergers (:func:`dare_drop`, registered as ``dare``).

Following mergekit's lesson (``merge_methods/generalized_task_arithmetic.py``), these are options
of one function, not copies. :func:`combine` reads task vectors key by key, so it accepts lazy
views (:class:`~mergebook.statedict.TaskVectorView`) and never holds K full vectors at once.
Without ``sparsify``/``consensus`` it is plain differentiable torch: coefficients or a mask that
require grad get gradients (test-time adaptation).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch

from ..statedict import StateDict, TaskVectorView, layer_names
from .registry import MergeError, Param, register
from .ties import DISJOINT_METHODS, TiesStream, _trimmed_stack, merge_agreeing, ties_key, ties_thresholds

__all__ = [
    "combine",
    "mask_and_rescale",
    "task_arithmetic",
    "task_wise",
    "layer_wise",
    "concrete_merge",
    "SCALING_COEF",
    "dare_drop",
    "dare_merge",
]


def mask_and_rescale(tv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """τ ⊙ m / mean(m), the mean over the whole tensor (Concrete subspace, Alg. 2 steps 1-2)."""
    mean = mask.mean()
    # An all-zero mask removes the tensor's task vector (0/0 would be NaN); `where` keeps autograd.
    scale = mask / torch.where(mean > 0, mean, torch.ones_like(mean))
    return tv * scale.to(tv.dtype)


class _MaskedView(Mapping):
    """Task vector seen through a shared Concrete mask: ``key -> mask_and_rescale(τ[key], m[key])``."""

    def __init__(self, tv: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor]):
        self._tv, self._mask = tv, mask

    def __getitem__(self, key: str) -> torch.Tensor:
        return mask_and_rescale(self._tv[key], self._mask[key])

    def __iter__(self):
        return iter(self._tv)

    def __len__(self) -> int:
        return len(self._tv)

    def __contains__(self, key: object) -> bool:
        return key in self._tv


def _drop_seed(seed: int, index: int, key: str) -> int:
    # One stream per (seed, task, key): a view re-reads a key several times (Ties reads it for the
    # threshold and again for the merge) and must drop the same entries each time, in any key order.
    digest = hashlib.blake2b(f"{int(seed)}|{int(index)}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def dare_drop(tv: torch.Tensor, p: float, *, seed: int = 0, index: int = 0, key: str = "",
              rescale: bool = True) -> torch.Tensor:
    """DARE (Yu et al. 2024): τ ⊙ (1 − m) / (1 − p), m ~ Bernoulli(p) per entry, seeded by (seed, index, key)."""
    if not 0.0 <= p < 1.0:
        raise MergeError(f"DARE drop rate p = {p!r} is out of range: use 0 ≤ p < 1 (0.5 in FusionBench; p = 1 "
                         "drops everything and 1/(1 − p) is undefined)")
    if p == 0.0:
        return tv.clone()
    g = torch.Generator(device=tv.device)
    g.manual_seed(_drop_seed(seed, index, key))
    keep = torch.rand(tv.shape, generator=g, device=tv.device) >= p  # P(drop) = P(U < p) = p
    out = tv * keep.to(tv.dtype)
    return out / (1.0 - p) if rescale else out


class _DroppedView(Mapping):
    """Task vector seen through DARE's random drop: ``key -> dare_drop(τ[key], p, seed, index, key)``."""

    def __init__(self, tv: Mapping[str, torch.Tensor], p: float, seed: int, index: int, rescale: bool):
        self._tv, self._p, self._seed, self._index, self._rescale = tv, p, seed, index, rescale

    def __getitem__(self, key: str) -> torch.Tensor:
        return dare_drop(self._tv[key], self._p, seed=self._seed, index=self._index, key=key, rescale=self._rescale)

    def __iter__(self):
        return iter(self._tv)

    def __len__(self) -> int:
        return len(self._tv)

    def __contains__(self, key: object) -> bool:
        return key in self._tv


def _coefficient_mode(coefficients, n_tasks: int, n_layers: int) -> tuple[str, object]:
    """('scalar', λ) | ('task', [K] tensor) | ('layer', [L, K] tensor), or a MergeError."""
    if isinstance(coefficients, (int, float)) and not isinstance(coefficients, bool):
        return "scalar", float(coefficients)
    c = coefficients if isinstance(coefficients, torch.Tensor) else torch.as_tensor(coefficients, dtype=torch.float64)
    if c.dim() == 0:
        return "scalar", c
    if c.dim() == 1:
        if c.shape[0] != n_tasks:
            raise MergeError(f"task-wise coefficients have {c.shape[0]} entries for {n_tasks} task vectors: pass "
                             "one coefficient per fine-tuned model, in the same order")
        return "task", c
    if c.dim() == 2:
        if tuple(c.shape) != (n_layers, n_tasks):
            raise MergeError(f"layer-wise coefficients have shape {tuple(c.shape)} but this model needs "
                             f"[{n_layers}, {n_tasks}]: one row per layer_names(pretrained) entry (one per floating "
                             "tensor, AdaMerging's layers), one column per fine-tuned model")
        return "layer", c
    raise MergeError(f"coefficients must be a number, [K] or [L, K]; got shape {tuple(c.shape)}")


def _participating(base: Mapping[str, torch.Tensor], tvs: Sequence[Mapping[str, torch.Tensor]],
                   keys: Sequence[str] | None) -> list[str]:
    if keys is None:
        return [k for k in layer_names(base) if all(k in tv for tv in tvs)]
    out = list(keys)
    for k in out:
        if k not in base or not base[k].is_floating_point():
            raise MergeError(f"key {k!r} is not a floating tensor of the pretrained state dict: choose keys "
                             "from mergebook.statedict.float_keys(pretrained)")
        for i, tv in enumerate(tvs):
            if k not in tv:
                raise MergeError(f"task vector {i} has no key {k!r}: build the task vectors over the same keys")
    return out


def combine(
    pretrained: Mapping[str, torch.Tensor],
    task_vectors: Sequence[Mapping[str, torch.Tensor]],
    coefficients: float | Sequence[float] | torch.Tensor,
    *,
    keys: Sequence[str] | None = None,
    sparsify: float | None = None,
    consensus: str | None = None,
    mask: Mapping[str, torch.Tensor] | None = None,
    drop: float | None = None,
    drop_seed: int = 0,
    drop_rescale: bool = True,
    trim_extra_zeros: int = 0,
) -> StateDict:
    """θ_0 + Σ_k λ_k^l A(τ_k^l) (Concrete Eq. 16): TA, AdaMerging, Ties, masked and centered TA in one.

    ``pretrained`` is the base point θ_0 (θ_pre, or θ_avg for CART). ``coefficients`` is one λ
    (θ_0 + λ Σ_k τ_k, summed first as task_vectors does), K task-wise λ_k, or an [L, K] layer-wise
    matrix over ``layer_names(pretrained)``. Only ``keys`` (default: every floating key that all
    task vectors hold) receive task vectors; every other entry is copied from the base.

    ``mask`` (a state dict over ``keys``) replaces τ by τ ⊙ m / mean(m) (Concrete Alg. 2).
    ``sparsify=k`` trims each task to its global top-k magnitudes (Ties step 1); ``consensus`` in
    {"sum", "mean", "max"} elects signs and merges only agreeing entries (Ties steps 2-3). These
    two run without autograd; for gradients through Ties use
    :func:`~mergebook.methods.ties.ties_task_vectors` and combine those. ``trim_extra_zeros``
    counts zero entries outside ``keys`` in the trim population (the original's whole-CLIP checkpoints).

    ``drop=p`` applies DARE first: each task vector k becomes τ_k ⊙ (1 − m) / (1 − p) with a
    Bernoulli(p) mask drawn from (``drop_seed``, k, key), so the same call gives the same merge.
    """
    if len(task_vectors) == 0:
        raise MergeError("combine needs at least one task vector")
    if consensus is not None and consensus not in DISJOINT_METHODS:
        raise MergeError(f"consensus {consensus!r} is unknown: use None (plain sum) or one of "
                         f"{', '.join(DISJOINT_METHODS)}")
    if sparsify is not None and not (0 < sparsify <= 1):
        raise MergeError(f"sparsify = {sparsify!r} is out of range: it is the fraction of entries kept per task, "
                         "in (0, 1] (0.2 for Ties' 20%)")
    ks = _participating(pretrained, task_vectors, keys)
    mode, coef = _coefficient_mode(coefficients, len(task_vectors), len(layer_names(pretrained)))
    row_of = {k: i for i, k in enumerate(layer_names(pretrained))} if mode == "layer" else {}
    tvs: Sequence[Mapping[str, torch.Tensor]] = task_vectors
    if mask is not None:
        _check_mask(mask, pretrained, ks)
        tvs = [_MaskedView(tv, mask) for tv in task_vectors]
    if drop is not None:
        if not 0.0 <= drop < 1.0:
            raise MergeError(f"drop = {drop!r} is out of range: DARE's drop rate p lies in [0, 1) (0.5 in FusionBench)")
        tvs = [_DroppedView(tv, drop, drop_seed, i, drop_rescale) for i, tv in enumerate(tvs)]

    def weights(key: str, like: torch.Tensor) -> torch.Tensor:
        c = coef if mode == "task" else coef[row_of[key]]  # type: ignore[index]
        return c.to(device=like.device, dtype=like.dtype)

    key_set = set(ks)
    out: StateDict = {k: v.clone() for k, v in pretrained.items() if k not in key_set}
    ties = sparsify is not None or consensus is not None
    if ties:
        if isinstance(coef, torch.Tensor) and coef.requires_grad:
            raise MergeError("gradients cannot flow through Ties' trim and sign election: precompute "
                             "ties_task_vectors(...) once and combine() those with trainable coefficients "
                             "(that is AdaMerging++)")
        if consensus == "max" and mode != "scalar":
            raise MergeError("consensus='max' keeps one entry per weight, so it takes a single coefficient, "
                             "not task- or layer-wise ones")
        with torch.no_grad():
            thresholds = ties_thresholds(tvs, sparsify, ks, trim_extra_zeros)

            def finish(key: str, delta: torch.Tensor) -> torch.Tensor:
                # delta is a fresh tensor: (λ·δ) + θ in place is bit-identical to θ + λ·δ, one allocation less
                return (delta.mul_(coef) if mode == "scalar" else delta).add_(pretrained[key])

            if consensus is None:  # trim only: Σ_k λ_k trim(τ_k)
                for key in ks:
                    stack = _trimmed_stack(tvs, key, thresholds)
                    _check_shape(pretrained, key, stack[0])
                    if mode == "scalar":
                        delta = stack.sum(dim=0)
                    else:
                        delta = (stack * weights(key, stack).reshape(-1, *([1] * (stack.dim() - 1)))).sum(dim=0)
                    out[key] = finish(key, delta)
            else:
                stream = TiesStream(tvs, ks, thresholds)
                for t in stream:
                    _check_shape(pretrained, t.key, t.trimmed[0])
                    w = None if mode == "scalar" else weights(t.key, t.trimmed)
                    out[t.key] = finish(t.key, merge_agreeing(t, consensus, w))
                for key, idx, cols, sign in stream.patches():
                    # columns whose trimmed values cancel: recompute with the global majority sign
                    w = None if mode == "scalar" else weights(key, cols)
                    d = merge_agreeing(ties_key(cols, sign), consensus, w)
                    base = pretrained[key].reshape(-1)[idx]
                    out[key].view(-1)[idx] = base + coef * d if mode == "scalar" else base + d
        return {k: out[k] for k in pretrained}

    for key in ks:
        base = pretrained[key]
        vecs = [tv[key] for tv in tvs]
        _check_shape(pretrained, key, vecs[0])
        if mode == "scalar":
            acc = vecs[0]
            for v in vecs[1:]:
                acc = acc + v
            c = coef.to(device=acc.device, dtype=acc.dtype) if isinstance(coef, torch.Tensor) else coef
            out[key] = base + c * acc
        else:
            w = weights(key, vecs[0])
            acc = w[0] * vecs[0]
            for i in range(1, len(vecs)):
                acc = acc + w[i] * vecs[i]
            out[key] = base + acc
    return {k: out[k] for k in pretrained}


def _check_shape(pretrained: Mapping[str, torch.Tensor], key: str, v: torch.Tensor) -> None:
    if v.shape != pretrained[key].shape:
        raise MergeError(f"task vector of {key!r} has shape {tuple(v.shape)} but the base tensor has "
                         f"{tuple(pretrained[key].shape)}: the vectors come from another architecture")


def _check_mask(mask: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor], keys: Sequence[str]) -> None:
    for k in keys:
        if k not in mask:
            raise MergeError(f"the mask has no entry for {k!r}: a Concrete mask needs one tensor per merged key "
                             "(pass keys=list(mask) to merge only the masked tensors)")
        m = mask[k]
        if tuple(m.shape) != tuple(base[k].shape):
            raise MergeError(f"mask[{k!r}] has shape {tuple(m.shape)} but the tensor has {tuple(base[k].shape)}: "
                             "the mask must match the task vector element by element")
        md = m.detach()
        if not bool(torch.isfinite(md).all()) or bool((md < 0).any()):
            raise MergeError(f"mask[{k!r}] has negative or non-finite entries: a Concrete mask lies in [0, 1] "
                             "(use sigmoid of the logits, or a sample of the relaxed Bernoulli)")


# ----------------------------------------------------------------------------------------------
# Registered methods

SCALING_COEF = Param("scaling_coef", 0.3, "float",
                     "λ, the scaling coefficient of the summed task vectors (0.3 in AdaMerging/Ties tables); "
                     "beyond ±10 is almost surely a typo (3 for 0.3)", low=-10.0, high=10.0)
KEYS = Param("keys", None, "keys", "state-dict keys that receive task vectors; others keep pretrained values",
             optional=True)
CLAMP = Param("clamp", True, "bool", "clamp coefficients to [0, 1] as AdaMerging's forward does "
              "(FusionBench makes it optional)")


@register("task_arithmetic", summary="θ_pre + λ Σ_k τ_k", url="https://arxiv.org/abs/2212.04089",
          paper="Ilharco et al. 2023, Editing models with task arithmetic (§2); AdaMerging §3.1",
          params=[SCALING_COEF, KEYS])
def task_arithmetic(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                    scaling_coef: float = 0.3, keys: Sequence[str] | None = None) -> StateDict:
    """Task Arithmetic (Ilharco et al. 2023): θ = θ_pre + λ Σ_k (θ_k − θ_pre); λ = 1/K is weight averaging."""
    tvs = [TaskVectorView(ft, pretrained, keys) for ft in finetuned]
    return combine(pretrained, tvs, scaling_coef, keys=keys)


@register("task_wise", summary="θ_pre + Σ_k λ_k τ_k with given λ_k", url="https://arxiv.org/abs/2310.02575",
          paper="Yang et al. 2024, AdaMerging, task-wise form (§3.2.1)",
          params=[Param("coefficients", None, "floats", "λ_k, one per fine-tuned model (e.g. learned by "
                        "AdaMerging)", required=True), CLAMP, KEYS])
def task_wise(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
              coefficients: Sequence[float] | torch.Tensor, clamp: bool = True,
              keys: Sequence[str] | None = None) -> StateDict:
    """Task-wise AdaMerging merge with given λ_k (Yang et al. 2024, §3.2.1): θ_pre + Σ_k λ_k τ_k."""
    c = torch.as_tensor(coefficients)
    tvs = [TaskVectorView(ft, pretrained, keys) for ft in finetuned]
    return combine(pretrained, tvs, c.clamp(0, 1) if clamp else c, keys=keys)


@register("layer_wise", summary="θ_pre^l + Σ_k λ_k^l τ_k^l with a given [L, K] matrix",
          url="https://arxiv.org/abs/2310.02575",
          paper="Yang et al. 2024, AdaMerging, layer-wise form (§3.2.1); one layer per state-dict tensor",
          params=[Param("coefficients", None, "matrix", "[L, K] λ over layer_names(pretrained) × models",
                        required=True), CLAMP])
def layer_wise(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
               coefficients: torch.Tensor, clamp: bool = True) -> StateDict:
    """Layer-wise AdaMerging merge with a given [L, K] matrix (Yang et al. 2024, §3.2.1)."""
    c = torch.as_tensor(coefficients)
    tvs = [TaskVectorView(ft, pretrained) for ft in finetuned]
    return combine(pretrained, tvs, c.clamp(0, 1) if clamp else c)


@register("concrete", summary="θ_pre + λ Σ_k τ_k ⊙ m / mean(m) with a given shared mask",
          url="https://arxiv.org/abs/2312.06173",
          paper="Tang et al. 2023, Concrete subspace learning, Concrete TA (Alg. 2, Eq. 2)",
          params=[Param("mask", None, "statedict", "the mask m (a sample or hard mask) over the merged keys; "
                        "keys it lacks keep pretrained values", required=True),
                  Param("scaling_coef", 0.3, "float", "λ (fixed at 0.3 in Concrete TA)", low=-10.0, high=10.0)])
def concrete_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                   mask: Mapping[str, torch.Tensor], scaling_coef: float = 0.3) -> StateDict:
    """Concrete Task Arithmetic with a given mask (Tang et al. 2023, Alg. 2): θ_pre + λ Σ_k τ_k ⊙ m / mean(m)."""
    keys = [k for k in mask]
    tvs = [TaskVectorView(ft, pretrained, keys) for ft in finetuned]
    return combine(pretrained, tvs, scaling_coef, keys=keys, mask=mask)


_DARE_MERGERS = ("task_arithmetic", "ties")
_DARE_DEFAULT_LAMBDA = {"task_arithmetic": 0.3, "ties": 0.5}  # FusionBench's dare configs


@register("dare", summary="drop each τ entry with prob. p, rescale by 1/(1−p), then Task Arithmetic or Ties",
          url="https://arxiv.org/abs/2311.03099",
          paper="Yu et al. 2024, Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free "
                "Lunch (ICML), DARE: τ ⊙ (1 − m) / (1 − p) then any merger",
          params=[
              Param("p", 0.5, "float", "drop rate: each task-vector entry is zeroed with probability p and the rest "
                    "scaled by 1/(1 − p) (0.5 in FusionBench)", low=0.0, high=1.0, high_open=True),
              Param("merger", "task_arithmetic", "choice", "the merge after the drop: task_arithmetic (θ_pre + λ Σ_k "
                    "τ̃_k) or ties (trim, elect, disjoint merge of the dropped vectors)", choices=_DARE_MERGERS),
              Param("scaling_coef", None, "float", "λ; None: 0.3 with task_arithmetic, 0.5 with ties (FusionBench's "
                    "DARE configs)", low=-10.0, high=10.0, optional=True),
              Param("k", 0.2, "float", "Ties only: fraction kept per task by the magnitude trim", low=0.0, high=1.0,
                    low_open=True),
              Param("disjoint", "sum", "choice", "Ties only: how agreeing entries combine (sum in FusionBench; "
                    "MergeLM's Ties uses mean)", choices=DISJOINT_METHODS),
              Param("seed", 0, "int", "seed of the random drop (one stream per task and tensor)", low=0),
              Param("rescale", True, "bool", "rescale the kept entries by 1/(1 − p) (DARE); false is plain random drop"),
              KEYS,
          ])
def dare_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
               p: float = 0.5, merger: str = "task_arithmetic", scaling_coef: float | None = None, k: float = 0.2,
               disjoint: str = "sum", seed: int = 0, rescale: bool = True,
               keys: Sequence[str] | None = None) -> StateDict:
    """DARE (Yu et al. 2024): τ̃_k = τ_k ⊙ (1 − m_k) / (1 − p), m_k ~ Bernoulli(p), then TA or Ties on τ̃.

    Every floating tensor is dropped (as MergeLM's ``mask_input_with_mask_rate`` on the whole delta),
    not only linear weights. The drop is seeded, so one call always gives the same model.
    """
    lam = _DARE_DEFAULT_LAMBDA[merger] if scaling_coef is None else scaling_coef
    tvs = [TaskVectorView(ft, pretrained, keys) for ft in finetuned]
    if merger == "ties":
        return combine(pretrained, tvs, lam, keys=keys, sparsify=k, consensus=disjoint, drop=p, drop_seed=seed,
                       drop_rescale=rescale)
    return combine(pretrained, tvs, lam, keys=keys, drop=p, drop_seed=seed, drop_rescale=rescale)
