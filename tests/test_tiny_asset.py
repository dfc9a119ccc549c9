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


def test_committed_finetunes_match_their_record_and_the_current_cache_keys():
    """Stale assets are caught here: after a change to the generator or training code, regenerate them
    with `python -m mergebook.models.tiny export-finetuned` (it retrains what the new keys need)."""
    record = json.loads(tiny.FINETUNED_RECORD.read_text())
    keys = tiny.suite_keys(tiny.TinyConfig())
    assert set(record["files"]) == set(keys)
    for name, entry in record["files"].items():
        assert entry["key"] == keys[name], f"{name}: committed for another code/config; regenerate the assets"
        assert tiny_train.sha256_file(tiny.FINETUNED_DIR / entry["file"]) == entry["sha256"]
    assert record["command"] and record["seeds"] == {"data_seed": 0, "ft_seed": 0}


def test_committed_weights_are_used_only_for_their_key_and_intact(tmp_path, monkeypatch, capsys):
    record = json.loads(tiny.FINETUNED_RECORD.read_text())
    name, entry = "finetuned-digits", record["files"]["finetuned-digits"]
    assert tiny.committed_weights(name, entry["key"]) is not None
    assert tiny.committed_weights(name, "another-key") is None
    monkeypatch.setenv("MERGEBOOK_RETRAIN", "1")
    assert tiny.committed_weights(name, entry["key"]) is None
    monkeypatch.delenv("MERGEBOOK_RETRAIN")
    bad = tmp_path / "record.json"
    shutil.copy(tiny.FINETUNED_DIR / entry["file"], tmp_path / entry["file"])
    raw = bytearray((tmp_path / entry["file"]).read_bytes())
    raw[-5] ^= 0x11
    (tmp_path / entry["file"]).write_bytes(bytes(raw))
    bad.write_text(json.dumps({"files": {name: entry}}))
    assert tiny.committed_weights(name, entry["key"], bad) is None
    assert "does not match its recorded sha256" in capsys.readouterr().out


def test_finetuning_smoke_run_trains_every_task_and_the_mtl_model(tmp_path):
    """CI trains the miniature's fine-tunes only as this smoke run; the book uses the committed ones."""
    from mergebook import artifacts

    cfg = tiny.TinyConfig(tasks=("digits", "shapes"), n_train=64, n_test=16, n_val=8, protos_per_class=1,
                          ft_steps=3, mtl_steps=2, ft_warmup=1)
    suite = tiny.load_suite(cfg, progress=False, with_mtl=True, cache=artifacts.Cache("tiny", root=tmp_path))
    for sd in [*suite.finetuned.values(), suite.meta["mtl"]]:
        assert set(sd) == set(suite.pretrained)
        assert any(not torch.equal(sd[k], suite.pretrained[k]) for k in sd)
