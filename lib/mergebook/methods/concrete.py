"""Concrete subspace learning (Tang et al., 2023): a shared, meta-learned Concrete mask.

One logit x per element of every task-vector tensor, shared by all tasks, starting at 0 (p = 0.5).
Each step draws a fresh binary-Concrete (relaxed Bernoulli) sample at temperature 0.5 (Eq. 6) and
masks every task vector as τ ⊙ m / mean(m), the mean taken per tensor (Eq. 2). Then:

* Concrete Task Arithmetic (Alg. 1 with a fixed λ = 0.3, then Alg. 2): only the logits are trained,
  Adam lr 1e-3, 2000 steps, one batch of 16 per task, summed entropy.
* Concrete AdaMerging (Alg. 1 with AdaMerging as the fusion algorithm, then Alg. 3): first-order
  meta-learning for 2000 steps (inner Adam step on λ at lr 1, its state kept across steps; outer
  Adam step on the logits at lr 1e-3 with a new sample and a new batch), then 1000 steps of
  AdaMerging (lr 1e-3, λ reset to 0.3) with one frozen mask sample.

Evaluation uses a soft sample by default, as the reported numbers do; ``eval_mask="hard"``
thresholds a sample at 0.5, as the paper's binarisation (§3.3) and the code's ``binary_mask``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch

from ..adaptation import (
    AdaptationResult,
    Granularity,
    MergeSpace,
    Recorder,
    StateDict,
    TaskStreams,
    adapt_coefficients,
    block_of,
    check_schedule,
    clamp_coefficients,
    derived_generator,
    entropy_objective,
    home_weights,
    init_coefficients,
    resolve_device,
    suite_on,
)
from ..models.suite import Suite

MaskMode = Literal["soft", "hard"]

__all__ = [
    "ConcreteMask",
    "concrete_adamerging",
    "concrete_sample",
    "concrete_task_arithmetic",
    "hard_mask",
    "mask_statistics",
    "rescale_mask",
]


def concrete_sample(
    logits: torch.Tensor, temperature: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """m = σ((x + log u − log(1−u)) / T), u ~ U(0, 1): a binary Concrete sample (Concrete Eq. 6)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    # Same guard as torch.distributions' clamp_probs: log(0) would give ±inf and NaN gradients.
    eps = torch.finfo(logits.dtype).eps
    u = u.clamp(eps, 1.0 - eps)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def hard_mask(sample: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Binarise a Concrete sample: 1 where it exceeds ``threshold`` (Concrete §3.3)."""
    return (sample > threshold).to(sample.dtype)


def rescale_mask(mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """m / mean(m), the rescaling of Concrete Eq. 2 (mean over ``dim``; all elements when None)."""
    mean = mask.mean() if dim is None else mask.mean(dim=dim, keepdim=True)
    # An all-zero hard mask keeps nothing; guard the 0/0 instead of producing NaN weights.
    return mask / mean.clamp_min(torch.finfo(mask.dtype).tiny)


class ConcreteMask:
    """Mask logits shaped like a MergeSpace's groups (one per element), with sampling (Concrete §3.3)."""

    def __init__(self, space: MergeSpace, init: float = 0.0, temperature: float = 0.5):
        self.space = space
        self.temperature = temperature
        self.logits = [z.fill_(init).requires_grad_(True) for z in space.group_zeros()]

    def sample(self, generator: torch.Generator | None = None, mode: MaskMode = "soft") -> list[torch.Tensor]:
        """A fresh mask sample per group (differentiable in the logits when soft)."""
        soft = [concrete_sample(x, self.temperature, generator) for x in self.logits]
        return soft if mode == "soft" else [hard_mask(s.detach()) for s in soft]

    @staticmethod
    def scales(mask: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """m / mean(m) per tensor (each row of a group is one tensor), Concrete Eq. 2."""
        return [rescale_mask(m, dim=1) for m in mask]

    def named_logits(self) -> StateDict:
        """The logits as one named tensor per key (detached copies)."""
        return {k: v.detach().clone() for k, v in self.space.ungroup(self.logits).items()}


def mask_statistics(
    logits: Mapping[str, torch.Tensor], sample: Mapping[str, torch.Tensor] | None = None
) -> dict[str, Any]:
    """Fraction kept (p > 0.5), mean p, and (given a sample) its kept fraction: per tensor, block, all."""
    per_tensor: dict[str, dict[str, float]] = {}
    blocks: dict[str, list[float]] = {}
    total = [0.0, 0.0, 0.0, 0]
    for k, x in logits.items():
        x = x.detach().double()
        n = x.numel()
        kept = (x > 0).sum().item()  # p = σ(x) > 0.5
        mean_p = torch.sigmoid(x).sum().item()
        s_kept = float((sample[k].detach() > 0.5).sum().item()) if sample is not None else 0.0
        row = {"kept": kept / n, "mean_p": mean_p / n, "numel": n}
        if sample is not None:
            row["sample_kept"] = s_kept / n
        per_tensor[k] = row
        b = blocks.setdefault(block_of(k), [0.0, 0.0, 0.0, 0])
        for acc in (b, total):
            acc[0] += kept
            acc[1] += mean_p
            acc[2] += s_kept
            acc[3] += n

    def summary(acc: list[float]) -> dict[str, float]:
        out = {"kept": acc[0] / acc[3], "mean_p": acc[1] / acc[3], "numel": int(acc[3])}
        if sample is not None:
            out["sample_kept"] = acc[2] / acc[3]
        return out

    return {
        "per_tensor": per_tensor,
        "per_block": {b: summary(acc) for b, acc in blocks.items()},
        "overall": summary(total),
    }


def _kept_fraction(mask: ConcreteMask) -> torch.Tensor:
    """Share of logits above 0 (p > 0.5), as a 0-dim tensor (no device sync)."""
    n = sum(x.numel() for x in mask.logits)
    return sum((x.detach() > 0).sum() for x in mask.logits).double() / n


def _task_vector_space(suite: Suite, keys: Sequence[str] | None, device: torch.device) -> MergeSpace:
    from .adamerging import lazy_task_vectors

    return MergeSpace(suite.pretrained, lazy_task_vectors(suite, keys), device=device)


def concrete_task_arithmetic(
    suite: Suite,
    *,
    steps: int = 2000,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    scaling: float = 0.3,
    temperature: float = 0.5,
    init_logits: float = 0.0,
    batch_size: int = 16,
    batches_per_step: int = 1,
    eval_mask: MaskMode = "soft",
    keys: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    concat: bool = True,
    autocast_dtype: torch.dtype | None = None,
    coef_every: int = 10,
    eval_every: int = 100,
    progress: bool = True,
) -> AdaptationResult:
    """Concrete TA (Tang et al. 2023, Alg. 1 with fixed λ, then Alg. 2): learn the shared mask only."""
    check_schedule("concrete_task_arithmetic", lrs={"lr": lr}, steps={"steps": steps},
                   at_least_one={"batch_size": batch_size, "batches_per_step": batches_per_step})
    t0 = time.perf_counter()
    dev = resolve_device(device)
    space = _task_vector_space(suite, keys, dev)
    streams = TaskStreams([suite.unlabeled(t) for t in suite.tasks], batch_size, seed, dev)
    heads = [suite.heads[t].to(dev) for t in suite.tasks]
    mask = ConcreteMask(space, init_logits, temperature)
    train_gen = derived_generator(seed, "concrete/train", dev)
    eval_gen = derived_generator(seed, "concrete/eval", dev)  # evaluation never shifts training draws
    optimizer = torch.optim.Adam(mask.logits, lr=lr, betas=betas)
    lam = torch.full((space.num_tasks,), scaling, device=dev, dtype=space.dtype)
    with torch.no_grad():
        # λ is fixed, so Σ_k λ τ_k is computed once; each step only rescales it by the new mask.
        deltas = space.deltas(lam)

    # The kept mask has its own stream, so it does not depend on how often the run evaluated.
    final_gen = derived_generator(seed, "concrete/final", dev)
    drawn: list[list[torch.Tensor]] = []

    def eval_weights(final: bool = False) -> StateDict:
        with torch.no_grad():
            drawn[:] = [mask.sample(final_gen if final else eval_gen, eval_mask)]
            return space.assemble(deltas, mask.scales(drawn[0]))

    rec = Recorder(suite, steps, coef_every=coef_every, eval_every=eval_every, progress=progress,
                   desc="concrete_task_arithmetic", eval_suite=suite_on(suite, dev))
    rec.snapshot(0, None, lambda: eval_weights(final=steps == 0))
    for step in range(1, steps + 1):
        scales = mask.scales(mask.sample(train_gen))
        params = space.assemble(deltas, scales)
        loss, per_task = entropy_objective(
            suite.model, params, heads, streams.step(batches_per_step),
            concat=concat, autocast_dtype=autocast_dtype,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rec.log(loss, per_task, kept=_kept_fraction(mask))
        rec.snapshot(step, None, lambda: eval_weights(final=step == steps))
    history = rec.close()
    # The last snapshot (always taken at the final step) drew the mask the result keeps, so the
    # final accuracy in the history is that of result.state_dict().
    final_sample = drawn[0]
    with torch.no_grad():
        final = space.assemble(deltas, mask.scales(final_sample))
    config = dict(
        steps=steps, lr=lr, betas=betas, scaling=scaling, temperature=temperature,
        init_logits=init_logits, batch_size=batch_size, batches_per_step=batches_per_step,
        eval_mask=eval_mask, keys=None if keys is None else list(keys), seed=seed, device=str(dev),
        concat=concat, autocast_dtype=autocast_dtype,
    )
    result = AdaptationResult(
        method="concrete_task_arithmetic", tasks=list(suite.tasks), keys=list(space.keys),
        granularity="none", coefficients=lam.cpu(), history=history, config=config,
        mask_logits=home_weights(suite, mask.named_logits()),
        mask_sample=home_weights(suite, space.ungroup(final_sample)),
        mask_stats=mask_statistics(mask.named_logits(), space.ungroup(final_sample)),
        accuracy=dict(history.accuracy[-1]), seconds=time.perf_counter() - t0,
        _weights=home_weights(suite, final),
    )
    return result


def concrete_adamerging(
    suite: Suite,
    granularity: Granularity = "layer",
    *,
    meta_steps: int = 2000,
    tta_steps: int = 1000,
    inner_lr: float = 1.0,
    outer_lr: float = 1e-3,
    tta_lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    init: float = 0.3,
    clamp: bool = True,
    temperature: float = 0.5,
    init_logits: float = 0.0,
    inner_point: Literal["previous", "reset"] = "previous",
    batch_size: int = 16,
    batches_per_step: int = 1,
    eval_mask: MaskMode = "soft",
    keys: Sequence[str] | None = None,
    seed: int = 0,
    device: str | torch.device | None = "auto",
    concat: bool = True,
    autocast_dtype: torch.dtype | None = None,
    coef_every: int = 10,
    eval_every: int = 100,
    progress: bool = True,
) -> AdaptationResult:
    """Concrete AdaMerging (Tang et al. 2023, Alg. 1 first-order meta-learning, then Alg. 3 TTA).

    Each meta step resets λ to ``init``, takes one inner Adam step on λ (lr ``inner_lr``, state
    kept across steps) with a detached mask sample, re-merges with λ' (detached: first order) and a
    new sample, and takes an outer Adam step on the logits with a new batch. ``inner_point``: where
    the inner gradient is taken. ``"previous"`` (default) is what the released code computes: the
    merged weights were built at the end of the previous step, so the loss is evaluated at the
    previous λ' (clamped) and the gradient, unclamped, is applied to λ reset to ``init``.
    ``"reset"`` evaluates it at the reset λ, as Algorithm 1 reads. Then one sample is frozen
    (``eval_mask``) and λ, reset, is adapted for ``tta_steps`` as in AdaMerging.
    """
    check_schedule("concrete_adamerging", lrs={"inner_lr": inner_lr, "outer_lr": outer_lr, "tta_lr": tta_lr},
                   steps={"meta_steps": meta_steps, "tta_steps": tta_steps},
                   at_least_one={"batch_size": batch_size, "batches_per_step": batches_per_step})
    t0 = time.perf_counter()
    dev = resolve_device(device)
    space = _task_vector_space(suite, keys, dev)
    streams = TaskStreams([suite.unlabeled(t) for t in suite.tasks], batch_size, seed, dev)
    heads = [suite.heads[t].to(dev) for t in suite.tasks]
    mask = ConcreteMask(space, init_logits, temperature)
    train_gen = derived_generator(seed, "concrete/train", dev)
    eval_gen = derived_generator(seed, "concrete/eval", dev)
    lam = init_coefficients(space, granularity, init)
    inner_opt = torch.optim.Adam([lam], lr=inner_lr, betas=betas)
    outer_opt = torch.optim.Adam(mask.logits, lr=outer_lr, betas=betas)
    previous = lam.detach().clone()  # λ' of the previous step (init before the first)

    def current() -> torch.Tensor:
        return clamp_coefficients(lam.detach(), clamp)

    def eval_weights() -> StateDict:
        with torch.no_grad():
            return space.merge(current(), mask.scales(mask.sample(eval_gen, eval_mask)))

    def objective(params: StateDict) -> tuple[torch.Tensor, torch.Tensor]:
        return entropy_objective(suite.model, params, heads, streams.step(batches_per_step),
                                 concat=concat, autocast_dtype=autocast_dtype)

    rec = Recorder(suite, meta_steps, coef_every=coef_every, eval_every=eval_every,
                   progress=progress, desc="concrete_adamerging/meta", eval_suite=suite_on(suite, dev))
    rec.snapshot(0, current, eval_weights)
    for step in range(1, meta_steps + 1):
        # Inner (w): λ reset, one Adam step; the mask is a constant here (detached sample).
        with torch.no_grad():
            lam.fill_(init)
            inner_scales = mask.scales(mask.sample(train_gen))
        if inner_point == "previous":
            # Value of the previous λ' (clamped), gradient passed straight to the reset λ.
            coef = clamp_coefficients(previous, clamp) + (lam - lam.detach())
        elif inner_point == "reset":
            coef = clamp_coefficients(lam, clamp)
        else:
            raise ValueError(f"inner_point must be 'previous' or 'reset', got {inner_point!r}")
        inner_loss, _ = objective(space.merge(coef, inner_scales))
        inner_opt.zero_grad(set_to_none=True)
        inner_loss.backward()
        inner_opt.step()
        previous = lam.detach().clone()
        # Outer (x): first order, so λ' enters as a constant; a new sample and a new batch.
        scales = mask.scales(mask.sample(train_gen))
        loss, per_task = objective(space.merge(current(), scales))
        outer_opt.zero_grad(set_to_none=True)
        loss.backward()
        outer_opt.step()
        rec.log(loss, per_task, inner_entropy=inner_loss.detach(), kept=_kept_fraction(mask))
        rec.snapshot(step, current, eval_weights)
    meta_history = rec.close()

    # Alg. 3: freeze one sample of the learned mask, reset λ, run AdaMerging with it. Its own
    # stream, so the frozen mask does not depend on how often the meta phase evaluated.
    with torch.no_grad():
        frozen = mask.sample(derived_generator(seed, "concrete/final", dev), eval_mask)
    frozen_scales = mask.scales(frozen)
    config = dict(
        granularity=granularity, meta_steps=meta_steps, tta_steps=tta_steps, inner_lr=inner_lr,
        outer_lr=outer_lr, tta_lr=tta_lr, betas=betas, init=init, clamp=clamp,
        temperature=temperature, init_logits=init_logits, inner_point=inner_point,
        batch_size=batch_size, batches_per_step=batches_per_step, eval_mask=eval_mask,
        keys=None if keys is None else list(keys), seed=seed, device=str(dev), concat=concat,
        autocast_dtype=autocast_dtype,
    )
    result = adapt_coefficients(
        suite, space, method=f"{granularity}_wise_concrete_adamerging", granularity=granularity,
        steps=tta_steps, lr=tta_lr, betas=betas, batch_size=batch_size,
        batches_per_step=batches_per_step, init=init, clamp=clamp, scales=frozen_scales, seed=seed,
        concat=concat, autocast_dtype=autocast_dtype, coef_every=coef_every,
        eval_every=eval_every, progress=progress, streams=streams, config=config,
    )
    result.phases = {"meta": meta_history}
    result.mask_logits = home_weights(suite, mask.named_logits())
    result.mask_sample = home_weights(suite, space.ungroup(frozen))
    result.mask_stats = mask_statistics(result.mask_logits, space.ungroup(frozen))
    result.seconds = time.perf_counter() - t0
    return result


def remerge(suite: Suite, result: AdaptationResult, mask: Literal["sample", "hard", "none"] = "hard",
            device: str | torch.device | None = "auto") -> StateDict:
    """A Concrete result's merge rebuilt with another mask, at its final λ (soft sample vs hard mask).

    ``"sample"`` is the frozen sample the result keeps (its own weights), ``"hard"`` the hard mask
    of the learned logits (keep where p = σ(x) > 0.5), ``"none"`` no mask at all; each rescaled by
    m / mean(m) per tensor (Concrete Eq. 2) as in training.
    """
    if result.mask_logits is None:
        raise ValueError("remerge: this result has no mask logits (not a Concrete run, or loaded without tensors)")
    dev = resolve_device(device)
    space = _task_vector_space(suite, result.keys or None, dev)
    if mask == "none":
        scales = None
    elif mask in ("sample", "hard"):
        src = result.mask_sample if mask == "sample" else result.mask_logits
        if src is None:
            raise ValueError(f"remerge: this result keeps no {'mask sample' if mask == 'sample' else 'logits'}")
        named = {k: v.to(dev) for k, v in src.items()}
        grouped = space.regroup(named)
        m = grouped if mask == "sample" else [(x > 0).to(space.dtype) for x in grouped]
        scales = ConcreteMask.scales(m)
    else:
        raise ValueError(f"remerge: mask must be 'sample', 'hard' or 'none', got {mask!r}")
    with torch.no_grad():
        return home_weights(suite, space.merge(result.coefficients.to(dev, space.dtype), scales))
