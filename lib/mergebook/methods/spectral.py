"""The spectral successors of CART: TSV-M (Gargiulo et al. 2025) and Iso-C / Iso-CTS (Marczak et al. 2025).

All three work matrix by matrix on the task vectors Δ_t = θ_t − θ_pre and return
θ = θ_pre + α · ΔW, where ΔW is built per matrix from singular vectors and every other tensor is
the mean of the task vectors:

    TSV-M   ΔW = polar([U_1,k … U_T,k]) · diag(Σ_1,k … Σ_T,k) · polar([V_1,k … V_T,k])ᵀ,  k = int(r/T)
    Iso-C   ΔW = mean(σ(M)) · U Vᵀ,   M = Σ_t Δ_t = U Σ Vᵀ
    Iso-CTS ΔW = σ̄ · polar([U_ts,1 … U_ts,T, U_c]) · polar([V_ts,1 … V_ts,T, V_c])ᵀ

(Equation numbers are not cited: the paper texts could not be read here; the formulas are the
authors' code, read line by line.) ``polar(X)`` is the orthogonal polar factor P Qᵀ of X = P S Qᵀ (the nearest matrix with
orthonormal columns, or rows). r = min(m, n).

Facts of the authors' code reproduced here (AntoAndGar/task_singular_vectors
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``; danielm1405/iso-merging
``src/utils/iso.py``; the same code sits in FusionBench 0.2.x):

* **What is a matrix**: every 2-D tensor whose key does not contain ``text_projection``
  (``matrix_set="all_2d"``, :func:`all_2d_rule`). On open_clip's visual tower that is
  ``attn.in_proj_weight`` (Q, K and V stacked: one SVD of the 3d × d matrix), ``attn.out_proj``,
  ``mlp.c_fc``, ``mlp.c_proj`` *and* ``positional_embedding`` and ``proj``. ``matrix_set="cart"``
  restricts it to CART's four per-block matrices so that the two families can be compared on
  one footing. Every other floating tensor (biases, LayerNorms, ``conv1``, ``class_embedding``)
  takes the mean of the task vectors, and α scales it too.
* **TSV-M share of rank**: each task keeps its top ``k = int(r · 1/T)`` singular triplets
  (``share=None``); ``share`` overrides the fraction (``share=1`` is the authors' "lossless"
  variant). The original singular values are kept; only U and V are decorrelated.
* **Iso-C**: the spectrum of the *sum* is replaced by its mean over all r singular values.
* **Iso-CTS sizes**: ``k_c = int(r·f)``, then the task-specific total ``round((r − k_c)/T)·T``
  (Python's round: half to even) and ``k_c = r − that``, ``s = (r − k_c)/T`` per task; for
  r = 768, T = 8, f = 0.8: k_c = 616, s = 19 (:func:`iso_cts_sizes`). Each task's residual is
  projected on the *left* only, (I − U_c U_cᵀ) Δ_t. Every singular value is set to the mean of the
  r kept ones (the common σ of the sum and the task-specific σ of the residuals together).
* **α**: the authors pick it on validation from 0.1, 0.2, …, 3.0 (``linspace(0, 3, 31)[1:]``,
  normalised accuracy); FusionBench fixes 1.0 (its docs run 1.5). Our default is 1.0; chapters
  select it on ``val``.
* The authors compute in float32 on the GPU with ``torch.linalg.svd``; here every SVD runs in the
  tensors' dtype promoted to at least float32, batched over tasks and over matrices of one shape
  (CART's machinery), and the polar factor is taken on the compact concatenation (the authors
  zero-pad it to r columns when r is not divisible by T; the padding only multiplies zero
  singular values, so the product is the same when the blocks are linearly independent).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from ..statedict import StateDict, float_keys
from .cart import (
    _BATCH_ELEMS,
    MatrixRule,
    _as_rule,
    _matrix_keys,
    _unit_shape,
    _unit_vector,
    _units,
    default_matrix_rule,
)
from .registry import MergeError, Param, register

__all__ = [
    "MATRIX_SETS",
    "all_2d_rule",
    "spectral_matrix_rule",
    "polar",
    "tsv_rank",
    "tsv_matrix",
    "iso_c_matrix",
    "iso_cts_sizes",
    "iso_cts_matrix",
    "tsv_merge",
    "iso_c_merge",
    "iso_cts_merge",
]

MATRIX_SETS = ("all_2d", "cart")


def all_2d_rule(key: str, tensor: torch.Tensor) -> bool:
    """The authors' matrix test (TSV-M and Iso): ``len(shape) == 2 and "text_projection" not in key``."""
    return tensor.dim() == 2 and "text_projection" not in key


def spectral_matrix_rule(matrix_set: str = "all_2d", matrix_rule: MatrixRule | Sequence[str] | None = None,
                         method: str = "spectral") -> MatrixRule:
    """The matrix rule of ``matrix_set`` ("all_2d": the authors' test; "cart": CART's four), unless ``matrix_rule``."""
    if matrix_rule is not None:
        return _as_rule(matrix_rule)
    if matrix_set == "all_2d":
        return all_2d_rule
    if matrix_set == "cart":
        return default_matrix_rule
    raise MergeError(f"{method}: matrix_set {matrix_set!r} is unknown: use 'all_2d' (every 2-D tensor but "
                     "text_projection, as the authors' code) or 'cart' (CART's four per-block matrices)")


# ----------------------------------------------------------------------------------------------
# Per-matrix algebra, batched over leading dimensions


def _work(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of x = P S Qᵀ (thin SVD), over the last two dims."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_rank(shape: Sequence[int], n_tasks: int, share: float | None = None) -> int:
    """Triplets kept per task: ``int(r · share)`` with r = min(m, n) and share 1/T by default (the authors' code)."""
    r = min(int(shape[-2]), int(shape[-1]))
    return int(r * ((1.0 / n_tasks) if share is None else share))


def tsv_matrix(deltas: torch.Tensor, share: float | None = None) -> torch.Tensor:
    """TSV-M of one matrix per batch entry: deltas [..., T, m, n] -> ΔW [..., m, n] (TSV-Merge)."""
    *lead, t, m, n = deltas.shape
    k = tsv_rank((m, n), t, share)
    x = _work(deltas)
    if k == 0:
        return torch.zeros(*lead, m, n, dtype=deltas.dtype, device=deltas.device)
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    # task i's top-k triplets fill block i: columns i·k … (i+1)·k − 1 of U_cat, rows of V_catᵀ
    u_cat = u[..., :k].movedim(-3, -2).reshape(*lead, m, t * k)
    s_cat = s[..., :k].reshape(*lead, t * k)
    vh_cat = vh[..., :k, :].reshape(*lead, t * k, n)
    out = (polar(u_cat) * s_cat.unsqueeze(-2)) @ polar(vh_cat)
    return out.to(deltas.dtype)


def iso_c_matrix(deltas: torch.Tensor) -> torch.Tensor:
    """Iso-C of one matrix per batch entry: mean(σ(M)) · U Vᵀ with M = Σ_t Δ_t (Iso-C)."""
    m_sum = _work(deltas).sum(dim=-3)
    u, s, vh = torch.linalg.svd(m_sum, full_matrices=False)
    return (s.mean(dim=-1)[..., None, None] * (u @ vh)).to(deltas.dtype)


def iso_cts_sizes(shape: Sequence[int], n_tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """(k_c, s): common-subspace size and task-specific directions per task, as the authors' code sizes them."""
    r = min(int(shape[-2]), int(shape[-1]))
    k_c = int(r * common_fraction)
    # round() is Python's (half to even), as in iso.py; it keeps T·s + k_c = r
    k_c = r - round((r - k_c) / n_tasks) * n_tasks
    if k_c < 0:
        raise MergeError(f"iso_cts: common_fraction = {common_fraction:g} leaves a common subspace of {k_c} "
                         f"directions for a {shape[-2]}×{shape[-1]} matrix and {n_tasks} tasks (the rounding to a "
                         "multiple of T overshoots the rank): raise common_fraction (0.8 in the paper)")
    return k_c, (r - k_c) // n_tasks


def iso_cts_matrix(deltas: torch.Tensor, common_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS of one matrix per batch entry: deltas [..., T, m, n] -> ΔW [..., m, n] (Iso-CTS)."""
    *lead, t, m, n = deltas.shape
    k_c, s_ts = iso_cts_sizes((m, n), t, common_fraction)
    x = _work(deltas)
    u, s, vh = torch.linalg.svd(x.sum(dim=-3), full_matrices=False)
    u_c, s_c, vh_c = u[..., :k_c], s[..., :k_c], vh[..., :k_c, :]
    # residual of each task outside the common subspace, projected on the left only (as iso.py)
    resid = x - u_c.unsqueeze(-3) @ (u_c.mT.unsqueeze(-3) @ x)
    ur, sr, vhr = torch.linalg.svd(resid, full_matrices=False)
    u_ts = ur[..., :s_ts].movedim(-3, -2).reshape(*lead, m, t * s_ts)
    vh_ts = vhr[..., :s_ts, :].reshape(*lead, t * s_ts, n)
    s_all = torch.cat([sr[..., :s_ts].reshape(*lead, t * s_ts), s_c], dim=-1)
    u_all = polar(torch.cat([u_ts, u_c], dim=-1))
    vh_all = polar(torch.cat([vh_ts, vh_c], dim=-2))
    return (s_all.mean(dim=-1)[..., None, None] * (u_all @ vh_all)).to(deltas.dtype)


# ----------------------------------------------------------------------------------------------
# State-dict level


def _matrix_chunks(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                   units: Sequence[tuple[str, ...]]) -> Iterator[tuple[list[tuple[str, ...]], torch.Tensor]]:
    """Yield (units, [G, T, m, n] task vectors) grouped by shape, in chunks of bounded size (as CART's)."""
    groups: dict[tuple[int, int], list[tuple[str, ...]]] = {}
    for u in units:
        groups.setdefault(_unit_shape(pretrained, u), []).append(u)
    for shape, us in groups.items():
        per_unit = len(finetuned) * shape[0] * shape[1]
        step = max(1, _BATCH_ELEMS // max(1, per_unit))
        for i in range(0, len(us), step):
            chunk = us[i:i + step]
            stack = torch.stack([torch.stack([_unit_vector(ft, pretrained, pretrained, u, False) for ft in finetuned])
                                 for u in chunk])
            yield chunk, stack


def _spectral_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                    per_matrix, scaling_coef: float, matrix_set: str, matrix_rule, stack_qkv: bool,
                    method: str) -> StateDict:
    """θ_pre + α · (per_matrix on the selected matrices; mean task vector elsewhere)."""
    rule = spectral_matrix_rule(matrix_set, matrix_rule, method)
    units = _units(_matrix_keys(pretrained, rule), stack_qkv)
    out: StateDict = {}
    done: set[str] = set()
    with torch.no_grad():
        for chunk, stack in _matrix_chunks(pretrained, finetuned, units):
            merged = per_matrix(stack)  # [G, m, n]
            for unit, dw in zip(chunk, merged.unbind(0)):
                rows = [int(pretrained[k].shape[0]) for k in unit]
                for k, part in zip(unit, dw.split(rows, dim=0)):
                    out[k] = pretrained[k] + scaling_coef * part.to(pretrained[k].dtype)
                    done.add(k)
        n = len(finetuned)
        for k in float_keys(pretrained):
            if k in done:
                continue
            acc = finetuned[0][k] - pretrained[k]
            for ft in finetuned[1:]:
                acc = acc + (ft[k] - pretrained[k])
            out[k] = pretrained[k] + scaling_coef * (acc / n)
    return {k: out[k] if k in out else v.clone() for k, v in pretrained.items()}


_ALPHA = Param("scaling_coef", 1.0, "float", "α on the whole merged task vector (the authors pick it on validation "
               "from 0.1…3.0; FusionBench fixes 1.0)", low=-10.0, high=10.0)
_MATRIX_SET = Param("matrix_set", "all_2d", "choice", "which tensors are merged as matrices: all_2d (every 2-D tensor "
                    "but text_projection, as the authors' code: adds positional_embedding and proj) or cart (CART's "
                    "four per-block matrices); the others take the mean task vector", choices=MATRIX_SETS)
_MATRIX_RULE = Param("matrix_rule", None, "rule", "overrides matrix_set: callable(key, tensor) or key suffixes",
                     optional=True)
_STACK_QKV = Param("stack_qkv", False, "bool", "treat separate q/k/v_proj weights (HF CLIP) as one stacked matrix, "
                   "like open_clip's in_proj_weight")


@register("tsv_m", summary="θ_pre + α · polar(U_cat) Σ_cat polar(V_cat)ᵀ per matrix (top 1/T of each task's rank)",
          url="https://arxiv.org/abs/2412.00081", min_models=1,
          paper="Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging (CVPR), "
                "TSV-Merge: ΔW = polar(U_cat) Σ_cat polar(V_cat)ᵀ",
          params=[_ALPHA,
                  Param("share", None, "float", "fraction of each matrix's rank kept per task, k = int(r·share); "
                        "None: 1/T (the authors' code); 1: their 'lossless' variant", low=0.0, high=1.0,
                        low_open=True, optional=True),
                  _MATRIX_SET, _MATRIX_RULE, _STACK_QKV])
def tsv_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
              scaling_coef: float = 1.0, share: float | None = None, matrix_set: str = "all_2d",
              matrix_rule: MatrixRule | Sequence[str] | None = None, stack_qkv: bool = False) -> StateDict:
    """TSV-M (Gargiulo et al. 2025, TSV-Merge): θ_pre + α ΔW, ΔW = polar(U_cat) Σ_cat polar(V_cat)ᵀ per matrix.

    Each task keeps its top ``k = int(r/T)`` singular triplets; their left and right singular
    vectors are concatenated across tasks and replaced by the orthogonal polar factor (the
    "whitening" that removes the inner products between tasks' singular vectors, i.e. the singular
    task interference), keeping the original singular values. Non-matrix tensors take the mean
    task vector. With one task and full rank it returns θ_pre + α τ exactly.
    """
    return _spectral_merge(pretrained, finetuned, lambda d: tsv_matrix(d, share), scaling_coef, matrix_set,
                           matrix_rule, stack_qkv, "tsv_m")


@register("iso_c", summary="θ_pre + α · mean(σ(Σ_t τ_t)) U Vᵀ per matrix (flat spectrum of the sum)",
          url="https://arxiv.org/abs/2502.04959",
          paper="Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific "
                "Subspaces (ICML), Iso-C: ΔW = mean(σ) U Vᵀ of Σ_t τ_t",
          params=[_ALPHA, _MATRIX_SET, _MATRIX_RULE, _STACK_QKV])
def iso_c_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                scaling_coef: float = 1.0, matrix_set: str = "all_2d",
                matrix_rule: MatrixRule | Sequence[str] | None = None, stack_qkv: bool = False) -> StateDict:
    """Iso-C (Marczak et al. 2025): θ_pre + α · σ̄ U Vᵀ where Σ_t τ_t = U Σ Vᵀ and σ̄ = mean(diag Σ).

    The task-arithmetic sum keeps its singular directions but gets an isotropic (flat) spectrum,
    so directions that few tasks share are no longer drowned by the dominant common ones.
    Non-matrix tensors take the mean task vector.
    """
    return _spectral_merge(pretrained, finetuned, iso_c_matrix, scaling_coef, matrix_set, matrix_rule, stack_qkv,
                           "iso_c")


@register("iso_cts", summary="θ_pre + α · σ̄ polar([U_ts, U_c]) polar([V_ts, V_c])ᵀ per matrix (common + task-specific)",
          url="https://arxiv.org/abs/2502.04959",
          paper="Marczak et al. 2025, No Task Left Behind (ICML), Iso-CTS: common + task-specific subspaces, flat spectrum",
          params=[_ALPHA,
                  Param("common_fraction", 0.8, "float", "f, the share of each matrix's rank given to the common "
                        "subspace of the sum (0.8 in the paper and code); the rest is split equally among tasks",
                        low=0.0, high=1.0),
                  _MATRIX_SET, _MATRIX_RULE, _STACK_QKV])
def iso_cts_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                  scaling_coef: float = 1.0, common_fraction: float = 0.8, matrix_set: str = "all_2d",
                  matrix_rule: MatrixRule | Sequence[str] | None = None, stack_qkv: bool = False) -> StateDict:
    """Iso-CTS (Marczak et al. 2025): Iso-C on a common subspace plus task-specific subspaces.

    The top k_c left/right singular vectors of Σ_t τ_t span the common subspace; each task adds
    the top s singular vectors of its residual (I − U_c U_cᵀ) τ_t. The concatenated U and V are
    orthogonalised by their polar factors and every singular value is set to the mean of the kept
    ones. Non-matrix tensors take the mean task vector.
    """
    return _spectral_merge(pretrained, finetuned, lambda d: iso_cts_matrix(d, common_fraction), scaling_coef,
                           matrix_set, matrix_rule, stack_qkv, "iso_cts")
