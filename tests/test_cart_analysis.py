"""Chapter 04's experiments (mergebook.cart_analysis) on a two-block micro encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mergebook import cart_analysis as C
from mergebook import experiment as ex
from mergebook.evaluate import evaluate
from mergebook.methods import merge
from mergebook.models.suite import Suite, TaskData

TASKS = ["a", "b", "c", "d"]


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_fc = nn.Linear(6, 8)
        self.c_proj = nn.Linear(8, 6)


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = _MLP()


class _Transformer(nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.resblocks = nn.ModuleList([_Block() for _ in range(n)])


class _Encoder(nn.Module):
    """Residual MLP blocks whose parameter names match CART's matrix rule (``mlp.c_fc.weight``, ...)."""

    def __init__(self, n: int = 3):
        super().__init__()
        self.transformer = _Transformer(n)

    def forward(self, x):
        for b in self.transformer.resblocks:
            x = x + b.mlp.c_proj(torch.relu(b.mlp.c_fc(x)))
        return x


def micro_cart_suite(seed: int = 0) -> Suite:
    g = torch.Generator().manual_seed(seed)
    model = _Encoder()
    pre = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fts = {t: {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for t in TASKS}
    heads = {t: torch.randn(3, 6, generator=g) * 5 for t in TASKS}

    def data(n):
        return TaskData(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g))

    return Suite(profile="micro-cart", tasks=list(TASKS), model=model, pretrained=pre, finetuned=fts, heads=heads,
                 test={t: data(40) for t in TASKS}, val={t: data(20) for t in TASKS},
                 meta={"fingerprint": f"micro-cart-{seed}"})


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MERGEBOOK_CACHE", str(tmp_path))
    return tmp_path


def test_rank_sweep_endpoints_are_weight_averaging_and_pretrained_in_both_orders(cache_dir):
    s = micro_cart_suite()
    res = C.rank_sweep(s, [0.0, 0.25, 1.0], cart_lambda=1.5, ta_lambda=0.3)
    wa = evaluate(s, merge("weight_averaging", s.pretrained, s.finetuned_list()))
    pre = evaluate(s, s.pretrained)
    for order in C.ORDERS:
        assert res["centered"][order]["0"]["accuracy"]["avg"] == pytest.approx(wa["avg"], abs=1e-4)
        assert res["centered"][order]["1"]["accuracy"]["avg"] == pytest.approx(wa["avg"], abs=1e-4)
        assert res["original"][order]["0"]["accuracy"]["avg"] == pytest.approx(pre["avg"], abs=1e-4)
    mid = merge("cart", s.pretrained, s.finetuned_list(), scaling_coef=1.5, ratio=0.25, reverse=True)
    assert res["centered"]["reverse"]["0.25"]["accuracy"]["avg"] == pytest.approx(evaluate(s, mid)["avg"], abs=1e-4)
    frame = C.curve_frame(res, "centered", "top", s.tasks)
    assert list(frame.index) == [0.0, 25.0, 100.0] and list(frame.columns) == [*TASKS, "avg"]
    iv = C.curve_intervals(res, "centered", "top")
    assert (iv["lo"] <= iv["avg"]).all() and (iv["avg"] <= iv["hi"]).all()
    table = C.curves_table(res, s.tasks)
    assert all("|" not in c for c in table.columns)  # readable names, not raw keys


def test_rank_sweep_is_cached(cache_dir, monkeypatch):
    s = micro_cart_suite()
    first = C.rank_sweep(s, [0.0, 0.5], 1.0, 0.3)
    monkeypatch.setattr(C, "merge", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert C.rank_sweep(s, [0.0, 0.5], 1.0, 0.3) == first


def test_routing_at_rank_zero_scores_every_task_on_theta_avg(cache_dir):
    s = micro_cart_suite()
    res = C.routing(s, [0.0, 0.5])
    wa = evaluate(s, merge("weight_averaging", s.pretrained, s.finetuned_list()))
    for t in TASKS:
        assert res["centered"]["top"]["0"]["accuracy"][t] == pytest.approx(wa[t], abs=1e-4)
        assert res["centered"]["reverse"]["0"]["accuracy"][t] == pytest.approx(wa[t], abs=1e-4)
    assert set(res) == {"centered", "original"} and set(res["original"]) == {"top", "reverse"}
    assert C.rank_to_reach(res, -1.0, "centered") == 0.0
    assert np.isnan(C.rank_to_reach(res, 101.0, "centered"))


def test_landscape_grid_shapes_mean_and_paths(cache_dir):
    s = micro_cart_suite()
    land = C.landscape(s, ratios=[0.0, 0.5, 1.0], cart_lambda=1.0, ta_lambdas=[0.0, 0.5], grid_size=3, n_images=8)
    assert len(land["xs"]) == 3 and len(land["ys"]) == 3
    z = {k: np.asarray(v) for k, v in land["loss"].items()}
    assert set(z) == {*TASKS, "mean"} and z["mean"].shape == (3, 3)
    np.testing.assert_allclose(z["mean"], np.mean([z[t] for t in TASKS], axis=0), rtol=1e-9)
    cart = np.asarray(land["paths"]["CART"])
    assert cart.shape == (3, 2)
    np.testing.assert_allclose(cart[0], 0.0, atol=1e-5)  # rank 0 is θ_avg, the origin
    np.testing.assert_allclose(cart[-1], 0.0, atol=1e-4)  # full rank is θ_avg again
    ta = np.asarray(land["paths"]["Task Arithmetic"])
    np.testing.assert_allclose(ta[0], land["pre"], atol=1e-5)  # λ = 0 is θ_pre
    assert xs_cover(land)


def xs_cover(land) -> bool:
    pts = np.asarray(list(land["fine_tuned"].values()))
    return bool((pts[:, 0] >= land["xs"][0]).all() and (pts[:, 0] <= land["xs"][-1]).all()
                and (pts[:, 1] >= land["ys"][0]).all() and (pts[:, 1] <= land["ys"][-1]).all())


def test_task_count_sizes_subsets_and_full_set(cache_dir):
    s = micro_cart_suite()
    methods = {"Weight Averaging": ("weight_averaging", {}), "CART": ("cart", {"scaling_coef": 1.0, "ratio": 0.5})}
    res = C.task_count(s, methods, [2, 3, 4], per_size=2, n_images=40)
    assert [len(res["subsets"][k]) for k in ("2", "3", "4")] == [2, 2, 1]
    frame = C.task_count_frame(res)
    assert frame.loc[("CART", 2), "subsets"] == 2
    full_wa = evaluate(s, merge("weight_averaging", s.pretrained, s.finetuned_list()))["avg"]
    assert res["accuracy"]["Weight Averaging"]["4"][0] == pytest.approx(full_wa, abs=1e-4)


def test_spectra_ranks_examples_and_frame():
    s = micro_cart_suite()
    spec = C.spectra(s.pretrained, s.finetuned_list(), fraction=0.9)
    assert set(spec["energy"]) == {"centered", "original"}
    assert spec["energy"]["centered"][-1] == pytest.approx(1.0)
    assert {C._block(k) for k in spec["examples"]} == {0, 1, 2}
    frame = C.energy_rank_frame(spec)
    assert (frame["rank for 90%, centered"] <= frame["full rank"]).all()
    assert (frame["rank for 90%, centered"] >= 1).all()
    assert C.layer_label("transformer.resblocks.2.mlp.c_fc.weight") == "block 2 · MLP c_fc"


def test_correct_from_accuracy_gives_the_interval_of_the_samples():
    rng = np.random.default_rng(0)
    real = {"a": rng.random(50) < 0.7, "b": rng.random(80) < 0.4}
    acc = {t: 100 * v.mean() for t, v in real.items()}
    rebuilt = C.correct_from_accuracy(acc, {t: v.size for t, v in real.items()})
    assert ex.average_interval(rebuilt) == ex.average_interval(real)
    with pytest.raises(ValueError, match="not a share"):
        C.correct_from_accuracy({"a": 120.0}, {"a": 10})


def test_rank_axis_has_one_tick_per_ratio_and_no_negative_range():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    C.rank_axis(ax, [0.0, 0.03, 0.12, 1.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "3", "12", "100"]
    assert ax.get_xscale() == "linear" and ax.get_xlim()[0] > -1
    plt.close(fig)


def test_reported_table_has_the_papers_rows_for_our_methods():
    t = C.reported_table("cart", "tiny", ["CART", "Ties-Merging (sum)", "Not A Method"])
    assert list(t.index) == ["CART", "Ties-Merging (sum)"]
    assert t.loc["CART", "Average"] == pytest.approx(83.0)


def test_cart_lambda_on_val_scores_each_lambda_as_a_direct_merge(cache_dir):
    s = micro_cart_suite()
    got = C.cart_lambda_on_val(s, [0.5, 1.0], ratio=0.5)
    assert list(got) == ["0.5", "1"]
    for lam in (0.5, 1.0):
        sd = merge("cart", s.pretrained, s.finetuned_list(), scaling_coef=lam, ratio=0.5)
        assert got[f"{lam:g}"] == pytest.approx(evaluate(s, sd, split="val")["avg"])
    with pytest.raises(ValueError, match="no λ given"):
        C.cart_lambda_on_val(s, [], ratio=0.5)


def test_suite_spectra_is_spectra_of_the_suite(cache_dir):
    s = micro_cart_suite()
    got = C.suite_spectra(s, fraction=0.9)
    want = C.spectra(s.pretrained, s.finetuned_list(), fraction=0.9)
    assert got["rank"] == want["rank"] and got["full"] == want["full"]
    np.testing.assert_allclose(got["energy"]["centered"], want["energy"]["centered"])


def test_cart_table_rows_take_the_sweep_point_and_are_read_by_the_summary(cache_dir, monkeypatch):
    from mergebook import summary as S

    s = micro_cart_suite()
    sweep = C.rank_sweep(s, [0.0, 0.5], 1.0, 0.3)
    fake_pp = {"accuracy": {"avg": 1.0}, "correct": {}, "history": {}}
    monkeypatch.setattr(C, "cartpp_row", lambda suite, **kw: dict(fake_pp, kw=kw))
    rows = C.cart_table_rows(s, sweep, ratio=0.5, lambdas=[1.0], cart_lambda=1.0, steps=3, batch_size=4, seed=0,
                             device="cpu")
    assert rows["CART"]["accuracy"] == sweep["centered"]["top"]["0.5"]["accuracy"]
    assert rows["CART"]["setting"] == "λ=1, rank 50%" and rows["CART++"]["setting"] == "3 steps"
    assert rows["CART++"]["kw"] == {"ratio": 0.5, "init": 1.0, "steps": 3, "batch_size": 4, "seed": 0,
                                    "device": "cpu", "matrix_rule": None}
    # the summary chapter finds them under its own key, without recomputing
    p = {"cart_ratio": 0.5, "cart_lambdas": [1.0], "cartpp_steps": 3, "cartpp_batch_size": 4, "seed": 0}
    assert S.chapter04(s, p).rows["CART"]["accuracy"] == rows["CART"]["accuracy"]
    with pytest.raises(KeyError, match="no centered point at ratio 0.25"):
        C.cart_table_rows(s, sweep, ratio=0.25, lambdas=[1.0], cart_lambda=1.0, steps=3, batch_size=4, seed=0,
                          device="cpu")
