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

# %%

# %% [markdown]
# # Summary: every method beside all three papers
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/merging-reproduced/merging-reproduced/blob/main/notebooks/05_summary.ipynb)
#
# **What this page is.** One table of every method the book runs on the active profile, grouped
# as the papers group them: the reference rows (pretrained, individual, multi-task), training-free
# merges, merges that use data (Fisher, RegMean), and test-time adaptive merges. Our number carries
# its 95% bootstrap interval; beside it stands each paper's *own* reported number for the same
# method, so that where the papers disagree with one another (AdaMerging's layer-wise 80.1 in its
# own Table 1 against the Concrete paper's 80.9 for its 1000-step baseline) the reader sees it.
# Then: a figure of the averages, Kendall's τ between our ranking and the papers', and which of
# the papers' conclusions the miniature supports.
#
# **Nothing is rerun here.** The numbers are read from the caches that
# [chapter 01](01_task_arithmetic), [02](02_adamerging), [03](03_concrete_subspace),
# [04](04_cart_spectral) and [06](06_spectral_family) wrote, under the same names and parameters
# (`mergebook.summary`, `mergebook.results.lookup_only`). A chapter that has not run with this code
# on this profile is named below instead of being recomputed.
#
# ## Prerequisites
# | Concept | Importance |
# | --- | --- |
# | The chapters this page reads | Helpful |
# | Kendall's rank correlation | Helpful |
#
# **Time to learn:** 10 minutes. **Time to run:** under 30 s (it only reads caches).

# %% tags=["parameters"]
profile = "tiny"
device = "auto"
seed = 0
n_boot = 2000

# %% [markdown]
# ## Imports

# %%
import sys

if "google.colab" in sys.modules:  # Colab: install the library and the hub extras first
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "mergebook[hub] @ git+https://github.com/merging-reproduced/merging-reproduced@v0.2.0"], check=True)

import time

import matplotlib.pyplot as plt
import numpy as np
from myst_nb import glue

from mergebook import experiment as X
from mergebook import plotting
from mergebook import summary as S
from mergebook.profiles import load_suite
from mergebook.reference import reference_arch

t_start = time.perf_counter()
plotting.apply_style()
# with_mtl as chapter 01 loads it: its reference rows (and their cache key) include the MTL model
suite = load_suite(profile, device=device, with_mtl=True)
tasks = suite.tasks
sizes = {t: len(suite.test[t]) for t in tasks}

# %% [markdown]
# ## What the caches hold

# %% tags=["hide-input", "remove-output"]
chapters = S.collect(suite, profile)
notes = [ch.note() for ch in chapters if ch.note()]
glue("missing_note", " ".join(notes) if notes else
     "Every chapter's results were found in the cache for this profile and code.", display=False)
glue("n_methods", f"{sum(len(ch.rows) for ch in chapters)}", display=False)
glue("ref_arch", reference_arch(profile), display=False)

# %% [markdown]
# ```{admonition} Results read from the other chapters
# :class: note
# {glue:text}`missing_note`
# ```
#
# ## The grand table

# %% tags=["hide-input", "remove-output"]
grand = S.grand_frame(chapters, tasks, sizes, n_boot=n_boot, seed=seed)
reported = S.reported_columns(profile, list(grand.index))
shown = S.display_frame(grand, reported)
grand.join(reported).to_csv("summary_results.csv")
glue("tab_grand", shown, display=False)
per_task = grand[[t for t in tasks if t in grand.columns]].round(1)
per_task.insert(0, "group", grand["group"])
glue("tab_per_task", per_task, display=False)
glue("n_rows", f"{len(grand)}", display=False)

# %% [markdown]
# ```{glue:} tab_grand
# ```
#
# Average test accuracy (%) of the {glue:text}`n_rows` methods found, with the 95% bootstrap
# interval over test images (stratified by task; for adaptation runs cached with accuracies only,
# the same interval from their per-task counts), the chapter that ran it and its setting (λ or α
# chosen on validation, or the adaptation steps). The next columns are what each paper reports
# for the same method on {glue:text}`ref_arch` (– where it has no such row; the spectral family's
# numbers come from the authors' result files and FusionBench, see
# [chapter 06](06_spectral_family)). {download}`CSV <summary_results.csv>`
#
# ```{glue:} tab_per_task
# ```
#
# The same methods per task (%).
#
# ## Averages with intervals, ours against reported

# %% tags=["hide-input", "remove-output"]
fig, ax = plt.subplots(figsize=(8, 0.32 * max(len(grand), 4) + 1.2))
if len(grand):
    S.plot_averages(ax, grand, reported, plotting.color)
glue("fig_averages", fig, display=False)
plt.close(fig)

# %% [markdown]
# ```{glue:figure} fig_averages
# :name: fig-summary-averages
#
# Average accuracy of every method on the active profile (filled dots, one colour per method, with
# the 95% interval in black) and the averages each paper reports for it on {glue:text}`ref_arch`
# (open markers, one shape per paper). The miniature's scale differs from CLIP's: compare the
# orderings, not the levels.
# ```
#
# ## Does the miniature order the methods as the papers do?
#
# Kendall's τ-b between our averages and each paper's, over the merging methods both report (the
# reference rows are left out: their order is the same by construction), and against a consensus
# that takes each method's number from the first paper reporting it.

# %% tags=["hide-input", "remove-output"]
merges = grand[grand["group"] != "reference"]
tau = S.rank_agreement(merges["avg"].to_dict(), reported.loc[merges.index])
glue("tab_tau", tau.round(2), display=False)
tau_c = tau.iloc[-1]
glue("tau_consensus", "–" if not np.isfinite(tau_c["Kendall τ"]) else f"{tau_c['Kendall τ']:.2f}", display=False)
glue("tau_n", f"{int(tau_c['methods compared'])}", display=False)
glue("spread_consensus", "–" if not np.isfinite(tau_c["spread"]) else f"{tau_c['spread']:.2f}", display=False)

# %% [markdown]
# ```{glue:} tab_tau
# ```
#
# Kendall's τ of our ranking against each paper's over the methods both have (1: the same
# order; 0: unrelated; −1: reversed; – where fewer than two methods are shared), and the spread:
# the standard deviation of our averages over those methods divided by the paper's (1: the methods
# lie as far apart as in the paper; below 1: this profile compresses their differences).
#
# ## Which conclusions the miniature supports

# %% tags=["hide-input", "remove-output"]
claims, skipped = S.summary_claims(grand, reported)
verdicts = X.verdict_table(claims) if claims else None
if verdicts is not None:
    verdicts.to_csv("summary_verdicts.csv")
    glue("tab_verdicts", verdicts, display=False)
    held = verdicts.index[verdicts["verdict"] == X.HOLDS].tolist()
    partly = verdicts.index[verdicts["verdict"] == X.PARTLY].tolist()
    failed = verdicts.index[verdicts["verdict"] == X.FAILS].tolist()
else:
    glue("tab_verdicts", "No claim could be decided: run the chapters named above.", display=False)
    held, partly, failed = [], [], []
glue("claims_held", "; ".join(held) or "none", display=False)
glue("claims_partly", "; ".join(partly) or "none", display=False)
glue("claims_failed", "; ".join(failed) or "none", display=False)
glue("claims_skipped", "; ".join(skipped) or "none", display=False)
glue("n_decided", f"{len(claims)}", display=False)

# %% [markdown]
# ```{glue:} tab_verdicts
# ```
#
# Each comparison the papers draw, decided on our averages with their 95% intervals (holds: the
# intervals are apart; partly: only the point estimates are in order), beside the first paper that
# reports both methods. {download}`CSV <summary_verdicts.csv>`
#
# ## Reading
# Of the {glue:text}`n_decided` comparisons that this profile's runs can decide, these hold by
# their intervals: {glue:text}`claims_held`. By point estimates only: {glue:text}`claims_partly`.
# Not at this scale: {glue:text}`claims_failed`. Our ranking of the merging methods agrees with the
# papers' consensus with Kendall's τ = {glue:text}`tau_consensus` over {glue:text}`tau_n` methods,
# and the methods lie {glue:text}`spread_consensus` times as far apart as in the papers.
# Not decided here, because a method was not run or not found: {glue:text}`claims_skipped`.
#
# What the miniature cannot speak to: the absolute accuracies (its encoder has 1.2M parameters and
# 32-pixel tasks), the ViT-L/14 and ViT-B/16 tables, the size of the gains (compressed, as the
# spread above says; [chapter 02](02_adamerging) studies why), and the papers' exact adaptation
# budgets (the `tiny` runs take far fewer steps; the paper profiles in
# `notebooks/params/` restore them on a GPU).

# %% tags=["remove-cell"]
glue("runtime_s", f"{time.perf_counter() - t_start:.0f}", display=False)

# %% [markdown]
# This page ran in {glue:text}`runtime_s` s.
#
# ## What's next
# [The spectral family](06_spectral_family) sets TSV-M, Iso-C/CTS and DARE beside CART.
