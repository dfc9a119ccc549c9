"""CART: centered low-rank task arithmetic, its end points, reverse order, routing and spectra."""

import pytest
import torch

from mergebook.methods import combine, merge
from mergebook.methods import cart as C
from mergebook.models.vit import ViTConfig, VisionTransformer
from mergebook.statedict import float_keys

WIDTH = 16


@pytest.fixture(scope="module")
def vit_models():
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(image_size=16, patch_size=8, width=WIDTH, layers=2, heads=2, output_dim=8))
    pre = {k: v.detach().clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    return pre, fts


def close(a, b, tol=1e-5):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


def test_default_matrix_rule_selects_the_four_clip_matrices_like_the_original_string_test(vit_models):
    pre, _ = vit_models
    mine = [k for k in float_keys(pre) if C.default_matrix_rule(k, pre[k])]
    theirs = [k for k in float_keys(pre) if C.original_cart_rule(k, pre[k])]
    assert mine == theirs and len(mine) == 2 * 4
    assert all(k.endswith(C.CLIP_MATRIX_SUFFIXES) for k in mine)


def test_rank_for_follows_the_original_rule():
    assert C.rank_for((2304, 768), 0.12) == 92
    assert C.rank_for((16, 64), 0.01) == 1  # max(1, int(0.16))
    assert C.rank_for((16, 64), 0.0) == 0 and C.rank_for((16, 64), 1.0) == 16
    assert C.rank_for((16, 64), rank=5) == 5


def test_rank_zero_is_exactly_theta_avg_and_full_rank_is_the_average(vit_models):
    pre, fts = vit_models
    wa = merge("weight_averaging", pre, fts)
    avg = C._average(pre, fts)
    for kw in ({"rank": 0}, {"ratio": 0.0}):
        out = merge("cart", pre, fts, **kw)
        assert all(torch.equal(out[k], avg[k]) for k in pre)
    close(avg, wa)
    close(merge("cart", pre, fts, ratio=1.0), wa)
    close(merge("cart", pre, fts, rank=WIDTH), wa)


def test_reverse_at_full_rank_equals_forward(vit_models):
    pre, fts = vit_models
    fwd = merge("cart", pre, fts, rank=WIDTH)
    rev = merge("cart", pre, fts, rank=WIDTH, reverse=True)
    assert all(torch.equal(fwd[k], rev[k]) for k in pre)


@pytest.mark.parametrize("method", ["gram", "gram32", "svd"])
def test_lowrank_is_the_svd_truncation_and_top_plus_bottom_is_the_matrix(method):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(4, 24, 10, generator=g)
    u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    for r in (1, 3, 7):
        top = C.lowrank(a, r, method=method)
        ref = ((u[..., :r] * s[..., None, :r]) @ vh[..., :r, :]).float()
        torch.testing.assert_close(top, ref, rtol=1e-4, atol=1e-5)
        assert int(torch.linalg.matrix_rank(top[0], atol=1e-4)) == r
        bottom = C.lowrank(a, 10 - r, method=method, reverse=True)
        torch.testing.assert_close(top + bottom, a, rtol=1e-4, atol=1e-5)
    wide = torch.randn(3, 6, 20, generator=g)  # the Gram is taken on the smaller side either way
    torch.testing.assert_close(C.lowrank(wide, 2, method="gram"), C.lowrank(wide, 2, method="svd"), rtol=1e-4, atol=1e-5)


def test_gram_method_agrees_with_float64_svd_to_1e_6_on_a_gapped_spectrum():
    g = torch.Generator().manual_seed(3)
    q1, _ = torch.linalg.qr(torch.randn(64, 32, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    s = torch.cat([torch.linspace(10, 5, 8), torch.linspace(1, 0.01, 24)]).double()
    a = (q1 * s) @ q2.T
    ref = (q1[:, :8] * s[:8]) @ q2[:, :8].T
    err = (C.lowrank(a.float(), 8, method="gram").double() - ref).norm() / ref.norm()
    assert err < 1e-6


def test_in_proj_is_truncated_as_one_matrix(vit_models):
    pre, fts = vit_models
    _, vecs = C.cart_lowrank_vectors(pre, fts, rank=2)
    v = vecs[0]["transformer.resblocks.0.attn.in_proj_weight"]
    assert v.shape == (3 * WIDTH, WIDTH)
    assert int(torch.linalg.matrix_rank(v, atol=1e-5)) == 2  # one SVD of stacked QKV, not rank 2 per block


def test_untruncated_tensors_keep_full_centered_vectors_and_end_at_theta_avg(vit_models):
    pre, fts = vit_models
    base, vecs = C.cart_lowrank_vectors(pre, fts, ratio=0.25)
    key = "transformer.resblocks.0.ln_1.weight"
    for v, ft in zip(vecs, fts):
        torch.testing.assert_close(v[key], ft[key] - base[key])
    out = merge("cart", pre, fts, ratio=0.25)
    torch.testing.assert_close(out[key], base[key], rtol=1e-6, atol=1e-6)


def test_cart_equals_combine_over_its_lowrank_vectors(vit_models):
    pre, fts = vit_models
    base, vecs = C.cart_lowrank_vectors(pre, fts, ratio=0.3)
    close(merge("cart", pre, fts, ratio=0.3, scaling_coef=1.5), combine(base, vecs, 1.5), tol=1e-6)


def test_cart_formula_by_hand_on_one_matrix():
    pre = {"blk.mlp.c_fc.weight": torch.zeros(3, 2)}
    fts = [{"blk.mlp.c_fc.weight": torch.tensor([[3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])},
           {"blk.mlp.c_fc.weight": torch.tensor([[-3.0, 0.0], [0.0, 1.0], [0.0, 0.0]])}]
    # θ_avg = [[0,0],[0,1],[0,0]]; centered = ±[[3,0],[0,0],[0,0]] (rank 1): rank-1 keeps them whole
    out = merge("cart", pre, fts, rank=1, scaling_coef=2.0)
    torch.testing.assert_close(out["blk.mlp.c_fc.weight"], torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    # uncentered: τ_1 = diag(3, 1), τ_2 = diag(-3, 1); rank 1 keeps σ=3 directions: ±3 e1 e1ᵀ, sum 0
    unc = merge("cart", pre, fts, rank=1, scaling_coef=2.0, centered=False)
    torch.testing.assert_close(unc["blk.mlp.c_fc.weight"], torch.zeros(3, 2))
    # reverse rank 1 keeps the σ=1 directions: 2 · (e2 e2ᵀ + e2 e2ᵀ) = 4 at [1, 1]
    rev = merge("cart", pre, fts, rank=1, scaling_coef=2.0, centered=False, reverse=True)
    torch.testing.assert_close(rev["blk.mlp.c_fc.weight"], torch.tensor([[0.0, 0.0], [0.0, 4.0], [0.0, 0.0]]))


def test_uncentered_variant_at_full_rank_is_task_arithmetic_and_at_rank_zero_is_pretrained(vit_models):
    pre, fts = vit_models
    close(merge("cart", pre, fts, centered=False, ratio=1.0, scaling_coef=0.3),
          merge("task_arithmetic", pre, fts, scaling_coef=0.3))
    zero = merge("cart", pre, fts, centered=False, rank=0)
    assert all(torch.equal(zero[k], pre[k]) for k in pre)


def test_routing_at_full_rank_returns_each_fine_tuned_model(vit_models):
    pre, fts = vit_models
    for t in range(3):
        close(C.cart_route(pre, fts, t, rank=WIDTH), fts[t])
        close(C.cart_route(pre, fts, t, rank=WIDTH, centered=False), fts[t])
    avg = C._average(pre, fts)
    routed = C.cart_route(pre, fts, 1, rank=0)
    assert all(torch.equal(routed[k], avg[k]) for k in pre)


def test_routing_equals_theta_avg_plus_that_tasks_lowrank_vector(vit_models):
    pre, fts = vit_models
    base, vecs = C.cart_lowrank_vectors(pre, fts, ratio=0.25)
    routed = C.cart_route(pre, fts, 2, ratio=0.25, coefficient=1.0)
    close(routed, {k: base[k] + vecs[2][k] if k in vecs[2] else base[k] for k in pre}, tol=1e-6)
    with pytest.raises(ValueError, match="task_index 3 is out of range"):
        C.cart_route(pre, fts, 3)


def test_singular_values_are_the_spectra_of_the_centered_vectors(vit_models):
    pre, fts = vit_models
    sv = C.singular_values(pre, fts)
    base = C._average(pre, fts)
    key = "transformer.resblocks.1.mlp.c_proj.weight"
    assert set(sv) == {k for k in pre if C.default_matrix_rule(k, pre[k])}
    assert sv[key].shape == (3, WIDTH)
    assert bool((sv[key][:, :-1] >= sv[key][:, 1:]).all())
    for t, ft in enumerate(fts):
        torch.testing.assert_close(sv[key][t].square().sum(), (ft[key] - base[key]).square().sum(), rtol=1e-4, atol=1e-6)
    unc = C.singular_values(pre, fts, centered=False)
    torch.testing.assert_close(unc[key][0].square().sum(), (fts[0][key] - pre[key]).square().sum(), rtol=1e-4, atol=1e-6)
    e = C.cumulative_energy(sv[key])
    torch.testing.assert_close(e[:, -1], torch.ones(3))


def test_cart_does_not_modify_inputs(vit_models):
    pre, fts = vit_models
    before = [{k: v.clone() for k, v in sd.items()} for sd in [pre, *fts]]
    out = merge("cart", pre, fts, centered=False, rank=0)
    for v in out.values():
        v.add_(1.0)
    C.cart_lowrank_vectors(pre, fts)
    C.cart_route(pre, fts, 0)
    for a, b in zip([pre, *fts], before):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("params, message", [
    ({"rank": WIDTH + 1}, r"rank = 17 is out of range for a 48×16 matrix: use 0 ≤ rank ≤ 16"),
    ({"rank": -1}, r"'rank' = -1 is out of range"),
    ({"ratio": 1.5}, r"'ratio' = 1.5 is out of range: use a value in \[0, 1\]"),
    ({"method": "qr"}, r"'method' = 'qr' is not valid: use one of gram, gram32, svd"),
    ({"matrix_rule": lambda k, t: k.endswith("ln_1.weight")}, r"selected .*ln_1.weight.* not a matrix"),
])
def test_cart_bad_parameters_get_one_clear_error(vit_models, params, message):
    pre, fts = vit_models
    with pytest.raises(ValueError, match=message):
        merge("cart", pre, fts, **params)


def test_matrix_rule_none_or_suffixes_select_the_default_matrices(vit_models):
    pre, fts = vit_models
    a = merge("cart", pre, fts, ratio=0.25)
    b = merge("cart", pre, fts, ratio=0.25, matrix_rule=None)
    c = merge("cart", pre, fts, ratio=0.25, matrix_rule=list(C.CLIP_MATRIX_SUFFIXES))
    d = merge("cart", pre, fts, ratio=0.25, matrix_rule=C.original_cart_rule)
    for other in (b, c, d):
        assert all(torch.equal(a[k], other[k]) for k in pre)


def test_stack_qkv_on_split_weights_equals_the_fused_in_proj(vit_models):
    """HF CLIP splits Q, K, V; stack_qkv truncates them as the one in_proj matrix of the original."""
    pre, fts = vit_models

    def split(sd):
        out = {}
        for k, v in sd.items():
            if k.endswith("attn.in_proj_weight"):
                p = k[: -len("in_proj_weight")]
                for name, part in zip(("q_proj.weight", "k_proj.weight", "v_proj.weight"), v.chunk(3, dim=0)):
                    out[p + name] = part.clone()
            else:
                out[k] = v
        return out

    rule = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "attn.out_proj.weight", "mlp.c_fc.weight",
            "mlp.c_proj.weight")
    fused = merge("cart", pre, fts, ratio=0.25)
    stacked = merge("cart", split(pre), [split(f) for f in fts], ratio=0.25, matrix_rule=rule, stack_qkv=True)
    separate = merge("cart", split(pre), [split(f) for f in fts], ratio=0.25, matrix_rule=rule)
    key = "transformer.resblocks.0.attn.in_proj_weight"
    parts = ["transformer.resblocks.0.attn." + n for n in ("q_proj.weight", "k_proj.weight", "v_proj.weight")]
    torch.testing.assert_close(torch.cat([stacked[p] for p in parts]), fused[key], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(torch.cat([separate[p] for p in parts]), fused[key], rtol=1e-5, atol=1e-6)
    sv = C.singular_values(split(pre), [split(f) for f in fts], matrix_rule=rule, stack_qkv=True)
    assert sv["transformer.resblocks.0.attn.qkv_proj.weight"].shape == (3, WIDTH)
    with pytest.raises(ValueError, match="no complete q/k/v triple"):
        merge("cart", split(pre), [split(f) for f in fts], matrix_rule=("q_proj.weight",), stack_qkv=True)
