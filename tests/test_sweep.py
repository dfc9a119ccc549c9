"""mergebook.sweep: grid expansion and validation, point keys, records, resume, failure isolation, parquet.

The notebooks here are tiny throwaway ones that the tests write themselves (no chapter runs).
The slow tests execute them with papermill in real kernels, as a sweep does.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mergebook import sweep
from mergebook.cli import main as cli_main

TOY = '''# %% [markdown]
# # Toy sweep point

# %% tags=["parameters"]
profile = "tiny"
device = "auto"
seed = 0
x = 1.0
label = "A"
fail_at = -1.0
sleep_from = 99.0
log = ""

# %%
import os
import time

from mergebook import sweep

if x == fail_at:
    raise RuntimeError(f"boom at x={x}")
if x >= sleep_from and os.path.exists(log + ".block"):
    time.sleep(120)
if log:
    with open(log, "a") as f:
        f.write(f"{x} {seed}\\n")
sweep.record({"t1": 10 * x + seed, "t2": 20 * x}, method=label, loss=x / 2)
print("ran", x, seed, label, profile)
'''


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    path = tmp_path / "toy_point.py"
    path.write_text(TOY)
    return path


def _grid(**over):
    spec = {"profile": "tiny", "seeds": [0, 1], "grid": {"x": [1.0, 2.0, 3.0], "label": ["A", "B"]}}
    spec.update(over)
    return spec


# ----------------------------------------------------------------------------------------------
# fast: grid, keys, record


def test_grid_product_times_seeds_gives_every_point_once(toy: Path) -> None:
    grid = sweep.load_grid(_grid(fixed={"log": "l.txt"}))
    points = sweep.expand_grid(grid, toy)
    assert len(points) == 3 * 2 * 2
    combos = {(p.params["x"], p.params["label"], p.params["seed"]) for p in points}
    assert combos == {(x, lab, s) for x in (1.0, 2.0, 3.0) for lab in "AB" for s in (0, 1)}
    assert all(p.params["profile"] == "tiny" and p.params["log"] == "l.txt" for p in points)
    assert len({p.key for p in points}) == len(points)
    assert grid.swept == ["x", "label", "seed"]


def test_explicit_points_are_taken_as_given(toy: Path) -> None:
    grid = sweep.load_grid({"profile": "tiny", "seeds": [3], "points": [{"x": 0.5}, {"x": 0.7, "label": "B"}]})
    points = sweep.expand_grid(grid, toy)
    assert [p.params for p in points] == [{"profile": "tiny", "x": 0.5, "seed": 3},
                                          {"profile": "tiny", "x": 0.7, "label": "B", "seed": 3}]
    assert grid.swept == ["x", "label"]


def test_grid_file_is_read_from_yaml(toy: Path, tmp_path: Path) -> None:
    f = tmp_path / "grid.yaml"
    f.write_text("profile: tiny\nseeds: [0, 1, 2]\ngrid:\n  x: [0.1, 0.3]\n")
    assert len(sweep.expand_grid(sweep.load_grid(f), toy)) == 6


def test_a_parameter_the_notebook_does_not_define_is_an_error_before_anything_runs(toy: Path, tmp_path: Path) -> None:
    grid = sweep.load_grid(_grid(grid={"x": [1.0], "lamda": [0.3]}))
    with pytest.raises(sweep.SweepError, match=r"does not define \['lamda'\]"):
        sweep.expand_grid(grid, toy)
    with pytest.raises(sweep.SweepError, match="lamda"):
        sweep.run_sweep(toy, grid, tmp_path / "run", workers=0)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec, message", [
    ({"seeds": [0], "grid": {"x": [1]}}, "needs `profile"),
    ({"profile": "tiny", "grid": {"x": [1]}, "points": [{"x": 1}]}, "exactly one of"),
    ({"profile": "tiny", "seeds": [0]}, "exactly one of"),
    ({"profile": "tiny", "grid": {"x": []}}, "grid.x must be a non-empty list"),
    ({"profile": "tiny", "grid": {"x": 0.3}}, "grid.x must be a non-empty list"),
    ({"profile": "tiny", "grid": {"seed": [1, 2]}}, "use the top-level"),
    ({"profile": "tiny", "seeds": [0, 0], "grid": {"x": [1]}}, "repeat"),
    ({"profile": "tiny", "seeds": ["a"], "grid": {"x": [1]}}, "list of integers"),
    ({"profile": "tiny", "points": [{"x": 1}, {"x": 1}]}, "listed twice"),
    ({"profile": "tiny", "grid": {"x": [1]}, "fixed": {"x": 2}}, "both swept and fixed"),
    ({"profile": "tiny", "grid": {"x": [1]}, "lambdas": [1]}, "unknown key"),
])
def test_bad_grids_are_rejected_with_the_fix(spec: dict, message: str) -> None:
    with pytest.raises(sweep.SweepError, match=message):
        sweep.load_grid(spec)


def test_point_key_hashes_source_profile_and_parameters_not_their_order() -> None:
    k = sweep.point_key("src", "tiny", {"a": 1, "b": 2})
    assert k == sweep.point_key(b"src", "tiny", {"b": 2, "a": 1})
    assert len({k, sweep.point_key("src2", "tiny", {"a": 1, "b": 2}),
                sweep.point_key("src", "vit-b-32", {"a": 1, "b": 2}),
                sweep.point_key("src", "tiny", {"a": 1, "b": 3})}) == 4


def test_record_writes_json_to_the_env_path_and_is_a_no_op_outside_a_sweep(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(sweep.RECORD_ENV, raising=False)
    assert sweep.record({"a": 50.0}) is None
    target = tmp_path / "rec.json"
    monkeypatch.setenv(sweep.RECORD_ENV, str(target))
    assert sweep.record({"a": 50.0, "b": 70.0, "avg": 1.0}, method="TA", loss=0.5) == target
    assert json.loads(target.read_text()) == {"accuracy": {"a": 50.0, "b": 70.0}, "avg_accuracy": 60.0,
                                              "method": "TA", "metrics": {"loss": 0.5}}
    assert [p.name for p in tmp_path.iterdir()] == ["rec.json"]  # no temp file left behind
    with pytest.raises(sweep.SweepError, match="numbers"):
        sweep.record({"a": "high"})


def test_results_keep_one_column_per_name_when_a_parameter_is_called_method(tmp_path: Path) -> None:
    points = [sweep.Point(key=f"k{i}", params={"profile": "tiny", "method": m, "status": 1, "seed": 0})
              for i, m in enumerate(["ties", "task_arithmetic"])]
    df = sweep.results_frame(tmp_path, points)
    assert list(df.columns[:6]) == ["key", "profile", "param_method", "param_status", "seed", "method"]
    assert df["method"].tolist() == ["ties", "task_arithmetic"]  # no record yet: the parameter's value
    assert df["status"].tolist() == ["pending", "pending"]


def test_cli_reports_an_unknown_parameter_as_a_usage_error(toy: Path, tmp_path: Path, capsys) -> None:
    grid = tmp_path / "g.yaml"
    grid.write_text("profile: tiny\ngrid:\n  scaling: [0.1]\n")
    assert cli_main(["sweep", str(toy), "--grid", str(grid), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "does not define ['scaling']" in err and "Traceback" not in err
    assert cli_main(["sweep", str(toy), "--out", str(tmp_path / "r")]) == 2
    assert "needs --grid" in capsys.readouterr().err


def test_report_draws_one_line_per_method_with_a_band_over_seeds() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import pandas as pd

    rows = [{"key": f"{m}{x}{s}", "profile": "tiny", "scaling_coef": x, "seed": s, "method": m, "status": "ok",
             "avg_accuracy": 50 + 10 * x + s + (5 if m == "B" else 0)}
            for m in "AB" for x in (0.1, 0.3, 0.5) for s in range(3)]
    rows.append({**rows[0], "key": "f", "status": "failed", "avg_accuracy": float("nan")})
    df = pd.DataFrame(rows)
    df.attrs["swept"] = ["scaling_coef", "seed"]
    fig = sweep.report_figure(df)
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 3]
    assert len(lines) == 2
    assert sorted(tuple(ln.get_ydata()) for ln in lines)[0] == pytest.approx((52.0, 54.0, 56.0))
    assert len(ax.collections) == 2  # one seed band per method
    assert ax.get_xlabel() == "scaling_coef"
    with pytest.raises(sweep.SweepError, match="--x"):
        df.attrs["swept"] = ["scaling_coef", "other"]
        df["other"] = 1.0
        sweep.report_figure(df)


# ----------------------------------------------------------------------------------------------
# slow: real papermill points


@pytest.mark.slow
def test_points_run_with_injected_parameters_and_a_failing_point_is_isolated(
        toy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "runs" / "toy"
    console = tmp_path / "console.log"  # what `make book` sets in a chapter's kernel
    monkeypatch.setenv(sweep.CONSOLE_ENV, str(console))
    grid = {"profile": "tiny", "seeds": [0], "grid": {"x": [1.0, 2.0, 3.0]}, "fixed": {"fail_at": 2.0}}
    df = sweep.run_sweep(toy, grid, out, workers=0, stream=io.StringIO())
    assert list(df["status"]) == ["ok", "failed", "ok"]
    assert "[sweep toy] 2/3 done (0 already), 0 running, 1 failed, 0 pending" in console.read_text()
    failed = df[df["status"] == "failed"].iloc[0]
    assert "RuntimeError: boom at x=2.0" in failed["error"]
    assert df.loc[df["status"] == "ok", "avg_accuracy"].tolist() == [15.0, 45.0]  # (10x + 20x) / 2
    assert df["accuracy_t1"].tolist()[::2] == [10.0, 30.0]
    # every point keeps its executed notebook, the failing one up to its error
    for key, x in zip(df["key"], [1.0, 2.0, 3.0]):
        nb = json.loads((out / "points" / key / "notebook.ipynb").read_text())
        injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
        assert len(injected) == 1 and f"x = {x}" in "".join(injected[0]["source"])
        assert "fail_at = 2.0" in "".join(injected[0]["source"])
        text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
        assert (f"ran {x} 0 A tiny" in text) == (x != 2.0)
    # the parquet file: one row per point, with this schema
    import pyarrow.parquet as pq

    table = pq.read_table(str(out / "results.parquet"))
    schema = {f.name: str(f.type) for f in table.schema}
    assert list(schema)[:9] == ["key", "profile", "x", "fail_at", "seed", "method", "status", "avg_accuracy",
                                "accuracy_t1"]
    assert {"accuracy_t2": "double", "metric_loss": "double", "wall_time_s": "double", "error": "string",
            "notebook": "string", "seed": "int64", "x": "double", "status": "string"}.items() <= schema.items()
    assert table.num_rows == 3
    assert (table.column("wall_time_s").to_pylist()[0] or 0) > 0
    loaded = sweep.load_results(out)
    assert loaded.attrs["swept"] == ["x"]
    assert loaded["method"].tolist()[::2] == ["A", "A"]
    assert loaded["method"].isna().tolist() == [False, True, False]  # a failed point recorded no label


def _statuses(out: Path) -> dict[str, str]:
    return {p.parent.name: json.loads(p.read_text())["status"] for p in out.glob("points/*/point.json")}


@pytest.mark.slow
def test_a_killed_sweep_resumes_running_only_the_missing_points(toy: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "runs" / "resume", tmp_path / "executions.txt"
    grid = tmp_path / "grid.yaml"
    grid.write_text(f"profile: tiny\nseeds: [0]\ngrid:\n  x: [1.0, 2.0, 3.0, 4.0]\n"
                    f"fixed:\n  log: {str(log)!r}\n  sleep_from: 3.0\n")
    Path(str(log) + ".block").touch()  # points x >= 3 hang until killed
    cmd = [sys.executable, "-m", "mergebook.cli", "sweep", str(toy), "--grid", str(grid), "--out", str(out),
           "--workers", "0"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 240
    while list(_statuses(out).values()).count("ok") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    time.sleep(2)  # the third point is now hanging in its kernel
    assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(_statuses(out).values()) == ["ok", "ok"], proc.stdout.read().decode()[-2000:]
    first = sweep.load_results(out)
    assert first["status"].tolist() == ["ok", "ok", "pending", "pending"]
    done_before = {k: (out / "points" / k / "point.json").read_text() for k in _statuses(out)}

    time.sleep(3)  # a kernel orphaned by the kill exits within a second (ipykernel's parent poller)
    Path(str(log) + ".block").unlink()
    lines: list[str] = []

    class Stream:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    df = sweep.run_sweep(toy, grid, out, workers=0, stream=Stream())
    assert df["status"].tolist() == ["ok"] * 4
    assert sorted(log.read_text().split("\n")[:-1]) == ["1.0 0", "2.0 0", "3.0 0", "4.0 0"]  # each ran once
    assert all((out / "points" / k / "point.json").read_text() == v for k, v in done_before.items())
    assert "2/4 done (2 already)" in "".join(lines)


@pytest.mark.slow
def test_local_cluster_of_two_workers_runs_points_side_by_side(toy: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs" / "dask"
    lines: list[str] = []

    class Stream:
        def write(self, s: str) -> None:
            lines.append(s)

        def flush(self) -> None:
            pass

    grid = {"profile": "tiny", "seeds": [0, 1], "grid": {"x": [1.0, 2.0]}, "fixed": {"fail_at": 2.0}}
    df = sweep.run_sweep(toy, grid, out, workers=2, stream=Stream())
    assert len(df) == 4
    assert df["status"].tolist() == ["ok", "ok", "failed", "failed"]
    text = "".join(lines)
    assert "2 running" in text, text  # two single-threaded workers, one point each at a time
    assert max(int(n) for n in re.findall(r"(\d+) running", text)) == 2, text
    pending = [int(n) for n in re.findall(r"(\d+) pending", text)]
    assert pending == sorted(pending, reverse=True), text  # a point never goes back to pending
    assert "4/4 done" not in text and "2/4 done (0 already), 0 running, 2 failed, 0 pending" in text
    assert sweep.finished(out, df["key"].iloc[0]) and not sweep.finished(out, df["key"].iloc[2])
    lines.clear()
    again = sweep.run_sweep(toy, grid, out, workers=2, stream=Stream())  # failed points are retried
    assert again["status"].tolist() == df["status"].tolist()
    assert "2/4 done (2 already), 0 running, 2 failed" in "".join(lines)
