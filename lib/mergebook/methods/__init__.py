"""Merge methods, registered by name: ``merge("ties", pretrained, finetuned, k=0.2)``.

One module per paper family (see DESIGN.md). Importing this package registers every method of
this library in :data:`METHODS`; :func:`list_methods` and :func:`describe` say what each takes.
"""

from __future__ import annotations

from .registry import METHODS, MergeError, MethodSpec, Param, describe, list_methods, merge, method_spec, register
from . import averaging, task_arithmetic, ties, cart, fisher, regmean  # noqa: E402,F401  (registration)
from . import spectral  # noqa: E402,F401  (registration: tsv_m, iso_c, iso_cts)
from .task_arithmetic import combine, mask_and_rescale
from .ties import ties_task_vectors

__all__ = [
    "METHODS",
    "MergeError",
    "MethodSpec",
    "Param",
    "combine",
    "describe",
    "list_methods",
    "mask_and_rescale",
    "merge",
    "method_spec",
    "register",
    "ties_task_vectors",
]
