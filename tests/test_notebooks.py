"""The notebooks and the book's plumbing: pairing, clean commits, parameters, the toc, the build path.

Every ``notebooks/NN_*.py`` (the reviewed py:percent source) must have a paired ``.ipynb`` (for
Colab) that says the same thing and carries no outputs; its ``parameters`` cell must be one early
cell of plain literal assignments, so papermill can override it; and ``_toc.yml`` must list exactly
the notebooks on disk. The slow tests execute a small notebook through the same code path that
``make book`` uses (``scripts/build_book.py``), with papermill and the venv's kernel.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _load_build_book():
    spec = importlib.util.spec_from_file_location("build_book", ROOT / "scripts" / "build_book.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_book"] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


bb = _load_build_book()
SOURCES = bb.notebook_sources(ROOT)
REQUIRED_PARAMETERS = {"profile", "device", "seed"}
MAX_PARAMETERS_POSITION = 3  # the parameters cell is among the first three code cells


def _read(path: Path):
    import jupytext

    return jupytext.read(str(path))


def _tags(cell) -> list[str]:
    return list(cell.get("metadata", {}).get("tags", []))


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_py_source_and_committed_ipynb_say_the_same(source: Path) -> None:
    ipynb = source.with_suffix(".ipynb")
    fix = f"run: .venv/bin/jupytext --sync {source.relative_to(ROOT)}"
    assert ipynb.exists(), f"{ipynb.name} is missing; {fix}"
    py_cells, nb_cells = _read(source).cells, _read(ipynb).cells
    for i, (a, b) in enumerate(zip(py_cells, nb_cells)):
        where = f"{source.stem}: cell {i} differs between .py and .ipynb"
        assert a.cell_type == b.cell_type, f"{where} (type); {fix}"
        assert a.source == b.source, f"{where} (source); {fix}"
        assert _tags(a) == _tags(b), f"{where} (tags); {fix}"
    assert len(py_cells) == len(nb_cells), f"{source.stem}: cell counts differ; {fix}"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_ipynb_has_no_outputs_and_no_execution_counts(source: Path) -> None:
    nb = json.loads(source.with_suffix(".ipynb").read_text())
    dirty = [i for i, c in enumerate(nb["cells"])
             if c["cell_type"] == "code" and (c.get("outputs") or c.get("execution_count") is not None)]
    assert not dirty, (f"{source.stem}.ipynb carries outputs or execution counts in cells {dirty}; "
                       "commit it without outputs (papermill executes copies in _build/)")
    assert "papermill" not in nb.get("metadata", {}), f"{source.stem}.ipynb is an executed copy"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_chapter_cells_define_no_functions_or_classes(source: Path) -> None:
    """A chapter's cells are calls, tables and figures: a def, class or lambda belongs in mergebook."""
    import ast

    found = []
    for i, cell in enumerate(_read(source).cells):
        if cell.cell_type != "code":
            continue
        code = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                found.append(f"cell {i}, line {node.lineno}: {type(node).__name__}")
    assert not found, (f"{source.stem} defines code in its cells ({'; '.join(found)}); move it into mergebook "
                       "(an experiment/analysis function with a test) and call it")


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_parameters_cell_is_one_early_cell_of_literal_assignments(source: Path) -> None:
    nb = _read(source)
    index = bb.parameters_cell_index(nb)  # raises unless exactly one cell is tagged
    cell = nb.cells[index]
    assert cell.cell_type == "code"
    code_before = sum(c.cell_type == "code" for c in nb.cells[:index])
    assert code_before < MAX_PARAMETERS_POSITION, (
        f"{source.stem}: the parameters cell is code cell #{code_before + 1}; keep it among the "
        f"first {MAX_PARAMETERS_POSITION}")
    params = bb.parse_parameters(cell.source)  # raises on anything but `name = literal`
    missing = REQUIRED_PARAMETERS - params.keys()
    assert not missing, f"{source.stem}: the parameters cell does not define {sorted(missing)}"


@pytest.mark.parametrize("bad", ["x = f(1)", "import os", "x, y = 1, 2", "x += 1", "x = [y]"])
def test_parse_parameters_rejects_anything_but_literal_assignments(bad: str) -> None:
    with pytest.raises(bb.BuildError):
        bb.parse_parameters(bad)


def test_parse_parameters_reads_literal_defaults() -> None:
    src = 'profile = "tiny"\nseed = 0\nlambdas = [0.1, 0.2]\nopts = {"a": None, "b": -1.5}\n'
    assert bb.parse_parameters(src) == {"profile": "tiny", "seed": 0, "lambdas": [0.1, 0.2],
                                        "opts": {"a": None, "b": -1.5}}


def test_toc_lists_exactly_the_notebooks_on_disk() -> None:
    in_toc = bb.toc_notebooks(ROOT / "_toc.yml")
    on_disk = [p.stem for p in SOURCES]
    assert len(in_toc) == len(set(in_toc)), f"_toc.yml lists a notebook twice: {in_toc}"
    assert sorted(set(on_disk) - set(in_toc)) == [], "notebooks missing from _toc.yml"
    assert sorted(set(in_toc) - set(on_disk)) == [], "_toc.yml names notebooks that do not exist"


def test_every_toc_page_exists() -> None:
    for entry in bb.toc_entries(ROOT / "_toc.yml"):
        if bb.is_notebook_entry(entry):
            assert (ROOT / f"{entry}.py").exists() and (ROOT / f"{entry}.ipynb").exists(), entry
        else:
            assert (ROOT / f"{entry}.md").exists(), f"_toc.yml names {entry}, but {entry}.md is missing"


def test_book_config_leaves_execution_to_papermill() -> None:
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["execute"]["execute_notebooks"] == "off"
    assert config["only_build_toc_files"] is True
    for bib in config.get("bibtex_bibfiles", []):
        assert (ROOT / bib).exists(), bib


def test_profile_parameter_files_are_flat_and_used_by_some_notebook() -> None:
    files = sorted((ROOT / "notebooks" / "params").glob("*.yaml"))
    if SOURCES:
        assert (ROOT / "notebooks" / "params" / "tiny.yaml") in files, "the default profile needs tiny.yaml"
    defined = set().union(*(bb.notebook_parameters(p).keys() for p in SOURCES)) if SOURCES else set()
    for f in files:
        params = bb.load_profile_params(f.stem, f.parent)  # raises unless flat
        assert params["profile"] == f.stem, f"{f.name}: profile should be {f.stem!r}"
        if SOURCES:
            unused = sorted(params.keys() - defined)
            assert not unused, f"{f.name}: no notebook has a parameter named {unused}"


def test_a_notebook_receives_only_the_parameters_it_defines() -> None:
    defined = {"profile": "tiny", "seed": 0, "lambdas": [0.3]}
    profile_params = {"profile": "vit-b-32", "device": "cuda", "seed": 0, "steps": 500}
    overrides = bb.parse_overrides(["seed=3", "lambdas=[0.2, 0.4]", "steps=10"])
    assert bb.parameters_for(defined, profile_params, overrides) == {
        "profile": "vit-b-32", "seed": 3, "lambdas": [0.2, 0.4]}


@pytest.mark.parametrize("bad", ["seed", "=1", "not a name=1"])
def test_parse_overrides_rejects_malformed_pairs(bad: str) -> None:
    with pytest.raises(bb.BuildError):
        bb.parse_overrides([bad])


def test_unknown_profile_error_lists_the_known_ones(tmp_path: Path) -> None:
    (tmp_path / "tiny.yaml").write_text("seed: 0\n")
    with pytest.raises(bb.BuildError, match="known profiles: tiny"):
        bb.load_profile_params("vit-b-23", tmp_path)


def test_execution_times_page_has_one_row_per_chapter() -> None:
    rows = [{"name": "00_suite", "profile": "tiny", "changed": "", "start": "2026-01-01 00:00:00",
             "seconds": 12.34, "slowest": 8.0, "status": "ok"},
            {"name": "01_task_arithmetic", "profile": "tiny", "changed": "seed=1", "start": "",
             "seconds": 3.0, "slowest": 1.0, "status": "ok"}]
    page = bb.execution_times_markdown(rows)
    assert page.startswith("# Execution times\n")
    assert "| {doc}`../notebooks/00_suite` | tiny | none | 2026-01-01 00:00:00 | 12.3 | 8.0 | ok |" in page
    assert "| {doc}`../notebooks/01_task_arithmetic` | tiny | seed=1 |" in page
    assert "Total: 15.3 s" in page


def test_html_check_reports_missing_pages_and_titles(tmp_path: Path) -> None:
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# The *intro* page\n\ntext\n")
    (tmp_path / "book" / "other.md").write_text("# Other\n")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\nchapters:\n  - file: book/other\n")
    html = tmp_path / "_build" / "html" / "book"
    html.mkdir(parents=True)
    (html / "intro.html").write_text("<h1>The <em>intro</em> page<a href='#'>#</a></h1>")
    assert bb.check_html(tmp_path / "_build" / "html", tmp_path) == [
        "book/other: _build/html/book/other.html is missing"]
    (html / "other.html").write_text("<h1>Elsewhere</h1>")
    assert bb.check_html(tmp_path / "_build" / "html", tmp_path) == [
        "book/other: title 'Other' not found in other.html"]


PROBE = '''# %% [markdown]
# # Probe

# %% tags=["parameters"]
profile = "tiny"
device = "auto"
seed = 0

# %%
import os
import sys

print("executable", sys.executable)
print("cwd", os.getcwd())
print("seed", seed, "profile", profile)
'''


@pytest.fixture
def probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A tiny notebook and a kernel set up the way ``make book`` sets them up."""
    pytest.importorskip("papermill")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("JUPYTER_PATH", "")  # ensure_kernel edits it; monkeypatch restores it
    source = tmp_path / "notebooks" / "99_probe.py"
    source.parent.mkdir()
    source.write_text(PROBE)
    kernel = bb.ensure_kernel(tmp_path / "build")
    return source, kernel


def _stdout(path: Path) -> str:
    nb = json.loads(path.read_text())
    return "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code"
                   for o in c.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow
def test_build_path_executes_a_copy_with_the_venv_kernel_and_injected_parameters(probe, tmp_path):
    source, kernel = probe
    before = source.read_bytes()
    out = tmp_path / "stage" / "notebooks" / "99_probe.ipynb"
    run = bb.execute_chapter(source, out, {"seed": 7, "profile": "tiny"}, src_dir=tmp_path / "src",
                             kernel_name=kernel)
    assert run.ok, run.error
    text = _stdout(out)
    assert f"executable {sys.executable}\n" in text  # the kernel is this interpreter (the venv's)
    assert f"cwd {out.parent}\n" in text  # papermill --cwd: the executed copy's folder
    assert "seed 7 profile tiny\n" in text
    meta = json.loads(out.read_text())["metadata"]
    assert meta["papermill"]["parameters"] == {"seed": 7, "profile": "tiny"}
    assert meta["mergebook"]["source_sha256"] == bb.sha256_file(source)
    assert meta["kernelspec"]["name"] == "python3"
    assert source.read_bytes() == before  # the source is only read
    assert (tmp_path / "src" / "99_probe.ipynb").exists()


@pytest.mark.slow
def test_build_path_reports_a_failing_cell_as_a_failed_chapter(probe, tmp_path):
    source, kernel = probe
    source.write_text(PROBE + '\n# %%\nraise RuntimeError("boom")\n\n# %%\nprint("never")\n')
    out = tmp_path / "stage" / "99_probe.ipynb"
    run = bb.execute_chapter(source, out, {}, src_dir=tmp_path / "src", kernel_name=kernel)
    assert not run.ok
    assert "RuntimeError: boom" in run.error
    assert out.exists() and "never" not in _stdout(out)


def test_every_colab_install_cell_pins_the_library_to_this_release_tag():
    """A Colab reader must get the library the chapter was written against, not whatever main holds."""
    import re

    import mergebook

    for src in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.py")):
        text = src.read_text()
        refs = re.findall(r"git\+https://github\.com/merging-reproduced/merging-reproduced(@[\w.\-]+)?", text)
        assert refs, f"{src.name} has no Colab install cell"
        assert all(r == f"@v{mergebook.__version__}" for r in refs), (src.name, refs)
