"""The test-time adaptation engine shared by AdaMerging, Concrete subspace learning and CART++.

Every adaptive method in the book merges

    θ_l = θ_base,l + s_l ⊙ Σ_k λ_{l,k} v_{k,l}        (AdaMerging Sec. 3.2.1; Concrete Eq. 2)

with θ_base = θ_pre (AdaMerging, Concrete) or θ_avg (CART++, Eq. 6), v_k the task vectors (original,
Ties-trimmed, or CART's low-rank centered ones), λ task-wise ([K]) or layer-wise ([L, K], one layer
per floating-point tensor, as in the AdaMerging code) and s an optional per-element scale (the
Concrete mask m / mean(m)). It then minimises the Shannon entropy of each task's predictions on
unlabelled test batches (AdaMerging Sec. 3.2.2).

How this module avoids the pitfalls of the original loops:

* No model copies. θ_base and the K vectors are held once, as tensors; the merged weights are
  built inside the autograd graph and passed to the frozen architecture with
  ``torch.func.functional_call``.
* One contraction per group of same-shaped tensors. The K vectors of every tensor are stacked once
  into ``[G, K, n]`` blocks (all tensors of one shape together, e.g. the 12 ``c_fc.weight`` of a
  ViT-B), so a merge is a handful of batched matmuls, not L × K scaled adds.
* Merge once per step; one forward of the K task batches concatenated (ViTs have no cross-sample
  layers, so this is exact), split per task for the heads; one backward over the summed loss (never
  K retained graphs, the cause of AdaMerging's growing memory).
* Batches come from tensors moved to the device once, shuffled by a seeded ``torch.Generator``;
  nothing is reloaded per step. Same seed, same history (bit for bit on CPU).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.func import functional_call

from .artifacts import atomic_write, sha256_file
from .evaluate import entropy, evaluate, head_logits
from .models.suite import Suite, TaskData

StateDict = dict[str, torch.Tensor]
Granularity = Literal["task", "layer"]

__all__ = [
    "AdaptationResult",
    "CoefficientAdapter",
    "History",
    "MergeSpace",
    "TaskStreams",
    "adapt_coefficients",
    "clamp_coefficients",
    "entropy_objective",
    "home_weights",
    "init_coefficients",
    "resolve_device",
    "supervised_coefficients",
]


# Largest total size (bytes) of images moved to the device up front; beyond it, batches are copied.
STAGE_BUDGET = 2 << 30


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None -> CUDA when available, else CPU; anything else as given."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ----------------------------------------------------------------------------------------------
# The merge space: θ_base, the stacked vectors, and the merge θ(λ, s)
# ----------------------------------------------------------------------------------------------


@dataclass
class _Group:
    """All merged tensors of one shape and dtype, stacked so that one bmm merges them all."""

    keys: list[str]
    shape: tuple[int, ...]
    layer_index: torch.Tensor  # long [G]: which row of the [L, K] coefficient matrix
    base: torch.Tensor  # [G, n]
    vectors: torch.Tensor  # [G, K, n]


class MergeSpace:
    """θ_base plus K vectors, stacked once, merged as θ = θ_base + s ⊙ Σ_k λ_k v_k (AdaMerging §3.2.1).

    ``keys`` are the merged tensors ("layers", in ``base`` order); by default every key of
    ``vectors[0]``, so whoever built the vectors decides which keys count. Every other entry of
    ``base`` (integer buffers, excluded keys) passes through unchanged.
    """

    def __init__(
        self,
        base: Mapping[str, torch.Tensor],
        vectors: Sequence[Mapping[str, torch.Tensor]],
        keys: Sequence[str] | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        vector_dtype: torch.dtype | None = None,
    ):
        if not vectors:
            raise ValueError("MergeSpace needs at least one vector")
        wanted = set(keys if keys is not None else vectors[0].keys())
        missing = wanted - set(base)
        if missing:
            raise KeyError(f"keys not in the base state dict: {sorted(missing)[:5]}")
        self.keys: list[str] = [k for k in base if k in wanted]
        self.num_tasks = len(vectors)
        for i, v in enumerate(vectors):
            for k in self.keys:
                if k not in v:
                    raise KeyError(f"vector {i} lacks key {k!r}")
        dev = torch.device(device) if device is not None else next(iter(base.values())).device
        self.device = dev
        self.passthrough: StateDict = {k: v.to(dev) for k, v in base.items() if k not in wanted}

        # Group same-shaped tensors, in order of first appearance, so the merge is one bmm each.
        by_sig: dict[tuple, list[int]] = {}
        for i, k in enumerate(self.keys):
            t = base[k]
            if not t.is_floating_point():
                raise TypeError(f"cannot merge non-float tensor {k!r} ({t.dtype})")
            by_sig.setdefault((tuple(t.shape), dtype or t.dtype), []).append(i)
        self.groups: list[_Group] = []
        for (shape, dt), idx in by_sig.items():
            n = math.prod(shape)
            gkeys = [self.keys[i] for i in idx]
            b = torch.empty((len(idx), n), device=dev, dtype=dt)
            # vector_dtype=torch.bfloat16 halves the K-fold part of the memory (ViT-L/14 x 8 tasks:
            # 9.7 GB in fp32); θ_base stays in its own precision.
            vec = torch.empty((len(idx), self.num_tasks, n), device=dev, dtype=vector_dtype or dt)
            # Copy key by key: with lazy vectors (statedict.TaskVectorView) the peak is the stacked
            # block plus one tensor, never K full task vectors.
            for g, k in enumerate(gkeys):
                b[g].copy_(base[k].reshape(-1))
                for t, v in enumerate(vectors):
                    x = v[k]
                    if tuple(x.shape) != shape:
                        raise ValueError(f"vector {t}[{k!r}] has shape {tuple(x.shape)}, base has {shape}")
                    vec[g, t].copy_(x.reshape(-1))
            self.groups.append(
                _Group(gkeys, shape, torch.tensor(idx, device=dev, dtype=torch.long), b, vec)
            )
        self.dtype = self.groups[0].base.dtype

    @property
    def num_layers(self) -> int:
        """L: one layer per merged tensor."""
        return len(self.keys)

    def coefficient_matrix(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Task-wise [K] -> [L, K] (a broadcast view); layer-wise [L, K] as is."""
        L, K = self.num_layers, self.num_tasks
        if coefficients.shape == (K,):
            return coefficients.unsqueeze(0).expand(L, K)
        if coefficients.shape == (L, K):
            return coefficients
        raise ValueError(f"coefficients must be [{K}] or [{L}, {K}], got {tuple(coefficients.shape)}")

    def deltas(self, coefficients: torch.Tensor) -> list[torch.Tensor]:
        """Σ_k λ_{l,k} v_{k,l} for every group ([G, n] each), differentiable in λ."""
        lam = self.coefficient_matrix(coefficients)
        # [G, 1, K] @ [G, K, n]: one batched matmul per shape group, no [K, n] temporaries.
        return [torch.bmm(lam.index_select(0, g.layer_index).unsqueeze(1).to(g.vectors.dtype),
                          g.vectors).squeeze(1).to(g.base.dtype)
                for g in self.groups]

    def assemble(
        self, deltas: Sequence[torch.Tensor], scales: Sequence[torch.Tensor] | None = None
    ) -> StateDict:
        """θ = θ_base + s ⊙ delta, split back into named tensors (views, no copies)."""
        out: StateDict = dict(self.passthrough)
        for i, (g, d) in enumerate(zip(self.groups, deltas)):
            # The mask is shared by all tasks, so s ⊙ Σ_k λ_k v_k = Σ_k λ_k (s ⊙ v_k): one multiply.
            theta = g.base + (d if scales is None else scales[i] * d)
            for k, t in zip(g.keys, theta.unbind(0)):
                out[k] = t.view(g.shape)
        return out

    def merge(
        self, coefficients: torch.Tensor, scales: Sequence[torch.Tensor] | None = None
    ) -> StateDict:
        """Merged state dict θ(λ, s) (AdaMerging §3.2.1, Concrete Eq. 2), inside the autograd graph."""
        return self.assemble(self.deltas(coefficients), scales)

    # Group-shaped helpers for per-element quantities (Concrete mask logits and samples).
    def group_zeros(self, dtype: torch.dtype | None = None) -> list[torch.Tensor]:
        """One zero tensor [G, n] per group (e.g. mask logits, one per element of every vector)."""
        return [torch.zeros_like(g.base, dtype=dtype or g.base.dtype) for g in self.groups]

    def ungroup(self, tensors: Sequence[torch.Tensor]) -> StateDict:
        """Group-shaped tensors -> one named tensor per key (views)."""
        out: StateDict = {}
        for g, t in zip(self.groups, tensors):
            for k, row in zip(g.keys, t.unbind(0)):
                out[k] = row.view(g.shape)
        return out

    def regroup(self, named: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Named tensors -> group-shaped tensors (copies), the inverse of :meth:`ungroup`."""
        return [torch.stack([named[k].reshape(-1) for k in g.keys]).to(g.base) for g in self.groups]



def check_schedule(where: str, *, lrs: Mapping[str, float] | None = None, steps: Mapping[str, int] | None = None,
                   at_least_one: Mapping[str, int] | None = None) -> None:
    """Raise a ValueError naming ``where`` and the parameter when a learning rate is not a positive
    finite number, a step count is not an integer >= 0, or a count in ``at_least_one`` is below 1.

    Adam takes a NaN, infinite or negative lr without complaint and returns NaN or diverging
    coefficients, so every adaptive method checks its schedule here before it touches the data.
    """
    for name, v in (lrs or {}).items():
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        if not ok:
            raise ValueError(f"{where}: {name} must be a positive finite learning rate, got {v!r}")
    for name, v in (steps or {}).items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{where}: {name} must be an integer >= 0, got {v!r}")
    for name, v in (at_least_one or {}).items():
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{where}: {name} must be an integer >= 1, got {v!r}")


def clamp_coefficients(coefficients: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """λ clamped to [0, 1] as in the AdaMerging forward; gradient is zero outside only when on."""
    # torch.clamp passes gradient on [0, 1] inclusive and blocks it outside, like the original.
    return coefficients.clamp(0.0, 1.0) if clamp else coefficients


def init_coefficients(
    space: MergeSpace, granularity: Granularity = "layer", init: float = 0.3
) -> torch.Tensor:
    """A fresh leaf λ filled with ``init``: [K] task-wise or [L, K] layer-wise (AdaMerging §3.2.1)."""
    if granularity == "task":
        shape: tuple[int, ...] = (space.num_tasks,)
    elif granularity == "layer":
        shape = (space.num_layers, space.num_tasks)
    else:
        raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    return torch.full(shape, float(init), device=space.device, dtype=space.dtype, requires_grad=True)


# ----------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------


def entropy_objective(
    model: nn.Module,
    params: Mapping[str, torch.Tensor],
    heads: Sequence[torch.Tensor],
    batches: Sequence[Sequence[torch.Tensor]],
    *,
    concat: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k Σ_b mean_x H(softmax(head_k(f_θ(x)))) over task k's batches b (AdaMerging §3.2.2).

    ``batches[k]`` holds task k's batches for this step (one in FusionBench, two in the AdaMerging
    loop, each contributing its own batch mean). Returns the loss and, detached, each task's mean
    entropy over its images this step.
    """
    flat = [b for task in batches for b in task]
    sizes = [b.shape[0] for b in flat]
    device_type = flat[0].device.type

    def encode(x: torch.Tensor) -> torch.Tensor:
        if autocast_dtype is None:
            return functional_call(model, dict(params), (x,))
        with torch.autocast(device_type, dtype=autocast_dtype):
            return functional_call(model, dict(params), (x,))

    if concat:
        # One forward of every task's images: the weights are read once per step, not K times.
        feats = encode(torch.cat(flat)).split(sizes)
    else:
        feats = [encode(b) for b in flat]
    loss = feats[0].new_zeros((), dtype=heads[0].dtype)
    per_task = []
    i = 0
    for k, task in enumerate(batches):
        ent_sum = feats[0].new_zeros((), dtype=heads[0].dtype)
        n = 0
        for _ in task:
            h = entropy(head_logits(feats[i].to(heads[k].dtype), heads[k]))
            loss = loss + h.mean()
            ent_sum = ent_sum + h.detach().sum()
            n += h.shape[0]
            i += 1
        per_task.append(ent_sum / n)
    return loss, torch.stack(per_task)


# ----------------------------------------------------------------------------------------------
# Data: per-task tensors prepared once, fixed-seed shuffling
# ----------------------------------------------------------------------------------------------


class TaskStreams:
    """Endless shuffled batches of each task's unlabelled test images (prepared once, seeded)."""

    def __init__(
        self,
        images: Sequence[torch.Tensor],
        batch_size: int = 16,
        seed: int = 0,
        device: str | torch.device | None = None,
        stage_budget: int = STAGE_BUDGET,
    ):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        dev = torch.device(device) if device is not None else images[0].device
        self.device = dev
        # Prepared once (the original loops rebuilt a DataLoader every step): on the device when
        # all tasks fit in ``stage_budget`` bytes, else kept on the host and copied per batch
        # (the paper-scale test sets are ~13 GB even as uint8).
        stage = sum(x.numel() * x.element_size() for x in images) <= stage_budget
        self.images = [x.to(dev) if stage else x for x in images]
        self.batch_size = batch_size
        # One CPU generator per task, so tasks' streams do not depend on each other's sizes.
        self._gens = [torch.Generator().manual_seed(_mix(seed, k)) for k in range(len(images))]
        self._perm: list[torch.Tensor] = [torch.empty(0, dtype=torch.long)] * len(images)
        self._pos = [0] * len(images)

    def next(self, task: int) -> torch.Tensor:
        """The next batch of task ``task``; a fresh permutation per epoch, partial tails dropped."""
        n = self.images[task].shape[0]
        bs = min(self.batch_size, n)
        if self._pos[task] + bs > self._perm[task].numel():
            # Drawn on the CPU generator (same stream on every device), moved once per epoch.
            perm = torch.randperm(n, generator=self._gens[task])
            self._perm[task] = perm.to(self.images[task].device)
            self._pos[task] = 0
        idx = self._perm[task][self._pos[task] : self._pos[task] + bs]
        self._pos[task] += bs
        return self.images[task].index_select(0, idx).to(self.device, non_blocking=True)

    def step(self, batches_per_step: int = 1) -> list[list[torch.Tensor]]:
        """``batches_per_step`` batches of every task, task by task."""
        return [[self.next(k) for _ in range(batches_per_step)] for k in range(len(self.images))]


def _mix(seed: int, k: int) -> int:
    """A stable 63-bit seed per (seed, stream): independent streams, reproducible across runs."""
    h = hashlib.sha256(f"{seed}/{k}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def derived_generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded from (seed, name): each random stream of a run is separate."""
    g = torch.Generator(device=device)
    g.manual_seed(_mix(seed, hash_name(name)))
    return g


def hash_name(name: str) -> int:
    """A stable integer from a string (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")


# ----------------------------------------------------------------------------------------------
# One adaptation step over λ
# ----------------------------------------------------------------------------------------------


class CoefficientAdapter:
    """Adam on merge coefficients λ under the entropy objective (AdaMerging §3.2; Concrete Alg. 3)."""

    def __init__(
        self,
        model: nn.Module,
        space: MergeSpace,
        heads: Sequence[torch.Tensor],
        *,
        granularity: Granularity = "layer",
        init: float = 0.3,
        clamp: bool = True,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        scales: Sequence[torch.Tensor] | None = None,
        concat: bool = True,
        autocast_dtype: torch.dtype | None = None,
    ):
        self.model, self.space = model, space
        self.heads = [h.to(space.device) for h in heads]
        self.granularity, self.clamp = granularity, clamp
        self.scales = None if scales is None else [s.detach() for s in scales]
        self.concat, self.autocast_dtype = concat, autocast_dtype
        self.raw = init_coefficients(space, granularity, init)
        self.optimizer = torch.optim.Adam([self.raw], lr=lr, betas=betas)

    def coefficients(self) -> torch.Tensor:
        """λ as used in the forward (clamped when on), detached."""
        return clamp_coefficients(self.raw.detach(), self.clamp)

    def state_dict(self) -> StateDict:
        """The merged weights at the current λ (no graph)."""
        with torch.no_grad():
            return self.space.merge(self.coefficients(), self.scales)

    def step(self, batches: Sequence[Sequence[torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge once, one forward of all tasks, one backward, one Adam step; (loss, per-task H)."""
        params = self.space.merge(clamp_coefficients(self.raw, self.clamp), self.scales)
        loss, per_task = entropy_objective(
            self.model, params, self.heads, batches,
            concat=self.concat, autocast_dtype=self.autocast_dtype,
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach(), per_task


# ----------------------------------------------------------------------------------------------
# Run records
# ----------------------------------------------------------------------------------------------


@dataclass
class History:
    """Step-by-step record of one adaptation phase, so chapters plot trajectories without reruns.

    ``entropy[i]`` is the objective optimised at step i (computed before update i+1);
    ``task_entropy[i][k]`` is task k's mean entropy over its images at that step. Snapshots at
    step s (``coefficient_steps``, ``eval_steps``) are taken after s updates; step 0 and the last
    step are always recorded. ``extra`` holds per-step series of a method (e.g. the inner-loop
    entropy of Concrete meta-learning, the mask's kept fraction).
    """

    tasks: list[str]
    entropy: list[float] = field(default_factory=list)
    task_entropy: list[list[float]] = field(default_factory=list)
    coefficient_steps: list[int] = field(default_factory=list)
    coefficients: list[torch.Tensor] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    accuracy: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)

    def coefficient_tensor(self) -> torch.Tensor:
        """Snapshots stacked: [S, K] or [S, L, K]."""
        if not self.coefficients:
            return torch.empty(0)
        return torch.stack(self.coefficients)

    def average_accuracy(self) -> list[float]:
        """The average accuracy at each eval step."""
        return [a["avg"] for a in self.accuracy]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able view; coefficient snapshots as nested lists (exact copies go to the tensor file)."""
        return {
            "tasks": list(self.tasks),
            "entropy": list(self.entropy),
            "task_entropy": [list(r) for r in self.task_entropy],
            "coefficient_steps": list(self.coefficient_steps),
            "coefficients": [c.double().tolist() for c in self.coefficients],
            "eval_steps": list(self.eval_steps),
            "accuracy": [dict(a) for a in self.accuracy],
            "extra": {k: list(v) for k, v in self.extra.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], coefficients: torch.Tensor | None = None) -> History:
        """Inverse of :meth:`to_dict` (with the stacked snapshots from the tensor file)."""
        if coefficients is not None and coefficients.numel():
            coefs = list(coefficients.unbind(0))
        else:  # JSON only: float32 snapshots survive the round trip through float64 lists exactly
            coefs = [torch.tensor(c, dtype=torch.float32) for c in d.get("coefficients", [])]
        return cls(
            tasks=list(d["tasks"]), entropy=list(d["entropy"]),
            task_entropy=[list(r) for r in d["task_entropy"]],
            coefficient_steps=list(d["coefficient_steps"]), coefficients=coefs,
            eval_steps=list(d["eval_steps"]), accuracy=[dict(a) for a in d["accuracy"]],
            extra={k: list(v) for k, v in d.get("extra", {}).items()},
        )


class Recorder:
    """Fills a History and drives the progress bar; syncs with the device only at record points."""

    def __init__(
        self,
        suite: Suite,
        steps: int,
        *,
        coef_every: int = 10,
        eval_every: int = 100,
        progress: bool = True,
        desc: str = "adapt",
        eval_suite: Suite | None = None,
    ):
        from tqdm import tqdm  # console bars: tqdm.auto warns without ipywidgets in the book's kernels

        self.history = History(tasks=list(suite.tasks))
        self.suite = eval_suite or suite
        self.steps = steps
        # eval_every <= 0: evaluate at the final step only (a run whose caller scores it itself)
        self.coef_every, self.eval_every = max(1, coef_every), int(eval_every)
        self._pending: list[tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []
        self._last_acc: float | None = None
        self.bar = tqdm(total=steps, desc=desc, disable=not progress, dynamic_ncols=True)

    def snapshot(
        self,
        step: int,
        coefficients: Callable[[], torch.Tensor] | None,
        state_dict: Callable[[], Mapping[str, torch.Tensor]] | None,
    ) -> None:
        """Record coefficients / accuracy at ``step`` (after ``step`` updates) when due."""
        last = step == self.steps
        if coefficients is not None and (step % self.coef_every == 0 or last):
            self.history.coefficient_steps.append(step)
            self.history.coefficients.append(coefficients().detach().to("cpu", copy=True))
        if state_dict is not None and ((self.eval_every > 0 and step % self.eval_every == 0) or last):
            self._flush()
            with torch.no_grad():
                acc = evaluate(self.suite, state_dict())
            self.history.eval_steps.append(step)
            self.history.accuracy.append(acc)
            self._last_acc = acc["avg"]
            self._postfix(step)

    def log(self, loss: torch.Tensor, per_task: torch.Tensor, **extra: torch.Tensor) -> None:
        """Queue one step's objective (detached tensors; converted in bulk to avoid per-step syncs)."""
        self._pending.append((loss.detach(), per_task.detach(), {k: v.detach() for k, v in extra.items()}))
        self.bar.update(1)
        if len(self._pending) >= self.coef_every:
            self._flush()
            self._postfix(len(self.history.entropy))

    def _flush(self) -> None:
        if not self._pending:
            return
        losses = torch.stack([p[0] for p in self._pending]).double().cpu().tolist()
        per_task = torch.stack([p[1] for p in self._pending]).double().cpu().tolist()
        self.history.entropy.extend(losses)
        self.history.task_entropy.extend(per_task)
        for name in self._pending[0][2]:
            vals = torch.stack([p[2][name] for p in self._pending]).double().cpu().tolist()
            self.history.extra.setdefault(name, []).extend(vals)
        self._pending.clear()

    def _postfix(self, step: int) -> None:
        post: dict[str, Any] = {"step": step}
        if self.history.entropy:
            post["H"] = f"{self.history.entropy[-1]:.4f}"
        if self._last_acc is not None:
            post["acc"] = f"{self._last_acc:.2f}"
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> History:
        """Flush the queue, close the bar, return the history."""
        self._flush()
        self.bar.close()
        return self.history


def suite_on(suite: Suite, device: torch.device, stage_budget: int = STAGE_BUDGET) -> Suite:
    """The suite with heads (and test data, if within ``stage_budget`` bytes) on ``device``.

    Moved once per run, for evaluation during it. Larger test sets stay on the host: the paper
    backends' encoders move each evaluation batch to the weights' device themselves.
    """
    heads = {t: h.to(device) for t, h in suite.heads.items()}
    size = sum(d.images.numel() * d.images.element_size() for d in suite.test.values())
    test = suite.test
    if size <= stage_budget:
        test = {t: TaskData(d.images.to(device), d.labels.to(device)) for t, d in suite.test.items()}
    return replace(suite, heads=heads, test=test)


# ----------------------------------------------------------------------------------------------
# The result of a run
# ----------------------------------------------------------------------------------------------


@dataclass
class AdaptationResult:
    """What an adaptive merge produced: final λ, its history (and phases), config, accuracy."""

    method: str
    tasks: list[str]
    keys: list[str]
    granularity: str  # "task", "layer" or "none" (Concrete TA trains only the mask)
    coefficients: torch.Tensor  # final λ as used in the forward: [K] or [L, K]
    history: History
    config: dict[str, Any] = field(default_factory=dict)
    phases: dict[str, History] = field(default_factory=dict)  # earlier phases, e.g. {"meta": ...}
    accuracy: dict[str, float] = field(default_factory=dict)  # final, on the labelled test set
    mask_logits: StateDict | None = None  # Concrete: one logit per element, shared by tasks
    mask_sample: StateDict | None = None  # Concrete: the frozen sample in the final weights
    mask_stats: dict[str, Any] | None = None
    seconds: float = 0.0
    # The final merged weights, on the device of the suite's pretrained weights. Only these are
    # kept, not the (K + 1)-model MergeSpace, so finished results do not pin device memory.
    _weights: StateDict | None = field(default=None, repr=False, compare=False)

    def state_dict(self) -> StateDict:
        """The merged weights: θ_base + s ⊙ Σ_k λ_k v_k with the final λ (and frozen mask)."""
        if self._weights is None:
            raise RuntimeError("this result was saved without weights; use save(path, weights=True)")
        return {k: v.clone() for k, v in self._weights.items()}

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (tensors excluded: see :meth:`save`)."""
        return {
            "method": self.method,
            "tasks": list(self.tasks),
            "keys": list(self.keys),
            "granularity": self.granularity,
            "coefficients": self.coefficients.detach().cpu().double().tolist(),
            "config": _jsonable(self.config),
            "accuracy": dict(self.accuracy),
            "mask_stats": _jsonable(self.mask_stats),
            "seconds": self.seconds,
            "history": self.history.to_dict(),
            "phases": {k: h.to_dict() for k, h in self.phases.items()},
        }

    def tensors(self, weights: bool = False) -> StateDict:
        """Every tensor of the record, flat-named for safetensors."""
        out: StateDict = {"coefficients": self.coefficients.detach().cpu()}
        for name, h in [("history", self.history), *[(f"phases/{k}", h) for k, h in self.phases.items()]]:
            if h.coefficients:
                out[f"{name}/coefficients"] = h.coefficient_tensor()
        for name in ("mask_logits", "mask_sample"):
            named = getattr(self, name)
            if named is not None:
                out.update({f"{name}/{k}": v.detach().cpu() for k, v in named.items()})
        if weights:
            out.update({f"weights/{k}": v.detach().cpu() for k, v in self.state_dict().items()})
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, path: str | os.PathLike, weights: bool = False) -> tuple[Path, Path]:
        """Write ``<path>.json`` and ``<path>.safetensors`` atomically (temp file + os.replace)."""
        from safetensors.torch import save_file

        stem = Path(path)
        if stem.suffix in (".json", ".safetensors"):
            stem = stem.with_suffix("")
        jpath, tpath = stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")
        tensors = self.tensors(weights)
        atomic_write(tpath, lambda p: save_file(tensors, str(p)))
        record = self.to_dict()
        record["tensor_file"] = tpath.name
        record["tensor_sha256"] = sha256_file(tpath)
        atomic_write(jpath, lambda p: p.write_text(json.dumps(record, indent=1)))
        return jpath, tpath

    @classmethod
    def load(cls, path: str | os.PathLike) -> AdaptationResult:
        """Read a record written by :meth:`save` (its tensor file is checked against the JSON)."""
        from safetensors.torch import load_file

        stem = Path(path)
        if stem.suffix in (".json", ".safetensors"):
            stem = stem.with_suffix("")
        jpath = stem.with_name(stem.name + ".json")
        record = json.loads(jpath.read_text())
        tpath = jpath.with_name(record["tensor_file"])
        if sha256_file(tpath) != record["tensor_sha256"]:
            raise ValueError(f"{tpath} does not match the checksum recorded in {jpath}")
        t = load_file(str(tpath))
        def section(prefix: str) -> StateDict | None:
            out = {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
            return out or None

        return cls(
            method=record["method"], tasks=record["tasks"], keys=record["keys"],
            granularity=record["granularity"], coefficients=t["coefficients"],
            history=History.from_dict(record["history"], t.get("history/coefficients")),
            config=record["config"],
            phases={k: History.from_dict(h, t.get(f"phases/{k}/coefficients"))
                    for k, h in record["phases"].items()},
            accuracy=record["accuracy"], mask_logits=section("mask_logits/"),
            mask_sample=section("mask_sample/"), mask_stats=record["mask_stats"],
            seconds=record["seconds"], _weights=section("weights/"),
        )


def _jsonable(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().tolist()
    if isinstance(x, (torch.dtype, torch.device)):
        return str(x)
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    return str(x)


# ----------------------------------------------------------------------------------------------
# The shared loop over λ (AdaMerging, AdaMerging++, CART++, Concrete AdaMerging's TTA phase)
# ----------------------------------------------------------------------------------------------


def adapt_coefficients(
    suite: Suite,
    space: MergeSpace,
    *,
    method: str,
    granularity: Granularity = "layer",
    steps: int = 500,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    batch_size: int = 16,
    batches_per_step: int = 1,
    init: float = 0.3,
    clamp: bool = True,
    scales: Sequence[torch.Tensor] | None = None,
    seed: int = 0,
    concat: bool = True,
    autocast_dtype: torch.dtype | None = None,
    coef_every: int = 10,
    eval_every: int = 100,
    progress: bool = True,
    streams: TaskStreams | None = None,
    config: Mapping[str, Any] | None = None,
) -> AdaptationResult:
    """Entropy-minimising Adam on task-/layer-wise λ over ``space`` (AdaMerging §3.2, Alg. in §3.2.2)."""
    check_schedule(method, lrs={"lr": lr}, steps={"steps": steps},
                   at_least_one={"batch_size": batch_size, "batches_per_step": batches_per_step})
    t0 = time.perf_counter()
    dev = space.device
    streams = streams or TaskStreams(
        [suite.unlabeled(t) for t in suite.tasks], batch_size, seed, dev
    )
    adapter = CoefficientAdapter(
        suite.model, space, [suite.heads[t] for t in suite.tasks],
        granularity=granularity, init=init, clamp=clamp, lr=lr, betas=betas, scales=scales,
        concat=concat, autocast_dtype=autocast_dtype,
    )
    rec = Recorder(suite, steps, coef_every=coef_every, eval_every=eval_every, progress=progress,
                   desc=method, eval_suite=suite_on(suite, dev))
    rec.snapshot(0, adapter.coefficients, adapter.state_dict)
    for step in range(1, steps + 1):
        loss, per_task = adapter.step(streams.step(batches_per_step))
        rec.log(loss, per_task)
        rec.snapshot(step, adapter.coefficients, adapter.state_dict)
    history = rec.close()
    return AdaptationResult(
        method=method, tasks=list(suite.tasks), keys=list(space.keys), granularity=granularity,
        coefficients=adapter.coefficients().cpu(), history=history,
        config=dict(config or {}),
        accuracy=dict(history.accuracy[-1]) if history.accuracy else {},
        seconds=time.perf_counter() - t0, _weights=home_weights(suite, adapter.state_dict()),
    )


def supervised_coefficients(
    suite: Suite,
    space: MergeSpace,
    split: Literal["val", "test"] = "val",
    *,
    granularity: Granularity = "layer",
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 16,
    init: float = 0.3,
    clamp: bool = True,
    seed: int = 0,
    log_every: int = 0,
) -> torch.Tensor:
    """λ learned with *labels*: Adam on Σ_k CE(head_k(f_θ(λ)(x)), y) over batches of ``split``.

    A diagnostic, not a merging method: it separates what entropy minimisation fails to find
    from what the coefficient space cannot express. With ``split="val"`` it is the best λ a
    label-free objective could hope for (up to val/test sampling); with ``split="test"`` it is
    a transductive ceiling of the space. Everything else is AdaMerging's loop (λ from ``init``,
    clamped to [0, 1] in the forward, one batch of ``batch_size`` labelled images per task per
    step, drawn with replacement from a seeded generator per task). Returns λ (clamped, detached).
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
    data = [getattr(suite, split).get(t) for t in suite.tasks]
    missing = [t for t, d in zip(suite.tasks, data) if d is None or len(d) == 0]
    if missing:
        raise ValueError(f"suite has no labelled {split!r} images for {missing}; use the other split")
    check_schedule("supervised_coefficients", lrs={"lr": lr}, steps={"steps": steps},
                   at_least_one={"batch_size": batch_size})
    dev = space.device
    heads = [suite.heads[t].to(dev) for t in suite.tasks]
    gens = [torch.Generator().manual_seed(_mix(seed, k)) for k in range(len(data))]
    raw = init_coefficients(space, granularity, init)
    opt = torch.optim.Adam([raw], lr=lr)
    for step in range(1, steps + 1):
        idx = [torch.randint(len(d), (batch_size,), generator=g) for d, g in zip(data, gens)]
        x = torch.cat([d.images[i.to(d.images.device)] for d, i in zip(data, idx)]).to(dev)
        params = space.merge(clamp_coefficients(raw, clamp))
        feats = functional_call(suite.model, dict(params), (x,)).split(batch_size)
        loss = sum(torch.nn.functional.cross_entropy(head_logits(f, h), d.labels[i.to(d.labels.device)].to(dev))
                   for f, h, d, i in zip(feats, heads, data, idx))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log_every and step % log_every == 0:
            print(f"supervised λ ({split}, {granularity}-wise) step {step}/{steps}: CE {loss.item():.3f}", flush=True)
    return clamp_coefficients(raw.detach(), clamp)


def home_weights(suite: Suite, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Detached copies on the device of the suite's own weights (where ``evaluate`` expects them)."""
    home = next(iter(suite.pretrained.values())).device
    return {k: v.detach().to(home, copy=True) for k, v in state_dict.items()}


def block_of(key: str) -> str:
    """The block a tensor belongs to (``transformer.resblocks.3``), or its top-level name."""
    m = re.match(r"(.*?(?:resblocks|layers|layer|blocks|block|h)\.\d+)\.", key)
    return m.group(1) if m else key.split(".")[0]
