"""The registry: every method is listed with its paper and parameters, and every misuse is one clear error."""

import pytest
import torch

from mergebook.methods import METHODS, MergeError, describe, list_methods, merge
from mergebook.statedict import CheckpointError

EXPECTED = {"weight_averaging", "task_arithmetic", "ties", "cart", "layer_wise", "task_wise", "concrete",
            "fisher", "regmean"}


def models(k=2):
    g = torch.Generator().manual_seed(0)
    pre = {"w": torch.randn(3, 3, generator=g), "b": torch.randn(3, generator=g)}
    return pre, [{key: v + 0.1 * torch.randn(v.shape, generator=g) for key, v in pre.items()} for _ in range(k)]


def test_every_method_is_registered_with_paper_docstring_and_parameter_ranges():
    assert EXPECTED <= set(list_methods())
    for name in EXPECTED:
        spec = METHODS[name]
        assert spec.paper and spec.summary and spec.doc, name
        for p in spec.params:
            assert p.doc and p.range_text(), (name, p.name)
            if not p.required and p.default is not None and p.kind in ("float", "int"):
                assert p.check(name, p.default) == p.default  # defaults lie in their own range
    assert METHODS["task_arithmetic"].defaults()["scaling_coef"] == 0.3
    assert METHODS["ties"].defaults() == {"k": 0.2, "scaling_coef": 0.3, "disjoint": "sum", "keys": None,
                                          "extra_zeros": 0}
    assert METHODS["cart"].defaults()["scaling_coef"] == 2.0 and METHODS["cart"].defaults()["ratio"] == 0.12
    assert METHODS["fisher"].inputs == ("model", "heads", "data")
    text = describe("ties")
    assert "Yadav" in text and "disjoint = 'sum'" in text and "one of sum, mean, max" in text


def test_unknown_method_lists_the_known_ones():
    pre, fts = models()
    with pytest.raises(MergeError, match=r"unknown merge method 'tie' \(did you mean 'ties'\?\); known methods: .*cart"):
        merge("tie", pre, fts)


def test_unknown_parameter_names_the_valid_ones():
    pre, fts = models()
    with pytest.raises(MergeError, match=r"task_arithmetic: unknown parameter 'lam'.*scaling_coef"):
        merge("task_arithmetic", pre, fts, lam=0.3)


def test_fewer_than_two_models_is_refused():
    pre, fts = models()
    with pytest.raises(MergeError, match="needs at least 2 fine-tuned models, got 1"):
        merge("task_arithmetic", pre, fts[:1])


def test_a_single_state_dict_instead_of_a_list_is_refused():
    pre, fts = models()
    with pytest.raises(MergeError, match="must be a list of state dicts"):
        merge("weight_averaging", pre, fts[0])


def test_out_of_range_lambda_is_refused_with_the_range():
    pre, fts = models()
    with pytest.raises(MergeError, match=r"'scaling_coef' = 30 is out of range: use a value in \[-10, 10\]"):
        merge("task_arithmetic", pre, fts, scaling_coef=30)
    with pytest.raises(MergeError, match="must be finite"):
        merge("task_arithmetic", pre, fts, scaling_coef=float("inf"))
    with pytest.raises(MergeError, match="must be a number"):
        merge("task_arithmetic", pre, fts, scaling_coef="0.3")


def test_mismatched_checkpoints_are_refused_through_merge():
    pre, fts = models()
    fts[1] = {**fts[1], "b": torch.zeros(4)}
    with pytest.raises(CheckpointError, match=r"finetuned\[1\]\['b'\] has shape \(4,\)"):
        merge("ties", pre, fts)


def test_non_finite_checkpoint_is_refused_through_merge():
    pre, fts = models()
    fts[0]["w"][0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"finetuned\[0\]\['w'\] contains NaN"):
        merge("cart", pre, fts)


@pytest.mark.parametrize("name, missing", [("fisher", "model=, heads=, data="), ("regmean", "model=, data=")])
def test_data_methods_say_which_inputs_are_missing(name, missing):
    pre, fts = models()
    with pytest.raises(MergeError, match=f"{name} uses data: it needs the keyword argument\\(s\\) {missing}"):
        merge(name, pre, fts)


def test_parameters_must_be_passed_by_keyword():
    pre, fts = models()
    from mergebook.methods.task_arithmetic import task_arithmetic

    with pytest.raises(MergeError, match="pass parameters by keyword"):
        task_arithmetic(pre, fts, 0.3)


def test_direct_calls_run_the_same_checks():
    pre, fts = models()
    from mergebook.methods.ties import ties_merging

    with pytest.raises(MergeError, match=r"'k' = 2 is out of range"):
        ties_merging(pre, fts, k=2)


def test_bool_and_int_parameters_are_type_checked():
    pre, fts = models()
    with pytest.raises(MergeError, match="'reverse' must be true or false"):
        merge("cart", pre, fts, reverse="yes")
    with pytest.raises(MergeError, match="'rank' must be an integer"):
        merge("cart", pre, fts, rank=1.5)
