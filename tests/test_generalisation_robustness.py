"""Generalisation (AdaMerging/Concrete Table 3) and robustness (AdaMerging Table 4) machinery:
the seen/unseen split mapping, task subsets and derived cache keys, corrupted suites, the
reported-row lookups against the CSV, and the split frames the chapter prints."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mergebook import experiment as ex
from mergebook import reference as ref
from mergebook import robustness as rb
from mergebook.data import corruptions
from mergebook.data.hub import OPENAI_MEAN, OPENAI_STD
from mergebook.evaluate import evaluate
from mergebook.methods import merge
from mergebook.models.suite import TaskData
from tests.test_adaptation import toy_suite

TINY = ["digits", "housenum", "letters", "greek", "signs", "textures", "shapes", "patterns"]
CLIP = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
TABLES = Path(__file__).resolve().parents[1] / "book" / "paper_tables"


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBOOK_CACHE", str(tmp_path))
    return tmp_path


def named_suite(names, **kw):
    """toy_suite with its tasks renamed (so the paper-name mapping applies to it)."""
    s = toy_suite(num_tasks=len(names), **kw)
    ren = dict(zip(s.tasks, names))
    return replace(s, tasks=list(names), finetuned={ren[t]: v for t, v in s.finetuned.items()},
                   heads={ren[t]: v for t, v in s.heads.items()}, test={ren[t]: v for t, v in s.test.items()})


# --------------------------------------------------------------------------------------------
# The split mapping
# --------------------------------------------------------------------------------------------
def test_tiny_splits_hold_out_the_tasks_that_stand_for_the_papers_pairs():
    seen, unseen = ex.generalization_split(TINY, ("MNIST", "EuroSAT"))
    assert unseen == ["digits", "shapes"]
    assert seen == ["housenum", "letters", "greek", "signs", "textures", "patterns"]
    seen, unseen = ex.generalization_split(TINY, ("RESISC45", "SVHN"))
    assert unseen == ["patterns", "housenum"]
    assert seen == ["digits", "letters", "greek", "signs", "textures", "shapes"]


def test_clip_splits_are_the_papers_own_tasks():
    for u in ex.GENERALIZATION_SPLITS:
        seen, unseen = ex.generalization_split(CLIP, u)
        assert unseen == list(u)
        assert sorted(seen + unseen) == sorted(CLIP) and len(seen) == 6
    assert ex.tasks_for_paper(CLIP, ex.ROBUSTNESS_TASKS) == ["Cars", "EuroSAT", "RESISC45", "GTSRB"]
    assert ex.tasks_for_paper(TINY, ex.ROBUSTNESS_TASKS) == ["greek", "shapes", "patterns", "signs"]


def test_a_split_naming_a_task_the_suite_lacks_is_a_clear_error():
    with pytest.raises(KeyError, match="no task of this suite stands for.*'ImageNet'"):
        ex.generalization_split(TINY, ("ImageNet", "MNIST"))


# --------------------------------------------------------------------------------------------
# Subsets and derived suites
# --------------------------------------------------------------------------------------------
def test_subset_keeps_only_its_tasks_and_gets_its_own_cache_key():
    s = toy_suite(num_tasks=4)
    sub = s.subset(["t2", "t0"])
    assert sub.tasks == ["t2", "t0"]
    assert set(sub.finetuned) == set(sub.heads) == set(sub.test) == {"t0", "t2"}
    assert [id(v) for v in sub.finetuned_list()] == [id(s.finetuned["t2"]), id(s.finetuned["t0"])]
    assert sub.fingerprint() != s.fingerprint()
    assert sub.fingerprint() == s.subset(["t2", "t0"]).fingerprint()  # deterministic
    assert sub.fingerprint() != s.subset(["t0", "t2"]).fingerprint()  # the order is part of it
    assert s.subset(s.tasks).fingerprint() == s.fingerprint()  # the whole suite is itself
    for bad in (["t9"], [], ["t0", "t0"]):
        with pytest.raises(ValueError, match="distinct tasks of this suite"):
            s.subset(bad)


def test_derived_fingerprints_record_their_changes():
    s = toy_suite()
    a, b = s.derived(corruption="jpeg", severity=3), s.derived(corruption="jpeg", severity=4)
    assert len({s.fingerprint(), a.fingerprint(), b.fingerprint()}) == 3
    assert a.fingerprint() == s.derived(severity=3, corruption="jpeg").fingerprint()
    assert a.meta["derived_from"] == s.fingerprint()


def test_merging_a_subset_merges_only_its_vectors():
    s = toy_suite(num_tasks=3)
    sub = s.subset(["t0", "t2"])
    got = merge("task_arithmetic", sub.pretrained, sub.finetuned_list(), scaling_coef=0.3)
    for k, v in s.pretrained.items():
        want = v + 0.3 * ((s.finetuned["t0"][k] - v) + (s.finetuned["t2"][k] - v))
        torch.testing.assert_close(got[k], want)


# --------------------------------------------------------------------------------------------
# Corrupted images and suites
# --------------------------------------------------------------------------------------------
def normalised_from_uint8(n=5, side=16, seed=0):
    rng = np.random.default_rng(seed)
    u8 = rng.integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    like = torch.zeros(1, 3, side, side)
    return u8, rb.from_uint8(u8, OPENAI_MEAN, OPENAI_STD, like)


def test_uint8_round_trip_is_exact():
    u8, x = normalised_from_uint8()
    m = torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)
    sd = torch.tensor(OPENAI_STD).view(1, 3, 1, 1)
    want = (torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255 - m) / sd  # hand-written normalisation
    torch.testing.assert_close(x, want)
    assert np.array_equal(rb.to_uint8(x, OPENAI_MEAN, OPENAI_STD), u8)
    clean = rb.corrupt_images(x, "clean", 3, 0, OPENAI_MEAN, OPENAI_STD)
    torch.testing.assert_close(clean, x)


@pytest.mark.parametrize("name", corruptions.CORRUPTIONS)
def test_corrupt_images_applies_the_numpy_corruption_and_renormalises(name):
    u8, x = normalised_from_uint8()
    got = rb.corrupt_images(x, name, 3, 7, OPENAI_MEAN, OPENAI_STD)
    want = corruptions.corrupt(u8, name, severity=3, seed=7)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert np.array_equal(rb.to_uint8(got, OPENAI_MEAN, OPENAI_STD), want)
    assert not torch.equal(got, x)
    torch.testing.assert_close(rb.corrupt_images(x, name, 3, 7, OPENAI_MEAN, OPENAI_STD), got)  # deterministic


@pytest.mark.parametrize("name", ["gaussian_noise", "impulse_noise", "spatter"])
def test_chunked_corruption_equals_one_call(name, monkeypatch):
    _, x = normalised_from_uint8(n=7)
    whole = rb.corrupt_images(x, name, 3, 1, OPENAI_MEAN, OPENAI_STD)
    monkeypatch.setattr(rb, "CHUNK", 3)  # chunks 0-2, 3-5, 6: seeds follow the global index
    torch.testing.assert_close(rb.corrupt_images(x, name, 3, 1, OPENAI_MEAN, OPENAI_STD), whole)


def test_corrupted_suite_changes_only_the_test_images():
    s = named_suite(["Cars", "EuroSAT"])
    s.test = {t: TaskData(rb.from_uint8(normalised_from_uint8(n=4, side=s.test[t].images.shape[-1], seed=i)[0],
                                        OPENAI_MEAN, OPENAI_STD, s.test[t].images), s.test[t].labels)
              for i, t in enumerate(s.tasks)}
    c = rb.corrupted_suite(s, "Gaussian Noise", severity=2, seed=0)
    assert c.meta["corruption"] == {"name": "gaussian_noise", "severity": 2, "seed": 0}
    assert c.fingerprint() == rb.corrupted_key(s, "gaussian_noise", 2, 0).fingerprint()
    assert c.fingerprint() != s.fingerprint()
    assert c.fingerprint() != rb.corrupted_key(s, "gaussian_noise", 3, 0).fingerprint()
    for t in s.tasks:
        assert not torch.equal(c.test[t].images, s.test[t].images)
        assert torch.equal(c.test[t].labels, s.test[t].labels)
        assert c.finetuned[t] is s.finetuned[t] and c.heads[t] is s.heads[t]
    assert rb.corrupted_suite(s, "clean") is s
    samples = rb.corruption_samples(s, s.tasks, ["clean", "gaussian_noise"], severity=2, seed=0)
    assert np.array_equal(samples["gaussian_noise"]["Cars"],
                          rb.to_uint8(c.test["Cars"].images[:1], OPENAI_MEAN, OPENAI_STD)[0])
    assert np.array_equal(samples["clean"]["Cars"], rb.to_uint8(s.test["Cars"].images[:1], OPENAI_MEAN, OPENAI_STD)[0])


# --------------------------------------------------------------------------------------------
# Runs: the generalisation merge sees only the seen tasks
# --------------------------------------------------------------------------------------------
def test_generalization_rows_merge_the_seen_tasks_and_score_all(cache_dir):
    s = named_suite(["SUN397", "MNIST", "Cars", "EuroSAT"])
    r = ex.generalization_rows(s, ("MNIST", "EuroSAT"), methods=["Task Arithmetic"], ta_lambda=0.4, device="cpu")
    assert r["seen"] == ["SUN397", "Cars"] and r["unseen"] == ["MNIST", "EuroSAT"]
    sd = merge("task_arithmetic", s.pretrained, [s.finetuned["SUN397"], s.finetuned["Cars"]], scaling_coef=0.4)
    want = evaluate(s, sd)  # independent: merge by hand, score every task
    frame = ex.split_frame(r["correct"], {"seen": r["seen"], "unseen": r["unseen"]}, n_boot=200)
    for t in s.tasks:
        assert frame.loc["Task Arithmetic", t] == pytest.approx(want[t])
    assert frame.loc["Task Arithmetic", "unseen avg"] == pytest.approx((want["MNIST"] + want["EuroSAT"]) / 2)
    lo, hi = frame.loc["Task Arithmetic", ["unseen lo", "unseen hi"]]
    assert lo <= frame.loc["Task Arithmetic", "unseen avg"] <= hi
    again = ex.generalization_rows(s, ("MNIST", "EuroSAT"), methods=["Task Arithmetic"], ta_lambda=0.4,
                                   device="cpu")
    assert again["correct"] == r["correct"]  # served from the cache, unchanged


def test_robustness_rows_score_the_corrupted_images(cache_dir):
    s = named_suite(["Cars", "EuroSAT"])
    r = ex.robustness_rows(s, s.tasks, "jpeg", methods=["Task Arithmetic"], severity=3,
                           ta_lambda=0.3, device="cpu")
    c = rb.corrupted_suite(s, "jpeg", 3, 0)
    want = evaluate(c, merge("task_arithmetic", s.pretrained, s.finetuned_list(), scaling_coef=0.3))
    frame = ex.split_frame(r["correct"], {"all": s.tasks}, n_boot=200)
    for t in s.tasks:
        assert frame.loc["Task Arithmetic", t] == pytest.approx(want[t])


# --------------------------------------------------------------------------------------------
# Reported rows equal the CSV
# --------------------------------------------------------------------------------------------
def csv_row(paper, table, row):
    df = pd.read_csv(TABLES / f"{paper}.csv", dtype={"table": str})
    sel = df[(df["table"] == table) & (df["row"] == row)]
    assert len(sel), (paper, table, row)
    return dict(zip(sel["column"], sel["value"]))


@pytest.mark.parametrize("paper,table,row,method", [
    ("adamerging", "3:unseen MNIST+EuroSAT", "Task Arithmetic", "Task Arithmetic"),
    ("adamerging", "3:unseen RESISC45+SVHN", "Ties-Merging", "Ties-Merging"),
    ("concrete_subspace", "3:unseen MNIST+EuroSAT", "Concrete TA", "Concrete TA"),
])
def test_table3_lookup_equals_the_csv(paper, table, row, method):
    unseen = table.split("unseen ")[1].split("+")
    got = ref.reported_generalization(paper, "tiny", [method], unseen)[method]
    want = csv_row(paper, table, row)
    for task in [c for c in want if not c.lower().startswith("avg")]:
        assert got[task] == pytest.approx(want[task])
    unseen_avg = next(v for c, v in want.items() if "unseen" in c.lower())
    assert got["avg (unseen tasks)"] == pytest.approx(unseen_avg)
    # under our names, ready for the table
    mine = ex.reported_split({method: got}, TINY)[method]
    assert mine["digits"] == pytest.approx(want["MNIST"]) and mine["unseen avg"] == pytest.approx(unseen_avg)


def test_table4_and_table7_lookups_equal_the_csv():
    for profile, table in (("tiny", "4"), ("vit-b-16", "7")):
        assert ref.paper_table("adamerging", profile, "robustness") == table
        got = ref.reported_robustness(profile, ["Task Arithmetic"], "motion_blur")["Task Arithmetic"]
        want = csv_row("adamerging", f"{table}:Motion Blur", "Task Arithmetic")
        assert got["Cars"] == pytest.approx(want["Cars"]) and got["avg"] == pytest.approx(want["Avg Acc"])
    clean = ref.reported_robustness("tiny", ["Layer-wise AdaMerging"], "clean")["Layer-wise AdaMerging"]
    assert clean["avg"] == pytest.approx(csv_row("adamerging", "4:Clean", "AdaMerging (Ours)")["Avg Acc"])
    assert ref.paper_table("adamerging", "vit-b-16", "generalization") == "6"
    with pytest.raises(KeyError, match="prints no generalization table for ViT-L/14"):
        ref.reported_generalization("adamerging", "vit-l-14", ["Task Arithmetic"], ("MNIST", "EuroSAT"))


def test_split_table_puts_the_reported_row_under_its_method_and_reported_pair():
    frame = pd.DataFrame({"a": [50.0], "b": [70.0], "all avg": [60.0], "all lo": [55.0], "all hi": [65.0]},
                         index=pd.Index(["Task Arithmetic"], name="method"))
    rep = {"Task Arithmetic": {"a": 1.0, "b": 2.0, "all avg": 1.5}}
    t = ex.split_table(frame, {"all": ["a", "b"]}, rep)
    assert list(t.index) == ["Task Arithmetic", "Task Arithmetic · reported"]
    assert list(t.columns) == ["a", "b", "all avg"]
    assert t.loc["Task Arithmetic", "all avg"] == "60.0" and t.loc["Task Arithmetic · reported", "all avg"] == "1.5"
    summ = ex.split_summary(frame, ["all"], rep)
    assert summ.loc["Task Arithmetic"].tolist() == ["60.0 [55.0, 65.0]", "1.5", "+58.5"]
    assert list(summ.columns) == ["all avg [95% CI]", "all reported", "all Δ"]
    assert ex.split_summary(frame, ["all"]).loc["Task Arithmetic", "all Δ"] == "–"
    rows = {"A": {"avg (unseen tasks)": 70.0}, "B": {"avg (unseen tasks)": 61.4}, "C": None}
    assert ex.reported_pair(rows, "A", "B") == [70.0, 61.4]
    assert ex.reported_pair(rows, "A", "C") == "not reported"


def test_paired_gain_is_the_difference_of_averages_with_a_paired_interval():
    a = {"x": [1, 1, 1, 0], "y": [1, 0, 1, 1, 1, 0]}
    b = {"x": [1, 0, 1, 0], "y": [1, 0, 0, 1, 1, 0]}
    correct = {"A": ex.pack_by_task(a), "B": ex.pack_by_task(b)}
    g = ex.paired_gain(correct, "A", "B", ["x", "y"], n_boot=500)
    # hand: x 75 − 50 = 25 points, y 66.7 − 50 = 16.7 points; the average of the two
    assert g.mean == pytest.approx((25.0 + 100 / 6) / 2)
    assert g.lo <= g.mean <= g.hi and g.label == "A − B"
    same = ex.paired_gain({"A": correct["A"], "C": correct["A"]}, "A", "C", ["x", "y"], n_boot=200)
    assert (same.mean, same.lo, same.hi) == (0.0, 0.0, 0.0)  # identical predictions: no spread at all
    assert ex.greater(g, 0.0).verdict in (ex.HOLDS, ex.PARTLY)
    with pytest.raises(KeyError, match="no per-sample results for \\['D'\\]"):
        ex.paired_gain(correct, "A", "D", ["x"])


def test_reported_gain_and_lookups_without_a_table_at_this_scale():
    rows = {"A": {"avg (seen tasks)": 81.7}, "B": {"avg (seen tasks)": 77.4}}
    assert ex.reported_gain(rows, "A", "B", "avg (seen tasks)") == [4.3, 0.0]
    assert ex.reported_gain(rows, "A", "B") == "not reported"
    rule = ex.greater(ex.Interval(1.0, 0.5, 1.5, 0.95, "A − B"), 0.0)
    assert ex.verdict("c", rule, ex.reported_gain(rows, "A", "B", "avg (seen tasks)")).reported_text() == "4.3 vs 0 (holds)"
    l14 = ex.generalization_reported("vit-l-14", ["Task Arithmetic"], ("MNIST", "EuroSAT"))
    assert l14 == {"adamerging": {}, "concrete_subspace": {}}
    assert ex.robustness_reported("vit-l-14", ["Task Arithmetic"], "jpeg") == {}
    b32 = ex.generalization_reported("tiny", ["Concrete TA"], ("MNIST", "EuroSAT"))
    assert b32["adamerging"]["Concrete TA"] is None  # AdaMerging's table has no Concrete row
    assert b32["concrete_subspace"]["Concrete TA"]["avg (unseen tasks)"] == pytest.approx(66.8)
    with pytest.raises(KeyError, match="unknown corruption"):
        ex.robustness_reported("tiny", ["Task Arithmetic"], "fog")
