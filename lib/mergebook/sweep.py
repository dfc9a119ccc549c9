"""Papermill sweeps on Dask: one executed notebook per parameter point, resumable, into one parquet.

    mergebook sweep NOTEBOOK --grid GRID.yaml --out runs/NAME [--workers N | --scheduler ADDRESS]
    mergebook sweep report runs/NAME [--x PARAM] [--metric avg_accuracy]

``GRID.yaml`` names a profile, the seeds, and either ``grid:`` (lists of values whose product is
swept) or ``points:`` (an explicit list of parameter mappings); ``fixed:`` values go to every
point. Every name must be a parameter of the notebook's ``parameters`` cell, checked before
anything runs. Each point is executed by papermill on its own copy, in its own kernel, with
``OMP_NUM_THREADS`` set to the threads it may use; its notebook reports its metrics by calling
:func:`record`, which writes JSON to the file named by ``$MERGEBOOK_SWEEP_RECORD`` (nothing is
ever parsed from printed text). The sweep keeps, under ``runs/NAME/points/<key>/``, the executed
notebook, the record and a ``point.json`` status written last. The key hashes the notebook's
source, the profile and the parameters, so a rerun skips finished points (a killed sweep
resumes) and a changed notebook reruns everything. ``runs/NAME/results.parquet`` holds one row
per point and is rewritten atomically after every finished point.

Dask's ``distributed`` runs the points: a ``LocalCluster`` of single-threaded worker processes by
default, or any running scheduler (``--scheduler tcp://host:8786``: SLURM through
dask-jobqueue, Kubernetes through dask-kubernetes). Points travel as source text and come back
as files' contents, so workers need the library and papermill but no shared filesystem.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from .artifacts import atomic_write

__all__ = [
    "RECORD_ENV", "SweepError", "Grid", "Point", "record", "notebook_parameters", "parse_parameters",
    "load_grid", "expand_grid", "point_key", "run_point", "run_sweep", "results_frame", "load_results",
    "report_figure", "report", "eval_subset", "finished", "EXAMPLE_NOTEBOOK", "CONSOLE_ENV",
]

#: environment variable naming the JSON file that :func:`record` writes (set for each point)
RECORD_ENV = "MERGEBOOK_SWEEP_RECORD"
#: the small sweepable notebook shipped with the library: one training-free merge, evaluated
EXAMPLE_NOTEBOOK = Path(__file__).resolve().parent / "assets" / "sweeps" / "merge_point.py"
KERNEL_NAME = "mergebook-sweep"
#: set by scripts/build_book.py in a chapter's kernel: a file it echoes to the build's console
CONSOLE_ENV = "MERGEBOOK_CONSOLE"
GRID_KEYS = {"profile", "seeds", "grid", "points", "fixed"}
RESERVED = {"profile", "seed"}  # set by the grid's own keys, never inside grid/points/fixed
RESULTS = "results.parquet"
#: columns of results.parquet that a parameter of the same name is renamed away from (param_NAME)
RESERVED_COLUMNS = {"key", "profile", "seed", "method", "status", "avg_accuracy", "wall_time_s", "error",
                    "notebook", "params_json"}
POINT_FILE = "point.json"
#: what a point's kernel gets: one OpenMP thread that sleeps when idle (spinning threads of
#: several kernels on a few cores made them 10-50x slower here; see tests/conftest.py)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


class SweepError(ValueError):
    """A problem with a sweep's inputs (grid, notebook, output folder): the user's to fix."""


# ----------------------------------------------------------------------------------------------
# What a point's notebook calls


def record(accuracy: Mapping[str, float], *, method: str | None = None, **metrics: float) -> Path | None:
    """Report a point's result: per-task accuracy (%), a method label for the report, other metrics.

    Writes JSON atomically to ``$MERGEBOOK_SWEEP_RECORD`` and returns that path; outside a sweep
    (the variable unset) it does nothing and returns ``None``, so the notebook also runs alone.
    A second call replaces the first.
    """
    bad = [k for k, v in [*accuracy.items(), *metrics.items()]
           if isinstance(v, (str, bytes, bool)) or not hasattr(v, "__float__")]
    if bad:
        raise SweepError(f"record(): values must be numbers (float, numpy or 0-d tensor); not {bad}")
    acc = {str(k): float(v) for k, v in accuracy.items() if k != "avg"}  # avg is recomputed
    if not acc:
        raise SweepError("record(accuracy=...) needs at least one task's accuracy")
    payload = {"accuracy": acc, "avg_accuracy": sum(acc.values()) / len(acc), "method": method,
               "metrics": {k: float(v) for k, v in metrics.items()}}
    target = os.environ.get(RECORD_ENV)
    if not target:
        return None
    atomic_write(target, lambda tmp: tmp.write_text(json.dumps(payload, indent=1)))
    return Path(target)


def eval_subset(suite: Any, n: int, seed: int) -> Any:
    """The suite with each task's test set cut to ``n`` images drawn with ``seed`` (a seeded test
    sample: what a sweep's band over seeds measures for a deterministic method)."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    test = {}
    for task, data in suite.test.items():
        idx = torch.randperm(len(data), generator=gen)[: min(int(n), len(data))]
        test[task] = dataclasses.replace(data, images=data.images[idx], labels=data.labels[idx])
    return dataclasses.replace(suite, test=test)


# ----------------------------------------------------------------------------------------------
# The notebook's parameters cell (the library twin of scripts/build_book.py's parser)


def parse_parameters(source: str) -> dict[str, Any]:
    """Names and defaults of a parameters cell; every statement must be ``name = <literal>``."""
    values: dict[str, Any] = {}
    for stmt in ast.parse(source).body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name)):
            raise SweepError(f"parameters cell: line {stmt.lineno} is not a plain 'name = literal'")
        try:
            values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        except ValueError as exc:
            raise SweepError(f"parameters cell: {stmt.targets[0].id} is not a literal ({exc})") from None
    return values


def _read_notebook(path: Path):
    import jupytext

    if not path.is_file():
        raise SweepError(f"notebook {path} does not exist (give a .py py:percent source or an .ipynb)")
    if path.suffix not in (".py", ".ipynb"):
        raise SweepError(f"notebook {path}: expected a .py (jupytext py:percent) or .ipynb file")
    return jupytext.read(str(path))


def notebook_parameters(path: str | os.PathLike) -> dict[str, Any]:
    """The parameters (name -> default) of the one cell tagged ``parameters`` in a notebook."""
    nb = _read_notebook(Path(path))
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise SweepError(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}; "
                         "tag the cell of defaults with `# %% tags=[\"parameters\"]`")
    return parse_parameters(cells[0].source)


# ----------------------------------------------------------------------------------------------
# The grid


@dataclasses.dataclass(frozen=True)
class Point:
    """One parameter point: everything papermill injects (profile and seed included) and its key."""

    key: str
    params: dict[str, Any]

    @property
    def seed(self) -> Any:
        return self.params.get("seed")


@dataclasses.dataclass
class Grid:
    """A sweep's definition: profile, seeds, and the points (without seeds) to cross with them."""

    profile: str
    seeds: list[int]
    points: list[dict[str, Any]]
    fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
    swept: list[str] = dataclasses.field(default_factory=list)  # names that vary, in grid order


def load_grid(spec: str | os.PathLike | Mapping[str, Any]) -> Grid:
    """Read and check a grid (a YAML file or the mapping it holds); see the module docstring."""
    where = "grid"
    if not isinstance(spec, Mapping):
        where = str(spec)
        path = Path(spec)
        if not path.is_file():
            raise SweepError(f"grid file {path} does not exist")
        try:
            spec = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise SweepError(f"{where}: not valid YAML ({exc})") from None
    if not isinstance(spec, Mapping):
        raise SweepError(f"{where}: must be a mapping with profile, seeds and grid (or points)")
    unknown = sorted(set(spec) - GRID_KEYS)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(GRID_KEYS)}")
    profile = spec.get("profile")
    if not isinstance(profile, str) or not profile:
        raise SweepError(f"{where}: needs `profile: NAME` (e.g. profile: tiny)")
    seeds = spec.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or any(not isinstance(s, int) or isinstance(s, bool) for s in seeds)):
        raise SweepError(f"{where}: seeds must be a non-empty list of integers, e.g. seeds: [0, 1, 2]")
    if len(set(seeds)) != len(seeds):
        raise SweepError(f"{where}: seeds {seeds} repeat a value")
    fixed = spec.get("fixed") or {}
    if not isinstance(fixed, Mapping):
        raise SweepError(f"{where}: fixed must be a mapping of parameter -> value")
    has_grid, has_points = "grid" in spec, "points" in spec
    if has_grid == has_points:
        raise SweepError(f"{where}: give exactly one of `grid:` (lists whose product is swept) or "
                         "`points:` (an explicit list of mappings)")
    if has_grid:
        grid = spec["grid"]
        if not isinstance(grid, Mapping) or not grid:
            raise SweepError(f"{where}: grid must be a non-empty mapping of parameter -> list of values")
        for name, values in grid.items():
            if not isinstance(values, list) or not values:
                raise SweepError(f"{where}: grid.{name} must be a non-empty list (write [{values!r}] "
                                 "for a single value, or move it to fixed:)")
        names = list(grid)
        points = [dict(zip(names, combo)) for combo in itertools.product(*grid.values())]
        swept = [n for n in names if len(grid[n]) > 1]
    else:
        points = spec["points"]
        if not isinstance(points, list) or not points or not all(isinstance(p, Mapping) for p in points):
            raise SweepError(f"{where}: points must be a non-empty list of mappings, e.g. "
                             "[{scaling_coef: 0.3}, {scaling_coef: 0.5}]")
        points = [dict(p) for p in points]
        names = list(dict.fromkeys(k for p in points for k in p))
        swept = [n for n in names if len({_canonical(p.get(n)) for p in points}) > 1]
    for p in points:
        clash = sorted((set(p) | set(fixed)) & RESERVED)
        if clash:
            raise SweepError(f"{where}: {clash} cannot be set in grid/points/fixed; use the top-level "
                             "`profile:` and `seeds:` keys")
        both = sorted(set(p) & set(fixed))
        if both:
            raise SweepError(f"{where}: {both} is both swept and fixed")
    seen: set[str] = set()
    for p in points:
        c = _canonical(p)
        if c in seen:
            raise SweepError(f"{where}: the point {p} is listed twice")
        seen.add(c)
    if len(seeds) > 1:
        swept.append("seed")
    return Grid(profile=profile, seeds=list(seeds), points=points, fixed=dict(fixed), swept=swept)


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def point_key(notebook_source: str | bytes, profile: str, params: Mapping[str, Any]) -> str:
    """The point's identity: a hash of the notebook's source, the profile and the parameters."""
    src = notebook_source.encode() if isinstance(notebook_source, str) else notebook_source
    h = hashlib.sha256(src)
    h.update(b"\0" + profile.encode() + b"\0" + _canonical(dict(params)).encode())
    return h.hexdigest()[:16]


def expand_grid(grid: Grid, notebook: str | os.PathLike) -> list[Point]:
    """Every point of ``grid`` × seeds for ``notebook``, checked against its parameters cell."""
    notebook = Path(notebook)
    defined = notebook_parameters(notebook)
    wanted = {"profile", "seed", *grid.fixed, *(k for p in grid.points for k in p)}
    missing = [n for n in wanted if n not in defined]
    if missing:
        raise SweepError(f"{notebook}: its parameters cell does not define {sorted(missing)} "
                         f"(it defines {sorted(defined)}); fix the name in the grid or add the "
                         "parameter to the notebook")
    source = notebook.read_bytes()
    out = []
    for p in grid.points:
        for seed in grid.seeds:
            params = {"profile": grid.profile, **p, **grid.fixed, "seed": seed}  # swept names first
            out.append(Point(key=point_key(source, grid.profile, params), params=params))
    return out


# ----------------------------------------------------------------------------------------------
# One point, on a worker


def _write_kernelspec(jupyter_dir: Path, env: Mapping[str, str]) -> None:
    """A kernelspec naming *this* interpreter (the worker's), with the point's environment."""
    kdir = jupyter_dir / "kernels" / KERNEL_NAME
    kdir.mkdir(parents=True, exist_ok=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "mergebook sweep point", "language": "python", "env": dict(env)}
    (kdir / "kernel.json").write_text(json.dumps(spec, indent=1))


def _notebook_error(nb_text: str) -> str | None:
    """``cell N: Ename: value`` of the first error output in an executed notebook, if any."""
    try:
        nb = json.loads(nb_text)
    except json.JSONDecodeError:
        return None
    code_cells = [c for c in nb.get("cells", []) if c.get("cell_type") == "code"]
    for i, cell in enumerate(code_cells):
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return f"code cell {i + 1}: {out.get('ename')}: {out.get('evalue')}"
    return None


def run_point(source: str, suffix: str, params: Mapping[str, Any], *, point_id: str = "",
              threads: int = 1, timeout: float | None = None, queue_name: str | None = None) -> dict[str, Any]:
    """Execute one point with papermill in a fresh kernel; return its outcome (never raises).

    The result carries the executed notebook's text, the record, status (``ok``/``failed``),
    the error, wall time and the tail of papermill's log, so the caller needs no shared disk.
    """
    _announce(queue_name, "start", point_id)
    try:
        return _run_point(source, suffix, params, point_id=point_id, threads=threads, timeout=timeout)
    finally:
        # Sent from the worker before the next point's "start", so the client never counts
        # more points running than there are workers.
        _announce(queue_name, "end", point_id)


def _announce(queue_name: str | None, event: str, point_id: str) -> None:
    """Tell the sweep's client that a point started or ended (its progress shows what runs)."""
    if not queue_name:
        return
    try:
        from distributed import Queue

        Queue(queue_name).put([event, point_id])
    except Exception:  # progress is a courtesy; never fail a point over it
        pass


def _run_point(source: str, suffix: str, params: Mapping[str, Any], *, point_id: str, threads: int,
               timeout: float | None) -> dict[str, Any]:
    start = time.perf_counter()
    result: dict[str, Any] = {"key": point_id, "status": "failed", "error": None, "record": None, "notebook": None,
                              "log": "", "host": os.uname().nodename, "started": time.time()}
    work = Path(tempfile.mkdtemp(prefix=f"mergebook-point-{point_id}-"))
    try:
        import jupytext

        src = work / f"source{suffix}"
        src.write_text(source)
        nb = jupytext.read(str(src))
        nb.metadata.pop("jupytext", None)
        nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "mergebook sweep point",
                                     "language": "python"}
        notebook_in, notebook_out = work / "input.ipynb", work / "notebook.ipynb"
        jupytext.write(nb, str(notebook_in))
        (work / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))
        record_path = work / "record.json"
        kernel_env = {RECORD_ENV: str(record_path), "OMP_WAIT_POLICY": "PASSIVE",
                      "TQDM_DISABLE": "1",  # the sweep's progress is the progress; cells stay clean
                      **{k: str(threads) for k in THREAD_ENV}}
        _write_kernelspec(work / "jupyter", kernel_env)
        env = {**os.environ, **kernel_env, "JUPYTER_PATH": str(work / "jupyter")}
        cmd = [sys.executable, "-m", "papermill", str(notebook_in), str(notebook_out), "-f", str(work / "params.yaml"),
               "-k", KERNEL_NAME, "--cwd", str(work), "--no-progress-bar", "--start-timeout", "300"]
        if timeout:
            cmd += ["--execution-timeout", str(int(timeout))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=None if not timeout else timeout * 4 + 300)
        result["log"] = (proc.stdout + proc.stderr)[-20000:]
        if notebook_out.exists():
            result["notebook"] = notebook_out.read_text()
        if record_path.exists():
            result["record"] = json.loads(record_path.read_text())
        if proc.returncode != 0:
            result["error"] = (_notebook_error(result["notebook"] or "")
                               or (proc.stderr.strip().splitlines() or ["papermill failed"])[-1])
        elif result["record"] is None:
            result["error"] = ("the notebook finished without calling mergebook.sweep.record(...): "
                               "add a last cell that records the point's accuracy")
        else:
            result["status"] = "ok"
    except subprocess.TimeoutExpired:
        result["error"] = f"papermill did not finish within {timeout * 4 + 300:.0f} s"
    except Exception as exc:  # a broken point must not stop the sweep
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["wall_s"] = time.perf_counter() - start
    return result


# ----------------------------------------------------------------------------------------------
# The run folder


def _point_dir(out: Path, key: str) -> Path:
    return out / "points" / key


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def finished(out: Path, key: str) -> bool:
    """Whether point ``key`` already succeeded in run folder ``out`` (its status file says ok)."""
    meta = _read_json(_point_dir(out, key) / POINT_FILE)
    return bool(meta and meta.get("status") == "ok" and (_point_dir(out, key) / "record.json").exists())


def _save_point(out: Path, point: Point, result: Mapping[str, Any], notebook_sha: str) -> None:
    """Write a point's files; ``point.json`` goes last, so it only exists for a complete point."""
    pdir = _point_dir(out, point.key)
    pdir.mkdir(parents=True, exist_ok=True)
    if result.get("notebook") is not None:
        atomic_write(pdir / "notebook.ipynb", lambda t: t.write_text(result["notebook"]))
    if result.get("record") is not None:
        atomic_write(pdir / "record.json", lambda t: t.write_text(json.dumps(result["record"], indent=1)))
    atomic_write(pdir / "log.txt", lambda t: t.write_text(result.get("log") or ""))
    meta = {"key": point.key, "params": point.params, "status": result["status"], "error": result.get("error"),
            "wall_s": result.get("wall_s"), "host": result.get("host"), "started": result.get("started"),
            "notebook_sha256": notebook_sha}
    atomic_write(pdir / POINT_FILE, lambda t: t.write_text(json.dumps(meta, indent=1, default=str)))


def _cell(value: Any) -> Any:
    """A parameter value as one parquet cell: scalars as they are, anything else as JSON."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return _canonical(value)


def results_frame(out: str | os.PathLike, points: Sequence[Point], grid: Grid | None = None):
    """One row per point (pending ones too): parameters, seed, method, status, accuracy, wall time.

    A parameter named like a result column (``method``, ``status``, ...) becomes ``param_NAME``;
    ``method`` is the label the notebook recorded (else the ``method`` parameter's value).
    """
    import pandas as pd

    out = Path(out)
    names = list(dict.fromkeys(k for p in points for k in p.params if k not in ("profile", "seed")))
    column = {n: f"param_{n}" if n in RESERVED_COLUMNS or n.startswith(("accuracy_", "metric_")) else n
              for n in names}
    rows, tasks = [], []
    for p in points:
        pdir = _point_dir(out, p.key)
        meta = _read_json(pdir / POINT_FILE) or {}
        rec = _read_json(pdir / "record.json") if meta.get("status") == "ok" else None
        row: dict[str, Any] = {"key": p.key, "profile": p.params["profile"]}
        row.update({column[n]: _cell(p.params.get(n)) for n in names})
        row["seed"] = p.params["seed"]
        row["method"] = (rec or {}).get("method") or _cell(p.params.get("method"))
        row["status"] = meta.get("status", "pending")
        row["avg_accuracy"] = (rec or {}).get("avg_accuracy", math.nan)
        for t, v in ((rec or {}).get("accuracy") or {}).items():
            if t not in tasks:
                tasks.append(t)
            row[f"accuracy_{t}"] = v
        for m, v in ((rec or {}).get("metrics") or {}).items():
            row[f"metric_{m}"] = v
        row["wall_time_s"] = meta.get("wall_s", math.nan)
        row["error"] = meta.get("error")
        row["notebook"] = str(Path("points") / p.key / "notebook.ipynb") if (pdir / "notebook.ipynb").exists() else None
        row["params_json"] = _canonical(p.params)
        rows.append(row)
    df = pd.DataFrame(rows)
    for t in tasks:
        df[f"accuracy_{t}"] = df.get(f"accuracy_{t}", math.nan)
    lead = ["key", "profile", *column.values(), "seed", "method", "status", "avg_accuracy", *[f"accuracy_{t}" for t in tasks]]
    rest = [c for c in df.columns if c not in lead]
    df = df[lead + rest]
    df["avg_accuracy"] = df["avg_accuracy"].astype(float)
    df["wall_time_s"] = df["wall_time_s"].astype(float)
    df.attrs["swept"] = grid.swept if grid else []
    return df


def _write_results(out: Path, points: Sequence[Point], grid: Grid) -> Any:
    df = results_frame(out, points, grid)
    table = _to_arrow(df, grid)
    import pyarrow.parquet as pq

    atomic_write(out / RESULTS, lambda t: pq.write_table(table, str(t)))
    return df


def _to_arrow(df: Any, grid: Grid):
    import pyarrow as pa

    table = pa.Table.from_pandas(df, preserve_index=False)
    # pandas 3 strings arrive as large_string; plain string keeps the schema the same everywhere
    table = table.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_large_string(f.type) else f
                                  for f in table.schema], metadata=table.schema.metadata))
    meta = dict(table.schema.metadata or {})
    meta[b"mergebook.sweep"] = json.dumps({"swept": grid.swept, "profile": grid.profile,
                                           "seeds": grid.seeds}).encode()
    return table.replace_schema_metadata(meta)


def load_results(out: str | os.PathLike):
    """``runs/NAME/results.parquet`` as a DataFrame (``.attrs['swept']``: the names that vary)."""
    import pyarrow.parquet as pq

    path = Path(out) / RESULTS
    if not path.exists():
        raise SweepError(f"{path} does not exist: run `mergebook sweep NOTEBOOK --grid GRID.yaml --out {out}` first")
    table = pq.read_table(str(path))
    df = table.to_pandas()
    info = json.loads((table.schema.metadata or {}).get(b"mergebook.sweep", b"{}"))
    df.attrs["swept"] = info.get("swept", [])
    return df


# ----------------------------------------------------------------------------------------------
# The sweep


class _Progress:
    """One line whenever the counts change: done, running, failed, pending (and skipped)."""

    def __init__(self, name: str, total: int, skipped: int, stream: Any, enabled: bool):
        self.name, self.total, self.skipped, self.stream, self.enabled = name, total, skipped, stream, enabled
        self.done = self.failed = 0
        self.running: set[str] = set()
        self.ending: set[str] = set()  # ended on its worker, its result not yet written here
        self.start = time.perf_counter()
        self._last = None

    def show(self, note: str = "") -> None:
        todo = self.total - self.skipped
        pending = todo - self.done - self.failed - len(self.running) - len(self.ending)
        counts = (self.done, len(self.running), self.failed, pending)
        if not self.enabled or (counts == self._last and not note):
            return
        self._last = counts
        el = time.perf_counter() - self.start
        line = (f"[sweep {self.name}] {self.done + self.skipped}/{self.total} done ({self.skipped} already), "
                f"{len(self.running)} running, {self.failed} failed, {max(pending, 0)} pending  "
                f"[{el:.0f} s]{'  ' + note if note else ''}")
        print(line, file=self.stream, flush=True)
        console = os.environ.get(CONSOLE_ENV)
        if console:  # inside `make book`: the build echoes this file to its console
            try:
                with open(console, "a", encoding="utf-8") as f:
                    f.write(line + "\n")
            except OSError:
                pass


def _make_client(workers: int | None, scheduler: str | None):
    """A Dask client: connected to ``scheduler``, else a new LocalCluster (closed with the client)."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    # the cores this process may use (a container or taskset can allow fewer than cpu_count)
    n = workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    # One point per worker at a time: with the default saturation a busy worker would hold a
    # second point back while another worker sits idle (and "running" would over-count).
    dask.config.set({"distributed.scheduler.worker-saturation": 1.0})
    cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                           env={"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "MKL_NUM_THREADS": "1"})
    return Client(cluster), cluster


def run_sweep(notebook: str | os.PathLike, grid: Grid | str | os.PathLike | Mapping[str, Any],
              out: str | os.PathLike, *, workers: int | None = None, scheduler: str | None = None,
              client: Any = None, threads: int = 1, timeout: float | None = None, progress: bool = True,
              stream: Any = None):
    """Run every point of ``grid`` not yet finished in ``out``; return the results DataFrame.

    ``workers=0`` runs the points one after another in this process (no Dask; for debugging);
    otherwise a LocalCluster of ``workers`` single-threaded processes (default: one per core),
    or the cluster at ``scheduler``, or an existing ``client``.
    """
    notebook = Path(notebook)
    grid = grid if isinstance(grid, Grid) else load_grid(grid)
    if workers is not None and workers < 0:
        raise SweepError(f"--workers {workers}: give 0 (in this process), or a positive number")
    if scheduler and workers:
        raise SweepError("give either --workers (a local cluster) or --scheduler (an existing one), not both")
    points = expand_grid(grid, notebook)  # validates before anything runs
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    source_bytes = notebook.read_bytes()
    notebook_sha = hashlib.sha256(source_bytes).hexdigest()
    source = source_bytes.decode()
    todo = [p for p in points if not finished(out, p.key)]
    atomic_write(out / "sweep.json", lambda t: t.write_text(json.dumps(
        {"notebook": str(notebook), "notebook_sha256": notebook_sha, "profile": grid.profile, "seeds": grid.seeds,
         "points": grid.points, "fixed": grid.fixed, "swept": grid.swept, "keys": [p.key for p in points]},
        indent=1, default=str)))
    bar = _Progress(out.name, len(points), len(points) - len(todo), stream or sys.stderr, progress)
    bar.show()

    written: set[str] = set()  # points whose result finish() has saved

    def finish(point: Point, result: Mapping[str, Any]) -> None:
        _save_point(out, point, result, notebook_sha)
        bar.running.discard(point.key)  # its "end" message may still be on its way
        bar.ending.discard(point.key)
        written.add(point.key)
        if result["status"] == "ok":
            bar.done += 1
            bar.show()
        else:
            bar.failed += 1
            bar.show(f"point {point.key} {_short(point.params)} failed: {result.get('error')}")
        _write_results(out, points, grid)

    if not todo:
        return _write_results(out, points, grid)
    if workers == 0 and client is None and not scheduler:
        for p in todo:
            bar.running.add(p.key)
            bar.show()
            finish(p, run_point(source, notebook.suffix, p.params, point_id=p.key, threads=threads,
                                timeout=timeout))
        return results_frame(out, points, grid)

    own_client, cluster = (client, None) if client is not None else _make_client(workers, scheduler)
    try:
        from distributed import Queue, as_completed

        qname = f"mergebook-sweep-{uuid.uuid4().hex}"
        queue = Queue(qname, client=own_client)
        by_key = {p.key: p for p in todo}
        # (``key=`` would be Dask's own task-key argument, hence ``point_id``)
        futures = {own_client.submit(run_point, source, notebook.suffix, p.params, point_id=p.key, threads=threads,
                                     timeout=timeout, queue_name=qname, pure=False): p for p in todo}
        pending = as_completed(futures)
        while not pending.is_empty():
            for event, key in queue.get(batch=True):
                if key in by_key and event == "start" and key not in written:
                    bar.running.add(key)
                elif key in by_key and key not in written:
                    bar.running.discard(key)
                    bar.ending.add(key)
            bar.show()
            batch = pending.next_batch(block=False)
            if not batch:
                time.sleep(0.5)
                continue
            for fut in batch:
                try:
                    result = fut.result()
                except Exception as exc:  # the worker died under the point: record it, go on
                    result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "wall_s": math.nan}
                finish(futures[fut], result)
    finally:
        if client is None:
            own_client.close()
        if cluster is not None:
            cluster.close()
    return results_frame(out, points, grid)


def _short(params: Mapping[str, Any]) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in params.items() if k != "profile") + ")"


# ----------------------------------------------------------------------------------------------
# The report


def _pick_x(df: Any, x: str | None) -> str:
    swept = [s for s in (df.attrs.get("swept") or []) if s not in ("seed", "method")]
    if x:
        if x not in df.columns:
            raise SweepError(f"--x {x}: not a column of the results; swept parameters: {swept}")
        return x
    numeric = [s for s in swept if s in df.columns and _is_numeric(df[s])]
    if len(numeric) != 1:
        raise SweepError(f"cannot choose the x axis: the numeric swept parameters are {numeric}; "
                         "name one with --x PARAM")
    return numeric[0]


def _is_numeric(col: Any) -> bool:
    import pandas as pd

    return pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)


def report_figure(df: Any, x: str | None = None, metric: str = "avg_accuracy", ax: Any = None):
    """The standard figure: ``metric`` against the swept parameter, one line per method, a band
    (min to max) over seeds, in the book's style and method colours."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from . import plotting

    x = _pick_x(df, x)
    if metric not in df.columns:
        raise SweepError(f"--metric {metric}: not a column; try avg_accuracy or one of "
                         f"{[c for c in df.columns if c.startswith(('accuracy_', 'metric_'))]}")
    ok = df[df["status"] == "ok"].copy()
    ok["method"] = ok["method"].fillna("all points")  # a notebook that records no method label
    if ok.empty:
        raise SweepError("no finished point to plot (every point failed or is pending)")
    plotting.apply_style()
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.8))
    methods = list(dict.fromkeys(ok["method"]))
    sns.lineplot(data=ok, x=x, y=metric, hue="method", hue_order=methods, ax=ax, marker="o",
                 errorbar=("pi", 100), estimator="mean",
                 palette={m: plotting.color(m) for m in methods})
    n_seeds = ok["seed"].nunique()
    ax.set_xlabel(x)
    ax.set_ylabel(metric.replace("_", " ") + (" (%)" if "accuracy" in metric else ""))
    ax.set_title(f"{ok['profile'].iloc[0]}: mean over {n_seeds} seed{'s' if n_seeds != 1 else ''}, band min-max")
    ax.legend(title=None)
    return ax.figure


def report(out: str | os.PathLike, *, x: str | None = None, metric: str = "avg_accuracy",
           figure: str | os.PathLike | None = None) -> tuple[Path, Any]:
    """Draw the report of a run folder into ``figure`` (default ``runs/NAME/report.png``)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    df = load_results(out)
    fig = report_figure(df, x=x, metric=metric)
    target = Path(figure) if figure else Path(out) / "report.png"
    atomic_write(target, lambda t: fig.savefig(t, format=target.suffix.lstrip(".") or "png"))
    plt.close(fig)
    xname = _pick_x(df, x)
    summary = (df[df["status"] == "ok"].groupby(["method", xname])[metric]
               .agg(["mean", "min", "max", "count"]).round(2))
    return target, summary


# ----------------------------------------------------------------------------------------------
# The command line (registered with mergebook.cli)


def _cmd_sweep(args: Any) -> int:
    from .cli import UsageError

    if args.target == "report":
        if not args.run_dir or args.grid or args.out:
            raise UsageError("usage: mergebook sweep report runs/NAME [--x PARAM] [--metric COLUMN]")
        target, summary = report(args.run_dir, x=args.x, metric=args.metric, figure=args.figure)
        print(summary.to_string())
        print(f"figure: {target}")
        return 0
    if args.run_dir:
        raise UsageError(f"unexpected argument {args.run_dir!r}: usage: mergebook sweep NOTEBOOK --grid GRID.yaml "
                         "--out runs/NAME")
    if not args.grid or not args.out:
        raise UsageError("mergebook sweep NOTEBOOK needs --grid GRID.yaml and --out runs/NAME")
    df = run_sweep(args.target, args.grid, args.out, workers=args.workers, scheduler=args.scheduler,
                   threads=args.threads, timeout=args.point_timeout or None)
    counts = df["status"].value_counts().to_dict()
    print(f"{len(df)} points: {counts.get('ok', 0)} ok, {counts.get('failed', 0)} failed; "
          f"results: {Path(args.out) / RESULTS}")
    for _, row in df[df["status"] == "failed"].iterrows():
        print(f"  failed {row['key']}: {row['error']} (notebook: {Path(args.out) / str(row['notebook'])})")
    return 1 if counts.get("failed") else 0


def _setup_sweep(sub: Any) -> None:
    p = sub.add_parser(
        "sweep", help="run a notebook over a parameter grid on Dask (resumable), or draw a sweep's report",
        description="mergebook sweep NOTEBOOK --grid GRID.yaml --out runs/NAME [--workers N | --scheduler ADDR]\n"
                    "mergebook sweep report runs/NAME [--x PARAM] [--metric COLUMN]\n\n"
                    "GRID.yaml: profile: tiny / seeds: [0, 1, 2] / grid: {scaling_coef: [0.1, 0.3]} "
                    "(or points: [{...}, ...]; fixed: {...} for every point).",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="NOTEBOOK|report", help="the notebook (.py or .ipynb), or `report`")
    p.add_argument("run_dir", nargs="?", metavar="runs/NAME", help="(report) the run folder")
    p.add_argument("--grid", metavar="GRID.yaml", help="the grid file")
    p.add_argument("--out", metavar="runs/NAME", help="the run folder (reused: finished points are skipped)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None,
                       help="local single-threaded workers (default: one per core; 0: in this process, no Dask)")
    where.add_argument("--scheduler", metavar="ADDRESS", help="connect to a running Dask scheduler, e.g. tcp://host:8786")
    p.add_argument("--threads", type=int, default=1, help="OpenMP/torch threads per point (default 1)")
    p.add_argument("--point-timeout", type=float, default=0, help="seconds one cell of a point may run (0: no limit)")
    p.add_argument("--x", help="(report) the x-axis parameter (default: the one numeric swept parameter)")
    p.add_argument("--metric", default="avg_accuracy", help="(report) the y column (default avg_accuracy)")
    p.add_argument("--figure", help="(report) where to write the figure (default runs/NAME/report.png)")
    p.set_defaults(func=_cmd_sweep)


def _register() -> None:
    from .cli import register_subcommand

    register_subcommand("sweep", _setup_sweep)


_register()
