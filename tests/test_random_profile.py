"""The true-shape random profiles (GPU benchmarks): real sizes, random weights, no network."""

import pytest
import torch

from mergebook.evaluate import evaluate
from mergebook.models import random_clip
from mergebook.profiles import Profile, get_profile
from mergebook.statedict import layer_names


@pytest.mark.slow
def test_random_b32_suite_has_the_original_152_layers_and_runs():
    prof = Profile(name="random-b32-test", backend="random", tasks=["MNIST", "SVHN"], description="test")
    suite = random_clip.load_suite(prof, arch="ViT-B/32", n_test=2, n_val=2)
    assert len(layer_names(suite.pretrained)) == 152
    assert sum(v.numel() for v in suite.pretrained.values()) == 87_849_216
    tv = suite.finetuned["MNIST"]["transformer.resblocks.0.mlp.c_fc.weight"] - \
        suite.pretrained["transformer.resblocks.0.mlp.c_fc.weight"]
    assert 0 < float(tv.abs().mean()) < 1e-3 * float(suite.pretrained["transformer.resblocks.0.mlp.c_fc.weight"].abs().mean()) * 2
    acc = evaluate(suite, suite.pretrained)
    assert set(acc) == {"MNIST", "SVHN", "avg"}
    assert get_profile("random-l14").load_kw == {"arch": "ViT-L/14"}


def test_unknown_architecture_is_an_error_listing_the_known_ones():
    prof = Profile(name="x", backend="random", tasks=["MNIST"], description="test")
    with pytest.raises(ValueError, match="ViT-B/32, ViT-B/16, ViT-L/14"):
        random_clip.load_suite(prof, arch="ViT-H/14")
