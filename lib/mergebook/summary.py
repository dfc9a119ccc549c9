"""The summary chapter (05): every method the book runs, read from the other chapters' caches.

Nothing here merges or adapts. Each chapter's results are looked up under the cache names and
parameters that chapter uses (:func:`mergebook.results.lookup_result`); a chapter's parameters are
its ``parameters`` cell overridden by ``notebooks/params/<profile>.yaml``, exactly what papermill
gives it in ``make book``. A result that is not there comes back as a note naming the chapter to
run, never as a recomputation.
"""

from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .experiment import average_interval, format_interval, unpack_by_task
from .results import lookup_only, lookup_result

CHAPTERS = {
    "01": "01_task_arithmetic", "02": "02_adamerging", "03": "03_concrete_subspace",
    "04": "04_cart_spectral", "06": "06_spectral_family",
}
GROUPS = ("reference", "training-free", "data-using", "test-time adaptive")
METHOD_GROUPS = {
    "Pretrained": "reference", "Individual": "reference", "Traditional MTL": "reference",
    "Weight Averaging": "training-free", "Task Arithmetic": "training-free", "Ties-Merging (sum)": "training-free",
    "Ties-Merging (mean)": "training-free", "CART": "training-free", "TSV-M": "training-free",
    "Iso-C": "training-free", "Iso-CTS": "training-free", "DARE + TA": "training-free", "DARE + Ties": "training-free",
    "Fisher Merging": "data-using", "RegMean": "data-using",
    "Task-wise AdaMerging": "test-time adaptive", "Task-wise AdaMerging++": "test-time adaptive",
    "Layer-wise AdaMerging": "test-time adaptive", "Layer-wise AdaMerging++": "test-time adaptive",
    "Concrete TA": "test-time adaptive", "Concrete AdaMerging": "test-time adaptive", "CART++": "test-time adaptive",
}


def notebooks_dir() -> Path:
    """The repository's ``notebooks/`` (chapter sources and ``params/``)."""
    return Path(__file__).resolve().parents[2] / "notebooks"


def parameters_cell(path: str | Path) -> dict[str, Any]:
    """The literal assignments of a py:percent notebook's ``parameters`` cell."""
    lines = Path(path).read_text().splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("# %%") and "parameters" in ln), None)
    if start is None:
        raise ValueError(f"{path}: no cell tagged 'parameters'")
    body = []
    for ln in lines[start + 1:]:
        if ln.startswith("# %%"):
            break
        body.append(ln)
    out = {}
    for node in ast.parse("\n".join(body)).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def chapter_params(chapter: str, profile: str, overrides: Mapping[str, Any] | None = None,
                   root: str | Path | None = None) -> dict[str, Any]:
    """The parameters ``make book`` runs chapter ``chapter`` ("01", ...) with on ``profile``.

    The chapter's ``parameters`` cell, then ``params/<profile>.yaml`` for the keys the chapter
    declares (papermill injects the rest too, but the chapter never reads them), then ``overrides``.
    """
    import yaml

    root = Path(root) if root is not None else notebooks_dir()
    params = parameters_cell(root / f"{CHAPTERS[chapter]}.py")
    yml = root / "params" / f"{profile}.yaml"
    extra = dict(yaml.safe_load(yml.read_text()) or {}) if yml.is_file() else {}
    extra.update(overrides or {})
    params.update({k: v for k, v in extra.items() if k in params})
    params["profile"] = profile
    return params


# ------------------------------------------------------------------------------------- chapter rows
@dataclass
class ChapterRows:
    """What one chapter's caches hold: method → {"accuracy", "correct" (or None)}, and what is missing."""

    chapter: str
    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    def note(self) -> str | None:
        """A reader-facing line naming the chapter to run, or None when nothing is missing."""
        if not self.missing:
            return None
        return (f"Run chapter {self.chapter} ({CHAPTERS[self.chapter]}) first: its cached "
                f"{', '.join(self.missing)} for this profile and code are missing.")


def _select(sweep: Mapping[str, Any]) -> dict[str, Any]:
    from .experiment import select_on_val

    sel = select_on_val(sweep)
    return {"accuracy": dict(sel.test), "correct": sweep[sel.key]["test_correct"], "setting": f"λ={sel.key} (val)"}


def _run_row(res: Mapping[str, Any], setting: str) -> dict[str, Any]:
    return {"accuracy": res["accuracy"], "correct": res.get("correct"), "setting": setting}


def chapter01(suite: Any, p: Mapping[str, Any]) -> ChapterRows:
    """Pretrained, Individual, MTL, WA, Fisher, RegMean, and Task Arithmetic / Ties at their val-chosen λ."""
    from . import experiment as ex

    out = ChapterRows("01")
    zeros = suite.meta.get("ties_extra_zeros", 0)
    with lookup_only():
        ref = ex.reference_rows(suite)
        data = ex.data_using_rows(suite, p["fisher_examples"], p["regmean_alpha"], p["seed"])
        sweeps = {"Task Arithmetic": ex.sweep(suite, "task_arithmetic", p["lambdas"]),
                  "Ties-Merging (sum)": ex.sweep(suite, "ties", p["lambdas"], k=p["ties_k"], disjoint="sum",
                                                 extra_zeros=zeros),
                  "Ties-Merging (mean)": ex.sweep(suite, "ties", p["ties_mean_lambdas"], k=p["ties_k"],
                                                  disjoint="mean", extra_zeros=zeros)}
    for name, res in (("reference rows", ref), ("data-using rows", data)):
        if res is None:
            out.missing.append(name)
            continue
        for m, acc in res["accuracy"].items():
            out.rows[m] = {"accuracy": acc, "correct": res["correct"][m], "setting": ""}
    for m, sw in sweeps.items():
        if sw is None:
            out.missing.append(f"{m} sweep")
        else:
            out.rows[m] = _select(sw)
    return out


ADAMERGING_VARIANTS = {"Task-wise AdaMerging": ("task", False), "Task-wise AdaMerging++": ("task", True),
                       "Layer-wise AdaMerging": ("layer", False), "Layer-wise AdaMerging++": ("layer", True)}


def chapter02(suite: Any, p: Mapping[str, Any]) -> ChapterRows:
    """The four AdaMerging variants, as chapter 02 runs them (``experiment.adamerging_run``).

    Results cached by the chapter's earlier in-cell form (name ``adamerging``, accuracies only) are
    read too; their intervals then come from the per-task counts.
    """
    from . import experiment as ex

    out = ChapterRows("02")
    for m, (g, pp) in ADAMERGING_VARIANTS.items():
        with lookup_only():
            res = ex.adamerging_run(suite, g, pp, steps=p["steps"], lr=p["lr"], batch_size=p["batch_size"],
                                    batches_per_step=p["batches_per_step"], seed=p["seed"],
                                    eval_every=p["eval_every"], device=p["device"])
        if res is None:
            res = lookup_result(suite, "adamerging", {"granularity": g, "plus_plus": pp, "steps": p["steps"],
                                                      "lr": p["lr"], "batch_size": p["batch_size"],
                                                      "bpp": p["batches_per_step"], "seed": p["seed"],
                                                      "eval_every": p["eval_every"]})
        if res is None:
            out.missing.append(m)
        else:
            out.rows[m] = _run_row(res, f"{p['steps']} steps")
    return out


def chapter03(suite: Any, p: Mapping[str, Any]) -> ChapterRows:
    """Concrete TA and layer-wise Concrete AdaMerging (``experiment.concrete_run``, or the chapter's
    earlier in-cell cache ``concrete``); its AdaMerging baseline is chapter 02's method."""
    from . import experiment as ex

    out = ChapterRows("03")
    common = dict(batch_size=p["batch_size"], seed=p["seed"], eval_every=p["eval_every"], eval_mask=p["eval_mask"],
                  device=p["device"])
    with lookup_only():
        runs = {"Concrete TA": ex.concrete_run(suite, "none", steps=p["concrete_ta_steps"], mask_lr=p["mask_lr"],
                                               **common),
                "Concrete AdaMerging": ex.concrete_run(suite, "layer", meta_steps=p["meta_steps"],
                                                       tta_steps=p["tta_steps"], mask_lr=p["mask_lr"], **common)}
    if any(r is None for r in runs.values()):
        legacy = lookup_result(suite, "concrete", dict(
            ta=p["concrete_ta_steps"], meta=p["meta_steps"], tta=p["tta_steps"], ada=p["adamerging_steps"],
            mask=p["eval_mask"], batch_size=p["batch_size"], seed=p["seed"], device=p["device"],
            eval_every=p["eval_every"]))
        if legacy is not None:
            runs = {m: runs[m] if runs[m] is not None else legacy.get(m) for m in runs}
    settings = {"Concrete TA": f"{p['concrete_ta_steps']} steps",
                "Concrete AdaMerging": f"{p['meta_steps']}+{p['tta_steps']} steps"}
    for m, res in runs.items():
        if res is None:
            out.missing.append(m)
        else:
            out.rows[m] = _run_row(res, settings[m])
    return out


def cart_table_params(p: Mapping[str, Any]) -> dict[str, Any]:
    """The cache parameters chapter 04 stores its CART / CART++ rows under (``cart_table1``)."""
    return {"ratio": float(p["cart_ratio"]), "lambdas": [float(x) for x in p["cart_lambdas"]],
            "steps": int(p["cartpp_steps"]), "bs": int(p["cartpp_batch_size"]), "seed": int(p["seed"])}


def chapter04(suite: Any, p: Mapping[str, Any]) -> ChapterRows:
    """CART at the chapter's ratio and val-chosen λ, and CART++."""
    out = ChapterRows("04")
    res = lookup_result(suite, "cart_table1", cart_table_params(p))
    if res is None:
        out.missing.append("CART / CART++ rows")
        return out
    for m in ("CART", "CART++"):
        if m in res:
            out.rows[m] = res[m]
    return out


def chapter06_specs(p: Mapping[str, Any]) -> dict[str, tuple[str, list[float], dict[str, Any]]]:
    """Chapter 06's spectral-family specs (label → method, grid, params), as its first cell builds them
    (Task Arithmetic, Ties and CART come from chapters 01 and 04)."""
    kw = {"matrix_set": p["matrix_set"]}
    return {
        "TSV-M": ("tsv_m", p["spectral_alphas"], kw),
        "Iso-C": ("iso_c", p["spectral_alphas"], kw),
        "Iso-CTS": ("iso_cts", p["spectral_alphas"], {**kw, "common_fraction": p["iso_common_fraction"]}),
        "DARE + TA": ("dare", p["ta_lambdas"], {"p": p["dare_p"], "merger": "task_arithmetic", "seed": p["seed"]}),
        "DARE + Ties": ("dare", p["dare_ties_lambdas"], {"p": p["dare_p"], "merger": "ties", "seed": p["seed"]}),
    }


def chapter06(suite: Any, p: Mapping[str, Any]) -> ChapterRows:
    """TSV-M, Iso-C, Iso-CTS and DARE at their val-chosen coefficients (``spectral_analysis.select_methods``)."""
    from .spectral_analysis import select_methods

    out = ChapterRows("06")
    with lookup_only():
        sel = select_methods(suite, chapter06_specs(p))
    for lab, res in sel.items():
        if res is None:
            out.missing.append(lab)
        else:
            out.rows[lab] = {"accuracy": res["test"], "correct": res["correct"],
                             "setting": f"α/λ={res['chosen']:g} (val)"}
    return out


READERS = {"01": chapter01, "02": chapter02, "03": chapter03, "04": chapter04, "06": chapter06}


def collect(suite: Any, profile: str, overrides: Mapping[str, Any] | None = None,
            root: str | Path | None = None) -> list[ChapterRows]:
    """Every chapter's rows for this suite, read from the caches (never computed).

    A chapter whose source is not beside the library (a pip install without the notebooks) or
    whose parameters changed names is reported missing, not guessed.
    """
    out = []
    for c, read in READERS.items():
        try:
            out.append(read(suite, chapter_params(c, profile, overrides, root)))
        except (FileNotFoundError, KeyError) as e:
            out.append(ChapterRows(c, missing=[f"results (its parameters could not be read: {e})"]))
    return out


# ------------------------------------------------------------------------------------ grand table
def grand_frame(chapters: Sequence[ChapterRows], tasks: Sequence[str], sizes: Mapping[str, int],
                n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per method: group, chapter, setting, avg, lo, hi, per-task accuracies (%).

    Rows with per-sample correctness get their stratified bootstrap interval; rows with accuracies
    only (adaptation runs) get the same interval from their per-task counts on ``sizes`` images.
    """
    from .cart_analysis import correct_from_accuracy

    recs = []
    for ch in chapters:
        for m, r in ch.rows.items():
            if m in {x["method"] for x in recs}:
                continue  # a method reported by two chapters is kept from the first
            acc = r["accuracy"]
            present = [t for t in tasks if t in acc]
            if r.get("correct"):
                cs = unpack_by_task({t: r["correct"][t] for t in present})
            else:
                cs = correct_from_accuracy({t: acc[t] for t in present}, {t: sizes[t] for t in present})
            iv = average_interval(cs, n_boot=n_boot, seed=seed)
            rec = {"group": METHOD_GROUPS.get(m, "training-free"), "method": m, "chapter": ch.chapter,
                   "setting": r.get("setting", ""), "avg": iv.mean, "lo": iv.lo, "hi": iv.hi}
            rec.update({t: float(acc[t]) for t in tasks if t in acc})
            recs.append(rec)
    if not recs:
        return pd.DataFrame(columns=["group", "chapter", "setting", "avg", "lo", "hi", *tasks]).rename_axis("method")
    df = pd.DataFrame(recs)
    df["_g"] = [GROUPS.index(g) for g in df["group"]]
    df = df.sort_values(["_g"], kind="stable").drop(columns="_g").set_index("method")
    df.attrs["level"] = 0.95
    return df


def reported_columns(profile: Any, methods: Sequence[str]) -> pd.DataFrame:
    """Each paper's own reported average per method (``reference.reported_frame``), plus the
    spectral family's sources (authors' result files, FusionBench) on ViT-B/32."""
    from .reference import reference_arch, reported_frame

    canon = {"Ties-Merging (sum)": "Ties-Merging", "Concrete AdaMerging": "Layer-wise Concrete AdaMerging"}
    names = [canon.get(m, m) for m in methods]
    rep = reported_frame(profile, names, papers=("adamerging", "concrete_subspace", "cart"))
    rep.index = list(methods)
    rep.columns = [{"adamerging": "AdaMerging paper", "concrete_subspace": "Concrete paper",
                    "cart": "CART paper"}[c] for c in rep.columns]
    if reference_arch(profile) == "ViT-B/32":
        from .spectral_analysis import reported_averages

        spec = reported_averages([m for m in methods if m in ("TSV-M", "Iso-C", "Iso-CTS")])
        rep["spectral sources"] = [spec.get(m, np.nan) for m in methods]
    # Ties (mean) has no reported row: all three papers quote the sum rule
    if "Ties-Merging (mean)" in rep.index:
        rep.loc["Ties-Merging (mean)"] = np.nan
    return rep


def consensus(reported: pd.DataFrame) -> pd.Series:
    """One reported number per method: the first paper (in column order) that reports it."""
    return reported.apply(lambda r: next((float(v) for v in r if np.isfinite(v)), np.nan), axis=1)


def display_frame(grand: pd.DataFrame, reported: pd.DataFrame) -> pd.DataFrame:
    """Strings for the page: group, chapter, setting, ours [95% CI], each paper's number (– where none)."""
    out = pd.DataFrame(index=grand.index)
    out["group"] = grand["group"]
    out["chapter"] = grand["chapter"]
    out["setting"] = grand["setting"]
    out["ours [95% CI]"] = [format_interval(m, lo, hi) for m, lo, hi in zip(grand["avg"], grand["lo"], grand["hi"])]
    for c in reported.columns:
        out[c] = ["–" if not np.isfinite(v) else f"{v:.1f}" for v in reported.loc[grand.index, c]]
    return out


def rank_agreement(ours: Mapping[str, float], reported: pd.DataFrame) -> pd.DataFrame:
    """Kendall's τ between our averages and each reported column (and the consensus), over shared methods.

    ``spread`` is the standard deviation of our averages over the shared methods divided by that of
    the reported ones: 1 when the methods lie as far apart here as in the paper, below 1 when this
    profile compresses their differences (gains over any common baseline scale the same way). NaN
    with fewer than two shared methods or no reported spread.
    """
    from .reference import kendall_tau

    cols = {c: reported[c] for c in reported.columns}
    cols["consensus (first paper reporting)"] = consensus(reported)
    rows = []
    for c, s in cols.items():
        rep = {m: float(v) for m, v in s.items() if np.isfinite(v) and m in ours}
        spread = float("nan")
        if len(rep) >= 2:
            sd_rep = float(np.std(list(rep.values()), ddof=1))
            if sd_rep > 0:
                spread = float(np.std([float(ours[m]) for m in rep], ddof=1)) / sd_rep
        rows.append({"reported by": c, "methods compared": len(rep), "Kendall τ": kendall_tau(dict(ours), rep),
                     "spread": spread})
    return pd.DataFrame(rows).set_index("reported by")


# The papers' cross-chapter conclusions, as (claim, better method, worse method); decided on our
# averages with their 95% intervals, beside the first paper that reports both methods.
CLAIMS = (
    ("Task Arithmetic beats weight averaging", "Task Arithmetic", "Weight Averaging"),
    ("Ties-Merging beats Task Arithmetic", "Ties-Merging (sum)", "Task Arithmetic"),
    ("RegMean beats Fisher Merging", "RegMean", "Fisher Merging"),
    ("Layer-wise AdaMerging beats task-wise", "Layer-wise AdaMerging", "Task-wise AdaMerging"),
    ("Layer-wise AdaMerging beats Task Arithmetic", "Layer-wise AdaMerging", "Task Arithmetic"),
    ("AdaMerging++ beats AdaMerging (layer-wise)", "Layer-wise AdaMerging++", "Layer-wise AdaMerging"),
    ("Concrete TA beats Task Arithmetic", "Concrete TA", "Task Arithmetic"),
    ("Concrete AdaMerging beats layer-wise AdaMerging", "Concrete AdaMerging", "Layer-wise AdaMerging"),
    ("CART beats Ties-Merging", "CART", "Ties-Merging (sum)"),
    ("Training-free CART beats layer-wise AdaMerging", "CART", "Layer-wise AdaMerging"),
    ("CART++ beats CART", "CART++", "CART"),
    ("TSV-M beats Task Arithmetic", "TSV-M", "Task Arithmetic"),
    ("Iso-CTS beats Iso-C", "Iso-CTS", "Iso-C"),
)


def summary_claims(grand: pd.DataFrame, reported: pd.DataFrame) -> tuple[list[Any], list[str]]:
    """The :data:`CLAIMS` whose two methods both ran (as verdicts), and the text of those that did not."""
    from .experiment import Interval, greater, verdict

    def iv(m: str) -> Interval:
        r = grand.loc[m]
        return Interval(float(r["avg"]), float(r["lo"]), float(r["hi"]), 0.95, m)

    decided, skipped = [], []
    for text, a, b in CLAIMS:
        if a not in grand.index or b not in grand.index:
            skipped.append(f"{text} (needs {' and '.join(m for m in (a, b) if m not in grand.index)})")
            continue
        rep = None
        for c in reported.columns:
            pair = [reported.loc[a, c], reported.loc[b, c]] if a in reported.index and b in reported.index else []
            if len(pair) == 2 and all(np.isfinite(pair)):
                rep = [float(v) for v in pair]
                break
        decided.append(verdict(text, greater(iv(a), iv(b)), rep))
    return decided, skipped


def plot_averages(ax: Any, grand: pd.DataFrame, reported: pd.DataFrame, color: Any) -> None:
    """Our averages with 95% intervals (dots in each method's colour) and each paper's (open markers)."""
    markers = ["D", "s", "^", "v"]
    y = np.arange(len(grand))[::-1]
    for yi, (m, r) in zip(y, grand.iterrows()):
        ax.errorbar(r["avg"], yi, xerr=[[r["avg"] - r["lo"]], [r["hi"] - r["avg"]]], fmt="o", color=color(m),
                    ecolor="black", elinewidth=1, capsize=2, ms=6, zorder=3)
    for j, c in enumerate(reported.columns):
        vals = reported.loc[grand.index, c].to_numpy(dtype=float)
        ok = np.isfinite(vals)
        ax.scatter(vals[ok], y[ok], marker=markers[j % len(markers)], facecolors="white",
                   edgecolors=[color(m) for m, k in zip(grand.index, ok) if k], s=36, zorder=4,
                   label=f"reported: {c}")
    ax.set_yticks(y, list(grand.index))
    ax.set_xlabel("average accuracy (%)")
    ax.scatter([], [], marker="o", color="#555555", label="ours, 95% interval")
    ax.legend(loc="lower left", fontsize=7)


__all__ = ["CHAPTERS", "ChapterRows", "GROUPS", "METHOD_GROUPS", "cart_table_params", "chapter01", "chapter02",
           "chapter03", "chapter04", "chapter06", "chapter06_specs",
           "chapter_params", "collect", "consensus", "display_frame", "grand_frame", "parameters_cell",
           "plot_averages", "rank_agreement", "reported_columns", "summary_claims"]
