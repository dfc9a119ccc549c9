"""The committed pretrained miniature encoder: integrity, layout, and the script that made it."""

import json
import shutil

import pytest
import torch
from safetensors import safe_open

from mergebook.models import tiny, tiny_train
from mergebook.models.vit import VisionTransformer


def test_shipped_encoder_matches_its_recorded_hash_and_loads():
    sd, meta = tiny.load_pretrained()
    record = json.loads(tiny_train.ASSET_RECORD.read_text())
    assert record["sha256"] == tiny_train.sha256_file(tiny_train.ASSET)
    model = VisionTransformer(tiny.encoder_config(meta))
    model.load_state_dict(sd)  # strict: same keys and shapes as the architecture
    assert float(meta["logit_scale"]) > 1.0
    assert tiny_train.ASSET.stat().st_size < 8 * 2**20, "the asset should stay a few MB"


def test_encoder_uses_clip_visual_tower_names():
    sd, _ = tiny.load_pretrained()
    for key in ["conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "proj",
                "transformer.resblocks.0.attn.in_proj_weight", "transformer.resblocks.0.attn.out_proj.weight",
                "transformer.resblocks.0.mlp.c_fc.weight", "transformer.resblocks.0.mlp.c_proj.weight",
                "transformer.resblocks.0.ln_1.weight", "transformer.resblocks.0.ln_2.bias", "ln_post.bias"]:
        assert key in sd, key
    w = sd["transformer.resblocks.0.attn.in_proj_weight"]
    assert w.shape[0] == 3 * w.shape[1]  # fused QKV, one matrix as in open_clip


def test_a_corrupted_asset_is_refused_with_the_fix(tmp_path, monkeypatch):
    bad = tmp_path / tiny_train.ASSET.name
    shutil.copy(tiny_train.ASSET, bad)
    raw = bytearray(bad.read_bytes())
    raw[-3] ^= 0x55
    bad.write_bytes(bytes(raw))
    monkeypatch.setattr(tiny, "ASSET", bad)
    with pytest.raises(tiny.AssetError, match="git checkout -- lib/mergebook/assets"):
        tiny.load_pretrained()


def test_pretraining_script_smoke_run(tmp_path):
    out = tmp_path / "smoke.safetensors"
    tiny_train.main(["pretrain", "--smoke", "--out", str(out)])
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    sd, _ = tiny.load_pretrained()
    assert keys == set(sd)
    assert meta["steps_done"] == "20" and "command" in meta and "device" in meta


def test_smoke_run_refuses_to_overwrite_the_shipped_asset():
    with pytest.raises(SystemExit, match="must not overwrite"):
        tiny_train.main(["pretrain", "--smoke"])


def test_random_shift_moves_content_without_changing_values():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    y = tiny_train.random_shift(x, 0, gen)
    assert torch.equal(x, y)
    y = tiny_train.random_shift(x, 1, gen)
    assert y.shape == x.shape
    # every output pixel is a pixel of the reflect-padded input, so values stay in range
    assert y.min() >= x.min() and y.max() <= x.max()


def test_cosine_schedule_warms_up_then_decays_to_zero():
    assert tiny_train.cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert tiny_train.cosine_lr(9, 100, 10) == pytest.approx(1.0)
    assert tiny_train.cosine_lr(10, 100, 10) == pytest.approx(1.0)
    assert tiny_train.cosine_lr(55, 100, 10) == pytest.approx(0.5)
    assert tiny_train.cosine_lr(100, 100, 10) == pytest.approx(0.0)
