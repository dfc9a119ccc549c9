"""The clip_hf backend, end to end and offline, on a pico CLIP hub built in a temporary directory."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

pytest.importorskip("transformers")
pytest.importorskip("datasets")
pytest.importorskip("tokenizers")

from mergebook import artifacts  # noqa: E402
from mergebook.data import hub, templates  # noqa: E402
from mergebook.models import clip_hf  # noqa: E402
from mergebook.profiles import Profile  # noqa: E402
from tests.fixtures.tiny_clip import FORMATS, LOGIT_SCALE, PRETRAINED_ID, TASKS, build_tiny_hub  # noqa: E402

N_LAYERS = 2


def _profile(tasks=TASKS, name="tiny-clip-test") -> Profile:
    return Profile(name=name, backend="clip_hf", tasks=list(tasks), description="pico CLIP",
                   model_id=PRETRAINED_ID)


def _load(tiny_hub, cache_root, **kw):
    return clip_hf.load_suite(_profile(kw.pop("tasks", TASKS)), progress=False, model_source=tiny_hub.model_source,
                              dataset_loader=tiny_hub.dataset_loader,
                              cache=artifacts.Cache("tiny-clip-test", root=cache_root), **kw)


@pytest.fixture(scope="module")
def tiny_hub(tmp_path_factory):
    return build_tiny_hub(tmp_path_factory.mktemp("hub"))


@pytest.fixture(scope="module")
def suite(tiny_hub, tmp_path_factory):
    return _load(tiny_hub, tmp_path_factory.mktemp("cache"))


def _vision_config(suite):
    from transformers import CLIPConfig

    import copy

    cfg = CLIPConfig.from_pretrained(suite.meta.get("pretrained_dir"))
    v = copy.deepcopy(cfg.vision_config)
    v.projection_dim = cfg.projection_dim
    return v


def _images(n=5, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --- the tables ---------------------------------------------------------------------------------


def test_finetuned_ids_follow_fusionbench_for_every_architecture_and_task():
    keys = {"SUN397": "sun397", "Cars": "stanford-cars", "RESISC45": "resisc45", "EuroSAT": "eurosat",
            "SVHN": "svhn", "GTSRB": "gtsrb", "MNIST": "mnist", "DTD": "dtd"}
    for arch in ("clip-vit-base-patch32", "clip-vit-base-patch16", "clip-vit-large-patch14"):
        for task, key in keys.items():
            assert clip_hf.finetuned_id(f"openai/{arch}", task) == f"tanganke/{arch}_{key}"
    assert hub.hub_task("stanford_cars").name == "Cars"  # FusionBench's spelling works too
    svhn = hub.hub_task("SVHN")
    assert (svhn.dataset, svhn.config, svhn.split) == ("ufldl-stanford/svhn", "cropped_digits", "test")
    assert hub.hub_task("MNIST").dataset == "ylecun/mnist"


def test_templates_and_class_counts_match_task_vectors():
    n_templates = {"Cars": 8, "DTD": 8, "EuroSAT": 3, "GTSRB": 3, "MNIST": 1, "RESISC45": 18, "SUN397": 2,
                   "SVHN": 1}
    n_classes = {"Cars": 196, "DTD": 47, "EuroSAT": 10, "GTSRB": 43, "MNIST": 10, "RESISC45": 45, "SUN397": 397,
                 "SVHN": 10}
    assert {t: len(v) for t, v in templates.TEMPLATES.items()} == n_templates
    assert {t: len(v) for t, v in templates.CLASSNAMES.items()} == n_classes
    assert set(templates.TEMPLATES) == set(hub.HUB_TASKS)
    for task, names in templates.CLASSNAMES.items():
        assert len(set(names)) == len(names), task
        assert all(t.count("{}") == 1 for t in templates.TEMPLATES[task]), task
    assert templates.prompts("MNIST", "7") == ['a photo of the number: "7".']


def test_unknown_task_is_an_error_listing_the_known_ones_before_any_download(tiny_hub, tmp_path):
    before = sum(tiny_hub.calls.values())
    with pytest.raises(hub.UnknownTaskError, match="SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD"):
        _load(tiny_hub, tmp_path, tasks=["MNIST", "ImageNet"])
    assert sum(tiny_hub.calls.values()) == before


# --- state dicts and the architecture -----------------------------------------------------------


def test_suites_hold_the_canonical_open_clip_layout_with_only_floating_tensors(suite):
    model_sd = suite.model.state_dict()
    assert list(suite.pretrained) == [k for k, v in model_sd.items() if v.is_floating_point()]
    assert suite.pretrained["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 32, 32)  # q, k, v fused
    assert suite.pretrained["proj"].shape == (32, 16)  # visual_projection.weight transposed
    assert len(suite.pretrained) == 8 + 12 * N_LAYERS  # open_clip's count: 152 for ViT-B/32
    assert not any("position_ids" in k or "pixel_" in k for k in suite.pretrained)
    assert suite.meta["layout"] == "openclip" and suite.meta["layout_info"].layout == "hf_clip"
    for sd in [suite.pretrained, *suite.finetuned.values()]:
        assert list(sd) == list(suite.pretrained)
        assert all(v.dtype == torch.float32 and v.shape == suite.pretrained[k].shape for k, v in sd.items())


def test_val_split_is_held_out_from_train_as_task_vectors_does(suite, tiny_hub):
    n_train = len(tiny_hub.datasets["ylecun/mnist"]["train"])
    held = clip_hf.heldout_val_indices(n_train)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(0)).tolist()
    assert held == perm[n_train - min(int(0.1 * n_train), 5000):] and len(held) == 3
    assert clip_hf.heldout_val_indices(100_000)[:3] == torch.randperm(
        100_000, generator=torch.Generator().manual_seed(0)).tolist()[95_000:95_003]  # capped at 5000
    for t in TASKS:
        labels = tiny_hub.datasets[hub.hub_task(t).dataset]["train"]["label"]
        assert suite.val[t].labels.tolist() == [labels[i] for i in sorted(held)] or \
            suite.val[t].labels.tolist() == [labels[i] for i in held]


def test_integer_position_ids_stay_out_even_when_a_checkpoint_stores_them(suite):
    from mergebook import layout

    shapes = clip_hf.hf_vision_shapes(_vision_config(suite))
    raw = {k: v.clone() for k, v in layout.canonical_to_hf(suite.pretrained).items()}
    raw["vision_model.embeddings.position_ids"] = torch.arange(5).unsqueeze(0)  # as old transformers saved
    raw["text_model.embeddings.position_ids"] = torch.arange(7).unsqueeze(0)
    sd = clip_hf.vision_state_dict(raw, shapes, "old checkpoint")
    assert set(sd) == set(shapes) and "vision_model.embeddings.position_ids" not in sd


def test_finetuned_towers_differ_from_pretrained_and_projectionless_ones_reuse_its_projection(suite):
    for task in TASKS:
        ft, pre = suite.finetuned[task], suite.pretrained
        fc1 = "transformer.resblocks.1.mlp.c_fc.weight"
        assert not torch.equal(ft[fc1], pre[fc1])
        proj_same = torch.equal(ft["proj"], pre["proj"])
        assert proj_same == (FORMATS[task] != "vision_with_projection"), task
    reused = sorted(t for t in TASKS if FORMATS[t] != "vision_with_projection")
    assert sorted(suite.meta["projection_from_pretrained"]) == reused


def test_functional_call_reproduces_the_hf_models_own_image_embeds(suite, tiny_hub):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    x = _images()
    pre = CLIPVisionModelWithProjection.from_pretrained(tiny_hub.models[PRETRAINED_ID]).eval()
    with torch.no_grad():
        ours = functional_call(suite.model, suite.pretrained, (x,))
        torch.testing.assert_close(ours, pre(pixel_values=x).image_embeds)
        for task in TASKS:
            d = tiny_hub.models[clip_hf.finetuned_id(PRETRAINED_ID, task)]
            if FORMATS[task] == "vision_with_projection":
                ref = CLIPVisionModelWithProjection.from_pretrained(d).eval()(pixel_values=x).image_embeds
            else:  # FusionBench's towers: the pretrained projection on the fine-tuned pooled output
                pooled = CLIPVisionModel.from_pretrained(d).eval()(pixel_values=x).pooler_output
                ref = pre.visual_projection(pooled)
            torch.testing.assert_close(functional_call(suite.model, suite.finetuned[task], (x,)), ref)


def test_uint8_images_are_normalised_inside_the_model_to_the_same_embeddings(suite):
    u8 = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    prep = hub.Preprocess(**suite.meta["preprocess"])
    with torch.no_grad():
        torch.testing.assert_close(suite.model(u8), suite.model(hub.normalize(u8, prep)))


def test_cart_matrices_are_the_four_per_block_weights_of_the_canonical_layout(suite):
    from mergebook.methods.cart import default_matrix_rule

    matrices = [k for k, v in suite.pretrained.items() if default_matrix_rule(k, v)]
    assert len(matrices) == 4 * N_LAYERS  # in_proj (q, k, v as one), out_proj, c_fc, c_proj
    layer_2d = {k for k, v in suite.pretrained.items() if ".resblocks." in k and v.ndim == 2}
    assert layer_2d == set(matrices)


# --- heads --------------------------------------------------------------------------------------


def test_heads_are_unit_rows_times_the_logit_scale(suite):
    for task in TASKS:
        head = suite.heads[task]
        assert head.shape == (len(templates.CLASSNAMES[task]), 16)
        torch.testing.assert_close(head.norm(dim=-1), torch.full((head.shape[0],), math.exp(LOGIT_SCALE)))
        assert suite.class_names[task] == list(templates.CLASSNAMES[task])


def test_heads_match_task_vectors_construction_with_the_hf_text_model(suite, tiny_hub):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    d = tiny_hub.models[PRETRAINED_ID]
    text = CLIPTextModelWithProjection.from_pretrained(d).eval()
    tok = AutoTokenizer.from_pretrained(d)
    for task, n in (("EuroSAT", 10), ("GTSRB", 6)):  # several templates each; a few classes suffice
        rows = []
        with torch.no_grad():
            for c in templates.CLASSNAMES[task][:n]:  # one class at a time, as task_vectors' heads.py does
                # byte-level tokens without merges: long GTSRB prompts need truncating to 64 positions
                enc = tok(templates.prompts(task, c), padding=True, truncation=True, max_length=64,
                          return_tensors="pt")
                e = F.normalize(text(**enc).text_embeds, dim=-1).mean(0)
                rows.append(e / e.norm())
        expected = torch.stack(rows) * math.exp(LOGIT_SCALE)
        torch.testing.assert_close(suite.heads[task][:n], expected, atol=1e-5, rtol=1e-5)


# --- test data ----------------------------------------------------------------------------------


def test_test_images_are_preprocessed_like_the_clip_image_processor(suite, tiny_hub):
    try:  # the PIL backend: transformers >= 5 names it, 4.x's CLIPImageProcessor is it
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:
        from transformers import CLIPImageProcessor as Processor
    config = json.loads((tiny_hub.models[PRETRAINED_ID] / "preprocessor_config.json").read_text())
    keep = ("size", "crop_size", "resample", "image_mean", "image_std", "do_center_crop", "do_resize",
            "do_normalize")
    processor = Processor(**{k: config[k] for k in keep})
    ds = tiny_hub.datasets["ylecun/mnist"]["test"]
    ref = torch.cat([torch.as_tensor(processor(images=[row["image"]], return_tensors="np")["pixel_values"])
                     for row in ds])
    torch.testing.assert_close(suite.test["MNIST"].images, ref, atol=1e-5, rtol=1e-5)
    assert suite.test["MNIST"].labels.tolist() == list(ds["label"])
    assert suite.test["MNIST"].labels.dtype == torch.int64


def test_processor_configs_in_the_old_and_new_formats_are_read(tmp_path):
    old = {"size": 224, "crop_size": 224, "resample": 3, "image_mean": [0.5] * 3, "image_std": [0.25] * 3}
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert hub.Preprocess.from_processor_config(tmp_path / "old.json") == hub.Preprocess(
        resize=224, crop=224, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    new = {"size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    (tmp_path / "new.json").write_text(json.dumps(new))
    assert hub.Preprocess.from_processor_config(tmp_path / "new.json") == hub.Preprocess(resize=336, crop=336)
    assert hub.Preprocess.from_processor_config(tmp_path / "absent.json", image_size=32) == hub.Preprocess(32, 32)


def test_n_test_draws_the_same_seeded_subset_every_time():
    a, b = hub.subset_indices(100, 10, seed=0), hub.subset_indices(100, 10, seed=0)
    assert a == b == sorted(set(a)) and len(a) == 10 and max(a) < 100
    assert hub.subset_indices(100, 10, seed=1) != a
    assert hub.subset_indices(5, 10) == hub.subset_indices(5, None) == [0, 1, 2, 3, 4]


def test_second_load_reuses_cached_heads_and_test_sets(tiny_hub, tmp_path, monkeypatch):
    built = []
    real_tower = clip_hf.text_tower
    monkeypatch.setattr(clip_hf, "text_tower", lambda *a, **k: built.append(1) or real_tower(*a, **k))
    datasets_asked = lambda: sum(tiny_hub.calls[hub.hub_task(t).dataset] for t in TASKS)  # noqa: E731

    n0 = datasets_asked()
    first = _load(tiny_hub, tmp_path, n_test=6)
    assert len(built) == 1 and datasets_asked() - n0 == 2 * len(TASKS)  # test and train (for val) splits
    second = _load(tiny_hub, tmp_path, n_test=6)
    assert len(built) == 1 and datasets_asked() - n0 == 2 * len(TASKS)  # nothing rebuilt
    for t in TASKS:
        assert torch.equal(first.heads[t], second.heads[t])
        assert torch.equal(first.test[t].images, second.test[t].images) and len(second.test[t]) == 6

    third = _load(tiny_hub, tmp_path, n_test=4)  # another test subset: test images rebuilt, heads and val reused
    assert len(built) == 1 and datasets_asked() - n0 == 3 * len(TASKS) and len(third.test["MNIST"]) == 4


def test_uint8_option_keeps_crops_and_evaluates_like_float(tiny_hub, tmp_path, suite):
    from mergebook.evaluate import evaluate

    small = _load(tiny_hub, tmp_path, uint8_images=True)
    assert small.test["MNIST"].images.dtype == torch.uint8
    for sd in (suite.pretrained, suite.finetuned["GTSRB"]):
        assert evaluate(small, sd) == evaluate(suite, sd)


# --- safety and errors --------------------------------------------------------------------------


class NotATensor:
    """Anything but tensors must never be unpickled from a checkpoint."""


def test_pickled_checkpoints_load_weights_only(tmp_path):
    torch.save({"vision_model.x": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    assert torch.equal(clip_hf.read_checkpoint(tmp_path)["vision_model.x"], torch.ones(2))
    torch.save({"vision_model.x": torch.ones(2), "payload": NotATensor()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(clip_hf.CheckpointError, match="refusing to unpickle"):
        clip_hf.read_checkpoint(tmp_path)


def test_a_checkpoint_of_another_architecture_is_rejected(tiny_hub, tmp_path, monkeypatch):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    odd = tmp_path / "odd"
    wider = CLIPVisionConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             image_size=32, patch_size=16)
    CLIPVisionModel(wider).save_pretrained(odd, safe_serialization=True)
    monkeypatch.setitem(tiny_hub.models, "someone/odd", odd)
    with pytest.raises(clip_hf.CheckpointError, match="someone/odd does not fit the pretrained image tower"):
        _load(tiny_hub, tmp_path / "cache", tasks=["MNIST"], finetuned_ids={"MNIST": "someone/odd"})


def test_no_hub_access_raises_one_message_pointing_to_tiny(tmp_path):
    def offline(repo):
        return clip_hf.hub_snapshot(repo, cache_dir=tmp_path / "hf", local_files_only=True)

    with pytest.raises(hub.HubUnavailableError) as info:
        clip_hf.load_suite(_profile(), progress=False, model_source=offline,
                           cache=artifacts.Cache("x", root=tmp_path / "cache"))
    msg = str(info.value)
    assert PRETRAINED_ID in msg and "need internet" in msg and "GPU" in msg and 'profile="tiny"' in msg


def test_paper_profiles_offline_fail_with_that_message_through_the_profile_dispatch(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    from mergebook.profiles import load_suite

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no request leaves, whatever the network
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))  # and no cached copy is found
    monkeypatch.setenv("MERGEBOOK_CACHE", str(tmp_path / "cache"))
    with pytest.raises(hub.HubUnavailableError, match='openai/clip-vit-base-patch32.*profile="tiny"'):
        load_suite("vit-b-32", device="cpu", progress=False)


def test_dataset_download_failures_raise_the_same_message(monkeypatch):
    import datasets

    def unreachable(*a, **k):
        raise ConnectionError("Couldn't reach 'tanganke/dtd' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(hub.HubUnavailableError, match='tanganke/dtd.*profile="tiny"'):
        hub.load_split(hub.hub_task("DTD"))


def test_cart_plus_plus_at_step_0_equals_cart_on_the_hf_checkpoints(suite):
    """CART++ starts from CART's own vectors: Q/K/V stacked as one matrix, also for HF checkpoints."""
    from mergebook import layout
    from mergebook.methods import adamerging as am
    from mergebook.methods import merge

    space = am.cart_space(suite, ratio=0.25, device="cpu")
    start = space.merge(torch.full((space.num_tasks,), 2.0))
    info = suite.meta["layout_info"]
    hf_pre = layout.from_canonical(suite.pretrained, info)
    hf_fts = [layout.from_canonical(ft, info) for ft in suite.finetuned_list()]
    cart_hf = merge("cart", hf_pre, hf_fts, scaling_coef=2.0, ratio=0.25)  # merged from HF-named files
    back = layout.from_canonical(start, info)
    for k in hf_pre:
        torch.testing.assert_close(back[k], cart_hf[k], atol=1e-5, rtol=1e-5)
    assert len(space.keys) == 4 * N_LAYERS  # one in_proj per block, not separate q, k, v
