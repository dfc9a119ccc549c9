"""The experiment layer's adaptive-run, entropy/loss, layer/block and reported-row helpers (02/03)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mergebook import experiment as ex
from mergebook.methods.concrete import concrete_task_arithmetic, remerge
from tests.test_adaptation import toy_suite


def test_binned_means_split_sorted_x_into_equal_count_bins():
    x = np.arange(22, dtype=float)[::-1]
    y = 2 * x
    b = ex.binned_means(x, y, 11)
    assert list(b["n"]) == [2] * 11
    assert b["x"].tolist() == [0.5 + 2 * i for i in range(11)]
    assert np.allclose(b["y"], 2 * b["x"])
    assert len(ex.binned_means([1, 2], [1, 2], 11)) == 2  # fewer samples than bins: one bin each
    with pytest.raises(ValueError, match="non-empty"):
        ex.binned_means([], [], 11)


def test_entropy_loss_bins_and_spearman_pool_all_tasks_first():
    rng = np.random.default_rng(0)
    e = rng.random(44)
    d = {"a": {"entropy": e[:22], "loss": e[:22] ** 2}, "b": {"entropy": e[22:], "loss": -e[22:]}}
    bins = ex.entropy_loss_bins(d, 11)
    assert list(dict.fromkeys(bins["task"])) == ["ALL", "a", "b"] and len(bins) == 33
    rho = ex.entropy_loss_spearman(d)
    assert rho["a"] == pytest.approx(1.0) and rho["b"] == pytest.approx(-1.0)
    assert list(rho.index) == ["ALL", "a", "b"]


def test_tensor_kind_and_short_block_name_clip_and_hf_layouts():
    assert ex.tensor_kind("transformer.resblocks.3.attn.in_proj_weight") == "attn in (q, k, v)"
    assert ex.tensor_kind("vision_model.encoder.layers.0.self_attn.q_proj.weight") == "attn in (q, k, v)"
    assert ex.tensor_kind("transformer.resblocks.3.attn.out_proj.bias") == "attn out"
    assert ex.tensor_kind("transformer.resblocks.3.mlp.c_fc.weight") == "mlp in"
    assert ex.tensor_kind("vision_model.encoder.layers.0.mlp.fc2.weight") == "mlp out"
    assert ex.tensor_kind("transformer.resblocks.3.ln_1.weight") == "layer norm"
    assert ex.tensor_kind("positional_embedding") == "embedding"
    assert ex.tensor_kind("proj") == "projection / other"
    assert ex.short_block("transformer.resblocks.11") == "block 11"
    assert ex.short_block("vision_model.encoder.layers.2") == "block 2"
    assert ex.short_block("ln_post") == "ln_post"


def test_forward_order_and_block_means_follow_the_model_not_the_alphabet():
    suite = toy_suite()
    keys = sorted(suite.pretrained)  # alphabetical, as safetensors stores them
    fwd = ex.forward_order(suite, keys)
    assert fwd == [k for k in suite.model.state_dict() if k in keys]
    blocks = ex.block_order(suite, keys)
    assert blocks.index("transformer.resblocks.0") < blocks.index("transformer.resblocks.1")
    assert blocks.index("transformer.resblocks.1") < blocks.index("ln_post")
    assert blocks[-2:] == ["ln_post", "proj"]  # applied last, norm before projection
    assert blocks.index("conv1") < blocks.index("transformer.resblocks.0")
    vals = np.arange(len(keys) * 2, dtype=float).reshape(len(keys), 2)
    bm = ex.block_means(vals, keys, suite, ["x", "y"])
    assert "block 0" in bm.index and list(bm.columns) == ["x", "y"]
    from mergebook.adaptation import block_of
    in0 = [i for i, k in enumerate(keys) if block_of(k) == "transformer.resblocks.0"]
    assert bm.loc["block 0", "x"] == pytest.approx(vals[in0, 0].mean())


def test_paper_task_names_and_reported_by_task_rename_to_our_tasks():
    names = ex.paper_task_names(["digits", "housenum", "SUN397"])
    assert names == {"digits": "MNIST", "housenum": "SVHN", "SUN397": "SUN397"}
    rep = ex.reported_by_task("adamerging", "tiny", ["Task Arithmetic", "Concrete TA"], ["digits", "housenum"])
    assert rep["Concrete TA"] is None
    from mergebook.reference import reported_row
    row = reported_row("adamerging", "tiny", "Task Arithmetic")
    assert rep["Task Arithmetic"] == {"digits": row["MNIST"], "housenum": row["SVHN"], "avg": row["avg"]}


def test_results_tables_split_summary_from_per_task_rows():
    rows = {"A": {"t": np.array([1, 1, 0, 0], bool)}, "B": {"t": np.ones(4, bool)}}
    frame = ex.results_frame(rows, ["t"], reported={"A": {"avg": 60.0}})
    summary, per_task = ex.results_tables(frame, ["t"], {"A": {"t": 61.0, "avg": 60.0}, "B": None})
    assert list(summary.columns) == ["avg [95% CI]", "reported", "Δ"]
    assert summary.loc["A", "Δ"] == "-10.0"
    assert list(per_task.index) == ["A", "A · reported", "B"]
    assert per_task.loc["A · reported", "t"] == "61.0" and per_task.loc["B", "t"] == "100.0"


def test_history_coefficient_and_step_tables():
    h = {"eval_steps": [0, 5], "accuracy": [{"a": 10.0, "avg": 10.0}, {"a": 20.0, "avg": 20.0}],
         "coefficient_steps": [0, 5], "coefficients": [[0.3, 0.3], [0.4, 0.2]]}
    hf = ex.history_frame(h, ["a"])
    assert list(hf.index) == [0, 5] and hf.loc[5, "avg"] == 20.0
    cf = ex.coefficient_frame(h, ["a", "b"])
    assert cf.loc[5, "b"] == pytest.approx(0.2)
    rep = pd.DataFrame({"Avg": [1.0, 2.0, 3.0]}, index=["0", "100", "200"])
    st = ex.step_table(hf, rep, ["a"])
    assert list(st.columns) == ["ours avg", "reported step", "reported avg", "a"]
    assert st["reported step"].tolist() == ["0", "100"]


def test_remerge_sample_reproduces_the_result_and_hard_mask_is_binary():
    suite = toy_suite()
    r = concrete_task_arithmetic(suite, steps=3, lr=1e-2, batch_size=4, eval_every=3, progress=False,
                                 device="cpu", seed=1)
    same = remerge(suite, r, "sample", "cpu")
    assert all(torch.allclose(same[k], v, atol=1e-6) for k, v in r.state_dict().items())
    hard = remerge(suite, r, "hard", "cpu")
    k = "transformer.resblocks.0.mlp.c_fc.weight"
    delta = hard[k] - suite.pretrained[k]
    kept = r.mask_logits[k] > 0
    assert torch.all(delta[~kept] == 0)
    plain = remerge(suite, r, "none", "cpu")
    ta = {kk: suite.pretrained[kk] + 0.3 * sum(ft[kk] - suite.pretrained[kk] for ft in suite.finetuned_list())
          for kk in r.keys}
    assert all(torch.allclose(plain[kk], ta[kk], atol=1e-5) for kk in r.keys)


def test_adaptive_run_caches_correctness_and_remerges(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBOOK_CACHE", str(tmp_path))
    suite = toy_suite()
    calls = []

    def run():
        calls.append(1)
        return concrete_task_arithmetic(suite, steps=2, batch_size=4, eval_every=2, progress=False,
                                        device="cpu", seed=0)

    a = ex.adaptive_run(suite, "toy-run", {"x": 1}, run, {"hard": lambda r: remerge(suite, r, "hard", "cpu")})
    b = ex.adaptive_run(suite, "toy-run", {"x": 1}, run)
    assert len(calls) == 1 and a == b
    c = ex.unpack_by_task(a["correct"])
    assert set(c) == set(suite.tasks)
    assert 100 * np.mean([c[t].mean() for t in suite.tasks]) == pytest.approx(a["accuracy"]["avg"])
    assert set(a["remerged"]["hard"]) == {"accuracy", "correct"}
    frame = ex.results_frame({"run": a["correct"]}, suite.tasks)
    assert frame.loc["run", "avg"] == pytest.approx(a["accuracy"]["avg"])



def test_concrete_run_passes_mask_lr_to_the_logits_and_keys_the_cache_on_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBOOK_CACHE", str(tmp_path))
    suite = toy_suite()
    common = dict(steps=2, batch_size=4, eval_every=2, device="cpu", seed=0)
    slow = ex.concrete_run(suite, "none", mask_lr=1e-3, **common)
    fast = ex.concrete_run(suite, "none", mask_lr=1e-1, **common)
    assert slow["config"]["lr"] == 1e-3 and fast["config"]["lr"] == 1e-1  # two cache entries, not one
    assert ex.concrete_run(suite, "none", mask_lr=1e-1, **common) == fast
    am = ex.concrete_run(suite, "layer", meta_steps=1, tta_steps=1, mask_lr=0.05, batch_size=4, eval_every=1,
                         device="cpu", seed=0)
    assert am["config"]["outer_lr"] == 0.05 and am["config"]["tta_lr"] == 1e-3  # adaptation keeps AdaMerging's lr
    for bad in (0.0, -1e-3, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mask_lr"):
            ex.concrete_run(suite, "none", mask_lr=bad, **common)
        with pytest.raises(ValueError, match="mask_lr"):
            ex.generalization_rows(suite, ("MNIST", "EuroSAT"), methods=["Concrete TA"], mask_lr=bad, device="cpu")

def test_mask_frame_weights_by_size_and_orders_blocks():
    suite = toy_suite()
    r = concrete_task_arithmetic(suite, steps=2, batch_size=4, eval_every=2, progress=False, device="cpu")
    by_block = ex.mask_frame(r.mask_stats, "block", suite)
    assert by_block.index[0] != "ln_post" and "block 0" in by_block.index
    assert list(by_block.index).index("block 0") < list(by_block.index).index("block 1")
    by_kind = ex.mask_frame(r.mask_stats, "kind")
    assert by_kind["parameters"].sum() == r.mask_stats["overall"]["numel"]
    overall = np.average(by_kind["kept"], weights=by_kind["parameters"])
    assert overall == pytest.approx(100 * r.mask_stats["overall"]["kept"])
