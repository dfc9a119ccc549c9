"""A cache of trained weights and results under ``.cache/mergebook/<profile>/``.

Each entry is keyed by a hash of the config that made it and of the source code of the modules
that made it, so editing the generator or the training loop invalidates the entry instead of
silently reusing stale weights. Writes are atomic (a temp file in the same directory, then
``os.replace``), and every entry carries a sha256 sidecar: a truncated, corrupt or tampered file
is detected, deleted and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

StateDict = dict[str, torch.Tensor]


def cache_root() -> Path:
    """The cache directory: ``$MERGEBOOK_CACHE`` or ``<repo>/.cache/mergebook``."""
    env = os.environ.get("MERGEBOOK_CACHE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / ".cache" / "mergebook"


def code_fingerprint(modules: Iterable[ModuleType]) -> str:
    """sha256 over the source text of ``modules`` (what made an artifact is part of its key)."""
    h = hashlib.sha256()
    for m in modules:
        h.update(m.__name__.encode())
        h.update(inspect.getsource(m).encode())
    return h.hexdigest()


def make_key(config: dict[str, Any], modules: Iterable[ModuleType] = ()) -> str:
    """A short stable key from a JSON-able config and the code fingerprint."""
    blob = json.dumps(config, sort_keys=True, default=str) + code_fingerprint(modules)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temp file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_study(out_dir: str | os.PathLike, name: str, frame: Any, record: dict[str, Any]) -> dict[str, Any]:
    """Write a recorded study as ``out_dir/name.csv`` (``frame``, a DataFrame, without its index)
    and ``out_dir/name.json`` (``record`` plus ``device`` and ``date`` when absent), both atomically.

    The benchmark scripts under ``benchmarks/`` use it, so every study the book shows carries the
    same record: its command, seed, device, date and seconds. Returns the record as written.
    """
    import platform
    import time

    if "command" not in record:
        raise ValueError(f"write_study({name!r}): the record needs the 'command' that reproduces the study")
    out = {**record}
    out.setdefault("device", f"cpu ({platform.machine()}, torch {torch.__version__}, "
                             f"{torch.get_num_threads()} threads)")
    out.setdefault("date", time.strftime("%Y-%m-%d"))
    out_dir = Path(out_dir)
    atomic_write(out_dir / f"{name}.csv", lambda tmp: frame.to_csv(tmp, index=False))
    atomic_write(out_dir / f"{name}.json", lambda tmp: tmp.write_text(json.dumps(out, indent=1) + "\n"))
    return out


class Cache:
    """Atomic, integrity-checked storage of state dicts and JSON results for one profile."""

    def __init__(self, profile: str, root: Path | None = None):
        self.dir = (root or cache_root()) / profile

    def path(self, name: str, key: str, suffix: str) -> Path:
        """Where entry ``name`` with ``key`` lives."""
        return self.dir / f"{name}-{key}{suffix}"

    def _valid(self, path: Path) -> bool:
        side = path.with_name(path.name + ".sha256")
        if not path.exists() or not side.exists():
            return False
        return side.read_text().strip() == sha256_file(path)

    def _store(self, path: Path, write: Callable[[Path], None]) -> None:
        atomic_write(path, write)
        digest = sha256_file(path)
        atomic_write(path.with_name(path.name + ".sha256"), lambda p: p.write_text(digest + "\n"))

    def _discard(self, path: Path) -> None:
        for p in (path, path.with_name(path.name + ".sha256")):
            p.unlink(missing_ok=True)

    def tensors(self, name: str, key: str, build: Callable[[], StateDict]) -> StateDict:
        """Load tensors ``name``/``key`` if present and intact, else build, store and return them."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file, save_file

        path = self.path(name, key, ".safetensors")
        if self._valid(path):
            try:
                return load_file(str(path))
            except (SafetensorError, OSError, ValueError):
                pass
        self._discard(path)
        value = build()
        self._store(path, lambda p: save_file({k: v.contiguous() for k, v in value.items()}, str(p)))
        return value

    def json(self, name: str, key: str, build: Callable[[], Any]) -> Any:
        """Like :meth:`tensors`, for JSON-serialisable results."""
        path = self.path(name, key, ".json")
        if self._valid(path):
            try:
                return json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                pass
        self._discard(path)
        value = build()
        # keys keep their insertion order: chapters read tasks and grid points back in the order
        # they were computed, so a cached result must not come back sorted
        self._store(path, lambda p: p.write_text(json.dumps(value, indent=1)))
        return value
