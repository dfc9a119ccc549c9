"""Cached experiment results: a notebook's expensive numbers, keyed by suite, code and parameters."""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import artifacts
from .models.suite import Suite


@functools.lru_cache(maxsize=1)
def package_fingerprint() -> str:
    """sha256 over every source file of ``mergebook`` (any code change invalidates results)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def cached_result(suite: Suite, name: str, params: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """Return ``compute()``'s JSON-able result, reusing a cached copy for the same suite/code/params."""
    key = artifacts.make_key({"suite": suite.meta.get("fingerprint", suite.profile), "name": name,
                              "params": params, "code": package_fingerprint()})
    return artifacts.Cache(suite.profile).json(f"result-{name}", key, compute)
