"""One weight layout for every CLIP: conversion, layout invariance of every method, Ties' trim population."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from mergebook import layout as L  # noqa: E402
from mergebook.methods import METHODS, MergeError, merge  # noqa: E402
from mergebook.methods import ties as T  # noqa: E402
from mergebook.models.vit import ViTConfig, VisionTransformer  # noqa: E402
from mergebook.statedict import layer_names  # noqa: E402


def _hf_config(**kw):
    from transformers import CLIPVisionConfig

    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                patch_size=16, projection_dim=16)
    return CLIPVisionConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def hf_models():
    """A pico transformers CLIP vision tower (with projection) and three perturbed copies, HF names."""
    from transformers import CLIPVisionModelWithProjection

    torch.manual_seed(0)
    model = CLIPVisionModelWithProjection(_hf_config()).eval()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    fts = []
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        fts.append({k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()})
    return model, pre, fts


def test_hf_to_canonical_and_back_is_the_identity(hf_models):
    _, pre, _ = hf_models
    canon, info = L.hf_to_canonical(pre)
    assert info.layout == L.HF_CLIP and L.detect_layout(canon) == L.CANONICAL
    assert len(canon) == 8 + 12 * 2  # open_clip's count per block: 12, plus 8 global tensors
    back = L.from_canonical(canon, info)
    assert list(back) == list(pre)
    assert all(torch.equal(back[k], pre[k]) for k in pre)
    # q, k, v are stacked in that order, as nn.MultiheadAttention's in_proj_weight
    q, k, v = (pre[f"vision_model.encoder.layers.1.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(canon["transformer.resblocks.1.attn.in_proj_weight"], torch.cat([q, k, v]))
    assert torch.equal(canon["proj"], pre["visual_projection.weight"].t())


def test_bare_clipvisionmodel_keys_without_prefix_convert_and_return_in_their_own_names(hf_models):
    _, pre, _ = hf_models
    bare = {k.removeprefix("vision_model."): v for k, v in pre.items() if k != "visual_projection.weight"}
    canon, info = L.to_canonical(bare)
    assert "proj" not in canon and not info.has_projection
    back = L.from_canonical(canon, info)
    assert list(back) == list(bare) and all(torch.equal(back[k], bare[k]) for k in bare)


def test_canonical_vit_reproduces_clipvisionmodelwithprojection_image_embeds(hf_models):
    model, pre, _ = hf_models
    canon, _ = L.hf_to_canonical(pre)
    vit = VisionTransformer(L.vit_config_from_hf(model.config, 16))
    vit.load_state_dict(canon)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(vit.eval()(x), model(pixel_values=x).image_embeds, atol=2e-6, rtol=1e-5)


def test_layer_count_on_true_vit_b_32_shapes_is_152():
    from transformers import CLIPVisionModelWithProjection

    with torch.device("meta"):
        hf = CLIPVisionModelWithProjection(_hf_config(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                                      num_attention_heads=12, image_size=224, patch_size=32,
                                                      projection_dim=512))
        vit = VisionTransformer(ViTConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12,
                                          output_dim=512))
    hf_sd = {k: v for k, v in hf.state_dict().items() if v.is_floating_point()}
    assert len(hf_sd) == 200  # transformers keeps q, k, v apart
    canon, _ = L.hf_to_canonical(hf_sd)
    assert len(layer_names(canon)) == 152
    assert {k: tuple(v.shape) for k, v in canon.items()} == {k: tuple(v.shape) for k, v in vit.state_dict().items()}


def _method_kwargs(name, model, pre_c, fts_c):
    """Arguments for every registered method (data-using ones get a model, heads and data)."""
    n = len(fts_c)
    if name == "layer_wise":
        return {"coefficients": np.linspace(0.1, 0.5, len(layer_names(pre_c)) * n).reshape(-1, n)}
    if name == "task_wise":
        return {"coefficients": [0.2, 0.3, 0.4]}
    if name == "concrete":
        g = torch.Generator().manual_seed(3)
        return {"mask": {k: (torch.rand(v.shape, generator=g) > 0.3).float() for k, v in pre_c.items()}}
    if name in ("fisher", "regmean"):
        g = torch.Generator().manual_seed(4)
        data = [torch.randn(6, 3, 32, 32, generator=g) for _ in range(n)]
        kw = {"model": model, "data": data}
        if name == "fisher":
            kw["heads"] = [torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1) * 10 for _ in range(n)]
        return kw
    if name in ("cart",):
        return {"ratio": 0.3}
    return {}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_gives_the_same_merge_on_hf_and_open_clip_layouts(hf_models, name):
    model, pre, fts = hf_models
    pre_c, info = L.hf_to_canonical(pre)
    fts_c = [L.hf_to_canonical(f)[0] for f in fts]
    from mergebook.models.clip_hf import CLIPVisionEncoder

    enc = CLIPVisionEncoder(L.vit_config_from_hf(model.config, 16))
    enc.load_state_dict(pre_c)
    kw_c = _method_kwargs(name, enc.eval(), pre_c, fts_c)
    kw_hf = dict(kw_c)
    if "mask" in kw_c:
        kw_hf["mask"] = L.from_canonical(kw_c["mask"], info)
    if "model" in kw_c:
        kw_hf["model"] = model
    merged_c = merge(name, pre_c, fts_c, **kw_c)
    merged_hf = merge(name, pre, fts, **kw_hf)
    assert list(merged_hf) == list(pre)  # back in the layout it came in
    expected = L.from_canonical(merged_c, info)
    for k in pre:
        torch.testing.assert_close(merged_hf[k], expected[k], atol=1e-6, rtol=1e-5, msg=f"{name}: {k}")
    assert any(not torch.equal(merged_c[k], pre_c[k]) for k in pre_c), f"{name} changed nothing"


def test_cart_on_hf_weights_truncates_qkv_and_mlp_not_only_out_proj(hf_models):
    _, pre, fts = hf_models
    avg = merge("weight_averaging", pre, fts)
    cart = merge("cart", pre, fts, ratio=0.25)
    changed = {k for k in pre if not torch.allclose(cart[k], avg[k], atol=1e-7)}
    for layer in range(2):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1",
                     "mlp.fc2"):
            assert f"vision_model.encoder.layers.{layer}.{part}.weight" in changed


def test_hf_suffix_rules_translate_and_partial_qkv_is_an_error(hf_models):
    _, pre, fts = hf_models
    from mergebook.models.clip_hf import HF_CLIP_MATRIX_KEYS

    a = merge("cart", pre, fts, ratio=0.25, matrix_rule=HF_CLIP_MATRIX_KEYS)
    b = merge("cart", pre, fts, ratio=0.25)
    assert all(torch.equal(a[k], b[k]) for k in pre)
    with pytest.raises(MergeError, match="only part of q/k/v"):
        merge("cart", pre, fts, matrix_rule=("self_attn.q_proj.weight",))


def test_a_matrix_rule_that_matches_nothing_is_an_error_naming_the_rule_and_layouts(hf_models):
    _, pre, fts = hf_models
    canon = L.hf_to_canonical(pre)[0]
    with pytest.raises(MergeError, match=r"matrix rule \(key suffixes \['nothing.weight'\]\) matches no key.*open_clip"):
        merge("cart", canon, [L.hf_to_canonical(f)[0] for f in fts], matrix_rule=("nothing.weight",))
    odd = {"a.weight": torch.ones(3, 3)}
    with pytest.raises(MergeError, match="matches no key.*not a known CLIP layout"):
        merge("cart", odd, [{"a.weight": torch.ones(3, 3) * 2}, {"a.weight": torch.ones(3, 3) * 3}])


def test_layer_wise_rows_must_follow_the_canonical_layout(hf_models):
    _, pre, fts = hf_models
    with pytest.raises(MergeError, match="one row per tensor of open_clip's visual layout"):
        merge("layer_wise", pre, fts, coefficients=np.full((len(pre), 3), 0.3))


def test_unknown_layout_is_an_error_that_lists_the_known_ones():
    with pytest.raises(L.LayoutError, match="open_clip's visual tower.*transformers' CLIP vision tower"):
        L.detect_layout({"encoder.block.0.weight": torch.ones(1)})


def test_ties_trim_population_with_text_tower_zeros_matches_a_hand_computation():
    tv = {"a": torch.tensor([5.0, -4.0, 3.0, -2.0, 1.0]), "b": torch.tensor([[0.5, -0.25], [6.0, 0.1]])}
    mags = sorted([5, 4, 3, 2, 1, 0.5, 0.25, 6, 0.1], reverse=True)  # 9 entries
    # vision only: keep int(9 * 0.4) = 3 -> threshold is the 4th largest, 3.0
    assert T.topk_threshold(tv, 0.4) == mags[3] == 3.0
    # plus 6 zero entries (a text tower): int(15 * 0.4) = 6 kept -> the 7th largest of the real ones
    assert T.topk_threshold(tv, 0.4, extra_zeros=6) == mags[6] == 0.5
    # so many zeros that every real entry is kept
    assert T.topk_threshold(tv, 0.4, extra_zeros=100) == 0.0
    with pytest.raises(MergeError, match="extra_zeros"):
        T.topk_threshold(tv, 0.4, extra_zeros=-1)


def test_ties_with_whole_clip_population_keeps_more_vision_entries(hf_models):
    _, pre, fts = hf_models
    text = L.openclip_text_numel(49408, 77, 512, 512)
    assert text == 25_599_489
    assert L.openclip_text_numel(49408, 77, 768, 768) == 38_595_841
    canon = L.hf_to_canonical(pre)[0]
    d = sum(v.numel() for v in canon.values())
    small = merge("ties", pre, fts, extra_zeros=0)
    big = merge("ties", pre, fts, extra_zeros=d)  # the population doubles: top 20% of 2d keeps 40% of d
    n_small = sum(int((small[k] != pre[k]).sum()) for k in pre)
    n_big = sum(int((big[k] != pre[k]).sum()) for k in pre)
    assert n_big > n_small


def test_openclip_whole_model_state_dict_gives_the_visual_tower_and_the_text_count():
    vit = VisionTransformer(ViTConfig(image_size=32, patch_size=16, width=32, layers=2, heads=2, output_dim=16))
    sd = {f"model.visual.{k}": v for k, v in vit.state_dict().items()}
    sd.update({"model.token_embedding.weight": torch.zeros(100, 32), "model.positional_embedding": torch.zeros(7, 32),
               "model.ln_final.weight": torch.zeros(32), "model.ln_final.bias": torch.zeros(32),
               "model.text_projection": torch.zeros(32, 16), "model.logit_scale": torch.zeros(())})
    vis, extra = L.openclip_visual(sd)
    assert set(vis) == set(vit.state_dict()) and extra["text_numel"] == L.openclip_text_numel(100, 7, 32, 16)
