"""Evaluation: logits through frozen heads, accuracy per task and on average, entropy and loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .models.suite import Suite, TaskData

StateDict = dict[str, torch.Tensor]


def head_logits(features: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Zero-shot-style head: L2-normalise features, then multiply by the scaled class matrix.

    A 0-dim head means the model already returns class logits (a seq2seq LM's label-word scores,
    ``models/flan_t5_lora.py``): they are multiplied by it, not normalised.
    """
    if head.dim() == 0:
        return features * head
    return F.normalize(features, dim=-1) @ head.T


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of softmax(logits), one value per row."""
    logp = logits.log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


#: Images per forward pass when evaluating. On the CPU a small batch keeps the activations in cache:
#: the miniature's full test evaluation (8 x 1000 images, 2 threads) takes 4.1 s at 128 against
#: 6.5 s at 1000 (median of 3, benchmarks/README). Accelerators want the large batch.
EVAL_BATCH = {"cpu": 128, "other": 1000}


def eval_batch_size(weight: torch.Tensor) -> int:
    """The evaluation batch for weights on ``weight``'s device (:data:`EVAL_BATCH`)."""
    return EVAL_BATCH["cpu" if weight.device.type == "cpu" else "other"]


@torch.no_grad()
def predict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], head: torch.Tensor,
    images: torch.Tensor, batch_size: int | None = None,
) -> torch.Tensor:
    """Logits of ``images`` under ``state_dict`` (weights passed functionally, model untouched).

    ``batch_size`` defaults to :func:`eval_batch_size` of the head's device.
    """
    if batch_size is None:
        batch_size = eval_batch_size(head)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    out = []
    for i in range(0, images.shape[0], batch_size):
        feats = functional_call(model, dict(state_dict), (images[i : i + batch_size],))
        out.append(head_logits(feats, head))
    return torch.cat(out)


def accuracy(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], head: torch.Tensor, data: TaskData
) -> float:
    """Top-1 accuracy in percent of one task's test set."""
    logits = predict(model, state_dict, head, data.images)
    # test data may live on the CPU while the weights sit on a GPU (paper-scale test sets)
    return 100.0 * (logits.argmax(-1).cpu() == data.labels.cpu()).float().mean().item()


def _split(suite: Suite, split: str) -> dict[str, TaskData]:
    data = {"test": suite.test, "val": suite.val}.get(split)
    if not data:
        raise ValueError(f"split {split!r} is not available in this suite; use 'test' or 'val'")
    return data


def correctness(
    suite: Suite, state_dict: Mapping[str, torch.Tensor], tasks: Sequence[str] | None = None,
    split: str = "test",
) -> dict[str, np.ndarray]:
    """Per-sample top-1 correctness (bool array, one entry per image in split order) of each task.

    Its mean is :func:`evaluate`'s accuracy; bootstrap intervals (``mergebook.experiment``) need the
    samples themselves.
    """
    tasks = list(tasks or suite.tasks)
    data = _split(suite, split)
    out = {}
    for t in tasks:
        logits = predict(suite.model, state_dict, suite.heads[t], data[t].images)
        out[t] = (logits.argmax(-1).cpu() == data[t].labels.cpu()).numpy().astype(bool)
    return out


def entropy_and_loss(
    suite: Suite, state_dict: Mapping[str, torch.Tensor], tasks: Sequence[str] | None = None,
    split: str = "test",
) -> dict[str, dict[str, np.ndarray]]:
    """Per-sample prediction entropy and cross-entropy loss (nats) of each task (AdaMerging Fig. 3)."""
    tasks = list(tasks or suite.tasks)
    data = _split(suite, split)
    out = {}
    for t in tasks:
        logits = predict(suite.model, state_dict, suite.heads[t], data[t].images)
        labels = data[t].labels.to(logits.device)
        out[t] = {"entropy": entropy(logits).cpu().double().numpy(),
                  "loss": F.cross_entropy(logits, labels, reduction="none").cpu().double().numpy()}
    return out


def evaluate(
    suite: Suite, state_dict: Mapping[str, torch.Tensor], tasks: Sequence[str] | None = None,
    split: str = "test",
) -> dict[str, float]:
    """Accuracy (%) of one merged model on each task, plus their mean under ``"avg"``.

    ``split="val"`` uses the held-out validation split (for choosing hyperparameters honestly).
    """
    tasks = list(tasks or suite.tasks)
    data = {"test": suite.test, "val": suite.val}.get(split)
    if not data:
        raise ValueError(f"split {split!r} is not available in this suite; use 'test' or 'val'")
    res = {t: accuracy(suite.model, state_dict, suite.heads[t], data[t]) for t in tasks}
    res["avg"] = sum(res[t] for t in tasks) / len(tasks)
    return res
