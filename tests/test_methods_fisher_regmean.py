"""Fisher merging and RegMean: the data-using baselines, checked against direct computations."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from mergebook.methods import merge
from mergebook.methods import fisher as FI
from mergebook.methods import regmean as RM
from mergebook.models.vit import ViTConfig, VisionTransformer


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = VisionTransformer(ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=2, output_dim=16))
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    heads = [F.normalize(torch.randn(4, 16, generator=g), dim=-1) * 10 for _ in range(2)]
    data = [torch.randn(5, 3, 16, 16, generator=g) for _ in range(2)]
    return model, pre, fts, heads, data


def loop_fisher(model, params, head, images, weights_fn):
    """Direct per-example loop: Σ_y w(y|x) (∂ log p(y|x))², averaged over examples."""
    p = {k: v.clone().requires_grad_() for k, v in params.items()}
    out = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(images.shape[0]):
        logits = F.normalize(functional_call(model, p, (images[i:i + 1],)), dim=-1) @ head.T
        logp = F.log_softmax(logits, dim=-1)[0]
        for y, w in weights_fn(i, logp.detach().exp()):
            grads = torch.autograd.grad(logp[y], list(p.values()), retain_graph=True)
            for k, gk in zip(p, grads):
                out[k] += w * gk.square()
    return {k: v / images.shape[0] for k, v in out.items()}


def assert_fisher_close(a, b):
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-9)


def test_fisher_expected_matches_a_direct_per_example_loop(tiny):
    model, pre, fts, heads, data = tiny
    got = FI.fisher_information(model, fts[0], heads[0], data[0], batch_size=3, label="expected")
    ref = loop_fisher(model, fts[0], heads[0], data[0], lambda i, p: [(c, float(p[c])) for c in range(4)])
    assert_fisher_close(got, ref)


def test_fisher_argmax_matches_a_direct_per_example_loop(tiny):
    model, pre, fts, heads, data = tiny
    got = FI.fisher_information(model, fts[1], heads[1], data[1], batch_size=2, label="argmax")
    ref = loop_fisher(model, fts[1], heads[1], data[1], lambda i, p: [(int(p.argmax()), 1.0)])
    assert_fisher_close(got, ref)


def test_fisher_sample_matches_a_loop_with_the_same_sampled_labels(tiny):
    model, pre, fts, heads, data = tiny
    got = FI.fisher_information(model, fts[0], heads[0], data[0], batch_size=5, label="sample",
                                generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        probs = torch.softmax(F.normalize(functional_call(model, fts[0], (data[0],)), dim=-1) @ heads[0].T, -1)
    labels = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(7)).squeeze(1)
    ref = loop_fisher(model, fts[0], heads[0], data[0], lambda i, p: [(int(labels[i]), 1.0)])
    assert_fisher_close(got, ref)


def test_fisher_merge_with_equal_fishers_is_averaging(tiny):
    _, pre, fts, _, _ = tiny
    f = {k: torch.rand_like(v) for k, v in pre.items()}
    out = FI.merge_with_fishers(pre, fts, [f, f])
    wa = merge("weight_averaging", pre, fts)
    for k in pre:
        torch.testing.assert_close(out[k], wa[k], rtol=1e-6, atol=1e-6)


def test_fisher_merge_by_hand_with_floor():
    pre = {"w": torch.zeros(3)}
    fts = [{"w": torch.tensor([1.0, 1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0, 3.0])}]
    fishers = [{"w": torch.tensor([1.0, 0.0, 0.0])}, {"w": torch.tensor([3.0, 0.0, 1.0])}]
    out = FI.merge_with_fishers(pre, fts, fishers, floor=1e-6)
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 9) / 4, 2.0, (1e-6 + 3) / (1e-6 + 1)]))


def test_fisher_through_the_registry_and_a_huge_floor_gives_averaging(tiny):
    model, pre, fts, heads, data = tiny
    out = merge("fisher", pre, fts, model=model, heads=heads, data=data, num_examples=3, batch_size=2)
    assert list(out) == list(pre) and all(out[k].shape == pre[k].shape for k in pre)
    flat = merge("fisher", pre, fts, model=model, heads=heads, data=data, num_examples=2, floor=1e6)
    wa = merge("weight_averaging", pre, fts)
    for k in pre:
        torch.testing.assert_close(flat[k], wa[k], rtol=1e-6, atol=1e-6)


def test_fisher_needs_one_head_and_image_tensor_per_model(tiny):
    model, pre, fts, heads, data = tiny
    with pytest.raises(ValueError, match="one head and one image tensor per fine-tuned model: got 2 models, 1 heads"):
        merge("fisher", pre, fts, model=model, heads=heads[:1], data=data)
    with pytest.raises(ValueError, match="'label' = 'empirical' is not valid"):
        merge("fisher", pre, fts, model=model, heads=heads, data=data, label="empirical")


# --- RegMean


def test_regmean_with_alpha_one_is_closed_form_least_squares_on_one_linear_layer():
    g = torch.Generator().manual_seed(2)
    layer = nn.Linear(4, 3)
    pre = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(2)]
    xs = [torch.randn(20, 4, generator=g) for _ in range(2)]
    out = merge("regmean", pre, fts, model=layer, data=xs, alpha=1.0, num_examples=20, batch_size=7)
    # argmin_W Σ_k ‖X_k Wᵀ − X_k W_kᵀ‖²: least squares on the stacked inputs and targets
    x = torch.cat(xs).double()
    y = torch.cat([xk.double() @ ft["weight"].double().T for xk, ft in zip(xs, fts)])
    w = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(out["weight"].double(), w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["bias"], (fts[0]["bias"] + fts[1]["bias"]) / 2)


def test_regmean_with_equal_grams_is_averaging():
    g = torch.Generator().manual_seed(3)
    pre = {"l.weight": torch.randn(3, 4, generator=g), "l.bias": torch.randn(3, generator=g)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    gram = {"l.weight": x.T @ x / 10}
    out = RM.merge_with_grams(pre, fts, [gram] * 3, alpha=0.95)
    wa = merge("weight_averaging", pre, fts)
    for k in pre:
        torch.testing.assert_close(out[k], wa[k], rtol=1e-5, atol=1e-6)


def test_reduce_off_diagonal_by_hand():
    g = torch.tensor([[4.0, 2.0], [2.0, 6.0]])
    assert torch.equal(RM.reduce_off_diagonal(g, 0.5), torch.tensor([[4.0, 1.0], [1.0, 6.0]]))


def test_regmean_captures_in_proj_input_as_the_attention_block_input(tiny):
    model, pre, fts, _, data = tiny
    grams = RM.gram_matrices(model, fts[0], data[0], num_examples=4, batch_size=3)
    for i in range(2):
        for suffix, dim in (("attn.in_proj_weight", 32), ("attn.out_proj.weight", 32), ("mlp.c_fc.weight", 32),
                            ("mlp.c_proj.weight", 128)):
            assert grams[f"transformer.resblocks.{i}.{suffix}"].shape == (dim, dim)
    seen = []
    h = model.transformer.resblocks[0].ln_1.register_forward_hook(lambda m, a, o: seen.append(o.detach()))
    try:
        with torch.no_grad():
            functional_call(model, fts[0], (data[0][:4],))
    finally:
        h.remove()
    x = seen[0].reshape(-1, 32).double()
    torch.testing.assert_close(grams["transformer.resblocks.0.attn.in_proj_weight"], x.T @ x / x.shape[0])
    assert not any(m._forward_pre_hooks for m in model.modules())  # hooks removed


def test_regmean_merge_on_the_tiny_vit_and_singular_error(tiny):
    model, pre, fts, _, data = tiny
    before = [{k: v.clone() for k, v in sd.items()} for sd in [pre, *fts]]
    out = merge("regmean", pre, fts, model=model, data=data, num_examples=4)
    assert list(out) == list(pre) and all(bool(torch.isfinite(out[k]).all()) for k in pre)
    for a, b in zip([pre, *fts], before):
        assert all(torch.equal(a[k], b[k]) for k in a)
    layer = nn.Linear(3, 2)
    lp = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="singular.*alpha < 1 or more"):
        merge("regmean", lp, [lp, lp], model=layer, data=[torch.zeros(4, 3)] * 2, alpha=1.0)
    with pytest.raises(ValueError, match="one image tensor per fine-tuned model"):
        merge("regmean", pre, fts, model=model, data=data[:1])
