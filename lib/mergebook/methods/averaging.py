"""Weight averaging: the mean of the fine-tuned weights.

    θ_avg = (1/K) Σ_k θ_k = θ_pre + (1/K) Σ_k τ_k          (CART, Choi et al. 2024, Eq. 1 and 3)

The baseline row of every table (Wortsman et al. 2022, "Model soups"; AdaMerging Table 1).
Non-floating tensors are copied from the pretrained state dict.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..statedict import StateDict
from .registry import register

__all__ = ["weight_averaging"]


@register("weight_averaging", summary="(1/K) Σ_k θ_k", url="https://arxiv.org/abs/2203.05482",
          paper="Wortsman et al. 2022, Model soups; CART (Choi et al. 2024) Eq. 1")
def weight_averaging(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """Weight averaging (CART Eq. 1): θ = (1/K) Σ_k θ_k for every floating tensor."""
    out: StateDict = {}
    n = len(finetuned)
    for key, base in pretrained.items():
        if not base.is_floating_point():
            out[key] = base.clone()
            continue
        acc = finetuned[0][key]
        for ft in finetuned[1:]:
            acc = acc + ft[key]
        out[key] = acc / n
    return out
