"""The *Suite*: everything a merging experiment needs, behind one interface for every backend."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

StateDict = dict[str, torch.Tensor]


@dataclass
class TaskData:
    """Labelled images of one task (the unlabelled view feeds test-time adaptation)."""

    images: torch.Tensor  # float32 [N, C, H, W], already normalised for the encoder
    labels: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def sample(self, n: int, seed: int = 0) -> "TaskData":
        """``n`` examples drawn without replacement by a seeded permutation (all of them if ``n`` ≥ N).

        Hub splits can be sorted by class, so "the first n" may hold one class only; Fisher and
        RegMean statistics take this sample instead.
        """
        if n >= len(self):
            return self
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n].sort().values
        return TaskData(self.images[idx.to(self.images.device)], self.labels[idx.to(self.labels.device)])


@dataclass
class Suite:
    """A frozen encoder architecture, its pretrained and fine-tuned weights, heads and test data.

    ``model`` only supplies the architecture: merged weights are passed to it with
    ``torch.func.functional_call``, so no model copies are made. ``heads[task]`` is a frozen
    ``[num_classes, dim]`` matrix with the logit scale folded in; logits are
    ``normalize(features) @ head.T`` (zero bias), exactly like the task_vectors zero-shot heads.
    """

    profile: str
    tasks: list[str]
    model: nn.Module
    pretrained: StateDict
    finetuned: dict[str, StateDict]
    heads: dict[str, torch.Tensor]
    test: dict[str, TaskData]
    class_names: dict[str, list[str]] = field(default_factory=dict)
    val: dict[str, TaskData] = field(default_factory=dict)  # held-out split for choosing λ, k, ...
    meta: dict = field(default_factory=dict)

    def finetuned_list(self) -> list[StateDict]:
        """Fine-tuned state dicts in task order."""
        return [self.finetuned[t] for t in self.tasks]

    def unlabeled(self, task: str) -> torch.Tensor:
        """The test images of ``task`` without labels (what test-time adaptation may use)."""
        return self.test[task].images
