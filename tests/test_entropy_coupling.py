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
