"""Numbers reported in the papers, transcribed from their results tables (see book/paper_tables/README.md)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pandas as pd

COLUMNS = ["paper", "table", "row", "column", "value"]
PAPERS = ("adamerging", "concrete_subspace", "cart")
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
