# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # One sweep point: a training-free merge, evaluated
#
# Not a chapter: the notebook that `mergebook sweep` runs once per parameter point (chapter
# 08, *Sweeps*). It merges the profile's fine-tuned models with one registered method, evaluates
# the result on a seeded sample of `eval_per_task` test images per task, and reports the
# accuracies with `mergebook.sweep.record`, which the sweep collects (nothing is read from the
# printed output). Run alone, it prints the same numbers and records nothing.

# %% tags=["parameters"]
profile = "tiny"
device = "auto"
seed = 0
method = "task_arithmetic"
scaling_coef = 0.3
ties_k = 0.2
eval_per_task = 300

# %%
import torch

from mergebook import sweep
from mergebook.evaluate import evaluate
from mergebook.methods import merge
from mergebook.profiles import load_suite

torch.manual_seed(seed)
suite = load_suite(profile, device=device, progress=False)
extra = {"k": ties_k} if method == "ties" else {}
merged = merge(method, suite.pretrained, suite.finetuned_list(), scaling_coef=scaling_coef, **extra)
accuracy = evaluate(sweep.eval_subset(suite, eval_per_task, seed), merged)
labels = {"task_arithmetic": "Task Arithmetic", "ties": "Ties-Merging (sum)"}
sweep.record(accuracy, method=labels.get(method, method))
print({k: round(v, 2) for k, v in accuracy.items()})
