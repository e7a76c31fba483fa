"""A heatmap viewer over a run's test images that works in a live kernel *and* in the static HTML book.

Two builds behind one switch (``static=``):

* **static** (the default under papermill/nbclient, and wherever ``ADCORE_VIEWER=static``): every frame is rendered
  ahead as a small PNG and put in ``ipywidgets.Stack`` containers whose ``selected_index`` is ``jslink``-ed to the
  controls. Links run in the browser, so the published book (no kernel, widget state saved in the notebook) still
  changes the picture when the slider moves. The number of images is cut to keep the widget state of one viewer
  under ``budget_mb`` (the book's limit is 3 MB per page).
* **live** (a Jupyter front end with a kernel): one ``Image`` per method, redrawn at full size by Python callbacks on
  demand; every image of every category is reachable.

Both show the same controls: category (when there are several), image, mode (image, anomaly map, overlay,
ground-truth contour, predicted mask) and a threshold for the predicted mask (a fraction of the category's map range).
A plain matplotlib grid is displayed beneath the widget; it needs no JavaScript at all.

``show(arrays)`` views one run; ``compare({method: arrays, ...})`` puts methods side by side on the same images
(matched by file path).
"""
from __future__ import annotations

import io
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np

from .plots import (GT_COLOR, PRED_COLOR, _rank_quality, _scores, as_categories, colorize, draw_contour,
                    normalise_maps, overlay, resize)

MODES = ("image", "anomaly map", "overlay", "GT contour", "predicted mask")
DEFAULT_THRESHOLDS = (0.3, 0.5, 0.7)
# The book allows 3 MB of widget state per page; static viewers built in one kernel (one notebook = one page) share
# this much, leaving room for progress bars and other widgets.
PAGE_BUDGET_MB = 2.6
_page_state_used = 0  # bytes of static viewer state built so far in this process
_arrays_saved = False  # show() saved this process's arrays for the comparison chapter


# ---------------------------------------------------------------------------------------------------------------------
# frames


def _png(rgb: np.ndarray, colors: int = 128) -> bytes:
    """(h, w, 3) uint8 → PNG bytes; an adaptive palette makes thumbnails ~3x smaller than RGB PNGs."""
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(rgb))
    if colors:
        img = img.quantize(colors=colors, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def render_frame(image: np.ndarray, map01: np.ndarray, mask: np.ndarray, mode: str, threshold: float = 0.5,
                 size: int | None = None) -> np.ndarray:
    """One picture of the viewer as (s, s, 3) uint8.

    Args:
        image: (S, S, 3) uint8.
        map01: (h, w) anomaly map already normalised to [0, 1] over its category.
        mask: (h, w) ground truth {0, 1}.
        mode: one of :data:`MODES`.
        threshold: for ``"predicted mask"``: pixels with ``map01 >= threshold`` are predicted anomalous.
        size: output side in pixels (``None``: the image's own size).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if size is not None and size != image.shape[0]:
        image = resize(image, (size, size), order=1).round().clip(0, 255).astype(np.uint8)
    hw = image.shape[:2]
    if mode == "image":
        return image
    if mode == "anomaly map":
        return colorize(resize(map01, hw, order=1))
    if mode == "overlay":
        return overlay(image, map01)
    if mode == "GT contour":
        return draw_contour(image, mask, GT_COLOR)
    pred = resize(map01, hw, order=1) >= threshold
    return draw_contour(draw_contour(image, pred, PRED_COLOR, fill=0.35), mask, GT_COLOR)


def _select(arr: dict, k: int) -> np.ndarray:
    """Indices of at most ``k`` test images: anomalous and good in proportion, spread evenly, in file order."""
    labels = np.asarray(arr["labels"]).astype(int)
    n = len(labels)
    if k >= n:
        return np.arange(n)
    anom, good = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    k_anom = min(len(anom), max(1, round(k * len(anom) / n))) if len(anom) else 0
    k_good = min(len(good), k - k_anom)
    pick = lambda idx, m: idx[np.linspace(0, len(idx) - 1, m).round().astype(int)] if m else idx[:0]  # noqa: E731
    return np.sort(np.concatenate([pick(anom, k_anom), pick(good, k_good)]))


def _caption(arr: dict, i: int, method: str | None = None) -> str:
    label = int(arr["labels"][i])
    defect = arr["defects"][i] if arr.get("defects") is not None else ""
    path = arr["paths"][i] if arr.get("paths") is not None else f"#{i}"
    what = "anomalous" + (f" ({defect})" if defect and defect != "good" else "") if label else "good"
    score = _scores(arr)[i]
    head = f"<b>{method}</b> · " if method else ""
    return f"{head}{what} · score {score:.4g} · <code>{Path(str(path)).name}</code>"


# ---------------------------------------------------------------------------------------------------------------------
# inputs


def _as_runs(runs) -> dict[str, dict[str, dict]]:
    """``{method: arrays}`` → ``{method: {category: arrays}}``, checked."""
    if not isinstance(runs, dict) or not runs:
        raise ValueError("runs must be a non-empty dict {method name: arrays}")
    return {str(m): as_categories(a, what=f"runs[{m!r}]") for m, a in runs.items()}


def _aligned(runs: dict[str, dict[str, dict]]) -> dict[str, list[tuple[str, dict, np.ndarray]]]:
    """Per category present in every method: ``[(method, arrays, indices)]`` with indices pointing at the same image.

    The first method fixes the image order; images are matched by path (by position when paths are missing).
    """
    methods = list(runs)
    cats = [c for c in runs[methods[0]] if all(c in runs[m] for m in methods)]
    if not cats:
        raise ValueError(f"no category is present in every method: {({m: list(r) for m, r in runs.items()})}")
    out = {}
    for cat in cats:
        first = runs[methods[0]][cat]
        n = len(first["labels"])
        keys = [str(p) for p in first["paths"]] if first.get("paths") is not None else list(range(n))
        index = []
        for m in methods:
            arr = runs[m][cat]
            mkeys = [str(p) for p in arr["paths"]] if arr.get("paths") is not None else list(range(len(arr["labels"])))
            where = {k: i for i, k in enumerate(mkeys)}
            index.append([where.get(k, -1) for k in keys])
        index = np.asarray(index)  # (methods, n), -1 where a method lacks the image
        common = np.flatnonzero((index >= 0).all(axis=0))
        if not len(common):
            raise ValueError(f"category {cat!r}: the methods share no test image (compared by path)")
        out[cat] = [(m, runs[m][cat], index[j, common]) for j, m in enumerate(methods)]
    return out


def _is_live_frontend() -> bool:
    """True in a Jupyter front end with a kernel; False under papermill/nbclient, in scripts and in tests.

    nbclient executes cells with ``allow_stdin=False`` while interactive front ends (JupyterLab, Notebook, VS Code)
    allow stdin, which is the one difference visible from inside the kernel. ``ADCORE_VIEWER=static|live`` overrides.
    """
    env = os.environ.get("ADCORE_VIEWER", "auto").lower()
    if env in ("static", "live"):
        return env == "live"
    if env != "auto":
        raise ValueError(f"ADCORE_VIEWER must be 'static', 'live' or 'auto', got {env!r}")
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    ip = get_ipython()
    kernel = getattr(ip, "kernel", None)
    return bool(getattr(kernel, "_allow_stdin", False))


# ---------------------------------------------------------------------------------------------------------------------
# static build


def _frame_bytes(aligned: list, i_pos: int, maps01: dict, size: int, thresholds, colors: int) -> list[dict]:
    """PNG bytes of every frame of the image at slider position ``i_pos``, one dict per method."""
    frames = []
    for m, arr, idx in aligned:
        i = int(idx[i_pos])
        img, mask = np.asarray(arr["images"][i]), np.asarray(arr["masks"][i])
        f = {mode: _png(render_frame(img, maps01[m][i], mask, mode, size=size), colors) for mode in MODES[:-1]}
        f["pred"] = [_png(render_frame(img, maps01[m][i], mask, "predicted mask", t, size), colors)
                     for t in thresholds]
        frames.append(f)
    return frames


# Upper bounds on the JSON a saved widget model adds besides its PNG bytes (measured with ipywidgets 8.1 on
# 128-px frames: ~5.4 kB per image position and method, ~25 kB of controls per category and method).
_BYTES_PER_POSITION = 5500
_BYTES_PER_PANEL = 26000
_BYTES_FIXED = 5000


def _estimate_state(aligned: dict, picks: dict, frames: dict) -> int:
    """An upper bound on the saved state of ``_assemble(aligned, picks, ...)``, from the frames' bytes alone.

    The viewer is sized with this instead of by building and measuring candidates: nbclient saves the state of every
    widget a kernel ever opened, closed or not, so a discarded over-budget build would still land on the page.
    """
    b64 = sum(4 * math.ceil(len(png) / 3) for cat, pos in picks.items() for p in pos for f in frames[cat, p]
              for png in [*(v for key, v in f.items() if key != "pred"), *f["pred"]])
    methods = len(next(iter(aligned.values())))
    positions = sum(len(pos) for pos in picks.values()) * methods
    return b64 + _BYTES_PER_POSITION * positions + _BYTES_PER_PANEL * len(picks) * methods + _BYTES_FIXED


def state_size(root) -> int:
    """Bytes of JSON the widget state of ``root`` (and its links) takes in a saved notebook.

    nbclient stores every model with all its attributes, so defaults are not dropped here either.
    """
    from ipywidgets.embed import dependency_state

    state = dependency_state([root, *getattr(root, "links", [])], drop_defaults=False)
    return len(json.dumps(state))


def _assemble(aligned: dict, picks: dict, frames: dict, title, size: int, thresholds):
    """Widgets for the chosen images: per category a panel of controls and per-method mode/threshold/image Stacks."""
    import ipywidgets as W
    from ipywidgets.widgets.widget_string import HTMLStyle

    shown = f"{2 * size}px"
    # Shared Layout and style models: a model per widget would add ~1 kB each to the saved state.
    img_layout = W.Layout(width=shown, height=shown)
    box_layout = W.Layout()
    html_style = HTMLStyle()
    links = []
    panels = []
    for cat, pos in picks.items():
        al = aligned[cat]
        slider = W.IntSlider(value=0, min=0, max=len(pos) - 1, description="image", continuous_update=True,
                             layout=W.Layout(width="380px"))
        mode = W.ToggleButtons(options=MODES, value="overlay", description="mode", style={"button_width": "122px"})
        thr = W.SelectionSlider(options=[f"{t:.2f}" for t in thresholds],
                                value=f"{thresholds[len(thresholds) // 2]:.2f}", description="threshold",
                                layout=W.Layout(width="380px"))
        views = []
        for j, (m, arr, idx) in enumerate(al):
            def stack_of(key, ti=None):
                children = [W.Image(value=frames[cat, p][j][key] if ti is None else frames[cat, p][j][key][ti],
                                    format="png", layout=img_layout) for p in pos]
                st = W.Stack(children, selected_index=0, layout=box_layout)
                links.append(W.jslink((slider, "value"), (st, "selected_index")))
                return st

            by_mode = [stack_of(md) for md in MODES[:-1]]
            pred = W.Stack([stack_of("pred", ti) for ti in range(len(thresholds))], selected_index=thr.index,
                           layout=box_layout)
            links.append(W.jslink((thr, "index"), (pred, "selected_index")))
            mode_stack = W.Stack(by_mode + [pred], selected_index=mode.index, layout=box_layout)
            links.append(W.jslink((mode, "index"), (mode_stack, "selected_index")))
            captions = W.Stack([W.HTML(_caption(arr, int(idx[p]), m if len(al) > 1 else None), style=html_style,
                                       layout=box_layout) for p in pos], selected_index=0, layout=box_layout)
            links.append(W.jslink((slider, "value"), (captions, "selected_index")))
            views.append(W.VBox([mode_stack, captions], layout=box_layout))
        note = W.HTML(f"<small>{len(pos)} of {len(al[0][2])} test images pre-rendered at {size} px for the static "
                      "page; white = ground truth, red = predicted mask; map range per category.</small>",
                      style=html_style, layout=box_layout)
        panels.append(W.VBox([W.HBox([slider, thr], layout=box_layout), mode, W.HBox(views, layout=box_layout),
                              note], layout=box_layout))
    children = [W.HTML(f"<h4 style='margin:0'>{title}</h4>", style=html_style, layout=box_layout)] if title else []
    if len(panels) > 1:
        cats = W.Dropdown(options=list(picks), value=next(iter(picks)), description="category")
        outer = W.Stack(panels, selected_index=0, layout=box_layout)
        links.append(W.jslink((cats, "index"), (outer, "selected_index")))
        children += [cats, outer]
    else:
        children += panels
    root = W.VBox(children)
    root.links = links  # keep the Link models referenced for as long as the viewer lives
    return root


def build_static(runs, title: str | None = None, *, max_images: int = 24, size: int = 128,
                 thresholds=DEFAULT_THRESHOLDS, budget_mb: float = 2.0, colors: int = 128):
    """The kernel-free viewer: pre-rendered frames in ``Stack`` widgets driven by ``jslink``-ed controls.

    Args:
        runs: ``{method: arrays}`` where arrays is ``{category: arrays}`` or one category's arrays.
        title: shown above the controls.
        max_images: most images per category; fewer are kept when the state would exceed ``budget_mb``.
        size: side of each thumbnail in pixels (shown at twice that width).
        thresholds: predicted-mask thresholds offered, as fractions of the category's map range.
        budget_mb: cap on the saved widget state of this viewer; lowered to what is left of
            :data:`PAGE_BUDGET_MB` when other static viewers were built in this process (the same page).
        colors: PNG palette size (0 = full RGB).

    Returns:
        The root widget; ``root.state_bytes`` is its measured state size and ``root.n_images`` the images kept per
        category.
    """
    if max_images < 1 or size < 16:
        raise ValueError(f"max_images must be >= 1 and size >= 16, got {max_images}, {size}")
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or any(not 0 < t < 1 for t in thresholds):
        raise ValueError(f"thresholds must be fractions in (0, 1), got {thresholds}")
    global _page_state_used
    aligned = _aligned(_as_runs(runs))
    maps01 = {cat: {m: normalise_maps(arr["maps"]) for m, arr, _ in al} for cat, al in aligned.items()}
    # a second viewer on the same page gets what the first left of the page budget (but always a minimal viewer)
    budget = int(max(min(budget_mb, PAGE_BUDGET_MB - _page_state_used / 2**20), 0.15) * 2**20)
    frames: dict = {}  # (category, position) -> per-method frame PNGs, rendered once while the size is chosen

    def render_picks(picks):
        for cat, pos in picks.items():
            for p in pos:
                if (cat, p) not in frames:
                    frames[cat, p] = _frame_bytes(aligned[cat], p, maps01[cat], size, thresholds, colors)
        return picks

    def choose(k):
        return {cat: _select({"labels": al[0][1]["labels"][al[0][2]]}, k) for cat, al in aligned.items()}

    k = max_images
    while k > 1 and _estimate_state(aligned, render_picks(choose(k)), frames) > budget:
        k -= 1
    picks = render_picks(choose(k))
    root = _assemble(aligned, picks, frames, title, size, thresholds)  # built once: see _estimate_state
    state = state_size(root)
    if state > budget and k > 1:  # the estimate's constants undershot (e.g. very long captions): say so
        warnings.warn(f"static viewer state {state / 2**20:.2f} MB exceeds its budget {budget / 2**20:.2f} MB; pass "
                      "a smaller max_images or size", stacklevel=2)
    _page_state_used += state
    root.state_bytes = state
    root.n_images = max(len(p) for p in picks.values())
    return root


# ---------------------------------------------------------------------------------------------------------------------
# live build


def build_live(runs, title: str | None = None, *, size: int | None = 256, thresholds=DEFAULT_THRESHOLDS):
    """The kernel-backed viewer: each control change re-renders the shown frames in Python at ``size`` px."""
    import ipywidgets as W

    aligned = _aligned(_as_runs(runs))
    maps01 = {cat: {m: normalise_maps(arr["maps"]) for m, arr, _ in al} for cat, al in aligned.items()}
    cats = W.Dropdown(options=list(aligned), description="category",
                      layout=W.Layout(display="flex" if len(aligned) > 1 else "none"))
    slider = W.IntSlider(value=0, min=0, max=len(aligned[cats.value][0][2]) - 1, description="image",
                         layout=W.Layout(width="380px"))
    mode = W.ToggleButtons(options=MODES, value="overlay", description="mode", style={"button_width": "122px"})
    thr = W.FloatSlider(value=float(np.median(thresholds)), min=0.01, max=0.99, step=0.01, description="threshold",
                        layout=W.Layout(width="380px"))
    n_methods = len(next(iter(aligned.values())))
    images = [W.Image(format="png", layout=W.Layout(width=f"{size or 256}px")) for _ in range(n_methods)]
    captions = [W.HTML() for _ in range(n_methods)]

    def redraw(*_):
        al = aligned[cats.value]
        for j, (m, arr, idx) in enumerate(al):
            i = int(idx[slider.value])
            frame = render_frame(np.asarray(arr["images"][i]), maps01[cats.value][m][i], np.asarray(arr["masks"][i]),
                                 mode.value, thr.value, size)
            images[j].value = _png(frame, colors=0)
            captions[j].value = _caption(arr, i, m if n_methods > 1 else None)

    def on_category(_):
        slider.value = 0
        slider.max = len(aligned[cats.value][0][2]) - 1
        redraw()

    cats.observe(on_category, names="value")
    for w in (slider, mode, thr):
        w.observe(redraw, names="value")
    redraw()
    head = [W.HTML(f"<h4 style='margin:0'>{title}</h4>")] if title else []
    return W.VBox(head + [cats, W.HBox([slider, thr]), mode,
                          W.HBox([W.VBox([im, cap]) for im, cap in zip(images, captions)])])


# ---------------------------------------------------------------------------------------------------------------------
# the always-rendering grid, and the public entry points


def grid_figure(runs, n_images: int = 4, title: str | None = None):
    """A matplotlib grid: per category, one row per method, overlays (GT contour in white) of the same images."""
    import matplotlib.pyplot as plt

    aligned = _aligned(_as_runs(runs))
    rows = [(cat, j) for cat, al in aligned.items() for j in range(len(al))]
    fig, axes = plt.subplots(len(rows), n_images, figsize=(1.6 * n_images, 1.75 * len(rows)), squeeze=False)
    for r, (cat, j) in enumerate(rows):
        al = aligned[cat]
        m, arr, idx = al[j]
        # the images the first method handles worst and best, shown for every method
        quality = _rank_quality({"labels": al[0][1]["labels"][al[0][2]],
                                 "scores": _scores(al[0][1])[al[0][2]], "maps": None})
        order = np.argsort(quality, kind="stable")
        picks = np.unique(np.concatenate([order[: n_images // 2], order[::-1][: n_images - n_images // 2]]))
        maps01 = normalise_maps(arr["maps"])
        for c in range(n_images):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(picks):
                continue
            i = int(idx[picks[c]])
            ax.imshow(draw_contour(overlay(np.asarray(arr["images"][i]), maps01[i]), arr["masks"][i]))
            ax.set_title(f"{'anomalous' if int(arr['labels'][i]) else 'good'} · {_scores(arr)[i]:.3g}", fontsize=6)
        label = " · ".join(x for x in (cat, m if len(al) > 1 else "") if x)
        if label:
            axes[r, 0].text(-0.08, 0.5, label, transform=axes[r, 0].transAxes, rotation=90, ha="right",
                            va="center", fontsize=7)
    # tight_layout ignores a suptitle: reserve a band of 0.3 inch above the rows for it, or it covers their titles.
    top = 1.0 - 0.3 / fig.get_figheight() if title else 1.0
    if title:
        fig.suptitle(title, fontsize=9, y=1.0, va="top")
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def _display(runs, title, static, grid, **kwargs):
    import matplotlib.pyplot as plt
    from IPython.display import display

    if static is None:
        static = not _is_live_frontend()
    if static:
        widget = build_static(runs, title, **kwargs)
    else:
        widget = build_live(runs, title, **{k: v for k, v in kwargs.items() if k in ("thresholds",)})
    display(widget)
    if grid:
        fig = grid_figure(runs, title=None)
        display(fig)
        plt.close(fig)
    return None


def show(arrays, title: str | None = None, *, static: bool | None = None, grid: bool = True, **kwargs) -> None:
    """Display the heatmap viewer over one run's test results, with a matplotlib grid beneath it.

    Args:
        arrays: ``run_experiment(...).arrays`` (``{category: arrays}``) or one category's arrays dict from
            ``evaluate(..., return_arrays=True)``.
        title: shown above the viewer.
        static: ``True`` pre-renders frames linked client-side (works in the static book); ``False`` renders on
            demand in a live kernel; ``None`` picks live only in an interactive Jupyter front end.
        grid: also display the plain matplotlib grid.
        **kwargs: passed to :func:`build_static` (``max_images``, ``size``, ``thresholds``, ``budget_mb``).
    """
    global _arrays_saved
    arrays = as_categories(arrays)
    save_dir = os.environ.get("ADCORE_ARRAYS_DIR")
    if save_dir and not _arrays_saved:
        # The batch runner sets this so the comparison chapter can put methods side by side without retraining; the
        # first viewer of a notebook is its main result (later ones show ablations).
        save_arrays(arrays, Path(save_dir) / "arrays.npz")
        _arrays_saved = True
    return _display({"": arrays}, title, static, grid, **kwargs)


def compare(runs: dict, title: str | None = None, *, static: bool | None = None, grid: bool = True, **kwargs) -> None:
    """Display methods side by side on the same test images: ``runs = {method: arrays}``.

    Arrays are matched per category by image path; categories missing from a method are left out.
    """
    return _display(runs, title, static, grid, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# arrays on disk (for the comparison chapter)


def save_arrays(arrays, path, max_side: int = 128) -> Path:
    """Save ``{category: arrays}`` downsized to ``max_side`` px (uint8 images, float16 maps) as a compressed npz."""
    from .utils import atomic_write_bytes

    arrays = as_categories(arrays)
    payload = {}
    for ci, (cat, arr) in enumerate(arrays.items()):
        images = np.asarray(arr["images"])
        side = min(max_side, images.shape[1])
        size = (side, side)
        payload[f"{ci}/category"] = np.array(cat)
        payload[f"{ci}/images"] = np.stack([resize(im, size, 1).round().clip(0, 255).astype(np.uint8)
                                            for im in images])
        payload[f"{ci}/maps"] = np.stack([resize(np.asarray(m, np.float32), size, 1) for m in arr["maps"]]
                                         ).astype(np.float16)
        payload[f"{ci}/masks"] = np.stack([resize(np.asarray(m).astype(np.uint8), size, 0) for m in arr["masks"]])
        payload[f"{ci}/labels"] = np.asarray(arr["labels"]).astype(np.int64)
        payload[f"{ci}/scores"] = _scores(arr)
        paths = arr.get("paths") if arr.get("paths") is not None else [f"#{i}" for i in range(len(images))]
        defects = arr.get("defects") if arr.get("defects") is not None else [""] * len(images)
        payload[f"{ci}/paths"] = np.array([str(p) for p in paths])
        payload[f"{ci}/defects"] = np.array([str(d) for d in defects])
    buf = io.BytesIO()
    np.savez_compressed(buf, **payload)
    return atomic_write_bytes(path, buf.getvalue())


def load_arrays(path) -> dict[str, dict]:
    """Read what :func:`save_arrays` wrote back into ``{category: arrays}``."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"arrays file {str(path)!r} does not exist")
    with np.load(path, allow_pickle=False) as z:
        n = len({k.split("/")[0] for k in z.files})
        out = {}
        for ci in range(n):
            cat = str(z[f"{ci}/category"])
            out[cat] = {k: z[f"{ci}/{k}"] for k in ("images", "maps", "masks", "labels", "scores")}
            out[cat]["maps"] = out[cat]["maps"].astype(np.float32)
            out[cat]["paths"] = [str(p) for p in z[f"{ci}/paths"]]
            out[cat]["defects"] = [str(d) for d in z[f"{ci}/defects"]]
    return out
