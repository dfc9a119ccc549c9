"""The experiment layer: bootstrap intervals, results frames, verdicts, and cached selection on val.

A chapter's cells call these instead of defining helpers:

* :func:`bootstrap_interval` / :func:`average_interval` turn per-sample correctness into a mean
  with a 95% interval (a bootstrap over test images; stratified by task for the average);
* :func:`results_frame` builds the method x (avg, lo, hi, tasks...) table and
  :func:`format_frame` prints it as ``"72.5 [71.6, 73.4]"``;
* :func:`greater`, :func:`less`, :func:`within`, :func:`all_of` are rules that decide a claim
  *holds*, *partly holds* or *does not hold* from numbers with intervals; :func:`verdict_table`
  lists claims with the rule text generated from the rule itself;
* :func:`sweep` / :func:`select_on_val` run a cached grid of a merge method and choose the grid
  point on the validation split (test labels are only used to score the choice).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

HOLDS, PARTLY, FAILS = "holds", "partly holds", "does not hold"
VERDICTS = (HOLDS, PARTLY, FAILS)


# --------------------------------------------------------------------------------------------------
# Intervals
# --------------------------------------------------------------------------------------------------
class Interval(NamedTuple):
    """A point estimate with its interval, in percent; ``label`` names it in generated rule text."""

    mean: float
    lo: float
    hi: float
    level: float = 0.95
    label: str = ""

    @classmethod
    def point(cls, value: float, label: str = "") -> Interval:
        """A number without uncertainty (a reported value, a threshold, a chosen λ)."""
        v = float(value)
        return cls(v, v, v, 1.0, label)

    def named(self, label: str) -> Interval:
        """The same interval under another label."""
        return self._replace(label=label)

    @property
    def is_point(self) -> bool:
        """True when the interval has zero width."""
        return self.lo == self.hi

    def format(self, digits: int = 1) -> str:
        """``"72.5 [71.6, 73.4]"`` (just ``"72.5"`` for a point)."""
        return format_interval(self.mean, self.lo, self.hi, digits)

    def __str__(self) -> str:
        return self.format()


def format_interval(mean: float, lo: float, hi: float, digits: int = 1) -> str:
    """``"72.5 [71.6, 73.4]"``; a zero-width interval prints as its value, NaN as ``"–"``."""
    if mean is None or not np.isfinite(mean):
        return "–"
    m = f"{float(mean):.{digits}f}"
    if lo is None or hi is None or not (np.isfinite(lo) and np.isfinite(hi)) or lo == hi:
        return m
    return f"{m} [{float(lo):.{digits}f}, {float(hi):.{digits}f}]"


def _as_correct(correct: Any, what: str = "correct") -> np.ndarray:
    """Validate a per-sample correctness array (bool or 0/1) and return it as bool."""
    a = np.asarray(correct)
    if a.ndim != 1:
        raise ValueError(f"{what}: expected a 1-d array of per-sample correctness, got shape {a.shape}")
    if a.size == 0:
        raise ValueError(f"{what}: no samples; pass one entry per test image (evaluate.correctness gives them)")
    if a.dtype != bool:
        if not np.isin(a, (0, 1)).all():
            bad = a[~np.isin(a, (0, 1))][:3]
            raise ValueError(f"{what}: correctness must be bool or 0/1, found values like {bad.tolist()}; "
                             "pass predictions == labels, not accuracies or logits")
        a = a.astype(bool)
    return a


def _check_level(level: float, n_boot: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), e.g. 0.95 for a 95% interval; got {level}")
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be a positive number of bootstrap resamples; got {n_boot}")


def _boot_means(correct_by_task: Sequence[np.ndarray], n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap replicates (percent) of the mean over tasks of per-task accuracy, shape [n_boot].

    Resampling n binary outcomes with replacement and counting the ones is exactly a
    Binomial(n, k/n) draw, so each task costs n_boot binomial draws instead of an n_boot x n index
    matrix; tasks are resampled independently (a stratified bootstrap, since each task's test set
    is fixed in size).
    """
    rng = np.random.default_rng(seed)
    acc = np.zeros(int(n_boot))
    for c in correct_by_task:
        n = c.size
        acc += rng.binomial(n, c.mean(), size=int(n_boot)) / n
    return 100.0 * acc / len(correct_by_task)


def _percentiles(reps: np.ndarray, level: float) -> tuple[float, float]:
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(reps, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def bootstrap_interval(correct: Any, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                       label: str = "") -> Interval:
    """Accuracy (%) of one task's per-sample correctness with a percentile-bootstrap interval."""
    _check_level(level, n_boot)
    c = _as_correct(correct)
    lo, hi = _percentiles(_boot_means([c], n_boot, seed), level)
    return Interval(100.0 * float(c.mean()), lo, hi, level, label)


def average_interval(correct_by_task: Mapping[str, Any], n_boot: int = 2000, level: float = 0.95,
                     seed: int = 0, label: str = "") -> Interval:
    """Mean over tasks of per-task accuracy (%), with a bootstrap interval stratified by task."""
    _check_level(level, n_boot)
    if not correct_by_task:
        raise ValueError("average_interval: no tasks given; pass {task: per-sample correctness}")
    cs = [_as_correct(v, f"task {t!r}") for t, v in correct_by_task.items()]
    lo, hi = _percentiles(_boot_means(cs, n_boot, seed), level)
    mean = 100.0 * float(np.mean([c.mean() for c in cs]))
    return Interval(mean, lo, hi, level, label)


def paired_difference_interval(a: Mapping[str, Any], b: Mapping[str, Any], n_boot: int = 2000,
                               level: float = 0.95, seed: int = 0, label: str = "") -> Interval:
    """Average accuracy of ``a`` minus ``b`` (points) on the same test images, paired bootstrap.

    Both methods are scored on the same images, so resampling images jointly removes the
    between-image variance that two separate intervals double count. Each image falls in one of
    four (a right?, b right?) cells, so a resample of a task is one multinomial draw of cell counts.
    """
    _check_level(level, n_boot)
    if set(a) != set(b):
        raise ValueError(f"paired_difference_interval: tasks differ: {sorted(set(a) ^ set(b))} "
                         "are in one method only; pass the same tasks for both")
    if not a:
        raise ValueError("paired_difference_interval: no tasks given")
    rng = np.random.default_rng(seed)
    diff = np.zeros(int(n_boot))
    point = 0.0
    for t in a:
        ca, cb = _as_correct(a[t], f"task {t!r} (a)"), _as_correct(b[t], f"task {t!r} (b)")
        if ca.size != cb.size:
            raise ValueError(f"task {t!r}: {ca.size} samples for a but {cb.size} for b; a paired "
                             "interval needs both scored on the same images")
        n = ca.size
        # cells: (a right, b wrong) adds +1, (a wrong, b right) adds -1, agreements add 0
        p = np.array([np.sum(ca & ~cb), np.sum(~ca & cb), np.sum(ca == cb)], dtype=float) / n
        counts = rng.multinomial(n, p, size=int(n_boot))
        diff += (counts[:, 0] - counts[:, 1]) / n
        point += (ca.mean() - cb.mean())
    reps = 100.0 * diff / len(a)
    lo, hi = _percentiles(reps, level)
    return Interval(100.0 * point / len(a), lo, hi, level, label)


# --------------------------------------------------------------------------------------------------
# Compact correctness for cached JSON results
# --------------------------------------------------------------------------------------------------
def pack_correct(correct: Any) -> str:
    """Per-sample correctness as ``"<n>:<base64 bits>"`` (1000 images → 172 characters of JSON)."""
    c = _as_correct(correct)
    return f"{c.size}:{base64.b64encode(np.packbits(c).tobytes()).decode('ascii')}"


def unpack_correct(packed: str | Sequence[int] | np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_correct`; plain lists/arrays of 0/1 are accepted as they are."""
    if not isinstance(packed, str):
        return _as_correct(packed)
    n_str, sep, data = packed.partition(":")
    if not sep or not n_str.isdigit():
        raise ValueError(f"not a packed correctness string (expected '<n>:<base64>'): {packed[:40]!r}")
    n = int(n_str)
    bits = np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))
    if bits.size < n or bits.size - n >= 8:
        raise ValueError(f"packed correctness says {n} samples but holds {bits.size} bits; the entry is corrupt")
    return bits[:n].astype(bool)


def pack_by_task(correct_by_task: Mapping[str, Any]) -> dict[str, str]:
    """:func:`pack_correct` for every task."""
    return {t: pack_correct(v) for t, v in correct_by_task.items()}


def unpack_by_task(packed: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """:func:`unpack_correct` for every task."""
    return {t: unpack_correct(v) for t, v in packed.items()}


# --------------------------------------------------------------------------------------------------
# Results frames
# --------------------------------------------------------------------------------------------------
def results_frame(rows: Mapping[str, Mapping[str, Any]], tasks: Sequence[str] | None = None, *,
                  reported: Mapping[str, Mapping[str, float] | float | None] | None = None,
                  n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Methods x [avg, lo, hi, (reported, Δ), tasks...] from per-sample correctness.

    ``rows`` maps a method to ``{task: correctness}`` (bool arrays or packed strings). ``avg`` is the
    mean over ``tasks`` of per-task accuracy and ``lo``/``hi`` its stratified bootstrap interval;
    the per-task columns are accuracies (%). With ``reported`` (method → ``{"avg": v, task: v}`` or
    a bare average), a ``reported`` column (the paper's average) and ``Δ`` (ours − reported) follow
    ``hi``; methods without a reported number get NaN.
    """
    if not rows:
        raise ValueError("results_frame: no rows; pass {method: {task: per-sample correctness}}")
    if tasks is None:
        tasks = list(next(iter(rows.values())))
    tasks = list(tasks)
    out = {}
    for method, by_task in rows.items():
        missing = [t for t in tasks if t not in by_task]
        if missing:
            raise KeyError(f"results_frame: method {method!r} has no correctness for tasks {missing}; "
                           f"it has {list(by_task)}")
        cs = {t: unpack_correct(by_task[t]) for t in tasks}
        iv = average_interval(cs, n_boot=n_boot, level=level, seed=seed)
        rec: dict[str, float] = {"avg": iv.mean, "lo": iv.lo, "hi": iv.hi}
        if reported is not None:
            rep = _reported_avg(reported.get(method))
            rec["reported"] = rep
            rec["Δ"] = iv.mean - rep
        rec.update({t: 100.0 * float(cs[t].mean()) for t in tasks})
        out[method] = rec
    df = pd.DataFrame.from_dict(out, orient="index")
    df.index.name = "method"
    df.attrs["level"] = level
    return df


def _reported_avg(rep: Mapping[str, float] | float | None) -> float:
    if rep is None:
        return float("nan")
    if isinstance(rep, Mapping):
        for k in rep:
            if k == "avg" or str(k).lower().startswith("av"):
                return float(rep[k])
        return float("nan")
    return float(rep)


def interleave_reported(frame: pd.DataFrame, reported: Mapping[str, Mapping[str, float] | None],
                        suffix: str = "reported") -> pd.DataFrame:
    """Put a ``"<method> · reported"`` row under each method, with the paper's per-task numbers.

    ``reported[method]`` maps task (and ``"avg"``) to the paper's value; a method without a paper
    row gets no reported row. The reported rows' ``lo``/``hi``/``Δ`` are NaN.
    """
    parts = []
    for method, row in frame.iterrows():
        parts.append(row.rename(method))
        rep = reported.get(method)
        if rep:
            r = pd.Series(np.nan, index=frame.columns, name=f"{method} · {suffix}")
            for k, v in rep.items():
                col = "avg" if (k == "avg" or str(k).lower().startswith("av")) else k
                if col in r.index:
                    r[col] = float(v)
            parts.append(r)
    out = pd.DataFrame(parts)
    out.index.name = frame.index.name
    out.attrs.update(frame.attrs)
    return out


def format_frame(frame: pd.DataFrame, digits: int = 1) -> pd.DataFrame:
    """Strings for display: ``avg`` becomes ``"72.5 [71.6, 73.4]"`` (``lo``/``hi`` folded in), NaN → ``"–"``."""
    shown = frame.drop(columns=[c for c in ("lo", "hi") if c in frame.columns])
    out = pd.DataFrame(index=frame.index, columns=shown.columns, dtype=object)
    for c in shown.columns:
        if c == "avg" and {"lo", "hi"} <= set(frame.columns):
            out[c] = [format_interval(m, lo, hi, digits)
                      for m, lo, hi in zip(frame["avg"], frame["lo"], frame["hi"])]
        elif c == "Δ":
            out[c] = ["–" if not np.isfinite(v) else f"{v:+.{digits}f}" for v in frame[c]]
        else:
            out[c] = [_fmt(v, digits) for v in frame[c]]
    if "avg" in out.columns and {"lo", "hi"} <= set(frame.columns):
        level = frame.attrs.get("level", 0.95)
        out = out.rename(columns={"avg": f"avg [{100 * level:g}% CI]"})
    return out


def _fmt(v: Any, digits: int) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "–" if not np.isfinite(f) else f"{f:.{digits}f}"


def row_interval(frame: pd.DataFrame, method: str, label: str | None = None) -> Interval:
    """The (avg, lo, hi) of one method of a :func:`results_frame` as an :class:`Interval`."""
    if method not in frame.index:
        raise KeyError(f"no method {method!r} in the frame; it has {list(frame.index)}")
    r = frame.loc[method]
    return Interval(float(r["avg"]), float(r["lo"]), float(r["hi"]), frame.attrs.get("level", 0.95),
                    method if label is None else label)


# --------------------------------------------------------------------------------------------------
# Verdicts
# --------------------------------------------------------------------------------------------------
Number = Interval | float | int


def _iv(x: Number) -> Interval:
    if isinstance(x, Interval):
        return x
    if isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool):
        return Interval.point(float(x))
    raise TypeError(f"a rule compares Intervals or numbers, got {type(x).__name__}: {x!r}")


def _name(x: Interval) -> str:
    return x.label or f"{x.mean:g}"


def _level_text(*xs: Interval) -> str:
    levels = {x.level for x in xs if not x.is_point}
    return "/".join(f"{100 * lv:g}%" for lv in sorted(levels)) or ""


@dataclass(frozen=True)
class Rule:
    """A decision rule over numbers with intervals: its generated text, verdict and our numbers."""

    text: str
    verdict: str
    ours: str
    check_points: Callable[[Sequence[float]], bool] = field(repr=False, compare=False)
    arity: int = 2
    expr: str = ""  # the bare comparison, e.g. "TA > WA" (all_of joins these)
    levels: str = ""  # "95%" when an operand carries an interval, "" for plain numbers

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def _decide(sure: bool, point: bool) -> str:
    return HOLDS if sure else (PARTLY if point else FAILS)


def _rule_text(expr: str, *xs: Interval, sure: str = "intervals apart") -> str:
    """``expr``, plus how intervals decide it when any operand has one (generated, never typed)."""
    lv = _level_text(*xs)
    return f"{expr} (holds: {lv} {sure}; partly: point estimates only)" if lv else expr


def _apart(a: Interval, b: Interval, side: str) -> str:
    """How intervals decide a comparison: both have one, or one side is a plain number."""
    if a.is_point or b.is_point:
        return f"interval {side} {_name(a if a.is_point else b)}"
    return "intervals apart"


def greater(a: Number, b: Number, margin: float = 0.0) -> Rule:
    """``a > b (+ margin)``: holds if a's interval lies wholly above b's, partly if only the means do."""
    a, b = _iv(a), _iv(b)
    m = f" + {margin:g}" if margin else ""
    sure = a.lo > b.hi + margin
    point = a.mean > b.mean + margin
    expr = f"{_name(a)} > {_name(b)}{m}"
    return Rule(_rule_text(expr, a, b, sure=_apart(a, b, "above" if b.is_point else "below")),
                _decide(sure, point), f"{a.format()} vs {b.format()}",
                lambda v: v[0] > v[1] + margin, 2, expr, _level_text(a, b))


def less(a: Number, b: Number, margin: float = 0.0) -> Rule:
    """``a < b (− margin)``: holds if a's interval lies wholly below b's, partly if only the means do."""
    a, b = _iv(a), _iv(b)
    m = f" − {margin:g}" if margin else ""
    sure = a.hi < b.lo - margin
    point = a.mean < b.mean - margin
    expr = f"{_name(a)} < {_name(b)}{m}"
    return Rule(_rule_text(expr, a, b, sure=_apart(a, b, "below" if b.is_point else "above")),
                _decide(sure, point), f"{a.format()} vs {b.format()}",
                lambda v: v[0] < v[1] - margin, 2, expr, _level_text(a, b))


def within(a: Number, b: Number, tol: float) -> Rule:
    """``|a − b| ≤ tol``: holds if a's whole interval is within tol of b's, partly if the means are."""
    if not tol >= 0:
        raise ValueError(f"within: tol must be a number ≥ 0, got {tol}")
    a, b = _iv(a), _iv(b)
    sure = (a.lo >= b.hi - tol) and (a.hi <= b.lo + tol)
    point = abs(a.mean - b.mean) <= tol
    expr = f"|{_name(a)} − {_name(b)}| ≤ {tol:g}"
    return Rule(_rule_text(expr, a, b, sure="interval within tol"), _decide(sure, point),
                f"{a.format()} vs {b.format()}", lambda v: abs(v[0] - v[1]) <= tol, 2, expr, _level_text(a, b))


def all_of(*rules: Rule) -> Rule:
    """Every part must hold: holds if all hold, partly if all at least partly hold, else does not hold."""
    if not rules:
        raise ValueError("all_of needs at least one rule")
    vs = [r.verdict for r in rules]
    verdict = HOLDS if all(v == HOLDS for v in vs) else (PARTLY if FAILS not in vs else FAILS)
    expr = " and ".join(r.expr or r.text for r in rules)
    levels = "/".join(sorted({r.levels for r in rules if r.levels}))
    text = (f"{expr} (holds: every part holds by its {levels} intervals; partly: every part "
            "at least by point estimates)" if levels else expr)
    arities = [r.arity for r in rules]

    def check(v: Sequence[float]) -> bool:
        i, ok = 0, True
        for r, k in zip(rules, arities):
            ok = ok and r.check_points(v[i:i + k])
            i += k
        return ok

    return Rule(text, verdict, "; ".join(r.ours for r in rules), check, sum(arities), expr, levels)


@dataclass(frozen=True)
class Claim:
    """One claim of a paper, the rule that decides it on our numbers, and the paper's own numbers."""

    claim: str
    rule: Rule
    reported: Sequence[float] | str | None = None

    def reported_text(self) -> str:
        """The paper's numbers, and whether they satisfy the rule's point comparison."""
        rep = self.reported
        if rep is None:
            return "–"
        if isinstance(rep, str):
            return rep
        vals = [float(v) for v in rep]
        shown = " vs ".join(f"{v:g}" for v in vals)
        if len(vals) != self.rule.arity or not all(np.isfinite(vals)):
            return shown
        return f"{shown} ({HOLDS if self.rule.check_points(vals) else FAILS})"


def verdict(claim: str, rule: Rule, reported: Sequence[float] | str | None = None) -> Claim:
    """A :class:`Claim` (shorthand for the constructor)."""
    return Claim(claim, rule, reported)


def verdict_table(claims: Sequence[Claim]) -> pd.DataFrame:
    """One row per claim, in the given order, indexed by the claim's text (the row label a reader
    sees, so the page shows no 0, 1, ... column): columns rule, ours, reported, verdict.
    ``to_csv`` keeps the claim as the first column."""
    if not claims:
        raise ValueError("verdict_table: no claims given")
    texts = [c.claim for c in claims]
    dup = sorted({t for t in texts if texts.count(t) > 1})
    if dup:
        raise ValueError(f"verdict_table: claims must be distinct, {dup} appear more than once; reword one")
    return pd.DataFrame([{"rule": c.rule.text, "ours": c.rule.ours, "reported": c.reported_text(),
                          "verdict": c.rule.verdict} for c in claims], index=pd.Index(texts, name="claim"))


# --------------------------------------------------------------------------------------------------
# Cached sweeps and selection on the validation split
# --------------------------------------------------------------------------------------------------
def grid_key(point: float | Mapping[str, Any]) -> str:
    """The key of one grid point in a sweep result: ``"0.3"``, or ``"k=0.2,scaling_coef=0.3"``."""
    if isinstance(point, Mapping):
        return ",".join(f"{k}={_g(v)}" for k, v in point.items())
    return _g(point)


def _g(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def sweep(suite: Any, method: str, grid: Sequence[float] | Sequence[Mapping[str, Any]], *,
          param: str = "scaling_coef", name: str | None = None, pretrained: Any = None,
          finetuned: Any = None, **params: Any) -> dict[str, dict[str, Any]]:
    """Merge with ``method`` at every grid point and score on val and test (cached).

    A grid point is a value of ``param`` (default the scaling coefficient λ) or a dict of
    parameters. The result maps :func:`grid_key` of each point to ``{"test": accuracies,
    "val": accuracies, "test_correct": packed per-sample correctness}``; accuracies are
    :func:`mergebook.evaluate.evaluate` dicts (per task and ``"avg"``). The cache entry is named
    ``sweep-<method>`` (or ``name``) and keyed by the grid and ``params``.
    """
    from .evaluate import correctness, evaluate
    from .methods import merge
    from .results import cached_result

    grid = list(grid)
    if not grid:
        raise ValueError(f"sweep({method!r}): empty grid; pass the values of {param!r} to try")
    keys = [grid_key(p) for p in grid]
    if len(set(keys)) != len(keys):
        raise ValueError(f"sweep({method!r}): repeated grid points {sorted(k for k in keys if keys.count(k) > 1)}")
    pre = suite.pretrained if pretrained is None else pretrained
    fts = suite.finetuned_list() if finetuned is None else finetuned
    tasks = list(suite.tasks)

    def compute() -> dict[str, Any]:
        out = {}
        for key, p in zip(keys, grid):
            kw = dict(p) if isinstance(p, Mapping) else {param: p}
            sd = merge(method, pre, fts, **params, **kw)
            correct = correctness(suite, sd, tasks)
            test = {t: 100.0 * float(correct[t].mean()) for t in tasks}
            test["avg"] = float(np.mean([test[t] for t in tasks]))
            out[key] = {"test": test, "val": evaluate(suite, sd, tasks, split="val"),
                        "test_correct": pack_by_task(correct)}
        return out

    # "format" keeps these entries apart from the chapters' older in-cell sweeps (same name and
    # grid, but without per-sample correctness)
    return cached_result(suite, name or f"sweep-{method}", {"grid": grid, **params, "format": 2}, compute)


def lookup_sweep(suite: Any, method: str, grid: Sequence[float] | Sequence[Mapping[str, Any]], *,
                 name: str | None = None, **params: Any) -> dict[str, dict[str, Any]] | None:
    """The cached :func:`sweep` result for the same arguments, or None if it was never run (never computes)."""
    from .results import lookup_result

    return lookup_result(suite, name or f"sweep-{method}", {"grid": list(grid), **params, "format": 2})


def sweep_frame(result: Mapping[str, Mapping[str, Any]], tasks: Sequence[str], split: str = "test",
                index_name: str = "λ") -> pd.DataFrame:
    """A sweep result as grid point x (tasks..., avg); numeric grid keys become a sorted float index."""
    if split not in ("test", "val"):
        raise ValueError(f"split must be 'test' or 'val', got {split!r}")
    df = pd.DataFrame({k: r[split] for k, r in result.items()}).T
    try:
        df.index = [float(i) for i in df.index]
        df = df.sort_index()
    except ValueError:  # dict-valued grid points keep their grid order
        pass
    df.index.name = index_name
    return df[list(tasks) + ["avg"]]


def best_on_val(result: Mapping[str, Mapping[str, Any]]) -> str:
    """The grid key with the highest validation average (the first one on ties, in grid order)."""
    if not result:
        raise ValueError("best_on_val: empty sweep result")
    return max(result, key=lambda k: result[k]["val"]["avg"])


@dataclass(frozen=True)
class Selection:
    """The grid point chosen on val, with its test accuracies and per-sample test correctness."""

    key: str
    val_avg: float
    test: dict[str, float]
    correct: dict[str, np.ndarray]

    @property
    def value(self) -> float:
        """The chosen value as a number (for a one-parameter grid)."""
        return float(self.key)


def select_on_val(result: Mapping[str, Mapping[str, Any]]) -> Selection:
    """Choose the grid point of a :func:`sweep` result by validation average; score it on test."""
    key = best_on_val(result)
    r = result[key]
    correct = unpack_by_task(r["test_correct"]) if "test_correct" in r else {}
    return Selection(key, float(r["val"]["avg"]), dict(r["test"]), correct)


def sweep_correct(result: Mapping[str, Mapping[str, Any]], key: float | str) -> dict[str, np.ndarray]:
    """Per-sample test correctness of one grid point of a :func:`sweep` result."""
    k = key if isinstance(key, str) else grid_key(key)
    if k not in result:
        raise KeyError(f"grid point {k!r} is not in this sweep; it has {list(result)}")
    return unpack_by_task(result[k]["test_correct"])


def scored(suite: Any, state_dict: Any, tasks: Sequence[str] | None = None) -> dict[str, Any]:
    """``{"accuracy": evaluate-style dict, "correct": packed per-sample correctness}`` on test."""
    from .evaluate import correctness

    tasks = list(tasks or suite.tasks)
    c = correctness(suite, state_dict, tasks)
    acc = {t: 100.0 * float(c[t].mean()) for t in tasks}
    acc["avg"] = float(np.mean([acc[t] for t in tasks]))
    return {"accuracy": acc, "correct": pack_by_task(c)}


def reference_rows(suite: Any) -> dict[str, Any]:
    """Pretrained, Individual (each task's own fine-tuned model) and, where the suite has one,
    Traditional MTL: ``{"accuracy": {row: {task: acc, "avg": mean}}, "correct": {row: {task: packed}}}``.

    Cached as ``reference_rows``; no multi-task checkpoint is published for the CLIP profiles, so
    their MTL row is reported, not run.
    """
    from .results import cached_result

    tasks = list(suite.tasks)

    def compute() -> dict[str, Any]:
        rows = {"Pretrained": scored(suite, suite.pretrained, tasks)}
        ind = {t: scored(suite, suite.finetuned[t], [t]) for t in tasks}
        acc = {t: ind[t]["accuracy"][t] for t in tasks}
        acc["avg"] = float(np.mean([acc[t] for t in tasks]))
        rows["Individual"] = {"accuracy": acc, "correct": {t: ind[t]["correct"][t] for t in tasks}}
        if "mtl" in suite.meta:
            rows["Traditional MTL"] = scored(suite, suite.meta["mtl"], tasks)
        return {"accuracy": {k: v["accuracy"] for k, v in rows.items()},
                "correct": {k: v["correct"] for k, v in rows.items()}}

    # the key says whether the suite carries a multi-task model: a chapter that loaded the suite
    # without one must not hand its MTL-less rows to a chapter that loaded it with one
    return cached_result(suite, "reference_rows", {"mtl": "mtl" in suite.meta}, compute)


def data_using_rows(suite: Any, num_examples: int = 200, regmean_alpha: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Weight Averaging, Fisher Merging and RegMean scored on test (cached as ``data_using_rows``).

    Fisher and RegMean see ``num_examples`` unlabelled val images per task, drawn with ``seed``
    (hub splits may be sorted by class). Same shape as :func:`reference_rows`.
    """
    from .methods import merge
    from .results import cached_result

    tasks = list(suite.tasks)

    def compute() -> dict[str, Any]:
        pre, fts = suite.pretrained, suite.finetuned_list()
        heads = [suite.heads[t] for t in tasks]
        data = [suite.val[t].sample(num_examples, seed).images for t in tasks]
        merged = {
            "Weight Averaging": merge("weight_averaging", pre, fts),
            "Fisher Merging": merge("fisher", pre, fts, model=suite.model, heads=heads, data=data,
                                    num_examples=num_examples),
            "RegMean": merge("regmean", pre, fts, model=suite.model, data=data, num_examples=num_examples,
                             alpha=regmean_alpha),
        }
        rows = {k: scored(suite, sd, tasks) for k, sd in merged.items()}
        return {"accuracy": {k: v["accuracy"] for k, v in rows.items()},
                "correct": {k: v["correct"] for k, v in rows.items()}}

    return cached_result(suite, "data_using_rows", {"n": num_examples, "alpha": regmean_alpha, "seed": seed},
                         compute)


# --------------------------------------------------------------------------------------------------
# Cached evaluations the chapters plot (00's cross-task matrix, 02's entropy figures)
# --------------------------------------------------------------------------------------------------
def cross_task_matrix(suite: Any) -> pd.DataFrame:
    """Test accuracy (%) of every model of the suite on every task with that task's head (cached).

    Rows: ``pretrained`` (zero-shot), each fine-tuned model under its task's name, and ``traditional
    MTL`` where the suite carries a multi-task model; columns: the tasks, in suite order.
    """
    from .evaluate import accuracy
    from .results import cached_result

    tasks = list(suite.tasks)

    def compute() -> dict[str, dict[str, float]]:
        models = {"pretrained": suite.pretrained, **{t: suite.finetuned[t] for t in tasks}}
        if "mtl" in suite.meta:
            models["traditional MTL"] = suite.meta["mtl"]
        return {name: {t: accuracy(suite.model, sd, suite.heads[t], suite.test[t]) for t in tasks}
                for name, sd in models.items()}

    return pd.DataFrame(cached_result(suite, "cross_task_matrix", {}, compute)).T.loc[:, tasks]


def entropy_loss_at(suite: Any, coefficient: float) -> dict[str, dict[str, list[float]]]:
    """Per-image prediction entropy and cross-entropy loss of Task Arithmetic at λ = ``coefficient``
    on every task's test images (cached): ``{task: {"entropy": [...], "loss": [...]}}``, the data of
    AdaMerging's Fig. 3 / Fig. 11."""
    from .evaluate import entropy_and_loss
    from .methods import merge
    from .results import cached_result

    coefficient = float(coefficient)
    if not np.isfinite(coefficient):
        raise ValueError(f"entropy_loss_at: the coefficient λ must be finite, got {coefficient!r}")

    def compute() -> dict[str, dict[str, list[float]]]:
        merged = merge("task_arithmetic", suite.pretrained, suite.finetuned_list(), scaling_coef=coefficient)
        return {t: {k: v.tolist() for k, v in d.items()} for t, d in entropy_and_loss(suite, merged).items()}

    return cached_result(suite, "entropy_vs_loss", {"lambda": coefficient, "format": 2}, compute)


def entropy_coupling_at(suite: Any, coefficient: float, n: int) -> pd.DataFrame:
    """:func:`mergebook.analysis.entropy_coupling` at λ = ``coefficient`` on ``n`` images per task
    (cached), as a tasks × tasks frame: row i, column j is ∂H_i/∂λ_j."""
    from .analysis import entropy_coupling
    from .results import cached_result

    frame = pd.DataFrame(cached_result(suite, "entropy_coupling", {"lambda": float(coefficient), "n": int(n)},
                                       lambda: entropy_coupling(suite, coefficient, n).to_dict()))
    tasks = list(suite.tasks)
    return frame.loc[tasks, tasks]


# --------------------------------------------------------------------------------------------------
# Adaptive runs (AdaMerging, Concrete), cached with per-sample correctness
# --------------------------------------------------------------------------------------------------
def adaptive_run(suite: Any, name: str, params: Mapping[str, Any], run: Callable[[], Any],
                 remerges: Mapping[str, Callable[[Any], Any]] | None = None) -> dict[str, Any]:
    """Run an adaptive merge once (cached as ``name``): its ``to_dict()`` plus test correctness.

    ``run()`` returns an :class:`mergebook.adaptation.AdaptationResult`. The cached dict adds
    ``"correct"`` (packed per-sample test correctness of its final weights) and, for each
    ``remerges[label](result) -> state dict`` (e.g. the same Concrete run with its hard mask),
    ``"remerged"[label]`` as :func:`scored` gives it. ``params`` is the cache key: two chapters
    that pass the same name and params share one run.
    """
    from .evaluate import correctness
    from .results import cached_result

    tasks = list(suite.tasks)

    def compute() -> dict[str, Any]:
        res = run()
        out = res.to_dict()
        out["correct"] = pack_by_task(correctness(suite, res.state_dict(), tasks))
        out["remerged"] = {label: scored(suite, fn(res), tasks) for label, fn in (remerges or {}).items()}
        return out

    return cached_result(suite, name, {**dict(params), "format": 2}, compute)


def adamerging_run(suite: Any, granularity: str, plus_plus: bool = False, *, steps: int, lr: float = 1e-3,
                   batch_size: int = 16, batches_per_step: int = 1, seed: int = 0, eval_every: int = 25,
                   device: str = "auto") -> dict[str, Any]:
    """Task- or layer-wise AdaMerging(++) through :func:`adaptive_run`, one cache entry per setting.

    The key is built here, so every chapter asking for the same setting shares the run (02 and 03
    both need layer-wise AdaMerging). Coefficients are recorded 20 times along the run.
    """
    from .methods.adamerging import adamerging

    params = {"granularity": granularity, "plus_plus": bool(plus_plus), "steps": int(steps), "lr": lr,
              "batch_size": int(batch_size), "bpp": int(batches_per_step), "seed": int(seed),
              "eval_every": int(eval_every)}
    return adaptive_run(suite, "adamerging-run", params, lambda: adamerging(
        suite, granularity, plus_plus, steps=steps, lr=lr, batch_size=batch_size,
        batches_per_step=batches_per_step, seed=seed, device=device, eval_every=eval_every,
        coef_every=max(1, steps // 20), progress=True))


def concrete_run(suite: Any, granularity: str, *, steps: int = 0, meta_steps: int = 0, tta_steps: int = 0,
                 mask_lr: float = 1e-3, batch_size: int = 16, seed: int = 0, eval_every: int = 25,
                 eval_mask: str = "soft", device: str = "auto") -> dict[str, Any]:
    """Concrete TA (``granularity="none"``, ``steps`` mask steps) or task-/layer-wise Concrete
    AdaMerging (``meta_steps`` then ``tta_steps``), cached with test correctness of the soft
    sample it keeps and, under ``"remerged"``, of its hard mask (``"hard mask"``) at the same λ.

    ``mask_lr`` is the Adam learning rate of the mask logits (Concrete TA's ``lr``, Concrete
    AdaMerging's ``outer_lr``; the papers' 1e-3). Adam moves a logit by at most about ``lr`` per
    step, so a run with ten times fewer mask steps needs ten times the rate for its mask to travel
    as far as the paper's. The adaptation phase keeps AdaMerging's lr 1e-3. ``eval_every=0``
    evaluates only the last step of each phase.
    """
    from .adaptation import check_schedule
    from .methods.concrete import concrete_adamerging, concrete_task_arithmetic, remerge

    check_schedule("concrete_run", lrs={"mask_lr": mask_lr})  # before the cache is consulted
    common = dict(batch_size=batch_size, seed=seed, device=device, eval_every=eval_every, eval_mask=eval_mask)
    if granularity == "none":
        params = {"kind": "concrete_ta", "steps": int(steps), "mask_lr": float(mask_lr), **common}
        run = lambda: concrete_task_arithmetic(suite, steps=steps, lr=mask_lr, **common)  # noqa: E731
    elif granularity in ("task", "layer"):
        params = {"kind": "concrete_am", "granularity": granularity, "meta": int(meta_steps),
                  "tta": int(tta_steps), "mask_lr": float(mask_lr), **common}
        run = lambda: concrete_adamerging(suite, granularity, meta_steps=meta_steps,  # noqa: E731
                                          tta_steps=tta_steps, outer_lr=mask_lr, **common)
    else:
        raise ValueError(f"concrete_run: granularity must be 'none', 'task' or 'layer', got {granularity!r}")
    params.pop("device")
    return adaptive_run(suite, "concrete-run", params, run,
                        {"hard mask": lambda r: remerge(suite, r, "hard", device)})


def history_frame(history: Mapping[str, Any], tasks: Sequence[str], index_name: str = "step") -> pd.DataFrame:
    """A run's evaluated accuracy as step x (tasks..., avg), from ``History.to_dict()``."""
    df = pd.DataFrame(history["accuracy"], index=list(history["eval_steps"]))
    df.index.name = index_name
    return df.reindex(columns=list(tasks) + ["avg"])


def coefficient_frame(history: Mapping[str, Any], tasks: Sequence[str]) -> pd.DataFrame:
    """Task-wise coefficient snapshots as step x tasks (AdaMerging Fig. 4)."""
    c = np.asarray(history["coefficients"], dtype=float)
    if c.ndim != 2:
        raise ValueError(f"coefficient_frame: expected task-wise snapshots [S, K], got shape {c.shape}")
    df = pd.DataFrame(c, index=list(history["coefficient_steps"]), columns=list(tasks))
    df.index.name = "step"
    return df


# --------------------------------------------------------------------------------------------------
# Layers and blocks, in the encoder's forward order
# --------------------------------------------------------------------------------------------------
def forward_order(suite: Any, keys: Sequence[str]) -> list[str]:
    """``keys`` in the model's own state-dict order (safetensors files list tensors alphabetically)."""
    order = [k for k in suite.model.state_dict() if k in set(keys)]
    rest = [k for k in keys if k not in set(order)]
    return order + rest


def block_order(suite: Any, keys: Sequence[str]) -> list[str]:
    """The blocks of ``keys`` (``adaptation.block_of``) in forward order: embeddings, blocks 0..n, head."""
    from .adaptation import block_of

    blocks = list(dict.fromkeys(block_of(k) for k in forward_order(suite, keys)))
    # parameters registered before the blocks but applied after them (CLIP's ln_post and proj)
    last = {p: i + 1 for i, p in enumerate(OUTPUT_PARTS)}
    return sorted(blocks, key=lambda b: last.get(b.split(".")[-1], 0))


# in the order they are applied after the last block
OUTPUT_PARTS = ("ln_post", "post_layernorm", "proj", "visual_projection", "head")


def short_block(block: str) -> str:
    """``transformer.resblocks.3`` / ``vision_model.encoder.layers.3`` → ``block 3``; others unchanged."""
    import re

    m = re.search(r"(?:resblocks|layers|layer|blocks|block|h)\.(\d+)$", block)
    return f"block {m.group(1)}" if m else block


TENSOR_KINDS = (("attn in (q, k, v)", ("in_proj", "q_proj", "k_proj", "v_proj")),
                ("attn out", ("out_proj",)),
                ("mlp in", ("c_fc", "fc1", "mlp.0")),
                ("mlp out", ("c_proj", "fc2", "mlp.2")),
                ("layer norm", ("ln_", "layer_norm", "layernorm", "norm")),
                ("embedding", ("embedding", "class_embedding", "conv1", "patch_embed")))


def tensor_kind(key: str) -> str:
    """What a parameter tensor is: attention in/out, MLP in/out, layer norm, embedding, or projection."""
    for kind, needles in TENSOR_KINDS:
        if any(n in key for n in needles):
            return kind
    return "projection / other"


def block_means(values: Any, keys: Sequence[str], suite: Any, columns: Sequence[str]) -> pd.DataFrame:
    """Rows of ``values`` (one per key, e.g. layer-wise λ [L, K]) averaged per block, blocks in forward order."""
    from .adaptation import block_of

    df = pd.DataFrame(np.asarray(values, dtype=float), index=list(keys), columns=list(columns))
    out = df.groupby([block_of(k) for k in keys]).mean().reindex(block_order(suite, keys))
    out.index = [short_block(b) for b in out.index]
    out.index.name = "block"
    return out


def mask_frame(mask_stats: Mapping[str, Any], by: str = "block", suite: Any = None) -> pd.DataFrame:
    """Concrete mask statistics (%, weighted by size) per block (forward order) or per tensor kind."""
    from .adaptation import block_of

    per = pd.DataFrame(mask_stats["per_tensor"]).T
    if by == "block":
        per["group"] = [block_of(k) for k in per.index]
        order = block_order(suite, list(per.index)) if suite is not None else None
    elif by == "kind":
        per["group"] = [tensor_kind(k) for k in per.index]
        order = [k for k, _ in TENSOR_KINDS] + ["projection / other"]
    else:
        raise ValueError(f"mask_frame: by must be 'block' or 'kind', got {by!r}")
    cols = [c for c in ("kept", "mean_p", "sample_kept") if c in per.columns]
    w = per["numel"].astype(float)
    g = per.groupby("group")
    out = pd.DataFrame({c: 100 * g.apply(lambda d, c=c: np.average(d[c].astype(float), weights=d["numel"].astype(float)))
                        for c in cols})
    out["tensors"] = g.size()
    out["parameters"] = g.apply(lambda d: int(w[d.index].sum()))
    out = out.reindex([o for o in (order or out.index) if o in out.index])
    if by == "block":
        out.index = [short_block(b) for b in out.index]
    out.index.name = by
    return out


# --------------------------------------------------------------------------------------------------
# Entropy against loss (AdaMerging Fig. 3 and Fig. 11)
# --------------------------------------------------------------------------------------------------
def binned_means(x: Any, y: Any, n_bins: int = 11) -> pd.DataFrame:
    """Mean of ``x`` and ``y`` in ``n_bins`` equal-count bins of ``x`` (fewer when there are fewer samples)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"binned_means: need two non-empty 1-d arrays of equal length, got {x.shape} and {y.shape}")
    n_bins = min(int(n_bins), x.size)
    order = np.argsort(x, kind="stable")
    parts = np.array_split(order, n_bins)
    return pd.DataFrame({"bin": np.arange(1, n_bins + 1), "x": [x[p].mean() for p in parts],
                         "y": [y[p].mean() for p in parts], "n": [p.size for p in parts]})


def entropy_loss_bins(ent_loss: Mapping[str, Mapping[str, Any]], n_bins: int = 11,
                      all_label: str = "ALL") -> pd.DataFrame:
    """Per task and pooled (``ALL``): mean entropy and loss in ``n_bins`` entropy bins (Fig. 3a)."""
    parts = []
    pooled = {"entropy": np.concatenate([np.asarray(v["entropy"]) for v in ent_loss.values()]),
              "loss": np.concatenate([np.asarray(v["loss"]) for v in ent_loss.values()])}
    for t, v in [(all_label, pooled), *ent_loss.items()]:
        b = binned_means(v["entropy"], v["loss"], n_bins).rename(columns={"x": "entropy", "y": "loss"})
        b.insert(0, "task", t)
        parts.append(b)
    return pd.concat(parts, ignore_index=True)


def entropy_loss_spearman(ent_loss: Mapping[str, Mapping[str, Any]], all_label: str = "ALL") -> pd.Series:
    """Spearman ρ between per-sample entropy and loss, pooled (``ALL``) and per task (Fig. 11)."""
    from scipy.stats import spearmanr

    out = {all_label: spearmanr(np.concatenate([np.asarray(v["entropy"]) for v in ent_loss.values()]),
                                np.concatenate([np.asarray(v["loss"]) for v in ent_loss.values()])).statistic}
    out.update({t: spearmanr(v["entropy"], v["loss"]).statistic for t, v in ent_loss.items()})
    return pd.Series(out, name="Spearman ρ", dtype=float)


# --------------------------------------------------------------------------------------------------
# Reported per-task rows under our task names, and the two tables a results page shows
# --------------------------------------------------------------------------------------------------
def paper_task_names(tasks: Sequence[str]) -> dict[str, str]:
    """Our task → the paper's column it stands for (the miniature's analogues; CLIP tasks are themselves)."""
    from .data.tiny_suite import PAPER_ANALOGUE

    return {t: PAPER_ANALOGUE.get(t, t) for t in tasks}


def reported_by_task(paper: str, profile: Any, methods: Sequence[str], tasks: Sequence[str],
                     kind: str = "main", block: str | None = None) -> dict[str, dict[str, float] | None]:
    """The paper's row for each method (the table that matches ``profile``), keyed by OUR task names.

    ``{method: {task: value, "avg": value}}``; a method the table does not report maps to None, a
    task without a counterpart column is left out. Feed it to :func:`interleave_reported`.
    """
    from .reference import reported_rows

    names = paper_task_names(tasks)
    out: dict[str, dict[str, float] | None] = {}
    for m, row in reported_rows(paper, profile, methods, kind, block).items():
        if row is None:
            out[m] = None
            continue
        rec = {t: row[p] for t, p in names.items() if p in row}
        if "avg" in row:
            rec["avg"] = row["avg"]
        out[m] = rec
    return out


def results_tables(frame: pd.DataFrame, tasks: Sequence[str],
                   reported: Mapping[str, Mapping[str, float] | None] | None = None,
                   digits: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The two tables of a results page, as strings: a summary (avg [CI], reported, Δ and any extra
    leading columns) and per-task accuracies with a ``· reported`` row under each reported method."""
    tasks = list(tasks)
    summary = format_frame(frame.drop(columns=[t for t in tasks if t in frame.columns]), digits)
    per = frame[tasks + ["avg"]]
    if reported:
        per = interleave_reported(per, {m: r for m, r in reported.items() if r})
    per_task = pd.DataFrame({c: [_fmt(v, digits) for v in per[c]] for c in per.columns}, index=per.index)
    return summary, per_task


def step_table(ours: pd.DataFrame, reported: pd.DataFrame | None, tasks: Sequence[str]) -> pd.DataFrame:
    """Our accuracy against step beside a reported one (Concrete Tables 12-14): columns ``ours avg``,
    ``reported step``, ``reported avg`` aligned by position (our run is shorter), then our tasks."""
    out = ours[["avg"] + list(tasks)].copy()
    out.columns = ["ours avg"] + list(tasks)
    if reported is not None and len(reported):
        avg_col = [c for c in reported.columns if str(c).lower().startswith("av")][0]
        n = min(len(out), len(reported))
        rep_steps = [str(i) for i in reported.index[:n]] + [""] * (len(out) - n)
        rep_avg = list(reported[avg_col].astype(float).values[:n]) + [np.nan] * (len(out) - n)
        out.insert(1, "reported step", rep_steps)
        out.insert(2, "reported avg", rep_avg)
    return out


# --------------------------------------------------------------------------------------------------
# Generalisation to unseen tasks (AdaMerging Table 3, Concrete Table 3) and robustness to corrupted
# test images (AdaMerging Table 4): merged on a subset of the suite, scored per sample, cached
# --------------------------------------------------------------------------------------------------
# the papers' two seen/unseen splits, by the paper's task names (the unseen pair)
GENERALIZATION_SPLITS: tuple[tuple[str, str], ...] = (("MNIST", "EuroSAT"), ("RESISC45", "SVHN"))
ROBUSTNESS_TASKS: tuple[str, ...] = ("Cars", "EuroSAT", "RESISC45", "GTSRB")
GENERALIZATION_METHODS: tuple[str, ...] = (
    "Task Arithmetic", "Ties-Merging", "Layer-wise AdaMerging", "Layer-wise AdaMerging++", "Concrete TA",
    "Layer-wise Concrete AdaMerging")
ROBUSTNESS_METHODS: tuple[str, ...] = ("Task Arithmetic", "Layer-wise AdaMerging")


def tasks_for_paper(tasks: Sequence[str], paper_names: Sequence[str]) -> list[str]:
    """Our tasks standing for the paper's ``paper_names`` (in that order), via :func:`paper_task_names`
    (``"MNIST"`` → ``digits`` on tiny, ``MNIST`` on the CLIP profiles)."""
    inverse = {p: t for t, p in paper_task_names(tasks).items()}
    missing = [p for p in paper_names if p not in inverse]
    if missing:
        raise KeyError(f"no task of this suite stands for {missing}; its tasks map to {paper_task_names(tasks)}")
    return [inverse[p] for p in paper_names]


def generalization_split(tasks: Sequence[str], unseen: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(seen, unseen)`` in our task names for the paper's unseen pair (seen keep the suite's order)."""
    held = tasks_for_paper(tasks, unseen)
    return [t for t in tasks if t not in held], held


def _merge_on(adapt: Any, method: str, cfg: Mapping[str, Any]) -> Any:
    """Merged weights of ``method`` over ``adapt``'s tasks (adaptive methods adapt on its test images)."""
    from .methods import merge
    from .methods.adamerging import adamerging
    from .methods.concrete import concrete_adamerging, concrete_task_arithmetic

    pre, fts = adapt.pretrained, adapt.finetuned_list()
    common = dict(batch_size=cfg["batch_size"], seed=cfg["seed"], device=cfg["device"], eval_every=0,
                  progress=True)
    if method == "Task Arithmetic":
        return merge("task_arithmetic", pre, fts, scaling_coef=cfg["ta_lambda"])
    if method == "Ties-Merging":
        return merge("ties", pre, fts, scaling_coef=cfg["ta_lambda"], k=cfg["ties_k"], disjoint="sum",
                     extra_zeros=adapt.meta.get("ties_extra_zeros", 0))
    if method in ("Layer-wise AdaMerging", "Layer-wise AdaMerging++"):
        return adamerging(adapt, "layer", method.endswith("++"), steps=cfg["steps"], lr=cfg["lr"],
                          batches_per_step=cfg["batches_per_step"], ties_k=cfg["ties_k"], **common).state_dict()
    if method == "Concrete TA":
        return concrete_task_arithmetic(adapt, steps=cfg["concrete_ta_steps"], lr=cfg["mask_lr"],
                                        eval_mask=cfg["eval_mask"], **common).state_dict()
    if method == "Layer-wise Concrete AdaMerging":
        return concrete_adamerging(adapt, "layer", meta_steps=cfg["meta_steps"], tta_steps=cfg["tta_steps"],
                                   outer_lr=cfg["mask_lr"], eval_mask=cfg["eval_mask"], **common).state_dict()
    raise KeyError(f"unknown method {method!r}; known: {list(GENERALIZATION_METHODS)}")


def _method_cfg(method: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that change ``method``'s merge (its cache key, so a step count of another method
    does not invalidate it)."""
    used = {"Task Arithmetic": ("ta_lambda",), "Ties-Merging": ("ta_lambda", "ties_k"),
            "Layer-wise AdaMerging": ("steps", "lr", "batch_size", "batches_per_step", "seed"),
            "Layer-wise AdaMerging++": ("steps", "lr", "batch_size", "batches_per_step", "seed", "ties_k"),
            "Concrete TA": ("concrete_ta_steps", "mask_lr", "batch_size", "seed", "eval_mask"),
            "Layer-wise Concrete AdaMerging": ("meta_steps", "tta_steps", "mask_lr", "batch_size", "seed",
                                               "eval_mask")}[method]
    return {k: cfg[k] for k in used}


def _merge_cfg(ta_lambda: float, ties_k: float, steps: int, lr: float, batch_size: int, batches_per_step: int,
               concrete_ta_steps: int, meta_steps: int, tta_steps: int, mask_lr: float, eval_mask: str,
               seed: int, device: str) -> dict[str, Any]:
    from .adaptation import check_schedule

    # before any of the rows' runs starts, so a bad value fails at once and names the parameter
    check_schedule("generalisation / robustness", lrs={"lr": lr, "mask_lr": mask_lr},
                   steps={"steps": steps, "concrete_ta_steps": concrete_ta_steps, "meta_steps": meta_steps,
                          "tta_steps": tta_steps},
                   at_least_one={"batch_size": batch_size, "batches_per_step": batches_per_step})
    return dict(ta_lambda=float(ta_lambda), ties_k=float(ties_k), steps=int(steps), lr=float(lr),
                batch_size=int(batch_size), batches_per_step=int(batches_per_step),
                concrete_ta_steps=int(concrete_ta_steps), meta_steps=int(meta_steps), tta_steps=int(tta_steps),
                mask_lr=float(mask_lr), eval_mask=str(eval_mask), seed=int(seed), device=device)


def generalization_rows(suite: Any, unseen: Sequence[str], methods: Sequence[str] = GENERALIZATION_METHODS, *,
                        ta_lambda: float = 0.3, ties_k: float = 0.2, steps: int = 200, lr: float = 1e-3,
                        batch_size: int = 16, batches_per_step: int = 1, concrete_ta_steps: int = 200,
                        meta_steps: int = 100, tta_steps: int = 100, mask_lr: float = 1e-3,
                        eval_mask: str = "soft", seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Merge the seen tasks' vectors (all but the paper's ``unseen`` pair) and score every task.

    Each method sees only ``suite.subset(seen)``: its fine-tuned weights and, for the adaptive ones
    (AdaMerging(++), Concrete), the seen tasks' unlabelled test images. The merged encoder is then
    scored on the seen tasks and on the unseen ones with their own heads. One cache entry per
    method (``generalization-run``), keyed on the subset suite (its own fingerprint) and the method's
    settings. Returns ``{"seen": [...], "unseen": [...], "correct": {method: {task: packed}},
    "seconds": {method: s}}``.
    """
    from .results import cached_result

    cfg = _merge_cfg(ta_lambda, ties_k, steps, lr, batch_size, batches_per_step, concrete_ta_steps, meta_steps,
                     tta_steps, mask_lr, eval_mask, seed, device)
    seen, held = generalization_split(suite.tasks, unseen)
    sub = suite.subset(seen)
    everything = seen + held
    out: dict[str, Any] = {"seen": seen, "unseen": held, "correct": {}, "seconds": {}}
    for m in methods:
        def compute(m: str = m) -> dict[str, Any]:
            t0 = time.perf_counter()
            sd = _merge_on(sub, m, cfg)
            return {**scored(suite, sd, everything), "seconds": time.perf_counter() - t0}

        r = cached_result(sub, "generalization-run", {"method": m, **_method_cfg(m, cfg), "eval_tasks": everything,
                                                      "eval_suite": suite.fingerprint(), "format": 1}, compute)
        out["correct"][m], out["seconds"][m] = r["correct"], r["seconds"]
    return out


def robustness_rows(suite: Any, tasks: Sequence[str], corruption: str,
                    methods: Sequence[str] = ROBUSTNESS_METHODS, *, severity: int = 3, corruption_seed: int = 0,
                    ta_lambda: float = 0.3, ties_k: float = 0.2, steps: int = 200, lr: float = 1e-3,
                    batch_size: int = 16, batches_per_step: int = 1, concrete_ta_steps: int = 200,
                    meta_steps: int = 100, tta_steps: int = 100, mask_lr: float = 1e-3,
                    eval_mask: str = "soft", seed: int = 0, device: str = "auto") -> dict[str, Any]:
    """Merge ``tasks`` (our names) from models fine-tuned on clean data; adapt on and score the
    test images under ``corruption`` (``"clean"`` for none) at ``severity``.

    The corrupted suite (:func:`mergebook.robustness.corrupted_suite`) is built only when a method's
    result is not cached, once for all methods; entries (``robustness-run``) are keyed on its own
    fingerprint. Returns ``{"tasks": [...], "corruption": name, "correct": {method: {task: packed}},
    "seconds": {method: s}}``.
    """
    from .results import cached_result
    from .robustness import corrupted_key, corrupted_suite

    tasks = list(tasks)
    sub = suite.subset(tasks)
    key_suite = corrupted_key(sub, corruption, severity, corruption_seed)
    cfg = _merge_cfg(ta_lambda, ties_k, steps, lr, batch_size, batches_per_step, concrete_ta_steps, meta_steps,
                     tta_steps, mask_lr, eval_mask, seed, device)
    built: list[Any] = []

    def shifted() -> Any:
        if not built:
            built.append(corrupted_suite(sub, corruption, severity, corruption_seed, progress=True))
        return built[0]

    out: dict[str, Any] = {"tasks": tasks, "corruption": str(corruption), "correct": {}, "seconds": {}}
    for m in methods:
        def compute(m: str = m) -> dict[str, Any]:
            t0 = time.perf_counter()
            data = shifted()
            sd = _merge_on(data, m, cfg)
            return {**scored(data, sd, tasks), "seconds": time.perf_counter() - t0}

        r = cached_result(key_suite, "robustness-run", {"method": m, **_method_cfg(m, cfg), "format": 1}, compute)
        out["correct"][m], out["seconds"][m] = r["correct"], r["seconds"]
    return out


def split_frame(correct: Mapping[str, Mapping[str, Any]], groups: Mapping[str, Sequence[str]], *,
                n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> pd.DataFrame:
    """Methods x [tasks of each group..., "<group> avg", "<group> lo", "<group> hi"] (percent).

    ``groups`` is e.g. ``{"seen": [...], "unseen": [...]}``: per-task accuracies, then the group's
    mean over its tasks with a stratified bootstrap interval (:func:`average_interval`).
    """
    rows = {}
    for method, by_task in correct.items():
        rec: dict[str, float] = {}
        for g, ts in groups.items():
            cs = {t: unpack_correct(by_task[t]) for t in ts}
            rec.update({t: 100.0 * float(cs[t].mean()) for t in ts})
            iv = average_interval(cs, n_boot=n_boot, level=level, seed=seed)
            rec.update({f"{g} avg": iv.mean, f"{g} lo": iv.lo, f"{g} hi": iv.hi})
        rows[method] = rec
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index.name = "method"
    df.attrs["level"] = level
    return df


def group_interval(frame: pd.DataFrame, method: str, group: str, label: str | None = None) -> Interval:
    """One method's ``<group> avg`` of a :func:`split_frame` with its interval."""
    r = frame.loc[method]
    return Interval(float(r[f"{group} avg"]), float(r[f"{group} lo"]), float(r[f"{group} hi"]),
                    frame.attrs.get("level", 0.95), f"{method} ({group})" if label is None else label)


def paired_gain(correct: Mapping[str, Mapping[str, Any]], a: str, b: str, tasks: Sequence[str], *,
                n_boot: int = 2000, level: float = 0.95, seed: int = 0, label: str | None = None) -> Interval:
    """``a``'s average accuracy over ``tasks`` minus ``b``'s (points), with a paired bootstrap
    interval (:func:`paired_difference_interval`): both were scored on the same test images, so a
    verdict on the gain resamples images jointly. ``correct`` is ``{method: {task: packed}}``."""
    missing = [m for m in (a, b) if m not in correct]
    if missing:
        raise KeyError(f"paired_gain: no per-sample results for {missing}; methods run: {list(correct)}")
    return paired_difference_interval({t: unpack_correct(correct[a][t]) for t in tasks},
                                      {t: unpack_correct(correct[b][t]) for t in tasks},
                                      n_boot=n_boot, level=level, seed=seed,
                                      label=f"{a} − {b}" if label is None else label)


def generalization_reported(profile: Any, methods: Sequence[str], unseen: Sequence[str]
                            ) -> dict[str, dict[str, dict[str, float] | None]]:
    """``{paper: {method: printed row}}`` of both papers' generalisation tables for the ``unseen``
    pair at the profile's scale; a paper without such a table maps to ``{}``."""
    from . import reference as ref

    out: dict[str, dict[str, dict[str, float] | None]] = {}
    for paper in ("adamerging", "concrete_subspace"):
        try:
            out[paper] = ref.reported_generalization(paper, profile, methods, unseen)
        except KeyError as exc:
            if "prints no generalization table" not in str(exc):
                raise
            out[paper] = {}
    return out


def robustness_reported(profile: Any, methods: Sequence[str], corruption: str) -> dict[str, dict[str, float] | None]:
    """AdaMerging's printed robustness row per method for ``corruption``; ``{}`` at a scale without
    a robustness table (ViT-L/14)."""
    from . import reference as ref

    try:
        return ref.reported_robustness(profile, methods, corruption)
    except KeyError as exc:
        if "prints no robustness table" not in str(exc):
            raise
        return {}


def split_summary(frame: pd.DataFrame, groups: Sequence[str],
                  reported: Mapping[str, Mapping[str, float] | None] | None = None, digits: int = 1) -> pd.DataFrame:
    """The summary of a :func:`split_frame`, as strings: per group ``<group> avg [95% CI]``, the
    reported ``<group> reported`` (``reported`` maps method → ``"<group> avg"`` → value, as
    :func:`reported_split` returns) and ``<group> Δ`` (ours − reported). Narrow enough for a page;
    the per-task numbers go to :func:`split_table`."""
    level = frame.attrs.get("level", 0.95)
    rows = {}
    for method, r in frame.iterrows():
        rep = (reported or {}).get(method) or {}
        rec = {}
        for g in groups:
            want = float(rep.get(f"{g} avg", np.nan))
            rec[f"{g} avg [{100 * level:g}% CI]"] = format_interval(r[f"{g} avg"], r[f"{g} lo"], r[f"{g} hi"], digits)
            rec[f"{g} reported"] = _fmt(want, digits)
            rec[f"{g} Δ"] = "–" if not np.isfinite(want) else f"{r[f'{g} avg'] - want:+.{digits}f}"
        rows[method] = rec
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.index.name = frame.index.name
    return out


def split_table(frame: pd.DataFrame, groups: Mapping[str, Sequence[str]],
                reported: Mapping[str, Mapping[str, float] | None] | None = None, digits: int = 1) -> pd.DataFrame:
    """Per-task display strings of a :func:`split_frame`: each group's tasks then its ``<group> avg``,
    and with ``reported`` (method → our task names and ``"<group> avg"`` → value) a
    ``"<method> · reported"`` row under each reported method (the intervals are in
    :func:`split_summary`)."""
    cols: list[str] = []
    for g, ts in groups.items():
        cols += list(ts) + [f"{g} avg"]
    rows = {}
    for method, r in frame.iterrows():
        rows[method] = {c: _fmt(r[c], digits) for c in cols}
        rep = (reported or {}).get(method)
        if rep:
            rows[f"{method} · reported"] = {c: _fmt(rep.get(c, np.nan), digits) for c in cols}
    out = pd.DataFrame.from_dict(rows, orient="index")[cols]
    out.index.name = frame.index.name
    return out


def reported_pair(rows: Mapping[str, Mapping[str, float] | None], a: str, b: str,
                  key: str = "avg (unseen tasks)") -> list[float] | str:
    """``[rows[a][key], rows[b][key]]`` for a verdict's reported column, or ``"not reported"``."""
    ra, rb = rows.get(a), rows.get(b)
    if not ra or not rb or key not in ra or key not in rb:
        return "not reported"
    return [float(ra[key]), float(rb[key])]


def reported_gain(rows: Mapping[str, Mapping[str, float] | None], a: str, b: str,
                  key: str = "avg (unseen tasks)") -> list[float] | str:
    """``[rows[a][key] − rows[b][key], 0]``: the paper's gain, for a verdict whose rule is
    ``greater(paired_gain(...), 0)``; ``"not reported"`` when either row or value is absent."""
    pair = reported_pair(rows, a, b, key)
    return pair if isinstance(pair, str) else [round(pair[0] - pair[1], 2), 0.0]


def reported_split(rows: Mapping[str, Mapping[str, float] | None], tasks: Sequence[str],
                   groups: Sequence[str] = ("seen", "unseen")) -> dict[str, dict[str, float] | None]:
    """A paper's printed rows (paper task names, ``"avg (seen tasks)"``...) under our task names and
    ``"<group> avg"`` keys (``"avg"`` alone → the first group's), ready for :func:`split_table`."""
    names = paper_task_names(tasks)
    out: dict[str, dict[str, float] | None] = {}
    for m, row in rows.items():
        if row is None:
            out[m] = None
            continue
        rec = {t: row[p] for t, p in names.items() if p in row}
        for g in groups:
            key = f"avg ({g} tasks)"
            if key in row:
                rec[f"{g} avg"] = row[key]
        if "avg" in row:
            rec[f"{groups[0]} avg"] = row["avg"]
        out[m] = rec
    return out


__all__ = [
    "FAILS", "HOLDS", "PARTLY", "Claim", "Interval", "Rule", "Selection", "all_of", "average_interval",
    "best_on_val", "bootstrap_interval", "data_using_rows", "lookup_sweep", "reference_rows", "format_frame", "format_interval", "grid_key", "greater",
    "interleave_reported", "less", "pack_by_task", "pack_correct", "paired_difference_interval",
    "results_frame", "row_interval", "scored", "select_on_val", "sweep", "sweep_correct", "sweep_frame",
    "unpack_by_task", "unpack_correct", "verdict", "verdict_table", "within",
    "adamerging_run", "adaptive_run", "binned_means", "block_means", "block_order", "coefficient_frame",
    "concrete_run", "entropy_loss_bins", "entropy_loss_spearman", "forward_order", "history_frame",
    "mask_frame", "paper_task_names", "reported_by_task", "results_tables", "short_block", "step_table",
    "tensor_kind", "GENERALIZATION_METHODS", "GENERALIZATION_SPLITS", "ROBUSTNESS_METHODS", "ROBUSTNESS_TASKS",
    "generalization_rows", "generalization_split", "reported_pair", "group_interval", "reported_split", "robustness_rows",
    "split_frame", "split_summary", "split_table", "tasks_for_paper", "paired_gain", "reported_gain", "generalization_reported",
    "robustness_reported",
]
