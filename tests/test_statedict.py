"""State-dict algebra: exact task vectors, checks that name the offending key, safe I/O."""

import os
import pickle

import pytest
import torch

from mergebook import statedict as S


def small():
    pre = {
        "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "b": torch.tensor([0.5, -0.5]),
        "ids": torch.tensor([0, 1, 2]),
    }
    ft = {
        "w": torch.tensor([[2.0, 2.0], [1.0, 4.5]]),
        "b": torch.tensor([0.0, 0.5]),
        "ids": torch.tensor([0, 1, 2]),
    }
    return pre, ft


def clones(sd):
    return {k: v.clone() for k, v in sd.items()}


def test_task_vector_is_finetuned_minus_pretrained_over_float_keys_only():
    pre, ft = small()
    tv = S.task_vector(ft, pre)
    assert list(tv) == ["w", "b"]  # the integer tensor is skipped, order kept
    assert torch.equal(tv["w"], torch.tensor([[1.0, 0.0], [-2.0, 0.5]]))
    assert torch.equal(tv["b"], torch.tensor([-0.5, 1.0]))
    assert list(S.task_vector(ft, pre, keys=["b"])) == ["b"]


def test_task_vectors_and_lazy_view_agree_and_inputs_are_not_modified():
    pre, ft = small()
    pre0, ft0 = clones(pre), clones(ft)
    (tv,) = S.task_vectors(pre, [ft])
    view = S.TaskVectorView(ft, pre)
    assert list(view) == list(tv) and len(view) == 2 and "ids" not in view
    for k in tv:
        assert torch.equal(view[k], tv[k])
    assert torch.equal(view.strided("w", 3), tv["w"].reshape(-1)[::3])
    for a, b in ((pre, pre0), (ft, ft0)):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_float_keys_and_layer_names_skip_integer_tensors_in_state_dict_order():
    pre, _ = small()
    assert S.float_keys(pre) == ["w", "b"]
    assert S.layer_names(pre) == ["w", "b"]


def test_add_scale_weighted_sum_hand_values():
    a = {"x": torch.tensor([1.0, 2.0])}
    b = {"x": torch.tensor([10.0, 20.0])}
    assert torch.equal(S.add(a, b)["x"], torch.tensor([11.0, 22.0]))
    assert torch.equal(S.scale(a, 0.5)["x"], torch.tensor([0.5, 1.0]))
    assert torch.equal(S.weighted_sum([a, b], [2.0, 0.1])["x"], torch.tensor([3.0, 6.0]))
    with pytest.raises(S.CheckpointError, match="2 state dicts but 1 weights"):
        S.weighted_sum([a, b], [1.0])
    with pytest.raises(S.CheckpointError, match="differ in keys"):
        S.add(a, {"y": torch.zeros(2)})


def test_flatten_unflatten_round_trip_and_size_check():
    pre, _ = small()
    v = S.flatten(pre)
    assert torch.equal(v, torch.tensor([1.0, 2.0, 3.0, 4.0, 0.5, -0.5]))
    back = S.unflatten(v * 2, pre)
    assert torch.equal(back["w"], pre["w"] * 2) and torch.equal(back["b"], pre["b"] * 2)
    assert list(S.unflatten(v[4:], pre, keys=["b"])) == ["b"]
    with pytest.raises(S.CheckpointError, match="keys hold 6 entries"):
        S.unflatten(v[:5], pre)


# --- check_compatible: one test per failure, each asserting that the message names key and fix


def test_check_compatible_accepts_matching_checkpoints():
    pre, ft = small()
    S.check_compatible(pre, [ft, clones(ft)])


def test_check_compatible_names_missing_key_and_model_index():
    pre, ft = small()
    bad = clones(ft)
    del bad["b"]
    with pytest.raises(S.CheckpointError, match=r"finetuned\[1\] lacks 1 key.*'b'.*same architecture"):
        S.check_compatible(pre, [ft, bad])


def test_check_compatible_names_extra_key():
    pre, ft = small()
    bad = {**ft, "model.extra": torch.zeros(1)}
    with pytest.raises(S.CheckpointError, match=r"finetuned\[0\] has 1 key.*'model.extra'.*strip prefixes"):
        S.check_compatible(pre, [bad])


def test_check_compatible_names_shape_mismatch():
    pre, ft = small()
    bad = {**ft, "w": torch.zeros(2, 3)}
    with pytest.raises(S.CheckpointError, match=r"finetuned\[0\]\['w'\] has shape \(2, 3\).*\(2, 2\)"):
        S.check_compatible(pre, [bad])


def test_check_compatible_names_dtype_mismatch():
    pre, ft = small()
    bad = {**ft, "b": ft["b"].double()}
    with pytest.raises(S.CheckpointError, match=r"finetuned\[0\]\['b'\] is torch.float64.*cast all checkpoints"):
        S.check_compatible(pre, [bad])


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_check_compatible_names_non_finite_entry(value):
    pre, ft = small()
    bad = clones(ft)
    bad["w"][1, 0] = value
    with pytest.raises(S.CheckpointError, match=r"finetuned\[1\]\['w'\] contains NaN or inf"):
        S.check_compatible(pre, [ft, bad])
    badpre = clones(pre)
    badpre["b"][0] = value
    with pytest.raises(S.CheckpointError, match=r"pretrained\['b'\] contains NaN or inf"):
        S.check_compatible(badpre, [ft])


def test_check_compatible_huge_but_finite_values_pass():
    pre = {"x": torch.full((4,), 3e38)}
    S.check_compatible(pre, [clones(pre)])  # the float64 sum is finite; no false alarm


def test_check_compatible_rejects_non_tensor_and_bare_state_dict():
    pre, ft = small()
    with pytest.raises(S.CheckpointError, match="not a tensor"):
        S.check_compatible(pre, [{**ft, "w": [1, 2]}])
    with pytest.raises(S.CheckpointError, match="list of state dicts"):
        S.check_compatible(pre, ft)


# --- I/O


def test_safetensors_round_trip_with_metadata_is_atomic(tmp_path):
    pre, _ = small()
    shared = torch.arange(6.0)
    sd = {**pre, "view_a": shared[:3], "view_b": shared[:3], "t": torch.ones(2, 3).T}
    p = tmp_path / "sub" / "m.safetensors"
    S.save_state_dict(sd, p, metadata={"method": "ties"})
    S.save_state_dict(sd, p, metadata={"method": "ties"})  # overwrite in place works
    assert sorted(os.listdir(p.parent)) == ["m.safetensors"]  # no temp file left behind
    back = S.load_state_dict(p)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    from safetensors import safe_open

    with safe_open(str(p), "pt") as f:
        assert f.metadata()["method"] == "ties"
    assert list(back) == list(sd)  # state-dict order survives the round trip


def test_save_refuses_non_string_metadata_and_other_suffixes(tmp_path):
    pre, _ = small()
    with pytest.raises(S.CheckpointError, match="map str to str"):
        S.save_state_dict(pre, tmp_path / "a.safetensors", metadata={"k": 0.2})
    with pytest.raises(S.CheckpointError, match=r"\*\.safetensors"):
        S.save_state_dict(pre, tmp_path / "a.pt")
    assert os.listdir(tmp_path) == []


def test_load_pt_state_dict_with_weights_only(tmp_path):
    pre, _ = small()
    torch.save(pre, tmp_path / "m.pt")
    back = S.load_state_dict(tmp_path / "m.pt")
    assert all(torch.equal(back[k], pre[k]) for k in pre)
    torch.save({"state_dict": pre, "epoch": 3}, tmp_path / "wrapped.bin")
    assert list(S.load_state_dict(tmp_path / "wrapped.bin")) == list(pre)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": _Evil()}, f, protocol=2)
    with pytest.raises(S.CheckpointError, match="refused to unpickle.*arbitrary code"):
        S.load_state_dict(p)
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_load_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(S.CheckpointError, match="does not exist"):
        S.load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "m.npz").write_bytes(b"x")
    with pytest.raises(S.CheckpointError, match="unsupported checkpoint format '.npz'"):
        S.load_state_dict(tmp_path / "m.npz")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(S.CheckpointError, match="truncated or not"):
        S.load_state_dict(tmp_path / "bad.safetensors")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(S.CheckpointError, match="plain state dict"):
        S.load_state_dict(tmp_path / "list.pt")
