"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging models with Fisher-weighted averaging").

    F_k = E_x E_{y ~ p_θk(y|x)} [ (∇_θ log p_θk(y|x))² ]      diagonal Fisher of model k   (Eq. 3)
    θ*  = Σ_k F_k ⊙ θ_k / Σ_k F_k                           per parameter                  (Eq. 2)

The Fisher uses the model's *own* predictive distribution, so no labels are needed: a few hundred
unlabelled images per task. Each example contributes its own squared gradient (per-example, not the
square of a batch gradient). Which label ``y`` (``label=``):

* ``"sample"`` (default): one y ~ softmax(logits) per example, an unbiased one-sample estimate of
  the Fisher of Eq. 3; cost one gradient per example, whatever the number of classes.
* ``"expected"``: the exact expectation Σ_y p(y|x) (∇ log p(y|x))², Matena & Raffel's exact
  Fisher for classification; costs one gradient per example *and class* (397 for SUN397).
* ``"argmax"``: y = the predicted class (the "empirical Fisher with predicted labels" some
  re-implementations use).

FusionBench's CLIP implementation instead squares the gradient of Σ_batch Σ_y √p·log p, which is
not a per-example Fisher; it also *adds* 1e-6 and normalises Fishers by their global L2 norm.
Here the floor is Matena & Raffel's: F ← max(F, floor) (1e-6), and no normalisation.

Per-example gradients come from ``torch.func.vmap(grad(...))`` over chunks of ``batch_size``
examples: peak memory is ``batch_size`` copies of the parameters (lower it at CLIP scale).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..statedict import StateDict, float_keys
from .registry import MergeError, Param, register

__all__ = ["fisher_information", "fisher_merge", "LABEL_MODES"]

LABEL_MODES = ("sample", "expected", "argmax")


def _logits(model: nn.Module, params: Mapping[str, torch.Tensor], head: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    features = functional_call(model, dict(params), (x,))
    return F.normalize(features, dim=-1) @ head.T


def fisher_information(model: nn.Module, params: Mapping[str, torch.Tensor], head: torch.Tensor, images: torch.Tensor,
                       *, num_examples: int = 256, batch_size: int = 32, label: str = "sample",
                       generator: torch.Generator | None = None) -> StateDict:
    """Diagonal Fisher of one model on its unlabelled images (Matena & Raffel 2022, Eq. 3), per floating key."""
    if label not in LABEL_MODES:
        raise MergeError(f"fisher label {label!r} is unknown: use one of {', '.join(LABEL_MODES)}")
    keys = float_keys(params)
    consts = {k: v for k, v in params.items() if k not in set(keys)}
    device = next(iter(params.values())).device
    head = head.to(device)
    x_all = images[:num_examples]
    n = int(x_all.shape[0])
    if n == 0:
        raise MergeError("fisher: a task has no images: pass at least one unlabelled image per task")

    def log_lik(p: dict[str, torch.Tensor], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # w is a one-hot (or weight) vector over classes; indexing by a batched label would not vmap.
        logits = _logits(model, {**p, **consts}, head, x.unsqueeze(0))
        return (F.log_softmax(logits, dim=-1)[0] * w).sum()

    per_example = vmap(grad(log_lik), in_dims=(None, 0, 0))
    p = {k: params[k].detach() for k in keys}
    fisher = {k: torch.zeros_like(p[k]) for k in keys}
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # vmap has no batching rule for CPU flash attention yet and falls back to a loop: same result.
            warnings.filterwarnings("ignore", message=".*batching rule.*")
            for s in range(0, n, batch_size):
                x = x_all[s:s + batch_size].to(device)
                with torch.no_grad():
                    probs = torch.softmax(_logits(model, {**p, **consts}, head, x), dim=-1)
                c = probs.shape[-1]
                if label == "expected":
                    # every (example, class) pair, weighted by p(class | example)
                    xs = x.repeat_interleave(c, dim=0)
                    ws = torch.eye(c, dtype=probs.dtype, device=device).repeat(x.shape[0], 1)
                    weights = probs.reshape(-1)
                else:
                    y = (torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(device)
                         if label == "sample" else probs.argmax(dim=-1))
                    xs, ws, weights = x, F.one_hot(y, c).to(probs.dtype), None
                for t in range(0, xs.shape[0], batch_size):
                    g = per_example(p, xs[t:t + batch_size], ws[t:t + batch_size])
                    for k in keys:
                        sq = g[k].square()
                        if weights is not None:
                            sq = sq * weights[t:t + batch_size].reshape(-1, *([1] * (sq.dim() - 1))).to(sq.dtype)
                        fisher[k] += sq.sum(dim=0)
    finally:
        model.train(was_training)
    return {k: v / n for k, v in fisher.items()}


@register("fisher", summary="Σ_k F_k θ_k / Σ_k F_k with diagonal Fishers from unlabelled data",
          url="https://arxiv.org/abs/2111.09832",
          paper="Matena & Raffel 2022, Merging models with Fisher-weighted averaging, Eq. 2-3",
          inputs=("model", "heads", "data"),
          params=[
              Param("num_examples", 256, "int", "unlabelled images per task for the Fisher", low=1),
              Param("batch_size", 32, "int", "examples per vmap chunk (memory: this many gradient copies)", low=1),
              Param("floor", 1e-6, "float", "F ← max(F, floor), so Σ_k F_k > 0", low=0.0, low_open=True),
              Param("label", "sample", "choice", "y ~ p(y|x) (sample), Σ_y p(y|x) (expected, exact), or argmax",
                    choices=LABEL_MODES),
              Param("seed", 0, "int", "seed of the label sampling", low=0),
          ])
def fisher_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                 model: nn.Module, heads: Sequence[torch.Tensor], data: Sequence[torch.Tensor],
                 num_examples: int = 256, batch_size: int = 32, floor: float = 1e-6, label: str = "sample",
                 seed: int = 0) -> StateDict:
    """Fisher merging (Matena & Raffel 2022, Eq. 2): per parameter Σ_k F_k θ_k / Σ_k F_k."""
    if len(heads) != len(finetuned) or len(data) != len(finetuned):
        raise MergeError(f"fisher needs one head and one image tensor per fine-tuned model: got {len(finetuned)} "
                         f"models, {len(heads)} heads, {len(data)} image tensors (same task order)")
    gen = torch.Generator().manual_seed(seed)
    fishers = [fisher_information(model, ft, h, x, num_examples=num_examples, batch_size=batch_size, label=label,
                                  generator=gen) for ft, h, x in zip(finetuned, heads, data)]
    return merge_with_fishers(pretrained, finetuned, fishers, floor=floor)


def merge_with_fishers(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                       fishers: Sequence[Mapping[str, torch.Tensor]], *, floor: float = 1e-6) -> StateDict:
    """θ* = Σ_k max(F_k, floor) θ_k / Σ_k max(F_k, floor) per floating key (Matena & Raffel Eq. 2)."""
    out: StateDict = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            out[key] = base.clone()
            continue
        if any(key not in f for f in fishers):
            raise MergeError(f"no Fisher for {key!r}: compute Fishers over every floating key of the state dict")
        num = den = None
        for ft, f in zip(finetuned, fishers):
            w = f[key].clamp_min(floor).to(ft[key].dtype)
            num = w * ft[key] if num is None else num + w * ft[key]
            den = w if den is None else den + w
        out[key] = num / den
    return out
