"""Weight averaging, task arithmetic and the shared core: exact formulas, invariants, gradients."""

import pytest
import torch

from mergebook.methods import combine, mask_and_rescale, merge
from mergebook.statedict import layer_names, task_vectors


def hand():
    pre = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor([7])}
    fts = [{"w": torch.tensor([2.0, 2.0]), "n": torch.tensor([7])},
           {"w": torch.tensor([1.0, 4.0]), "n": torch.tensor([7])},
           {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor([7])}]
    return pre, fts  # τ = [1, 0], [0, 2], [3, -2]


def random_models(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    pre = {"x.weight": torch.randn(4, 3, generator=g), "x.bias": torch.randn(4, generator=g),
           "y.weight": torch.randn(2, 4, generator=g)}
    fts = [{key: v + 0.1 * torch.randn(v.shape, generator=g) for key, v in pre.items()} for _ in range(k)]
    return pre, fts


def test_weight_averaging_by_hand():
    pre, fts = hand()
    out = merge("weight_averaging", pre, fts)
    assert torch.equal(out["w"], torch.tensor([7.0 / 3, 2.0]))
    assert torch.equal(out["n"], pre["n"]) and out["n"] is not pre["n"]


def test_task_arithmetic_by_hand():
    pre, fts = hand()
    out = merge("task_arithmetic", pre, fts, scaling_coef=0.5)
    assert torch.equal(out["w"], torch.tensor([1.0 + 0.5 * 4.0, 2.0 + 0.5 * 0.0]))
    assert torch.equal(merge("task_arithmetic", pre, fts)["w"], torch.tensor([1.0, 2.0]) + 0.3 * torch.tensor([4.0, 0.0]))


def test_task_arithmetic_with_one_over_k_equals_weight_averaging():
    pre, fts = random_models(1, k=4)
    ta = merge("task_arithmetic", pre, fts, scaling_coef=1 / 4)
    wa = merge("weight_averaging", pre, fts)
    for key in pre:
        torch.testing.assert_close(ta[key], wa[key], rtol=1e-6, atol=1e-6)


def test_task_wise_by_hand_and_clamp():
    pre, fts = hand()
    out = merge("task_wise", pre, fts, coefficients=[0.5, 1.0, 2.0], clamp=False)
    assert torch.equal(out["w"], torch.tensor([1.0 + 0.5 + 6.0, 2.0 + 2.0 - 4.0]))
    clamped = merge("task_wise", pre, fts, coefficients=[0.5, 1.0, 2.0])  # 2.0 -> 1.0, as AdaMerging
    assert torch.equal(clamped["w"], torch.tensor([1.0 + 0.5 + 3.0, 2.0 + 2.0 - 2.0]))


def test_layer_wise_with_all_coefficients_equal_is_task_arithmetic():
    pre, fts = random_models(2)
    lw = merge("layer_wise", pre, fts, coefficients=torch.full((len(layer_names(pre)), 3), 0.3))
    ta = merge("task_arithmetic", pre, fts, scaling_coef=0.3)
    for key in pre:
        torch.testing.assert_close(lw[key], ta[key], rtol=1e-6, atol=1e-6)


def test_layer_wise_rows_follow_layer_names():
    pre, fts = random_models(3, k=2)
    c = torch.zeros(3, 2)
    c[layer_names(pre).index("x.bias")] = torch.tensor([1.0, 0.0])
    out = merge("layer_wise", pre, fts, coefficients=c)
    assert torch.equal(out["x.bias"], pre["x.bias"] + (fts[0]["x.bias"] - pre["x.bias"]))
    assert torch.equal(out["x.weight"], pre["x.weight"]) and torch.equal(out["y.weight"], pre["y.weight"])


def test_concrete_merge_with_an_all_ones_mask_equals_task_arithmetic():
    pre, fts = random_models(4)
    ones = {k: torch.ones_like(v) for k, v in pre.items()}
    cm = merge("concrete", pre, fts, mask=ones, scaling_coef=0.3)
    ta = merge("task_arithmetic", pre, fts, scaling_coef=0.3)
    for key in pre:
        torch.testing.assert_close(cm[key], ta[key], rtol=1e-6, atol=1e-7)


def test_mask_and_rescale_by_hand_and_all_zero_mask():
    tv = torch.tensor([1.0, 2.0, 3.0, 4.0])
    m = torch.tensor([1.0, 0.0, 1.0, 0.0])  # mean 0.5
    assert torch.equal(mask_and_rescale(tv, m), torch.tensor([2.0, 0.0, 6.0, 0.0]))
    assert torch.equal(mask_and_rescale(tv, torch.zeros(4)), torch.zeros(4))


def test_concrete_mask_subset_merges_only_masked_keys():
    pre, fts = random_models(5)
    mask = {"x.weight": torch.full((4, 3), 0.25)}
    out = merge("concrete", pre, fts, mask=mask, scaling_coef=1.0)
    assert torch.equal(out["x.bias"], pre["x.bias"])
    expected = pre["x.weight"] + sum(ft["x.weight"] - pre["x.weight"] for ft in fts)
    torch.testing.assert_close(out["x.weight"], expected, rtol=1e-6, atol=1e-6)


def test_combine_is_differentiable_in_coefficients_and_mask():
    pre, fts = random_models(6, k=2)
    tvs = task_vectors(pre, fts)
    lam = torch.tensor([0.3, 0.6], requires_grad=True)
    mask = {k: torch.full_like(v, 0.5).requires_grad_() for k, v in pre.items()}
    out = combine(pre, tvs, lam, mask=mask)
    loss = sum(v.square().sum() for v in out.values())
    loss.backward()
    assert lam.grad is not None and bool(torch.isfinite(lam.grad).all()) and float(lam.grad.abs().sum()) > 0
    assert all(m.grad is not None for m in mask.values())


def test_combine_centered_base_and_trim_without_consensus():
    pre, fts = random_models(7)
    tvs = task_vectors(pre, fts)
    base = merge("weight_averaging", pre, fts)
    centered = [{k: ft[k] - base[k] for k in tvs[0]} for ft in fts]
    out = combine(base, centered, 1.0)  # centered vectors sum to zero: back at θ_avg
    for key in pre:
        torch.testing.assert_close(out[key], base[key], rtol=1e-6, atol=1e-6)
    trimmed = combine(pre, tvs, 1.0, sparsify=1.0)  # keep everything: plain sum
    for key in pre:
        torch.testing.assert_close(trimmed[key], pre[key] + sum(t[key] for t in tvs), rtol=1e-6, atol=1e-6)


def test_combine_task_wise_consensus_sum_equals_weighted_phi():
    from mergebook.methods import ties_task_vectors

    pre, fts = random_models(8)
    tvs = task_vectors(pre, fts)
    phis = ties_task_vectors(tvs, k=0.5)
    c = torch.tensor([0.2, 0.5, 0.9])
    out = combine(pre, tvs, c, sparsify=0.5, consensus="sum")
    for key in pre:
        torch.testing.assert_close(out[key], pre[key] + sum(ci * p[key] for ci, p in zip(c, phis)), rtol=1e-6, atol=1e-6)


def test_methods_do_not_modify_inputs():
    pre, fts = random_models(9)
    before = [{k: v.clone() for k, v in sd.items()} for sd in [pre, *fts]]
    L = len(layer_names(pre))
    merge("weight_averaging", pre, fts)
    merge("task_arithmetic", pre, fts)
    merge("task_wise", pre, fts, coefficients=[0.1, 0.2, 0.3])
    merge("layer_wise", pre, fts, coefficients=torch.rand(L, 3))
    out = merge("concrete", pre, fts, mask={k: torch.rand_like(v) for k, v in pre.items()})
    for v in out.values():
        v.add_(1.0)  # the result owns its tensors
    for a, b in zip([pre, *fts], before):
        assert all(torch.equal(a[k], b[k]) for k in a)


# --- bad inputs: one clear error each


def test_layer_wise_wrong_shape_names_the_expected_shape():
    pre, fts = random_models(10)
    with pytest.raises(ValueError, match=r"shape \(2, 3\) but this model needs \[3, 3\].*layer_names"):
        merge("layer_wise", pre, fts, coefficients=torch.zeros(2, 3))


def test_task_wise_wrong_length_says_one_per_model():
    pre, fts = random_models(11)
    with pytest.raises(ValueError, match="2 entries for 3 task vectors"):
        merge("task_wise", pre, fts, coefficients=[0.3, 0.3])


def test_task_wise_requires_coefficients():
    pre, fts = random_models(12)
    with pytest.raises(ValueError, match="'coefficients' is required"):
        merge("task_wise", pre, fts)


def test_non_finite_coefficients_are_refused():
    pre, fts = random_models(13)
    with pytest.raises(ValueError, match="NaN or inf"):
        merge("task_wise", pre, fts, coefficients=[0.3, float("nan"), 0.3])


@pytest.mark.parametrize("mask, message", [
    ({"x.weight": torch.ones(3, 4)}, r"mask\['x.weight'\] has shape \(3, 4\)"),
    ({"x.weight": -torch.ones(4, 3)}, r"negative or non-finite"),
    ({"nope": torch.ones(1)}, r"'nope' is not in the pretrained state dict"),
])
def test_bad_masks_get_one_clear_error(mask, message):
    pre, fts = random_models(14)
    with pytest.raises(ValueError, match=message):
        merge("concrete", pre, fts, mask=mask)


def test_combine_refuses_gradients_through_ties_and_max_with_task_wise():
    pre, fts = random_models(15)
    tvs = task_vectors(pre, fts)
    with pytest.raises(ValueError, match="precompute ties_task_vectors"):
        combine(pre, tvs, torch.tensor([0.3, 0.3, 0.3], requires_grad=True), sparsify=0.2, consensus="sum")
    with pytest.raises(ValueError, match="consensus='max' .* single coefficient"):
        combine(pre, tvs, [0.3, 0.3, 0.3], consensus="max")
    with pytest.raises(ValueError, match="consensus 'vote' is unknown"):
        combine(pre, tvs, 0.3, consensus="vote")
