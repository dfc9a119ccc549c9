"""The command line: a safetensors round trip with provenance metadata, and one-line errors with status 2."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from mergebook import cli
from mergebook.methods import merge
from mergebook.models.vit import ViTConfig, VisionTransformer
from mergebook.statedict import load_state_dict, save_state_dict


@pytest.fixture
def ckpts(tmp_path):
    torch.manual_seed(0)
    m = VisionTransformer(ViTConfig(image_size=16, patch_size=8, width=32, layers=2, heads=2, output_dim=16))
    pre = {k: v.detach().clone() for k, v in m.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    fts = [{k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in pre.items()} for _ in range(3)]
    save_state_dict(pre, tmp_path / "pre.safetensors")
    paths = []
    for i, ft in enumerate(fts[:2]):
        save_state_dict(ft, tmp_path / f"ft{i}.safetensors")
        paths.append(tmp_path / f"ft{i}.safetensors")
    torch.save(fts[2], tmp_path / "ft2.pt")  # a plain .pt state dict, read with weights_only=True
    paths.append(tmp_path / "ft2.pt")
    return tmp_path, pre, fts, paths


def run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_merge_round_trip_writes_safetensors_with_method_params_and_input_hashes(ckpts, capsys):
    tmp, pre, fts, paths = ckpts
    out = tmp / "merged.safetensors"
    rc, stdout, err = run(["merge", "--method", "ties", "--pretrained", tmp / "pre.safetensors", "--finetuned", *paths,
                           "--out", out, "--param", "k=0.5", "--param", "disjoint=mean"], capsys)
    assert rc == 0, err
    assert "merged 3 models with ties" in stdout
    merged = load_state_dict(out)
    expected = merge("ties", pre, fts, k=0.5, disjoint="mean")
    assert list(merged) == list(expected) and all(torch.equal(merged[k], expected[k]) for k in expected)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["method"] == "ties"
    assert json.loads(meta["params"]) == {"k": 0.5, "disjoint": "mean", "scaling_coef": 0.3, "keys": None,
                                           "extra_zeros": 0}
    assert meta["pretrained_sha256"] == cli.sha256_file(tmp / "pre.safetensors")
    assert json.loads(meta["finetuned_sha256"]) == [cli.sha256_file(p) for p in paths]
    assert sorted(os.listdir(tmp)) == sorted(["pre.safetensors", "ft0.safetensors", "ft1.safetensors", "ft2.pt",
                                              "merged.safetensors"])


def test_merge_with_a_list_parameter_and_a_state_dict_parameter(ckpts, capsys):
    tmp, pre, fts, paths = ckpts
    rc, _, err = run(["merge", "--method", "task_wise", "--pretrained", tmp / "pre.safetensors", "--finetuned", *paths,
                      "--out", tmp / "tw.safetensors", "--param", "coefficients=[0.1, 0.2, 0.3]"], capsys)
    assert rc == 0, err
    expected = merge("task_wise", pre, fts, coefficients=[0.1, 0.2, 0.3])
    got = load_state_dict(tmp / "tw.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    mask = {k: torch.ones_like(v) for k, v in pre.items() if v.is_floating_point()}
    save_state_dict(mask, tmp / "mask.safetensors")
    rc, _, err = run(["merge", "--method", "concrete", "--pretrained", tmp / "pre.safetensors", "--finetuned", *paths,
                      "--out", tmp / "c.safetensors", "--param", f"mask={tmp / 'mask.safetensors'}"], capsys)
    assert rc == 0, err
    with safe_open(str(tmp / "c.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["params"])["mask"] == str(tmp / "mask.safetensors")
    assert meta["param_mask_sha256"] == cli.sha256_file(tmp / "mask.safetensors")


def test_methods_lists_every_method_with_parameters_defaults_and_ranges(capsys):
    rc, out, _ = run(["methods"], capsys)
    assert rc == 0
    for name in ("weight_averaging", "task_arithmetic", "ties", "cart", "layer_wise", "task_wise", "concrete",
                 "fisher", "regmean"):
        assert f"{name}:" in out
    assert "scaling_coef = 0.3 | [-10, 10]" in out and "needs: model, heads, data" in out
    rc, out, _ = run(["methods", "cart", "--json"], capsys)
    (spec,) = json.loads(out)
    assert spec["name"] == "cart" and {p["name"]: p["default"] for p in spec["params"]}["ratio"] == 0.12


@pytest.mark.parametrize("extra, message", [
    (["--method", "tie"], "unknown merge method 'tie'"),
    (["--method", "ties", "--param", "k=2"], r"'k' = 2 is out of range"),
    (["--method", "ties", "--param", "lam=0.3"], "unknown parameter 'lam'"),
    (["--method", "ties", "--param", "k"], "is not key=value"),
    (["--method", "fisher"], "the command line cannot supply"),
])
def test_merge_errors_exit_2_with_one_clear_line(ckpts, capsys, extra, message):
    tmp, _, _, paths = ckpts
    rc, _, err = run(["merge", "--pretrained", tmp / "pre.safetensors", "--finetuned", *paths,
                      "--out", tmp / "o.safetensors", *extra], capsys)
    assert rc == 2 and "Traceback" not in err
    assert err.startswith("mergebook merge: error: ") and __import__("re").search(message, err)
    assert not (tmp / "o.safetensors").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_a_malicious_pickle_checkpoint_is_refused(ckpts, capsys, monkeypatch):
    tmp, _, _, paths = ckpts
    monkeypatch.chdir(tmp)
    with open(tmp / "evil.pt", "wb") as f:
        pickle.dump({"w": _Evil()}, f, protocol=2)
    rc, _, err = run(["merge", "--method", "task_arithmetic", "--pretrained", tmp / "pre.safetensors",
                      "--finetuned", paths[0], tmp / "evil.pt", "--out", tmp / "o.safetensors"], capsys)
    assert rc == 2 and "refused to unpickle" in err and "Traceback" not in err
    assert not (tmp / "pwned_by_pickle").exists()


def test_missing_input_and_bad_output_name_exit_2(ckpts, capsys):
    tmp, _, _, paths = ckpts
    rc, _, err = run(["merge", "--method", "task_arithmetic", "--pretrained", tmp / "nope.safetensors",
                      "--finetuned", *paths, "--out", tmp / "o.safetensors"], capsys)
    assert rc == 2 and "does not exist" in err
    rc, _, err = run(["merge", "--method", "task_arithmetic", "--pretrained", tmp / "pre.safetensors",
                      "--finetuned", *paths, "--out", tmp / "o.pt"], capsys)
    assert rc == 2 and "must end in .safetensors" in err
    rc, _, err = run(["merge", "--method", "task_arithmetic", "--pretrained", tmp / "pre.safetensors",
                      "--finetuned", paths[0], "--out", tmp / "o.safetensors"], capsys)
    assert rc == 2 and "at least 2 fine-tuned models" in err


def test_parse_value_types():
    assert cli.parse_value("true") is True and cli.parse_value("None") is None
    assert cli.parse_value("3") == 3 and isinstance(cli.parse_value("3"), int)
    assert cli.parse_value("1e-3") == 1e-3 and cli.parse_value("[1, 2]") == [1, 2]
    assert cli.parse_value("sum") == "sum" and cli.parse_value("a.weight,b.weight") == "a.weight,b.weight"


def test_a_module_can_register_a_subcommand(capsys, monkeypatch):
    def setup(sub):
        p = sub.add_parser("hello")
        p.add_argument("--who", default="world")
        p.set_defaults(func=lambda args: print(f"hello {args.who}") or 0)

    monkeypatch.setitem(cli.SUBCOMMANDS, "hello", setup)
    rc, out, _ = run(["hello", "--who", "merger"], capsys)
    assert rc == 0 and out.strip() == "hello merger"


def test_console_script_exits_2_without_traceback(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "mergebook")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "mergebook.cli"]
    r = subprocess.run(cmd + ["merge", "--method", "ties", "--pretrained", str(tmp_path / "x.safetensors"),
                              "--finetuned", "a.safetensors", "b.safetensors", "--out", str(tmp_path / "o.safetensors")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
