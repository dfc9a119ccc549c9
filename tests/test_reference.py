"""Transcribed paper tables: CSV format, every cell checked against the paper text, loader behaviour."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import pytest

from mergebook import reference

REPO = Path(__file__).resolve().parents[1]
CSV_DIR = REPO / "book" / "paper_tables"
TEXT_DIR = Path(__file__).resolve().parent / "data" / "papers"
HEADER = ["paper", "table", "row", "column", "value"]
PAPERS = ["adamerging", "concrete_subspace", "cart"]

# Every transcribed table (block) and its number of cells; guards against silently dropped tables or rows.
EXPECTED_CELLS = {
    "adamerging": {
        "1": 99, "2": 81, "3:unseen MNIST+EuroSAT": 40, "3:unseen RESISC45+SVHN": 40, "5": 54,
        "6:unseen EuroSAT+MNIST": 20, "6:unseen RESISC45+SVHN": 20,
        **{f"{t}:{g}": 10 for t in ("4", "7") for g in (
            "Clean", "Motion Blur", "Impulse Noise", "Gaussian Noise", "Pixelate", "Spatter", "Contrast",
            "JPEG Compression")},
    },
    "concrete_subspace": {
        "1": 126, "2": 99, "3:unseen MNIST+EuroSAT": 60, "3:unseen RESISC45+SVHN": 60, "4": 63, "5": 63,
        "6": 72, "7": 72, "8": 72, "9": 72, "10": 99, "11": 99, "12": 99, "13": 99, "14": 99,
    },
    "cart": {"1": 108, "2": 108},
}


def _read_csv(paper: str) -> list[dict[str, str]]:
    with open(CSV_DIR / f"{paper}.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header == HEADER, f"{paper}.csv header is {header}"
        return [dict(zip(HEADER, r, strict=True)) for r in reader]


# --------------------------------------------------------------------------------------------------
# The paper text, read independently of how the CSVs were produced.

_CITATION = re.compile(r"\s*(\([^()]*\d{4}[a-z]?\)|\[\d+(,\s*\d+)*\])$")
_HEADER_FIRST = {"Method", "Model", "Scaling Coeff.", "Step", "TTA Step"}


def _table_lines(paper: str, table: str) -> list[list[str]]:
    """The lines (as cell lists) of the printed table ``table`` ("3:..." -> table 3)."""
    lines = (TEXT_DIR / f"{paper}.txt").read_text(encoding="utf-8").splitlines()
    number = table.split(":")[0]
    if paper == "cart":  # no captions in this text: the k-th pipe table is "Table k" (see the prose after it)
        blocks: list[list[list[str]]] = []
        inside = False
        for line in lines:
            if line.startswith("| Method |"):
                blocks.append([])
                inside = True
            elif not line.startswith("|"):
                inside = False
            if inside and not line.startswith("|---"):
                blocks[-1].append([c.strip() for c in line.strip().strip("|").split("|")])
        return blocks[int(number) - 1]
    start = [i for i, ln in enumerate(lines) if ln.startswith(f"Table {number}:")]
    assert len(start) == 1, f"{paper}: caption 'Table {number}:' found {len(start)} times"
    out = []
    for ln in lines[start[0] + 1:]:
        if re.match(r"Table \d+:", ln):
            break
        if "\t" in ln:
            out.append(ln.split("\t"))
    return out


def _is_number(s: str) -> bool:
    return re.fullmatch(r"-?\d+(\.\d+)?", s.strip()) is not None


def _printed(s: str) -> str:
    """A printed number as the CSV stores it: leading zeros dropped ("03.8" -> "3.8"), precision kept."""
    s = s.strip().lstrip("0")
    return "0" + s if (s == "" or s.startswith(".")) else s


def _row_matches(cell: str, row: str) -> bool:
    cell = cell.strip()
    return cell == row or (cell.startswith(row) and _CITATION.fullmatch(cell[len(row):]) is not None)


def _column_matches(printed: str, column: str) -> bool:
    column = re.sub(r" \((Seen|Unseen) Tasks\)$", "", column)  # documented qualifier of repeated Avg columns
    return printed.strip() == column or (printed.strip() == "GRSRB" and column == "GTSRB")  # documented typo fix


def check_row(paper: str, table: str, row: str, columns: list[str], values: list[str]) -> str | None:
    """None if some printed line of the table has exactly these values, in order, under these headers."""
    header: list[str] | None = None
    candidates = []
    for cells in _table_lines(paper, table):
        first, rest = cells[0].strip(), cells[1:]
        if first in _HEADER_FIRST or first == "":
            if rest and all(c.strip() and not _is_number(c) for c in rest):
                header = rest  # a column-header line (group-header lines have empty cells)
            continue
        if _row_matches(first, row):
            candidates.append((header, rest))
    if not candidates:
        return f"{paper} table {table}: no printed line starts with {row!r}"
    n = len(values)
    for hdr, rest in candidates:
        for off in range(len(rest) - n + 1):
            window = rest[off:off + n]
            if not all(_is_number(c) for c in window):
                continue
            if [_printed(c) for c in window] != values:
                continue
            if hdr is None or len(hdr) != len(rest):
                continue
            if all(_column_matches(h, c) for h, c in zip(hdr[off:off + n], columns)):
                return None
    return (f"{paper} table {table} row {row!r}: values {values} under columns {columns} not found in "
            f"printed lines {[r for _, r in candidates]}")


def _rows_of(paper: str, table: str) -> list[tuple[str, list[str], list[str]]]:
    out: dict[str, tuple[list[str], list[str]]] = {}
    for r in _read_csv(paper):
        if r["table"] == table:
            cols, vals = out.setdefault(r["row"], ([], []))
            cols.append(r["column"])
            vals.append(r["value"])
    return [(row, cols, vals) for row, (cols, vals) in out.items()]


# --------------------------------------------------------------------------------------------------
# (a) format


@pytest.mark.parametrize("paper", PAPERS)
def test_csv_format(paper):
    rows = _read_csv(paper)
    assert rows, f"{paper}.csv is empty"
    keys = [(r["paper"], r["table"], r["row"], r["column"]) for r in rows]
    dupes = {k for k in keys if keys.count(k) > 1}
    assert not dupes, f"duplicate keys: {sorted(dupes)[:5]}"
    for r in rows:
        assert r["paper"] == paper
        assert re.fullmatch(r"\d+(:.+)?", r["table"]), r
        assert r["row"] and r["column"] and r["row"] == r["row"].strip()
        assert re.fullmatch(r"\d+(\.\d+)?", r["value"]), r  # as printed, no leading zeros
        assert math.isfinite(float(r["value"])) and 0.0 <= float(r["value"]) <= 100.0, r


@pytest.mark.parametrize("paper", PAPERS)
def test_all_tables_present(paper):
    counts: dict[str, int] = {}
    for r in _read_csv(paper):
        counts[r["table"]] = counts.get(r["table"], 0) + 1
    assert counts == EXPECTED_CELLS[paper]


def test_loader_reads_every_csv():
    for paper in PAPERS:
        df = reference.load_paper_table(paper)
        assert list(df.columns) == HEADER
        assert len(df) == sum(EXPECTED_CELLS[paper].values())
        assert df["value"].map(math.isfinite).all()


# --------------------------------------------------------------------------------------------------
# (b) every transcribed cell is printed in the paper, in its row's line, under its column header

ALL_TABLES = [(p, t) for p in PAPERS for t in EXPECTED_CELLS[p]]


@pytest.mark.parametrize("paper,table", ALL_TABLES, ids=[f"{p}-{t}" for p, t in ALL_TABLES])
def test_cells_match_paper_text(paper, table):
    rows = _rows_of(paper, table)
    assert rows
    problems = [m for row, cols, vals in rows if (m := check_row(paper, table, row, cols, vals))]
    assert not problems, "\n".join(problems)
    if ":unseen " in table:  # the block label names the unseen tasks of that block
        unseen = table.split(":unseen ")[1].split("+")
        assert all(u in rows[0][1] for u in unseen)


def test_checker_catches_mistyped_values():
    row, cols, vals = next(r for r in _rows_of("adamerging", "1") if r[0] == "Task Arithmetic")
    assert check_row("adamerging", "1", row, cols, vals) is None
    typo = list(vals)
    typo[3] = "78.8"  # printed 78.9
    assert check_row("adamerging", "1", row, cols, typo) is not None
    swapped = list(cols)
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert check_row("adamerging", "1", row, swapped, vals) is not None
    # a row moved into the other generalization block is caught by its headers
    row, cols, vals = _rows_of("adamerging", "3:unseen RESISC45+SVHN")[0]
    other_cols = _rows_of("adamerging", "3:unseen MNIST+EuroSAT")[0][1]
    assert check_row("adamerging", "3:unseen RESISC45+SVHN", row, other_cols, vals) is not None


# --------------------------------------------------------------------------------------------------
# (c) anchors, checked against the loader and the text


ANCHORS = [
    ("adamerging", "1", "Task Arithmetic", "Avg Acc", 69.1),
    ("adamerging", "1", "Ties-Merging", "Avg Acc", 72.4),
    ("adamerging", "1", "Weight Averaging", "Avg Acc", 65.8),
    ("adamerging", "1", "Layer-wise AdaMerging (Ours)", "Avg Acc", 80.1),
    ("adamerging", "1", "Layer-wise AdaMerging++ (Ours)", "Avg Acc", 81.1),
    ("adamerging", "2", "Ties-Merging", "Avg Acc", 86.0),
    ("adamerging", "2", "AdaMerging++ (Ours)", "Avg Acc", 91.0),
    ("adamerging", "4:Pixelate", "Task Arithmetic", "Cars", 2.78),
    ("adamerging", "7:Pixelate", "Task Arithmetic", "Cars", 3.8),
    ("adamerging", "3:unseen MNIST+EuroSAT", "AdaMerging (Ours)", "Avg Acc (Unseen Tasks)", 70.0),
    ("concrete_subspace", "1", "LW Concrete AM", "Avg.", 84.0),
    ("concrete_subspace", "1", "Concrete TA", "GTSRB", 81.9),
    ("concrete_subspace", "10", "0.3", "Avg.", 69.0),
    ("concrete_subspace", "13", "0", "Avg", 69.0),
    ("concrete_subspace", "8", "STSB", "MNLI", 1.7),
    ("cart", "1", "CART (Ours)", "Average", 83.0),
    ("cart", "1", "CART++ (Ours)", "Average", 86.6),
    ("cart", "2", "CART++ (Ours)", "Average", 92.6),
    ("cart", "2", "AdaMerging", "Average", 90.8),
]


@pytest.mark.parametrize("paper,table,row,column,value", ANCHORS)
def test_anchor(paper, table, row, column, value):
    assert reference.reported(paper, table, row, column) == pytest.approx(value, abs=1e-9)


def test_adamerging_table1_anchor_lines_in_text():
    text = (TEXT_DIR / "adamerging.txt").read_text(encoding="utf-8")
    t1 = text.split("Table 1:")[1].split("Table 2:")[0]
    for line_start, avg in [("Weight Averaging\t", "65.8"), ("Task Arithmetic (Ilharco", "69.1"),
                            ("Ties-Merging (Yadav", "72.4"), ("Layer-wise AdaMerging (Ours)\t", "80.1"),
                            ("Layer-wise AdaMerging++ (Ours)\t", "81.1")]:
        (line,) = [ln for ln in t1.splitlines() if ln.startswith(line_start)]
        assert line.split("\t")[-1] == avg


# --------------------------------------------------------------------------------------------------
# (d) loader API


def test_reported_unknown_row_raises_keyerror_naming_it():
    with pytest.raises(KeyError) as exc:
        reference.reported("adamerging", "1", "No Such Method", "Avg Acc")
    msg = str(exc.value)
    assert "No Such Method" in msg and "Task Arithmetic" in msg


def test_reported_unknown_column_table_paper():
    with pytest.raises(KeyError, match="Avg Acc"):
        reference.reported("concrete_subspace", "1", "Task Arithmetic", "Avg Acc")  # it prints "Avg."
    with pytest.raises(KeyError, match="99"):
        reference.reported("adamerging", "99", "Task Arithmetic", "Avg Acc")
    with pytest.raises(KeyError, match="nope"):
        reference.load_paper_table("nope")


def test_wide_preserves_printed_order():
    wide = reference.paper_table_wide("adamerging", "1")
    assert list(wide.columns) == ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD",
                                  "Avg Acc"]
    assert list(wide.index)[:3] == ["Individual", "Traditional MTL", "Weight Averaging"]
    assert list(wide.index)[-1] == "Layer-wise AdaMerging++ (Ours)"
    assert wide.loc["Task Arithmetic", "Avg Acc"] == pytest.approx(69.1)
    steps = reference.paper_table_wide("concrete_subspace", "12")
    assert list(steps.index) == [str(s) for s in range(0, 2001, 200)]


def test_env_var_override(tmp_path, monkeypatch):
    (tmp_path / "toy.csv").write_text("paper,table,row,column,value\ntoy,1,A,x,1.5\ntoy,1,A,y,2\n")
    monkeypatch.setenv(reference.ENV_VAR, str(tmp_path))
    assert reference.tables_dir() == tmp_path
    assert reference.reported("toy", "1", "A", "y") == 2.0
    monkeypatch.delenv(reference.ENV_VAR)
    assert reference.tables_dir() == CSV_DIR
