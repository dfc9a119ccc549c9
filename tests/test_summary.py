"""The summary chapter's reading of other chapters' caches (mergebook.summary, results.lookup_only)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mergebook import experiment as ex
from mergebook import summary as S
from mergebook.results import cached_result, lookup_only, lookup_result, result_path
from tests.test_experiment import micro_suite


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBOOK_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_lookup_result_is_none_until_computed_and_never_computes(cache_dir):
    s = micro_suite()
    calls = []
    assert lookup_result(s, "thing", {"x": 1}) is None
    with lookup_only():
        assert cached_result(s, "thing", {"x": 1}, lambda: calls.append(1) or 5) is None
    assert calls == []
    assert cached_result(s, "thing", {"x": 1}, lambda: 7) == 7
    assert lookup_result(s, "thing", {"x": 1}) == 7
    with lookup_only():
        assert cached_result(s, "thing", {"x": 1}, lambda: 9) == 7
    assert lookup_result(s, "thing", {"x": 2}) is None  # other params: another entry


def test_a_corrupt_entry_reads_as_missing(cache_dir):
    s = micro_suite()
    cached_result(s, "thing", {}, lambda: {"a": 1})
    result_path(s, "thing", {}).write_text(json.dumps({"a": 2}))  # sidecar digest no longer matches
    assert lookup_result(s, "thing", {}) is None


def test_lookup_only_makes_the_chapters_own_functions_read_only(cache_dir):
    s = micro_suite()
    with lookup_only():
        assert ex.sweep(s, "task_arithmetic", [0.0, 0.5]) is None
        assert ex.reference_rows(s) is None
    ran = ex.sweep(s, "task_arithmetic", [0.0, 0.5])
    with lookup_only():
        assert ex.sweep(s, "task_arithmetic", [0.0, 0.5]) == ran


def _notebooks(tmp_path, params_cell: str, yaml_text: str = ""):
    root = tmp_path / "nb"
    (root / "params").mkdir(parents=True)
    for c, name in S.CHAPTERS.items():
        (root / f"{name}.py").write_text(f'# %% [markdown]\n# # T\n\n# %% tags=["parameters"]\n{params_cell}\n\n# %%\nx = 1\n')
    (root / "params" / "pico.yaml").write_text(yaml_text)
    return root


def test_chapter_params_read_the_parameters_cell_and_the_profile_yaml(tmp_path):
    root = _notebooks(tmp_path, 'profile = "tiny"\nsteps = 200\nlambdas = [0.0, 0.3]\n', "steps: 4\nunrelated: 1\n")
    p = S.chapter_params("02", "pico", root=root)
    assert p == {"profile": "pico", "steps": 4, "lambdas": [0.0, 0.3]}
    assert S.chapter_params("02", "pico", {"steps": 9}, root=root)["steps"] == 9


def test_every_reader_finds_the_parameters_it_needs_in_the_real_chapters():
    for c in S.READERS:
        p = S.chapter_params(c, "tiny")
        assert p["profile"] == "tiny"
    assert set(S.chapter06_specs(S.chapter_params("06", "tiny"))) == {"TSV-M", "Iso-C", "Iso-CTS", "DARE + TA",
                                                                      "DARE + Ties"}


def test_a_chapter_not_run_is_named_in_the_note(cache_dir):
    s = micro_suite()
    p = {"fisher_examples": 10, "regmean_alpha": 0.95, "seed": 0, "lambdas": [0.0, 0.5], "ties_k": 0.2,
         "ties_mean_lambdas": [1.0]}
    rows = S.chapter01(s, p)
    assert rows.rows == {} and "Run chapter 01 (01_task_arithmetic)" in rows.note()
    ex.sweep(s, "task_arithmetic", p["lambdas"])
    rows = S.chapter01(s, p)
    assert "Task Arithmetic" in rows.rows and "Task Arithmetic sweep" not in rows.missing
    assert rows.rows["Task Arithmetic"]["setting"].endswith("(val)")


def test_grand_frame_groups_intervals_and_reported_columns():
    correct = {"a": np.r_[np.ones(30, bool), np.zeros(30, bool)], "b": np.ones(60, bool)}
    ch = S.ChapterRows("01", rows={
        "Layer-wise AdaMerging": {"accuracy": {"a": 50.0, "b": 100.0, "avg": 75.0}, "correct": None, "setting": "x"},
        "Task Arithmetic": {"accuracy": {"a": 50.0, "b": 100.0, "avg": 75.0},
                            "correct": ex.pack_by_task(correct), "setting": "λ=0.3 (val)"},
        "Fisher Merging": {"accuracy": {"a": 50.0, "b": 100.0, "avg": 75.0}, "correct": ex.pack_by_task(correct)},
    })
    grand = S.grand_frame([ch], ["a", "b"], {"a": 60, "b": 60})
    assert list(grand.index) == ["Task Arithmetic", "Fisher Merging", "Layer-wise AdaMerging"]  # group order
    assert list(grand["group"]) == ["training-free", "data-using", "test-time adaptive"]
    # counts rebuilt from accuracies give the interval the samples give
    assert grand.loc["Layer-wise AdaMerging", "lo"] == pytest.approx(grand.loc["Task Arithmetic", "lo"])
    rep = S.reported_columns("tiny", list(grand.index))
    assert rep.loc["Task Arithmetic", "AdaMerging paper"] == pytest.approx(69.1)
    assert rep.loc["Layer-wise AdaMerging", "CART paper"] == pytest.approx(80.1)
    shown = S.display_frame(grand, rep)
    assert shown.loc["Task Arithmetic", "ours [95% CI]"].startswith("75.0 [")


def test_rank_agreement_by_hand():
    ours = {"A": 1.0, "B": 2.0, "C": 3.0}
    rep = pd.DataFrame({"p": [10.0, 20.0, 30.0], "q": [30.0, 20.0, np.nan]}, index=["A", "B", "C"])
    tau = S.rank_agreement(ours, rep)
    assert tau.loc["p", "Kendall τ"] == pytest.approx(1.0)
    assert tau.loc["q", "Kendall τ"] == pytest.approx(-1.0) and tau.loc["q", "methods compared"] == 2
    assert list(S.consensus(rep)) == [10.0, 20.0, 30.0]
    # spread: sd(1, 2, 3) / sd(10, 20, 30) = 1 / 10; q shares A and B: sd(1, 2) / sd(30, 20) = 0.1
    assert tau.loc["p", "spread"] == pytest.approx(0.1)
    assert tau.loc["q", "spread"] == pytest.approx(0.1)
    one = S.rank_agreement({"A": 1.0}, rep)
    assert np.isnan(one.loc["p", "spread"]) and np.isnan(one.loc["p", "Kendall τ"])
