"""analysis.entropy_coupling: ∂H_i/∂λ_j against finite differences and the task-wise objective."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from mergebook.analysis import entropy_coupling
from mergebook.evaluate import entropy, head_logits

from .test_adaptation import toy_suite


def mean_entropy(suite, lam, task, n, temperature=1.0):
    pre = suite.pretrained
    params = {k: pre[k] + sum(float(lam[j]) * (suite.finetuned[t][k] - pre[k]) for j, t in enumerate(suite.tasks))
              for k in pre}
    x = suite.test[task].sample(n, 0).images
    with torch.no_grad():
        logits = head_logits(functional_call(suite.model, params, (x,)), suite.heads[task])
    return entropy(logits / temperature).mean().item()


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_coupling_matches_central_differences(temperature):
    suite = toy_suite(num_tasks=3, n=24, dtype=torch.float64, delta=0.2)
    frame = entropy_coupling(suite, coefficient=0.3, n=16, temperature=temperature)
    assert list(frame.index) == suite.tasks and list(frame.columns) == suite.tasks
    eps = 1e-5
    for i, task in enumerate(suite.tasks):
        for j in range(3):
            up = [0.3 + (eps if m == j else 0.0) for m in range(3)]
            down = [0.3 - (eps if m == j else 0.0) for m in range(3)]
            fd = (mean_entropy(suite, up, task, 16, temperature) - mean_entropy(suite, down, task, 16, temperature)) / (2 * eps)
            assert frame.iloc[i, j] == pytest.approx(fd, rel=1e-5, abs=1e-8)


def test_coupling_with_zero_vectors_is_zero_and_errors_are_clear():
    suite = toy_suite(num_tasks=2, n=8, dtype=torch.float64, delta=0.0)
    assert (entropy_coupling(suite, n=8).abs().to_numpy() == 0).all()  # no vector, no gradient
    with pytest.raises(ValueError, match="temperature"):
        entropy_coupling(suite, temperature=0.0)
    with pytest.raises(ValueError, match="coefficient"):
        entropy_coupling(suite, coefficient=float("nan"))
    with pytest.raises(ValueError, match="n must"):
        entropy_coupling(suite, n=0)


def test_task_vector_cosines_by_hand():
    from mergebook.analysis import mean_off_diagonal, task_vector_cosines

    pre = {"w": torch.zeros(2, 2), "b": torch.zeros(1), "step": torch.tensor(3)}  # int tensors are skipped
    fts = [{"w": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "b": torch.zeros(1), "step": torch.tensor(9)},
           {"w": torch.tensor([[1.0, 1.0], [0.0, 0.0]]), "b": torch.zeros(1), "step": torch.tensor(0)},
           {"w": torch.zeros(2, 2), "b": torch.tensor([-2.0]), "step": torch.tensor(0)}]
    cos = task_vector_cosines(pre, fts, ["a", "b", "c"])
    assert cos.loc["a", "b"] == pytest.approx(2 ** -0.5)
    assert cos.loc["a", "c"] == pytest.approx(0.0) and cos.loc["b", "b"] == pytest.approx(1.0)
    assert mean_off_diagonal(cos) == pytest.approx(2 * 2 ** -0.5 / 6)
    with pytest.raises(ValueError, match="all zeros"):
        task_vector_cosines(pre, [pre, fts[0]])


def study_frame():
    import pandas as pd

    rows = []
    for variant, scale, temps in [("default", 12.8, [1.0, 0.128]), ("retrained", 100.0, [1.0])]:
        base = {"variant": variant, "head_scale": scale}
        rows.append({**base, "method": "Individual", "housenum": 90.0, "signs": 98.0, "avg": 94.0})
        rows.append({**base, "method": "Task Arithmetic (λ 0.3)", "housenum": 50.0, "signs": 60.0, "avg": 55.0})
        for t in temps:
            rows.append({**base, "method": f"dH/dλ column sum at TA (T={t:.3f})", "temperature": t,
                         "housenum": 0.9 if t == 1.0 else -0.3, "signs": 0.5})
            for steps, bpp in ([(300, 1), (500, 2)] if variant == "default" else [(300, 1)]):
                rows.append({**base, "method": "Layer-wise AdaMerging", "temperature": t, "steps": steps,
                             "batches": bpp, "lr": 1e-3, "housenum": 40.0 if t == 1.0 else 55.0, "signs": 61.0,
                             "avg": 50.5 if t == 1.0 else 58.0})
    return pd.DataFrame(rows)


def test_entropy_study_table_and_numbers():
    from mergebook.analysis import entropy_study_numbers, entropy_study_table

    table = entropy_study_table(study_frame())
    # per variant: the TA row then its AdaMerging runs; dH and Individual rows are not runs
    assert list(table["run"]).count("Task Arithmetic (λ 0.3)") == 2 and len(table) == 2 + 4 + 1
    first_am = table.iloc[1]
    assert first_am["housenum"] == "40.0 (-10.0)" and first_am["Δ avg"] == "-4.5"
    assert first_am["below TA"] == "1 of 2"  # housenum below 50, signs 61 above 60
    nums = entropy_study_numbers(study_frame(), {"date": "d", "device": "cpu", "clip_temperature": 0.128})
    assert nums["st_hn_sum_1"] == "+0.90" and nums["st_hn_sum_t"] == "-0.30"
    assert nums["st_hn_am_1"] == "40.0" and nums["st_hn_am_t"] == "55.0" and nums["st_hn_ta"] == "50.0"
    assert nums["st_ind_100"] == "94.0" and nums["st_ta_100"] == "55.0"


def test_pilot_table_by_hand():
    import pandas as pd

    from mergebook.analysis import pilot_table

    rows = []
    for ls, scale, am in [(0.1, 15.0, 44.0), (0.0, 40.0, 52.0)]:
        base = {"label_smoothing": ls, "pretrain_steps": 10, "logit_scale": scale}
        rows += [{**base, "method": "Pretrained", "housenum": 10.0, "signs": 20.0, "avg": 15.0},
                 {**base, "method": "Individual", "housenum": 90.0, "signs": 90.0, "avg": 90.0},
                 {**base, "method": "Task Arithmetic (λ 0.3)", "housenum": 40.0, "signs": 50.0, "avg": 45.0},
                 {**base, "method": "dH/dλ column sum at TA", "housenum": 0.5 - ls * 10, "signs": 0.0},
                 {**base, "method": "Layer-wise AdaMerging", "steps": 300, "batches": 1, "lr": 1e-3,
                  "housenum": am - 10, "signs": am + 10, "avg": am}]
    t = pilot_table(pd.DataFrame(rows))
    assert list(t["learned logit scale"]) == ["15.0", "40.0"]
    assert list(t["LW AM 300 × 1"]) == ["44.0 (-1.0)", "52.0 (+7.0)"]
    assert list(t["below TA (300 × 1)"]) == ["1 of 2", "0 of 2"]  # 34 < 40; then 42 > 40 and 62 > 50
    assert list(t["housenum ∂H/∂λ sum"]) == ["-0.50", "+0.50"]


def test_capacity_table_and_numbers_by_hand():
    import pandas as pd

    from mergebook.analysis import CAPACITY_COSINE, capacity_numbers, capacity_table

    rows = []
    for name, params, am, cos in [("128x6", 1_233_408, 44.0, None), ("128x12", 2_423_040, 47.5, 0.03)]:
        base = {"backbone": name, "params": params, "label_smoothing": 0.1, "pretrain_steps": 10, "logit_scale": 15.0}
        rows += [{**base, "method": "Pretrained", "housenum": 10.0, "signs": 20.0, "avg": 15.0},
                 {**base, "method": "Individual", "housenum": 90.0, "signs": 90.0, "avg": 90.0},
                 {**base, "method": "Task Arithmetic (λ 0.3)", "housenum": 40.0, "signs": 50.0, "avg": 45.0},
                 {**base, "method": "dH/dλ column sum at TA", "housenum": 0.25, "signs": 0.0},
                 {**base, "method": "Layer-wise AdaMerging", "steps": 300, "batches": 1, "lr": 1e-3,
                  "housenum": am - 10, "signs": am + 10, "avg": am}]
        if cos is not None:
            rows.append({**base, "method": CAPACITY_COSINE, "housenum": cos, "signs": cos, "avg": cos})
    frame = pd.DataFrame(rows)
    t = capacity_table(frame)
    assert list(t["parameters"]) == ["1.23M", "2.42M"]
    assert list(t["mean cosine"]) == ["–", "0.030"]
    assert list(t["LW AM 300 × 1"]) == ["44.0 (-1.0)", "47.5 (+2.5)"]
    assert list(t["below TA (300 × 1)"]) == ["1 of 2", "1 of 2"]  # housenum 34 < 40, then 37.5 < 40; signs above
    n = capacity_numbers(frame, {"pretrain_steps": 10, "seconds_per_backbone": {"128x12": 600.0},
                                 "backbones_requested": ["deep", "wide"], "backbones_done": ["deep"]})
    assert n["cap_gains"] == "-1.0, +2.5" and n["cap_best_gain"] == "+2.5"
    assert n["cap_minutes"] == "128x12 10 min" and n["cap_missing"] == "Not run, for want of CPU time: wide."
    assert n["cap_effect"].startswith("a larger backbone widens it") and n["cap_effect"].endswith("128x12 (+3.5 points)")
    tight = capacity_numbers(frame, {"pretrain_steps": 10}, margin=5.0)
    assert tight["cap_effect"].startswith("no larger backbone") and tight["cap_missing"].startswith("Every")


def test_headroom_table_and_numbers_by_hand():
    import pandas as pd

    from mergebook.analysis import headroom_numbers, headroom_table

    def row(method, objective, granularity, lr, housenum, signs):
        return {"method": method, "objective": objective, "granularity": granularity, "steps": 300 if lr else None,
                "lr": lr, "housenum": housenum, "signs": signs, "avg": (housenum + signs) / 2}

    frame = pd.DataFrame([
        row("Individual", "-", "-", None, 90.0, 90.0),
        row("Task Arithmetic (λ 0.3)", "-", "-", None, 40.0, 60.0),   # avg 50, gap 40
        row("Task-wise AdaMerging", "entropy", "task", 1e-3, 30.0, 62.0),  # 46: -4, 1 below
        row("Task-wise oracle λ", "ce test", "task", 1e-2, 44.0, 60.0),    # 52: +2
        row("Layer-wise AdaMerging", "entropy", "layer", 1e-3, 36.0, 70.0),  # 53: +3
        row("Layer-wise supervised λ", "ce val", "layer", 1e-3, 42.0, 62.0),  # 52: +2
        row("Layer-wise supervised λ", "ce val", "layer", 1e-2, 44.0, 64.0),  # 54: +4 (the best lr counts)
        row("Layer-wise oracle λ", "ce test", "layer", 1e-2, 50.0, 70.0),     # 60: +10, closes 25%
    ])
    t = headroom_table(frame)
    assert list(t["avg (Δ TA)"])[:3] == ["90.0 (+40.0)", "50.0 (+0.0)", "46.0 (-4.0)"]
    assert list(t["TA → individual gap closed"])[-1] == "25%"
    assert list(t["below TA"]) == ["–", "–", "1 of 2", "0 of 2", "1 of 2", "0 of 2", "0 of 2", "0 of 2"]
    assert list(t["steps × lr"])[2:4] == ["300 × 0.001", "300 × 0.01"]
    # reported: gain 11 over a gap of 22 (50%)
    n = headroom_numbers(frame, {"steps": 300}, reported_gain=11.0, reported_gap=22.0)
    assert (n["hr_tw_am"], n["hr_tw_oracle"], n["hr_lw_am"], n["hr_lw_sup"], n["hr_lw_oracle"]) == \
        ("-4.0", "+2.0", "+3.0", "+4.0", "+10.0")
    assert (n["hr_gap_oracle"], n["hr_gap_am"], n["hr_gap_rep"], n["hr_am_share"]) == ("25%", "8%", "50%", "30%")
    assert "compresses the effect" in n["hr_effect"] and "+10.0" in n["hr_effect"]
    roomy = headroom_numbers(frame, {"steps": 300}, reported_gain=9.0, reported_gap=22.0)
    assert "the room is there" in roomy["hr_effect"]


def test_regime_table_and_numbers_by_hand():
    import pandas as pd

    from mergebook.analysis import regime_numbers, regime_table

    rows = []
    for lr, book, norm, ta, am, orc in [(3e-4, True, 0.05, 50.0, 51.0, 55.0), (1e-4, False, 0.02, 60.0, 63.5, 70.0)]:
        base = {"ft_lr": lr, "book": book}
        rows += [{**base, "method": "relative task-vector norm", "avg": norm},
                 {**base, "method": "task-vector cosine, mean off-diagonal", "avg": 0.03},
                 {**base, "method": "Individual", "avg": 90.0},
                 {**base, "method": "Task Arithmetic (λ 0.3)", "avg": ta},
                 {**base, "method": "Layer-wise AdaMerging", "avg": am},
                 {**base, "method": "Layer-wise oracle λ", "avg": orc}]
    frame = pd.DataFrame(rows)
    t = regime_table(frame)
    assert list(t["fine-tune lr"]) == ["0.0003 (book)", "0.0001"]
    assert list(t["LW AM (Δ TA)"]) == ["51.0 (+1.0)", "63.5 (+3.5)"]
    assert list(t["LW oracle λ: gap closed"]) == ["12%", "33%"]  # 5/40, 10/30
    n = regime_numbers(frame, {"ft_steps": 400})
    assert n["rg_am_gains"] == "+1.0, +3.5" and n["rg_oracle_gains"] == "+5.0, +10.0"
    assert n["rg_effect"].endswith("lr 0.0001 (+2.5 points; its Task Arithmetic is +10.0 and its layer-wise "
                                   "AdaMerging +12.5 points against the book's, so the merge itself is better)")
    worse = frame.assign(avg=frame["avg"].where(~((frame["ft_lr"] == 1e-4) & frame["method"].isin(
        ["Task Arithmetic (λ 0.3)", "Layer-wise AdaMerging"])), frame["avg"] - 20.0))  # TA 40, AM 43.5
    assert regime_numbers(worse, {"ft_steps": 400})["rg_effect"].endswith("so the merge itself is not better)")
    assert regime_numbers(frame, {"ft_steps": 400}, margin=3.0)["rg_effect"].startswith("no other regime")
    with pytest.raises(ValueError, match="book"):
        regime_numbers(frame.assign(book=False), {"ft_steps": 400})


def test_design_table_and_numbers_by_hand():
    import pandas as pd

    from mergebook.analysis import design_numbers, design_table

    def rows(variant, changed, zero, ind, ta, am, orc):
        out = []
        for method, (hn, sg) in (("Pretrained", zero), ("Individual", ind), ("Task Arithmetic (λ 0.3)", ta),
                                 ("Layer-wise AdaMerging", am), ("Layer-wise oracle λ", orc)):
            out.append({"variant": variant, "changed": changed, "method": method, "housenum": hn, "signs": sg,
                        "avg": (hn + sg) / 2, "seconds": 1.0})
        return out

    frame = pd.DataFrame(
        rows("book", "none", (20, 40), (90, 90), (50, 70), (30, 80), (60, 80))          # TA 60, AM 55 (-5), orc +10
        + rows("housenum plain", "housenum", (40, 40), (90, 90), (70, 60), (72, 66), (80, 70)))  # TA 65, AM 69 (+4)
    t = design_table(frame)
    assert list(t["variant"]) == ["book", "housenum plain"]
    assert list(t["housenum: TA → LW AM"]) == ["50.0 → 30.0", "70.0 → 72.0"]
    assert list(t["LW AM (Δ TA)"]) == ["55.0 (-5.0)", "69.0 (+4.0)"]
    assert list(t["LW oracle λ: gap closed"]) == ["33%", "40%"]  # 10/30, 10/25
    assert list(t["LW AM below TA"]) == ["1 of 2", "0 of 2"]
    n = design_numbers(frame, {"steps": 300, "seconds_per_variant": {"book": 60.0, "housenum plain": 120.0}})
    assert n["ds_variants"] == "book -5.0; housenum plain +4.0" and n["ds_minutes"] == "3 min"
    assert n["ds_below"] == "book: housenum; housenum plain: none"
    assert n["ds_oracle"] == "book +10.0; housenum plain +10.0"  # 70 - 60, 75 - 65
    assert n["ds_collapse"].endswith("only in: housenum plain")
    assert n["ds_effect"] == "the gain is wider by more than 1 point in: housenum plain (+4.0)"
    assert n["ds_baseline"] == "book" and n["ds_base_gain"] == "-5.0"
    assert design_numbers(frame, {"steps": 300}, margin=10.0)["ds_effect"].startswith("no variant widens")
    flipped = design_numbers(frame, {"steps": 300}, baseline="housenum plain")
    assert flipped["ds_base_gain"] == "+4.0" and flipped["ds_effect"].startswith("no variant widens")
    with pytest.raises(ValueError, match="no variant 'nope'"):
        design_numbers(frame, {"steps": 300}, baseline="nope")
    with pytest.raises(ValueError, match="no row for"):
        design_table(frame[frame["method"] != "Layer-wise oracle λ"])


def test_publish_study_glues_the_view_and_its_numbers(tmp_path):
    import pandas as pd

    from mergebook.analysis import STUDY_VIEWS, design_numbers, design_table, publish_study, recorded_study

    glued = {}

    def glue(key, value, display=True):
        assert display is False  # the chapter shows each table once, through its {glue:} directive
        glued[key] = value

    csv = tmp_path / "design.csv"
    frame, record = publish_study("miniature_design", glue, "tab_design", csv)
    raw, raw_rec = recorded_study("miniature_design")
    pd.testing.assert_frame_equal(frame, raw)
    assert record == raw_rec
    view = design_table(raw)
    pd.testing.assert_frame_equal(glued.pop("tab_design"), view.set_index("variant"))
    pd.testing.assert_frame_equal(pd.read_csv(csv, dtype=str), view.astype(str))
    assert glued == design_numbers(raw, raw_rec)
    assert set(STUDY_VIEWS) >= {"miniature_design", "miniature_entropy", "miniature_headroom"}
    with pytest.raises(KeyError, match="miniature_design"):
        publish_study("miniature_desing", glue, "t", tmp_path / "x.csv")


def test_concrete_budget_table_and_numbers_by_hand():
    import pandas as pd

    from mergebook.analysis import concrete_budget_numbers, concrete_budget_table

    def row(method, ms, ts, lr, start, avg, logit):
        return {"run": f"{method} {ms}+{ts} {lr:g}", "method": method, "mask_steps": ms, "tta_steps": ts,
                "mask_lr": lr, "kept": 0.5, "mean_p": 0.5, "mean_abs_logit": logit, "max_abs_logit": 2 * logit,
                "start_avg": start, "avg": avg, "seconds": 120.0}

    ta, am = "Concrete TA", "Layer-wise Concrete AdaMerging"
    frame = pd.DataFrame([row(ta, 200, 0, 1e-3, 70.0, 71.0, 0.05), row(ta, 200, 0, 1e-2, 70.0, 74.0, 0.5),
                          row(am, 100, 100, 1e-3, 70.5, 72.0, 0.02), row(am, 100, 200, 1e-3, 70.5, 73.0, 0.02),
                          row(am, 100, 200, 1e-2, 72.5, 73.5, 0.2)])
    t = concrete_budget_table(frame)
    assert list(t["Δ"]) == ["+1.0", "+4.0", "+1.5", "+2.5", "+1.0"]
    assert list(t["adaptation steps"])[:2] == ["–", "–"] and list(t["mask lr"])[:2] == ["0.001", "0.01"]
    n = concrete_budget_numbers(frame, {"date": "2026-12-04", "seconds": 100})
    assert (n["cb_ta_lo"], n["cb_ta_hi"], n["cb_am_lo"], n["cb_am_hi"], n["cb_am_before"]) == \
        ("71.0", "74.0", "73.0", "73.5", "72.0")
    assert n["cb_am_hi_start"] == "72.5" and n["cb_ta_hi_logit"] == "0.500"
    assert n["cb_minutes"] == "10 min"  # CPU: the runs' seconds summed (5 x 120), not the record's wall 100
    assert n["cb_effect"] == ("the larger mask lr is ahead on both (Concrete TA +3.0, Concrete AdaMerging +0.5 "
                              "points; one seed)")
    # AM is ahead by only 0.5 with the larger lr: not "by more than 1 point on both"
    assert concrete_budget_numbers(frame, {}, margin=1.0)["cb_effect"].startswith(
        "the larger mask lr is not ahead by more than 1 point on both")
    with pytest.raises(ValueError, match="100 mask steps, 100 adaptation steps"):
        concrete_budget_numbers(frame.drop(index=2), {})
    with pytest.raises(ValueError, match="no mask lr above"):
        concrete_budget_numbers(frame[frame["mask_lr"] < 5e-3], {})


def test_disentangle_table_and_numbers_by_hand():
    import pandas as pd

    from mergebook.analysis import disentangle_numbers, disentangle_table

    # two tasks, individual 90 and 80; λ 0.3: alone 80/70, TA 70/66 -> scaling 10, interference 7;
    # λ 1: alone 90/80 (no scaling loss), TA 40/30 -> interference 50
    rows = [{"task": t, "lambda": lam, "individual": ind, "alone": al, "task_arithmetic": ta}
            for t, lam, ind, al, ta in [("a", 0.3, 90, 80, 70), ("b", 0.3, 80, 70, 66),
                                        ("a", 1.0, 90, 90, 40), ("b", 1.0, 80, 80, 30)]]
    frame = pd.DataFrame(rows)
    t = disentangle_table(frame)
    assert list(t["λ"]) == ["0.3", "1"]
    assert list(t["Gap (Ind − TA)"]) == [17.0, 50.0]
    assert list(t["Scaling loss (Ind − Alone)"]) == [10.0, 0.0]
    assert list(t["Interference (Alone − TA)"]) == [7.0, 50.0]
    assert list(t["Interference share"]) == ["41%", "100%"]
    n = disentangle_numbers(frame, {"date": "2026-12-04"})
    assert (n["dt_scaling"], n["dt_inter"], n["dt_share"], n["dt_inter_top"], n["dt_ta_top"]) == \
        ("10.0", "7.0", "41%", "50.0", "35.0")
    assert (n["dt_worst"], n["dt_worst_inter"]) == ("a", "10.0")
    assert "no single λ closes the gap" in n["dt_effect"] and "adds 43.0" in n["dt_effect"]
    assert n["dt_gap"] == "17.0" and "dt_gap_compare" not in n
    assert disentangle_numbers(frame, {}, reported_gap=21.4)["dt_gap_compare"] == "about as large as"  # 17/21.4 = 0.79
    assert disentangle_numbers(frame, {}, reported_gap=13.0)["dt_gap_compare"] == "larger than"        # 1.31
    assert disentangle_numbers(frame, {}, reported_gap=30.0)["dt_gap_compare"] == "smaller than"       # 0.57
    with pytest.raises(ValueError, match="reported_gap must be a positive"):
        disentangle_numbers(frame, {}, reported_gap=float("nan"))
    # a space where raising λ costs little interference reads the other way
    mild = frame.assign(task_arithmetic=[70, 66, 88, 78])
    assert "would close much of the gap" in disentangle_numbers(mild, {})["dt_effect"]
    with pytest.raises(ValueError, match="no rows at the book's λ 0.5"):
        disentangle_numbers(frame, {}, book_lambda=0.5)
    with pytest.raises(KeyError, match="alone"):
        disentangle_table(frame.drop(columns="alone"))


def test_domains_table_and_numbers_by_hand():
    import pandas as pd

    from mergebook.analysis import domains_numbers, domains_table

    # two tasks a, b; per variant: (method, a, b). book: gap 85 - 68 = 17 = scaling 10 + interference 7,
    # AM +3; pal: interference 3 (cut by 4), AM 71.5 - 72 = -0.5 (narrows, b below TA);
    # frm: zero-shot 25 (broken), interference 5 (cut by 2), AM +5 (widens)
    spec = {"book": [("Pretrained", 60, 50), ("Individual", 90, 80), ("Alone (λ 0.3)", 80, 70),
                     ("Task Arithmetic (λ 0.3)", 70, 66), ("Layer-wise AdaMerging", 74, 68), ("Layer-wise oracle λ", 78, 72)],
            "pal": [("Pretrained", 58, 52), ("Individual", 90, 80), ("Alone (λ 0.3)", 80, 70),
                    ("Task Arithmetic (λ 0.3)", 74, 70), ("Layer-wise AdaMerging", 74, 69), ("Layer-wise oracle λ", 80, 74)],
            "frm": [("Pretrained", 30, 20), ("Individual", 80, 70), ("Alone (λ 0.3)", 60, 50),
                    ("Task Arithmetic (λ 0.3)", 50, 50), ("Layer-wise AdaMerging", 56, 54), ("Layer-wise oracle λ", 60, 56)]}
    frame = pd.DataFrame([{"variant": v, "method": m, "a": a, "b": b, "avg": (a + b) / 2}
                          for v, rows in spec.items() for m, a, b in rows])
    t = domains_table(frame).set_index("variant")
    assert list(t["scaling loss"]) == [10.0, 10.0, 20.0]
    assert list(t["interference"]) == [7.0, 3.0, 5.0]
    assert list(t["LW AM (Δ TA)"]) == ["71.0 (+3.0)", "71.5 (-0.5)", "55.0 (+5.0)"]
    assert list(t["LW oracle λ (Δ TA)"]) == ["75.0 (+7.0)", "77.0 (+5.0)", "58.0 (+8.0)"]
    assert list(t["LW AM below TA"]) == ["0 of 2", "1 of 2", "0 of 2"]
    n = domains_numbers(frame, {"date": "2026-12-05", "steps": 300, "seconds": 1500})
    assert n["dm_effect"] == ("pal cuts the interference from 7.0 to 3.0 points and narrows layer-wise AdaMerging's "
                              "gain (+3.0 → -0.5); frm cuts the interference from 7.0 to 5.0 points and widens "
                              "layer-wise AdaMerging's gain (+3.0 → +5.0)")
    assert n["dm_broken"] == "the backbone no longer reads the images of frm (25.0 against 55.0)"
    assert (n["dm_inter"], n["dm_gains"], n["dm_minutes"]) == ("book 7.0; pal 3.0; frm 5.0", "book +3.0; pal -0.5; frm +5.0",
                                                              "25 min")
    # a margin wider than every cut finds no effect; a missing method names the rerun
    assert domains_numbers(frame, {"steps": 300}, margin=5)["dm_effect"] == "no variant cuts the interference by more than 5 point"
    with pytest.raises(ValueError, match="domains study's variant 'pal' has no row.*miniature_domains.py"):
        domains_table(frame[~((frame["variant"] == "pal") & (frame["method"] == "Alone (λ 0.3)"))])


def test_committed_domains_study_reads():
    from mergebook.analysis import domains_numbers, domains_table, recorded_study

    frame, record = recorded_study("miniature_domains")
    t = domains_table(frame)
    assert list(t["variant"]) == list(frame["variant"].unique())
    book = t.set_index("variant").loc["book"]
    # the book's row must agree with the disentangling study of the same fine-tunes at λ 0.3
    dis, _ = recorded_study("miniature_disentangle")
    at = dis[dis["lambda"] == 0.3]
    assert book["interference"] == round(float((at["alone"] - at["task_arithmetic"]).mean()), 1)
    assert domains_numbers(frame, record)["dm_baseline"] == "book"


def test_pretraining_table_and_numbers_by_hand():
    import pandas as pd

    from mergebook.analysis import pretraining_numbers, pretraining_table

    # book: TA 68, AM 71 (+3.0), oracle 75 (+7.0); longer: TA 70, AM 75 (+5.0 widens), oracle 77.5 (+7.5 leaves)
    spec = {"book": (None, [("Pretrained", 60, 50), ("Individual", 90, 80), ("Alone (λ 0.3)", 80, 70),
                            ("Task Arithmetic (λ 0.3)", 70, 66), ("Layer-wise AdaMerging", 74, 68),
                            ("Layer-wise oracle λ", 78, 72)]),
            "longer": (20.0, [("Pretrained", 62, 52), ("Individual", 91, 81), ("Alone (λ 0.3)", 82, 72),
                              ("Task Arithmetic (λ 0.3)", 72, 68), ("Layer-wise AdaMerging", 77, 73),
                              ("Layer-wise oracle λ", 80, 75)])}
    frame = pd.DataFrame([{"variant": v, "method": m, "a": a, "b": b, "avg": (a + b) / 2,
                           "logit_scale": float("nan") if sc is None else sc}
                          for v, (sc, rows) in spec.items() for m, a, b in rows])
    t = pretraining_table(frame).set_index("variant")
    assert list(t["logit scale"]) == ["–", "20.0"]
    assert list(t["interference"]) == [7.0, 7.0] and list(t["LW AM (Δ TA)"]) == ["71.0 (+3.0)", "75.0 (+5.0)"]
    n = pretraining_numbers(frame, {"steps": 300, "date": "2026-12-06"})
    assert n["pt_effect"] == ("longer: AdaMerging's gain over TA widens (+3.0 → +5.0), the oracle's holds "
                              "(+7.0 → +7.5)")
    assert (n["pt_gains"], n["pt_baseline"], n["pt_minutes"]) == ("book +3.0; longer +5.0", "book", "an unrecorded time")
    assert list(t["LW AM below TA"]) == ["0 of 2", "0 of 2"]  # logit_scale is not a task column
    # gaps: book 85 - 68 = 17.0, longer 86 - 70 = 16.0; the reported 16.2 is nearer the longer one
    assert n["pt_gap"] == "book 17.0; longer 16.0" and "pt_closest" not in n
    assert pretraining_numbers(frame, {"steps": 300}, reported_gap=16.2)["pt_closest"] == "longer"
    assert pretraining_numbers(frame, {"steps": 300}, reported_gap=21.4)["pt_closest"] == "book"
    with pytest.raises(ValueError, match="reported_gap must be a positive"):
        pretraining_numbers(frame, {"steps": 300}, reported_gap=0)
    with pytest.raises(ValueError, match="pretraining study's variant 'longer' has no row"):
        pretraining_table(frame[~((frame["variant"] == "longer") & (frame["method"] == "Individual"))])
