"""Method → paper row, profile → paper table, reported rows, and Kendall's τ."""

from __future__ import annotations

import math
from itertools import permutations

import numpy as np
import pytest
from scipy.stats import kendalltau

from mergebook import reference as ref
from mergebook.plotting import METHOD_COLORS
from mergebook.profiles import PROFILES


@pytest.mark.parametrize("profile, paper, table", [
    ("vit-b-32", "adamerging", "1"), ("vit-l-14", "adamerging", "2"), ("vit-b-16", "adamerging", "5"),
    ("vit-b-32", "concrete_subspace", "1"), ("vit-l-14", "concrete_subspace", "2"),
    ("vit-b-32", "cart", "1"), ("vit-l-14", "cart", "2"),
    ("tiny", "adamerging", "1"), ("tiny", "cart", "1"),  # the miniature stands beside B/32
])
def test_profile_selects_the_table_of_its_scale(profile, paper, table):
    assert ref.paper_table(paper, profile) == table
    assert ref.paper_table(paper, PROFILES[profile]) == table


def test_profile_paper_table_agrees_with_the_architecture_map():
    # Profile.paper_table (profiles.py) is the source for AdaMerging; the arch map must not contradict it
    for name, p in PROFILES.items():
        for paper, table in p.paper_table.items():
            assert ref.ARCH_TABLES[ref.reference_arch(p)]["main"].get(paper, table) == table, name


def test_other_kinds_and_missing_tables_say_which_papers_have_one():
    assert ref.paper_table("adamerging", "vit-b-16", "robustness") == "7"
    assert ref.paper_table("adamerging", "tiny", "generalization") == "3"
    assert ref.table_blocks("adamerging", "3") == ["3:unseen MNIST+EuroSAT", "3:unseen RESISC45+SVHN"]
    with pytest.raises(KeyError, match="cart prints no main table for ViT-B/16.*adamerging"):
        ref.paper_table("cart", "vit-b-16")
    with pytest.raises(KeyError, match="unknown table kind"):
        ref.paper_table("cart", "tiny", "robust")
    with pytest.raises(KeyError, match="unknown paper"):
        ref.paper_table("nope", "tiny")


def test_every_mapped_row_exists_in_some_table_of_its_paper():
    # a typo in PAPER_ROWS would silently give "no reported number"; every candidate must be printed
    for paper, methods in ref.PAPER_ROWS.items():
        rows = set(ref.load_paper_table(paper)["row"])
        for method, cands in methods.items():
            for c in cands:
                assert c in rows, f"{paper}: {method} → {c!r} is in no table"


def test_every_main_table_row_is_mapped_to_a_book_method():
    for arch, kinds in ref.ARCH_TABLES.items():
        for paper, table in kinds["main"].items():
            rows = set(ref.load_paper_table(paper, table)["row"])
            mapped = {ref.paper_row(paper, table, m) for m in ref.PAPER_ROWS[paper]}
            assert rows <= mapped, f"{paper} table {table}: unmapped rows {rows - mapped}"


@pytest.mark.parametrize("paper, table, method, row", [
    ("adamerging", "1", "Layer-wise AdaMerging", "Layer-wise AdaMerging (Ours)"),
    ("adamerging", "2", "Layer-wise AdaMerging", "AdaMerging (Ours)"),
    ("adamerging", "2", "Task-wise AdaMerging", None),
    ("adamerging", "1", "Ties-Merging (sum), λ=0.3 (papers' setting)", "Ties-Merging"),
    ("adamerging", "1", "Ties-Merging (mean)", None),
    ("concrete_subspace", "1", "Concrete AdaMerging", "LW Concrete AM"),
    ("concrete_subspace", "5", "Concrete AdaMerging", "Concrete LW AM"),
    ("concrete_subspace", "3:unseen MNIST+EuroSAT", "Concrete AdaMerging", "Concrete AM"),
    ("concrete_subspace", "3:unseen MNIST+EuroSAT", "Layer-wise AdaMerging", "AdaMerging"),
    ("cart", "1", "Layer-wise AdaMerging", "AdaMerging"),
    ("cart", "1", "CART++", "CART++ (Ours)"),
    ("cart", "1", "Task Arithmetic, λ=0.3 (val-selected)", "Task Arithmetic"),
])
def test_paper_row_by_hand(paper, table, method, row):
    assert ref.paper_row(paper, table, method) == row


def test_reported_row_values_and_average_key():
    r = ref.reported_row("adamerging", "vit-b-32", "Task Arithmetic")
    assert r["avg"] == 69.1 and r["SUN397"] == ref.reported("adamerging", "1", "Task Arithmetic", "SUN397")
    assert list(r)[:2] == ["SUN397", "Cars"] and list(r)[-1] == "avg"
    # the same method on L/14 comes from Table 2
    assert ref.reported_row("adamerging", "vit-l-14", "Task Arithmetic")["avg"] == 84.5
    g = ref.reported_row("concrete_subspace", "tiny", "Concrete TA", kind="generalization",
                         block="unseen MNIST+EuroSAT")
    assert {"avg (seen tasks)", "avg (unseen tasks)", "MNIST"} <= set(g)


def test_reported_row_errors_name_the_fix():
    with pytest.raises(KeyError, match="pass block= one of"):
        ref.reported_row("adamerging", "tiny", "Task Arithmetic", kind="robustness")
    with pytest.raises(KeyError, match="reports no row for 'CART'.*Task Arithmetic"):
        ref.reported_row("adamerging", "tiny", "CART")


def test_concrete_l14_rows_printed_alphabetically_are_put_right():
    fixed = ref.reported_row("concrete_subspace", "vit-l-14", "Task Arithmetic")
    printed = ref.reported_row("concrete_subspace", "vit-l-14", "Task Arithmetic", as_printed=True)
    assert printed["SUN397"] == 82.1 and fixed["Cars"] == 82.1 and fixed["DTD"] == 65.6
    assert fixed["avg"] == printed["avg"] and list(fixed) == list(printed)
    # read this way, the Concrete paper's TA agrees with AdaMerging Table 2's TA on every task
    ada = ref.reported_row("adamerging", "vit-l-14", "Task Arithmetic")
    assert all(abs(fixed[t] - ada[t]) <= 1.6 for t in ada if t != "avg")
    assert max(abs(printed[t] - ada[t]) for t in ada if t != "avg") > 15
    # rows the paper printed correctly are untouched
    lw = ref.reported_row("concrete_subspace", "vit-l-14", "Layer-wise AdaMerging")
    assert lw == ref.reported_row("concrete_subspace", "vit-l-14", "Layer-wise AdaMerging", as_printed=True)


def test_reported_rows_and_frame_show_where_papers_disagree():
    rows = ref.reported_rows("cart", "tiny", ["CART", "Concrete TA"])
    assert rows["CART"]["avg"] == 83.0 and rows["Concrete TA"] is None
    f = ref.reported_frame("tiny", ["Layer-wise AdaMerging", "Weight Averaging", "Ties-Merging (mean)"])
    assert list(f.columns) == ["adamerging", "concrete_subspace", "cart"]
    assert f.loc["Layer-wise AdaMerging"].tolist() == [80.1, 80.9, 80.1]
    assert f.loc["Ties-Merging (mean)"].isna().all()
    # B/16: only AdaMerging prints a table, so only its column appears
    assert list(ref.reported_frame("vit-b-16", ["Task Arithmetic"]).columns) == ["adamerging"]


def test_every_book_method_of_the_three_papers_resolves_to_a_paper_row():
    # methods outside these papers (Ties' mean rule, the spectral family of chapter 06) have no row
    outside = {m for m in METHOD_COLORS if m == "Ties-Merging (mean)" or m.startswith(("TSV", "Iso", "DARE"))}
    known = {m for rows in ref.PAPER_ROWS.values() for m in rows}
    unmapped = {m for m in METHOD_COLORS if ref.canonical_method(m) not in known}
    assert unmapped == outside
    assert "Ties-Merging (mean)" in outside and len(METHOD_COLORS) - len(outside) >= 16


# ------------------------------------------------------------------------------------ Kendall's τ
def test_kendall_tau_by_hand():
    # (1,2,3,4) vs (1,3,2,4): 6 pairs, one discordant (2,3) → (5 − 1) / 6
    assert ref.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)
    assert ref.kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert ref.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    # a tie in x: x = (2,1,1), y = (3,2,1); pair signs x: +,+,0 and y: +,+,+ → 2 / sqrt(2 * 3)
    assert ref.kendall_tau([2, 1, 1], [3, 2, 1]) == pytest.approx(2 / math.sqrt(6))


def test_kendall_tau_matches_scipy_with_and_without_ties():
    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 13):
        for _ in range(20):
            x = rng.integers(0, 4, n).astype(float)  # many ties
            y = rng.normal(size=n).round(1)
            want = kendalltau(x, y).statistic
            got = ref.kendall_tau(x, y)
            assert (math.isnan(want) and math.isnan(got)) or got == pytest.approx(want, abs=1e-12)
    for p in permutations(range(5)):
        assert ref.kendall_tau(range(5), p) == pytest.approx(kendalltau(range(5), p).statistic)


def test_kendall_tau_on_mappings_uses_shared_finite_keys():
    ours = {"WA": 60.0, "TA": 65.0, "CART": 70.0, "extra": 1.0, "nan": float("nan")}
    theirs = {"CART": 83.0, "TA": 69.1, "WA": 65.8, "nan": 50.0}
    assert ref.kendall_tau(ours, theirs) == 1.0
    assert math.isnan(ref.kendall_tau({"a": 1.0}, {"a": 2.0}))
    assert math.isnan(ref.kendall_tau([1, 1, 1], [1, 2, 3]))
    with pytest.raises(ValueError, match="equal length"):
        ref.kendall_tau([1, 2], [1, 2, 3])
    with pytest.raises(TypeError, match="two mappings"):
        ref.kendall_tau({"a": 1.0}, [1.0])


def test_first_reported_falls_back_in_paper_order():
    assert ref.first_reported("tiny", "Pretrained", ("adamerging", "cart")) == 48.0  # only CART prints it
    assert ref.first_reported("tiny", "Weight Averaging", ("adamerging", "cart")) == 65.8  # AdaMerging first
    assert ref.first_reported("tiny", "Weight Averaging", ("cart", "adamerging")) == 65.9
    assert math.isnan(ref.first_reported("tiny", "Ties-Merging (mean)"))
    # chapter 01's old in-cell lookup, row by row
    for row, want in [("Task Arithmetic, λ=0.3 (papers' setting)", 69.1), ("Fisher Merging", 68.3),
                      ("Ties-Merging (sum), λ=0.3 (val-selected)", 72.4), ("Individual", 90.5)]:
        assert ref.first_reported("tiny", row, ("adamerging", "cart")) == want
