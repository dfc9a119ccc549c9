"""Concrete subspace learning: mask sampling, rescaling, Concrete TA and Concrete AdaMerging."""

from __future__ import annotations

import torch

from mergebook.adaptation import MergeSpace
from mergebook.methods.concrete import (
    ConcreteMask,
    concrete_adamerging,
    concrete_sample,
    concrete_task_arithmetic,
    hard_mask,
    mask_statistics,
    rescale_mask,
)
from tests.test_adaptation import (  # noqa: F401 (fixtures are used by name)
    task_vectors_local,
    toy_suite,
)


def test_concrete_mask_rescale_gives_mean_one_per_tensor():
    suite = toy_suite()
    space = MergeSpace(suite.pretrained, task_vectors_local(suite.pretrained, suite.finetuned_list()))
    mask = ConcreteMask(space, init=0.0, temperature=0.5)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for x in mask.logits:
            x.normal_(0.0, 2.0, generator=g)  # varied keep rates per element
    for mode in ("soft", "hard"):
        scales = space.ungroup(mask.scales(mask.sample(g, mode)))
        assert set(scales) == set(space.keys)
        for k, s in scales.items():
            assert torch.allclose(s.mean(), torch.tensor(1.0), atol=1e-5), (mode, k)
    assert torch.allclose(rescale_mask(torch.tensor([0.2, 0.6, 1.0])).mean(), torch.tensor(1.0))
    assert torch.equal(rescale_mask(torch.zeros(4)), torch.zeros(4))  # all dropped: no NaN


def test_concrete_samples_become_bernoulli_sigmoid_logit_as_temperature_vanishes():
    g = torch.Generator().manual_seed(1234)
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0])
    n = 20000
    samples = concrete_sample(logits.expand(n, -1).contiguous(), temperature=1e-3, generator=g)
    # Nearly every sample is within 1e-3 of 0 or 1 ...
    near_binary = ((samples < 1e-3) | (samples > 1 - 1e-3)).float().mean()
    assert near_binary > 0.995
    # ... and P(1) = sigmoid(logit), within 5 standard errors.
    p = torch.sigmoid(logits)
    freq = (samples > 0.5).float().mean(0)
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all(), (freq, p)
    # At the working temperature 0.5 the same thresholded frequency holds (it is exact at any T).
    soft = concrete_sample(logits.expand(n, -1).contiguous(), temperature=0.5, generator=g)
    assert ((hard_mask(soft).mean(0) - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all()
    assert ((soft >= 0) & (soft <= 1)).all()
    assert ((soft > 0.01) & (soft < 0.99)).float().mean() > 0.3  # still a relaxation at T = 0.5


def test_concrete_sample_is_differentiable_in_the_logits():
    x = torch.zeros(6, requires_grad=True)
    m = concrete_sample(x, 0.5, torch.Generator().manual_seed(0))
    (m * torch.arange(6.0)).sum().backward()
    assert x.grad is not None and (x.grad[1:] > 0).all()


def test_all_ones_mask_concrete_merge_equals_task_arithmetic():
    suite = toy_suite()
    vecs = task_vectors_local(suite.pretrained, suite.finetuned_list())
    space = MergeSpace(suite.pretrained, vecs)
    ones = [torch.ones_like(x) for x in space.group_zeros()]
    merged = space.merge(torch.full((space.num_tasks,), 0.3), ConcreteMask.scales(ones))
    for k, v in suite.pretrained.items():
        assert torch.allclose(merged[k], v + 0.3 * sum(t[k] for t in vecs), atol=1e-6), k


def test_concrete_task_arithmetic_trains_only_the_mask_and_is_deterministic():
    suite = toy_suite()
    kw = dict(steps=5, lr=1e-2, batch_size=4, eval_every=5, coef_every=1, progress=False, device="cpu")
    a = concrete_task_arithmetic(suite, seed=3, **kw)
    b = concrete_task_arithmetic(suite, seed=3, **kw)
    assert a.history.entropy == b.history.entropy and a.history.accuracy == b.history.accuracy
    assert a.accuracy == b.accuracy
    assert all(torch.equal(a.mask_logits[k], b.mask_logits[k]) for k in a.mask_logits)
    assert torch.equal(a.coefficients, torch.full((3,), 0.3))
    assert a.granularity == "none" and len(a.history.extra["kept"]) == 5
    assert any(v.abs().max() > 0 for v in a.mask_logits.values())  # the logits moved from 0
    stats = a.mask_stats
    assert set(stats["per_tensor"]) == set(a.keys)
    assert set(stats["per_block"]) >= {"transformer.resblocks.0", "transformer.resblocks.1", "conv1"}
    assert 0.0 <= stats["overall"]["kept"] <= 1.0 and "sample_kept" in stats["overall"]
    # The result's weights are Concrete TA (Alg. 2) with the kept sample, as the registry merges it.
    from mergebook.methods import merge

    ref = merge("concrete", suite.pretrained, suite.finetuned_list(), mask=a.mask_sample, scaling_coef=0.3)
    assert all(torch.allclose(a.state_dict()[k], ref[k], atol=1e-6) for k in ref)
    # How often a run evaluates changes neither training nor the mask it keeps.
    rare = concrete_task_arithmetic(suite, seed=3, **{**kw, "eval_every": 100})
    assert rare.history.entropy == a.history.entropy and rare.accuracy == a.accuracy
    assert all(torch.equal(rare.state_dict()[k], v) for k, v in a.state_dict().items())
    # Evaluated with the soft sample by default; the hard mask is an option.
    hard = concrete_task_arithmetic(suite, seed=3, eval_mask="hard", **kw)
    assert hard.history.entropy == a.history.entropy
    sd = hard.state_dict()
    k = "transformer.resblocks.0.mlp.c_fc.weight"
    delta = sd[k] - suite.pretrained[k]
    assert 0.2 < (delta == 0).float().mean() < 0.8  # a hard mask drops about half at p ≈ 0.5


def test_mask_statistics_by_tensor_and_block():
    logits = {"transformer.resblocks.0.attn.in_proj_weight": torch.tensor([[1.0, -1.0], [2.0, 3.0]]),
              "transformer.resblocks.0.ln_1.bias": torch.tensor([-1.0, -1.0]),
              "proj": torch.tensor([[5.0]])}
    s = mask_statistics(logits)
    assert s["per_tensor"]["transformer.resblocks.0.attn.in_proj_weight"]["kept"] == 0.75
    assert s["per_block"]["transformer.resblocks.0"]["kept"] == 0.5
    assert s["per_block"]["proj"]["kept"] == 1.0
    assert abs(s["overall"]["kept"] - 4 / 7) < 1e-12


def test_concrete_adamerging_meta_learns_then_adapts():
    suite = toy_suite()
    kw = dict(meta_steps=4, tta_steps=3, batch_size=4, eval_every=2, coef_every=1, progress=False,
              device="cpu")
    res = concrete_adamerging(suite, "layer", seed=0, **kw)
    meta = res.phases["meta"]
    assert len(meta.entropy) == 4 and len(meta.extra["inner_entropy"]) == 4
    assert len(res.history.entropy) == 3
    # λ is reset to 0.3 for test-time adaptation.
    assert torch.equal(res.history.coefficients[0], torch.full((len(res.keys), 3), 0.3))
    # Inner Adam at lr 1 moves λ' by about 1 per step, so meta-phase λ' leave 0.3 at once.
    assert (meta.coefficients[1] - 0.3).abs().max() > 0.5
    again = concrete_adamerging(suite, "layer", seed=0, **kw)
    assert again.phases["meta"].entropy == meta.entropy and again.history.entropy == res.history.entropy
    reset = concrete_adamerging(suite, "layer", seed=0, inner_point="reset", **kw)
    # The first step is the same either way (the previous λ' is the initial λ); later ones differ.
    assert reset.phases["meta"].extra["inner_entropy"][0] == meta.extra["inner_entropy"][0]
    assert reset.phases["meta"].extra["inner_entropy"] != meta.extra["inner_entropy"]
    rare = concrete_adamerging(suite, "layer", seed=0, **{**kw, "eval_every": 100})
    assert rare.history.entropy == res.history.entropy and rare.accuracy == res.accuracy
    tw = concrete_adamerging(suite, "task", seed=0, **kw)
    assert tw.coefficients.shape == (3,)


def test_adaptive_methods_refuse_a_bad_schedule_before_touching_the_data():
    """Adam takes a NaN, infinite or negative lr silently and returns NaN or diverging coefficients;
    every adaptive method names the bad parameter instead."""
    import math

    import pytest

    from mergebook.adaptation import check_schedule
    from mergebook.methods.adamerging import adamerging

    suite = toy_suite()
    kw = dict(batch_size=4, progress=False, device="cpu")
    for bad in (float("nan"), float("inf"), 0.0, -1e-3, True, "1e-3"):
        with pytest.raises(ValueError, match="concrete_task_arithmetic: lr must be a positive finite"):
            concrete_task_arithmetic(suite, steps=1, lr=bad, **kw)
        for name in ("inner_lr", "outer_lr", "tta_lr"):
            with pytest.raises(ValueError, match=f"concrete_adamerging: {name} must be a positive finite"):
                concrete_adamerging(suite, meta_steps=1, tta_steps=1, **{name: bad}, **kw)
        with pytest.raises(ValueError, match="lr must be a positive finite"):
            adamerging(suite, "layer", steps=1, lr=bad, **kw)
    with pytest.raises(ValueError, match="concrete_adamerging: meta_steps must be an integer >= 0, got -1"):
        concrete_adamerging(suite, meta_steps=-1, tta_steps=1, **kw)
    with pytest.raises(ValueError, match="tta_steps must be an integer >= 0, got 2.5"):
        concrete_adamerging(suite, meta_steps=1, tta_steps=2.5, **kw)
    with pytest.raises(ValueError, match="batches_per_step must be an integer >= 1, got 0"):
        adamerging(suite, "task", steps=1, batches_per_step=0, **kw)
    # numpy scalars (what a papermill sweep may pass) are accepted; zero steps is a valid (empty) run
    import numpy as np

    check_schedule("x", lrs={"lr": np.float32(1e-3)}, steps={"steps": np.int64(0)}, at_least_one={"b": np.int64(1)})
    assert math.isfinite(concrete_task_arithmetic(suite, steps=0, lr=1e-3, eval_every=0, **kw).accuracy["avg"])
