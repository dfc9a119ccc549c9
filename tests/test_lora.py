"""LoRA task vectors, the Flan-T5 backend on a local pico snapshot, label-word scoring, STS-B's metric."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may touch the network

from mergebook import lora  # noqa: E402
from mergebook.methods import merge  # noqa: E402
from mergebook.models import flan_t5_lora as F  # noqa: E402

TASKS = ("cola", "mnli", "stsb")


@pytest.fixture(scope="module")
def pico(tmp_path_factory):
    root = tmp_path_factory.mktemp("pico_t5")
    ms, dl = F.build_pico_t5(root, tasks=TASKS, n_rows=10)
    return root, ms, dl


@pytest.fixture(scope="module")
def suite(pico):
    _, ms, dl = pico
    return F.load_suite(tasks=TASKS, model_source=ms, dataset_loader=dl, n_val=2, max_length=40, progress=False)


def _adapter(seed: int, keys=("a.weight", "b.weight"), r: int = 3, shape=(5, 4), alpha: float = 6.0) -> lora.LoraAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for k in keys:
        m = k.removesuffix(".weight")
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(r, shape[1], generator=g)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(shape[0], r, generator=g)
    return lora.adapter_from_state_dict({"peft_type": "LORA", "r": r, "lora_alpha": alpha}, tensors, f"ad{seed}")


def test_densified_delta_is_scaled_b_times_a():
    ad = _adapter(0)
    a, b = ad.factors["a.weight"]
    torch.testing.assert_close(lora.densify(ad)["a.weight"], (6.0 / 3) * b @ a)


def test_factored_merge_equals_dense_task_arithmetic_merge():
    base = {"a.weight": torch.randn(5, 4), "b.weight": torch.randn(5, 4)}
    ads = [_adapter(s) for s in range(3)]
    fts = [lora.apply_adapter(base, ad) for ad in ads]
    dense = merge("task_arithmetic", base, fts, scaling_coef=0.3)
    fact = lora.factored_merge(ads, [0.3, 0.3, 0.3])
    for k in base:
        a_cat, b_cat = fact[k]
        assert a_cat.shape[0] == 9  # rank Σ r_k: the merge is itself a LoRA
        torch.testing.assert_close(base[k] + b_cat @ a_cat, dense[k], rtol=1e-5, atol=1e-5)
    wa = merge("weight_averaging", base, fts)
    fact = lora.factored_merge(ads, [1 / 3] * 3)
    torch.testing.assert_close(base["b.weight"] + fact["b.weight"][1] @ fact["b.weight"][0], wa["b.weight"],
                               rtol=1e-5, atol=1e-5)


def test_layerwise_factored_merge_uses_each_keys_coefficients():
    base = {"a.weight": torch.zeros(5, 4), "b.weight": torch.zeros(5, 4)}
    ads = [_adapter(s) for s in range(2)]
    fact = lora.factored_merge(ads, {"a.weight": [1.0, 0.0], "b.weight": [0.0, 2.0]})
    torch.testing.assert_close(fact["a.weight"][1] @ fact["a.weight"][0], lora.densify(ads[0])["a.weight"])
    torch.testing.assert_close(fact["b.weight"][1] @ fact["b.weight"][0], 2 * lora.densify(ads[1])["b.weight"])


def test_mismatched_rank_is_a_clear_error():
    ad = _adapter(0)
    tensors = {f"base_model.model.a.lora_{x}.weight": t for x, t in zip("AB", ad.factors["a.weight"])}
    with pytest.raises(lora.LoraError, match="mismatched r"):
        lora.adapter_from_state_dict({"peft_type": "LORA", "r": 8, "lora_alpha": 16}, tensors)


def test_adapter_for_another_base_is_a_clear_error(suite, pico):
    root, ms, _ = pico
    ad = lora.read_adapter(ms(F.adapter_id(F.PICO_BASE, "cola")))
    with pytest.raises(lora.LoraError, match="trained on 'google/flan-t5-base', not on 'google/flan-t5-large'"):
        lora.check_adapter(ad, suite.model.t5.state_dict(), "google/flan-t5-large")
    wrong_size = {k: torch.zeros(v.shape[0] + 1, v.shape[1]) for k, v in suite.pretrained.items()}
    with pytest.raises(lora.LoraError, match="another model size"):
        lora.check_adapter(ad, wrong_size)
    with pytest.raises(lora.LoraError, match="another architecture"):
        lora.check_adapter(ad, {"x.weight": torch.zeros(2, 2)})


def test_pickled_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(lora.LoraError, match="pickle"):
        lora.read_adapter(tmp_path)


def test_peft_adapters_load_from_local_snapshot_and_match_peft(suite, pico):
    from peft import PeftModel
    from transformers import T5ForConditionalGeneration

    _, ms, _ = pico
    assert set(suite.finetuned) == set(TASKS)
    assert all(k.endswith((".q.weight", ".v.weight")) for k in suite.pretrained)
    # Our densified θ_pre + ΔW equals peft's own merge_and_unload of the same adapter.
    base = T5ForConditionalGeneration.from_pretrained(str(ms(F.PICO_BASE)))
    merged = PeftModel.from_pretrained(base, str(ms(F.adapter_id(F.PICO_BASE, "mnli")))).merge_and_unload()
    sd = merged.state_dict()
    for k, v in suite.finetuned["mnli"].items():
        torch.testing.assert_close(v, sd[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, suite.pretrained[k]) for k, v in suite.finetuned["mnli"].items())


def test_label_word_logits_match_a_hand_computation(suite):
    t5, tok = suite.model.t5, suite.meta["tokenizer"]
    x = suite.test["mnli"].images[:2]
    feats = suite.model(x)
    assert feats.shape == (2, 26)  # slots for STS-B's 26 label words; MNLI uses 3
    ids, mask = x[:, 0], x[:, 1]
    start = torch.zeros((2, 1), dtype=torch.long)
    with torch.no_grad():
        logits = t5(input_ids=ids, attention_mask=mask, decoder_input_ids=start).logits[:, 0]
    want = [tok(w, add_special_tokens=False)["input_ids"][0] for w in F.LABEL_WORDS["mnli"]]
    torch.testing.assert_close(feats[:, :3], logits[:, want])
    assert (feats[:, 3:] == F.PAD_LOGIT).all()


def test_label_word_scores_are_sequence_log_likelihoods(suite):
    t5, tok = suite.model.t5, suite.meta["tokenizer"]
    text = F.prompt("cola", suite.meta["rows"]["cola"][0])
    scores = F.label_word_scores(t5, tok, [text], F.LABEL_WORDS["cola"])
    enc = tok([text], return_tensors="pt")
    for j, w in enumerate(F.LABEL_WORDS["cola"]):
        lab = tok([w], return_tensors="pt")["input_ids"]  # word tokens then </s>
        with torch.no_grad():
            logp = t5(**enc, labels=lab).logits.log_softmax(-1)[0]
        hand = sum(float(logp[i, lab[0, i]]) for i in range(lab.shape[1]))
        assert scores[0, j].item() == pytest.approx(hand, abs=1e-4)


def test_stsb_metric_is_spearman_rho():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    gold = rng.uniform(0, 5, 40).round(1)
    pred = (gold + rng.normal(0, 1.5, 40)).round(1)
    assert F.spearman_rho(pred, gold) == pytest.approx(spearmanr(pred, gold)[0], abs=1e-12)
    rows = [{"label": g} for g in gold]
    texts = [f"{p:.1f}" for p in pred[:-1]] + ["five"]  # an unparseable generation counts as 0.0
    want = spearmanr(np.r_[pred[:-1], 0.0], gold)[0]
    assert F.score_task("stsb", texts, rows) == pytest.approx(100 * want)
    assert F.spearman_rho([1, 1, 1], [1, 2, 3]) == 0.0


def test_exact_match_accuracy_counts_only_exact_label_words():
    rows = [{"label": 1}, {"label": 0}, {"label": 1}]
    assert F.score_task("cola", ["acceptable", "unacceptable", "Acceptable"], rows) == pytest.approx(200 / 3)


def test_prompts_follow_appendix_d1():
    row = {"sentence": "hide new secretions from the parental units", "label": 0}
    assert F.prompt("sst2", row) == ("Given the sentence 'hide new secretions from the parental units', "
                                     "determine the sentiment. Is it positive or negative?")
    assert F.target("sst2", row) == "negative"
    assert F.target("stsb", {"label": 3.8}) == "3.8"
    assert F.adapter_id("google/flan-t5-large", "qqp") == "tanganke/flan-t5-large_glue-qqp_lora-16"


def test_missing_downloads_fail_at_start_listing_everything(pico):
    _, _, dl = pico

    def nothing(repo_id):
        raise FileNotFoundError(repo_id)

    with pytest.raises(F.MissingDownloads) as e:
        F.load_suite(tasks=TASKS, model_source=nothing, dataset_loader=dl)
    msg = str(e.value)
    assert "google/flan-t5-base" in msg and all(F.adapter_id(F.PICO_BASE, t) in msg for t in TASKS)
    assert "HF_HUB_OFFLINE" in msg


def test_adaptation_engine_runs_on_the_t5_suite(suite):
    from mergebook.methods.adamerging import adamerging

    r = adamerging(suite, "layer", steps=2, batch_size=2, batches_per_step=1, eval_every=2, progress=False,
                   device="cpu")
    assert r.coefficients.shape == (len(suite.pretrained), len(TASKS))
    assert not torch.equal(r.coefficients, torch.full_like(r.coefficients, 0.3))  # λ moved
    res = F.evaluate_glue(suite, r.state_dict(), scoring="label_words")
    assert set(res) == {*TASKS, "avg"}


def test_text_tasks_are_deterministic_and_splits_disjoint():
    from mergebook.data import text_tasks as T

    a, b = T.build_task("grammar"), T.build_task("grammar")
    assert a.texts == b.texts and a.labels == b.labels
    sp = T.split_task(a, {"test": 40, "val": 20, "train": 60}, seed=0)
    sets = [set(t) for t, _ in sp.values()]
    assert sum(map(len, sets)) == len(set().union(*sets)) == 120
    assert np.bincount(sp["test"][1]).tolist() == [20, 20]


def test_tiny_lm_top_encoder_on_cached_states_equals_the_whole_model():
    from mergebook.models import tiny_lm as M

    tok, bert = M.load_encoder()
    ids, m = M.tokenize(tok, ["a shade of blue", "Europe/Paris is a time zone name in Europe"], 16)
    x = M.lower_states(bert, ids, m, start=4)
    with torch.no_grad():
        torch.testing.assert_close(M.TopEncoder(bert, 4)(x), M.full_forward(bert, ids, m), rtol=1e-4, atol=1e-5)


def test_the_book_profile_maps_to_its_language_counterpart():
    from mergebook import language
    from mergebook.profiles import UnknownProfileError

    assert language.text_profile("tiny") == language.text_profile("tiny-lm") == "tiny-lm"
    assert language.text_profile("vit-b-32") == "flan-t5-base-lora"
    assert language.text_profile("vit-l-14") == "flan-t5-large-lora"
    with pytest.raises(ValueError, match="no language counterpart"):
        language.text_profile("random-b32")
    with pytest.raises(UnknownProfileError):
        language.text_profile("nope")
