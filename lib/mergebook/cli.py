"""The ``mergebook`` command line.

    mergebook merge --method ties --pretrained pre.safetensors --finetuned a.safetensors b.safetensors \\
        --out merged.safetensors --param k=0.2 --param scaling_coef=0.3
    mergebook methods [NAME] [--json]

Subcommands are pluggable: a module registers one with :func:`register_subcommand` (a name and a
``setup(subparsers)`` function that adds its parser and sets ``func``), and is imported when the
parser is built if it is listed in :data:`PLUGINS` (``mergebook.sweep`` is, once it exists).
User errors (bad method, parameter, checkpoint, path) print one line and exit with status 2,
without a traceback; bugs still raise.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .artifacts import sha256_file  # re-exported: the CLI records input hashes with it

__all__ = ["main", "register_subcommand", "SUBCOMMANDS", "PLUGINS", "parse_value", "sha256_file", "UsageError"]

SetupFn = Callable[["argparse._SubParsersAction"], None]

#: name -> setup(subparsers); filled by :func:`register_subcommand`
SUBCOMMANDS: dict[str, SetupFn] = {}

#: modules imported (if installed) before the parser is built, so they can register subcommands
PLUGINS: list[str] = ["mergebook.sweep"]


class UsageError(ValueError):
    """A command-line usage problem: printed as one line, exit status 2."""


def register_subcommand(name: str, setup: SetupFn) -> SetupFn:
    """Register ``setup(subparsers)`` as the builder of subcommand ``name`` (it must set ``func=``)."""
    SUBCOMMANDS[name] = setup
    return setup


def parse_value(text: str) -> Any:
    """``--param`` value: true/false, none, int, float, a JSON list/object, a .npy/.json file, else the string."""
    s = text.strip()
    low = s.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(s)
        except ValueError:
            pass
    if s[:1] in "[{":
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise UsageError(f"--param value {text!r} looks like JSON but does not parse: {e}") from None
    if low.endswith(".npy") and Path(s).is_file():
        import numpy as np

        return np.load(s, allow_pickle=False)
    if low.endswith(".json") and Path(s).is_file():
        return json.loads(Path(s).read_text())
    return s


def _parse_params(items: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise UsageError(f"--param {item!r} is not key=value: write e.g. --param k=0.2")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise UsageError(f"--param {item!r} has no name before '='")
        if key in out:
            raise UsageError(f"--param {key} is given twice")
        out[key] = parse_value(value)
    return out


def _jsonable(value: Any) -> Any:
    """Parameter values as JSON for the output metadata."""
    import numpy as np
    import torch

    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.tolist()
    if isinstance(value, Mapping):
        return f"<state dict with {len(value)} tensors>"
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', repr(value))}>"
    return repr(value)


# ----------------------------------------------------------------------------------------------
# merge


def _cmd_merge(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .methods import METHODS, method_spec
    from .statedict import load_state_dict, save_state_dict

    spec = method_spec(args.method)
    if spec.inputs:
        raise UsageError(
            f"method {args.method!r} needs {', '.join(spec.inputs)} (a model and unlabelled data), which the command "
            f"line cannot supply: call mergebook.methods.merge({args.method!r}, pretrained, finetuned, "
            f"{', '.join(n + '=...' for n in spec.inputs)}) from Python")
    out = Path(args.out)
    if out.suffix.lower() != ".safetensors":
        raise UsageError(f"--out {args.out!r} must end in .safetensors (the only format written)")
    inputs = [Path(args.pretrained), *map(Path, args.finetuned)]
    for p in inputs:
        if p.exists() and out.exists() and os.path.samefile(p, out):
            raise UsageError(f"--out {args.out!r} is also an input: write the merge to a new file")
    raw = _parse_params(args.param)
    params = dict(raw)
    extra_files: dict[str, str] = {}
    for name, value in raw.items():
        kind = spec.param(name).kind if name in {p.name for p in spec.params} else None
        if kind == "statedict" and isinstance(value, str):
            extra_files[name] = value
    values = spec.validate(params)  # also loads state-dict parameters given as paths
    device = torch.device(args.device)
    pretrained = {k: v.to(device) for k, v in load_state_dict(args.pretrained).items()}
    finetuned = [{k: v.to(device) for k, v in load_state_dict(p).items()} for p in args.finetuned]
    merged = METHODS[args.method].fn(pretrained, finetuned, **values)
    meta_params = {k: (extra_files[k] if k in extra_files else _jsonable(v)) for k, v in values.items()}
    metadata = {
        "format": "pt",
        "mergebook_version": __version__,
        "method": args.method,
        "params": json.dumps(meta_params, sort_keys=True),
        "pretrained": str(inputs[0]),
        "pretrained_sha256": sha256_file(inputs[0]),
        "finetuned": json.dumps([str(p) for p in inputs[1:]]),
        "finetuned_sha256": json.dumps([sha256_file(p) for p in inputs[1:]]),
    }
    for name, path in extra_files.items():
        metadata[f"param_{name}_sha256"] = sha256_file(path)
    save_state_dict(merged, out, metadata=metadata)
    shown = ", ".join(f"{k}={meta_params[k]}" for k in sorted(raw)) or "defaults"
    print(f"merged {len(finetuned)} models with {args.method} ({shown}) -> {out}")
    return 0


def _setup_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge fine-tuned checkpoints into one safetensors file",
                       description="Merge fine-tuned checkpoints (safetensors, or .pt state dicts loaded with "
                                   "weights_only=True) with a registered method; see `mergebook methods`.")
    p.add_argument("--method", required=True, help="registered method name (see `mergebook methods`)")
    p.add_argument("--pretrained", required=True, metavar="PT", help="the common pretrained checkpoint")
    p.add_argument("--finetuned", required=True, nargs="+", metavar="FT", help="fine-tuned checkpoints, in task order")
    p.add_argument("--out", required=True, metavar="MERGED.safetensors", help="output file (written atomically)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="method parameter, repeatable; values parse as bool/none/int/float/JSON, else string")
    p.add_argument("--device", default="cpu", help="device to merge on (cpu, cuda, cuda:1, ...)")
    p.set_defaults(func=_cmd_merge)


# ----------------------------------------------------------------------------------------------
# methods


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import METHODS, describe, list_methods, method_spec

    names = [args.name] if args.name else list_methods()
    for n in names:
        method_spec(n)
    if args.json:
        out = []
        for n in names:
            s = METHODS[n]
            out.append({
                "name": n, "summary": s.summary, "paper": s.paper, "url": s.url, "inputs": list(s.inputs),
                "params": [{"name": p.name, "default": None if p.required else _jsonable(p.default), "kind": p.kind,
                            "range": p.range_text(), "required": p.required, "doc": p.doc} for p in s.params],
            })
        print(json.dumps(out, indent=2))
    else:
        print("\n\n".join(describe(n) for n in names))
    return 0


def _setup_methods(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("methods", help="list merge methods with their parameters, defaults and ranges")
    p.add_argument("name", nargs="?", help="show one method only")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_methods)


register_subcommand("merge", _setup_merge)
register_subcommand("methods", _setup_methods)


# ----------------------------------------------------------------------------------------------


def _load_plugins() -> None:
    for mod in PLUGINS:
        try:
            found = importlib.util.find_spec(mod) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            importlib.import_module(mod)  # a broken plugin should fail loudly, not vanish


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every registered subcommand."""
    _load_plugins()
    parser = argparse.ArgumentParser(prog="mergebook", description="Merging, Reproduced: merge fine-tuned models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for setup in SUBCOMMANDS.values():
        setup(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit status (0 ok, 2 usage or input error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # MergeError, CheckpointError, UsageError: the user's to fix
        print(f"mergebook {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"mergebook {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
