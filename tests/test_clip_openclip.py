"""The open_clip backend, offline: open_clip_torch and torchvision go into a throwaway folder.

The book's environment must stay free of torchvision (transformers would import it and fail: its
PyPI wheels are CUDA builds). So this test installs open_clip_torch and torchvision from the local
package registry into a temporary ``--target`` folder and runs the backend in a subprocess with it
on ``sys.path``. It skips, saying why, when the registry cannot provide them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent('''
    import sys, json, torch
    from mergebook import layout as L
    from mergebook.models import clip_openclip as C
    from mergebook.profiles import Profile
    from mergebook.statedict import save_state_dict
    oc = C.import_open_clip()
    assert "torchvision" in sys.modules
    ref = oc.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
    torch.manual_seed(0)
    paths = {}
    for i, t in enumerate(["MNIST", "EuroSAT"]):
        sd = {k: v + 0.01 * torch.randn_like(v) for k, v in ref.visual.state_dict().items()}
        paths[t] = sys.argv[1] + f"/{t}.safetensors"
        save_state_dict(sd, paths[t])
    prof = Profile(name="oc-test", backend="open_clip", tasks=["MNIST", "EuroSAT"], description="test",
                   model_id="openai/clip-vit-base-patch32")
    torch.manual_seed(0)  # create_model(pretrained=None) draws the same random weights again
    suite = C.load_suite(prof, finetuned_paths=paths, pretrained=None, with_data=False)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.manual_seed(0)
        ref2 = oc.create_model("ViT-B-32-quickgelu", pretrained=None).eval()
        err = float((torch.func.functional_call(suite.model, suite.pretrained, (x,)) - ref2.encode_image(x)).abs().max())
        tok = oc.get_tokenizer("ViT-B-32-quickgelu")
        e = torch.nn.functional.normalize(ref2.encode_text(tok(['a photo of the number: "0".'])).float(), dim=-1)[0]
        head0 = suite.heads["MNIST"][0] / ref2.logit_scale.exp()
    print(json.dumps({"n": len(suite.pretrained), "err": err, "text_numel": suite.meta["openclip_text_numel"],
                      "expected_text": L.openclip_text_numel(49408, 77, 512, 512),
                      "head_err": float((head0 - e / e.norm()).abs().max()),
                      "ft_equal": bool(torch.equal(suite.finetuned["EuroSAT"]["proj"],
                                                   __import__("mergebook.statedict", fromlist=["x"]).load_state_dict(paths["EuroSAT"])["proj"]))}))
''')


@pytest.fixture(scope="module")
def openclip_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("openclip-site")
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", "--target",
           str(site), "open_clip_torch", "torchvision==0.28.0", "ftfy", "timm"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"open_clip_torch/torchvision are not installable here: {proc.stderr.strip()[-300:]}")
    return site


def test_open_clip_backend_matches_open_clip_and_builds_task_vectors_heads(openclip_site, tmp_path):
    import json

    env = {**os.environ, "PYTHONPATH": str(openclip_site), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["n"] == 152  # open_clip's ViT-B/32 visual tower, as AdaMerging's layer count
    assert out["err"] < 1e-4  # the library's ViT runs open_clip's weights
    assert out["text_numel"] == out["expected_text"] == 25_599_489  # Ties' whole-CLIP population
    assert out["head_err"] < 1e-5 and out["ft_equal"]
