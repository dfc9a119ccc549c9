"""``mergebook convert``: the papers' pickled task_vectors checkpoints -> safetensors, canonical layout.

The AdaMerging, Concrete and CART authors share fine-tuned CLIPs as task_vectors checkpoints:
``torch.save`` of a whole ``ImageEncoder`` object (task_vectors' ``src.modeling``) around an
open_clip model. Loading them normally needs that repository on ``sys.path``, the open_clip and
torch versions they were saved with, and unpickling, which can run arbitrary code.

This is the one place in the library where pickle is read, and only behind ``--trust-pickle``.
The classes the pickle names outside torch (task_vectors', open_clip's, torchvision's transforms)
are replaced by inert stand-ins while unpickling, so neither repository nor open_clip nor
torchvision has to be installed, and nothing of theirs runs: only the tensors are kept. The image
tower is written in the canonical open_clip visual layout (:mod:`mergebook.layout`), with the
count of the text-tower leftovers (``text_numel``, for Ties' whole-CLIP trim population) in the
safetensors metadata.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import layout as L

_REAL_MODULES = ("torch", "collections", "builtins", "copyreg", "_codecs", "numpy", "__builtin__")
_STUBS: dict[tuple[str, str], type] = {}


def _stub(module: str, name: str) -> type:
    """An inert nn.Module subclass standing in for ``module.name`` (accepts any constructor args)."""
    key = (module, name)
    if key not in _STUBS:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            nn.Module.__init__(self)

        _STUBS[key] = type(name, (nn.Module,), {"__module__": f"mergebook_stub.{module}", "__init__": __init__,
                                               "__qualname__": name})
    return _STUBS[key]


class _StubUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D102
        if module.split(".")[0] in _REAL_MODULES:
            return super().find_class(module, name)
        return _stub(module, name)


_stub_pickle = types.SimpleNamespace(Unpickler=_StubUnpickler, load=lambda f, **kw: _StubUnpickler(f, **kw).load(),
                                     __name__="mergebook_stub_pickle")


def _tensors(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return {k: v for k, v in obj.state_dict().items() if isinstance(v, torch.Tensor)}
    if isinstance(obj, dict):
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            return _tensors(obj["state_dict"])
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise L.LayoutError(f"the checkpoint holds a {type(obj).__name__}, not a model or a state dict")


def load_trusted_pickle(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint (a whole module or a state dict). Unpickles: trusted files only."""
    obj = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_stub_pickle)
    return _tensors(obj)


def convert_checkpoint(src: str | Path, dst: str | Path) -> dict[str, Any]:
    """Write ``src``'s image tower as canonical-layout safetensors at ``dst``; returns what was found."""
    from .statedict import save_state_dict

    raw = load_trusted_pickle(src)
    if any(k.startswith(("model.visual.", "visual.")) for k in raw):
        vis, extra = L.openclip_visual(raw)
    else:
        vis, _ = L.to_canonical(raw)
        extra = {"text_numel": 0}
    vis = {k: v.float() if v.is_floating_point() else v for k, v in vis.items() if v.is_floating_point()}
    save_state_dict(vis, dst, metadata={"format": "pt", "layout": L.CANONICAL, "source": str(src),
                                        "text_numel": str(extra["text_numel"])})
    return {"n_tensors": len(vis), "text_numel": extra["text_numel"]}
