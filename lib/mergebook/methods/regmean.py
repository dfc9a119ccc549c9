"""RegMean (Jin et al., ICLR 2023, "Dataless knowledge fusion by merging weights of language models").

For every linear map y = W x (``nn.Linear`` weight is [out, in]) RegMean solves
min_W Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖², whose closed form is

    Wᵀ = (Σ_k G_k)⁻¹ Σ_k G_k W_kᵀ,    G_k = X_kᵀ X_k / N_k                         (Eq. 2-3)

with X_k the inputs of that layer on task k's data, through task k's own fine-tuned model. The
off-diagonal entries of each G_k are scaled by α (0.95 here; Jin et al. §3.3 "reducing
non-diagonal elements"), which regularises towards plain averaging (α = 0 is averaging for
that layer). Biases and every non-linear parameter are averaged. As in FusionBench, each Gram is
the mean over all rows (tokens × examples) of that task. The solve runs in float64 with
``torch.linalg.solve`` instead of forming the inverse.

Layer inputs are captured with forward-pre-hooks on every ``nn.Linear`` and on every module that
owns an ``in_proj_weight`` (the fused QKV of CLIP's attention / ``nn.MultiheadAttention``: its
input is the attention block's input; for ``nn.MultiheadAttention`` the ``query``, i.e.
self-attention is assumed).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..statedict import StateDict
from .registry import MergeError, Param, register

__all__ = ["linear_inputs", "gram_matrices", "regmean_merge", "merge_with_grams", "reduce_off_diagonal"]


def linear_inputs(model: nn.Module) -> dict[str, nn.Module]:
    """State-dict key of each linear weight -> the module whose forward input multiplies it."""
    out: dict[str, nn.Module] = {}
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(mod, nn.Linear):
            out[prefix + "weight"] = mod
        elif isinstance(getattr(mod, "in_proj_weight", None), torch.Tensor):
            out[prefix + "in_proj_weight"] = mod
    return out


def gram_matrices(model: nn.Module, params: Mapping[str, torch.Tensor], images: torch.Tensor, *,
                  num_examples: int = 256, batch_size: int = 64) -> dict[str, torch.Tensor]:
    """G = XᵀX / N (float64) of the inputs of every linear map, through ``params`` (Jin et al. 2023, Eq. 3)."""
    targets = linear_inputs(model)
    if not targets:
        raise MergeError("regmean found no linear layer (nn.Linear or a module with in_proj_weight) in the model")
    device = next(iter(params.values())).device
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}
    handles = []

    def hook_for(key: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("query", kwargs.get("input"))
            x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
            g = x.T @ x
            sums[key] = g if key not in sums else sums[key] + g
            rows[key] = rows.get(key, 0) + x.shape[0]
        return hook

    for key, mod in targets.items():
        handles.append(mod.register_forward_pre_hook(hook_for(key), with_kwargs=True))
    x_all = images[:num_examples]
    if x_all.shape[0] == 0:
        raise MergeError("regmean: a task has no images: pass at least one unlabelled image per task")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, x_all.shape[0], batch_size):
                functional_call(model, dict(params), (x_all[s:s + batch_size].to(device),))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {k: sums[k] / rows[k] for k in sums}


def reduce_off_diagonal(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """α·G + (1 − α)·diag(G): off-diagonal entries scaled by α, diagonal kept (Jin et al. §3.3)."""
    return alpha * g + (1.0 - alpha) * torch.diag_embed(torch.diagonal(g, dim1=-2, dim2=-1))


def merge_with_grams(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                     grams: Sequence[Mapping[str, torch.Tensor]], *, alpha: float = 0.95) -> StateDict:
    """RegMean closed form per linear weight (Eq. 3); every other floating tensor is averaged."""
    out: StateDict = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            out[key] = base.clone()
            continue
        if all(key in g for g in grams):
            gs = [reduce_off_diagonal(g[key], alpha) for g in grams]
            lhs = sum(gs[1:], gs[0])
            rhs = sum((gk @ ft[key].to(torch.float64).T for gk, ft in zip(gs[1:], finetuned[1:])),
                      gs[0] @ finetuned[0][key].to(torch.float64).T)
            try:
                wt = torch.linalg.solve(lhs, rhs)
            except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
                raise MergeError(f"regmean: the summed Gram matrix of {key!r} is singular ({e}): use alpha < 1 or "
                                 "more (and more varied) examples") from None
            out[key] = wt.T.to(base.dtype).contiguous()
        else:
            acc = finetuned[0][key]
            for ft in finetuned[1:]:
                acc = acc + ft[key]
            out[key] = acc / len(finetuned)
    return out


@register("regmean", summary="per linear layer (Σ G_k)⁻¹ Σ G_k W_k from unlabelled data; others averaged",
          url="https://arxiv.org/abs/2212.09849",
          paper="Jin et al. 2023, Dataless knowledge fusion by merging weights of language models, Eq. 3",
          inputs=("model", "data"),
          params=[
              Param("num_examples", 256, "int", "unlabelled images per task for the Gram matrices", low=1),
              Param("batch_size", 64, "int", "images per forward pass", low=1),
              Param("alpha", 0.95, "float", "scale of the Grams' off-diagonal entries (1 = exact least squares, "
                    "0 = averaging)", low=0.0, high=1.0),
          ])
def regmean_merge(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], *,
                  model: nn.Module, data: Sequence[torch.Tensor], num_examples: int = 256, batch_size: int = 64,
                  alpha: float = 0.95) -> StateDict:
    """RegMean (Jin et al. 2023, Eq. 3): Wᵀ = (Σ_k G_k)⁻¹ Σ_k G_k W_kᵀ per linear layer, α-reduced Grams."""
    if len(data) != len(finetuned):
        raise MergeError(f"regmean needs one image tensor per fine-tuned model: got {len(finetuned)} models and "
                         f"{len(data)} image tensors (same task order)")
    grams = [gram_matrices(model, ft, x, num_examples=num_examples, batch_size=batch_size)
             for ft, x in zip(finetuned, data)]
    return merge_with_grams(pretrained, finetuned, grams, alpha=alpha)
