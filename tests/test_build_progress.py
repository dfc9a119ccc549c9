"""The build's console progress: a line per cell with its time, and tqdm bars on the console only.

``scripts/build_book.py`` hooks papermill's cells and points every kernel's tqdm at a log file that
it echoes to its own stderr; the executed notebook (what the book renders) must not carry the bars.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from tests.test_notebooks import bb

TOY = '''# %% [markdown]
# # Toy chapter

# %% tags=["parameters"]
profile = "tiny"
steps = 3

# %%
import time

from tqdm import tqdm
from tqdm.auto import tqdm as auto_tqdm

# %%
for i in tqdm(range(steps), desc="train toy"):
    time.sleep(0.4)
for i in auto_tqdm(range(2), desc="hub download"):
    pass
print("done training")
'''


class _Console(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_bar_updates_become_one_line_each_in_a_log(tmp_path: Path) -> None:
    out, err = _Console(), _Console()
    progress = bb.ConsoleProgress("99_toy", tmp_path / "bars.log", out=out, err=err, tty=False)
    progress.start(2)
    (tmp_path / "bars.log").write_text("\rbar:  0%| 0/2\rbar: 50%| 1/2\rbar: 100%| 2/2\rbar: 100%| 2/2\n\rhalf")
    progress.stop()
    assert err.getvalue() == "  bar:  0%| 0/2\n  bar: 50%| 1/2\n  bar: 100%| 2/2\n  half\n"


@pytest.mark.slow
def test_chapter_prints_each_cell_and_its_bars_on_the_console_not_in_the_notebook(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("papermill")
    monkeypatch.setenv("JUPYTER_PATH", "")
    monkeypatch.setenv("TQDM_MININTERVAL", "0")
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    source = tmp_path / "99_toy.py"
    source.write_text(TOY)
    kernel = bb.ensure_kernel(tmp_path / "build")
    out, err = _Console(), _Console()
    progress = bb.ConsoleProgress("99_toy", tmp_path / "logs" / "99_toy.bars.log", out=out, err=err,
                                  every=0.5)
    output = tmp_path / "stage" / "99_toy.ipynb"
    run = bb.execute_chapter(source, output, {"steps": 4}, src_dir=tmp_path / "src", kernel_name=kernel,
                             progress=progress)
    assert run.ok, run.error
    lines = out.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines if " s  " in ln and "still" not in ln] == ["1/4", "2/4", "3/4", "4/4"]
    assert any("cell 4/4 still running" in ln for ln in lines), lines
    assert lines[-1].endswith('for i in tqdm(range(steps), desc="train toy"):')  # its first line
    assert "train toy: 100%" in err.getvalue() and "4/4" in err.getvalue()
    assert "hub download: 100%" in err.getvalue()  # tqdm.auto bars too, and no IProgress warning
    nb = json.loads(output.read_text())
    outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    text = "".join("".join(o.get("text", "")) for o in outputs)
    assert text == "done training\n"  # no bar, no stderr in what the book renders
    assert "train toy" in (tmp_path / "logs" / "99_toy.bars.log").read_text()
