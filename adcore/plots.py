"""Figures shared by every paper notebook and the book: loss curves, ours-beside-paper tables, best/worst heatmaps
and ablation bars.

Every function returns a matplotlib ``Figure`` (or a pandas ``Styler`` for tables) and draws nothing that needs a
kernel, so the executed notebooks render the same in Jupyter and in the static book. The image helpers at the end
(``normalise_maps``, ``colorize``, ``overlay``, ``draw_contour``) are shared with :mod:`adcore.viewer`, so a frame in
the viewer and a panel in a figure look alike: jet map, white ground-truth contour, red predicted contour (the
convention anomalib's visualiser uses).
"""
from __future__ import annotations

import math

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

METRIC_LABELS = {"image_auroc": "image AUROC", "pixel_auroc": "pixel AUROC", "aupro": "AUPRO"}
GT_COLOR = (255, 255, 255)
PRED_COLOR = (255, 40, 40)


# ---------------------------------------------------------------------------------------------------------------------
# input checks


def as_categories(arrays, what: str = "arrays") -> dict[str, dict]:
    """Accept one category's arrays dict or ``{category: arrays}``; return the latter.

    Raises:
        ValueError: ``arrays`` is neither, or a category lacks ``images``/``maps``/``masks``/``labels``.
    """
    if not isinstance(arrays, dict) or not arrays:
        raise ValueError(f"{what} must be a non-empty dict (one category's arrays or {{category: arrays}}), "
                         f"got {type(arrays).__name__}")
    if "images" in arrays:
        arrays = {"": arrays}
    for cat, arr in arrays.items():
        if not isinstance(arr, dict):
            raise ValueError(f"{what}[{cat!r}] must be a dict of arrays, got {type(arr).__name__}")
        missing = [k for k in ("images", "maps", "masks", "labels") if k not in arr]
        if missing:
            raise ValueError(f"{what}[{cat!r}] lacks {missing}; expected the arrays of adcore.evaluate "
                             "(images, maps, masks, labels, scores, paths)")
        n = len(arr["images"])
        if np.asarray(arr["images"]).ndim != 4 or np.asarray(arr["images"]).shape[-1] != 3:
            raise ValueError(f"{what}[{cat!r}]['images'] must be (N, S, S, 3) uint8, "
                             f"got shape {np.asarray(arr['images']).shape}")
        for k in ("maps", "masks", "labels"):
            if len(arr[k]) != n:
                raise ValueError(f"{what}[{cat!r}][{k!r}] has {len(arr[k])} entries but images has {n}")
        if n == 0:
            raise ValueError(f"{what}[{cat!r}] holds no images")
    return arrays


def _scores(arr: dict) -> np.ndarray:
    if arr.get("scores") is not None:
        return np.asarray(arr["scores"], dtype=np.float64)
    maps = np.asarray(arr["maps"], dtype=np.float64)
    return maps.reshape(len(maps), -1).max(axis=1)


# ---------------------------------------------------------------------------------------------------------------------
# image helpers (shared with the viewer)


def normalise_maps(maps: np.ndarray) -> np.ndarray:
    """(N, h, w) maps → float32 in [0, 1] with one min–max over the whole set.

    One range per category (not per image) keeps a good image's map dark, as the evaluation sees it.
    """
    maps = np.asarray(maps, dtype=np.float32)
    lo, hi = float(maps.min()), float(maps.max())
    return np.clip((maps - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def resize(array: np.ndarray, size: tuple[int, int], order: int) -> np.ndarray:
    """Resize a (h, w) or (h, w, C) array to ``size``; order 0 for masks, 1 for maps and images."""
    if tuple(array.shape[:2]) == tuple(size):
        return array
    from skimage.transform import resize as _resize

    out = _resize(array.astype(np.float32), size, order=order, preserve_range=True,
                  anti_aliasing=order > 0 and array.shape[0] > size[0])
    return out.astype(array.dtype) if order == 0 else out


def colorize(map01: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(h, w) map in [0, 1] → (h, w, 3) uint8 colours."""
    rgba = matplotlib.colormaps[cmap](np.clip(map01, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image: np.ndarray, map01: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the jet-coloured map over a (h, w, 3) uint8 image; the map is resized to the image."""
    heat = colorize(resize(map01, image.shape[:2], order=1))
    return ((1 - alpha) * image.astype(np.float32) + alpha * heat).round().astype(np.uint8)


def draw_contour(rgb: np.ndarray, mask: np.ndarray, color=GT_COLOR, fill: float = 0.0) -> np.ndarray:
    """Draw the boundary of a binary ``mask`` on a copy of ``rgb``; ``fill`` > 0 also tints the inside."""
    from skimage.segmentation import find_boundaries

    mask = resize(np.asarray(mask).astype(np.uint8), rgb.shape[:2], order=0) > 0
    out = rgb.copy()
    if fill > 0:
        out[mask] = ((1 - fill) * out[mask] + fill * np.asarray(color, dtype=np.float32)).round().astype(np.uint8)
    out[find_boundaries(mask, mode="inner")] = color
    return out


# ---------------------------------------------------------------------------------------------------------------------
# figures


def _stage_name(entry: dict) -> str:
    return str(entry.get("stage", "main"))


def plot_loss_curves(histories, title: str | None = None, keys=("loss",)) -> Figure:
    """Training curves: one panel per (logged key, stage), one line per category.

    Args:
        histories: ``{category: [step dicts]}`` as ``run_experiment(...).histories``, or one list of step dicts
            (each with ``stage``, ``epoch``, ``step`` and the logged values).
        title: figure title.
        keys: logged values to plot; a key no step logged is skipped.

    Returns:
        The figure. The thin line is every step; dots are epoch means (drawn when there are several epochs).
    """
    if isinstance(histories, list):
        histories = {"": histories}
    if not isinstance(histories, dict):
        raise ValueError(f"histories must be a dict {{category: list of step dicts}} or a list, "
                         f"got {type(histories).__name__}")
    stages: list[str] = []
    for hist in histories.values():
        for e in hist:
            if _stage_name(e) not in stages:
                stages.append(_stage_name(e))
    keys = [k for k in keys if any(k in e for h in histories.values() for e in h)]
    if not stages or not keys:
        # Models without gradient training (kNN) log nothing: say so rather than drawing empty axes.
        fig, ax = plt.subplots(figsize=(5, 1.2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no training steps were logged (a model without gradient training)", ha="center",
                va="center")
        if title:
            fig.suptitle(title)
        return fig
    panels = [(k, s) for k in keys for s in stages]
    ncols = min(len(panels), 3)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, (key, stage) in zip(axes.flat, panels):
        positive = True
        for ci, (cat, hist) in enumerate(histories.items()):
            rows = [e for e in hist if _stage_name(e) == stage and e.get(key) is not None]
            if not rows:
                continue
            y = np.array([float(e[key]) for e in rows])
            positive &= bool((y > 0).all())
            color = f"C{ci % 10}"
            ax.plot(np.arange(len(y)), y, color=color, lw=0.8, alpha=0.6, label=cat or None)
            epochs = np.array([e.get("epoch", 0) for e in rows])
            if len(np.unique(epochs)) > 1:
                # x of an epoch mean = index of the epoch's last step, so the dots sit on the curve's timeline
                ends = [np.flatnonzero(epochs == ep)[-1] for ep in np.unique(epochs)]
                means = [y[epochs == ep].mean() for ep in np.unique(epochs)]
                ax.plot(ends, means, "o", color=color, ms=3)
        ax.set_title(key if len(stages) == 1 else f"{key} · stage {stage}", fontsize=10)
        ax.set_xlabel("step")
        if positive and ax.lines:
            lo, hi = ax.dataLim.y0, ax.dataLim.y1
            if lo > 0 and hi / lo > 50:
                ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    if len(histories) > 1:
        axes.flat[0].legend(fontsize=7, ncol=2)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _paper_value(v):
    if v is None:
        return np.nan
    v = float(v)
    return v / 100.0 if v > 1.0 else v  # papers report percentages; our metrics are fractions


def compare_table(ours, paper: dict, protocol_note: str):
    """Our numbers beside the paper's reported ones, with the protocol difference written under the table.

    Args:
        ours: DataFrame indexed by category (plus ``mean``) with metric columns, as ``run_experiment(...).table()``.
        paper: the paper's numbers, ``{category: {metric: value}}`` (``"mean"`` for the average), or
            ``{metric: value}`` when the paper gives means only. Percentages (> 1) are converted to fractions;
            ``None`` means not reported.
        protocol_note: how the paper's numbers were measured and how that differs from ours (shown as the caption).

    Returns:
        A pandas ``Styler`` (``.data`` is the DataFrame) with columns ``(metric, "ours" | "paper")``.
    """
    import pandas as pd

    if not isinstance(ours, pd.DataFrame):
        raise ValueError(f"ours must be a pandas DataFrame (run_experiment(...).table()), got {type(ours).__name__}")
    if not isinstance(paper, dict):
        raise ValueError(f"paper must be a dict {{category: {{metric: value}}}} or {{metric: value}}, "
                         f"got {type(paper).__name__}")
    if not isinstance(protocol_note, str) or not protocol_note.strip():
        raise ValueError("protocol_note must say how the paper's numbers were measured (a non-empty string)")
    if paper and all(not isinstance(v, dict) for v in paper.values()):
        paper = {"mean": paper}
    for cat, vals in paper.items():
        if not isinstance(vals, dict):
            raise ValueError(f"paper[{cat!r}] must be a dict {{metric: value}}, got {type(vals).__name__}")
    metrics = list(ours.columns)
    for vals in paper.values():
        metrics += [m for m in vals if m not in metrics]
    rows = list(ours.index)
    if "mean" not in rows and "mean" in paper:
        rows.append("mean")
    data = {}
    for m in metrics:
        data[(METRIC_LABELS.get(m, m), "ours")] = [
            float(ours.loc[r, m]) if m in ours.columns and r in ours.index and ours.loc[r, m] is not None else np.nan
            for r in rows]
        data[(METRIC_LABELS.get(m, m), "paper")] = [_paper_value(paper.get(r, {}).get(m)) for r in rows]
    df = pd.DataFrame(data, index=pd.Index(rows, name="category"))
    df.columns = pd.MultiIndex.from_tuples(df.columns)
    return (df.style.format("{:.3f}", na_rep="—")
            .set_caption(protocol_note)
            .set_table_styles([{"selector": "caption", "props": "caption-side: bottom; text-align: left;"}]))


def _rank_quality(arr: dict) -> np.ndarray:
    """How well each test image is handled, in [0, 1]: the rank of its score, flipped for good images.

    1 = an anomalous image scored above everything (or a good image below everything); protocol-free, so it also
    works for models whose image score is their own.
    """
    scores = _scores(arr)
    labels = np.asarray(arr["labels"]).astype(int)
    ranks = scores.argsort().argsort() / max(len(scores) - 1, 1)
    return np.where(labels == 1, ranks, 1.0 - ranks)


def plot_heatmaps(arrays, n_best: int = 3, n_worst: int = 3, title: str | None = None) -> Figure:
    """The best and the worst handled test images of each category: image with its ground-truth contour (white),
    and the anomaly map over the image (jet, one colour range per category).

    Args:
        arrays: ``{category: arrays}`` (``run_experiment(...).arrays``) or one category's arrays dict.
        n_best, n_worst: images per category from each end of :func:`_rank_quality`.
        title: figure title.
    """
    arrays = as_categories(arrays)
    if n_best < 0 or n_worst < 0 or n_best + n_worst == 0:
        raise ValueError(f"n_best and n_worst must be >= 0 with a positive sum, got {n_best}, {n_worst}")
    ncols = n_best + n_worst
    fig, axes = plt.subplots(2 * len(arrays), ncols, figsize=(1.7 * ncols, 3.5 * len(arrays)), squeeze=False)
    for ci, (cat, arr) in enumerate(arrays.items()):
        quality = _rank_quality(arr)
        order = np.argsort(-quality, kind="stable")
        picks = [("best", i) for i in order[:n_best]] + [("worst", i) for i in order[::-1][:n_worst][::-1]]
        maps01 = normalise_maps(arr["maps"])
        scores = _scores(arr)
        for col in range(ncols):
            top, bottom = axes[2 * ci, col], axes[2 * ci + 1, col]
            top.axis("off")
            bottom.axis("off")
            if col >= len(picks):
                continue
            kind, i = picks[col]
            image = np.asarray(arr["images"][i])
            label = int(arr["labels"][i])
            top.imshow(draw_contour(image, arr["masks"][i]))
            bottom.imshow(draw_contour(overlay(image, maps01[i]), arr["masks"][i]))
            top.set_title(f"{kind} · {'anomalous' if label else 'good'}\nscore {scores[i]:.3g}", fontsize=7)
        axes[2 * ci, 0].text(-0.08, 0.5, cat, transform=axes[2 * ci, 0].transAxes, rotation=90, ha="right",
                             va="center", fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_ablation(tables: dict, metric: str = "pixel_auroc", title: str | None = None) -> Figure:
    """Grouped bars: one group per category (``mean`` last), one bar per variant.

    Args:
        tables: ``{variant: DataFrame}`` as ``run_experiment(...).table()``; also used by the comparison chapter with
            one table per method.
        metric: the column to plot.
    """
    import pandas as pd

    if not isinstance(tables, dict) or not tables:
        raise ValueError("tables must be a non-empty dict {variant name: DataFrame}")
    for name, df in tables.items():
        if not isinstance(df, pd.DataFrame):
            raise ValueError(f"tables[{name!r}] must be a DataFrame, got {type(df).__name__}")
        if metric not in df.columns:
            raise ValueError(f"tables[{name!r}] has no column {metric!r}; columns are {list(df.columns)}")
    cats: list[str] = []
    for df in tables.values():
        cats += [c for c in df.index if c not in cats and c != "mean"]
    if any("mean" in df.index for df in tables.values()):
        cats.append("mean")
    n = len(tables)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(4.0, 0.55 * len(cats) * max(n, 2) * 0.6 + 1.5), 3.2))
    x = np.arange(len(cats))
    values = []
    for vi, (name, df) in enumerate(tables.items()):
        y = np.array([float(df.loc[c, metric]) if c in df.index and df.loc[c, metric] is not None else np.nan
                      for c in cats])
        values.append(y)
        ax.bar(x - 0.4 + width * (vi + 0.5), y, width, label=name)
    finite = np.concatenate(values)
    finite = finite[np.isfinite(finite)]
    lo = float(finite.min()) if finite.size else 0.0
    ax.set_ylim(max(0.0, min(0.5, lo - 0.05)), 1.0)
    ax.set_xticks(x, cats, rotation=45 if len(cats) > 4 else 0, ha="right" if len(cats) > 4 else "center")
    ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(n, 4), loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_validation_curve(curve: dict, used_epochs: int | None = None, title: str | None = None) -> Figure:
    """Validation pixel AUROC against training epochs, as written by ``python -m adcore.validation``.

    Args:
        curve: ``adcore.validation.stored_curve(name)`` (or ``epoch_curve``'s result): per-category values and their
            mean, measured on synthetic anomalies in held-out *training* images, never on the test split.
        used_epochs: the epoch count the run uses, marked with a vertical line (the curve's choice is marked too).
    """
    if not isinstance(curve, dict) or "curves" not in curve or "mean_pixel_auroc" not in curve:
        raise ValueError("curve must be a validation curve dict with 'curves' and 'mean_pixel_auroc'")
    fig, ax = plt.subplots(figsize=(5.5, 3.0))
    for category, points in curve["curves"].items():
        epochs = sorted(int(e) for e in points)
        ax.plot(epochs, [points[e]["pixel_auroc"] for e in epochs], marker="o", lw=1, alpha=0.7, label=category)
    epochs = sorted(int(e) for e in curve["mean_pixel_auroc"])
    ax.plot(epochs, [curve["mean_pixel_auroc"][e] for e in epochs], marker="s", lw=2.5, color="k", label="mean")
    chosen = curve.get("chosen_epochs")
    if chosen is not None:
        ax.axvline(chosen, color="k", ls=":", lw=1, label=f"best on validation ({chosen})")
    if used_epochs is not None and used_epochs != chosen:
        ax.axvline(used_epochs, color="r", ls="--", lw=1, label=f"this run ({used_epochs})")
    ax.set_xlabel("training epochs")
    ax.set_ylabel("validation pixel AUROC")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title(title or f"{curve.get('model', '')}: synthetic anomalies in held-out training images")
    fig.tight_layout()
    return fig


def plot_benchmark(bench, title: str | None = None) -> Figure:
    """Kernel benchmark rows (``kernels/bench/results.csv``) → one panel per kernel: speedup over the PyTorch
    reference per shape, one bar per (mode, dtype); a dashed line marks parity. ``median_ms`` is drawn instead when
    the file has no ``speedup`` column.
    """
    import pandas as pd

    if not isinstance(bench, pd.DataFrame) or bench.empty:
        raise ValueError("bench must be a non-empty DataFrame read from kernels/bench/results.csv")
    missing = [c for c in ("kernel", "shape") if c not in bench.columns]
    if missing:
        raise ValueError(f"benchmark rows lack columns {missing}; have {list(bench.columns)}")
    value = "speedup" if "speedup" in bench.columns else "median_ms"
    hue_cols = [c for c in ("mode", "dtype", "provider") if c in bench.columns and bench[c].nunique() > 1]
    kernels = list(dict.fromkeys(bench["kernel"]))
    fig, axes = plt.subplots(1, len(kernels), figsize=(5.0 * len(kernels), 3.4), squeeze=False)
    for ax, kernel in zip(axes.flat, kernels):
        rows = bench[bench["kernel"] == kernel]
        shapes = list(dict.fromkeys(rows["shape"].astype(str)))
        groups = list(rows.groupby(hue_cols, sort=False)) if hue_cols else [((), rows)]
        width = 0.8 / len(groups)
        for gi, (name, g) in enumerate(groups):
            y = [g.loc[g["shape"].astype(str) == s, value].astype(float).median() for s in shapes]
            label = " · ".join(map(str, name if isinstance(name, tuple) else (name,))) or None
            ax.bar(np.arange(len(shapes)) - 0.4 + width * (gi + 0.5), y, width, label=label)
        if value == "speedup":
            ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xticks(np.arange(len(shapes)), shapes, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("speedup vs reference (x)" if value == "speedup" else "median time (ms)")
        ax.set_title(kernel, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if len(groups) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_shortcuts(table, title: str | None = None) -> Figure:
    """One line per shortcut: the honest number (dot) and what the shortcut reports (arrow head).

    Args:
        table: ``adcore.book.shortcuts.shortcut_table(results)`` (columns paper, shortcut, method, metric, honest,
            shortcut_value).
    """
    needed = {"paper", "shortcut", "method", "metric", "honest", "shortcut_value"}
    if not needed <= set(getattr(table, "columns", ())):
        raise ValueError(f"table must be adcore.book.shortcuts.shortcut_table(...) with columns {sorted(needed)}")
    if len(table) == 0:
        raise ValueError("table holds no shortcut rows")
    labels = [f"{r.paper} · {r.method} · {r.metric}\n{r.shortcut}" for r in table.itertuples()]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(table) + 1.0))
    y = np.arange(len(table))[::-1]
    for yi, r in zip(y, table.itertuples()):
        ax.annotate("", xy=(r.shortcut_value, yi), xytext=(r.honest, yi),
                    arrowprops={"arrowstyle": "->", "color": "tab:red", "lw": 1.5})
    ax.scatter(table["honest"], y, color="tab:blue", zorder=3, label="honest (this book)")
    ax.scatter(table["shortcut_value"], y, color="tab:red", marker="|", s=120, zorder=3, label="with the shortcut")
    ax.set_yticks(y, labels, fontsize=7)
    lo = float(min(table["honest"].min(), table["shortcut_value"].min()))
    ax.set_xlim(max(0.0, lo - 0.05), 1.0)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(title or "what each paper's test-set shortcut adds", fontsize=10)
    fig.tight_layout()
    return fig


def plot_budget(curves, baseline: dict | None = None, spread=None, baseline_name: str = "knn",
                title: str | None = None) -> Figure:
    """One panel per metric: each method's mean over categories against its training budget (×1, ×2, ... the
    default epochs, log-2 axis), the baseline as a dashed horizontal line, and at ×1 the spread over seeds as an
    error bar (one sample standard deviation), so a rise can be read against seed noise.

    Args:
        curves: ``adcore.book.budget.curves(...)`` (columns method, budget and the metrics).
        baseline: ``{metric: value}`` of the method that needs no training (None: no line).
        spread: ``adcore.book.budget.seed_spread(...)`` (columns method, n_seeds, <metric>_std), or None.
    """
    needed = {"method", "budget", *METRIC_LABELS}
    if not needed <= set(getattr(curves, "columns", ())):
        raise ValueError(f"curves must be adcore.book.budget.curves(...) with columns {sorted(needed)}")
    if len(curves) == 0:
        raise ValueError("curves holds no finished budget")
    budgets = sorted(int(b) for b in curves["budget"].unique())
    fig, axes = plt.subplots(1, len(METRIC_LABELS), figsize=(11, 3.4), sharex=True)
    for ax, (metric, label) in zip(axes, METRIC_LABELS.items()):
        for i, (method, df) in enumerate(curves.sort_values("budget").groupby("method", sort=True)):
            color = f"C{i}"
            ax.plot(df["budget"], df[metric], "o-", color=color, label=method)
            if spread is not None and len(spread):
                row = spread[spread["method"] == method]
                at_one = df[df["budget"] == 1]
                if len(row) and len(at_one) and row["n_seeds"].iloc[0] > 1:
                    ax.errorbar(1, at_one[metric].iloc[0], yerr=row[f"{metric}_std"].iloc[0], color=color,
                                capsize=3, lw=1)
        if baseline and baseline.get(metric) is not None:
            ax.axhline(baseline[metric], color="black", ls="--", lw=1, label=f"{baseline_name} (no training)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [f"×{b}" for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("training budget (× default epochs)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(title or "mean over categories against training budget", fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))  # room for the legend under the panels, off the curves
    return fig
