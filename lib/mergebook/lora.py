"""LoRA adapters as task vectors: read peft adapters safely, densify them, or merge them factored.

A peft LoRA adapter on a linear module with weight W ∈ R^{out×in} stores A ∈ R^{r×in} and
B ∈ R^{out×r}; the adapted weight is W + s·B·A with s = α/r (α/√r with rsLoRA). Its task vector
is therefore ΔW = s·B·A on every targeted module and zero elsewhere (Concrete paper, Sec. 4.2:
the Flan-T5 models are LoRA fine-tuned with r = 16, α = 32).

Which merges can stay factored. Any merge that is *linear in the task vectors with one coefficient
per task and module* is exact on the factors: Σ_k λ_k s_k B_k A_k = [λ_1 s_1 B_1 | … | λ_K s_K B_K]
· [A_1; …; A_K], a LoRA of rank Σ_k r_k (:func:`factored_merge`). That covers weight averaging,
task arithmetic, task-wise and layer-wise coefficients (so AdaMerging's λ search). Methods that act
on individual entries or spectra of ΔW (Ties trim/elect, the Concrete mask, DARE, CART and the
spectral family) need the dense ΔW (:func:`densify`), which is what the book's Suites hold.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]

__all__ = [
    "FACTORED_METHODS", "LoraAdapter", "LoraError", "densify", "factored_merge", "hide_broken_torchvision",
    "lora_delta", "read_adapter", "apply_adapter", "check_adapter", "adapter_from_state_dict",
]

# Registered merge methods that are exact on the factors (see the module docstring).
FACTORED_METHODS = ("weight_averaging", "task_arithmetic", "task_wise", "layer_wise")


class LoraError(ValueError):
    """An adapter that cannot be used as asked; the message names the problem and the fix."""


def hide_broken_torchvision() -> None:
    """Make ``transformers`` skip an installed torchvision whose compiled ops cannot load.

    A torchvision wheel built for another torch (e.g. a CUDA build beside a CPU torch) fails on
    import, and transformers imports it for any model class. Text models never need it, so when
    its ``_C`` extension does not load we hide the package before transformers looks for it.
    """
    if "transformers" in sys.modules or "torchvision" in sys.modules:
        return
    import importlib.util

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    lib = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    if lib is None:
        return
    try:
        torch.ops.load_library(str(lib))
    except (OSError, RuntimeError):
        sys.modules["torchvision"] = None  # type: ignore[assignment]  # find_spec now says "absent"


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float, fan_in_fan_out: bool = False) -> torch.Tensor:
    """ΔW = scaling · B · A (transposed for Conv1D-style ``fan_in_fan_out`` weights)."""
    d = (b.to(torch.float32) @ a.to(torch.float32)) * scaling
    return d.T if fan_in_fan_out else d


@dataclass
class LoraAdapter:
    """One adapter: its peft config and the (A, B) factors of every targeted base weight key."""

    config: dict
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]  # base key ("...query.weight") -> (A, B)
    name: str = ""
    extra: StateDict = field(default_factory=dict)  # modules_to_save etc., copied verbatim

    @property
    def rank(self) -> int:
        """The configured r."""
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        """s = α / r (α / √r with rsLoRA), as peft applies it."""
        r, alpha = self.rank, float(self.config.get("lora_alpha", self.rank))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


_FACTOR = re.compile(r"^(?:base_model\.model\.)?(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


def adapter_from_state_dict(config: Mapping, tensors: Mapping[str, torch.Tensor], name: str = "") -> LoraAdapter:
    """A :class:`LoraAdapter` from peft's saved keys (``base_model.model.<module>.lora_A.weight``)."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise LoraError(f"{name or 'adapter'}: peft_type is {config.get('peft_type')!r}, not LORA; "
                        "only LoRA adapters can be turned into task vectors here")
    if "r" not in config:
        raise LoraError(f"{name or 'adapter'}: its config has no 'r'; is this a peft adapter_config.json?")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    extra: StateDict = {}
    for k, v in tensors.items():
        m = _FACTOR.match(k)
        if m is None:
            extra[k] = v
            continue
        parts.setdefault(m["mod"] + ".weight", {})[m["ab"]] = v
    if not parts:
        raise LoraError(f"{name or 'adapter'}: no lora_A/lora_B tensors among its {len(tensors)} keys")
    factors = {}
    r = int(config["r"])
    for key, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise LoraError(f"{name or 'adapter'}: {key} has only lora_{''.join(ab)}; the adapter file is incomplete")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise LoraError(f"{name or 'adapter'}: {key}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
                            "do not chain (A is [r, in], B is [out, r])")
        if a.shape[0] != r and not config.get("rank_pattern"):
            raise LoraError(f"{name or 'adapter'}: {key} has rank {a.shape[0]} but the config says r = {r}; "
                            "the config and the weights come from different adapters (mismatched r)")
        factors[key] = (a, b)
    return LoraAdapter(dict(config), factors, name, extra)


def read_adapter(path: str | os.PathLike) -> LoraAdapter:
    """Read a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``)."""
    from safetensors.torch import load_file

    p = Path(path)
    cfg = p / "adapter_config.json"
    weights = p / "adapter_model.safetensors"
    if not cfg.is_file():
        raise LoraError(f"{p}: no adapter_config.json; pass a directory written by peft's save_pretrained")
    if not weights.is_file():
        pickled = p / "adapter_model.bin"
        hint = (" It has adapter_model.bin, a pickle, which this library never loads: convert it with "
                "peft in a trusted environment (save_pretrained(..., safe_serialization=True)).") if pickled.exists() else ""
        raise LoraError(f"{p}: no adapter_model.safetensors.{hint}")
    return adapter_from_state_dict(json.loads(cfg.read_text()), load_file(str(weights)), name=p.name)


def check_adapter(adapter: LoraAdapter, base: Mapping[str, torch.Tensor], base_name: str | None = None) -> None:
    """Raise :class:`LoraError` unless every factor pair fits a weight of ``base`` (and its name)."""
    want = adapter.config.get("base_model_name_or_path")
    if base_name and want and _short(want) != _short(base_name):
        raise LoraError(f"adapter {adapter.name!r} was trained on {want!r}, not on {base_name!r}: "
                        "load the base model it names, or the adapters made for this base")
    fan = bool(adapter.config.get("fan_in_fan_out"))
    for key, (a, b) in adapter.factors.items():
        if key not in base:
            raise LoraError(f"adapter {adapter.name!r} targets {key!r}, which the base model does not have "
                            f"(base keys look like {next(iter(base))!r}): it is an adapter for another architecture")
        w = base[key]
        out_f, in_f = (w.shape[1], w.shape[0]) if fan else (w.shape[0], w.shape[-1])
        if a.shape[1] != in_f or b.shape[0] != out_f:
            raise LoraError(f"adapter {adapter.name!r}: {key}: ΔW would be {b.shape[0]}×{a.shape[1]} but the base "
                            f"weight is {tuple(w.shape)}: the adapter is for another model size")


def _short(name: str) -> str:
    return str(name).rstrip("/").split("/")[-1].lower()


def densify(adapter: LoraAdapter, base: Mapping[str, torch.Tensor] | None = None) -> StateDict:
    """ΔW = s·B·A for every targeted key (float32; checked against ``base`` when given)."""
    if base is not None:
        check_adapter(adapter, base)
    fan = bool(adapter.config.get("fan_in_fan_out"))
    return {k: lora_delta(a, b, adapter.scaling, fan) for k, (a, b) in adapter.factors.items()}


def apply_adapter(base: Mapping[str, torch.Tensor], adapter: LoraAdapter, keys: Sequence[str] | None = None) -> StateDict:
    """The fine-tuned weights θ_pre + ΔW, restricted to ``keys`` (default: the targeted keys)."""
    delta = densify(adapter, base)
    keys = list(keys) if keys is not None else list(delta)
    return {k: (base[k].to(torch.float32) + delta[k]).to(base[k].dtype) if k in delta else base[k].clone()
            for k in keys}


def factored_merge(
    adapters: Sequence[LoraAdapter], coefficients: Sequence[float] | torch.Tensor | Mapping[str, Sequence[float]],
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exact factored Σ_k λ_k s_k B_k A_k per key: (A_cat [Σr, in], B_cat [out, Σr]); B_cat·A_cat = ΔW.

    ``coefficients``: one λ per adapter (task arithmetic; 1/K is weight averaging), or a mapping
    key -> one λ per adapter (layer-wise). Every adapter must target the same keys.
    """
    if not adapters:
        raise LoraError("factored_merge needs at least one adapter")
    keys = list(adapters[0].factors)
    for ad in adapters[1:]:
        if set(ad.factors) != set(keys):
            diff = sorted(set(ad.factors) ^ set(keys))[:3]
            raise LoraError(f"adapter {ad.name!r} targets other modules than {adapters[0].name!r} (e.g. {diff}); "
                            "densify them and merge the dense task vectors instead")
    out = {}
    for key in keys:
        lam = coefficients[key] if isinstance(coefficients, Mapping) else coefficients
        lam = [float(x) for x in (lam.tolist() if isinstance(lam, torch.Tensor) else lam)]
        if len(lam) != len(adapters):
            raise LoraError(f"{len(lam)} coefficients for {len(adapters)} adapters at {key}")
        a_cat = torch.cat([ad.factors[key][0].to(torch.float32) for ad in adapters], 0)
        b_cat = torch.cat([ad.factors[key][1].to(torch.float32) * (l * ad.scaling)
                           for l, ad in zip(lam, adapters)], 1)
        out[key] = (a_cat, b_cat)
    return out
