"""Numbers reported in the papers, transcribed from their results tables (see book/paper_tables/README.md)."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

COLUMNS = ["paper", "table", "row", "column", "value"]
PAPERS = ("adamerging", "concrete_subspace", "cart", "spectral")  # spectral: authors' result files, not paper text
ENV_VAR = "MERGEBOOK_PAPER_TABLES"


def tables_dir() -> Path:
    """Directory holding the ``<paper>.csv`` files (``$MERGEBOOK_PAPER_TABLES`` overrides the repo copy)."""
    override = os.environ.get(ENV_VAR)
    if override:
        return Path(override).expanduser()
    return Path(__file__).resolve().parents[2] / "book" / "paper_tables"


@functools.lru_cache(maxsize=None)
def _read(path: str, mtime_ns: int) -> pd.DataFrame:
    df = pd.read_csv(path, dtype={"paper": str, "table": str, "row": str, "column": str, "value": float},
                     keep_default_na=False)
    if list(df.columns) != COLUMNS:
        raise ValueError(f"{path}: header must be {','.join(COLUMNS)}, got {','.join(map(str, df.columns))}")
    return df


def load_paper_table(paper: str, table: str | None = None) -> pd.DataFrame:
    """Long-format cells (paper, table, row, column, value) of one paper, optionally of one table."""
    path = tables_dir() / f"{paper}.csv"
    if not path.is_file():
        known = sorted(p.stem for p in tables_dir().glob("*.csv"))
        raise KeyError(f"no transcribed tables for paper {paper!r} (looked for {path}); available: {known}")
    df = _read(str(path), path.stat().st_mtime_ns)
    if table is not None:
        sel = df[df["table"] == str(table)]
        if sel.empty:
            raise KeyError(f"paper {paper!r} has no table {table!r}; available: {list(dict.fromkeys(df['table']))}")
        df = sel
    return df.reset_index(drop=True).copy()


def paper_table_wide(paper: str, table: str) -> pd.DataFrame:
    """One table as rows x columns, in the printed row and column order (missing cells are NaN)."""
    df = load_paper_table(paper, table)
    rows = list(dict.fromkeys(df["row"]))
    cols = list(dict.fromkeys(df["column"]))
    wide = df.pivot(index="row", columns="column", values="value").reindex(index=rows, columns=cols)
    wide.index.name = "row"
    wide.columns.name = None
    return wide


def reported(paper: str, table: str, row: str, column: str) -> float:
    """The single value the paper prints in ``table`` at (``row``, ``column``); KeyError if absent."""
    df = load_paper_table(paper, table)
    rows = list(dict.fromkeys(df["row"]))
    cols = list(dict.fromkeys(df["column"]))
    if row not in rows:
        raise KeyError(f"{paper} table {table}: no row {row!r}; available rows: {rows}")
    if column not in cols:
        raise KeyError(f"{paper} table {table}: no column {column!r}; available columns: {cols}")
    cell = df[(df["row"] == row) & (df["column"] == column)]
    if cell.empty:
        have = list(df.loc[df["row"] == row, "column"])
        raise KeyError(f"{paper} table {table}: row {row!r} has no number in column {column!r} "
                       f"(non-numeric in the paper); it has: {have}")
    return float(cell["value"].iloc[0])


# --------------------------------------------------------------------------------------------------
# Method → paper row, profile → table
# --------------------------------------------------------------------------------------------------
# The book's method names (plotting.METHOD_COLORS) and, per paper, the printed rows that report the
# same method. Candidates are tried in order and the first present in the table wins: the papers
# rename rows between tables (AdaMerging Table 1 "Layer-wise AdaMerging (Ours)" is Table 2's
# "AdaMerging (Ours)"; the Concrete paper writes "LW AM" in Tables 1-2 and "AdaMerging" in Table 3).
PAPER_ROWS: dict[str, dict[str, tuple[str, ...]]] = {
    "adamerging": {
        "Individual": ("Individual",),
        "Traditional MTL": ("Traditional MTL",),
        "Weight Averaging": ("Weight Averaging",),
        "Fisher Merging": ("Fisher Merging",),
        "RegMean": ("RegMean",),
        "Task Arithmetic": ("Task Arithmetic",),
        "Ties-Merging": ("Ties-Merging",),
        "Task-wise AdaMerging": ("Task-wise AdaMerging (Ours)",),
        "Task-wise AdaMerging++": ("Task-wise AdaMerging++ (Ours)",),
        # the L/14, generalisation and robustness tables report the layer-wise variant as "AdaMerging"
        "Layer-wise AdaMerging": ("Layer-wise AdaMerging (Ours)", "AdaMerging (Ours)"),
        "Layer-wise AdaMerging++": ("Layer-wise AdaMerging++ (Ours)", "AdaMerging++ (Ours)"),
    },
    "concrete_subspace": {
        "Individual": ("Individual",),
        "Traditional MTL": ("Traditional MTL",),
        "Weight Averaging": ("Weight Averaging",),
        "Fisher Merging": ("Fisher Merging",),
        "RegMean": ("RegMean",),
        "Task Arithmetic": ("Task Arithmetic",),
        "Ties-Merging": ("Ties-Merging",),
        "Concrete TA": ("Concrete TA",),
        "Task-wise AdaMerging": ("TW AM",),
        "Task-wise AdaMerging++": ("TW AM++",),
        "Task-wise Concrete AdaMerging": ("TW Concrete AM",),
        "Layer-wise AdaMerging": ("LW AM", "AdaMerging"),
        "Layer-wise AdaMerging++": ("LW AM++", "AdaMerging++"),
        # Table 5 prints "Concrete LW AM", Table 3 "Concrete AM" for the same layer-wise method
        "Layer-wise Concrete AdaMerging": ("LW Concrete AM", "Concrete LW AM", "Concrete AM"),
    },
    "cart": {
        "Pretrained": ("Pretrained",),
        "Individual": ("Individual",),
        "Traditional MTL": ("Traditional MTL",),
        "Weight Averaging": ("Weight Averaging",),
        "Fisher Merging": ("Fisher Merging",),
        "RegMean": ("RegMean",),
        "Task Arithmetic": ("Task Arithmetic",),
        "Ties-Merging": ("Ties-Merging",),
        "CART": ("CART (Ours)",),
        # CART's Tables 1-2 quote layer-wise AdaMerging (80.1 / 90.8, AdaMerging's own numbers)
        "Layer-wise AdaMerging": ("AdaMerging",),
        "Layer-wise AdaMerging++": ("AdaMerging++",),
        "CART++": ("CART++ (Ours)",),
    },
}

# Book labels that name the same method as a PAPER_ROWS key. "Ties-Merging (mean)" is deliberately
# absent: all three papers quote Ties with the `sum` disjoint merge, so the mean rule has no row.
METHOD_ALIASES: dict[str, str] = {
    "Ties-Merging (sum)": "Ties-Merging",
    "Concrete AdaMerging": "Layer-wise Concrete AdaMerging",
    "Concrete AM": "Layer-wise Concrete AdaMerging",
    "Concrete LW AM": "Layer-wise Concrete AdaMerging",
    "Weight averaging": "Weight Averaging",
    "TA": "Task Arithmetic",
    "Ties": "Ties-Merging",
    "MTL": "Traditional MTL",
    "Fisher": "Fisher Merging",
}

# Which printed table holds each kind of result, per architecture. CART prints only the two main
# tables; the Concrete paper's B/16 has none; only AdaMerging has robustness tables.
ARCH_TABLES: dict[str, dict[str, dict[str, str]]] = {
    "ViT-B/32": {"main": {"adamerging": "1", "concrete_subspace": "1", "cart": "1"},
                 "generalization": {"adamerging": "3", "concrete_subspace": "3"},
                 "robustness": {"adamerging": "4"},
                 "individual": {"concrete_subspace": "6"},
                 "ta_sweep": {"concrete_subspace": "10"}, "ties_sweep": {"concrete_subspace": "11"},
                 "concrete_ta_steps": {"concrete_subspace": "12"},
                 "adamerging_steps": {"concrete_subspace": "13"},
                 "concrete_adamerging_steps": {"concrete_subspace": "14"}},
    "ViT-L/14": {"main": {"adamerging": "2", "concrete_subspace": "2", "cart": "2"},
                 "individual": {"concrete_subspace": "7"}},
    "ViT-B/16": {"main": {"adamerging": "5"}, "generalization": {"adamerging": "6"},
                 "robustness": {"adamerging": "7"}},
    "Flan-T5-base": {"main": {"concrete_subspace": "4"}, "individual": {"concrete_subspace": "8"}},
    "Flan-T5-large": {"main": {"concrete_subspace": "5"}, "individual": {"concrete_subspace": "9"}},
}

# Profiles whose Profile.paper_table names no AdaMerging table: the architecture they stand beside.
PROFILE_ARCH: dict[str, str] = {
    "tiny": "ViT-B/32", "hub-pico": "ViT-B/32", "vit-b-32": "ViT-B/32", "vit-l-14": "ViT-L/14",
    "vit-b-16": "ViT-B/16", "flan-t5-base-lora": "Flan-T5-base", "flan-t5-large-lora": "Flan-T5-large",
    "tiny-lm": "Flan-T5-base", "flan-t5-pico": "Flan-T5-base",
    # true-shape random profiles: benchmarks only, compared with the tables of their architecture
    "random-b32": "ViT-B/32", "random-l14": "ViT-L/14",
}


# Concrete Table 2 (ViT-L/14) prints these three rows' task values in alphabetical task order under
# the SUN397, Cars, ... header (book/paper_tables/README.md, "Oddities"): its TA row read that way
# matches AdaMerging Table 2's TA within 0.2 on every task. The CSV keeps the print;
# reported_row reassigns the values to the tasks they belong to unless as_printed=True.
ALPHABETICAL_ROWS: dict[tuple[str, str], tuple[str, ...]] = {
    ("concrete_subspace", "2"): ("Task Arithmetic", "Ties-Merging", "Concrete TA"),
}


def canonical_method(name: str) -> str:
    """The book's method name behind a row label (``"Task Arithmetic, λ=0.3 (val-selected)"`` → TA)."""
    base = name.split(", ")[0]
    base = base.split(" (λ")[0].strip()
    return METHOD_ALIASES.get(base, base)


def _profile(profile: Any) -> Any:
    if isinstance(profile, str):
        from .profiles import get_profile

        return get_profile(profile)
    return profile


def reference_arch(profile: Any) -> str:
    """The architecture whose reported tables a profile is compared with (``"ViT-B/32"``, ...)."""
    p = _profile(profile)
    ada = getattr(p, "paper_table", {}).get("adamerging")
    if ada is not None:
        for arch, kinds in ARCH_TABLES.items():
            if kinds["main"].get("adamerging") == str(ada):
                return arch
    if p.name in PROFILE_ARCH:
        return PROFILE_ARCH[p.name]
    raise KeyError(f"profile {p.name!r} names no reference architecture: add its AdaMerging table to "
                   f"Profile.paper_table or its architecture to reference.PROFILE_ARCH (known: {list(ARCH_TABLES)})")


def paper_table(paper: str, profile: Any, kind: str = "main") -> str:
    """The table number of ``paper`` that matches ``profile`` for ``kind`` (main, generalization, ...).

    ``Profile.paper_table`` wins for the main table when it names the paper; otherwise the
    architecture's tables in :data:`ARCH_TABLES` decide. A paper without such a table at this scale
    is a KeyError that says which papers have one.
    """
    if paper not in PAPERS:
        raise KeyError(f"unknown paper {paper!r}; known papers: {list(PAPERS)}")
    p = _profile(profile)
    if kind == "main" and paper in getattr(p, "paper_table", {}):
        return str(p.paper_table[paper])
    arch = reference_arch(p)
    kinds = ARCH_TABLES[arch]
    if kind not in {k for a in ARCH_TABLES.values() for k in a}:
        raise KeyError(f"unknown table kind {kind!r}; known kinds: "
                       f"{sorted({k for a in ARCH_TABLES.values() for k in a})}")
    table = kinds.get(kind, {}).get(paper)
    if table is None:
        have = sorted(kinds.get(kind, {}))
        raise KeyError(f"{paper} prints no {kind} table for {arch} (profile {p.name!r}); "
                       f"papers with one: {have or 'none'}")
    return table


def table_blocks(paper: str, table: str) -> list[str]:
    """The table ids of one printed table: ``["1"]``, or its blocks (``"3:unseen MNIST+EuroSAT"``, ...)."""
    ids = list(dict.fromkeys(load_paper_table(paper)["table"]))
    blocks = [t for t in ids if t == str(table) or t.startswith(f"{table}:")]
    if not blocks:
        raise KeyError(f"paper {paper!r} has no table {table!r}; available: {ids}")
    return blocks


def paper_row(paper: str, table: str, method: str) -> str | None:
    """The printed row of ``table`` that reports ``method`` (a book name or alias), or None."""
    if paper not in PAPER_ROWS:
        raise KeyError(f"unknown paper {paper!r}; known papers: {list(PAPER_ROWS)}")
    rows = set(load_paper_table(paper, table)["row"])
    for cand in PAPER_ROWS[paper].get(canonical_method(method), ()):
        if cand in rows:
            return cand
    return None


def _is_avg(column: str) -> bool:
    return column.lower().startswith("av")


def reported_row(paper: str, profile: Any, method: str, kind: str = "main",
                 block: str | None = None, as_printed: bool = False) -> dict[str, float]:
    """``{column: value}`` of the row ``paper`` reports for ``method`` at the profile's scale.

    Columns are the printed task names; the average column is renamed ``"avg"`` (qualified
    averages such as ``Avg Acc (Unseen Tasks)`` become ``"avg (unseen tasks)"``). For a table in
    blocks (generalization, robustness) pass ``block`` (``"unseen MNIST+EuroSAT"``, ``"Contrast"``).
    Rows printed in the wrong task order (:data:`ALPHABETICAL_ROWS`) are put right unless
    ``as_printed``.
    """
    table = paper_table(paper, profile, kind)
    blocks = table_blocks(paper, table)
    if len(blocks) > 1 or block is not None:
        tid = f"{table}:{block}" if block is not None else None
        if tid not in blocks:
            raise KeyError(f"{paper} table {table} is printed in blocks; pass block= one of "
                           f"{[b.split(':', 1)[1] for b in blocks if ':' in b]}")
    else:
        tid = blocks[0]
    row = paper_row(paper, tid, method)
    if row is None:
        known = [m for m in PAPER_ROWS[paper] if paper_row(paper, tid, m) is not None]
        raise KeyError(f"{paper} table {tid} reports no row for {method!r}; methods it reports: {known}")
    df = load_paper_table(paper, tid)
    cells = df[df["row"] == row]
    printed = list(cells["column"])
    cols, vals = list(printed), list(cells["value"])
    if not as_printed and row in ALPHABETICAL_ROWS.get((paper, tid), ()):
        task_pos = [i for i, c in enumerate(cols) if not _is_avg(c)]
        for pos, col in zip(task_pos, sorted(cols[i] for i in task_pos)):
            cols[pos] = col
        # keep the printed header order in the result
        by_col = dict(zip(cols, vals))
        cols, vals = printed, [by_col[c] for c in printed]
    out = {}
    for col, v in zip(cols, vals):
        if _is_avg(col):
            qual = col.split("(", 1)[1].rstrip(")").lower() if "(" in col else ""
            col = f"avg ({qual})" if qual else "avg"
        out[col] = float(v)
    return out


def reported_rows(paper: str, profile: Any, methods: Sequence[str], kind: str = "main",
                  block: str | None = None) -> dict[str, dict[str, float] | None]:
    """:func:`reported_row` for each method, with None where the paper has no such row."""
    out: dict[str, dict[str, float] | None] = {}
    for m in methods:
        try:
            out[m] = reported_row(paper, profile, m, kind, block)
        except KeyError as e:
            if "reports no row" not in str(e):
                raise
            out[m] = None
    return out


def reported_average(paper: str, profile: Any, method: str, kind: str = "main") -> float:
    """The average ``paper`` reports for ``method`` at the profile's scale (NaN if it has no row/table)."""
    try:
        return reported_row(paper, profile, method, kind).get("avg", float("nan"))
    except KeyError:
        return float("nan")


def reported_frame(profile: Any, methods: Sequence[str], papers: Sequence[str] = PAPERS) -> pd.DataFrame:
    """Methods x papers: each paper's own reported average for the method (NaN where it has none)."""
    data = {}
    for paper in papers:
        try:
            paper_table(paper, profile)
        except KeyError:
            continue  # this paper prints no table at the profile's scale
        data[paper] = [reported_average(paper, profile, m) for m in methods]
    df = pd.DataFrame(data, index=list(methods))
    df.index.name = "method"
    return df


def kendall_tau(a: Sequence[float] | Mapping[str, float], b: Sequence[float] | Mapping[str, float]) -> float:
    """Kendall's τ-b between two rankings (ties handled as scipy.stats.kendalltau does).

    Mappings are compared on their shared keys with finite values in both (e.g. our averages
    against a paper's, over the methods both report). NaN when fewer than two pairs remain or one
    side is constant.
    """
    if isinstance(a, Mapping) or isinstance(b, Mapping):
        if not (isinstance(a, Mapping) and isinstance(b, Mapping)):
            raise TypeError("kendall_tau: pass two sequences or two mappings, not one of each")
        keys = [k for k in a if k in b and np.isfinite(a[k]) and np.isfinite(b[k])]
        x = np.array([a[k] for k in keys], dtype=float)
        y = np.array([b[k] for k in keys], dtype=float)
    else:
        x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
        if x.shape != y.shape or x.ndim != 1:
            raise ValueError(f"kendall_tau: need two 1-d sequences of equal length, got {x.shape} and {y.shape}")
    if x.size < 2:
        return float("nan")
    i, j = np.triu_indices(x.size, k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    # τ-b: concordant minus discordant pairs over the geometric mean of the pairs untied in each
    denom = math.sqrt(float(np.count_nonzero(sx)) * float(np.count_nonzero(sy)))
    return float(np.sum(sx * sy) / denom) if denom > 0 else float("nan")


def first_reported(profile: Any, method: str, papers: Sequence[str] = PAPERS, kind: str = "main") -> float:
    """The first paper (in ``papers`` order) that reports ``method`` at the profile's scale: its average.

    Chapter 01 quotes AdaMerging's Table 1 and falls back to CART's for the pretrained row, which
    only CART prints: ``first_reported(profile, "Pretrained", ("adamerging", "cart"))``. NaN if none.
    """
    for paper in papers:
        v = reported_average(paper, profile, method, kind)
        if np.isfinite(v):
            return v
    return float("nan")


# --------------------------------------------------------------------------------------------------
# Generalisation (unseen tasks) and robustness (corruptions) blocks
# --------------------------------------------------------------------------------------------------
def generalization_block(paper: str, profile: Any, unseen: Sequence[str]) -> str:
    """The block of ``paper``'s generalization table whose unseen tasks are ``unseen`` (paper task
    names, any order): ``"unseen MNIST+EuroSAT"`` (AdaMerging Table 6 prints it ``EuroSAT+MNIST``).
    KeyError when the profile's scale has no such table or block."""
    table = paper_table(paper, profile, "generalization")
    want = set(unseen)
    labels = [b.split(":", 1)[1] for b in table_blocks(paper, table) if ":" in b]
    for label in labels:
        if label.startswith("unseen ") and set(label[len("unseen "):].split("+")) == want:
            return label
    raise KeyError(f"{paper} table {table} has no block with unseen tasks {sorted(want)}; blocks: {labels}")


def reported_generalization(paper: str, profile: Any, methods: Sequence[str],
                            unseen: Sequence[str]) -> dict[str, dict[str, float] | None]:
    """Each method's printed row of the generalization block for ``unseen`` (None where absent):
    ``{task: value, "avg (seen tasks)": v, "avg (unseen tasks)": v}`` in paper task names. A profile
    without a generalization table at its scale raises KeyError ("prints no generalization table")."""
    return reported_rows(paper, profile, methods, "generalization", generalization_block(paper, profile, unseen))


def robustness_block(corruption: str) -> str:
    """AdaMerging's robustness block for a corruption key or name (``"clean"`` → ``"Clean"``)."""
    from .data.corruptions import PAPER_NAMES, canonical

    return "Clean" if str(corruption).lower() == "clean" else PAPER_NAMES[canonical(corruption)]


def reported_robustness(profile: Any, methods: Sequence[str], corruption: str) -> dict[str, dict[str, float] | None]:
    """AdaMerging's printed row per method for one corruption (Table 4 on B/32, 7 on B/16)."""
    return reported_rows("adamerging", profile, methods, "robustness", robustness_block(corruption))
