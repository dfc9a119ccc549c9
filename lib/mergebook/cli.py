"""The ``mergebook`` command line.

    mergebook merge --method ties --pretrained pre.safetensors --finetuned a.safetensors b.safetensors \\
        --out merged.safetensors --param k=0.2 --param scaling_coef=0.3
    mergebook methods [NAME] [--json]
    mergebook sweep NOTEBOOK --grid GRID.yaml --out runs/NAME [--workers N | --scheduler ADDRESS]
    mergebook sweep report runs/NAME

Subcommands are pluggable: a module registers one with :func:`register_subcommand` (a name and a
``setup(subparsers)`` function that adds its parser and sets ``func``), and is imported when the
parser is built if it is listed in :data:`PLUGINS` (``mergebook.sweep`` registers ``sweep``).
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
    pretrained, layout_note = _as_layout_of(load_state_dict(args.pretrained), None, args.pretrained)
    finetuned = []
    for p in args.finetuned:
        sd, note = _as_layout_of(load_state_dict(p), pretrained, p)
        finetuned.append(sd)
        layout_note += note
    pretrained = {k: v.to(device) for k, v in pretrained.items()}
    finetuned = [{k: v.to(device) for k, v in sd.items()} for sd in finetuned]
    from .layout import is_clip_layout

    detected = is_clip_layout(pretrained) or "generic"
    print(f"layout: {detected}{' (merged in the canonical open_clip layout, written back in this one)' if detected == 'hf_clip' else ''}"
          f"{layout_note}")
    merged = METHODS[args.method].fn(pretrained, finetuned, **values)
    meta_params = {k: (extra_files[k] if k in extra_files else _jsonable(v)) for k, v in values.items()}
    metadata = {
        "format": "pt",
        "mergebook_version": __version__,
        "method": args.method,
        "params": json.dumps(meta_params, sort_keys=True),
        "layout": detected,
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


def _as_layout_of(sd: dict, like: dict | None, path: str) -> tuple[dict, str]:
    """``sd`` reduced to its CLIP image tower and put in ``like``'s layout (exact conversion); a note."""
    from . import layout as L

    note = ""
    if any(k.startswith(("text_model.", "logit_scale", "text_projection")) for k in sd) and \
            any(k.startswith("vision_model.") for k in sd):
        dropped = [k for k in sd if not k.startswith(("vision_model.", "visual_projection."))]
        sd = {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
        note += f"; {path}: a whole CLIPModel, its {len(dropped)} text-tower tensors left out"
    if like is None:
        return sd, note
    mine, theirs = L.is_clip_layout(sd), L.is_clip_layout(like)
    if mine and theirs and mine != theirs:
        canon, _ = L.to_canonical(sd)
        if theirs == L.CANONICAL:
            sd = canon
        else:
            _, info = L.to_canonical(like)
            sd = L.from_canonical(canon, info)
        note += f"; {path}: {mine} converted to {theirs}"
    return sd, note


def _cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert_checkpoint

    if not args.trust_pickle:
        raise UsageError(
            f"{args.input} is a pickle, and unpickling runs arbitrary code from the file. Only if you trust its "
            "source (e.g. the task_vectors authors' checkpoints), rerun with --trust-pickle; this is the only "
            "command that ever reads a pickle")
    info = convert_checkpoint(args.input, args.output)
    print(f"converted {args.input} -> {args.output}: {info['n_tensors']} canonical (open_clip visual) tensors, "
          f"{info['text_numel']} text-tower entries recorded for Ties' whole-CLIP trim population")
    return 0


def _setup_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("convert", help="turn a pickled task_vectors/open_clip checkpoint into safetensors",
                       description="Convert a task_vectors-format checkpoint (a pickled open_clip ImageEncoder, "
                                   "as the AdaMerging/Concrete/CART authors share them) into a safetensors file "
                                   "of the image tower in the canonical open_clip visual layout. Needs "
                                   "--trust-pickle: this is the only place pickle is ever read.")
    p.add_argument("input", metavar="IN", help="the pickled checkpoint (.pt)")
    p.add_argument("output", metavar="OUT.safetensors", help="the safetensors file to write (atomically)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow unpickling IN (it can run code); required")
    p.set_defaults(func=_cmd_convert)


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
register_subcommand("convert", _setup_convert)


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
    # `python -m mergebook.cli`: plugins register into the importable mergebook.cli, not into this
    # __main__ copy of it, so run that module's main.
    from mergebook.cli import main as _main

    sys.exit(_main())
