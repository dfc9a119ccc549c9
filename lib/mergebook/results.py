"""Cached experiment results: a notebook's expensive numbers, keyed by suite, code and parameters."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
from collections.abc import Callable, Iterator
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


def _key(suite: Suite, name: str, params: dict[str, Any]) -> str:
    return artifacts.make_key({"suite": suite.meta.get("fingerprint", suite.profile), "name": name,
                               "params": params, "code": package_fingerprint()})


_LOOKUP_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("mergebook_lookup_only", default=False)


@contextlib.contextmanager
def lookup_only() -> Iterator[None]:
    """Inside this block :func:`cached_result` never computes: a missing entry comes back as None.

    The summary chapter calls the other chapters' own cached functions (``experiment.sweep``,
    ``experiment.adamerging_run``, ...) inside it, so it reads their results under exactly the keys
    they were stored with and never reruns them.
    """
    token = _LOOKUP_ONLY.set(True)
    try:
        yield
    finally:
        _LOOKUP_ONLY.reset(token)


def cached_result(suite: Suite, name: str, params: dict[str, Any], compute: Callable[[], Any]) -> Any:
    """Return ``compute()``'s JSON-able result, reusing a cached copy for the same suite/code/params.

    Inside :func:`lookup_only` a missing entry returns None instead of computing.
    """
    if _LOOKUP_ONLY.get():
        return lookup_result(suite, name, params)
    return artifacts.Cache(suite.profile).json(f"result-{name}", _key(suite, name, params), compute)


def result_path(suite: Suite, name: str, params: dict[str, Any]) -> Path:
    """Where :func:`cached_result` keeps ``name``/``params`` for this suite and code (it may not exist)."""
    return artifacts.Cache(suite.profile).path(f"result-{name}", _key(suite, name, params), ".json")


def lookup_result(suite: Suite, name: str, params: dict[str, Any]) -> Any | None:
    """:func:`cached_result`'s stored value for the same suite/code/params, or None; never computes.

    The summary chapter reads other chapters' results with this: a missing (or corrupt) entry means
    that chapter has not run with this code and these parameters, and the caller says which to run.
    """
    key = _key(suite, name, params)
    cache = artifacts.Cache(suite.profile)
    if not cache.path(f"result-{name}", key, ".json").exists():
        return None

    def missing() -> Any:
        raise LookupError(name)

    try:  # Cache.json checks the sha256 sidecar: a corrupt entry is discarded and "rebuilt" → None
        return cache.json(f"result-{name}", key, missing)
    except LookupError:
        return None
