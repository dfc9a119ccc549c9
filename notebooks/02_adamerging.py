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

# %%

# %% [markdown]
# # AdaMerging: learning the coefficients by entropy minimisation
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/merging-reproduced/merging-reproduced/blob/main/notebooks/02_adamerging.ipynb)
#
# **The claims under test.** (i) On unlabelled test data, a sample's prediction entropy tracks its
# loss, so entropy is a usable surrogate objective (AdaMerging Fig. 3, Fig. 11). (ii) Learning one
# merging coefficient per task (*task-wise*) by minimising that entropy beats a hand-picked
# $\lambda$, and one coefficient per layer and task (*layer-wise*) beats it by much more (Table 1,
# Fig. 1). (iii) The same holds on top of Ties-Merging's trimmed vectors (*AdaMerging++*).
#
# **What this chapter rebuilds.** AdaMerging Table 1 with every row (per task, with a 95%
# interval, beside the reported per-task row of the table that matches the profile), Fig. 1 (Task
# Arithmetic against λ with AdaMerging, MTL and weight averaging as lines), Fig. 3(a) and Fig. 11
# (entropy against loss in 11 bins, per task and for all tasks, with Spearman's ρ), Fig. 4 (the
# task-wise coefficients and the accuracy during adaptation), Fig. 5 (the layer-wise coefficients,
# plain and ++, per block), and a verdict per claim computed from this run.
#
# ## Prerequisites
# | Concept | Importance |
# | --- | --- |
# | [Task arithmetic](01_task_arithmetic) | Necessary |
# | Test-time adaptation, entropy minimisation | Helpful |
#
# **Time to learn:** 20 minutes. **Time to run:** about 5 minutes on a 2-core CPU (`tiny`, cold
# cache; the rows shared with [chapter 1](01_task_arithmetic) come from its cache when it ran first).
#
# ```{admonition} Miniature numbers and settings
# :class: note
# With the default `tiny` profile every number computed here comes from the offline miniature of
# [the benchmark chapter](00_suite). The original runs 500 Adam steps that each consume two
# batches of 16 test images per task; the `tiny` parameters below run fewer steps with one batch
# per task (FusionBench's loop) to fit a CPU budget. The paper profiles restore the original
# settings (`notebooks/params/vit-b-32.yaml`). The generalisation (Table 3) and robustness (Table 4,
# Fig. 6) experiments have their own chapter, [Generalisation and robustness](09_generalisation_robustness).
# ```

# %% tags=["parameters"]
profile = "tiny"
device = "auto"
seed = 0
steps = 200
batch_size = 16
batches_per_step = 1
lr = 1e-3
eval_every = 25
ta_lambda = 0.3
lambdas = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
ties_k = 0.2
fisher_examples = 200
regmean_alpha = 0.95
n_bins = 11
n_boot = 2000
coupling_images = 256

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
import seaborn as sns
import torch
from myst_nb import glue

from mergebook import experiment as ex
from mergebook.analysis import mean_off_diagonal, publish_study, task_vector_cosines
from mergebook import plotting
from mergebook.profiles import load_suite
from mergebook.reference import paper_table, paper_table_wide, reference_arch, reported_row
from mergebook.statedict import layer_names

torch.manual_seed(seed)
plotting.apply_style()
suite = load_suite(profile, device=device, with_mtl=True)
tasks = suite.tasks
pre, fts = suite.pretrained, suite.finetuned_list()
arch, table_id = reference_arch(profile), paper_table("adamerging", profile)

# %% [markdown]
# ## Is entropy a good surrogate for the loss?
#
# We merge with Task Arithmetic ($\lambda$ = {glue:text}`ta_lambda`), then compute, for every
# test image, the entropy of the predicted distribution and the cross-entropy loss against its
# label. AdaMerging's premise is that the two are positively correlated, so lowering entropy
# without labels should lower the loss. As in the paper's Fig. 3(a), the images of each task (and
# of all tasks pooled, *ALL*) are sorted by entropy into {glue:text}`n_bins` equal-count bins.

# %% tags=["hide-input", "remove-output"]
ent_loss = ex.entropy_loss_at(suite, ta_lambda)
bins = ex.entropy_loss_bins(ent_loss, n_bins)
rho = ex.entropy_loss_spearman(ent_loss)
panels = ["ALL"] + list(tasks)
grid = sns.relplot(data=bins, x="entropy", y="loss", col="task", col_order=panels, col_wrap=3, kind="line",
                   marker="o", color=plotting.color("Task Arithmetic"), height=2.1, aspect=1.35,
                   facet_kws={"sharex": False, "sharey": False})
for ax, t in zip(grid.axes.flat, panels):
    ax.set_title(f"{t}  (ρ = {rho[t]:.2f})", fontsize=9)
grid.set_axis_labels("mean entropy in bin (nats)", "mean loss (nats)")
glue("fig_entropy_loss", grid.figure, display=False)
plt.close(grid.figure)
fig, ax = plt.subplots(figsize=(6.5, 2.8))
sns.barplot(x=rho.index, y=rho.values, color=plotting.color("Task Arithmetic"), ax=ax)
ax.bar_label(ax.containers[0], fmt="%.2f", fontsize=8)
ax.set_ylabel("Spearman ρ (entropy, loss)")
ax.set_xlabel("task (ALL: pooled)")
ax.set_ylim(min(0.0, rho.min() - 0.05), 1.05)
ax.tick_params(axis="x", rotation=30)
glue("fig_rho", fig, display=False)
plt.close(fig)
rho.round(3).to_frame().to_csv("adamerging_fig11_spearman.csv")
bins.round(4).to_csv("adamerging_fig3_bins.csv", index=False)
glue("ta_lambda", f"{ta_lambda:g}", display=False)
glue("n_bins", f"{n_bins}", display=False)
glue("rho_all", f"{rho['ALL']:.2f}", display=False)
glue("rho_min", f"{rho.drop('ALL').min():.2f}", display=False)
glue("rho_min_task", str(rho.drop("ALL").idxmin()), display=False)
glue("rho_max", f"{rho.drop('ALL').max():.2f}", display=False)

# %% [markdown]
# ```{glue:figure} fig_entropy_loss
# :name: fig-entropy-loss
#
# Mean cross-entropy loss against mean prediction entropy in {glue:text}`n_bins` equal-count
# entropy bins, for all tasks pooled (ALL) and for each task, under the Task Arithmetic merge on the
# active profile (AdaMerging Fig. 3(a)). Each title gives that panel's Spearman ρ over all its test
# images. {download}`CSV <adamerging_fig3_bins.csv>`
# ```
#
# ```{glue:figure} fig_rho
# :name: fig-rho
#
# Spearman rank correlation between per-image entropy and loss, pooled and per task (AdaMerging
# Fig. 11). {download}`CSV <adamerging_fig11_spearman.csv>`
# ```
#
# Pooled over tasks the correlation is {glue:text}`rho_all`; per task it ranges from
# {glue:text}`rho_min` ({glue:text}`rho_min_task`) to {glue:text}`rho_max`. The verdict table at
# the end decides the claim from these numbers.
#
# ## Four AdaMerging variants
#
# Every run starts all coefficients at 0.3 (Task Arithmetic's $\lambda$), clamps them to
# $[0, 1]$ in the forward pass, and runs Adam (lr {glue:text}`ada_lr`) on the entropy summed over
# tasks for {glue:text}`ada_steps` steps with batches of {glue:text}`ada_batch` unlabelled test
# images per task. The `++` variants adapt the coefficients of Ties-Merging's trimmed,
# sign-agreeing vectors $\Phi(\tau_k)$ instead of $\tau_k$. `ex.adamerging_run` caches each run
# together with the per-image correctness of its final merge, which the intervals below need.

# %%
VARIANTS = {
    "Task-wise AdaMerging": ("task", False),
    "Task-wise AdaMerging++": ("task", True),
    "Layer-wise AdaMerging": ("layer", False),
    "Layer-wise AdaMerging++": ("layer", True),
}
runs = {name: ex.adamerging_run(suite, g, pp, steps=steps, lr=lr, batch_size=batch_size,
                                batches_per_step=batches_per_step, seed=seed, eval_every=eval_every,
                                device=device)
        for name, (g, pp) in VARIANTS.items()}

# %% tags=["hide-input", "remove-output"]
# Task Arithmetic and Ties over λ: the same cached sweeps as chapter 1 (same grid, same key)
ta_sweep = ex.sweep(suite, "task_arithmetic", lambdas)
ties_sweep = ex.sweep(suite, "ties", lambdas, k=ties_k, disjoint="sum",
                      extra_zeros=suite.meta.get("ties_extra_zeros", 0))
reference = ex.reference_rows(suite)
data_rows = ex.data_using_rows(suite, fisher_examples, regmean_alpha, seed)
lam_label = f"λ={ta_lambda:g}"
correct = {r: reference["correct"][r] for r in ["Individual", "Traditional MTL"] if r in reference["correct"]}
correct.update(data_rows["correct"])
correct[f"Task Arithmetic ({lam_label})"] = ex.sweep_correct(ta_sweep, ta_lambda)
correct[f"Ties-Merging ({lam_label})"] = ex.sweep_correct(ties_sweep, ta_lambda)
correct.update({name: r["correct"] for name, r in runs.items()})
reported = ex.reported_by_task("adamerging", profile, list(correct), tasks)
frame = ex.results_frame(correct, tasks, reported=reported, n_boot=n_boot, seed=seed)
frame.round(2).to_csv("adamerging_table1.csv")
summary, per_task = ex.results_tables(frame, tasks, reported)
glue("tab_table1", summary, display=False)
glue("tab_table1_tasks", per_task, display=False)
glue("ada_lr", f"{lr:g}", display=False)
glue("ada_steps", f"{steps}", display=False)
glue("ada_batch", f"{batch_size}", display=False)
glue("arch", arch, display=False)
glue("table_id", table_id, display=False)
short = {"ta": f"Task Arithmetic ({lam_label})", "ties": f"Ties-Merging ({lam_label})", "tw": "Task-wise AdaMerging",
         "twpp": "Task-wise AdaMerging++", "lw": "Layer-wise AdaMerging", "lwpp": "Layer-wise AdaMerging++"}
for key, name in short.items():
    glue(f"acc_{key}", f"{frame.loc[name, 'avg']:.1f}", display=False)
    glue(f"rep_{key}", ex.format_interval(frame.loc[name, "reported"], 0, 0), display=False)

# %% [markdown]
# ```{glue:} tab_table1
# ```
#
# AdaMerging Table {glue:text}`table_id` on the active profile: average test accuracy (%) over the
# tasks with its 95% bootstrap interval over test images (stratified by task), the average
# AdaMerging reports for the same method on CLIP {glue:text}`arch`, and Δ = ours − reported.
# Task Arithmetic and Ties-Merging use λ = {glue:text}`ta_lambda`, the papers' setting; Fisher
# Merging and RegMean use unlabelled validation images; Individual and Traditional MTL (where the
# profile has a multi-task model) are the upper references. No label is used by adaptation;
# labels only score the result. {download}`CSV <adamerging_table1.csv>`
#
# ```{glue:} tab_table1_tasks
# ```
#
# The same rows per task (%), each followed by the paper's per-task row (`· reported`). On `tiny`
# each miniature task stands beside the CLIP task it imitates (digits ↔ MNIST, housenum ↔ SVHN,
# signs ↔ GTSRB, textures ↔ DTD, shapes ↔ EuroSAT, patterns ↔ RESISC45, letters ↔ SUN397,
# greek ↔ Cars; `mergebook.experiment.paper_task_names`), so the reported row is context, not a
# target.
#
# ## Fig. 1: a learned merge against the λ sweep

# %% tags=["hide-input", "remove-output"]
ta_curve = ex.sweep_frame(ta_sweep, tasks)["avg"]
lines = {"Layer-wise AdaMerging": "-", "Task-wise AdaMerging": "--", "Traditional MTL": "-.",
         "Weight Averaging": ":"}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
axes[0].plot(ta_curve.index, ta_curve.values, "o-", color=plotting.color("Task Arithmetic"), ms=4,
             label="Task Arithmetic")
for name, ls in lines.items():
    if name in frame.index:
        axes[0].axhline(frame.loc[name, "avg"], color=plotting.color(name), ls=ls, lw=1.4, label=name)
axes[0].set_title(f"{profile} (this run)")
paper_ta = paper_table_wide("concrete_subspace", "10")
paper_avg = [c for c in paper_ta.columns if c.lower().startswith("avg")][0]
axes[1].plot([float(i) for i in paper_ta.index], paper_ta[paper_avg], "o-", color=plotting.color("Task Arithmetic"),
             ms=4, label="Task Arithmetic")
for name, ls in lines.items():
    axes[1].axhline(reported_row("adamerging", "vit-b-32", name)["avg"], color=plotting.color(name), ls=ls, lw=1.4,
                    label=name)
axes[1].set_title("CLIP ViT-B/32 (reported: Concrete Table 10, AdaMerging Table 1)")
for ax in axes:
    ax.set_xlabel("scaling coefficient λ")
axes[0].set_ylabel("average test accuracy (%)")
handles, labels = axes[1].get_legend_handles_labels()
fig.legend(handles, labels, loc="outside lower center", ncol=5, fontsize=8)
glue("fig_fig1", fig, display=False)
plt.close(fig)

# %% [markdown]
# ```{glue:figure} fig_fig1
# :name: fig-adamerging-fig1
#
# Average test accuracy of Task Arithmetic against λ, with the learned merges and the references
# as horizontal lines (AdaMerging Fig. 1). Left: the active profile (Traditional MTL only where a
# multi-task model exists). Right: the numbers reported on CLIP ViT-B/32.
# ```
#
# ## Fig. 4: what adaptation does over time

# %% tags=["hide-input", "remove-output"]
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for name, r in runs.items():
    h = r["history"]
    ls = "--" if name.endswith("++") else "-"
    hist = ex.history_frame(h, tasks)
    axes[0].plot(hist.index, hist["avg"], ls, marker="o", ms=3, color=plotting.color(name), label=name)
    ent = np.asarray(h["entropy"])
    k = max(1, len(ent) // 40)
    smooth = np.convolve(ent, np.ones(k) / k, mode="valid")
    axes[1].plot(np.arange(len(smooth)) + k // 2, smooth, ls, color=plotting.color(name), label=name)
axes[0].axhline(frame.loc[f"Task Arithmetic ({lam_label})", "avg"], color=plotting.color("Task Arithmetic"), lw=1,
                ls=":", label=f"Task Arithmetic ({lam_label})")
axes[0].set_xlabel("adaptation step")
axes[0].set_ylabel("average test accuracy (%)")
axes[1].set_xlabel("adaptation step")
axes[1].set_ylabel("entropy summed over tasks (nats)")
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8)
glue("fig_trajectories", fig, display=False)
plt.close(fig)

task_colors = dict(zip(tasks, sns.color_palette("tab10", len(tasks))))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
for ax, name in zip(axes, ["Task-wise AdaMerging", "Task-wise AdaMerging++"]):
    cf = ex.coefficient_frame(runs[name]["history"], tasks)
    for t in tasks:
        ax.plot(cf.index, cf[t], color=task_colors[t], lw=1.3, label=t)
    ax.set_title(name)
    ax.set_xlabel("adaptation step")
axes[0].set_ylabel("task-wise coefficient λ_k")
axes[1].legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
glue("fig_taskwise_coefs", fig, display=False)
plt.close(fig)
tw = pd.DataFrame({name: runs[name]["coefficients"] for name in ["Task-wise AdaMerging", "Task-wise AdaMerging++"]},
                  index=pd.Index(tasks, name="task"))
tw.round(3).to_csv("adamerging_taskwise_coefficients.csv")
glue("tab_taskwise_coefs", tw.round(3), display=False)

# %% [markdown]
# ```{glue:figure} fig_trajectories
# :name: fig-adamerging-trajectories
#
# Left: average test accuracy during adaptation for the four variants on the active profile
# (dotted: Task Arithmetic at the starting λ). Right: the objective, the prediction entropy
# summed over tasks per step (moving average).
# ```
#
# ```{glue:figure} fig_taskwise_coefs
# :name: fig-taskwise-coefs
#
# The task-wise coefficients during adaptation, plain and ++, all starting at 0.3 (AdaMerging
# Fig. 4).
# ```
#
# ```{glue:} tab_taskwise_coefs
# ```
#
# The final task-wise coefficients. {download}`CSV <adamerging_taskwise_coefficients.csv>`
#
# ## Fig. 5: the layer-wise coefficients

# %% tags=["hide-input", "remove-output"]
names = layer_names(pre)  # the rows of the layer-wise coefficients, in layer_names order
means = {name: ex.block_means(runs[name]["coefficients"], names, suite, tasks)
         for name in ["Layer-wise AdaMerging", "Layer-wise AdaMerging++"]}
lo = min(m.values.min() for m in means.values())
hi = max(m.values.max() for m in means.values())
fig, axes = plt.subplots(1, 2, figsize=(11, max(3.2, 0.32 * len(means["Layer-wise AdaMerging"]))))
for ax, (name, m) in zip(axes, means.items()):
    plotting.heatmap(ax, m.values, list(m.index), tasks, vmin=lo, vmax=hi, cmap="magma", fmt="{:.2f}",
                     cbar_label="mean learned λ in the block")
    ax.set_title(name)
    ax.set_xlabel("task vector")
axes[0].set_ylabel("encoder part (forward order)")
glue("fig_layer_coefs", fig, display=False)
plt.close(fig)
pd.concat(means, names=["method", "block"]).round(4).to_csv("adamerging_layerwise_blocks.csv")
glue("coef_lo", f"{lo:.2f}", display=False)
glue("coef_hi", f"{hi:.2f}", display=False)

# %% [markdown]
# ```{glue:figure} fig_layer_coefs
# :name: fig-layer-coefs
#
# Layer-wise AdaMerging's learned coefficients, plain (left) and ++ (right), averaged over the
# parameter tensors of each part of the encoder (embeddings, each block, final norm and
# projection, in forward order), per task vector; all started at 0.3 (AdaMerging Fig. 5). The
# colour range is the data's own, {glue:text}`coef_lo` to {glue:text}`coef_hi`.
# {download}`CSV <adamerging_layerwise_blocks.csv>`
# ```
#
# ## Where entropy misleads: which task vector raises whose entropy
#
# AdaMerging sums the tasks' entropies, so a coefficient $\lambda_j$ moves by the sum over tasks $i$ of
# $\partial H_i / \partial \lambda_j$. At the Task Arithmetic point we compute that matrix
# (`mergebook.analysis.entropy_coupling`, {glue:text}`cp_images` unlabelled test images per task):
# the diagonal is a task's own vector sharpening its own predictions, the off-diagonal entries are
# the cross-task coupling, and a positive column sum means Adam *shrinks* that task's coefficient,
# whatever it does to that task's accuracy.

# %% tags=["hide-input", "remove-output"]
coupling = ex.entropy_coupling_at(suite, ta_lambda, coupling_images)
coupling_total = coupling.sum(axis=0)
fig, ax = plt.subplots(figsize=(7.5, 5.2))
vmax = float(np.abs(coupling.values).max())
plotting.heatmap(ax, np.vstack([coupling.values, coupling_total.values]), list(tasks) + ["column sum"], tasks,
                 vmin=-vmax, vmax=vmax, cmap="RdBu_r", fmt="{:.2f}", cbar_label="∂H_i/∂λ_j (nats per unit λ)")
ax.axhline(len(tasks) - 0.5, color="black", lw=1.5)
ax.set_xlabel("task vector j (its coefficient λ_j)")
ax.set_ylabel("entropy H_i of task i")
glue("fig_coupling", fig, display=False)
plt.close(fig)
coupling.assign(**{"column sum": None}).round(4).to_csv("adamerging_entropy_coupling.csv")
shrunk = [t for t in tasks if coupling_total[t] > 0]
glue("cp_images", f"{coupling_images}", display=False)
glue("cp_shrunk", ", ".join(shrunk) if shrunk else "none", display=False)
glue("cp_n_shrunk", f"{len(shrunk)}", display=False)
glue("cp_worst", str(coupling_total.idxmax()), display=False)
glue("cp_worst_sum", f"{coupling_total.max():+.2f}", display=False)
glue("cp_worst_own", f"{coupling.loc[coupling_total.idxmax(), coupling_total.idxmax()]:+.2f}", display=False)

# %% [markdown]
# ```{glue:figure} fig_coupling
# :name: fig-coupling
#
# $\partial H_i / \partial \lambda_j$ at the Task Arithmetic merge ($\lambda$ = {glue:text}`ta_lambda`
# for every task) on the active profile; red raises the entropy, blue lowers it. The last row is the
# column sum, the task-wise AdaMerging gradient on $\lambda_j$: red there means the objective pushes
# $\lambda_j$ down. {download}`CSV <adamerging_entropy_coupling.csv>`
# ```
#
# On this profile the summed entropy pushes down the coefficients of {glue:text}`cp_n_shrunk`
# task(s): {glue:text}`cp_shrunk`. The strongest push is on {glue:text}`cp_worst` (column sum
# {glue:text}`cp_worst_sum`, although its own entropy falls with it at {glue:text}`cp_worst_own`):
# its vector makes the other tasks' predictions less certain, and the sum counts that against it.
#
# ## The claims, decided on this profile

# %% tags=["hide-input", "remove-output"]
iv = {name: ex.row_interval(frame, name) for name in frame.index}
ta_name, ties_name = f"Task Arithmetic ({lam_label})", f"Ties-Merging ({lam_label})"
rep = frame["reported"]
upper = "Traditional MTL" if "Traditional MTL" in frame.index else "Individual"
claims = [
    ex.verdict("Entropy and loss are positively rank-correlated on every task (Fig. 3, 11)",
               ex.greater(ex.Interval.point(rho.drop("ALL").min(), "min over tasks of ρ"), 0.0),
               "ρ > 0 on every task (Fig. 11, not transcribed)"),
    ex.verdict("Task-wise AdaMerging beats Task Arithmetic",
               ex.greater(iv["Task-wise AdaMerging"], iv[ta_name]), [rep["Task-wise AdaMerging"], rep[ta_name]]),
    ex.verdict("Layer-wise AdaMerging beats Task Arithmetic",
               ex.greater(iv["Layer-wise AdaMerging"], iv[ta_name]), [rep["Layer-wise AdaMerging"], rep[ta_name]]),
    ex.verdict("Layer-wise beats task-wise AdaMerging",
               ex.greater(iv["Layer-wise AdaMerging"], iv["Task-wise AdaMerging"]),
               [rep["Layer-wise AdaMerging"], rep["Task-wise AdaMerging"]]),
    ex.verdict("Task-wise AdaMerging++ beats Ties-Merging",
               ex.greater(iv["Task-wise AdaMerging++"], iv[ties_name]), [rep["Task-wise AdaMerging++"], rep[ties_name]]),
    ex.verdict("Layer-wise AdaMerging++ beats Ties-Merging",
               ex.greater(iv["Layer-wise AdaMerging++"], iv[ties_name]),
               [rep["Layer-wise AdaMerging++"], rep[ties_name]]),
    ex.verdict("Layer-wise AdaMerging++ beats layer-wise AdaMerging",
               ex.greater(iv["Layer-wise AdaMerging++"], iv["Layer-wise AdaMerging"]),
               [rep["Layer-wise AdaMerging++"], rep["Layer-wise AdaMerging"]]),
    ex.verdict("Layer-wise AdaMerging beats every data-free and data-using merge baseline",
               ex.all_of(*[ex.greater(iv["Layer-wise AdaMerging"], iv[b])
                           for b in ["Weight Averaging", "Fisher Merging", "RegMean", ta_name, ties_name]]),
               f"{rep['Layer-wise AdaMerging']:g} vs "
               + " / ".join(f"{rep[b]:g}" for b in ["Weight Averaging", "Fisher Merging", "RegMean", ta_name, ties_name])
               + (" (holds)" if all(rep["Layer-wise AdaMerging"] > rep[b] for b in
                                    ["Weight Averaging", "Fisher Merging", "RegMean", ta_name, ties_name])
                  else " (does not hold)")),
    ex.verdict(f"Layer-wise AdaMerging stays below {upper}",
               ex.less(iv["Layer-wise AdaMerging"], iv[upper]), [rep["Layer-wise AdaMerging"], rep[upper]]),
]
verdicts = ex.verdict_table(claims)
verdicts.to_csv("adamerging_verdicts.csv")
glue("tab_verdicts", verdicts, display=False)
for key in ["tw", "lw"]:
    glue(f"gain_{key}", f"{frame.loc[short[key], 'avg'] - frame.loc[ta_name, 'avg']:+.1f}", display=False)
    glue(f"gain_rep_{key}", f"{rep[short[key]] - rep[ta_name]:+.1f}", display=False)
glue("n_holds", f"{(verdicts['verdict'] == ex.HOLDS).sum()}", display=False)
glue("n_claims", f"{len(verdicts)}", display=False)

# %% [markdown]
# ```{glue:} tab_verdicts
# ```
#
# Each claim, the rule that decides it (generated from the rule itself), our numbers (averages with
# 95% intervals), the reported averages with whether they satisfy the same comparison, and the
# verdict on the active profile: *holds* needs the intervals apart, *partly holds* means only the
# point estimates agree. {download}`CSV <adamerging_verdicts.csv>`
#
# ## Summary
# Starting from Task Arithmetic ({glue:text}`acc_ta` %, reported {glue:text}`rep_ta`) and
# Ties-Merging ({glue:text}`acc_ties` %, reported {glue:text}`rep_ties`), entropy minimisation
# reaches {glue:text}`acc_tw` % task-wise (reported {glue:text}`rep_tw`), {glue:text}`acc_twpp` %
# task-wise++ ({glue:text}`rep_twpp`), {glue:text}`acc_lw` % layer-wise ({glue:text}`rep_lw`) and
# {glue:text}`acc_lwpp` % layer-wise++ ({glue:text}`rep_lwpp`) on the active profile. Over Task
# Arithmetic, the task-wise variant gains {glue:text}`gain_tw` points (reported
# {glue:text}`gain_rep_tw`) and the layer-wise one {glue:text}`gain_lw` (reported
# {glue:text}`gain_rep_lw`). {glue:text}`n_holds` of the {glue:text}`n_claims`
# claims hold by their intervals on this profile.
#
# ## What the miniature can and cannot say
# The miniature keeps the ordering questions (does a learned merge beat a fixed λ, layer-wise
# beat task-wise, ++ beat plain) but compresses the gains: the CLIP runs adapt 500 steps with two
# batches per task, this one {glue:text}`ada_steps` with one. A claim that only *partly holds* here
# is a point estimate inside the test set's sampling noise, not a contradiction of the paper.
#
# ### What made entropy mislead: housenum's neighbours
#
# The miniature's first design drew housenum,
# its SVHN, with up to two neighbouring digits as tall as the centre one and 15 px away, as SVHN's
# crops show them. On that design, adapting longer helped six tasks and drove housenum (and, under
# the paper's 500 × 2 schedule, signs) below Task Arithmetic. The task-design study (`benchmarks/miniature_design.py`,
# {glue:text}`ds_date`; {glue:text}`ds_minutes` on one CPU thread) changed one thing at a time,
# re-fine-tuned only the tasks it changed exactly as the book does, and merged each variant:
# Task Arithmetic (λ = 0.3), layer-wise AdaMerging ({glue:text}`ds_steps` × 1) and the layer-wise
# oracle λ learned from the test labels (a ceiling, never a method). Layer-wise AdaMerging gains
# {glue:text}`ds_variants` points over each variant's Task Arithmetic; it leaves below TA
# {glue:text}`ds_below`, so {glue:text}`ds_collapse`. The oracle λ gains
# {glue:text}`ds_oracle`. Against the gain of {glue:text}`ds_baseline`, {glue:text}`ds_base_gain`,
# {glue:text}`ds_effect`. Dropping the neighbours is the one change that removes housenum's
# collapse while leaving the task hard (see its Task Arithmetic column), so **the book draws
# housenum without neighbours since this study**, and every run in this chapter uses that design.
# Plain backgrounds for housenum and signs together gain as much but make housenum nearly as easy
# as digits, and better prototype heads leave both tasks below TA, so neither was adopted. The miniature's SVHN
# thus departs from SVHN on purpose. Why the neighbours mislead is not settled here; one reading,
# untested, is that the merged 1.2M-parameter backbone no longer tells the centre digit from a
# neighbour, and entropy rewards a confident reading of either.

# %% tags=["hide-input", "remove-output"]
publish_study("miniature_design", glue, "tab_design", "adamerging_miniature_design.csv")

# %% [markdown]
# ```{glue:} tab_design
# ```
#
# The task-design study (`tiny`, seed 0; not the active profile when that is a paper profile): one
# row per variant of the miniature, with the tasks it re-fine-tuned, the zero-shot, individual and
# Task Arithmetic (λ = 0.3) averages, housenum and signs under TA → layer-wise AdaMerging, and
# AdaMerging's and the oracle λ's gain over TA with the share of the TA → individual gap each
# closes. One seed, no intervals. {download}`CSV <adamerging_miniature_design.csv>`
#
# ### What was ruled out first
#
# The studies below were recorded on the *first* design, before the
# neighbours were dropped: their Task Arithmetic and AdaMerging numbers are that design's, not this
# chapter's. They tested other explanations of the collapse, recorded by
# `benchmarks/miniature_entropy.py` ({glue:text}`st_date`, {glue:text}`st_device`; the book reads
# it and does not rerun it):
# - *Confident wrong predictions on housenum alone?* The objective is a sum, so a coefficient is
#   also pushed by the other tasks. In this chapter's layer-wise run (the current design) the mean
#   entropy of {glue:text}`st_focus` goes from {glue:text}`st_h_worst_0` to
#   {glue:text}`st_h_worst_1` nats (first and last ten steps), the other tasks' mean from
#   {glue:text}`st_h_others_0` to {glue:text}`st_h_others_1`; the coupling figure above gives the
#   {glue:text}`st_focus` column sum, {glue:text}`st_focus_sum`. Being pushed down is not by itself
#   a loss of accuracy: {glue:text}`cp_shrunk` are all pushed down on this profile.
# - *The heads' logit scale?* Partly. The miniature's pretraining learned a logit scale of
#   {glue:text}`st_scale`, against CLIP's 100, so every task sits in the steep middle of the
#   entropy curve. Dividing the heads by T = {glue:text}`st_t` inside the objective only (CLIP's
#   sharpness; a diagnostic, not the published method) turned the first design's housenum column
#   sum from {glue:text}`st_hn_sum_1` to {glue:text}`st_hn_sum_t`. Under the paper's 500 × 2
#   schedule, housenum then ended at {glue:text}`st_hn_am_t` % instead of {glue:text}`st_hn_am_1` %
#   (Task Arithmetic: {glue:text}`st_hn_ta` %).
# - *Retrain the miniature against heads at 100?* No. Fine-tuning against heads at scale 100
#   kept the individual models ({glue:text}`st_ind_100` % on average) but made the task vectors
#   interfere far more: Task Arithmetic fell to {glue:text}`st_ta_100` % (first design:
#   {glue:text}`st_ta_1` %), and layer-wise AdaMerging reached {glue:text}`st_am_100` % from there
#   ({glue:text}`st_am_100_gain` points).
#
# The task vectors are already nearly orthogonal: their mean pairwise cosine is
# {glue:text}`st_cos`, the range the task-arithmetic papers report for CLIP. So a crowded
# parameter space was not the first suspect; the logit scale was. The two pilots below test both,
# on short pretraining runs (the committed backbone's took {glue:text}`st_pretrain_min` minutes on
# one CPU thread). Low cosines do not by themselves say how much room the merge coefficients
# have; the headroom study further down measures that directly. The book keeps the published
# objective and the committed backbone throughout; only housenum's design changed.

# %% tags=["hide-input", "remove-output"]
publish_study("miniature_entropy", glue, "tab_study", "adamerging_miniature_entropy_study.csv")
glue("st_cos", f"{mean_off_diagonal(task_vector_cosines(pre, fts, tasks)):.3f}", display=False)
lw_entropy = np.asarray(runs["Layer-wise AdaMerging"]["history"]["task_entropy"])
focus = "housenum" if "housenum" in tasks else str(coupling_total.idxmax())  # the miniature's SVHN
worst = list(tasks).index(focus)
others = [i for i in range(len(tasks)) if i != worst]
glue("st_focus", focus, display=False)
glue("st_focus_sum", f"{coupling_total[focus]:+.2f}", display=False)
glue("st_h_worst_0", f"{lw_entropy[:10, worst].mean():.2f}", display=False)
glue("st_h_worst_1", f"{lw_entropy[-10:, worst].mean():.2f}", display=False)
glue("st_h_others_0", f"{lw_entropy[:10, others].mean():.2f}", display=False)
glue("st_h_others_1", f"{lw_entropy[-10:, others].mean():.2f}", display=False)

# %% [markdown]
# ```{glue:} tab_study
# ```
#
# The recorded miniature study (`tiny`, seed 0; not the active profile when that is a paper
# profile): layer-wise AdaMerging under three schedules and two objective temperatures T, and the
# miniature retrained against heads at scale 100. Each Δ is against that variant's Task Arithmetic
# at λ = 0.3 on the same test images; "below TA" counts the tasks that the run leaves below it.
# {download}`CSV <adamerging_miniature_entropy_study.csv>`
#
# ### A backbone pretrained to a sharper scale?
#
# The committed backbone was pretrained with label
# smoothing, which holds CLIP's learnable temperature near its starting value. A pilot
# (`benchmarks/miniature_pilot.py`) pretrained two short backbones, {glue:text}`pl_steps` steps on
# {glue:text}`pl_images` images each, with label smoothing {glue:text}`pl_ls_0` and
# {glue:text}`pl_ls_1`, and fine-tuned and merged each as the book does. Both are far weaker
# than the committed backbone (pretrained {glue:text}`pl_pre_0` and {glue:text}`pl_pre_1` %).
# Without smoothing the learned scale rises from {glue:text}`pl_scale_0` to
# {glue:text}`pl_scale_1`, not to 100, and the best layer-wise AdaMerging gain over Task Arithmetic
# goes from {glue:text}`pl_gain_0` to {glue:text}`pl_gain_1` points: at this budget it
# {glue:text}`pl_effect`.

# %% tags=["hide-input", "remove-output"]
publish_study("miniature_pilot", glue, "tab_pilot", "adamerging_miniature_pilot.csv")
publish_study("miniature_capacity", glue, "tab_capacity", "adamerging_miniature_capacity.csv")
publish_study("miniature_headroom", glue, "tab_headroom", "adamerging_miniature_headroom.csv",
              reported_gain=rep["Layer-wise AdaMerging"] - rep[ta_name], reported_gap=rep["Individual"] - rep[ta_name])
publish_study("miniature_regime", glue, "tab_regime", "adamerging_miniature_regime.csv")
publish_study("miniature_disentangle", glue, "tab_disentangle", "adamerging_miniature_disentangle.csv",
              reported_gap=rep["Individual"] - rep[ta_name])
publish_study("miniature_domains", glue, "tab_domains", "adamerging_miniature_domains.csv")
publish_study("miniature_pretraining", glue, "tab_pretraining", "adamerging_miniature_pretraining.csv",
              reported_gap=rep["Individual"] - rep[ta_name])

# %% [markdown]
# ```{glue:} tab_pilot
# ```
#
# The backbone pilot: one row per short pretraining run (label smoothing, the logit scale it
# learned), with the pretrained, individual and Task Arithmetic (λ = 0.3) averages, the housenum
# column sum of the coupling matrix, and layer-wise AdaMerging under two schedules (Δ against TA;
# "below TA" counts tasks). {download}`CSV <adamerging_miniature_pilot.csv>`
#
# ### A backbone with more room?
#
# A second pilot (`benchmarks/miniature_capacity.py`) pretrained
# backbones of other sizes the same way ({glue:text}`cap_steps` steps, label smoothing 0.1; one
# CPU thread: {glue:text}`cap_minutes`) and fine-tuned and merged each as the book does. For
# {glue:text}`cap_backbones`, layer-wise AdaMerging's gain over Task Arithmetic is
# {glue:text}`cap_gains` points: {glue:text}`cap_effect` (one seed per backbone and no interval, so
# a difference of about a point is within the noise). The largest gain, {glue:text}`cap_best_gain`,
# is still far from the {glue:text}`gain_rep_lw` points reported on CLIP, on backbones far weaker
# than the committed one. A larger committed backbone would multiply the book's CPU time (each
# pilot took the minutes above on one thread, before any chapter ran), which the 30-minute budget of
# a cold build does not allow.
# {glue:text}`cap_missing`
#
# ```{glue:} tab_capacity
# ```
#
# The width/depth pilot: one row per backbone (width × blocks; the 128 × 6 row is the pilot's
# backbone above, the committed backbone's shape), its parameter count and learned logit scale,
# the pretrained, individual and Task Arithmetic averages, the mean pairwise task-vector cosine,
# the housenum column sum, and layer-wise AdaMerging 300 × 1 (Δ against TA; "below TA" counts
# tasks). {download}`CSV <adamerging_miniature_capacity.csv>`
#
# ### How much room do the coefficients leave?
#
# The studies above change the objective or the
# backbone. A third (`benchmarks/miniature_headroom.py`, {glue:text}`hr_date`) changes neither: it
# keeps AdaMerging's loop on the first design's committed fine-tunes but learns λ *with labels*,
# by cross-entropy on the val images (*supervised*) or on the test images themselves (*oracle*: a
# transductive ceiling of the coefficient space, never a merging method), {glue:text}`hr_steps` steps (the oracle also
# {glue:text}`hr_long_steps`). Layer-wise, entropy gains {glue:text}`hr_lw_am` points over Task
# Arithmetic ({glue:text}`hr_ta` %), the val labels {glue:text}`hr_lw_sup` and the test labels
# {glue:text}`hr_lw_oracle`; task-wise, {glue:text}`hr_tw_am`, {glue:text}`hr_tw_sup` and
# {glue:text}`hr_tw_oracle`. So {glue:text}`hr_effect`. The oracle closes {glue:text}`hr_gap_oracle`
# of the gap between Task Arithmetic and the individual models ({glue:text}`hr_ind` %), where
# entropy alone closes {glue:text}`hr_gap_rep` of it on CLIP; entropy finds {glue:text}`hr_am_share`
# of the oracle's gain here. On the first design the compression therefore had two parts: the
# objective that misled on housenum (fixed by the design change above) and a coefficient space
# with less room than CLIP's, which remains: the design study's oracle column gives the current
# design's ceiling.
#
# ```{glue:} tab_headroom
# ```
#
# The headroom study: layer-wise and task-wise λ learned by entropy on unlabelled test images (the
# method), by cross-entropy on labelled val images, and by cross-entropy on the labelled test
# images (the oracle), each from λ = 0.3 with AdaMerging's clamp and batches of 16 per task.
# "Gap closed" is the gain over Task Arithmetic as a share of the individual − TA gap; "below TA"
# counts tasks. One seed, no intervals. {download}`CSV <adamerging_miniature_headroom.csv>`
#
# ### Another fine-tuning regime?
#
# The task vectors' size is set by the fine-tune: CLIP's come
# from fine-tunes at lr 1e-5 on the full datasets, the miniature's from {glue:text}`rg_ft_steps`
# steps at lr {glue:text}`rg_book_lr`. The regime study (`benchmarks/miniature_regime.py`,
# {glue:text}`rg_date`, on the current design; {glue:text}`rg_minutes` on one thread) re-fine-tunes
# the eight tasks at lr {glue:text}`rg_lrs` and merges each set as the book does. The relative
# task-vector norms are {glue:text}`rg_norms`, layer-wise AdaMerging gains {glue:text}`rg_am_gains`
# points over each regime's Task Arithmetic and the oracle {glue:text}`rg_oracle_gains`:
# {glue:text}`rg_effect` (one seed, no intervals). Larger task vectors interfere more, so Task
# Arithmetic at a fixed λ loses more and the labelled ceiling of the coefficients has more to
# repair, but in this recorded study entropy does not follow it there: a hotter fine-tune widens
# AdaMerging's gain by weakening the baseline, not by a better merge, and at the hottest rate
# entropy drives the merge below Task Arithmetic (see the table). A wider gap bought that way
# would make the miniature less like CLIP, not more, so the book keeps its regime.
#
# ```{glue:} tab_regime
# ```
#
# The fine-tuning regime study: one row per fine-tuning learning rate (the book's marked), with the
# relative task-vector norm ‖τ_k‖ / ‖θ_pre‖ averaged over tasks, the mean pairwise task-vector
# cosine, the individual and Task Arithmetic (λ = 0.3) averages, and layer-wise AdaMerging (entropy,
# 300 × 1) and the layer-wise oracle λ with their gains and the share of the gap they close.
# {download}`CSV <adamerging_miniature_regime.csv>`
#
# ### Scaling loss or interference?
#
# Task Arithmetic at λ = {glue:text}`dt_lambda` loses accuracy on a
# task for two reasons: its task vector is scaled down (*scaling loss*: individual minus the
# pretrained model plus λ·τ_t alone) and the other seven vectors are added (*interference*: that
# single-task model minus Task Arithmetic). The disentangling study
# (`benchmarks/miniature_disentangle.py`, {glue:text}`dt_date`; evaluation only) measures both on the
# committed fine-tunes. At λ = {glue:text}`dt_lambda` the scaling loss is {glue:text}`dt_scaling`
# points and the interference {glue:text}`dt_inter` ({glue:text}`dt_share` of the gap;
# {glue:text}`dt_worst` suffers most, {glue:text}`dt_worst_inter` points). At λ =
# {glue:text}`dt_top` the scaling loss is {glue:text}`dt_scaling_top` and the interference
# {glue:text}`dt_inter_top` (Task Arithmetic {glue:text}`dt_ta_top` %): {glue:text}`dt_effect`. This
# is the limit the oracle above meets: on the miniature, much of what separates Task Arithmetic
# from the individual models is interference that no choice of λ removes, which caps what
# AdaMerging can find. The size of the gap is not what differs: the miniature's
# ({glue:text}`dt_gap` points at λ = {glue:text}`dt_lambda`) is {glue:text}`dt_gap_compare` the
# paper's ({glue:text}`dt_gap_rep`), where entropy alone closes {glue:text}`hr_gap_rep` of it. How
# CLIP's gap splits between scaling loss and interference is not measured here: the study runs on
# the committed miniature only, and on the paper's checkpoints it is still to be run.
#
# ```{glue:} tab_disentangle
# ```
#
# The disentangling study: one row per uniform λ, with the averages over the eight tasks of the
# individual models, of each task vector alone (pre + λτ_t, evaluated on its own task) and of
# Task Arithmetic, and the individual − TA gap split into scaling loss and interference. One seed
# (the committed fine-tunes), no intervals. {download}`CSV <adamerging_miniature_disentangle.csv>`
#
# ### Does the interference come from a shared input domain?
#
# CLIP's eight tasks come from eight
# image domains; the miniature draws all eight as a glyph or shape on clutter, through one
# photometric finish. The input-domain study (`benchmarks/miniature_domains.py`,
# {glue:text}`dm_date`; {glue:text}`dm_minutes` on one thread) re-renders all eight tasks through a
# task-specific transform ({glue:text}`dm_variants`: a duotone colour cast per task, or a coloured
# border per task), re-fine-tunes them as the book does on the committed backbone, and splits
# Task Arithmetic's gap as above. Task Arithmetic averages {glue:text}`dm_ta` %; the interference
# is {glue:text}`dm_inter` points, layer-wise AdaMerging ({glue:text}`dm_steps` × 1) gains
# {glue:text}`dm_gains` and the oracle λ {glue:text}`dm_oracle` over each variant's TA. So
# {glue:text}`dm_effect`, and {glue:text}`dm_broken` (zero-shot {glue:text}`dm_zero` %). A design
# change earns its place only if it widens the gains that separate the methods, which is what the
# miniature compresses; by that test the book keeps its shared domain.
#
# ```{glue:} tab_domains
# ```
#
# The input-domain study: one row per variant (the first, {glue:text}`dm_baseline`, is the book's tasks), with
# the zero-shot, individual and Task Arithmetic (λ = 0.3) averages, TA's gap split into scaling
# loss and interference, and layer-wise AdaMerging (entropy) and the layer-wise oracle λ with their
# gains over TA; "below TA" counts tasks. One seed, no intervals.
# {download}`CSV <adamerging_miniature_domains.csv>`
#
# ### Does longer pretraining widen the gains?
#
# Task arithmetic works on CLIP because its task vectors are *weight-disentangled*: each one moves
# the network only on its own task's inputs, a property that
# [Ortiz-Jiménez et al. (2023)](https://arxiv.org/abs/2305.12827) find emerges during pretraining.
# The miniature's backbone is pretrained once, off the book's clock, so a longer pretraining costs
# a cold build nothing, where a larger backbone multiplies it. The pretraining study
# (`benchmarks/miniature_pretraining.py`, {glue:text}`pt_date`; {glue:text}`pt_minutes` on one
# thread) continues the committed backbone's pretraining on the same images and recipe
# ({glue:text}`pt_variants`), re-fine-tunes the eight tasks on each backbone as the book does, and
# measures them as the input-domain study does. Zero-shot averages are {glue:text}`pt_zero` %, the
# individual models {glue:text}`pt_ind` % and Task Arithmetic {glue:text}`pt_ta` %; the
# interference is {glue:text}`pt_inter` points. Layer-wise AdaMerging ({glue:text}`pt_steps` × 1)
# gains {glue:text}`pt_gains` points over each backbone's Task Arithmetic and the oracle λ
# {glue:text}`pt_oracle`. So, with one seed and no intervals (a point is within the noise):
# {glue:text}`pt_effect`. In this recorded study longer pretraining makes the task vectors
# interfere less and lifts Task Arithmetic, AdaMerging and the oracle alike, so the gaps that
# separate them shrink with the gap they all close: individual − Task Arithmetic is
# {glue:text}`pt_gap` points against the paper's {glue:text}`pt_gap_rep` (nearest:
# {glue:text}`pt_closest`). The compression of the gains is therefore not a lack of pretraining,
# and the book keeps the committed backbone.
#
# ```{glue:} tab_pretraining
# ```
#
# The pretraining-length study: one row per backbone (the first, {glue:text}`pt_baseline`, is the
# committed one, its row copied from the input-domain study), with the logit scale it learned, the
# zero-shot, individual and Task Arithmetic (λ = 0.3) averages, TA's gap split into scaling loss
# and interference, and layer-wise AdaMerging (entropy) and the layer-wise oracle λ with their
# gains over TA; "below TA" counts tasks. One seed, no intervals.
# {download}`CSV <adamerging_miniature_pretraining.csv>`
#
# ## What's next
# The Concrete subspace method learns a *mask* shared by all task vectors before (or while)
# adapting the coefficients.
