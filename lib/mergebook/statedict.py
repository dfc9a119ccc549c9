"""State-dict algebra: compatibility checks, task vectors, arithmetic, flattening, safe I/O.

A *task vector* is ``τ_k = θ_k − θ_pre`` over every floating-point tensor of the encoder's state
dict (Ilharco et al., "Editing models with task arithmetic", 2023, §2; the AdaMerging paper writes
it ``T_k = θ_k − θ_pre``, §3.1). Integer tensors (position ids, counters) are skipped, as in
mlfoundations/task_vectors. Which keys take part is always explicit: every function that works on
a subset takes ``keys=`` and defaults to :func:`float_keys` in state-dict order.

Nothing here mutates its inputs: every result is a new dict of new tensors.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

StateDict = dict[str, torch.Tensor]

__all__ = [
    "StateDict",
    "CheckpointError",
    "check_compatible",
    "float_keys",
    "task_vector",
    "task_vectors",
    "TaskVectorView",
    "add",
    "scale",
    "weighted_sum",
    "flatten",
    "unflatten",
    "layer_names",
    "load_state_dict",
    "save_state_dict",
]


class CheckpointError(ValueError):
    """A checkpoint cannot be used as given: the message names the key or file and the fix."""


# ----------------------------------------------------------------------------------------------
# Checks


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of a floating tensor is finite (fast path: a finite sum implies it)."""
    if t.numel() == 0:
        return True
    # NaN and ±inf propagate through a sum, so a finite sum proves every entry finite; only a
    # non-finite sum (which a huge-but-finite tensor could also give) needs the exact check.
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def check_compatible(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise :class:`CheckpointError` unless all checkpoints share keys, shapes, dtypes and devices and are finite."""
    if not isinstance(pretrained, Mapping):
        raise CheckpointError(f"pretrained must be a state dict (a mapping of names to tensors), got "
                              f"{type(pretrained).__name__}: pass model.state_dict() or load_state_dict(path)")
    if isinstance(finetuned, Mapping) or not isinstance(finetuned, Sequence):
        raise CheckpointError("finetuned must be a list of state dicts, one per task, got "
                              f"{type(finetuned).__name__}: wrap a single state dict in a list")
    for key, t in pretrained.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"pretrained[{key!r}] is a {type(t).__name__}, not a tensor: "
                                  "pass a plain state dict of tensors")
        if t.is_floating_point() and not _all_finite(t):
            raise CheckpointError(f"pretrained[{key!r}] contains NaN or inf: the checkpoint is corrupt or "
                                  "diverged; re-export or re-download it")
    ref_keys = list(pretrained)
    ref_set = set(ref_keys)
    for i, ft in enumerate(finetuned):
        if not isinstance(ft, Mapping):
            raise CheckpointError(f"finetuned[{i}] is a {type(ft).__name__}, not a state dict: pass "
                                  "model.state_dict() or load_state_dict(path)")
        missing = [k for k in ref_keys if k not in ft]
        extra = [k for k in ft if k not in ref_set]
        if missing or extra:
            what = []
            if missing:
                what.append(f"lacks {len(missing)} key(s) of the pretrained model, e.g. {missing[0]!r}")
            if extra:
                what.append(f"has {len(extra)} key(s) the pretrained model lacks, e.g. {extra[0]!r}")
            raise CheckpointError(
                f"finetuned[{i}] {' and '.join(what)}: all checkpoints must come from the same architecture "
                "and export (e.g. all vision-only, or all whole CLIP models); strip prefixes such as "
                "'model.' or 'visual.' so the names match")
        for key in ref_keys:
            a, b = pretrained[key], ft[key]
            if not isinstance(b, torch.Tensor):
                raise CheckpointError(f"finetuned[{i}][{key!r}] is a {type(b).__name__}, not a tensor: "
                                      "pass a plain state dict of tensors")
            if a.shape != b.shape:
                raise CheckpointError(f"finetuned[{i}][{key!r}] has shape {tuple(b.shape)} but the pretrained "
                                      f"tensor has {tuple(a.shape)}: the models differ in architecture; merge "
                                      "only models fine-tuned from this pretrained checkpoint")
            if a.dtype != b.dtype:
                raise CheckpointError(f"finetuned[{i}][{key!r}] is {b.dtype} but the pretrained tensor is "
                                      f"{a.dtype}: cast all checkpoints to one dtype first, e.g. "
                                      "{k: v.float() for k, v in sd.items()}")
            if a.device != b.device:
                raise CheckpointError(f"finetuned[{i}][{key!r}] is on {b.device} but the pretrained tensor is "
                                      f"on {a.device}: move every checkpoint to one device first")
            if b.is_floating_point() and not _all_finite(b):
                raise CheckpointError(f"finetuned[{i}][{key!r}] contains NaN or inf: that fine-tuning run "
                                      "diverged or the file is corrupt; retrain or re-download it")


def float_keys(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors, in state-dict order (integer tensors are skipped, as in task_vectors)."""
    return [k for k, v in sd.items() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def layer_names(sd: Mapping[str, torch.Tensor]) -> list[str]:
    """The "layers" of layer-wise AdaMerging (Yang et al. 2024, §3.2.1): one per floating tensor, in order."""
    # The AdaMerging code gives each state-dict tensor its own λ (158 for ViT-B/32), not each block.
    return float_keys(sd)


def _resolve_keys(sd: Mapping[str, torch.Tensor], keys: Sequence[str] | None, what: str = "state dict") -> list[str]:
    """``keys`` checked against ``sd`` (default: its floating keys)."""
    if keys is None:
        return float_keys(sd)
    if isinstance(keys, str):
        raise CheckpointError(f"keys must be a list of names, got the single string {keys!r}: wrap it in a list")
    out = list(keys)
    for k in out:
        if k not in sd:
            raise CheckpointError(f"key {k!r} is not in the {what}: choose keys from float_keys(pretrained)")
    return out


# ----------------------------------------------------------------------------------------------
# Task vectors and arithmetic


def task_vector(finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
                keys: Sequence[str] | None = None) -> StateDict:
    """τ = θ_ft − θ_pre over ``keys`` (default: floating tensors) — Ilharco et al. 2023, §2."""
    ks = _resolve_keys(pretrained, keys, "pretrained state dict")
    return {k: finetuned[k] - pretrained[k] for k in ks}


def task_vectors(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]],
                 keys: Sequence[str] | None = None) -> list[StateDict]:
    """[τ_1, …, τ_K] with τ_k = θ_k − θ_pre (AdaMerging §3.1), after :func:`check_compatible`."""
    check_compatible(pretrained, finetuned)
    return [task_vector(ft, pretrained, keys) for ft in finetuned]


class TaskVectorView(Mapping):
    """A read-only mapping ``key -> finetuned[key] − pretrained[key]`` computed on access.

    The merge core reads task vectors one key at a time; this view lets it do so without holding
    K full task vectors in memory (8 × 350 MB at CLIP ViT-B/32 scale).
    """

    def __init__(self, finetuned: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
                 keys: Sequence[str] | None = None):
        self._ft, self._pre = finetuned, pretrained
        self._keys = _resolve_keys(pretrained, keys, "pretrained state dict")
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        return self._ft[key] - self._pre[key]

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def strided(self, key: str, step: int) -> torch.Tensor:
        """Every ``step``-th entry of the flattened vector of ``key`` without computing the rest."""
        return self._ft[key].reshape(-1)[::step] - self._pre[key].reshape(-1)[::step]

    def shape(self, key: str) -> torch.Size:
        """Shape of the vector of ``key`` without computing it."""
        return self._pre[key].shape


def add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> StateDict:
    """a + b key by key (both must have the same keys)."""
    _same_keys([a, b], "add")
    return {k: a[k] + b[k] for k in a}


def scale(sd: Mapping[str, torch.Tensor], s: float) -> StateDict:
    """s · sd key by key."""
    return {k: v * s for k, v in sd.items()}


def weighted_sum(sds: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float] | torch.Tensor) -> StateDict:
    """Σ_i w_i · sd_i key by key (Task Arithmetic's Σ λ_k τ_k, Ilharco et al. 2023)."""
    if len(sds) == 0:
        raise CheckpointError("weighted_sum needs at least one state dict")
    if len(weights) != len(sds):
        raise CheckpointError(f"weighted_sum got {len(sds)} state dicts but {len(weights)} weights: pass one "
                              "weight per state dict")
    _same_keys(sds, "weighted_sum")
    out: StateDict = {}
    for k in sds[0]:
        acc = sds[0][k] * weights[0]
        for sd, w in zip(sds[1:], weights[1:]):
            acc = acc + sd[k] * w
        out[k] = acc
    return out


def _same_keys(sds: Sequence[Mapping[str, torch.Tensor]], op: str) -> None:
    ref = list(sds[0])
    for i, sd in enumerate(sds[1:], start=1):
        if set(sd) != set(ref):
            diff = sorted(set(sd) ^ set(ref))
            raise CheckpointError(f"{op}: state dict {i} and state dict 0 differ in keys, e.g. {diff[0]!r}: "
                                  "restrict both to the same keys first")


def flatten(sd: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> torch.Tensor:
    """The tensors of ``keys`` (default: floating keys, state-dict order) as one 1-D vector."""
    ks = _resolve_keys(sd, keys)
    if not ks:
        raise CheckpointError("flatten: no keys to flatten (the state dict has no floating tensors)")
    return torch.cat([sd[k].reshape(-1) for k in ks])


def unflatten(vec: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> StateDict:
    """Inverse of :func:`flatten`: split ``vec`` into tensors shaped (and typed) like ``like[keys]``."""
    ks = _resolve_keys(like, keys)
    sizes = [like[k].numel() for k in ks]
    if vec.dim() != 1 or vec.numel() != sum(sizes):
        raise CheckpointError(f"unflatten: vector has shape {tuple(vec.shape)} but the keys hold {sum(sizes)} "
                              "entries: pass the vector flatten() made from a state dict with these keys")
    out: StateDict = {}
    for k, piece in zip(ks, torch.split(vec, sizes)):
        out[k] = piece.reshape(like[k].shape).to(like[k].dtype).clone()
    return out


# ----------------------------------------------------------------------------------------------
# Safe I/O

_PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
_ORDER_KEY = "mergebook_key_order"


def _recorded_order(raw: str | None, sd: Mapping[str, torch.Tensor]) -> list[str] | None:
    if not raw:
        return None
    try:
        order = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(order, list) or sorted(order) != sorted(sd):
        return None  # stale or foreign metadata: keep the file's order rather than guess
    return order


def load_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a state dict from .safetensors, or from .pt/.pth/.bin with ``torch.load(weights_only=True)`` only."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {str(p)!r} does not exist or is not a file: check the path")
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            sd = dict(load_file(str(p)))
            with safe_open(str(p), "pt") as f:
                meta = f.metadata() or {}
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {str(p)!r} as safetensors ({e}): the file is truncated or not "
                                  "a safetensors file; re-download or re-export it") from None
        # safetensors stores tensors sorted by name; restore the state-dict order save_state_dict recorded,
        # because layer-wise coefficients are indexed by layer_names() (state-dict order).
        order = _recorded_order(meta.get(_ORDER_KEY), sd)
        return {k: sd[k] for k in order} if order else sd
    if suffix in _PICKLE_SUFFIXES:
        try:
            # weights_only=True refuses arbitrary pickled objects: a checkpoint can run code on load.
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"refused to unpickle {str(p)!r}: it holds objects other than tensors, and loading them "
                f"could run arbitrary code ({first}). If you trust the file, convert it once to safetensors "
                "in a separate, sandboxed script (model.state_dict() -> save_state_dict).") from None
        except (RuntimeError, EOFError, OSError) as e:
            raise CheckpointError(f"cannot read {str(p)!r} with torch.load ({e}): the file is truncated or not "
                                  "a torch checkpoint") from None
        if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
            obj = obj["state_dict"]
        if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise CheckpointError(f"{str(p)!r} does not hold a plain state dict of tensors: save "
                                  "model.state_dict(), not the model object")
        return {str(k): v for k, v in obj.items()}
    raise CheckpointError(f"unsupported checkpoint format {suffix or '(no suffix)'!r} for {str(p)!r}: use "
                          ".safetensors (preferred) or a .pt/.pth/.bin state dict")


def save_state_dict(sd: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    metadata: dict[str, str] | None = None) -> None:
    """Write ``sd`` as safetensors atomically (temp file in the same directory, fsync, ``os.replace``).

    The key order is recorded in the metadata (``mergebook_key_order``) and restored by
    :func:`load_state_dict`, since safetensors itself stores tensors sorted by name.
    """
    from safetensors.torch import save_file

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise CheckpointError(f"save_state_dict writes safetensors only: name the file *.safetensors, not {p.name!r}")
    if metadata is not None:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise CheckpointError(f"safetensors metadata must map str to str; these entries are not: {bad}. "
                                  "Encode other values with json.dumps")
    tensors: StateDict = {}
    seen: set[tuple[int, int]] = set()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"cannot save {k!r}: it is a {type(v).__name__}, not a tensor")
        t = v.detach().to("cpu").contiguous()
        # safetensors refuses tensors that share storage (tied weights, views): give each its own copy.
        ident = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if t.numel() and ident in seen:
            t = t.clone()
        else:
            seen.add(ident)
        tensors[k] = t
    meta = dict(metadata or {})
    meta.setdefault(_ORDER_KEY, json.dumps(list(tensors)))
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(p.parent), prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def numel(sd: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> int:
    """Number of entries in ``keys`` (default: floating keys)."""
    return int(sum(sd[k].numel() for k in _resolve_keys(sd, keys)))


def isclose_state_dicts(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], rtol: float = 1e-5,
                        atol: float = 1e-8) -> bool:
    """Whether two state dicts have the same keys and allclose tensors (handy in notebooks and tests)."""
    if list(a) != list(b):
        return False
    return all(a[k].shape == b[k].shape and torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol)
               for k in a)

