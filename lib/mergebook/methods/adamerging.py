"""AdaMerging and AdaMerging++ (Yang et al., ICLR 2024): entropy-minimised merge coefficients.

Task-wise:  θ = θ_pre + Σ_k λ_k T_k;  layer-wise: θ_l = θ_pre,l + Σ_k λ_{l,k} T_{k,l}  (§3.2.1).
AdaMerging++ replaces T_k by Φ(T_k), Ties-Merging's trimmed, sign-agreeing vector (k = 20%).
λ starts at 0.3, is clamped to [0, 1] in the forward, and follows Adam (lr 1e-3, betas (0.9,
0.999)) on the summed per-task mean entropy of unlabelled test batches (§3.2.2). Defaults are the
AdaMerging code's (500 steps, batch 16, two batches per task per step); ``batches_per_step=1`` is
FusionBench's loop. The engine (merged forward without copies, one backward per step, history)
lives in :mod:`mergebook.adaptation`.

CART++ (Choi et al., "Revisiting weight averaging", Eq. 6) is the same loop over CART's low-rank
centered vectors added to θ_avg; it lives here because it is AdaMerging applied to other vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from ..adaptation import (
    AdaptationResult,
    Granularity,
    MergeSpace,
    adapt_coefficients,
    entropy_objective,
    resolve_device,
)
from ..models.suite import Suite

__all__ = [
    "adamerging",
    "adamerging_space",
    "cart_plus_plus",
    "cart_space",
    "entropy_objective",
    "lazy_task_vectors",
]


def adamerging_space(
    suite: Suite,
    plus_plus: bool = False,
    *,
    ties_k: float = 0.2,
    keys: Sequence[str] | None = None,
    device: str | torch.device | None = "auto",
) -> MergeSpace:
    """θ_pre and the K vectors T_k (or Φ(T_k) for ++) of AdaMerging §3.2.1, stacked for merging."""
    if plus_plus:
        from .ties import ties_task_vectors

        # Φ(T_k): global top-k% trim, elected sign, only agreeing entries kept (Ties, "sum").
        # The trim population follows the profile (suite.meta["ties_extra_zeros"]), as Ties' row does.
        vectors = ties_task_vectors(lazy_task_vectors(suite, keys), k=ties_k, keys=keys,
                                    extra_zeros=int(suite.meta.get("ties_extra_zeros", 0)))
    else:
        vectors = lazy_task_vectors(suite, keys)
    return MergeSpace(suite.pretrained, vectors, device=resolve_device(device))


def lazy_task_vectors(suite: Suite, keys: Sequence[str] | None = None) -> list[Mapping[str, torch.Tensor]]:
    """τ_k = θ_k − θ_pre (AdaMerging §3.1) as views computed key by key (no K full copies)."""
    from .. import statedict

    finetuned = suite.finetuned_list()
    view = getattr(statedict, "TaskVectorView", None)
    if view is None:
        return statedict.task_vectors(suite.pretrained, finetuned, keys=keys)
    statedict.check_compatible(suite.pretrained, finetuned)
    return [view(ft, suite.pretrained, keys) for ft in finetuned]


def adamerging(
    suite: Suite,
    granularity: Granularity = "layer",
    plus_plus: bool = False,
    *,
    steps: int = 500,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    batch_size: int = 16,
    batches_per_step: int = 2,
    init: float = 0.3,
    clamp: bool = True,
    ties_k: float = 0.2,
    keys: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    concat: bool = True,
    autocast_dtype: torch.dtype | None = None,
    coef_every: int = 10,
    eval_every: int = 100,
    progress: bool = True,
) -> AdaptationResult:
    """Task-/layer-wise AdaMerging(++) (Yang et al. 2024, §3.2): adapt λ by entropy minimisation."""
    space = adamerging_space(suite, plus_plus, ties_k=ties_k, keys=keys, device=device)
    name = f"{granularity}_wise_adamerging" + ("_plus_plus" if plus_plus else "")
    config = dict(
        granularity=granularity, plus_plus=plus_plus, steps=steps, lr=lr, betas=betas,
        batch_size=batch_size, batches_per_step=batches_per_step, init=init, clamp=clamp,
        ties_k=ties_k if plus_plus else None, keys=None if keys is None else list(keys), seed=seed,
        device=str(space.device), concat=concat, autocast_dtype=autocast_dtype,
    )
    return adapt_coefficients(
        suite, space, method=name, granularity=granularity, steps=steps, lr=lr, betas=betas,
        batch_size=batch_size, batches_per_step=batches_per_step, init=init, clamp=clamp, seed=seed,
        concat=concat, autocast_dtype=autocast_dtype, coef_every=coef_every,
        eval_every=eval_every, progress=progress, config=config,
    )


def cart_space(
    suite: Suite,
    *,
    ratio: float = 0.12,
    rank: int | None = None,
    matrix_rule: Callable[[str, torch.Tensor], bool] | Sequence[str] | None = None,
    adapt_full: bool = False,
    device: str | torch.device | None = "auto",
) -> MergeSpace:
    """θ_avg and the K low-rank centered vectors of CART (Eq. 4), stacked for Eq. 6's adaptive merge.

    CART truncates only the matrices chosen by ``matrix_rule`` (default: the attention and MLP
    weights, :data:`mergebook.methods.cart.default_matrix_rule`); every other tensor keeps its full
    centered vector, and those sum to zero over tasks, so CART leaves them at θ_avg. With per-task
    coefficients they would no longer cancel, so by default (``adapt_full=False``) they stay at
    θ_avg, as the paper describes ("set to standard weight averaging"), and λ covers only the
    truncated matrices; ``adapt_full=True`` adapts them too.
    """
    from .cart import cart_lowrank_vectors, default_matrix_rule, suffix_rule

    rule = default_matrix_rule if matrix_rule is None else (
        matrix_rule if callable(matrix_rule) else suffix_rule(matrix_rule))
    base, vectors = cart_lowrank_vectors(suite.pretrained, suite.finetuned_list(), ratio=ratio,
                                         rank=rank, matrix_rule=rule)
    keys = list(vectors[0])
    if not adapt_full:
        keys = [k for k in keys if rule(k, suite.pretrained[k])]
        if not keys:
            raise ValueError("the CART matrix rule selects no tensor: nothing for CART++ to adapt")
    # Entries of base outside `keys` pass through: θ_avg for the untruncated tensors.
    return MergeSpace(base, vectors, keys=keys, device=resolve_device(device))


def cart_plus_plus(
    suite: Suite,
    granularity: Granularity = "layer",
    *,
    ratio: float = 0.12,
    rank: int | None = None,
    matrix_rule: Callable[[str, torch.Tensor], bool] | Sequence[str] | None = None,
    steps: int = 500,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    batch_size: int = 16,
    batches_per_step: int = 2,
    init: float = 2.0,
    clamp: bool = False,
    adapt_full: bool = False,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    concat: bool = True,
    autocast_dtype: torch.dtype | None = None,
    coef_every: int = 10,
    eval_every: int = 100,
    progress: bool = True,
) -> AdaptationResult:
    """CART++ (Choi et al., Eq. 6): θ_avg + Σ_k λ_{l,k} lowrank(θ_k − θ_avg), λ adapted as AdaMerging.

    No CART++ code is published. The loop is AdaMerging's (the paper adopts its settings); λ starts
    at CART's own λ (2.0 in its 8-task config), so step 0 is CART, and is not clamped by default
    because [0, 1] would exclude CART's optimum. Both are named options.
    """
    space = cart_space(suite, ratio=ratio, rank=rank, matrix_rule=matrix_rule, adapt_full=adapt_full,
                       device=device)
    config = dict(
        granularity=granularity, ratio=ratio, rank=rank, matrix_rule=matrix_rule, steps=steps, lr=lr, betas=betas,
        batch_size=batch_size, batches_per_step=batches_per_step, init=init, clamp=clamp,
        adapt_full=adapt_full, seed=seed, device=str(space.device), concat=concat,
        autocast_dtype=autocast_dtype,
    )
    return adapt_coefficients(
        suite, space, method=f"{granularity}_wise_cart_plus_plus", granularity=granularity,
        steps=steps, lr=lr, betas=betas, batch_size=batch_size, batches_per_step=batches_per_step,
        init=init, clamp=clamp, seed=seed, concat=concat, autocast_dtype=autocast_dtype,
        coef_every=coef_every, eval_every=eval_every, progress=progress, config=config,
    )
