"""The *Suite*: everything a merging experiment needs, behind one interface for every backend."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

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

    def fingerprint(self) -> str:
        """What :func:`mergebook.results.cached_result` keys this suite on (the profile if none set)."""
        return str(self.meta.get("fingerprint", self.profile))

    def derived(self, **changes) -> "Suite":
        """A copy whose ``meta["fingerprint"]`` also records ``changes`` (JSON-able), for variants
        of this suite (a task subset, corrupted test images) that must not share its cache entries."""
        blob = json.dumps({"base": self.fingerprint(), **changes}, sort_keys=True, default=str)
        meta = dict(self.meta)
        meta["fingerprint"] = hashlib.sha256(blob.encode()).hexdigest()[:16]
        meta.setdefault("derived_from", self.fingerprint())
        return replace(self, meta=meta)

    def subset(self, tasks) -> "Suite":
        """The same suite restricted to ``tasks`` (in that order): their fine-tuned weights, heads,
        test/val splits, class names and the per-task entries of ``meta``; a distinct cache key.

        Merging methods take ``suite.tasks`` and ``suite.finetuned_list()``, so a subset merges only
        those tasks' vectors and adapts on only their unlabelled test images.
        """
        tasks = list(tasks)
        missing = [t for t in tasks if t not in self.tasks]
        if missing or not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"subset: tasks must be distinct tasks of this suite {self.tasks}, got {tasks}")
        keep = set(self.tasks)
        meta = {k: ({t: v[t] for t in tasks if t in v} if isinstance(v, dict) and v and set(v) == keep else v)
                for k, v in self.meta.items()}
        sub = replace(self, tasks=tasks, finetuned={t: self.finetuned[t] for t in tasks},
                      heads={t: self.heads[t] for t in tasks}, test={t: self.test[t] for t in tasks},
                      val={t: self.val[t] for t in tasks if t in self.val},
                      class_names={t: self.class_names[t] for t in tasks if t in self.class_names}, meta=meta)
        return sub if tasks == self.tasks else sub.derived(tasks=tasks)
