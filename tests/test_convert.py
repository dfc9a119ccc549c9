"""`mergebook convert` (the only place pickle is read) and `mergebook merge` on HF-layout files."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch import nn

from mergebook import layout as L
from mergebook.cli import main
from mergebook.models.vit import ViTConfig, VisionTransformer
from mergebook.statedict import load_state_dict, save_state_dict

CFG = ViTConfig(image_size=32, patch_size=16, width=32, layers=2, heads=2, output_dim=16)


def _task_vectors_checkpoint(path, seed=0):
    """A pickled whole-model checkpoint in task_vectors' shape, from modules that then vanish."""
    mod = types.ModuleType("src.modeling")
    pkg = types.ModuleType("src")

    class CLIP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.visual = VisionTransformer(CFG)
            self.token_embedding = nn.Embedding(100, 32)
            self.positional_embedding = nn.Parameter(torch.zeros(7, 32))
            self.ln_final = nn.LayerNorm(32)
            self.text_projection = nn.Parameter(torch.zeros(32, 16))
            self.logit_scale = nn.Parameter(torch.zeros(()))

    class ImageEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = CLIP()
            self.val_preprocess = {"size": 224}  # not a module, as torchvision's Compose

    for cls in (CLIP, ImageEncoder):
        cls.__module__, cls.__qualname__ = "src.modeling", cls.__name__
        setattr(mod, cls.__name__, cls)
    sys.modules["src"], sys.modules["src.modeling"] = pkg, mod
    try:
        enc = ImageEncoder()
        torch.save(enc, path)
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]  # the authors' code is not installed here
    return enc


def test_convert_refuses_without_trust_pickle(tmp_path, capsys):
    _task_vectors_checkpoint(tmp_path / "ft.pt")
    assert main(["convert", str(tmp_path / "ft.pt"), str(tmp_path / "ft.safetensors")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err and not (tmp_path / "ft.safetensors").exists()


def test_convert_writes_the_visual_tower_in_canonical_layout_without_the_authors_code(tmp_path):
    enc = _task_vectors_checkpoint(tmp_path / "ft.pt")
    assert main(["convert", str(tmp_path / "ft.pt"), str(tmp_path / "ft.safetensors"), "--trust-pickle"]) == 0
    sd = load_state_dict(tmp_path / "ft.safetensors")
    ref = enc.model.visual.state_dict()
    assert set(sd) == set(ref) and all(torch.equal(sd[k], ref[k]) for k in ref)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ft.safetensors"), "pt") as f:
        assert int(f.metadata()["text_numel"]) == L.openclip_text_numel(100, 7, 32, 16)


def test_merge_cli_detects_hf_layout_and_writes_it_back(tmp_path, capsys):
    pytest.importorskip("transformers")
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=16, projection_dim=16)
    pre = {k: v for k, v in CLIPVisionModelWithProjection(cfg).state_dict().items() if v.is_floating_point()}
    fts = [{k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in pre.items()} for i in range(2)]
    save_state_dict(pre, tmp_path / "pre.safetensors")
    # the second fine-tuned model arrives in open_clip's layout: converted to the pretrained one's
    save_state_dict(fts[0], tmp_path / "a.safetensors")
    save_state_dict(L.hf_to_canonical(fts[1])[0], tmp_path / "b.safetensors")
    rc = main(["merge", "--method", "cart", "--pretrained", str(tmp_path / "pre.safetensors"), "--finetuned",
               str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--out", str(tmp_path / "m.safetensors"),
               "--param", "ratio=0.25"])
    out = capsys.readouterr().out
    assert rc == 0 and "layout: hf_clip" in out and "openclip converted to hf_clip" in out
    merged = load_state_dict(tmp_path / "m.safetensors")
    from mergebook.methods import merge

    expected = L.from_canonical(merge("cart", L.hf_to_canonical(pre)[0], [L.hf_to_canonical(f)[0] for f in fts],
                                      ratio=0.25), L.hf_to_canonical(pre)[1])
    assert set(merged) == set(pre)
    for k in pre:
        torch.testing.assert_close(merged[k], expected[k])
