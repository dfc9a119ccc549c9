"""The shared test-time adaptation engine, AdaMerging(++) and CART++ on a pico-sized suite."""

from __future__ import annotations


import pytest
import torch

from mergebook.adaptation import (
    AdaptationResult,
    CoefficientAdapter,
    MergeSpace,
    TaskStreams,
    clamp_coefficients,
    entropy_objective,
)
from mergebook.evaluate import head_logits
from mergebook.models.suite import Suite, TaskData
from mergebook.models.vit import ViTConfig, VisionTransformer

PICO = ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=2, output_dim=16)


# ----------------------------------------------------------------------------------------------
# A toy suite: tiny random ViT, fake fine-tuned weights, random-prototype heads
# ----------------------------------------------------------------------------------------------


def toy_suite(num_tasks: int = 3, n: int = 32, classes: int = 5, seed: int = 0,
              dtype: torch.dtype = torch.float32, delta: float = 0.05, scale: float = 10.0) -> Suite:
    """Pretrained = a random pico ViT; fine-tuned = pretrained + small random deltas; labels = the
    fine-tuned model's own predictions (so each individual model is 100% accurate)."""
    torch.manual_seed(seed)
    model = VisionTransformer(PICO).to(dtype)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tasks = [f"t{i}" for i in range(num_tasks)]
    finetuned, heads, test = {}, {}, {}
    for t in tasks:
        finetuned[t] = {k: v + delta * torch.randn(v.shape, generator=g, dtype=dtype) for k, v in pre.items()}
        protos = torch.randn(classes, PICO.output_dim, generator=g, dtype=dtype)
        heads[t] = scale * torch.nn.functional.normalize(protos, dim=-1)
        images = torch.randn(n, 3, PICO.image_size, PICO.image_size, generator=g, dtype=dtype)
        with torch.no_grad():
            feats = torch.func.functional_call(model, finetuned[t], (images,))
        labels = head_logits(feats, heads[t]).argmax(-1)
        test[t] = TaskData(images, labels)
    return Suite(profile="pico", tasks=tasks, model=model, pretrained=pre, finetuned=finetuned,
                 heads=heads, test=test)


def task_vectors_local(pre, finetuned):
    """ft − pre over float tensors (the stand-in for mergebook.statedict.task_vectors)."""
    return [{k: ft[k] - v for k, v in pre.items() if v.is_floating_point()} for ft in finetuned]


def merged_loss(suite: Suite, space: MergeSpace, coefs: torch.Tensor, batches) -> torch.Tensor:
    params = space.merge(coefs)
    heads = [suite.heads[t] for t in suite.tasks]
    return entropy_objective(suite.model, params, heads, batches)[0]


def fixed_batches(suite: Suite, size: int = 8):
    return [[suite.test[t].images[:size]] for t in suite.tasks]


# ----------------------------------------------------------------------------------------------
# The merge
# ----------------------------------------------------------------------------------------------


def test_coefficient_gradient_matches_finite_differences():
    suite = toy_suite(dtype=torch.float64, delta=0.2)
    vecs = task_vectors_local(suite.pretrained, suite.finetuned_list())
    space = MergeSpace(suite.pretrained, vecs)
    batches = fixed_batches(suite)
    g = torch.Generator().manual_seed(3)
    for shape in [(space.num_tasks,), (space.num_layers, space.num_tasks)]:
        lam = (0.2 + 0.6 * torch.rand(shape, generator=g, dtype=torch.float64)).requires_grad_()
        (grad,) = torch.autograd.grad(merged_loss(suite, space, lam, batches), lam)
        flat = lam.detach().reshape(-1)
        idx = torch.randperm(flat.numel(), generator=g)[:6]
        eps = 1e-6
        for i in idx.tolist():
            plus, minus = flat.clone(), flat.clone()
            plus[i] += eps
            minus[i] -= eps
            fd = (merged_loss(suite, space, plus.view(shape), batches)
                  - merged_loss(suite, space, minus.view(shape), batches)) / (2 * eps)
            assert torch.allclose(grad.reshape(-1)[i], fd, rtol=1e-5, atol=1e-9), (shape, i)


def test_layer_wise_with_equal_coefficients_reproduces_task_arithmetic():
    from mergebook.methods import merge

    suite = toy_suite()
    vecs = task_vectors_local(suite.pretrained, suite.finetuned_list())
    space = MergeSpace(suite.pretrained, vecs)
    layer = space.merge(torch.full((space.num_layers, space.num_tasks), 0.3))
    task = space.merge(torch.full((space.num_tasks,), 0.3))
    ta = merge("task_arithmetic", suite.pretrained, suite.finetuned_list(), scaling_coef=0.3)
    for k, v in suite.pretrained.items():
        assert layer[k].shape == v.shape
        assert torch.allclose(layer[k], v + 0.3 * sum(t[k] for t in vecs), atol=1e-6), k
        assert torch.allclose(layer[k], ta[k], atol=1e-6), k
        assert torch.equal(layer[k], task[k]), k


def test_merge_agrees_with_the_registry_layer_wise_merge_for_any_coefficients():
    from mergebook.methods import merge

    suite = toy_suite()
    space = MergeSpace(suite.pretrained, task_vectors_local(suite.pretrained, suite.finetuned_list()))
    lam = torch.rand(space.num_layers, space.num_tasks, generator=torch.Generator().manual_seed(0))
    ours = space.merge(lam)
    ref = merge("layer_wise", suite.pretrained, suite.finetuned_list(), coefficients=lam, clamp=False)
    for k in suite.pretrained:
        assert torch.allclose(ours[k], ref[k], atol=1e-6), k


def test_merge_space_groups_tensors_by_shape_and_keeps_state_dict_order():
    suite = toy_suite()
    space = MergeSpace(suite.pretrained, task_vectors_local(suite.pretrained, suite.finetuned_list()))
    assert space.keys == list(suite.pretrained)
    # Two blocks of identical shapes: far fewer groups than tensors (one bmm per group).
    assert len(space.groups) < space.num_layers
    merged = space.merge(torch.zeros(space.num_tasks))
    assert list(merged) == list(suite.pretrained) or set(merged) == set(suite.pretrained)
    for k, v in suite.pretrained.items():
        assert torch.equal(merged[k], v)


def test_clamp_blocks_gradient_outside_unit_interval_only_when_on():
    lam = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    (g_on,) = torch.autograd.grad((clamp_coefficients(lam, True) * torch.arange(1.0, 6.0)).sum(), lam)
    assert g_on.tolist() == [0.0, 2.0, 3.0, 4.0, 0.0]
    (g_off,) = torch.autograd.grad((clamp_coefficients(lam, False) * torch.arange(1.0, 6.0)).sum(), lam)
    assert g_off.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    # And through the whole adapter: coefficients outside [0, 1] get no gradient when clamped.
    suite = toy_suite()
    space = MergeSpace(suite.pretrained, task_vectors_local(suite.pretrained, suite.finetuned_list()))
    for clamp in (True, False):
        ad = CoefficientAdapter(suite.model, space, [suite.heads[t] for t in suite.tasks],
                                granularity="task", clamp=clamp)
        with torch.no_grad():
            ad.raw.copy_(torch.tensor([-0.2, 0.5, 1.3]))
        loss = merged_loss(suite, space, clamp_coefficients(ad.raw, clamp), fixed_batches(suite))
        loss.backward()
        outside = ad.raw.grad[[0, 2]]
        assert (outside == 0).all() if clamp else (outside != 0).all()
        assert ad.raw.grad[1] != 0


def test_concatenated_forward_equals_one_forward_per_task():
    suite = toy_suite(dtype=torch.float64)
    space = MergeSpace(suite.pretrained, task_vectors_local(suite.pretrained, suite.finetuned_list()))
    params = space.merge(torch.full((space.num_tasks,), 0.3, dtype=torch.float64))
    heads = [suite.heads[t] for t in suite.tasks]
    batches = [[suite.test[t].images[:4], suite.test[t].images[4:10]] for t in suite.tasks]
    a, pa = entropy_objective(suite.model, params, heads, batches, concat=True)
    b, pb = entropy_objective(suite.model, params, heads, batches, concat=False)
    assert torch.allclose(a, b, rtol=1e-10) and torch.allclose(pa, pb, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# Data, the step, the loop
# ----------------------------------------------------------------------------------------------


def test_task_streams_are_seeded_and_cover_each_epoch():
    images = [torch.arange(10.0).view(10, 1), torch.arange(100.0, 107.0).view(7, 1)]
    a, b = TaskStreams(images, 3, seed=5), TaskStreams(images, 3, seed=5)
    seq_a = [a.step() for _ in range(6)]
    seq_b = [b.step() for _ in range(6)]
    for x, y in zip(seq_a, seq_b):
        assert all(torch.equal(u[0], v[0]) for u, v in zip(x, y))
    first_epoch = torch.cat([s[0][0] for s in seq_a[:3]]).view(-1)
    assert len(set(first_epoch.tolist())) == 9  # no repeats within an epoch
    c = TaskStreams(images, 3, seed=6)
    assert not all(torch.equal(c.step()[0][0], s[0][0]) for s in seq_a[:1])


def test_step_does_one_forward_and_one_backward(monkeypatch):
    suite = toy_suite()
    space = MergeSpace(suite.pretrained, task_vectors_local(suite.pretrained, suite.finetuned_list()))
    ad = CoefficientAdapter(suite.model, space, [suite.heads[t] for t in suite.tasks])
    calls = {"backward": 0, "forward": 0, "grad_hook": 0}
    real_backward = torch.Tensor.backward

    def counting_backward(self, *a, **k):
        calls["backward"] += 1
        return real_backward(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    handle = suite.model.register_forward_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    ad.raw.register_hook(lambda g: calls.__setitem__("grad_hook", calls["grad_hook"] + 1))
    streams = TaskStreams([suite.unlabeled(t) for t in suite.tasks], 4)
    for _ in range(3):
        ad.step(streams.step(2))
    handle.remove()
    # Three steps: three encoder forwards (all tasks and both batches at once), three backwards,
    # and λ's gradient arrives once per step (no per-task retained graphs).
    assert calls == {"backward": 3, "forward": 3, "grad_hook": 3}


def test_adamerging_lowers_entropy_and_accuracy_does_not_collapse():
    from mergebook.methods.adamerging import adamerging

    suite = toy_suite(n=48)
    res = adamerging(suite, "layer", steps=40, lr=1e-2, batch_size=8, batches_per_step=1,
                     eval_every=40, coef_every=5, progress=False, device="cpu")
    h = res.history
    assert len(h.entropy) == 40 and len(h.task_entropy[0]) == 3
    first, last = sum(h.entropy[:5]) / 5, sum(h.entropy[-5:]) / 5
    assert last < first
    assert h.eval_steps == [0, 40]
    assert h.accuracy[-1]["avg"] >= h.accuracy[0]["avg"] - 10.0
    assert res.coefficients.shape == (len(res.keys), 3)
    assert h.coefficient_steps == list(range(0, 41, 5))
    assert torch.equal(h.coefficients[0], torch.full_like(h.coefficients[0], 0.3))
    sd = res.state_dict()
    assert set(sd) == set(suite.pretrained)
    # The reported final accuracy is that of the weights the result hands out.
    from mergebook.evaluate import evaluate

    assert evaluate(suite, sd) == res.accuracy == h.accuracy[-1]


def test_same_seed_gives_bit_identical_history():
    from mergebook.methods.adamerging import adamerging

    suite = toy_suite()
    kw = dict(steps=6, lr=1e-2, batch_size=4, eval_every=3, coef_every=2, progress=False, device="cpu")
    a = adamerging(suite, "layer", seed=1, **kw)
    b = adamerging(suite, "layer", seed=1, **kw)
    c = adamerging(suite, "layer", seed=2, **kw)
    assert a.history.entropy == b.history.entropy
    assert a.history.task_entropy == b.history.task_entropy
    assert a.history.accuracy == b.history.accuracy
    assert all(torch.equal(x, y) for x, y in zip(a.history.coefficients, b.history.coefficients))
    assert torch.equal(a.coefficients, b.coefficients)
    assert a.history.entropy != c.history.entropy


def test_result_round_trips_through_json_and_safetensors(tmp_path):
    from mergebook.methods.adamerging import adamerging

    suite = toy_suite()
    res = adamerging(suite, "task", steps=4, batch_size=4, eval_every=2, coef_every=1,
                     progress=False, device="cpu")
    jpath, tpath = res.save(tmp_path / "run", weights=True)
    assert jpath.name == "run.json" and tpath.name == "run.safetensors"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    back = AdaptationResult.load(tmp_path / "run.json")
    assert back.method == "task_wise_adamerging" and back.history.entropy == res.history.entropy
    assert back.history.accuracy == res.history.accuracy
    assert torch.equal(back.history.coefficient_tensor(), res.history.coefficient_tensor())
    assert torch.equal(back.coefficients, res.coefficients)
    # The JSON alone (what chapters cache) also carries the coefficient trajectory.
    from mergebook.adaptation import History

    json_only = History.from_dict(res.history.to_dict())
    assert torch.equal(json_only.coefficient_tensor(), res.history.coefficient_tensor())
    for k, v in res.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    tpath.write_bytes(tpath.read_bytes()[:-8])  # a truncated tensor file is refused, not trusted
    with pytest.raises(ValueError):
        AdaptationResult.load(jpath)


def test_adamerging_plus_plus_with_equal_coefficients_is_ties_merging():
    from mergebook.methods import merge
    from mergebook.methods.adamerging import adamerging_space

    suite = toy_suite()
    space = adamerging_space(suite, plus_plus=True, device="cpu")
    ours = space.merge(torch.full((space.num_tasks,), 0.3))
    ties = merge("ties", suite.pretrained, suite.finetuned_list(), k=0.2, scaling_coef=0.3, disjoint="sum")
    for k in suite.pretrained:
        assert torch.allclose(ours[k], ties[k], atol=1e-6), k
    # And the Φ(T_k) really are trimmed: about 20% of each task's entries survive, fewer after sign election.
    kept = sum((g.vectors != 0).sum().item() for g in space.groups) / sum(g.vectors.numel() for g in space.groups)
    assert 0.05 < kept <= 0.2 + 1e-6


def test_cart_plus_plus_starts_at_cart_and_keeps_untruncated_tensors_at_the_average():
    from mergebook.methods import merge
    from mergebook.methods import adamerging as am

    suite = toy_suite()
    space = am.cart_space(suite, ratio=0.25, device="cpu")
    suffixes = ("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")
    assert all(k.endswith(suffixes) for k in space.keys) and len(space.keys) == 4 * PICO.layers
    merged = space.merge(torch.full((space.num_tasks,), 2.0))
    cart = merge("cart", suite.pretrained, suite.finetuned_list(), scaling_coef=2.0, ratio=0.25)
    for k in suite.pretrained:
        assert torch.allclose(merged[k], cart[k], atol=1e-5), k  # step 0 of CART++ is CART
    # Any coefficients leave the untruncated tensors (biases, norms, embeddings) at θ_avg.
    other = space.merge(torch.rand(space.num_layers, space.num_tasks))
    k = "transformer.resblocks.0.ln_1.weight"
    avg = sum(ft[k] for ft in suite.finetuned_list()) / len(suite.tasks)
    assert torch.allclose(other[k], avg, atol=1e-6)
    res = am.cart_plus_plus(suite, "layer", ratio=0.25, steps=3, batch_size=4, progress=False,
                            device="cpu", eval_every=3)
    assert res.coefficients.shape == (4 * PICO.layers, 3)
    assert torch.equal(res.history.coefficients[0], torch.full((4 * PICO.layers, 3), 2.0))


def test_low_precision_vectors_keep_the_base_precision_and_stay_close():
    suite = toy_suite()
    vecs = task_vectors_local(suite.pretrained, suite.finetuned_list())
    full = MergeSpace(suite.pretrained, vecs)
    half = MergeSpace(suite.pretrained, vecs, vector_dtype=torch.bfloat16)
    lam = torch.full((full.num_tasks,), 0.3, requires_grad=True)
    a, b = full.merge(lam), half.merge(lam)
    for k in a:
        assert b[k].dtype == torch.float32
        assert torch.allclose(a[k], b[k], atol=1e-3), k
    (g,) = torch.autograd.grad(sum(v.sum() for v in b.values()), lam)
    assert g.dtype == torch.float32 and torch.isfinite(g).all()


def test_large_image_sets_stay_on_the_host_and_batches_are_the_same():
    images = [torch.randn(20, 3, 4, 4), torch.randn(9, 3, 4, 4)]
    staged = TaskStreams(images, 4, seed=0, device="cpu")
    host = TaskStreams(images, 4, seed=0, device="cpu", stage_budget=0)
    assert host.images[0] is images[0]  # not copied
    for _ in range(5):
        for a, b in zip(staged.step(2), host.step(2)):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------
# The labelled diagnostic (chapter 02's headroom study)
# ----------------------------------------------------------------------------------------------


def test_supervised_coefficients_first_step_is_adams_sign_step_on_the_cross_entropy():
    """Adam's first update is −lr·g/(|g| + ε) (bias-corrected m̂ = g, v̂ = g²); g is recomputed here
    by a merge written out by hand."""
    from mergebook.adaptation import _mix, supervised_coefficients

    suite = toy_suite(num_tasks=2, n=24)
    pre, fts = suite.pretrained, [suite.finetuned[t] for t in suite.tasks]
    vectors = task_vectors_local(pre, fts)
    space = MergeSpace(pre, vectors)
    lr, bs = 1e-2, 6
    lam = supervised_coefficients(suite, space, "test", granularity="layer", steps=1, lr=lr, batch_size=bs)
    # The same draws as the contract says: one generator per task seeded _mix(seed, k), randint with replacement.
    idx = [torch.randint(24, (bs,), generator=torch.Generator().manual_seed(_mix(0, k))) for k in range(2)]
    coef = torch.full((len(space.keys), 2), 0.3, requires_grad=True)
    params = dict(pre)
    for l, key in enumerate(space.keys):
        params[key] = pre[key] + sum(coef[l, k] * vectors[k][key] for k in range(2))
    loss = 0.0
    for k, t in enumerate(suite.tasks):
        feats = torch.func.functional_call(suite.model, params, (suite.test[t].images[idx[k]],))
        loss = loss + torch.nn.functional.cross_entropy(head_logits(feats, suite.heads[t]), suite.test[t].labels[idx[k]])
    loss.backward()
    g = coef.grad
    assert (g.abs() > 1e-6).sum() > 0
    expected = (0.3 - lr * g / (g.abs() + 1e-8)).clamp(0, 1)
    torch.testing.assert_close(lam, expected, atol=2e-7, rtol=0)


def test_supervised_coefficients_lower_the_labelled_loss_and_check_their_input():
    from mergebook.adaptation import supervised_coefficients

    suite = toy_suite(num_tasks=2, n=32, delta=0.2)
    pre, fts = suite.pretrained, [suite.finetuned[t] for t in suite.tasks]
    space = MergeSpace(pre, task_vectors_local(pre, fts))

    def ce(coefs):
        params = space.merge(coefs)
        total = 0.0
        for t in suite.tasks:
            feats = torch.func.functional_call(suite.model, dict(params), (suite.test[t].images,))
            total += float(torch.nn.functional.cross_entropy(head_logits(feats, suite.heads[t]), suite.test[t].labels))
        return total

    start = torch.full((2,), 0.3)
    lam = supervised_coefficients(suite, space, "test", granularity="task", steps=40, lr=5e-2, batch_size=32)
    assert lam.shape == (2,) and bool(((lam >= 0) & (lam <= 1)).all())
    assert ce(lam) < ce(start)
    # the same seed gives the same λ
    again = supervised_coefficients(suite, space, "test", granularity="task", steps=40, lr=5e-2, batch_size=32)
    assert torch.equal(lam, again)
    with pytest.raises(ValueError, match="no labelled 'val' images"):
        supervised_coefficients(suite, space, "val")
    with pytest.raises(ValueError, match="split must be"):
        supervised_coefficients(suite, space, "train")
    with pytest.raises(ValueError, match="lr must be a positive finite learning rate"):
        supervised_coefficients(suite, space, "test", lr=0.0)
