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
# # Sweeps: one notebook, many parameter points, any cluster
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/merging-reproduced/merging-reproduced/blob/main/notebooks/08_sweeps.ipynb)
#
# **What this chapter shows.** Every claim in this book hangs on hyperparameters: Task
# Arithmetic's $\lambda$, CART's rank, AdaMerging's learning rate, Concrete's temperature, and
# the seed. `mergebook sweep` runs a notebook once per point of a grid, with papermill, on a
# Dask cluster: a local one here, a SLURM or Kubernetes one when a paper profile needs GPUs.
# Each point keeps its executed notebook and reports its numbers through
# `mergebook.sweep.record`, and all of them land in one parquet file. This chapter runs a real
# small sweep on the miniature, Task Arithmetic and Ties-Merging over $\lambda$ and seeds, on two
# local workers, and draws its figure from that parquet file.
#
# ## Overview
# 1. A grid, and the notebook it sweeps.
# 2. Running it here: a `LocalCluster` of single-threaded workers, and resuming a sweep.
# 3. The results file and the standard figure.
# 4. The same sweep on a cluster: SLURM (dask-jobqueue) and Kubernetes.
#
# ## Prerequisites
# | Concept | Importance |
# | --- | --- |
# | [Task arithmetic and Ties-Merging](01_task_arithmetic) | Necessary |
# | Papermill parameters cells | Helpful |
# | Dask `distributed` (a scheduler, workers, futures) | Helpful |
#
# **Time to learn:** 15 minutes. **Time to run:** about 2 minutes on a 2-core CPU (`tiny`, with
# the fine-tuned models cached by [the benchmark chapter](00_suite)).
#
# ```{admonition} Miniature numbers
# :class: note
# With the default `tiny` profile, the accuracies here come from the offline miniature described
# in [the benchmark chapter](00_suite). The merges are deterministic, so what the seeds vary here
# is the evaluation sample: each seed draws its own `eval_per_task` test images per task. The
# band over seeds is therefore the noise of a smaller test set, not of training.
# ```

# %% tags=["parameters"]
profile = "tiny"
device = "auto"
seed = 0
sweep_workers = 2
methods = ["task_arithmetic", "ties"]
scaling_coefs = [0.2, 0.4, 0.6]
seeds = [0, 1]
eval_per_task = 300
run_name = "08_ta_ties"

# %% [markdown]
# ## Imports

# %%
import sys

if "google.colab" in sys.modules:  # Colab: install the library and the book extras first
    import subprocess

    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "mergebook[book] @ git+https://github.com/merging-reproduced/merging-reproduced@v0.2.0"], check=True)

import time
from pathlib import Path

import matplotlib.pyplot as plt
import yaml
from myst_nb import glue

from mergebook import plotting, sweep

plotting.apply_style()

# %% [markdown]
# ## A grid and the notebook it sweeps
#
# A sweep is two files. The **notebook** is an ordinary one whose `parameters` cell holds
# literal defaults; the library ships a small one, `mergebook/assets/sweeps/merge_point.py`,
# which merges the profile's fine-tuned models with one registered method, evaluates the merge,
# and ends with `sweep.record(accuracy, method=...)`. The **grid** names the profile and the
# seeds, and gives either lists of values whose product is swept (`grid:`) or an explicit list
# of points (`points:`); `fixed:` values go to every point. Here it is, written to the run folder
# so the command line below can run the same sweep:

# %%
grid = {"profile": profile, "seeds": seeds,
        "grid": {"method": methods, "scaling_coef": scaling_coefs},
        "fixed": {"eval_per_task": eval_per_task}}
out = Path("runs") / run_name
out.mkdir(parents=True, exist_ok=True)
(out / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))
points = sweep.expand_grid(sweep.load_grid(grid), sweep.EXAMPLE_NOTEBOOK)
print((out / "grid.yaml").read_text())

# %% [markdown]
# Before anything runs, every name in the grid is checked against the notebook's parameters
# cell: a typo such as `scaling_coeff` stops the sweep with an error that names it and lists the
# parameters the notebook does define. Each point's key hashes the notebook's source, the
# profile and the parameters, so editing the notebook reruns every point, and nothing else does.
#
# ## Running it here
#
# From a shell, in the repository:
#
# ```bash
# mergebook sweep lib/mergebook/assets/sweeps/merge_point.py --grid grid.yaml --out runs/08_ta_ties --workers 2
# mergebook sweep report runs/08_ta_ties        # the figure below, as runs/08_ta_ties/report.png
# ```
#
# From Python it is one call. The default cluster is a `LocalCluster` with one single-threaded
# worker process per core, and every point's kernel gets `OMP_NUM_THREADS=1` (and
# `OMP_WAIT_POLICY=PASSIVE`), so the workers do not fight over the cores. Progress (points done,
# running, failed) goes to stderr; a failed point records its error, keeps its notebook up to
# the failing cell, and the other points go on.

# %%
start = time.perf_counter()
results = sweep.run_sweep(sweep.EXAMPLE_NOTEBOOK, grid, out, workers=sweep_workers)
sweep_seconds = time.perf_counter() - start
results[["method", "scaling_coef", "seed", "status", "avg_accuracy", "wall_time_s"]].round(2)

# %% [markdown]
# Running the same call again skips every finished point: this is how an interrupted sweep
# resumes (a point counts as finished once its `point.json` says `ok`; failed points are tried
# again).

# %% tags=["hide-input", "remove-output"]
start = time.perf_counter()
again = sweep.run_sweep(sweep.EXAMPLE_NOTEBOOK, grid, out, workers=sweep_workers, progress=False)
rerun_seconds = time.perf_counter() - start
ok = results[results["status"] == "ok"]
glue("n_points", f"{len(points)}", display=False)
glue("n_ok", f"{len(ok)}", display=False)
glue("n_workers", f"{sweep_workers}", display=False)
glue("sweep_seconds", f"{sweep_seconds:.0f}", display=False)
glue("point_seconds", f"{ok['wall_time_s'].mean():.1f}", display=False)
glue("busy_seconds", f"{ok['wall_time_s'].sum():.0f}", display=False)
glue("rerun_seconds", f"{rerun_seconds:.2f}", display=False)
glue("n_seeds", f"{len(seeds)}", display=False)
glue("rerun_same", "the same" if again["avg_accuracy"].equals(results["avg_accuracy"]) else "different", display=False)

# %% [markdown]
# The sweep ran {glue:text}`n_points` points ({glue:text}`n_ok` of them succeeded) on
# {glue:text}`n_workers` local workers in {glue:text}`sweep_seconds` s of wall time; one point
# took {glue:text}`point_seconds` s on average (most of it starting a kernel and importing
# torch), {glue:text}`busy_seconds` s in all. The rerun found every point finished and took
# {glue:text}`rerun_seconds` s, with {glue:text}`rerun_same` results.
#
# ## The results file and the standard figure
#
# `runs/NAME/results.parquet` has one row per point: the swept and fixed parameters, the seed,
# the method label the notebook recorded, the status, the average and per-task accuracies, the
# wall time, the error of a failed point and the path of its executed notebook. It is rewritten
# atomically after every point, so a half-finished sweep can already be read (this build's file:
# {download}`results.parquet <runs/08_ta_ties/results.parquet>`). The figure is drawn from the
# file alone, by the same function as `mergebook sweep report`:

# %% tags=["hide-input", "remove-output"]
frame = sweep.load_results(out)
fig = sweep.report_figure(frame, x="scaling_coef")
glue("fig_sweep_report", fig, display=False)
plt.close(fig)
summary = (frame[frame["status"] == "ok"].groupby(["method", "scaling_coef"])["avg_accuracy"]
           .agg(["mean", "min", "max"]).round(1))
summary.columns = ["mean over seeds (%)", "min (%)", "max (%)"]
glue("tab_sweep_summary", summary, display=False)
best = summary["mean over seeds (%)"].groupby(level="method").idxmax()
spread = (summary["max (%)"] - summary["min (%)"]).max()
glue("ta_best_lam", f"{best['Task Arithmetic'][1]:g}", display=False)
glue("ta_best", f"{summary.loc[best['Task Arithmetic'], 'mean over seeds (%)']:.1f}", display=False)
glue("ties_best_lam", f"{best['Ties-Merging (sum)'][1]:g}", display=False)
glue("ties_best", f"{summary.loc[best['Ties-Merging (sum)'], 'mean over seeds (%)']:.1f}", display=False)
glue("max_spread", f"{spread:.1f}", display=False)

# %% [markdown]
# ```{glue:figure} fig_sweep_report
# :name: fig-sweep-report
#
# Average accuracy (%) of the merged model against $\lambda$, one line per method (the book's
# colours), the mean over seeds with a band from the lowest to the highest seed. Drawn from
# `runs/08_ta_ties/results.parquet` by `mergebook.sweep.report_figure`.
# ```
#
# ```{glue:} tab_sweep_summary
# ```
#
# Average accuracy (%) per method and $\lambda$ over the seeds. On this sample Task Arithmetic
# peaks at $\lambda$ = {glue:text}`ta_best_lam` ({glue:text}`ta_best` %) and Ties-Merging at
# $\lambda$ = {glue:text}`ties_best_lam` ({glue:text}`ties_best` %). The widest band is
# {glue:text}`max_spread` points: the spread between {glue:text}`n_seeds` seeds' evaluation samples of
# `eval_per_task` images per task, which is why a comparison of methods on a small test set needs
# more than one draw. [Chapter 1](01_task_arithmetic) sweeps a finer grid on the full test sets.
#
# ## The same sweep on a cluster
#
# `--scheduler ADDRESS` connects to a running Dask scheduler instead of starting a local
# cluster. A point travels to its worker as the notebook's source text and comes back as the
# executed notebook and its record, so the workers need the same installation (`pip install
# -e '.[book]'`: mergebook, papermill, jupytext, ipykernel), and access to the profile's data
# and weights, but no shared filesystem with the machine that runs `mergebook sweep`; the run
# folder stays there.
#
# **SLURM**, with [dask-jobqueue](https://jobqueue.dask.org): start the cluster from a login
# node, one single-GPU job per worker, and point the sweep at its scheduler:
#
# ```python
# from dask_jobqueue import SLURMCluster
#
# cluster = SLURMCluster(queue="gpu", cores=8, processes=1, memory="64GB", walltime="04:00:00",
#                        job_extra_directives=["--gres=gpu:1"],
#                        job_script_prologue=["source .venv/bin/activate"])
# cluster.scale(jobs=8)          # eight GPUs, one point each at a time
# print(cluster.scheduler_address)
# ```
#
# ```bash
# mergebook sweep lib/mergebook/assets/sweeps/merge_point.py --grid grid.yaml --out runs/08_ta_ties \
#     --scheduler tcp://login-node:8786 --threads 8
# ```
#
# `--threads 8` gives each point's kernel the job's eight cores (`OMP_NUM_THREADS=8`); the
# default, one, is right for a local cluster of one worker per core.
#
# **Kubernetes**: the Dask Helm chart or [dask-kubernetes](https://kubernetes.dask.org)'s
# `KubeCluster` starts a scheduler service and worker pods from an image with the project
# installed (one GPU per worker pod, `--nthreads 1`). Forward or expose the scheduler's port
# and run the same command with `--scheduler tcp://<scheduler-service>:8786`.
#
# A killed sweep, on any cluster, resumes where it stopped: run the same command again.
#
# ## Summary
# A sweep here is a notebook with a parameters cell, a grid file, and one command; its
# {glue:text}`n_points` points ran in {glue:text}`sweep_seconds` s on {glue:text}`n_workers`
# local workers and resumed in {glue:text}`rerun_seconds` s. The same command scales out by
# pointing `--scheduler` at a SLURM or Kubernetes Dask cluster, and the parquet file and the
# figure do not change.
#
# ## What's next
# Sweep a chapter's own parameters: any notebook whose parameters cell defines the names in the
# grid can be swept, provided it ends by calling `mergebook.sweep.record`.
