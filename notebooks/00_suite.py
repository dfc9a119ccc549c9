# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The benchmark: eight tasks, one pretrained encoder, eight fine-tuned models
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/merging-reproduced/merging-reproduced/blob/main/notebooks/00_suite.ipynb)
#
# **What this chapter rebuilds.** Every merging paper in this book starts from the same setup:
# one pretrained CLIP image encoder, eight copies of it fully fine-tuned on eight image
# classification tasks, and frozen zero-shot heads. This chapter shows that setup for the active
# profile: the tasks and samples of each, the pretrained encoder's zero-shot accuracy, and the
# accuracy of every fine-tuned model on every task. That matrix is the miniature's version of the
# Concrete subspace paper's Tables 6-7, and its diagonal is the *Individual* row of AdaMerging's
# Table 1.
#
# ## Overview
# 1. The tasks: samples, class counts and split sizes.
# 2. Zero-shot accuracy of the pretrained encoder, and how far fine-tuning moves each task.
# 3. Cross-task accuracy of the fine-tuned models, beside the paper's ViT-B/32 numbers.
#
# ## Prerequisites
# | Concept | Importance |
# | --- | --- |
# | CLIP zero-shot classification heads | Helpful |
# | Fine-tuning and task vectors ($\tau_k = \theta_k - \theta_\text{pre}$) | Necessary |
#
# **Time to learn:** 10 minutes. **Time to run:** about 5 minutes cold on a 2-core CPU with the
# `tiny` profile (it fine-tunes the eight models once and caches them), seconds when cached.
#
# ```{admonition} The offline miniature
# :class: note
# With the default `tiny` profile every number in this chapter comes from a **miniature**: a
# 1.2M-parameter ViT with CLIP's layout, pretrained on a procedural image mixture, fine-tuned on
# eight procedural 32-pixel tasks that echo the papers' eight. It is built to show the same
# mechanisms at laptop scale; its numbers are not the papers' numbers, and they are never
# presented as such. The papers' ViT-B/32 numbers sit beside them for orientation.
# ```

# %% tags=["parameters"]
profile = "tiny"
device = "auto"
seed = 0

# %% [markdown]
# ## Imports

# %%
import sys

if "google.colab" in sys.modules:  # Colab: install the library and the hub extras first
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "mergebook[hub] @ git+https://github.com/merging-reproduced/merging-reproduced@v0.2.0"], check=True)

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from myst_nb import glue

from mergebook import experiment as ex
from mergebook import plotting
from mergebook.profiles import get_profile, load_suite
from mergebook.reference import paper_table_wide

torch.manual_seed(seed)
plotting.apply_style()
prof = get_profile(profile)
glue("profile_name", prof.name, display=False)
glue("profile_description", prof.description, display=False)

# %% [markdown]
# ## Loading the suite
#
# `load_suite` returns a `Suite`: the encoder architecture, the pretrained and fine-tuned state
# dicts, one frozen head per task, and the labelled test data. On the `tiny` profile the first
# call generates the data and fine-tunes the eight models (progress bars show each stage);
# later calls read them from `.cache/mergebook/tiny/`.

# %%
suite = load_suite(profile, device=device, with_mtl=True)
tasks = suite.tasks
print(f"profile {profile}: {len(tasks)} tasks: {', '.join(tasks)}")

# %% [markdown]
# ## The tasks
#
# Sixteen test images of each task, one row per task.

# %%
if profile == "tiny":
    from mergebook.data.tiny_suite import PAPER_ANALOGUE

    fig, axes = plt.subplots(len(tasks), 12, figsize=(9, 0.85 * len(tasks)))
    for r, t in enumerate(tasks):
        imgs = suite.meta["sample_images"][t]
        labels = suite.test[t].labels[:12].tolist()
        for c in range(12):
            ax = axes[r, c]
            ax.imshow(imgs[c], interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            ax.grid(False)
            for s in ax.spines.values():
                s.set_visible(False)
            name = suite.class_names[t][labels[c]]
            ax.set_title(name if len(name) <= 10 else name[:9] + "…", fontsize=6, pad=1)
        axes[r, 0].set_ylabel(f"{t}\n({PAPER_ANALOGUE[t]})", fontsize=7, rotation=0, ha="right", va="center")
    glue("fig_samples", fig, display=False)
    plt.close(fig)
    sizes = pd.DataFrame(suite.meta["split_sizes"]).T
    sizes.insert(0, "classes", [len(suite.class_names[t]) for t in tasks])
    sizes.insert(0, "stands in for", [PAPER_ANALOGUE[t] for t in tasks])
    sizes.index.name = "task"
else:
    sizes = pd.DataFrame({"classes": [len(suite.class_names[t]) for t in tasks],
                          "test": [len(suite.test[t]) for t in tasks]}, index=tasks)
glue("tab_sizes", sizes, display=False)

# %% [markdown]
# ```{glue:figure} fig_samples
# :name: fig-suite-samples
#
# Test images of the eight miniature tasks, titled by class; the label on the left names the
# paper task each one stands in for (they echo, not copy, the papers' datasets). All images are
# 32x32 RGB and are generated from fixed seeds, from assets shipped with scikit-learn,
# scikit-image and matplotlib.
# ```
#
# Class counts and split sizes. `proto` holds the few images per class that build the frozen
# heads; `val` is used only to choose hyperparameters such as $\lambda$; all accuracies are on
# `test`.
#
# ```{glue:} tab_sizes
# ```

# %% [markdown]
# ## Zero-shot accuracy and the fine-tuned models
#
# Each fine-tuned model is evaluated on every task with that task's frozen head. Row $i$, column
# $j$ is the accuracy of the model fine-tuned on task $i$ when tested on task $j$; the row
# labelled *pretrained* is zero-shot accuracy.

# %% tags=["hide-input", "remove-output"]
matrix = ex.cross_task_matrix(suite)
matrix["avg"] = matrix.mean(axis=1)
individual = np.diag(matrix.loc[tasks, tasks].to_numpy())
zero_shot = matrix.loc["pretrained", tasks].to_numpy()

fig, ax = plt.subplots(figsize=(7.5, 5.2))
plotting.heatmap(ax, matrix.loc[["pretrained"] + tasks, tasks].to_numpy(), ["pretrained"] + [f"ft: {t}" for t in tasks],
                 tasks, vmin=0, vmax=100, cbar_label="test accuracy (%)")
ax.set_xlabel("evaluated on task")
ax.set_ylabel("model")
glue("fig_matrix", fig, display=False)
plt.close(fig)

summary = pd.DataFrame({"zero-shot (pretrained)": zero_shot, "fine-tuned (individual)": individual,
                        "gain": individual - zero_shot}, index=tasks)
summary.loc["avg"] = summary.mean()
glue("tab_summary", summary.round(1), display=False)
glue("zs_avg", f"{zero_shot.mean():.1f}", display=False)
glue("ind_avg", f"{individual.mean():.1f}", display=False)
glue("gap", f"{individual.mean() - zero_shot.mean():.1f}", display=False)
glue("ind_min", f"{individual.min():.1f}", display=False)
glue("ind_min_task", tasks[int(individual.argmin())], display=False)
# No MTL checkpoint is published for the CLIP profiles: the row is then reported, not run.
glue("mtl_avg", f"{matrix.loc['traditional MTL', 'avg']:.1f} %" if "traditional MTL" in matrix.index
     else "not run on this profile (no multi-task checkpoint is published)", display=False)
offdiag = matrix.loc[tasks, tasks].to_numpy()[~np.eye(len(tasks), dtype=bool)]
glue("offdiag_mean", f"{offdiag.mean():.1f}", display=False)
matrix.round(1).to_csv("suite_cross_task_matrix.csv")

# %% [markdown]
# ```{glue:figure} fig_matrix
# :name: fig-suite-matrix
#
# Accuracy (%) of the pretrained encoder (top row, zero-shot heads) and of each fine-tuned model
# (rows) on each task's test set (columns), on the active profile. The diagonal is the
# *Individual* baseline; off-diagonal cells show how much fine-tuning on one task costs or helps
# on the others. This is the miniature's counterpart of the Concrete paper's Tables 6-7.
# {download}`CSV <suite_cross_task_matrix.csv>`
# ```
#
# | | this profile |
# | --- | --- |
# | zero-shot average | {glue:text}`zs_avg` % |
# | individual (fine-tuned) average | {glue:text}`ind_avg` % |
# | gap fine-tuned − zero-shot | {glue:text}`gap` points |
# | weakest fine-tuned task | {glue:text}`ind_min_task` ({glue:text}`ind_min` %) |
# | fine-tuned models on *other* tasks, mean | {glue:text}`offdiag_mean` % |
# | traditional MTL (joint training) average | {glue:text}`mtl_avg` |
#
# ```{glue:} tab_summary
# ```

# %% [markdown]
# ## Beside the papers
#
# The papers' CLIP ViT-B/32 reference rows (AdaMerging Table 1). On the miniature each task is
# an analogue of the paper's task, so only the *shape* of the comparison carries over: a large
# gap between zero-shot and fine-tuned accuracy, and fine-tuned models that are specialists.

# %%
ada1 = paper_table_wide("adamerging", "1")
cart1 = paper_table_wide("cart", "1")
side = pd.DataFrame({
    "paper ViT-B/32 (reported)": [cart1.loc["Pretrained", "Average"], ada1.loc["Individual", "Avg Acc"],
                                  ada1.loc["Traditional MTL", "Avg Acc"]],
    f"{profile} (this run)": [zero_shot.mean(), individual.mean(),
                              matrix.loc["traditional MTL", "avg"] if "traditional MTL" in matrix.index else np.nan],
}, index=["Pretrained (zero-shot)", "Individual", "Traditional MTL"]).round(1)
side.index.name = "average accuracy (%)"
glue("tab_side", side, display=False)

# Per task: the paper's zero-shot row and fine-tuned diagonal (Concrete Table 6) next to the
# miniature task that stands in for each paper task.
t6 = paper_table_wide("concrete_subspace", "6")
if profile == "tiny":
    pairs = [(t, PAPER_ANALOGUE[t]) for t in tasks]
else:
    pairs = [(t, t) for t in tasks]
per_task = pd.DataFrame({
    "paper task": [p for _, p in pairs],
    "reported zero-shot": [t6.loc["pre-trained", p] for _, p in pairs],
    "reported fine-tuned": [t6.loc[p, p] for _, p in pairs],
    "task (this run)": [t for t, _ in pairs],
    "zero-shot (this run)": zero_shot.round(1),
    "fine-tuned (this run)": individual.round(1),
}).set_index("paper task")
glue("tab_per_task", per_task, display=False)

# %% [markdown]
# ```{glue:} tab_side
# ```
#
# Average accuracy of the reference rows: the paper column is CART Table 1 (pretrained) and
# AdaMerging Table 1 (individual, traditional MTL), CLIP ViT-B/32.
#
# ```{glue:} tab_per_task
# ```
#
# Per task, the reported CLIP ViT-B/32 zero-shot and fine-tuned accuracies (Concrete Table 6,
# first row and diagonal) beside the miniature task that stands in for each one.
#
# ## Summary
# On the active profile the pretrained encoder reaches {glue:text}`zs_avg` % on average with
# zero-shot heads, the eight fine-tuned specialists {glue:text}`ind_avg` %, a gap of
# {glue:text}`gap` points, and joint multi-task training {glue:text}`mtl_avg`. Each specialist
# is much weaker on the tasks it was not trained on ({glue:text}`offdiag_mean` % on average),
# which is what makes merging them a real problem.
#
# ## What's next
# [Task arithmetic](01_task_arithmetic) merges these eight models without any data: weight
# averaging, task arithmetic and Ties-Merging.
