"""Eight offline text classification tasks built from real text that installed packages ship.

The language counterpart of the image miniature (``data/tiny_suite.py``): no downloads, fixed seeds,
and every example is a string found on disk or in the interpreter, with its source named below.
Only ``grammar`` transforms its text (it shuffles the words of half of the real sentences, the
CoLA-like "unacceptable" class); nothing is generated from templates.

=========  ==============================================  ===========================================
task       text                                            label
=========  ==============================================  ===========================================
colors     xkcd colour-survey names (matplotlib)           hue family of the colour's RGB value
cities     IANA time-zone city names (tzdata)              the zone's region (Africa, Europe, ...)
language   Sphinx's translated UI messages (sphinx .po)    the translation's language
code       lines of installed source files                 the file's language (Python, CSS, ...)
docs       first docstring lines of library functions      the library / area the function is from
grammar    sentences of Python's reference (pydoc_data)    intact, or the same words shuffled
unicode    Unicode character names (unicodedata)           the character's block family
pyref      sentences of Python's reference (pydoc_data)    which part of the language they describe
=========  ==============================================  ===========================================
"""

from __future__ import annotations

import importlib
import inspect
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["TEXT_TASKS", "TextTask", "build_task", "split_task"]


@dataclass
class TextTask:
    """Texts and integer labels of one task, with the class names and zero-shot descriptions."""

    name: str
    texts: list[str]
    labels: list[int]
    classes: list[str]
    descriptions: list[list[str]]  # per class: label descriptions whose embeddings make the head
    source: str

    def __len__(self) -> int:
        return len(self.texts)


def _package_dir(name: str) -> Path:
    return Path(importlib.import_module(name).__file__).resolve().parent


def _clean(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


# ---------------------------------------------------------------------------------------------
# The eight sources
# ---------------------------------------------------------------------------------------------


def _colors() -> TextTask:
    import colorsys

    from matplotlib.colors import XKCD_COLORS, to_rgb

    classes = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown"]
    texts, labels = [], []
    for name, hexv in XKCD_COLORS.items():
        h, s, v = colorsys.rgb_to_hsv(*to_rgb(hexv))
        hue = 360 * h
        if s < 0.3 or v < 0.25:
            continue  # greys, blacks and whites have no hue family
        if hue < 50 and v < 0.6:
            c = "brown"
        elif hue < 15 or hue >= 345:
            c = "red"
        elif hue < 40:
            c = "orange"
        elif hue < 70:
            c = "yellow"
        elif hue < 165:
            c = "green"
        elif hue < 255:
            c = "blue"
        elif hue < 295:
            c = "purple"
        else:
            c = "pink"
        texts.append(name.removeprefix("xkcd:"))
        labels.append(classes.index(c))
    desc = [[f"a shade of {c}", f"the colour {c}"] for c in classes]
    return TextTask("colors", texts, labels, classes, desc, "matplotlib.colors.XKCD_COLORS (xkcd colour survey)")


def _cities() -> TextTask:
    classes = ["Africa", "America", "Asia", "Europe", "Pacific"]
    root = _package_dir("tzdata") / "zoneinfo"
    texts, labels = [], []
    for i, region in enumerate(classes):
        for p in sorted((root / region).rglob("*")):
            if p.is_file() and not p.name.startswith("_") and p.suffix != ".py":
                texts.append(p.name.replace("_", " "))
                labels.append(i)
    names = {"Africa": "Africa", "America": "the Americas", "Asia": "Asia", "Europe": "Europe",
             "Pacific": "the Pacific Ocean islands"}
    desc = [[f"a city in {names[c]}", f"a place in {names[c]}"] for c in classes]
    return TextTask("cities", texts, labels, classes, desc, "tzdata/zoneinfo (IANA time-zone names)")


def _po_messages(path: Path) -> list[str]:
    """The non-empty ``msgstr`` strings of a gettext .po file (multi-line strings joined)."""
    out, cur, in_str = [], [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("msgstr "):
            cur, in_str = [line[len("msgstr "):].strip().strip('"')], True
        elif in_str and line.startswith('"'):
            cur.append(line.strip().strip('"'))
        else:
            if in_str:
                s = _clean("".join(cur).replace("\\n", " ").replace('\\"', '"'))
                s = _clean(re.sub(r"%(\([a-z_]+\))?[sdr]|\{[a-z_0-9]*\}", " ", s))
                if len(s) >= 12:
                    out.append(s)
            in_str = False
    return out


def _language() -> TextTask:
    langs = {"de": "German", "fr": "French", "es": "Spanish", "it": "Italian", "pt_BR": "Portuguese",
             "nl": "Dutch", "pl": "Polish", "tr": "Turkish"}
    root = _package_dir("sphinx") / "locale"
    texts, labels = [], []
    for i, code in enumerate(langs):
        for s in dict.fromkeys(_po_messages(root / code / "LC_MESSAGES" / "sphinx.po")):
            texts.append(s)
            labels.append(i)
    classes = list(langs.values())
    desc = [[f"a sentence in {c}", f"{c} text"] for c in classes]
    return TextTask("language", texts, labels, classes, desc, "sphinx/locale/*/LC_MESSAGES/sphinx.po")


def _code() -> TextTask:
    sp = _package_dir("sphinx")
    np_inc = Path(np.get_include()) / "numpy"
    mpl = _package_dir("matplotlib")
    sources = {
        "Python": [_package_dir("json"), _package_dir("email"), _package_dir("http")],
        "JavaScript": [sp / "themes", mpl / "backends" / "web_backend"],
        "CSS": [sp / "themes", _package_dir("pydata_sphinx_theme"), _package_dir("sphinx_book_theme"),
                _package_dir("sphinx_design"), mpl],
        "C": [np_inc],
        "HTML": [sp / "themes", _package_dir("sphinx_book_theme")],
        "LaTeX": [sp / "texinputs"],
    }
    suffix = {"Python": (".py",), "JavaScript": (".js",), "CSS": (".css", ".css_t"), "C": (".h", ".c"),
              "HTML": (".html",), "LaTeX": (".sty", ".tex", ".cls")}
    texts, labels = [], []
    for i, (lang, dirs) in enumerate(sources.items()):
        seen: dict[str, None] = {}
        for d in dirs:
            for p in sorted(d.rglob("*")):
                if p.suffix not in suffix[lang] or ".min." in p.name or not p.is_file():
                    continue
                for line in p.read_text(encoding="utf-8", errors="replace").splitlines():
                    s = _clean(line)
                    if 25 <= len(s) <= 160 and sum(ch.isalpha() for ch in s) >= 10:
                        seen.setdefault(s)
        texts += list(seen)
        labels += [i] * len(seen)
    classes = list(sources)
    desc = [[f"a line of {c} code", f"{c} source code"] for c in classes]
    return TextTask("code", texts, labels, classes, desc, "source files installed with the stdlib, sphinx, numpy, matplotlib and themes")


def _first_doc_lines(objs) -> list[str]:
    out = []
    for o in objs:
        d = inspect.getdoc(o)
        if not d:
            continue
        line = _clean(d.split("\n\n")[0])
        if 20 <= len(line) <= 200 and not line.startswith((">>>", "..", "Deprecated")) and "(" not in line[:12]:
            out.append(line)
    return out


def _public_callables(mod, cls=None) -> list:
    ns = cls if cls is not None else mod
    objs = []
    for n in sorted(dir(ns)):
        if n.startswith("_"):
            continue
        try:
            o = getattr(ns, n)
        except Exception:  # some attributes raise on access; they have no docstring to give
            continue
        if callable(o):
            objs.append(o)
    return objs


def _docs() -> TextTask:
    import email.message, email.utils, http.client, http.cookies, os, os.path, pathlib, random, re as _re, \
        shutil, statistics, string, textwrap, urllib.parse, urllib.request  # noqa: E401
    import matplotlib.axes
    import matplotlib.pyplot
    import pandas

    import numpy.linalg
    import torch.nn

    groups = {
        "array computing": [numpy, numpy.linalg],
        "plotting": [matplotlib.pyplot, (matplotlib.axes, matplotlib.axes.Axes)],
        "data frames": [(pandas, pandas.DataFrame), (pandas, pandas.Series)],
        "neural networks": [torch.nn, torch.nn.functional],
        "files and directories": [os, os.path, shutil, (pathlib, pathlib.Path)],
        "statistics and randomness": [statistics, random],
        "text processing": [string, textwrap, _re, (str, str)],
        "internet and email": [email.utils, (email.message, email.message.Message), http.client, http.cookies,
                               urllib.parse, urllib.request],
    }
    texts, labels = [], []
    seen: set[str] = set()
    for i, mods in enumerate(groups.values()):
        for m in mods:
            mod, cls = m if isinstance(m, tuple) else (m, None)
            for s in _first_doc_lines(_public_callables(mod, cls)):
                if s not in seen:
                    seen.add(s)
                    texts.append(s)
                    labels.append(i)
    classes = list(groups)
    desc = [[f"documentation of a function for {c}", c] for c in classes]
    return TextTask("docs", texts, labels, classes, desc, "docstrings of numpy, matplotlib, pandas, torch.nn and the stdlib")


def _reference_sentences(topics: list[str]) -> list[str]:
    from pydoc_data.topics import topics as ref

    out = []
    for t in topics:
        body = re.sub(r"\n\s*\n", "\n\n", ref[t])
        for para in body.split("\n\n"):
            if para.startswith((" ", "\t")) or "::" in para[-3:]:
                continue  # code examples and grammar productions are not prose
            for s in re.split(r"(?<=[.!?])\s+", _clean(para)):
                words = s.split()
                if 6 <= len(words) <= 22 and s[0].isupper() and s.endswith("."):
                    out.append(s)
    return list(dict.fromkeys(out))


_PYREF = {
    "control flow and exceptions": ["if", "while", "for", "break", "continue", "pass", "compound", "with",
                                    "else", "exceptions", "raise", "try", "assert"],
    "functions and classes": ["function", "class", "lambda", "return", "yield", "calls", "callable-types",
                              "customization", "attribute-access"],
    "numbers and operators": ["binary", "bitwise", "comparisons", "power", "unary", "shifting", "booleans",
                              "operator-summary", "integers", "floating", "imaginary", "numeric-types", "numbers"],
    "strings": ["strings", "formatstrings", "string-methods"],
    "containers": ["lists", "dict", "typesmapping", "typesseq", "typesseq-mutable", "sequence-types", "slicings"],
    "names and modules": ["import", "naming", "global", "nonlocal", "execmodel", "identifiers", "typesmodules"],
}


def _pyref() -> TextTask:
    texts, labels = [], []
    seen: set[str] = set()
    for i, topics in enumerate(_PYREF.values()):
        for s in _reference_sentences(topics):
            if s not in seen:  # a sentence shared by two parts would have two labels
                seen.add(s)
                texts.append(s)
                labels.append(i)
    classes = list(_PYREF)
    desc = [[f"Python documentation about {c}", c] for c in classes]
    return TextTask("pyref", texts, labels, classes, desc, "pydoc_data.topics (Python language reference)")


def _grammar() -> TextTask:
    rng = np.random.default_rng(12345)
    sents = _reference_sentences(sorted({t for ts in _PYREF.values() for t in ts} ^ set()))
    texts, labels = [], []
    for j, s in enumerate(sents):
        words = s.rstrip(".").split()
        if j % 2:
            perm = rng.permutation(len(words))
            while (perm == np.arange(len(words))).all():
                perm = rng.permutation(len(words))
            words = [words[k] for k in perm]
            s, y = " ".join(words).capitalize() + ".", 0
        else:
            y = 1
        texts.append(s)
        labels.append(y)
    classes = ["unacceptable", "acceptable"]
    desc = [["a jumble of words in random order", "an ungrammatical sentence"],
            ["a fluent, grammatical English sentence", "a well-formed sentence"]]
    return TextTask("grammar", texts, labels, classes, desc,
                    "pydoc_data.topics sentences; half with their words shuffled (seed 12345)")


_BLOCKS = {
    "arrows": [(0x2190, 0x21FF), (0x27F0, 0x27FF), (0x2900, 0x297F), (0x2B00, 0x2B73)],
    "mathematical operators": [(0x2200, 0x22FF), (0x2A00, 0x2AFF)],
    "box drawing": [(0x2500, 0x259F)],
    "geometric shapes": [(0x25A0, 0x25FF), (0x1F780, 0x1F7D8)],
    "faces and people": [(0x1F600, 0x1F64F), (0x1F466, 0x1F487), (0x1F910, 0x1F92F)],
    "music": [(0x1D100, 0x1D1EA)],
    "games": [(0x1F000, 0x1F0F5), (0x2654, 0x265F), (0x2680, 0x2685)],
}


def _unicode() -> TextTask:
    texts, labels = [], []
    for i, ranges in enumerate(_BLOCKS.values()):
        for lo, hi in ranges:
            for cp in range(lo, hi + 1):
                name = unicodedata.name(chr(cp), "")
                if name:
                    texts.append(name.lower())
                    labels.append(i)
    classes = list(_BLOCKS)
    desc = [[f"a symbol for {c}", f"{c} symbol"] for c in classes]
    return TextTask("unicode", texts, labels, classes, desc, f"unicodedata names (Unicode {unicodedata.unidata_version})")


TEXT_TASKS: dict[str, Callable[[], TextTask]] = {
    "colors": _colors, "cities": _cities, "language": _language, "code": _code,
    "docs": _docs, "grammar": _grammar, "unicode": _unicode, "pyref": _pyref,
}


def build_task(name: str) -> TextTask:
    """Build task ``name`` from the installed packages' text (deterministic)."""
    if name not in TEXT_TASKS:
        raise KeyError(f"unknown text task {name!r}; known: {', '.join(TEXT_TASKS)}")
    return TEXT_TASKS[name]()


def split_task(task: TextTask, sizes: dict[str, int], seed: int = 0) -> dict[str, tuple[list[str], list[int]]]:
    """Seeded, disjoint splits (e.g. ``{"test": 128, "val": 64, "train": 256}``), class-balanced.

    Splits are filled in the order given, each round-robin over the shuffled classes: list
    ``test`` first so that a small class is never missing from it; a task with fewer examples
    than asked gives its last split fewer.
    """
    rng = np.random.default_rng(seed)
    by_class = [list(rng.permutation([i for i, y in enumerate(task.labels) if y == c]))
                for c in range(len(task.classes))]
    pos = [0] * len(by_class)
    out = {}
    for split, n in sizes.items():
        idx: list[int] = []
        while len(idx) < n and any(p < len(b) for p, b in zip(pos, by_class)):
            for c, b in enumerate(by_class):
                if len(idx) < n and pos[c] < len(b):
                    idx.append(int(b[pos[c]]))
                    pos[c] += 1
        idx = list(rng.permutation(idx)) if idx else []
        out[split] = ([task.texts[i] for i in idx], [task.labels[i] for i in idx])
    return out
