"""The method registry: ``merge("ties", pretrained, finetuned, k=0.2)`` and friends.

Each merge method is a plain function ``fn(pretrained, finetuned, **params) -> StateDict``
registered with its name, paper and equation, and a typed list of :class:`Param` (default, valid
range, one-line meaning). Registration wraps the function so that a direct call and a call through
:func:`merge` run the same checks: at least two fine-tuned models, compatible and finite
checkpoints, known parameters, values in range, and the data-dependent inputs (model, heads, data)
for the methods that need them. Every failure is one :class:`MergeError` (a ``ValueError``) that
names the problem and the fix. (Pattern after mergekit's ``merge_methods/registry.py``.)
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..statedict import StateDict, check_compatible

__all__ = ["MergeError", "Param", "MethodSpec", "METHODS", "register", "merge", "list_methods", "describe", "method_spec"]


class MergeError(ValueError):
    """A merge cannot run as asked: the message names the method, the problem and the fix."""


_KINDS = {"float", "int", "bool", "choice", "keys", "floats", "matrix", "statedict", "rule", "object"}


@dataclass(frozen=True)
class Param:
    """One parameter of a merge method: its default, valid range and meaning."""

    name: str
    default: Any
    kind: str
    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple = ()
    optional: bool = False  # None is a valid value
    required: bool = False  # no default: the caller must pass it

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown Param kind {self.kind!r}; use one of {sorted(_KINDS)}")

    def range_text(self) -> str:
        """The valid values in words, e.g. ``(0, 1]`` or ``one of sum, mean, max``."""
        if self.kind == "choice":
            return "one of " + ", ".join(map(str, self.choices))
        if self.kind == "bool":
            return "true or false"
        if self.low is not None or self.high is not None:
            lo = "-inf" if self.low is None else f"{self.low:g}"
            hi = "inf" if self.high is None else f"{self.high:g}"
            text = f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"
            return text + (" or none" if self.optional else "")
        return {
            "keys": "list of state-dict keys, or none for every floating tensor",
            "floats": "one number per fine-tuned model",
            "matrix": "[L, K] array: one row per layer_names(pretrained), one column per model",
            "statedict": "state dict (or a .safetensors path) with the keys and shapes of the task vectors",
            "rule": "callable(key, tensor) -> bool, or a list of key suffixes",
            "object": "any",
            "int": "integer" + (" or none" if self.optional else ""),
            "float": "number",
        }[self.kind]

    def check(self, method: str, value: Any) -> Any:
        """``value`` coerced to this parameter's type, or a :class:`MergeError` naming the fix."""
        where = f"{method}: parameter {self.name!r}"
        if value is None:
            if self.optional:
                return None
            raise MergeError(f"{where} must be given ({self.range_text()}); it cannot be None")
        k = self.kind
        if k in ("float", "int"):
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if isinstance(value, np.generic):
                value = value.item()
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise MergeError(f"{where} must be a number in {self.range_text()}, got {value!r}")
            if k == "int":
                if float(value) != int(value):
                    raise MergeError(f"{where} must be an integer in {self.range_text()}, got {value!r}")
                value = int(value)
            else:
                value = float(value)
            if not math.isfinite(value):
                raise MergeError(f"{where} must be finite, got {value!r}")
            too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
            too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
            if too_low or too_high:
                raise MergeError(f"{where} = {value:g} is out of range: use a value in {self.range_text()}. "
                                 f"{self.doc}")
            return value
        if k == "bool":
            if isinstance(value, (bool, np.bool_)):
                return bool(value)
            raise MergeError(f"{where} must be true or false, got {value!r}")
        if k == "choice":
            if value in self.choices:
                return value
            raise MergeError(f"{where} = {value!r} is not valid: use {self.range_text()}")
        if k == "keys":
            if isinstance(value, str):
                value = [s for s in (p.strip() for p in value.split(",")) if s]
            if not isinstance(value, Sequence) or not all(isinstance(s, str) for s in value):
                raise MergeError(f"{where} must be a list of state-dict keys, got {type(value).__name__}")
            if len(value) == 0:
                raise MergeError(f"{where} is empty: pass None for every floating tensor, or at least one key")
            return list(value)
        if k in ("floats", "matrix"):
            if isinstance(value, str):
                raise MergeError(f"{where} must be numbers, got the string {value!r}")
            try:
                t = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value, dtype=np.float64))
            except (TypeError, ValueError) as e:
                raise MergeError(f"{where} must be numbers ({self.range_text()}): {e}") from None
            want = 1 if k == "floats" else 2
            if t.dim() != want:
                raise MergeError(f"{where} must be {want}-D ({self.range_text()}), got shape {tuple(t.shape)}")
            if not bool(torch.isfinite(t.detach()).all()):
                raise MergeError(f"{where} contains NaN or inf: pass finite coefficients")
            return t
        if k == "statedict":
            if isinstance(value, (str, bytes)) or hasattr(value, "__fspath__"):
                from ..statedict import load_state_dict

                return load_state_dict(value)
            if not isinstance(value, Mapping):
                raise MergeError(f"{where} must be a state dict or a path to one, got {type(value).__name__}")
            return value
        if k == "rule":
            if callable(value):
                return value
            if isinstance(value, str):
                value = [s for s in (p.strip() for p in value.split(",")) if s]
            if isinstance(value, Sequence) and value and all(isinstance(s, str) for s in value):
                return tuple(value)
            raise MergeError(f"{where} must be a callable(key, tensor) -> bool or a list of key suffixes")
        return value


@dataclass(frozen=True)
class MethodSpec:
    """A registered merge method: function, paper, parameters and required data inputs."""

    name: str
    fn: Callable[..., StateDict]
    summary: str
    paper: str
    params: tuple[Param, ...] = ()
    inputs: tuple[str, ...] = ()
    url: str = ""
    min_models: int = 2
    extra: dict = field(default_factory=dict)

    @property
    def doc(self) -> str:
        """The method function's full docstring."""
        return inspect.getdoc(self.fn) or ""

    def defaults(self) -> dict[str, Any]:
        """Parameter name -> default (required parameters are left out)."""
        return {p.name: p.default for p in self.params if not p.required}

    def param(self, name: str) -> Param:
        """The :class:`Param` called ``name``."""
        for p in self.params:
            if p.name == name:
                return p
        raise self._unknown(name)

    def _unknown(self, name: str) -> MergeError:
        known = [p.name for p in self.params] + list(self.inputs)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return MergeError(f"{self.name}: unknown parameter {name!r}{hint}; its parameters are "
                          f"{', '.join(known) or 'none'} (see list_methods())")

    def validate(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """Checked and coerced parameters (defaults filled in), or a :class:`MergeError`."""
        by_name = {p.name: p for p in self.params}
        for name in params:
            if name not in by_name and name not in self.inputs:
                raise self._unknown(name)
        missing_inputs = [n for n in self.inputs if params.get(n) is None]
        if missing_inputs:
            raise MergeError(
                f"{self.name} uses data: it needs the keyword argument(s) "
                f"{', '.join(n + '=' for n in missing_inputs)} (model: the encoder module whose state dict the "
                "checkpoints are; heads: one [classes, dim] head per task; data: one tensor of unlabelled images per "
                f"task). Call merge({self.name!r}, pretrained, finetuned, "
                f"{', '.join(n + '=...' for n in self.inputs)}) from Python")
        out: dict[str, Any] = {n: params[n] for n in self.inputs}
        for p in self.params:
            if p.name in params:
                out[p.name] = p.check(self.name, params[p.name])
            elif p.required:
                raise MergeError(f"{self.name}: parameter {p.name!r} is required ({p.range_text()}). {p.doc}")
            else:
                out[p.name] = p.default
        return out


METHODS: dict[str, MethodSpec] = {}


def register(name: str, *, summary: str, paper: str, params: Sequence[Param] = (), inputs: Sequence[str] = (),
             url: str = "", min_models: int = 2) -> Callable[[Callable[..., StateDict]], Callable[..., StateDict]]:
    """Decorator: register ``fn(pretrained, finetuned, **params)`` under ``name`` with checked parameters."""

    def deco(fn: Callable[..., StateDict]) -> Callable[..., StateDict]:
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def checked(pretrained, finetuned, *args, **kwargs):
            if args:
                raise MergeError(f"{name}: pass parameters by keyword, e.g. {name}(pretrained, finetuned, "
                                 f"{params[0].name if params else 'param'}=...)")
            _check_models(spec, pretrained, finetuned)
            values = spec.validate(kwargs)
            if _is_hf_clip(pretrained):
                return _merge_in_canonical_layout(spec, fn, pretrained, finetuned, values)
            return fn(pretrained, finetuned, **values)

        checked.__signature__ = sig  # type: ignore[attr-defined]
        spec = MethodSpec(name=name, fn=checked, summary=summary, paper=paper, params=tuple(params),
                          inputs=tuple(inputs), url=url, min_models=min_models)
        old = METHODS.get(name)
        if old is not None:
            prev = old.fn.__wrapped__  # type: ignore[attr-defined]
            # Re-importing a module (importlib.reload, notebooks) registers the same function again: fine.
            if (prev.__module__, prev.__qualname__) != (fn.__module__, fn.__qualname__):
                raise ValueError(f"merge method {name!r} is already registered by {prev.__module__}.{prev.__qualname__}")
        METHODS[name] = spec
        return checked

    return deco


def _is_hf_clip(sd: Mapping[str, torch.Tensor]) -> bool:
    from ..layout import HF_CLIP, is_clip_layout

    return is_clip_layout(sd) == HF_CLIP


def _merge_in_canonical_layout(spec: MethodSpec, fn: Callable[..., StateDict], pretrained, finetuned,
                               values: dict[str, Any]) -> StateDict:
    """Run ``fn`` on transformers-layout CLIP weights in the canonical (open_clip) layout, and convert back.

    Every per-matrix rule is written once, for open_clip's visual tower (fused Q/K/V, 152 tensors for
    ViT-B/32), so HF weights give the same merge as the same weights in open_clip's layout.
    """
    from .. import layout as L

    try:
        pre, info = L.hf_to_canonical(pretrained)
        fts = [L.hf_to_canonical(ft)[0] for ft in finetuned]
        conv: dict[str, Any] = {}
        for name, v in values.items():
            p = next((q for q in spec.params if q.name == name), None)
            if v is None or p is None:
                conv[name] = _canonical_input(name, v)
            elif p.kind == "statedict":
                conv[name] = L.hf_to_canonical(v)[0]
            elif p.kind == "keys":
                conv[name] = L.canonical_keys(v, info)
            elif p.kind == "rule" and not callable(v):
                conv[name] = L.canonical_suffixes(v)
            elif p.kind == "matrix" and v.shape[0] != len(pre):
                raise MergeError(f"{spec.name}: {name} has {v.shape[0]} rows, but layer-wise coefficients have one "
                                 f"row per tensor of open_clip's visual layout ({len(pre)} here; 152 for ViT-B/32): "
                                 "transformers' separate q/k/v share one in_proj row. Use "
                                 "mergebook.statedict.layer_names(mergebook.layout.hf_to_canonical(pretrained)[0])")
            else:
                conv[name] = v
    except L.LayoutError as err:
        raise MergeError(f"{spec.name}: {err}") from None
    return L.from_canonical(fn(pre, fts, **conv), info)


def _canonical_input(name: str, value: Any) -> Any:
    """A data input (the encoder ``model``) in the canonical layout when it is a transformers CLIP tower."""
    if name != "model" or value is None or not hasattr(value, "state_dict"):
        return value
    if not _is_hf_clip(value.state_dict()):
        return value
    from .. import layout as L
    from ..models.clip_hf import CLIPVisionEncoder

    cfg = getattr(value, "config", None)
    if cfg is None:
        raise MergeError("model is a transformers CLIP vision tower without a .config: pass the suite's canonical "
                         "encoder (suite.model) instead")
    enc = CLIPVisionEncoder(L.vit_config_from_hf(cfg, getattr(cfg, "projection_dim", None)))
    sd, _ = L.hf_to_canonical({k: v for k, v in value.state_dict().items() if v.is_floating_point()})
    enc.load_state_dict(sd)
    return enc.eval()


def _check_models(spec: MethodSpec, pretrained: Any, finetuned: Any) -> None:
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
        raise MergeError(f"{spec.name}: finetuned must be a list of state dicts (one per task), got "
                         f"{type(finetuned).__name__}")
    if len(finetuned) < spec.min_models:
        raise MergeError(f"{spec.name} needs at least {spec.min_models} fine-tuned models, got {len(finetuned)}: "
                         "merging a single model returns that model; pass every task's checkpoint")
    check_compatible(pretrained, finetuned)


def merge(name: str, pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
          **params: Any) -> StateDict:
    """Merge ``finetuned`` (fine-tuned from ``pretrained``) with the registered method ``name``."""
    return method_spec(name).fn(pretrained, finetuned, **params)


def method_spec(name: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``name``, or a :class:`MergeError` listing the known ones."""
    if name not in METHODS:
        close = difflib.get_close_matches(str(name), list(METHODS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MergeError(f"unknown merge method {name!r}{hint}; known methods: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def list_methods() -> list[str]:
    """Names of the registered merge methods, sorted."""
    return sorted(METHODS)


def describe(name: str) -> str:
    """A short text: summary, paper, parameters with defaults and ranges, and required inputs."""
    s = method_spec(name)
    lines = [f"{s.name}: {s.summary}", f"  paper: {s.paper}" + (f" <{s.url}>" if s.url else "")]
    if s.inputs:
        lines.append(f"  needs: {', '.join(s.inputs)} (Python API only)")
    for p in s.params:
        default = "(required)" if p.required else repr(p.default)
        lines.append(f"  {p.name} = {default} | {p.range_text()} | {p.doc}")
    return "\n".join(lines)

