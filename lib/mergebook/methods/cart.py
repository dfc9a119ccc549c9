"""CART: centered arithmetic with rank-reduced task vectors (Choi et al. 2024, "Revisiting weight averaging").

    θ_avg = θ_pre + (1/T) Σ_t τ_t                                             (Eq. 1, 3)
    θ     = θ_avg + λ Σ_t SVD_r(θ_t − θ_avg)                                  (Eq. 4)
    θ_t   = θ_avg + SVD_r(θ_t − θ_avg)            (routing, one task at a time, Eq. 5)

Facts of the original code (JH-GEECS/CART, ``src/merging.py``) reproduced here:

* Only the attention and MLP weight matrices are truncated: ``attn.in_proj_weight`` (Q, K and V
  stacked: ONE SVD of the 3d × d matrix), ``attn.out_proj.weight``, ``mlp.c_fc.weight``,
  ``mlp.c_proj.weight``. The code's test is ``("attn" in key or "mlp" in key) and not ("ln" in key
  or "bias" in key)``, which selects exactly these four in a CLIP visual tower
  (:func:`original_cart_rule`); the default here names them explicitly (:data:`CLIP_MATRIX_SUFFIXES`).
* Each keeps rank ``r = max(1, int(ratio · min(m, n)))`` of ``svd(full_matrices=False)``; ratio 0
  zeroes every vector (θ = θ_avg) and ratio 1 keeps everything.
* Every other tensor keeps its full centered vector; those sum to zero over tasks, so it ends at θ_avg.
* The 8-task ViT-B/32 config (``configs/CART/ViT-b-32_8_CART.yaml``) uses λ (``prior``) = 2.0 and
  ``initial_rank_ratio`` = 0.12: these are the defaults. (The paper's text says about 8%.)

The truncation is batched by matrix shape and runs on the tensors' device. ``method="gram"``
(default) takes the top singular subspace from ``eigh`` of the float64 Gram matrix on the smaller
side (AᵀA or AAᵀ) and projects A onto it; that is the same rank-r approximation as the SVD
(Eckart–Young), 3× faster on CPU and, in float64, more accurate than the original's float32 SVD
(relative difference ≈ 1e-8 to a float64 SVD on random matrices vs ≈ 1e-5 for float32 SVD).
``method="gram32"`` does the same in float32 (error ≈ 1e-5, like the original's float32 SVD; for
GPUs with slow float64 such as Colab's T4). ``method="svd"`` calls ``torch.linalg.svd`` as the
original does. On 2 busy CPU cores, 8 tasks at ViT-B/32 shapes: ``gram`` 66 s against ≈ 570 s for
the original's one-matrix-at-a-time SVD loop (``benchmarks/cart.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..statedict import StateDict, float_keys
from .registry import MergeError, Param, register

__all__ = [
    "CLIP_MATRIX_SUFFIXES",
    "MatrixRule",
    "default_matrix_rule",
    "original_cart_rule",
    "suffix_rule",
    "rank_for",
    "lowrank",
    "centered_vectors",
    "cart_lowrank_vectors",
    "cart_merge",
    "cart_route",
    "singular_values",
    "cumulative_energy",
    "QKV_SUFFIXES",
]

CLIP_MATRIX_SUFFIXES: tuple[str, ...] = (
    "attn.in_proj_weight",
    "attn.out_proj.weight",
    "mlp.c_fc.weight",
    "mlp.c_proj.weight",
)

MatrixRule = Callable[[str, torch.Tensor], bool]

# Largest number of matrix entries decomposed in one batched call (bounds the float64 copies).
_BATCH_ELEMS = 1 << 25


def suffix_rule(suffixes: Sequence[str]) -> MatrixRule:
    """A matrix rule selecting 2-D tensors whose key ends with one of ``suffixes``."""
    suf = tuple(suffixes)

    def rule(key: str, tensor: torch.Tensor) -> bool:
        return tensor.dim() == 2 and key.endswith(suf)

    rule.suffixes = suf  # type: ignore[attr-defined]
    return rule


default_matrix_rule: MatrixRule = suffix_rule(CLIP_MATRIX_SUFFIXES)
default_matrix_rule.__doc__ = "CART's truncated matrices in a CLIP visual tower (in_proj, out_proj, c_fc, c_proj)."


def original_cart_rule(key: str, tensor: torch.Tensor) -> bool:
    """The string test of JH-GEECS/CART: ``("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)``."""
    return ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)


def _as_rule(rule: MatrixRule | Sequence[str] | None) -> MatrixRule:
    if rule is None:
        return default_matrix_rule
    if callable(rule):
        return rule
    return suffix_rule(rule)


def rank_for(shape: Sequence[int], ratio: float | None = 0.12, rank: int | None = None) -> int:
    """Rank kept for an m × n matrix: ``rank`` if given, else ``max(1, int(ratio·min(m, n)))`` (0 at ratio 0)."""
    full = min(int(shape[-2]), int(shape[-1]))
    if rank is not None:
        if rank < 0 or rank > full:
            raise MergeError(f"CART rank = {rank} is out of range for a {shape[-2]}×{shape[-1]} matrix: use 0 ≤ rank "
                             f"≤ {full} (or ratio= for a fraction of each matrix's rank)")
        return int(rank)
    if ratio is None or not (0.0 <= ratio <= 1.0):
        raise MergeError(f"CART ratio = {ratio!r} is out of range: use a fraction of the rank in [0, 1] (0.12 in the "
                         "8-task ViT-B/32 config)")
    if ratio == 0.0:
        return 0  # the original zeroes every vector at ratio 0
    if ratio == 1.0:
        return full
    return max(1, int(ratio * full))


def lowrank(a: torch.Tensor, rank: int, *, reverse: bool = False, method: str = "gram",
            driver: str | None = None) -> torch.Tensor:
    """Rank-``rank`` truncation of ``a`` [..., m, n] keeping the top (or, ``reverse``, the lowest) singular directions."""
    m, n = a.shape[-2:]
    full = min(m, n)
    if not 0 <= rank <= full:
        raise MergeError(f"rank {rank} is out of range for {m}×{n} matrices: use 0..{full}")
    if rank == 0:
        return torch.zeros_like(a)
    if rank == full:
        return a.clone()  # the full-rank reconstruction is the matrix itself (exactly, not up to rounding)
    if method == "svd":
        u, s, vh = torch.linalg.svd(a, full_matrices=False, driver=driver)
        sel = slice(full - rank, full) if reverse else slice(0, rank)
        return (u[..., :, sel] * s[..., None, sel]) @ vh[..., sel, :]
    if method not in ("gram", "gram32"):
        raise MergeError(f"CART method {method!r} is unknown: use 'gram', 'gram32' or 'svd'")
    x = a.to(torch.float64 if method == "gram" else torch.promote_types(a.dtype, torch.float32))
    tall = m >= n
    g = x.mT @ x if tall else x @ x.mT  # Gram matrix on the smaller side
    _, vecs = torch.linalg.eigh(g)  # eigenvalues ascending
    p = vecs[..., :, :rank] if reverse else vecs[..., :, full - rank:]
    out = (x @ p) @ p.mT if tall else p @ (p.mT @ x)
    return out.to(a.dtype)


def _rule_name(rule: MatrixRule) -> str:
    suf = getattr(rule, "suffixes", None)
    return f"key suffixes {list(suf)}" if suf else getattr(rule, "__name__", repr(rule))


def _matrix_keys(pretrained: Mapping[str, torch.Tensor], rule: MatrixRule) -> list[str]:
    keys = []
    for k in float_keys(pretrained):
        t = pretrained[k]
        if rule(k, t):
            if t.dim() != 2:
                raise MergeError(f"the CART matrix rule selected {k!r} of shape {tuple(t.shape)}, which is not a matrix: "
                                 "restrict the rule to 2-D weights")
            keys.append(k)
    if not keys:
        # Never a silent no-op: a rule written for another layout would leave every matrix at θ_avg.
        from ..layout import is_clip_layout

        found = is_clip_layout(pretrained)
        raise MergeError(
            f"the matrix rule ({_rule_name(rule)}) matches no key of these weights "
            f"({'layout ' + found if found else 'not a known CLIP layout'}; first keys {list(pretrained)[:3]}). "
            "The layouts this library knows are open_clip's visual tower (canonical: attn.in_proj_weight, "
            "attn.out_proj.weight, mlp.c_fc.weight, mlp.c_proj.weight) and transformers' CLIP vision tower "
            "(converted to the canonical layout before merging). Pass matrix_rule= naming this model's 2-D weights")
    return keys


def _average(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """θ_avg = θ_pre + (1/T) Σ_t τ_t, computed as the original (coefficient times the summed vectors)."""
    out: StateDict = {}
    coeff = 1.0 / len(finetuned)
    for k, p in pretrained.items():
        if not p.is_floating_point():
            out[k] = p.clone()
            continue
        acc = finetuned[0][k] - p
        for ft in finetuned[1:]:
            acc = acc + (ft[k] - p)
        out[k] = p + coeff * acc
    return out


def _vector(ft: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor],
            key: str, centered: bool) -> torch.Tensor:
    tau = ft[key] - pretrained[key]
    # The original forms θ_t − θ_avg as (τ_t + θ_pre) − θ_avg; kept for bit-level fidelity.
    return (tau + pretrained[key]) - base[key] if centered else tau


def centered_vectors(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                     keys: Sequence[str] | None = None) -> tuple[StateDict, list[StateDict]]:
    """(θ_avg, [θ_t − θ_avg]) over ``keys`` (CART Eq. 3): the vectors sum to zero over tasks."""
    base = _average(pretrained, finetuned)
    ks = float_keys(pretrained) if keys is None else list(keys)
    return base, [{k: _vector(ft, pretrained, base, k, True) for k in ks} for ft in finetuned]


QKV_SUFFIXES = ("q_proj.weight", "k_proj.weight", "v_proj.weight")


def _units(mkeys: Sequence[str], stack_qkv: bool) -> list[tuple[str, ...]]:
    """Truncation units: single matrices, or (q, k, v) stacked like open_clip's ``in_proj_weight``.

    Triples are grouped by prefix whatever order the keys come in (safetensors sorts ``k_proj``
    before ``q_proj``); each unit is always ordered q, k, v, as open_clip stacks them.
    """
    if not stack_qkv:
        return [(k,) for k in mkeys]
    present = set(mkeys)
    grouped: set[str] = set()
    units: list[tuple[str, ...]] = []
    for k in mkeys:
        if k in grouped:
            continue
        suf = next((q for q in QKV_SUFFIXES if k.endswith(q)), None)
        if suf is None:
            units.append((k,))
            continue
        prefix = k[: -len(suf)]
        unit = tuple(prefix + q for q in QKV_SUFFIXES)
        if not all(u in present for u in unit):
            raise MergeError(f"stack_qkv: {k!r} has no complete q/k/v triple ({', '.join(QKV_SUFFIXES)}) under its "
                             "prefix; include all three in the matrix rule, or set stack_qkv=False")
        units.append(unit)
        grouped.update(unit)
    return units


def _unit_name(unit: tuple[str, ...]) -> str:
    return unit[0] if len(unit) == 1 else unit[0][: -len(QKV_SUFFIXES[0])] + "qkv_proj.weight"


def _unit_shape(pretrained: Mapping[str, torch.Tensor], unit: tuple[str, ...]) -> tuple[int, int]:
    return sum(int(pretrained[k].shape[0]) for k in unit), int(pretrained[unit[0]].shape[1])


def _unit_vector(ft, pretrained, base, unit: tuple[str, ...], centered: bool) -> torch.Tensor:
    vs = [_vector(ft, pretrained, base, k, centered) for k in unit]
    return vs[0] if len(vs) == 1 else torch.cat(vs, dim=0)


def _truncated(pretrained, finetuned, base, units, tasks, ranks, *, centered, reverse, method, driver):
    """Yield (key, [lowrank vector per task in `tasks`]) with SVDs batched by shape and rank."""
    groups: dict[tuple, list[tuple[str, ...]]] = {}
    for u in units:
        groups.setdefault((_unit_shape(pretrained, u), ranks[u]), []).append(u)
    for (shape, r), us in groups.items():
        per_unit = len(tasks) * shape[0] * shape[1]
        step = max(1, _BATCH_ELEMS // max(1, per_unit))
        for i in range(0, len(us), step):
            chunk = us[i:i + step]
            stack = torch.stack([_unit_vector(finetuned[t], pretrained, base, u, centered) for u in chunk for t in tasks])
            low = lowrank(stack, r, reverse=reverse, method=method, driver=driver)
            for j, u in enumerate(chunk):
                per_task = low[j * len(tasks):(j + 1) * len(tasks)]
                rows = [int(pretrained[k].shape[0]) for k in u]
                for k, part in zip(u, per_task.split(rows, dim=1)):
                    yield k, list(part.unbind(0)) if len(u) == 1 else [p.contiguous() for p in part.unbind(0)]


def _prepare(pretrained, finetuned, ratio, rank, centered, matrix_rule, stack_qkv):
    rule = _as_rule(matrix_rule)
    units = _units(_matrix_keys(pretrained, rule), stack_qkv)
    ranks = {u: rank_for(_unit_shape(pretrained, u), ratio, rank) for u in units}
    # ratio 0 (or rank 0) means "no task vector at all" in the original: every vector is zeroed.
    nothing = (rank == 0) if rank is not None else (ratio == 0.0)
    base = _average(pretrained, finetuned) if centered else {k: v.clone() for k, v in pretrained.items()}
    matrix_keys = {k for u in units for k in u}
    return units, ranks, matrix_keys, nothing, base


def cart_lowrank_vectors(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                         ratio: float = 0.12, rank: int | None = None, reverse: bool = False, centered: bool = True,
                         matrix_rule: MatrixRule | Sequence[str] | None = None, stack_qkv: bool = False,
                         method: str = "gram", driver: str | None = None) -> tuple[StateDict, list[StateDict]]:
    """(base, [v_t]) of CART Eq. 4: θ_avg and SVD_r(θ_t − θ_avg) (θ_pre and SVD_r(τ_t) if not ``centered``).

    Matrices selected by ``matrix_rule`` are truncated to ``rank`` (or ``ratio`` of their rank);
    every other floating tensor keeps its full vector. ``reverse`` keeps the lowest singular
    directions instead (CART Fig. 2). ``stack_qkv`` truncates separate ``q_proj``/``k_proj``/
    ``v_proj`` weights (HF CLIP) as ONE stacked matrix, like the original's ``in_proj_weight``.
    The merged model is ``combine(base, vectors, λ)``; CART++ adapts per-task / per-layer
    coefficients over these vectors (Eq. 6).
    """
    units, ranks, matrix_keys, nothing, base = _prepare(pretrained, finetuned, ratio, rank, centered, matrix_rule,
                                                        stack_qkv)
    keys = float_keys(pretrained)
    vectors: list[StateDict] = [{} for _ in finetuned]
    tasks = list(range(len(finetuned)))
    low: dict[str, list[torch.Tensor]] = {}
    if not nothing:
        low = dict(_truncated(pretrained, finetuned, base, units, tasks, ranks, centered=centered,
                              reverse=reverse, method=method, driver=driver))
    for k in keys:
        for t, ft in enumerate(finetuned):
            if nothing:
                vectors[t][k] = torch.zeros_like(pretrained[k])
            elif k in low:
                vectors[t][k] = low[k][t]
            else:
                vectors[t][k] = _vector(ft, pretrained, base, k, centered)
    return base, vectors


_CART_PARAMS = [
    Param("scaling_coef", 2.0, "float", "λ on the summed low-rank vectors (the original's `prior`; 2.0 in the "
          "8-task ViT-B/32 config)", low=-10.0, high=10.0),
    Param("ratio", 0.12, "float", "fraction of each matrix's rank kept, r = max(1, int(ratio·min(m, n))); 0 gives "
          "θ_avg", low=0.0, high=1.0),
    Param("rank", None, "int", "absolute rank kept per matrix (overrides ratio); 0 gives θ_avg", low=0, optional=True),
    Param("reverse", False, "bool", "keep the LOWEST singular directions instead (CART Fig. 2)"),
    Param("centered", True, "bool", "truncate θ_t − θ_avg (CART); false truncates τ_t = θ_t − θ_pre around θ_pre"),
    Param("matrix_rule", CLIP_MATRIX_SUFFIXES, "rule", "which matrices are truncated: callable(key, tensor) or key "
          "suffixes (None: the CLIP default); others keep their full vector", optional=True),
    Param("stack_qkv", False, "bool", "truncate separate q/k/v_proj weights (HF CLIP) as one stacked matrix, like the "
          "original's in_proj_weight"),
    Param("method", "gram", "choice", "eigh of the float64 Gram matrix (gram), of the float32 one (gram32: as "
          "accurate as the original's float32 SVD, for GPUs with slow float64), or torch.linalg.svd as the original",
          choices=("gram", "gram32", "svd")),
]


@register("cart", summary="θ_avg + λ Σ_t SVD_r(θ_t − θ_avg)", url="https://arxiv.org/abs/2411.12164",
          paper="Choi et al. 2024, Revisiting weight averaging for model merging (CART), Eq. 4",
          params=_CART_PARAMS)
def cart_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
               scaling_coef: float = 2.0, ratio: float = 0.12, rank: int | None = None, reverse: bool = False,
               centered: bool = True, matrix_rule: MatrixRule | Sequence[str] | None = None, stack_qkv: bool = False,
               method: str = "gram") -> StateDict:
    """CART (Choi et al. 2024, Eq. 4): θ_avg + λ Σ_t SVD_r(θ_t − θ_avg) over the attention/MLP matrices."""
    units, ranks, matrix_keys, nothing, base = _prepare(pretrained, finetuned, ratio, rank, centered, matrix_rule,
                                                        stack_qkv)
    if nothing:
        return base
    tasks = list(range(len(finetuned)))
    out: StateDict = dict(base)
    # Streams key by key (never all T low-rank vectors at once): θ_avg + λ (v_1 + … + v_T).
    for k, vs in _truncated(pretrained, finetuned, base, units, tasks, ranks, centered=centered,
                            reverse=reverse, method=method, driver=None):
        acc = vs[0]
        for v in vs[1:]:
            acc = acc + v
        out[k] = base[k] + scaling_coef * acc
    for k in float_keys(pretrained):
        if k in matrix_keys:
            continue
        acc = _vector(finetuned[0], pretrained, base, k, centered)
        for ft in finetuned[1:]:
            acc = acc + _vector(ft, pretrained, base, k, centered)
        out[k] = base[k] + scaling_coef * acc
    return {k: out[k] for k in pretrained}


def cart_route(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
               task_index: int, *, coefficient: float = 1.0, ratio: float = 0.12, rank: int | None = None,
               reverse: bool = False, centered: bool = True, matrix_rule: MatrixRule | Sequence[str] | None = None,
               stack_qkv: bool = False, method: str = "gram") -> StateDict:
    """CART routing (Eq. 5): θ_avg + c · SVD_r(θ_t − θ_avg) for one task t (θ_pre + c · SVD_r(τ_t) if not centered)."""
    if not 0 <= task_index < len(finetuned):
        raise MergeError(f"task_index {task_index} is out of range for {len(finetuned)} fine-tuned models: use "
                         f"0..{len(finetuned) - 1}")
    units, ranks, matrix_keys, nothing, base = _prepare(pretrained, finetuned, ratio, rank, centered, matrix_rule,
                                                        stack_qkv)
    if nothing:
        return base
    out: StateDict = dict(base)
    for k, (v,) in _truncated(pretrained, finetuned, base, units, [task_index], ranks, centered=centered,
                              reverse=reverse, method=method, driver=None):
        out[k] = base[k] + coefficient * v
    for k in float_keys(pretrained):
        if k not in matrix_keys:
            out[k] = base[k] + coefficient * _vector(finetuned[task_index], pretrained, base, k, centered)
    return {k: out[k] for k in pretrained}


def singular_values(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                    centered: bool = True, matrix_rule: MatrixRule | Sequence[str] | None = None,
                    stack_qkv: bool = False) -> dict[str, torch.Tensor]:
    """Per matrix, the [T, min(m, n)] singular values (descending) of θ_t − θ_avg (or τ_t): CART Fig. 1-3's spectra.

    With ``stack_qkv`` a stacked q/k/v unit is reported under ``<prefix>qkv_proj.weight``.
    """
    units = _units(_matrix_keys(pretrained, _as_rule(matrix_rule)), stack_qkv)
    base = _average(pretrained, finetuned) if centered else pretrained
    out: dict[str, torch.Tensor] = {}
    for u in units:
        stack = torch.stack([_unit_vector(ft, pretrained, base, u, centered) for ft in finetuned])
        out[_unit_name(u)] = torch.linalg.svdvals(stack.to(torch.float64)).to(stack.dtype)
    return out


def cumulative_energy(s: torch.Tensor) -> torch.Tensor:
    """Share of Σσ² captured by the top-r singular values, r = 1..n, along the last dim."""
    e = s.to(torch.float64) ** 2
    return (torch.cumsum(e, dim=-1) / e.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)).to(s.dtype)
