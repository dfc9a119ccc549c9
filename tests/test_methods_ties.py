"""Ties-Merging: exact global threshold, trim/elect/disjoint helpers, and the whole merge vs NumPy."""

import numpy as np
import pytest
import torch

from mergebook.methods import MergeError, merge, ties_task_vectors
from mergebook.methods import ties as T
from mergebook.statedict import TaskVectorView, flatten, task_vectors


def discrete(shape, gen, levels=9, zero_frac=0.1):
    """Values on a coarse grid (many exact ties), with exact zeros and negative zeros."""
    x = (torch.randint(-levels, levels + 1, shape, generator=gen).float() / 4).reshape(-1)
    z = torch.rand(x.shape, generator=gen) < zero_frac
    x[z] = 0.0
    x[z & (torch.rand(x.shape, generator=gen) < 0.5)] = -0.0
    return x.reshape(shape)


def models(gen, k_models=3, grid=True):
    shapes = {"a.weight": (7, 5), "a.bias": (7,), "b.weight": (4, 7), "steps": None}
    pre = {}
    for name, shp in shapes.items():
        pre[name] = torch.tensor(3) if shp is None else torch.randn(shp, generator=gen)
    fts = []
    for _ in range(k_models):
        ft = {}
        for name, v in pre.items():
            if not v.is_floating_point():
                ft[name] = v.clone()
            else:
                d = discrete(v.shape, gen) if grid else torch.randn(v.shape, generator=gen)
                ft[name] = v + d
        fts.append(ft)
    return pre, fts


def numpy_ties(tv: np.ndarray, k: float, disjoint: str):
    """Direct NumPy transcription of the original Ties code over flattened [K, d] task vectors."""
    d = tv.shape[1]
    kth = np.sort(np.abs(tv), axis=1)[:, d - int(d * k) - 1]  # kthvalue(|x|, d - int(d*k))
    trimmed = tv * (np.abs(tv) >= kth[:, None])
    sign = np.sign(trimmed.sum(axis=0))
    sign[sign == 0] = np.sign(sign.sum())
    selected = trimmed * np.where(sign > 0, trimmed > 0, trimmed < 0)
    if disjoint == "sum":
        merged = selected.sum(axis=0)
    elif disjoint == "mean":
        merged = selected.sum(axis=0) / np.maximum((selected != 0).sum(axis=0), 1)
    else:
        merged = np.abs(selected).max(axis=0) * sign
    return merged, selected


# --- the threshold


def sorted_threshold(x: torch.Tensor, k: float) -> float:
    a = np.sort(np.abs(x.double().numpy().reshape(-1)))
    d = a.size
    return float(a[d - int(d * k) - 1])


@pytest.mark.parametrize("method", ["auto", "radix", "sort"])
@pytest.mark.parametrize("k", [0.2, 0.5, 0.013, 0.999])
def test_streaming_threshold_equals_sorted_threshold_with_duplicates_and_negative_zero(method, k, monkeypatch):
    # Shrink the sample and the in-memory cut-off so the bracket path runs on small data.
    monkeypatch.setattr(T, "_SMALL", 64)
    monkeypatch.setattr(T, "_SAMPLE", 256)
    gen = torch.Generator().manual_seed(1)
    tv = {"p": discrete((60, 50), gen, levels=5, zero_frac=0.3), "q": torch.randn(900, generator=gen), "r": -torch.zeros(77)}
    t = T.topk_threshold(tv, k, method=method)
    assert t == sorted_threshold(flatten(tv), k)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_streaming_threshold_is_exact_for_other_float_dtypes(dtype, monkeypatch):
    monkeypatch.setattr(T, "_SMALL", 64)
    monkeypatch.setattr(T, "_SAMPLE", 128)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2)).to(dtype)
    for method in ("auto", "radix"):
        assert T.topk_threshold(x, 0.2, method=method) == sorted_threshold(x, 0.2)


def test_threshold_falls_back_to_radix_when_the_bracket_misses(monkeypatch):
    monkeypatch.setattr(T, "_SMALL", 64)
    monkeypatch.setattr(T, "_kth_largest_bracket", lambda *a, **k: None)
    x = torch.randn(3000, generator=torch.Generator().manual_seed(3))
    assert T.topk_threshold(x, 0.3) == sorted_threshold(x, 0.3)


def test_threshold_on_a_lazy_view_uses_the_same_entries(monkeypatch):
    monkeypatch.setattr(T, "_SMALL", 64)
    monkeypatch.setattr(T, "_SAMPLE", 256)
    pre, fts = models(torch.Generator().manual_seed(4))
    view = TaskVectorView(fts[0], pre)
    (tv,) = task_vectors(pre, fts[:1])
    assert T.topk_threshold(view, 0.2) == T.topk_threshold(tv, 0.2) == sorted_threshold(flatten(tv), 0.2)


def test_keep_count_and_full_keep_match_the_original():
    assert T.keep_count(10, 0.2) == 2 and T.keep_count(87_456_000, 0.2) == int(87_456_000 * 0.2)
    assert T.topk_threshold(torch.tensor([3.0, -1.0, 2.0]), 1.0) == 0.0
    # k so small that int(d*k) = 0: the threshold is the largest magnitude (ties kept)
    assert T.topk_threshold(torch.tensor([3.0, -3.0, 2.0]), 0.1) == 3.0


# --- the small helpers, by hand


def test_trim_keeps_entries_tied_at_the_threshold():
    x = torch.tensor([0.5, -1.0, 1.0, -0.25, 2.0, 0.0])
    assert torch.equal(T.trim(x, 1.0), torch.tensor([0.0, -1.0, 1.0, 0.0, 2.0, 0.0]))
    assert torch.equal(T.trim(x, 0.0), x)
    # exact for a threshold that is the next float after a value
    v = torch.tensor([1.0, float(np.nextafter(np.float32(1.0), np.float32(2.0)))])
    assert torch.equal(T.trim(v, float(v[1])), torch.tensor([0.0, float(v[1])]))


def test_elect_sign_by_hand_with_majority_for_zero_sums():
    trimmed = torch.tensor([[1.0, -2.0, 0.5, 0.0, 3.0],
                            [-3.0, 1.0, -0.5, 0.0, 1.0]])
    # sums: -2, -1, 0, 0, 4 -> signs -1, -1, 0, 0, 1; majority sign(-1) -> zeros become -1
    assert torch.equal(T.elect_sign(trimmed), torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0]))
    assert torch.equal(T.elect_sign(trimmed, majority=1.0), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))


def test_disjoint_merge_sum_mean_max_by_hand():
    trimmed = torch.tensor([[1.0, -2.0, 0.5, 0.0],
                            [3.0, 1.0, -0.5, 0.0],
                            [2.0, -4.0, 0.0, 0.0]])
    sign = torch.tensor([1.0, -1.0, -1.0, 1.0])
    assert torch.equal(T.disjoint_merge(trimmed, sign, "sum"), torch.tensor([6.0, -6.0, -0.5, 0.0]))
    assert torch.equal(T.disjoint_merge(trimmed, sign, "mean"), torch.tensor([2.0, -3.0, -0.5, 0.0]))
    assert torch.equal(T.disjoint_merge(trimmed, sign, "max"), torch.tensor([3.0, -4.0, -0.5, 0.0]))


# --- the whole merge


@pytest.mark.parametrize("disjoint", ["sum", "mean", "max"])
@pytest.mark.parametrize("grid", [True, False])
def test_ties_matches_a_direct_numpy_reimplementation(disjoint, grid):
    pre, fts = models(torch.Generator().manual_seed(5), k_models=4, grid=grid)
    keys = ["a.weight", "a.bias", "b.weight"]
    tv = np.stack([flatten(t, keys).numpy() for t in task_vectors(pre, fts)])
    merged, _ = numpy_ties(tv, 0.2, disjoint)
    out = merge("ties", pre, fts, k=0.2, scaling_coef=0.3, disjoint=disjoint)
    expected = flatten(pre, keys).numpy() + np.float32(0.3) * merged.astype(np.float32)
    np.testing.assert_allclose(flatten(out, keys).numpy(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(out["steps"], pre["steps"])


def test_ties_task_vectors_equal_numpy_selected_entries_exactly_and_sum_to_ties():
    pre, fts = models(torch.Generator().manual_seed(6), k_models=5)
    tvs = task_vectors(pre, fts)
    keys = list(tvs[0])
    phis = ties_task_vectors(tvs, k=0.2)
    _, selected = numpy_ties(np.stack([flatten(t).numpy() for t in tvs]), 0.2, "sum")
    for phi, row in zip(phis, selected):
        assert np.array_equal(flatten(phi, keys).numpy(), row)
    merged = merge("ties", pre, fts, scaling_coef=0.7)
    for key in keys:
        total = sum(phi[key] for phi in phis)
        torch.testing.assert_close(merged[key], pre[key] + 0.7 * total, rtol=1e-6, atol=1e-7)


def test_ties_keeps_only_sign_agreeing_entries():
    pre, fts = models(torch.Generator().manual_seed(7), k_models=4)
    tvs = task_vectors(pre, fts)
    phis = ties_task_vectors(tvs, k=0.3)
    for key in tvs[0]:
        stack = torch.stack([p[key] for p in phis])
        pos, neg = (stack > 0).any(dim=0), (stack < 0).any(dim=0)
        assert not bool((pos & neg).any())  # at each weight, all kept entries share one sign
        for p, tv in zip(phis, tvs):
            kept = p[key] != 0
            assert torch.equal(p[key][kept], tv[key][kept])  # kept entries are untouched values


def test_majority_sign_decides_where_trimmed_values_cancel():
    pre = {"w": torch.zeros(6)}
    # Position 0 cancels (+1, -1); the other positions' elected signs are mostly positive.
    fts = [{"w": torch.tensor([1.0, 2.0, 2.0, 2.0, -2.0, 0.0])},
           {"w": torch.tensor([-1.0, 2.0, 2.0, 2.0, 0.0, 0.0])}]
    out = merge("ties", pre, fts, k=1.0, scaling_coef=1.0)
    assert torch.equal(out["w"], torch.tensor([1.0, 4.0, 4.0, 4.0, -2.0, 0.0]))


def test_ties_keys_restrict_the_global_trim_and_others_keep_pretrained():
    pre, fts = models(torch.Generator().manual_seed(8))
    out = merge("ties", pre, fts, keys=["a.weight"])
    assert torch.equal(out["a.bias"], pre["a.bias"]) and torch.equal(out["b.weight"], pre["b.weight"])
    tv = np.stack([flatten(t, ["a.weight"]).numpy() for t in task_vectors(pre, fts)])
    merged, _ = numpy_ties(tv, 0.2, "sum")
    np.testing.assert_allclose(out["a.weight"].reshape(-1).numpy(),
                               pre["a.weight"].reshape(-1).numpy() + np.float32(0.3) * merged, rtol=1e-6, atol=1e-7)


def test_ties_does_not_modify_its_inputs():
    pre, fts = models(torch.Generator().manual_seed(9))
    before = [{k: v.clone() for k, v in sd.items()} for sd in [pre, *fts]]
    merge("ties", pre, fts, disjoint="mean")
    tvs = task_vectors(pre, fts)
    tv_before = [{k: v.clone() for k, v in t.items()} for t in tvs]
    ties_task_vectors(tvs)
    for a, b in zip([pre, *fts, *tvs], before + tv_before):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("params, message", [
    ({"k": 0.0}, r"'k' = 0 is out of range.*\(0, 1\]"),
    ({"k": 20}, r"'k' = 20 is out of range"),
    ({"disjoint": "median"}, r"'disjoint' = 'median' is not valid: use one of sum, mean, max"),
    ({"scaling_coef": 30.0}, r"'scaling_coef' = 30 is out of range"),
    ({"keys": ["nope"]}, r"'nope' is not in the pretrained state dict"),
])
def test_ties_bad_parameters_get_one_clear_error(params, message):
    pre, fts = models(torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match=message):
        merge("ties", pre, fts, **params)


def test_topk_threshold_rejects_bad_k_and_method():
    with pytest.raises(MergeError, match=r"fraction of entries kept per task, in \(0, 1\]"):
        T.topk_threshold(torch.ones(3), 1.5)
    with pytest.raises(MergeError, match="'auto', 'radix' or 'sort'"):
        T.topk_threshold(torch.ones(3), 0.2, method="fast")


@pytest.mark.parametrize("disjoint", ["sum", "mean", "max"])
def test_a_perfectly_balanced_vote_selects_negative_entries_like_the_original(disjoint):
    # σ = [0, -1, +1]: the majority sign is 0, and the original's torch.where(σ > 0, x > 0, x < 0)
    # then keeps the negative entries at the undecided position.
    pre = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor([1.0, -1.0, 1.0])}, {"w": torch.tensor([-1.0, -1.0, 1.0])}]
    out = merge("ties", pre, fts, k=1.0, scaling_coef=1.0, disjoint=disjoint)
    merged, selected = numpy_ties(np.stack([f["w"].numpy() for f in fts]), 1.0, disjoint)
    np.testing.assert_array_equal(out["w"].numpy(), merged.astype(np.float32))
    phis = ties_task_vectors(task_vectors(pre, fts), k=1.0)
    np.testing.assert_array_equal(np.stack([p["w"].numpy() for p in phis]), selected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_trim_is_exact_in_every_float_dtype(dtype):
    x = torch.randn(4000, generator=torch.Generator().manual_seed(11)).to(dtype)
    t = T.topk_threshold(x, 0.3)
    expected = torch.where(x.abs() >= t, x, torch.zeros_like(x))
    assert torch.equal(T.trim(x, t), expected)
    assert int((T.trim(x, t) != 0).sum()) >= T.keep_count(x.numel(), 0.3)
