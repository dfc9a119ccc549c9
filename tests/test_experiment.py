"""The experiment layer: bootstrap intervals, results frames, verdict rules, cached sweeps on val."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from mergebook import experiment as ex
from mergebook.evaluate import correctness, evaluate
from mergebook.methods import merge
from mergebook.models.suite import Suite, TaskData


def binary(n: int, k: int, seed: int = 0) -> np.ndarray:
    """n outcomes with exactly k correct, in a seeded order."""
    a = np.zeros(n, bool)
    a[:k] = True
    return np.random.default_rng(seed).permutation(a)


# ---------------------------------------------------------------------------- bootstrap intervals
def test_all_correct_and_all_wrong_have_degenerate_intervals():
    assert tuple(ex.bootstrap_interval(np.ones(50, bool))[:3]) == (100.0, 100.0, 100.0)
    assert tuple(ex.bootstrap_interval(np.zeros(50, int))[:3]) == (0.0, 0.0, 0.0)
    assert tuple(ex.average_interval({"a": np.ones(9), "b": np.ones(3)})[:3]) == (100.0, 100.0, 100.0)


def test_binomial_interval_matches_the_normal_approximation():
    # n = 1000, 700 correct: 70 ± 1.96 * sqrt(0.7 * 0.3 / 1000) * 100 = 70 ± 2.840
    iv = ex.bootstrap_interval(binary(1000, 700), n_boot=20000, seed=1)
    half = 1.959964 * math.sqrt(0.7 * 0.3 / 1000) * 100
    assert iv.mean == pytest.approx(70.0)
    assert iv.lo == pytest.approx(70 - half, abs=0.25)
    assert iv.hi == pytest.approx(70 + half, abs=0.25)
    assert iv.level == 0.95


def test_binomial_shortcut_agrees_with_index_resampling():
    # the textbook bootstrap: resample indices with replacement, take the mean of each resample
    c = binary(300, 210, seed=3)
    rng = np.random.default_rng(7)
    reps = 100 * c[rng.integers(0, c.size, size=(20000, c.size))].mean(axis=1)
    lo, hi = np.quantile(reps, [0.025, 0.975])
    iv = ex.bootstrap_interval(c, n_boot=20000, seed=2)
    assert iv.lo == pytest.approx(lo, abs=0.4)
    assert iv.hi == pytest.approx(hi, abs=0.4)


def test_level_narrows_the_interval():
    c = binary(400, 300)
    wide, narrow = ex.bootstrap_interval(c, level=0.99), ex.bootstrap_interval(c, level=0.5)
    assert wide.lo < narrow.lo < 75 < narrow.hi < wide.hi


def test_bootstrap_is_deterministic_under_the_seed():
    c = binary(200, 130)
    assert ex.bootstrap_interval(c, seed=5) == ex.bootstrap_interval(c, seed=5)
    assert ex.bootstrap_interval(c, seed=5) != ex.bootstrap_interval(c, seed=6)
    by = {"a": c, "b": binary(100, 20)}
    assert ex.average_interval(by, seed=4) == ex.average_interval(by, seed=4)


def test_average_interval_is_stratified_by_task():
    # two tasks of 1000 images, 90% and 50%: the mean is 70 and its variance is
    # (0.9*0.1/1000 + 0.5*0.5/1000) / 4, so a normal 95% interval is 70 ± 1.807
    by = {"a": binary(1000, 900), "b": binary(1000, 500, seed=1)}
    iv = ex.average_interval(by, n_boot=20000, seed=0)
    half = 1.959964 * math.sqrt((0.09 + 0.25) / 1000 / 4) * 100
    assert iv.mean == pytest.approx(70.0)
    assert iv.lo == pytest.approx(70 - half, abs=0.2)
    assert iv.hi == pytest.approx(70 + half, abs=0.2)
    # pooling the 2000 images ignores the stratification and gives a wider interval
    pooled = ex.bootstrap_interval(np.concatenate(list(by.values())), n_boot=20000, seed=0)
    assert pooled.hi - pooled.lo > iv.hi - iv.lo + 0.3


def test_average_is_the_mean_of_task_accuracies_not_of_pooled_samples():
    iv = ex.average_interval({"small": np.ones(10), "large": np.zeros(990)})
    assert iv.mean == pytest.approx(50.0)


def test_one_task_average_equals_the_single_task_interval():
    c = binary(250, 100)
    assert ex.average_interval({"t": c}, seed=3)[:3] == ex.bootstrap_interval(c, seed=3)[:3]


@pytest.mark.parametrize("bad, message", [
    (np.array([0.5, 1.0]), "bool or 0/1"),
    (np.array([]), "no samples"),
    (np.ones((2, 3)), "1-d array"),
])
def test_bad_correctness_is_refused_with_a_clear_message(bad, message):
    with pytest.raises(ValueError, match=message):
        ex.bootstrap_interval(bad)


def test_bad_level_and_empty_tasks_are_refused():
    with pytest.raises(ValueError, match="level must lie in"):
        ex.bootstrap_interval(np.ones(3), level=95)
    with pytest.raises(ValueError, match="no tasks"):
        ex.average_interval({})


def test_paired_difference_of_identical_methods_is_exactly_zero():
    c = {"a": binary(100, 60), "b": binary(80, 20)}
    assert tuple(ex.paired_difference_interval(c, c)[:3]) == (0.0, 0.0, 0.0)


def test_paired_difference_by_hand_and_narrower_than_separate_intervals():
    # b is a with 30 of 1000 wrong answers fixed: the difference is -3 points, and every resample
    # can only move the 30 discordant images, so the interval is far narrower than either one alone
    a = binary(1000, 600)
    b = a.copy()
    b[np.flatnonzero(~a)[:30]] = True
    iv = ex.paired_difference_interval({"t": a}, {"t": b}, seed=0)
    assert iv.mean == pytest.approx(-3.0)
    assert iv.hi < 0
    # discordant images only go one way: the difference is -(number of them)/n, ~Binomial(1000, 0.03)
    half = 1.959964 * math.sqrt(0.03 * 0.97 / 1000) * 100
    assert iv.lo == pytest.approx(-3 - half, abs=0.2) and iv.hi == pytest.approx(-3 + half, abs=0.2)
    sep = ex.bootstrap_interval(a)
    assert iv.hi - iv.lo < (sep.hi - sep.lo) / 2


def test_paired_difference_needs_the_same_images():
    with pytest.raises(ValueError, match="same images"):
        ex.paired_difference_interval({"t": np.ones(5)}, {"t": np.ones(6)})
    with pytest.raises(ValueError, match="tasks differ"):
        ex.paired_difference_interval({"t": np.ones(5)}, {"u": np.ones(5)})


# ------------------------------------------------------------------------------- packed correctness
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000])
def test_pack_and_unpack_round_trip(n):
    c = np.random.default_rng(n).random(n) < 0.6
    packed = ex.pack_correct(c)
    assert packed.startswith(f"{n}:")
    np.testing.assert_array_equal(ex.unpack_correct(packed), c)
    np.testing.assert_array_equal(ex.unpack_correct(c.astype(int).tolist()), c)


def test_packed_entry_of_the_wrong_length_is_called_corrupt():
    packed = ex.pack_correct(np.ones(20, bool))
    with pytest.raises(ValueError, match="corrupt"):
        ex.unpack_correct("40:" + packed.split(":")[1])
    with pytest.raises(ValueError, match="not a packed"):
        ex.unpack_correct("hello")


# ---------------------------------------------------------------------------------- results frames
def test_results_frame_columns_values_and_reported():
    rows = {"TA": {"x": binary(100, 80), "y": binary(100, 60)},
            "WA": {"x": ex.pack_correct(binary(100, 70)), "y": binary(100, 50)}}
    df = ex.results_frame(rows, ["x", "y"], reported={"TA": {"x": 1.0, "Avg Acc": 69.1}, "WA": None})
    assert list(df.columns) == ["avg", "lo", "hi", "reported", "Δ", "x", "y"]
    assert list(df.index) == ["TA", "WA"]
    assert df.loc["TA", "avg"] == pytest.approx(70.0)
    assert df.loc["TA", "x"] == pytest.approx(80.0) and df.loc["WA", "x"] == pytest.approx(70.0)
    assert df.loc["TA", "reported"] == 69.1 and df.loc["TA", "Δ"] == pytest.approx(0.9)
    assert np.isnan(df.loc["WA", "reported"])
    assert (df["lo"] < df["avg"]).all() and (df["avg"] < df["hi"]).all()
    iv = ex.average_interval(rows["TA"])
    assert (df.loc["TA", "lo"], df.loc["TA", "hi"]) == (iv.lo, iv.hi)
    assert ex.row_interval(df, "TA") == iv._replace(label="TA")


def test_results_frame_names_missing_tasks():
    with pytest.raises(KeyError, match="no correctness for tasks \\['y'\\]"):
        ex.results_frame({"TA": {"x": np.ones(3)}}, ["x", "y"])


def test_format_frame_prints_intervals_and_dashes():
    df = pd.DataFrame({"avg": [72.54, np.nan], "lo": [71.61, np.nan], "hi": [73.44, np.nan],
                       "Δ": [1.26, np.nan], "x": [80.0, 50.04]}, index=["TA", "WA"])
    out = ex.format_frame(df)
    assert list(out.columns) == ["avg [95% CI]", "Δ", "x"]
    assert out.loc["TA", "avg [95% CI]"] == "72.5 [71.6, 73.4]"
    assert out.loc["WA", "avg [95% CI]"] == "–" and out.loc["WA", "Δ"] == "–"
    assert out.loc["TA", "Δ"] == "+1.3"
    assert out.loc["WA", "x"] == "50.0"
    assert ex.format_interval(70, 70, 70) == "70.0"


def test_interleave_reported_puts_the_paper_row_under_ours():
    df = ex.results_frame({"TA": {"x": np.ones(4), "y": np.zeros(4)}, "Mine": {"x": np.ones(4), "y": np.ones(4)}})
    out = ex.interleave_reported(df, {"TA": {"x": 77.0, "y": 66.0, "Avg Acc": 71.5}})
    assert list(out.index) == ["TA", "TA · reported", "Mine"]
    assert out.loc["TA · reported", "x"] == 77.0 and out.loc["TA · reported", "avg"] == 71.5
    assert np.isnan(out.loc["TA · reported", "lo"])


# --------------------------------------------------------------------------------------- verdicts
TA = ex.Interval(72.0, 71.0, 73.0, label="TA")
WA = ex.Interval(65.0, 64.0, 66.0, label="WA")
CLOSE = ex.Interval(71.5, 70.5, 72.5, label="Ties")


def test_greater_holds_partly_and_fails():
    assert ex.greater(TA, WA).verdict == ex.HOLDS
    assert ex.greater(TA, CLOSE).verdict == ex.PARTLY  # 72 > 71.5 but the intervals overlap
    assert ex.greater(WA, TA).verdict == ex.FAILS
    assert ex.greater(TA, WA, margin=6).verdict == ex.PARTLY  # 72 > 71 but 71 > 66 + 6 is false
    assert ex.less(WA, TA).verdict == ex.HOLDS and ex.less(CLOSE, TA).verdict == ex.PARTLY


def test_plain_numbers_decide_without_a_partly():
    r = ex.less(ex.Interval.point(0.3, "best λ"), 0.4)
    assert r.verdict == ex.HOLDS and r.text == "best λ < 0.4"
    assert ex.greater(ex.Interval.point(0.3, "best λ"), 0.4).verdict == ex.FAILS


def test_rule_text_is_generated_from_the_operands():
    r = ex.greater(TA, WA)
    assert r.text.startswith("TA > WA") and "95%" in r.text
    assert r.ours == "72.0 [71.0, 73.0] vs 65.0 [64.0, 66.0]"
    assert ex.greater(TA.named("Task Arithmetic"), WA).text.startswith("Task Arithmetic > WA")


def test_within_tolerance():
    assert ex.within(TA, 72.5, tol=2).verdict == ex.HOLDS  # [71, 73] ⊂ [70.5, 74.5]
    assert ex.within(TA, 73.5, tol=2).verdict == ex.PARTLY  # 71 < 71.5
    assert ex.within(TA, 80, tol=2).verdict == ex.FAILS
    with pytest.raises(ValueError, match="tol"):
        ex.within(TA, 1, tol=-1)


def test_all_of_combines_verdicts():
    assert ex.all_of(ex.greater(TA, WA), ex.less(WA, TA)).verdict == ex.HOLDS
    assert ex.all_of(ex.greater(TA, WA), ex.greater(TA, CLOSE)).verdict == ex.PARTLY
    r = ex.all_of(ex.greater(TA, WA), ex.greater(WA, TA))
    assert r.verdict == ex.FAILS and r.text.startswith("TA > WA and WA > TA")
    assert r.check_points([2, 1, 3, 1]) and not r.check_points([2, 1, 1, 3])


def test_verdict_table_and_reported_check():
    claims = [ex.verdict("TA beats WA", ex.greater(TA, WA), reported=[69.1, 65.8]),
              ex.verdict("Ties beats TA", ex.greater(CLOSE, TA), reported=[72.4, 69.1]),
              ex.verdict("TA collapses", ex.less(TA, 50), reported="not reported")]
    vt = ex.verdict_table(claims)
    assert vt.index.name == "claim" and list(vt.index) == ["TA beats WA", "Ties beats TA", "TA collapses"]
    assert list(vt.columns) == ["rule", "ours", "reported", "verdict"]
    assert list(vt["verdict"]) == [ex.HOLDS, ex.FAILS, ex.FAILS]
    assert vt.loc["TA beats WA", "reported"] == "69.1 vs 65.8 (holds)"
    assert vt.loc["Ties beats TA", "reported"] == "72.4 vs 69.1 (holds)"
    assert vt.loc["TA collapses", "reported"] == "not reported"
    assert vt.loc["TA beats WA", "rule"] == ex.greater(TA, WA).text
    # the CSV a reader downloads keeps the claim as its first column
    assert vt.to_csv().splitlines()[0] == "claim,rule,ours,reported,verdict"
    with pytest.raises(ValueError, match="distinct"):
        ex.verdict_table(claims + claims[:1])


def test_rules_refuse_non_numbers():
    with pytest.raises(TypeError, match="Intervals or numbers"):
        ex.greater(TA, "65")


# ------------------------------------------------------------------------------ sweeps and selection
class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.proj(x)


def micro_suite(seed: int = 0) -> Suite:
    """Two 3-class tasks on a linear encoder: enough to run merge → evaluate for real."""
    g = torch.Generator().manual_seed(seed)
    model = _Linear()
    pre = {"proj.weight": torch.randn(3, 4, generator=g)}
    fts = {t: {"proj.weight": pre["proj.weight"] + torch.randn(3, 4, generator=g)} for t in ("a", "b")}
    heads = {t: torch.randn(3, 3, generator=g) * 5 for t in ("a", "b")}

    def data(n):
        return TaskData(torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g))

    return Suite(profile="micro-test", tasks=["a", "b"], model=model, pretrained=pre, finetuned=fts,
                 heads=heads, test={t: data(60) for t in ("a", "b")}, val={t: data(30) for t in ("a", "b")},
                 meta={"fingerprint": f"micro-{seed}"})


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBOOK_CACHE", str(tmp_path))
    return tmp_path


def test_correctness_mean_is_evaluate_accuracy():
    s = micro_suite()
    c = correctness(s, s.pretrained)
    acc = evaluate(s, s.pretrained)
    for t in s.tasks:
        assert c[t].dtype == bool and c[t].shape == (60,)
        assert 100 * c[t].mean() == pytest.approx(acc[t], abs=1e-4)
    assert correctness(s, s.pretrained, split="val")["a"].shape == (30,)
    with pytest.raises(ValueError, match="split 'train'"):
        correctness(s, s.pretrained, split="train")


def test_sweep_scores_each_point_like_a_direct_merge_and_is_cached(cache_dir, monkeypatch):
    s = micro_suite()
    grid = [0.0, 0.5, 1.0]
    res = ex.sweep(s, "task_arithmetic", grid)
    assert list(res) == ["0", "0.5", "1"]
    for lam, key in zip(grid, res):
        sd = merge("task_arithmetic", s.pretrained, s.finetuned_list(), scaling_coef=lam)
        direct_test, direct_val = evaluate(s, sd), evaluate(s, sd, split="val")
        for t in [*s.tasks, "avg"]:
            assert res[key]["test"][t] == pytest.approx(direct_test[t], abs=1e-4)
            assert res[key]["val"][t] == pytest.approx(direct_val[t], abs=1e-4)
        np.testing.assert_array_equal(ex.sweep_correct(res, lam)["a"], correctness(s, sd)["a"])

    # a second call reads the cache: merging must not run again
    import mergebook.methods as methods

    def boom(*a, **k):
        raise AssertionError("recomputed a cached sweep")

    monkeypatch.setattr(methods, "merge", boom)
    assert ex.sweep(s, "task_arithmetic", grid) == res


def test_sweep_over_parameter_dicts_and_bad_grids(cache_dir):
    s = micro_suite()
    res = ex.sweep(s, "ties", [{"scaling_coef": 0.3, "k": 0.5}, {"scaling_coef": 1.0, "k": 0.5}],
                   disjoint="sum")
    assert list(res) == ["scaling_coef=0.3,k=0.5", "scaling_coef=1,k=0.5"]
    assert list(ex.sweep_frame(res, s.tasks).index) == list(res)  # non-numeric keys keep grid order
    with pytest.raises(ValueError, match="empty grid"):
        ex.sweep(s, "task_arithmetic", [])
    with pytest.raises(ValueError, match="repeated"):
        ex.sweep(s, "task_arithmetic", [0.3, 0.30])


def _hand_result():
    def point(val, test):
        return {"val": {"avg": val}, "test": {"a": test, "avg": test},
                "test_correct": {"a": ex.pack_correct([1, 0, 1, 1])}}
    return {"0.1": point(60, 70), "0.3": point(65, 60), "0.5": point(65, 80), "1": point(40, 90)}


def test_select_on_val_picks_the_val_best_and_never_looks_at_test():
    sel = ex.select_on_val(_hand_result())
    # 0.3 and 0.5 tie on val; the first in grid order wins, although 0.5 and 1 are better on test
    assert sel.key == "0.3" and sel.value == 0.3 and sel.val_avg == 65 and sel.test["avg"] == 60
    np.testing.assert_array_equal(sel.correct["a"], [True, False, True, True])
    assert ex.best_on_val(_hand_result()) == "0.3"


def test_sweep_frame_sorts_numeric_grid_points():
    res = {"1": {"test": {"a": 1.0, "avg": 1.0}}, "0.2": {"test": {"a": 2.0, "avg": 2.0}}}
    df = ex.sweep_frame(res, ["a"])
    assert list(df.index) == [0.2, 1.0] and df.index.name == "λ" and list(df.columns) == ["a", "avg"]
    with pytest.raises(ValueError, match="split"):
        ex.sweep_frame(res, ["a"], split="train")


def test_scored_packs_test_correctness(cache_dir):
    s = micro_suite()
    out = ex.scored(s, s.pretrained)
    assert out["accuracy"]["avg"] == pytest.approx(evaluate(s, s.pretrained)["avg"], abs=1e-4)
    np.testing.assert_array_equal(ex.unpack_correct(out["correct"]["b"]), correctness(s, s.pretrained)["b"])


def test_reference_and_data_using_rows_score_like_direct_evaluation(cache_dir):
    s = micro_suite()
    ref_rows = ex.reference_rows(s)
    assert list(ref_rows["accuracy"]) == ["Pretrained", "Individual"]  # no MTL checkpoint in this suite
    for t in s.tasks:
        assert ref_rows["accuracy"]["Individual"][t] == pytest.approx(evaluate(s, s.finetuned[t], [t])[t], abs=1e-4)
        np.testing.assert_array_equal(ex.unpack_correct(ref_rows["correct"]["Individual"][t]),
                                      correctness(s, s.finetuned[t], [t])[t])
    assert ref_rows["accuracy"]["Pretrained"]["avg"] == pytest.approx(evaluate(s, s.pretrained)["avg"], abs=1e-4)
    rows = ex.data_using_rows(s, num_examples=10, regmean_alpha=0.9, seed=0)
    assert list(rows["accuracy"]) == ["Weight Averaging", "Fisher Merging", "RegMean"]
    wa = merge("weight_averaging", s.pretrained, s.finetuned_list())
    assert rows["accuracy"]["Weight Averaging"]["avg"] == pytest.approx(evaluate(s, wa)["avg"], abs=1e-4)
    # the correctness feeds a results frame directly
    df = ex.results_frame(rows["correct"] | ref_rows["correct"], s.tasks)
    assert df.loc["RegMean", "avg"] == pytest.approx(rows["accuracy"]["RegMean"]["avg"], abs=1e-4)


def test_entropy_and_loss_per_sample():
    import torch.nn.functional as F

    from mergebook.evaluate import entropy_and_loss, predict

    s = micro_suite()
    el = entropy_and_loss(s, s.pretrained)
    logits = predict(s.model, s.pretrained, s.heads["a"], s.test["a"].images)
    p = logits.softmax(-1).double()
    np.testing.assert_allclose(el["a"]["entropy"], -(p * p.log()).sum(-1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(el["a"]["loss"], F.cross_entropy(logits, s.test["a"].labels, reduction="none"),
                               rtol=1e-5)
    assert (el["b"]["entropy"] >= 0).all() and (el["b"]["entropy"] <= np.log(3) + 1e-6).all()


def test_predict_batches_do_not_change_logits():
    import torch

    from mergebook.evaluate import EVAL_BATCH, eval_batch_size, predict

    s = micro_suite()
    x = s.test["a"].images
    whole = predict(s.model, s.pretrained, s.heads["a"], x, batch_size=len(x))
    for bs in (1, 7, None):
        part = predict(s.model, s.pretrained, s.heads["a"], x, batch_size=bs)
        assert part.shape == whole.shape
        torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-6)
    assert eval_batch_size(torch.zeros(1)) == EVAL_BATCH["cpu"]
    with pytest.raises(ValueError, match="batch_size"):
        predict(s.model, s.pretrained, s.heads["a"], x, batch_size=0)


# ------------------------------------------------------------------ cached evaluations of 00 and 02
def test_cross_task_matrix_is_every_model_on_every_task(cache_dir):
    from mergebook.evaluate import accuracy

    s = micro_suite()
    m = ex.cross_task_matrix(s)
    assert list(m.index) == ["pretrained", "a", "b"] and list(m.columns) == ["a", "b"]
    for row, sd in [("pretrained", s.pretrained), ("a", s.finetuned["a"]), ("b", s.finetuned["b"])]:
        for t in s.tasks:
            assert m.loc[row, t] == pytest.approx(accuracy(s.model, sd, s.heads[t], s.test[t]))
    s.meta["mtl"] = s.finetuned["b"]  # a suite with a multi-task model gets its row (new fingerprint)
    s.meta["fingerprint"] = "micro-mtl"
    assert ex.cross_task_matrix(s).loc["traditional MTL"].tolist() == pytest.approx(m.loc["b"].tolist())


def test_entropy_loss_at_is_task_arithmetic_entropy_and_loss(cache_dir):
    from mergebook.evaluate import entropy_and_loss

    s = micro_suite()
    got = ex.entropy_loss_at(s, 0.4)
    want = entropy_and_loss(s, merge("task_arithmetic", s.pretrained, s.finetuned_list(), scaling_coef=0.4))
    for t in s.tasks:
        np.testing.assert_allclose(got[t]["entropy"], want[t]["entropy"], rtol=1e-6)
        np.testing.assert_allclose(got[t]["loss"], want[t]["loss"], rtol=1e-6)
    with pytest.raises(ValueError, match="λ must be finite"):
        ex.entropy_loss_at(s, float("nan"))


def test_entropy_coupling_at_is_the_analysis_frame_in_task_order(cache_dir):
    from mergebook.analysis import entropy_coupling

    s = micro_suite()
    got = ex.entropy_coupling_at(s, 0.3, 16)
    want = entropy_coupling(s, 0.3, 16)
    assert list(got.index) == list(got.columns) == s.tasks
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=1e-9)
