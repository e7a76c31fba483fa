"""adcore.viewer: frames, the kernel-free (jslink-ed Stack) build, the live build, and the arrays on disk.

The browser side (moving the slider in the static HTML changes the picture) is tested in tests/test_book.py.
"""
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from adcore import viewer  # noqa: E402

W = pytest.importorskip("ipywidgets")
from ipywidgets.widgets.widget_link import Link  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_page(monkeypatch):
    monkeypatch.setattr(viewer, "_page_state_used", 0)  # each test is a page of its own
    monkeypatch.setattr(viewer, "_arrays_saved", False)


def fake_arrays(n=6, size=32, seed=0, order=None, noise=False):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    masks = np.zeros((n, size, size), np.uint8)
    maps = rng.random((n, size, size)).astype(np.float32) * 0.1
    for i in np.flatnonzero(labels):
        masks[i, 8:16, 8:16] = 1
        maps[i, 6:18, 6:18] += 1.0
    images = np.stack([np.full((size, size, 3), (37 * i) % 256, np.uint8) for i in range(n)])
    if noise:  # incompressible pictures: the worst case for the state budget
        images = rng.integers(0, 255, images.shape, dtype=np.uint8)
    arr = {"images": images, "maps": maps, "masks": masks, "labels": labels,
           "scores": maps.reshape(n, -1).max(1), "paths": [f"/d/{i:03d}.png" for i in range(n)],
           "defects": ["hole" if lab else "good" for lab in labels]}
    if order is not None:  # the same images in another order, as a second method might list them
        arr = {k: (np.asarray(v)[order] if k != "paths" and k != "defects" else [v[i] for i in order])
               for k, v in arr.items()}
    return arr


def widgets_of(root, cls):
    out, todo = [], [root]
    while todo:
        w = todo.pop()
        if isinstance(w, cls):
            out.append(w)
        todo += list(getattr(w, "children", ()))
    return out


def test_render_frame_modes():
    arr = fake_arrays()
    m01 = viewer.normalise_maps(arr["maps"])
    img, mask = arr["images"][1], arr["masks"][1]
    frames = {m: viewer.render_frame(img, m01[1], mask, m) for m in viewer.MODES}
    assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames.values())
    assert (frames["image"] == img).all()
    assert not (frames["overlay"] == img).all() and not (frames["anomaly map"] == frames["overlay"]).all()
    assert (frames["GT contour"][8, 8] == viewer.GT_COLOR).all()  # mask boundary drawn in white
    red = lambda f: int(((f[..., 0] > 150) & (f[..., 1] < 120)).sum())  # noqa: E731
    low = viewer.render_frame(img, m01[1], mask, "predicted mask", threshold=0.05)
    high = viewer.render_frame(img, m01[1], mask, "predicted mask", threshold=0.95)
    assert red(low) > red(high)  # a lower threshold predicts more anomalous pixels
    assert viewer.render_frame(img, m01[1], mask, "overlay", size=16).shape == (16, 16, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        viewer.render_frame(img, m01[1], mask, "heat")


def test_static_viewer_links_controls_to_prerendered_stacks():
    root = viewer.build_static({"": {"a": fake_arrays(), "b": fake_arrays(seed=1)}}, title="t", size=32,
                               thresholds=(0.3, 0.6))
    dropdown = widgets_of(root, W.Dropdown)
    assert len(dropdown) == 1 and list(dropdown[0].options) == ["a", "b"]
    sliders = widgets_of(root, W.IntSlider)
    assert len(sliders) == 2 and sliders[0].max == 5  # one per category, over every image
    links = {(ln.source[0].model_id, ln.source[1], ln.target[0].model_id) for ln in root.links}
    assert all(isinstance(ln, Link) for ln in root.links)  # client-side links, not Python callbacks
    for slider in sliders:
        linked = [t for s, name, t in links if s == slider.model_id and name == "value"]
        # 4 modes + 2 thresholds of image stacks, plus the caption stack
        assert len(linked) == 4 + 2 + 1
    for stack in widgets_of(root, W.Stack):
        assert stack.selected_index is not None
    images = widgets_of(root, W.Image)
    assert len(images) == 2 * 6 * (4 + 2)
    assert all(im.value[:8] == b"\x89PNG\r\n\x1a\n" for im in images)
    assert root.n_images == 6


def test_static_viewer_stays_within_its_state_budget():
    from ipywidgets.embed import dependency_state

    big = {"": {c: fake_arrays(n=40, size=64, seed=i, noise=True) for i, c in enumerate("abc")}}
    root = viewer.build_static(big, size=64, budget_mb=0.5)
    assert 1 < root.n_images < 40  # images were dropped to fit
    state = json.dumps(dependency_state([root, *root.links], drop_defaults=False))
    assert len(state) == root.state_bytes <= 0.5 * 2**20
    # anomalous and good images both kept
    labels = [w.value for w in widgets_of(root, W.HTML) if "score" in w.value]
    assert any(t.startswith("anomalous") for t in labels) and any(t.startswith("good") for t in labels)


def test_static_viewer_opens_only_the_widgets_it_shows():
    # nbclient saves the state of every widget a kernel ever opened, closed or not: sizing the viewer by building and
    # discarding over-budget candidates put them on the page too (4 MB pages in the full book).
    # a flat first category and noisy others: a size guessed from the first image alone falls far short
    big = {"": {c: fake_arrays(n=40, size=64, seed=i, noise=c != "a") for i, c in enumerate("abc")}}
    opened = []
    W.Widget.on_widget_constructed(opened.append)
    try:
        root = viewer.build_static(big, size=64, budget_mb=0.5)
    finally:
        W.Widget.on_widget_constructed(None)
    assert 1 < root.n_images < 40  # the budget did bind
    for cls in (W.Image, W.IntSlider, W.Dropdown):
        assert sum(isinstance(w, cls) for w in opened) == len(widgets_of(root, cls)), cls.__name__


def test_compare_matches_images_by_path():
    order = [5, 4, 3, 2, 1, 0]
    root = viewer.build_static({"m1": fake_arrays(), "m2": fake_arrays(order=order)}, size=32)
    captions = [w.value for w in widgets_of(root, W.HTML) if "score" in w.value]
    first = [c for c in captions if "<b>m1</b>" in c]
    second = [c for c in captions if "<b>m2</b>" in c]
    assert len(first) == len(second) == 6
    # same file at the same slider position for both methods
    names = lambda cs: sorted(c.split("<code>")[1] for c in cs)  # noqa: E731
    assert names(first) == names(second)
    aligned = viewer._aligned(viewer._as_runs({"m1": fake_arrays(), "m2": fake_arrays(order=order)}))
    (_, a1, i1), (_, a2, i2) = aligned[""]
    assert [a1["paths"][i] for i in i1] == [a2["paths"][i] for i in i2]
    with pytest.raises(ValueError, match="no category is present in every method"):
        viewer.build_static({"m1": {"a": fake_arrays()}, "m2": {"b": fake_arrays()}})


def test_live_viewer_redraws_on_demand():
    root = viewer.build_live({"": {"a": fake_arrays(), "b": fake_arrays(n=4, seed=2)}}, size=32)
    image = widgets_of(root, W.Image)[0]
    slider = widgets_of(root, W.IntSlider)[0]
    mode = widgets_of(root, W.ToggleButtons)[0]
    first = image.value
    slider.value = 3
    assert image.value != first
    shown = image.value
    mode.value = "image"
    assert image.value != shown
    cats = widgets_of(root, W.Dropdown)[0]
    cats.value = "b"
    assert slider.max == 3 and slider.value == 0


def test_mode_switch_and_show(monkeypatch, tmp_path):
    monkeypatch.setenv("ADCORE_VIEWER", "static")
    assert viewer._is_live_frontend() is False
    monkeypatch.setenv("ADCORE_VIEWER", "live")
    assert viewer._is_live_frontend() is True
    monkeypatch.setenv("ADCORE_VIEWER", "sometimes")
    with pytest.raises(ValueError, match="ADCORE_VIEWER"):
        viewer._is_live_frontend()
    monkeypatch.delenv("ADCORE_VIEWER")
    assert viewer._is_live_frontend() is False  # no kernel here

    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj: shown.append(obj))
    monkeypatch.setenv("ADCORE_ARRAYS_DIR", str(tmp_path))
    assert viewer.show(fake_arrays(), title="x", size=32) is None
    assert isinstance(shown[0], W.VBox)
    assert type(shown[1]).__name__ == "Figure"  # the matplotlib grid beneath
    back = viewer.load_arrays(tmp_path / "arrays.npz")
    assert list(back) == [""] and back[""]["maps"].shape == (6, 32, 32)
    viewer.show({"ablation": fake_arrays()}, size=32, grid=False)  # a later viewer (an ablation) is not saved
    assert list(viewer.load_arrays(tmp_path / "arrays.npz")) == [""]
    assert back[""]["paths"][1] == "/d/001.png" and (back[""]["labels"] == np.arange(6) % 2).all()
    with pytest.raises(ValueError, match="non-empty dict"):
        viewer.show([])
    with pytest.raises(ValueError, match="does not exist"):
        viewer.load_arrays(tmp_path / "missing.npz")


def test_save_arrays_downsizes(tmp_path):
    arr = {"cat": fake_arrays(n=2, size=64)}
    viewer.save_arrays(arr, tmp_path / "a.npz", max_side=16)
    back = viewer.load_arrays(tmp_path / "a.npz")["cat"]
    assert back["images"].shape == (2, 16, 16, 3) and back["maps"].dtype == np.float32
    assert back["masks"].max() == 1 and back["defects"] == ["good", "hole"]


def test_viewers_on_one_page_share_the_page_budget(monkeypatch):
    monkeypatch.setattr(viewer, "PAGE_BUDGET_MB", 0.6)
    big = {"": {"a": fake_arrays(n=40, size=64, noise=True)}}
    first = viewer.build_static(big, size=64, budget_mb=0.5)
    second = viewer.build_static(big, size=64, budget_mb=0.5)
    assert first.state_bytes <= 0.5 * 2**20
    assert first.state_bytes + second.state_bytes <= 0.6 * 2**20 + 0.15 * 2**20
    assert second.n_images < first.n_images


def test_grid_figure_title_does_not_cover_the_first_row():
    # the book's shape: 3 categories x 6 methods = 18 rows (a tall figure is where the title used to land on row 1)
    methods = ["knn", "dmad", "aand", "vt_adl", "advit", "anovit"]
    runs = {m: {c: fake_arrays(seed=i) for c in ("brick", "grass", "gravel")} for i, m in enumerate(methods)}
    fig = viewer.grid_figure(runs, n_images=4, title="every method on the same test images")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    title_box = fig._suptitle.get_window_extent(renderer)
    # every panel, its image title included, must sit wholly below the figure title
    panels = [ax.get_tightbbox(renderer) for ax in fig.axes if ax.get_images()]
    assert panels, "the grid drew no images"
    overlapping = [b for b in panels if b.y1 > title_box.y0]
    assert not overlapping, f"the figure title overlaps {len(overlapping)} panels (title bottom {title_box.y0:.0f} px)"
