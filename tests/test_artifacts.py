"""The artifact cache: atomic writes, integrity checks, rebuilding corrupt or stale entries."""

import json

import pytest
import torch

from mergebook import artifacts


@pytest.fixture
def cache(tmp_path):
    return artifacts.Cache("unit", root=tmp_path)


def _builder(calls, value):
    def build():
        calls.append(1)
        return value
    return build


def test_second_call_reuses_the_entry(cache):
    calls = []
    value = {"w": torch.arange(6.0).view(2, 3)}
    a = cache.tensors("m", "k1", _builder(calls, value))
    b = cache.tensors("m", "k1", _builder(calls, value))
    assert len(calls) == 1
    torch.testing.assert_close(a["w"], b["w"])


def test_a_corrupt_tensor_entry_is_rebuilt_not_trusted(cache):
    calls = []
    value = {"w": torch.ones(4)}
    cache.tensors("m", "k1", _builder(calls, value))
    path = cache.path("m", "k1", ".safetensors")
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # flip bits in the tensor payload: still parseable, silently wrong
    path.write_bytes(bytes(raw))
    out = cache.tensors("m", "k1", _builder(calls, {"w": torch.full((4,), 2.0)}))
    assert len(calls) == 2
    torch.testing.assert_close(out["w"], torch.full((4,), 2.0))
    # and the rebuilt entry is intact and trusted next time
    cache.tensors("m", "k1", _builder(calls, value))
    assert len(calls) == 2


def test_a_truncated_entry_without_checksum_is_rebuilt(cache):
    calls = []
    cache.tensors("m", "k1", _builder(calls, {"w": torch.ones(4)}))
    path = cache.path("m", "k1", ".safetensors")
    path.write_bytes(path.read_bytes()[:10])  # an interrupted copy
    path.with_name(path.name + ".sha256").unlink()
    cache.tensors("m", "k1", _builder(calls, {"w": torch.ones(4)}))
    assert len(calls) == 2


def test_json_entries_are_checked_too(cache):
    calls = []
    cache.json("r", "k", _builder(calls, {"acc": 91.5}))
    path = cache.path("r", "k", ".json")
    path.write_text(json.dumps({"acc": 12.0}))  # tampered
    assert cache.json("r", "k", _builder(calls, {"acc": 91.5})) == {"acc": 91.5}
    assert len(calls) == 2


def test_an_interrupted_write_leaves_no_entry(cache, tmp_path):
    def build():
        return {"w": torch.ones(2)}

    target = cache.path("m", "k", ".safetensors")

    def failing_write(tmp):
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        artifacts.atomic_write(target, failing_write)
    assert not target.exists()
    assert not list(target.parent.glob("*.tmp"))


def test_keys_change_with_config_and_code():
    import mergebook.plotting as a_module

    k1 = artifacts.make_key({"lr": 1e-3})
    assert k1 == artifacts.make_key({"lr": 1e-3})
    assert k1 != artifacts.make_key({"lr": 2e-3})
    assert k1 != artifacts.make_key({"lr": 1e-3}, [a_module])


def test_json_entries_keep_key_order(cache):
    value = {"shapes": 1.0, "digits": 2.0, "avg": 1.5}
    cache.json("r", "k", lambda: value)
    again = cache.json("r", "k", lambda: {"never": 0})
    assert list(again) == ["shapes", "digits", "avg"]


def test_write_study_writes_frame_and_completed_record(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"task": ["a", "b"], "acc": [91.5, 62.25]})
    record = artifacts.write_study(tmp_path / "studies", "demo", frame, {"command": "python demo.py", "seed": 3,
                                                                          "date": "2026-01-02"})
    back = pd.read_csv(tmp_path / "studies" / "demo.csv")
    assert list(back.columns) == ["task", "acc"]          # no index column
    assert back["acc"].tolist() == [91.5, 62.25]
    written = json.loads((tmp_path / "studies" / "demo.json").read_text())
    assert written == record
    assert written["seed"] == 3 and written["date"] == "2026-01-02"   # a given date is kept
    assert written["device"].startswith("cpu (") and f"torch {torch.__version__}" in written["device"]
    assert not list((tmp_path / "studies").glob(".*.tmp"))             # no temp files left behind


def test_write_study_refuses_a_record_without_its_command(tmp_path):
    import pandas as pd

    with pytest.raises(ValueError, match="needs the 'command'"):
        artifacts.write_study(tmp_path, "demo", pd.DataFrame({"x": [1]}), {"seed": 0})
    assert not (tmp_path / "demo.csv").exists()
