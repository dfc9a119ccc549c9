#!/usr/bin/env python
"""Build the book: execute every chapter with papermill on copies, then run jupyter-book on them.

Run it with the project's virtual environment (``make book`` does)::

    .venv/bin/python scripts/build_book.py                      # whole book, profile "tiny"
    .venv/bin/python scripts/build_book.py --profile vit-b-32   # a paper profile (GPU + internet)
    .venv/bin/python scripts/build_book.py --only 01_task_arithmetic -p seed=1

Where things go (everything lives under ``_build/``, which ``make clean`` removes):

``_build/src/notebooks/NN_name.{py,ipynb}``
    copies of the jupytext sources and the notebooks converted from them (never executed);
    the committed ``notebooks/*`` files are only read.
``_build/stage/``
    the tree that Sphinx reads. It mirrors the repository's relative paths (``_config.yml``,
    ``_toc.yml``, ``book/``, ``notebooks/NN_name.ipynb``), so ``_toc.yml`` names
    ``notebooks/00_suite`` exactly as in the repository and the Colab buttons point at the
    committed ``notebooks/00_suite.ipynb``. Its notebooks are papermill's *executed* outputs; each
    one also ran with this folder as its working directory (papermill ``--cwd``), so anything a
    chapter writes next to itself lands here, not in the repository.
``_build/html/``
    the book (``jupyter-book build _build/stage --path-output .``). Start at ``index.html``.
``_build/jupyter/kernels/python3/``
    the kernelspec that papermill uses: it names *this* interpreter (the venv's python), and
    ``JUPYTER_PATH`` puts it ahead of any user-wide ``python3`` kernel. Nothing is registered
    globally.

Parameters: ``notebooks/params/<profile>.yaml`` is a flat mapping of keys shared by the chapters
(``profile``, ``device``, ``seed``, ...). A chapter receives only the keys that its own
``parameters`` cell defines, so papermill never warns about unknown parameters; ``-p key=value``
overrides (YAML-parsed, so ``-p lambdas=[0.2,0.3]`` is a list) go the same way.
Progress: the console shows, per chapter, a line for every code cell with its elapsed time (and a
"still running" line every 30 s for a long one), and the chapters' tqdm bars (training,
adaptation). The bars never enter the notebooks: a startup file in every kernel points tqdm at
``_build/logs/NN_name.bars.log``, which this script echoes to its stderr as the file grows (on a
terminal the bars animate; in a log, such as CI's, they update every 10 s, one line each). The logs
stay in ``_build/logs/`` for a failed build's report. ``--quiet`` turns both off (and the bars
with ``TQDM_DISABLE=1``).
The execution-time page (``book/execution_times.md``) is written into the stage from papermill's
metadata just before Sphinx runs.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import html
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "_build"
NOTEBOOK_DIR = "notebooks"
PARAMS_DIR = ROOT / NOTEBOOK_DIR / "params"
EXECUTION_TIMES_PAGE = "book/execution_times.md"
KERNEL_NAME = "python3"  # the name the committed notebooks carry; resolved to our interpreter

# Copied into the stage next to the executed notebooks; everything Sphinx reads besides them.
STAGED_FILES = ["_config.yml", "_toc.yml"]
STAGED_DIRS = ["book"]


class BuildError(RuntimeError):
    """A problem with the book's sources or configuration (not a failing cell)."""


# --------------------------------------------------------------------------------------------
# The table of contents and the chapters in it
# --------------------------------------------------------------------------------------------


def toc_entries(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Every ``root``/``file`` entry of a jupyter-book ``_toc.yml``, in reading order."""
    toc = yaml.safe_load(toc_path.read_text())
    found: list[str] = [toc["root"]]

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                found.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []) or []:
                    walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(toc)
    return found


def is_notebook_entry(entry: str) -> bool:
    """A toc entry is a chapter notebook when it lives in ``notebooks/``."""
    return entry.split("/", 1)[0] == NOTEBOOK_DIR


def toc_notebooks(toc_path: Path = ROOT / "_toc.yml") -> list[str]:
    """Stems (``00_suite``) of the chapter notebooks in ``_toc.yml``, in reading order."""
    return [Path(e).name for e in toc_entries(toc_path) if is_notebook_entry(e)]


def notebook_sources(root: Path = ROOT) -> list[Path]:
    """The jupytext sources ``notebooks/NN_*.py`` (the reviewed source of every chapter)."""
    return sorted((root / NOTEBOOK_DIR).glob("[0-9][0-9]_*.py"))


def read_notebook(path: Path):
    """Read a ``.py`` (py:percent) or ``.ipynb`` notebook into an nbformat node via jupytext."""
    import jupytext

    return jupytext.read(str(path))


def strip_markup(text: str) -> str:
    """Plain words of a markdown/HTML title, for comparing a source title with rendered HTML."""
    text = html.unescape(re.sub(r"<[^>]+>", " ", text))
    text = re.sub(r"[*_`$\\]", "", text)
    return " ".join(text.split())


def page_title(path: Path) -> str:
    """The first level-1 heading of a notebook's markdown or of a markdown page."""
    if path.suffix in (".py", ".ipynb"):
        texts = [c.source for c in read_notebook(path).cells if c.cell_type == "markdown"]
    else:
        texts = [path.read_text()]
    for text in texts:
        for line in text.splitlines():
            if line.startswith("# "):
                return line[2:].strip()
    raise BuildError(f"{path}: no level-1 heading ('# Title') to use as the page title")


# --------------------------------------------------------------------------------------------
# The parameters cell
# --------------------------------------------------------------------------------------------


def parameters_cell_index(nb) -> int:
    """Index (among all cells) of the single cell tagged ``parameters``."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise BuildError(f"expected exactly one cell tagged 'parameters', found {len(tagged)}")
    return tagged[0]


def parse_parameters(source: str) -> dict[str, Any]:
    """Names and default values of a parameters cell; every statement must be ``name = <literal>``."""
    values: dict[str, Any] = {}
    for stmt in ast.parse(source).body:
        if not (isinstance(stmt, ast.Assign) and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)):
            raise BuildError(f"parameters cell: line {stmt.lineno} is not a plain 'name = literal'")
        try:
            values[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        except ValueError as exc:
            raise BuildError(f"parameters cell: {stmt.targets[0].id} is not a literal ({exc})") from None
    return values


def notebook_parameters(path: Path) -> dict[str, Any]:
    """The parameters (name -> default) that the notebook at ``path`` declares."""
    nb = read_notebook(path)
    return parse_parameters(nb.cells[parameters_cell_index(nb)].source)


def load_profile_params(profile: str, params_dir: Path = PARAMS_DIR) -> dict[str, Any]:
    """The flat mapping in ``notebooks/params/<profile>.yaml``; an unknown profile lists the known."""
    path = params_dir / f"{profile}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in params_dir.glob("*.yaml"))
        raise BuildError(f"no parameter file {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} "
                         f"for profile {profile!r}; known profiles: {', '.join(known) or '(none)'}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict) or any(isinstance(v, dict) for v in data.values()):
        raise BuildError(f"{path}: must be a flat mapping of parameter names to values")
    data.setdefault("profile", profile)
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``["seed=1", "lambdas=[0.1,0.2]"]`` -> ``{"seed": 1, "lambdas": [0.1, 0.2]}`` (YAML values)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip().isidentifier():
            raise BuildError(f"-p expects key=value, got {pair!r}")
        out[key.strip()] = yaml.safe_load(value)
    return out


def parameters_for(defined: dict[str, Any], profile_params: dict[str, Any],
                   overrides: dict[str, Any]) -> dict[str, Any]:
    """What papermill injects into one notebook: only the keys its parameters cell defines."""
    merged = {**profile_params, **overrides}
    return {k: v for k, v in merged.items() if k in defined}


# --------------------------------------------------------------------------------------------
# Execution with papermill
# --------------------------------------------------------------------------------------------


def ensure_kernel(build_dir: Path = BUILD) -> str:
    """Make papermill's ``python3`` kernel run *this* interpreter; return the kernel name.

    A kernelspec is written under ``<build_dir>/jupyter/kernels/python3`` and put first on
    ``JUPYTER_PATH``, which beats user-wide and system kernelspecs of the same name.
    """
    kernel_dir = build_dir / "jupyter" / "kernels" / KERNEL_NAME
    kernel_dir.mkdir(parents=True, exist_ok=True)
    startup = build_dir / "jupyter" / "console_startup.py"
    startup.write_text(KERNEL_STARTUP)
    spec = {
        # sys.executable, not its resolved target: a venv's python is a symlink, and resolving it
        # would escape the venv. The startup file sends tqdm bars to the build's console (it does
        # nothing unless $MERGEBOOK_CONSOLE names a file).
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                 f"--IPKernelApp.exec_files={startup}"],
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "metadata": {"debugger": False},
    }
    (kernel_dir / "kernel.json").write_text(json.dumps(spec, indent=1))
    jupyter_dir = str(build_dir / "jupyter")
    paths = [p for p in os.environ.get("JUPYTER_PATH", "").split(os.pathsep) if p and p != jupyter_dir]
    os.environ["JUPYTER_PATH"] = os.pathsep.join([jupyter_dir, *paths])

    from jupyter_client.kernelspec import KernelSpecManager

    argv0 = KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv[0]
    if argv0 != sys.executable:
        raise BuildError(f"kernel {KERNEL_NAME!r} resolves to {argv0}, not {sys.executable}")
    return KERNEL_NAME


# --------------------------------------------------------------------------------------------
# Progress on the console: cells and their elapsed times, and the kernels' tqdm bars
# --------------------------------------------------------------------------------------------

CONSOLE_ENV = "MERGEBOOK_CONSOLE"
LOG_DIR = BUILD / "logs"
STILL_RUNNING_EVERY = 30.0  # seconds between "still running" lines of one long cell
BARS_INTERVAL_IN_LOGS = "10"  # tqdm's mininterval (s) when the console is a log, not a terminal

# Run by every kernel before the first cell (ipykernel's exec_files). Module-level names are
# deleted again: the startup runs in the notebook's namespace.
KERNEL_STARTUP = '''\
# Written by scripts/build_book.py. tqdm bars go to the file $MERGEBOOK_CONSOLE, which the build
# echoes to its console, instead of into the notebook (the book's pages stay clean).
def _mergebook_console_bars():
    import os

    path = os.environ.get("MERGEBOOK_CONSOLE")
    if not path:
        return
    try:
        import tqdm.std
    except ImportError:
        return
    console = open(path, "a", buffering=1, encoding="utf-8")
    init = tqdm.std.tqdm.__init__

    def __init__(self, *args, **kwargs):
        if kwargs.get("file") is None:
            kwargs["file"] = console
        init(self, *args, **kwargs)

    tqdm.std.tqdm.__init__ = __init__
    # tqdm.auto picks widget bars in a kernel when ipywidgets is installed (they would render in
    # the page) and warns when it is not: give every `from tqdm.auto import tqdm` the console bar.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import tqdm.auto
        import tqdm.autonotebook
    tqdm.auto.tqdm = tqdm.autonotebook.tqdm = tqdm.std.tqdm


_mergebook_console_bars()
del _mergebook_console_bars
'''


def _first_line(source: str, width: int = 60) -> str:
    """The first non-comment line of a cell's source, shortened (what a cell line shows)."""
    for line in source.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "%")):
            return line if len(line) <= width else line[: width - 1] + "…"
    return "(comments only)"


class ConsoleProgress:
    """Papermill cell hooks and a bar-log echo for one chapter: what ``make book`` prints.

    ``hooks()`` go to ``papermill.execute_notebook`` (nbclient's ``on_cell_start`` and
    ``on_cell_executed``). While a chapter runs, a thread prints a "still running" line for a
    long cell and copies what the kernel's tqdm bars append to ``bars_log`` onto ``err``.
    """

    def __init__(self, name: str, bars_log: Path, out=None, err=None, tty: bool | None = None,
                 every: float = STILL_RUNNING_EVERY):
        self.name, self.bars_log, self.every = name, bars_log, every
        self.out, self.err = out or sys.stdout, err or sys.stderr
        self.tty = self.err.isatty() if tty is None else tty
        self.total = self.started = 0
        self.current: tuple[int, str, float] | None = None  # code-cell number, summary, start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset = 0
        self._pending = ""  # a bar update not yet ended by \r or \n (non-terminal mode)
        self._last_line = ""

    def start(self, code_cells: int) -> None:
        """Begin a chapter of ``code_cells`` code cells: truncate the bar log, start the echo."""
        self.total, self.started = code_cells, 0
        self._stop.clear()
        self.bars_log.parent.mkdir(parents=True, exist_ok=True)
        self.bars_log.write_text("")
        self._offset = 0
        self._thread = threading.Thread(target=self._watch, name=f"progress-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the chapter: stop the thread and echo what is left of the bar log."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._echo_bars()
        if self._pending.strip():
            self._emit_err(("  " if not self.tty else "") + self._pending.strip() + "\n")
            self._pending = ""

    def hooks(self) -> dict[str, Any]:
        """The keyword arguments to pass to papermill (through to nbclient)."""
        return {"on_cell_start": self.cell_start, "on_cell_executed": self.cell_executed}

    def cell_start(self, cell, cell_index: int, **_: Any) -> None:
        """nbclient hook: a cell starts (cells run in order, so a counter numbers them)."""
        if cell.cell_type != "code":
            return
        with self._lock:
            self.started += 1
            self.current = (self.started, _first_line(cell.source), time.perf_counter())

    def cell_executed(self, cell, cell_index: int, **_: Any) -> None:
        """nbclient hook: a cell finished (also when it raised): print its line."""
        with self._lock:
            if self.current is None:
                return
            number, summary, start = self.current
            self.current = None
        self._echo_bars()
        self._emit_out(f"[{self.name}] cell {number}/{self.total} {time.perf_counter() - start:6.1f} s  {summary}\n")

    def _watch(self) -> None:
        last_note = time.perf_counter()
        while not self._stop.wait(0.25):
            self._echo_bars()
            with self._lock:
                current = self.current
            if current and time.perf_counter() - max(current[2], last_note) >= self.every:
                last_note = time.perf_counter()
                number, summary, start = current
                self._emit_out(f"[{self.name}] cell {number}/{self.total} still running, "
                               f"{last_note - start:.0f} s  {summary}\n")

    def _echo_bars(self) -> None:
        try:
            with open(self.bars_log, encoding="utf-8", errors="replace") as f:
                f.seek(self._offset)
                chunk = f.read()
                self._offset = f.tell()
        except OSError:
            return
        if not chunk:
            return
        if self.tty:  # a terminal draws \r updates in place
            self._emit_err(chunk)
            return
        # a log: every bar update becomes one line (tqdm rewrites its line with \r)
        text = self._pending + chunk
        parts = re.split(r"[\r\n]", text)
        self._pending = parts.pop()
        lines = []
        for part in (p.strip() for p in parts):
            if part and part != self._last_line:  # tqdm's close repeats the final update
                lines.append(part)
                self._last_line = part
        if lines:
            self._emit_err("".join(f"  {line}\n" for line in lines))

    def _emit_out(self, text: str) -> None:
        with self._lock:
            self.out.write(text)
            self.out.flush()

    def _emit_err(self, text: str) -> None:
        with self._lock:
            self.err.write(text)
            self.err.flush()


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class ChapterRun:
    """The outcome of executing one chapter."""

    name: str
    output: Path
    parameters: dict[str, Any]
    seconds: float = 0.0
    error: str | None = None
    traceback: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None


def convert_source(source_py: Path, src_dir: Path) -> Path:
    """Copy a jupytext source into ``src_dir`` and write the notebook converted from the copy."""
    import jupytext

    src_dir.mkdir(parents=True, exist_ok=True)
    copy_py = src_dir / source_py.name
    shutil.copyfile(source_py, copy_py)
    nb = jupytext.read(str(copy_py))
    nb.metadata.pop("jupytext", None)  # the executed copy is not paired with anything
    out = copy_py.with_suffix(".ipynb")
    jupytext.write(nb, str(out))
    return out


def execute_chapter(source_py: Path, output: Path, parameters: dict[str, Any], *,
                    src_dir: Path, kernel_name: str = KERNEL_NAME, cell_timeout: int | None = None,
                    log_output: bool = False, progress: ConsoleProgress | None = None) -> ChapterRun:
    """Convert ``source_py`` into ``src_dir``, execute it with papermill into ``output``.

    The kernel's working directory is ``output``'s folder. A failing cell does not raise here:
    papermill writes the notebook up to the failing cell and the error is returned in the run.
    """
    import papermill as pm

    name = source_py.stem
    run = ChapterRun(name=name, output=output, parameters=parameters)
    notebook = convert_source(source_py, src_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    hooks: dict[str, Any] = {}
    previous_console = os.environ.get(CONSOLE_ENV)
    if progress is not None:
        import nbformat

        # papermill adds one cell of injected parameters when there are any
        nb = nbformat.read(str(notebook), as_version=4)
        progress.start(sum(c.cell_type == "code" for c in nb.cells) + (1 if parameters else 0))
        hooks = progress.hooks()
        os.environ[CONSOLE_ENV] = str(progress.bars_log)  # the kernel inherits it at its start
    start = time.perf_counter()
    try:
        pm.execute_notebook(
            str(notebook), str(output), parameters=parameters, kernel_name=kernel_name, language="python",
            cwd=str(output.parent), progress_bar=False, log_output=log_output,
            request_save_on_cell_execute=True, execution_timeout=cell_timeout,
            start_timeout=180,  # a cold kernel import of torch is slow on a busy 2-core machine
            **hooks,
        )
    except pm.PapermillExecutionError as exc:
        run.error = f"cell {exc.exec_count}: {exc.ename}: {exc.evalue}"
        run.traceback = "\n".join(exc.traceback)
    except Exception as exc:  # kernel died, timeout, bad notebook: still a failed chapter
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        if progress is not None:
            progress.stop()
            if previous_console is None:
                os.environ.pop(CONSOLE_ENV, None)
            else:
                os.environ[CONSOLE_ENV] = previous_console
    run.seconds = time.perf_counter() - start
    if output.exists():
        _stamp_output(output, source_py, parameters)
    return run


def _stamp_output(output: Path, source_py: Path, parameters: dict[str, Any]) -> None:
    """Record what made an executed notebook, and give it the committed notebooks' kernelspec."""
    import nbformat

    nb = nbformat.read(str(output), as_version=4)
    nb.metadata["mergebook"] = {
        "source": f"{NOTEBOOK_DIR}/{source_py.name}",
        "source_sha256": sha256_file(source_py),
        "parameters": parameters,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
    }
    nb.metadata["kernelspec"] = {"name": KERNEL_NAME, "display_name": "Python 3 (ipykernel)",
                                 "language": "python"}
    for cell in nb.cells:  # papermill's cell of injected values: shown folded, under the defaults
        tags = cell.metadata.get("tags", [])
        if "injected-parameters" in tags and "hide-input" not in tags:
            cell.metadata["tags"] = [*tags, "hide-input"]
    nbformat.write(nb, str(output))


# --------------------------------------------------------------------------------------------
# The execution-time page
# --------------------------------------------------------------------------------------------


def _fmt_value(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def execution_rows(stage: Path, notebooks: list[str]) -> list[dict[str, Any]]:
    """One row per chapter, read from the papermill metadata of the executed copies in ``stage``."""
    import nbformat

    rows = []
    for name in notebooks:
        path = stage / NOTEBOOK_DIR / f"{name}.ipynb"
        row: dict[str, Any] = {"name": name, "profile": "", "seconds": None, "start": "",
                               "slowest": None, "status": "not executed", "changed": ""}
        if path.exists():
            nb = nbformat.read(str(path), as_version=4)
            pm_meta = nb.metadata.get("papermill", {})
            mb_meta = nb.metadata.get("mergebook", {})
            params = pm_meta.get("parameters", {}) or {}
            row["profile"] = params.get("profile", "")
            row["seconds"] = pm_meta.get("duration")
            row["start"] = (pm_meta.get("start_time") or "")[:19].replace("T", " ")
            durations = [(c.metadata.get("papermill", {}).get("duration") or 0.0) for c in nb.cells]
            row["slowest"] = max(durations, default=None)
            row["status"] = "error" if pm_meta.get("exception") else "ok"
            source = ROOT / NOTEBOOK_DIR / f"{name}.py"
            if source.exists() and mb_meta.get("source_sha256") not in (None, sha256_file(source)):
                row["status"] += " (source changed since)"
            defaults = notebook_parameters(source) if source.exists() else {}
            row["changed"] = ", ".join(f"{k}={_fmt_value(v)}" for k, v in params.items()
                                       if k != "profile" and defaults.get(k, object()) != v)
        rows.append(row)
    return rows


def execution_times_markdown(rows: list[dict[str, Any]]) -> str:
    """The ``book/execution_times.md`` page for ``rows``."""
    def secs(v: float | None) -> str:
        return "" if v is None else f"{v:.1f}"

    try:
        torch_version = importlib_metadata.version("torch")
    except importlib_metadata.PackageNotFoundError:
        torch_version = "not installed"
    lines = [
        "# Execution times",
        "",
        "Every chapter of this build was executed by papermill, top to bottom, before Sphinx "
        "rendered it; a failing cell fails the build. This page is generated at build time by "
        "`scripts/build_book.py` from papermill's metadata in the executed notebooks.",
        "",
        f"Machine: {platform.machine()} with {os.cpu_count()} CPU cores, Python "
        f"{platform.python_version()}, torch {torch_version}. Times include the kernel start, "
        "and are short when the library's cache (`.cache/mergebook/`) already holds the trained "
        "weights and results.",
        "",
        "| Chapter | Profile | Parameters changed | Started (UTC) | Wall time (s) | Slowest cell (s) "
        "| Status |",
        "| --- | --- | --- | --- | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(f"| {{doc}}`../{NOTEBOOK_DIR}/{r['name']}` | {r['profile']} | "
                     f"{r['changed'] or 'none'} | {r['start']} | {secs(r['seconds'])} | "
                     f"{secs(r['slowest'])} | {r['status']} |")
    total = sum(r["seconds"] or 0.0 for r in rows)
    lines += ["", f"Total: {total:.1f} s of execution for {len(rows)} chapters.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Staging, HTML and the check of the HTML
# --------------------------------------------------------------------------------------------


def stage_static(stage: Path, root: Path = ROOT) -> None:
    """Copy the config files and ``book/`` into the stage, replacing older copies."""
    stage.mkdir(parents=True, exist_ok=True)
    for name in STAGED_FILES:
        shutil.copyfile(root / name, stage / name)
    for name in STAGED_DIRS:
        shutil.rmtree(stage / name, ignore_errors=True)
        shutil.copytree(root / name, stage / name)


def build_html(stage: Path, out_root: Path = ROOT, *, strict: bool = True) -> int:
    """Run ``jupyter-book build`` on the stage; the HTML goes to ``<out_root>/_build/html``."""
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb) if jb.exists() else "jupyter-book", "build", str(stage),
           "--path-output", str(out_root), "--all", "--keep-going"]
    if strict:
        cmd += ["-W", "-n"]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd, cwd=out_root)


def check_html(html_dir: Path = BUILD / "html", root: Path = ROOT) -> list[str]:
    """Problems with the built HTML: a toc page missing, or not showing its title."""
    problems = []
    for entry in toc_entries(root / "_toc.yml"):
        page = html_dir / f"{entry}.html"
        if not page.exists():
            problems.append(f"{entry}: {page.relative_to(root) if page.is_relative_to(root) else page} "
                            "is missing")
            continue
        if is_notebook_entry(entry):
            source = root / f"{entry}.py"
        else:
            source = next((root / f"{entry}{s}" for s in (".md", ".ipynb") if (root / f"{entry}{s}").exists()),
                          root / f"{entry}.md")
        title = strip_markup(page_title(source))
        if title not in strip_markup(page.read_text(encoding="utf-8")):
            problems.append(f"{entry}: title {title!r} not found in {page.name}")
    return problems


# --------------------------------------------------------------------------------------------
# The command line
# --------------------------------------------------------------------------------------------


def _normalise_name(name: str) -> str:
    return Path(name).stem if "/" in name or name.endswith((".py", ".ipynb")) else name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("PROFILE") or "tiny",
                        help="parameter file notebooks/params/PROFILE.yaml (default: $PROFILE or tiny)")
    parser.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE",
                        help="override a parameter (YAML value), in every chapter that defines it")
    parser.add_argument("--only", action="append", default=[], metavar="CHAPTER",
                        help="execute only this chapter (repeatable); e.g. 01_task_arithmetic")
    parser.add_argument("--no-execute", action="store_true",
                        help="reuse the executed notebooks already in _build/stage")
    parser.add_argument("--no-html", action="store_true", help="execute only; skip jupyter-book")
    parser.add_argument("--no-strict", action="store_true", help="without -W -n (warnings allowed)")
    parser.add_argument("--cell-timeout", type=int, default=0,
                        help="seconds one cell may run before the chapter fails (0: no limit)")
    parser.add_argument("--log-output", action="store_true", help="stream cell outputs to the log")
    parser.add_argument("--quiet", action="store_true",
                        help="no per-cell lines and no progress bars on the console")
    parser.add_argument("--stage", default=None, metavar="DIR",
                        help="where executed notebooks go (default _build/stage; CI runs the hub-pico profile into "
                             "_build/stage-hub-pico with --no-html, beside the book)")
    parser.add_argument("--check-html", action="store_true",
                        help="only check that every toc page is in _build/html with its title")
    args = parser.parse_args(argv)

    try:
        if args.check_html:
            return _report_check()
        return _build(args)
    except BuildError as exc:
        print(f"build_book: error: {exc}", file=sys.stderr)
        return 2


def _report_check() -> int:
    problems = check_html()
    for p in problems:
        print(f"build_book: HTML check: {p}", file=sys.stderr)
    if not problems:
        print(f"build_book: HTML check: all {len(toc_entries())} pages of _toc.yml are in "
              f"{(BUILD / 'html').relative_to(ROOT)} with their titles")
    return 1 if problems else 0


def _build(args: argparse.Namespace) -> int:
    stage = Path(args.stage).resolve() if getattr(args, "stage", None) else BUILD / "stage"
    src_dir = (stage.parent / f"src-{stage.name}" if getattr(args, "stage", None) else BUILD / "src") / NOTEBOOK_DIR
    chapters = toc_notebooks()
    for name in chapters:
        if not (ROOT / NOTEBOOK_DIR / f"{name}.py").exists():
            raise BuildError(f"_toc.yml lists {NOTEBOOK_DIR}/{name}, but {NOTEBOOK_DIR}/{name}.py does not exist")
    selected = [_normalise_name(n) for n in args.only] or chapters
    unknown = [n for n in selected if n not in chapters]
    if unknown:
        raise BuildError(f"not a chapter in _toc.yml: {', '.join(unknown)}; chapters: {', '.join(chapters)}")

    runs: list[ChapterRun] = []
    if not args.no_execute:
        profile_params = load_profile_params(args.profile)
        overrides = parse_overrides(args.param)
        defined = {n: notebook_parameters(ROOT / NOTEBOOK_DIR / f"{n}.py") for n in selected}
        for key in overrides:
            if not any(key in d for d in defined.values()):
                raise BuildError(f"-p {key}=...: no selected chapter has a parameter {key!r}")
        kernel = ensure_kernel()
        # Progress bars mean nothing in a static page, but a person waiting for the build wants
        # them: the kernels' startup file sends them to _build/logs/, echoed here (see
        # ConsoleProgress). In a log (CI) a bar updates every 10 s. tqdm >= 4.66 reads TQDM_*
        # variables as defaults; --quiet switches the bars off.
        if args.quiet:
            os.environ.setdefault("TQDM_DISABLE", "1")
        elif not sys.stderr.isatty():
            os.environ.setdefault("TQDM_MININTERVAL", BARS_INTERVAL_IN_LOGS)
        if not args.only:  # a full build starts from a clean stage: no leftovers of older runs
            shutil.rmtree(stage / NOTEBOOK_DIR, ignore_errors=True)
        for name in selected:
            params = parameters_for(defined[name], profile_params, overrides)
            shown = ", ".join(f"{k}={_fmt_value(v)}" for k, v in params.items())
            print(f"[{name}] executing with {shown or 'its defaults'}", flush=True)
            console = None if args.quiet else ConsoleProgress(name, LOG_DIR / f"{name}.bars.log")
            run = execute_chapter(ROOT / NOTEBOOK_DIR / f"{name}.py", stage / NOTEBOOK_DIR / f"{name}.ipynb",
                                  params, src_dir=src_dir, kernel_name=kernel,
                                  cell_timeout=args.cell_timeout or None, log_output=args.log_output,
                                  progress=console)
            status = "ok" if run.ok else f"FAILED: {run.error}"
            print(f"[{name}] {run.seconds:.1f} s, {status}", flush=True)
            runs.append(run)

    failed = [r for r in runs if not r.ok]
    if failed:
        for r in failed:
            if r.traceback:
                print(f"\n--- {r.name}: traceback ---\n{r.traceback}\n", file=sys.stderr)
            print(f"build_book: {r.name} failed ({r.error}); the executed notebook, up to the "
                  f"failing cell, is {r.output.relative_to(ROOT)}", file=sys.stderr)
        print("build_book: not building the HTML because a chapter failed", file=sys.stderr)
        return 1
    if args.no_html:
        return 0

    missing = [n for n in chapters if not (stage / NOTEBOOK_DIR / f"{n}.ipynb").exists()]
    if missing:
        print(f"build_book: not building the HTML: no executed copy of {', '.join(missing)} in "
              f"{stage.relative_to(ROOT)} (run a full build once)", flush=True)
        return 0 if args.only else 1

    rows = execution_rows(stage, chapters)
    broken = [r["name"] for r in rows if r["status"].startswith("error")]
    if broken:
        print(f"build_book: not building the HTML: the executed copy of {', '.join(broken)} in "
              f"{stage.relative_to(ROOT)} ended in an error (re-execute it)", file=sys.stderr)
        return 1
    stage_static(stage)
    (stage / EXECUTION_TIMES_PAGE).write_text(execution_times_markdown(rows))
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:7.1f} s"
        print(f"  {r['name']:<28} {r['profile']:<10} {secs:>10}  {r['status']}")

    start = time.perf_counter()
    rc = build_html(stage, strict=not args.no_strict)
    print(f"build_book: jupyter-book took {time.perf_counter() - start:.1f} s", flush=True)
    if rc != 0:
        print("build_book: jupyter-book failed (with -W every warning is an error; see above)",
              file=sys.stderr)
        return rc
    rc = _report_check()
    if rc == 0:
        print(f"build_book: the book is {(BUILD / 'html' / 'index.html').relative_to(ROOT)}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
