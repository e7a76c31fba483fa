"""The Jupyter Book: run the grid (:mod:`adcore.runs`), execute the book's own chapters over the runs' results,
stage everything with the vendored widget JavaScript, and call ``jupyter-book build -W``."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml

from ..data.textures import default_cache_dir
from ..runs.execute import execute_runs, expected_seconds, is_done, run_status, start_order, write_manifest
from ..runs.params import parse_parameters
from ..runs.plan import BUDGET_GRID, DEFAULT_GRID, NOTEBOOKS_DIR, Run, _sha, load_grid, plan_grids

REPO = Path(__file__).resolve().parents[2]
BOOK_DIR = Path("book")
BOOK_CHAPTERS = ("data", "comparison", "budget", "shortcuts", "kernels", "reproducibility")


def fetch_widget_js(dest, script=None) -> Path:
    """Vendor the ipywidgets HTML manager, RequireJS and MathJax from npm (``book/fetch_widget_js.sh``) unless
    already there."""
    from filelock import FileLock

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # two builds at once (a test worker each, or two users of one checkout) share dest.partial: one fetches, the other
    # waits and finds it there
    with FileLock(str(dest) + ".lock"):
        if all((dest / f).is_file() for f in ("require.js", "html-manager/embed-amd.js", "mathjax/tex-mml-chtml.js")):
            return dest
        script = Path(script or REPO / BOOK_DIR / "fetch_widget_js.sh")
        proc = subprocess.run(["bash", str(script), str(dest)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not vendor the widget JavaScript with {script}: {proc.stderr.strip()}\n"
                           "The book's viewers need it to work offline; run the script where npm can reach "
                           "registry.npmjs.org.")
    return dest


def _place_widget_fonts(html_dir: Path, manager_dir: Path) -> None:
    """Copy the widget manager's icon fonts where its CSS looks for them.

    embed-amd.js has an empty webpack public path, so its CSS asks for ``@jupyter-widgets/html-manager/dist/<font>``
    relative to each page; without the copies an offline reader's console shows failed loads (the viewer uses no
    icons, so nothing visible depends on them).
    """
    fonts = [p for p in manager_dir.iterdir() if p.suffix in (".woff2", ".woff", ".ttf", ".eot", ".svg")]
    for page_dir in {p.parent for p in html_dir.rglob("*.html") if "widget-state+json" in p.read_text()}:
        dest = page_dir / "@jupyter-widgets" / "html-manager" / "dist"
        dest.mkdir(parents=True, exist_ok=True)
        for f in fonts:
            shutil.copy2(f, dest / f.name)


# [text](../adcore/models/vt_adl.py): a link from a notebook to a repository file, which the book cannot serve
_REPO_LINK = re.compile(r"\[([^\]]+)\]\(((?:\.\./)+)([^)\s]+)\)")


def _stage_notebook(src: Path, dest: Path) -> None:
    """Copy an executed notebook into the book, turning links to repository files (``../adcore/x.py``), which point
    outside the book and would fail the build as missing targets, into the file's path in code type."""
    import nbformat

    nb = nbformat.read(str(src), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            cell.source = _REPO_LINK.sub(lambda m: f"{m.group(1)} (`{m.group(3)}`)"
                                         if m.group(1).strip("`") != m.group(3) else f"`{m.group(3)}`", cell.source)
    nbformat.write(nb, str(dest))


def _publish_paths(path: Path, roots) -> None:
    """Rewrite the build machine's absolute paths in an executed notebook as paths relative to the folder they lie
    in (the repository, the runs, the book's output, the data cache), so no published page prints them: papermill's
    injected-parameters cell, printed output and saved widget state alike. Longest roots first, so a root inside
    another wins."""
    text = path.read_text()
    for root in sorted({str(Path(r).resolve()) for r in roots if r}, key=len, reverse=True):
        if len(Path(root).parts) < 3:  # never "/" or "/tmp" alone: that would rewrite unrelated text
            continue
        text = text.replace(root + "/", "")
        text = re.sub(re.escape(root) + r"(?![\w.-])", ".", text)  # the root itself, e.g. repo_root = "."
    path.write_text(text)


def _stage_toc(toc: dict, available: set[str]) -> tuple[dict, list[str]]:
    """Fit the TOC to what was produced: drop entries without an executed notebook (a paper notebook not written
    yet) and add produced ``papers/<name>`` pages the TOC does not list after its last paper. Returns the TOC and the
    dropped entries."""
    dropped, listed = [], set()

    def keep(entries):
        out = []
        for e in entries:
            if "file" in e:
                listed.add(e["file"])
                if e["file"] not in available:
                    dropped.append(e["file"])
                    continue
            if "sections" in e:
                e = {**e, "sections": keep(e["sections"])}
            out.append(e)
        return out

    toc = dict(toc)
    parts = toc.get("parts") or [{"chapters": toc.get("chapters", [])}]
    parts = [{**p, "chapters": keep(p.get("chapters", []))} for p in parts]
    extra = [{"file": f} for f in sorted(available - listed) if f.startswith("papers/")]
    if extra:
        home = next((p for p in parts if any(c.get("file", "").startswith("papers/") for c in p["chapters"])), None)
        if home is None:
            home = {"caption": "The papers", "chapters": []}
            parts.insert(min(1, len(parts)), home)
        home["chapters"].extend(extra)
    parts = [p for p in parts if p["chapters"]]
    if "parts" in toc:
        toc["parts"] = parts
    else:
        toc["chapters"] = parts[0]["chapters"] if parts else []
    return toc, dropped


def _finished_status(run: Run, log, stale_note: str) -> dict:
    """A run's status for a book that does not execute it: ``skipped`` (finished, reused) or ``missing``, and
    ``stale`` when it finished for another notebook source or thread count (said in the log, with ``stale_note``)."""
    st = run_status(run) or asdict(run)
    ok = st.get("status") == "ok" and Path(run.output).is_file()
    stale = ok and not is_done(run)
    if stale:
        log(f"  {run.key}: the notebook or --threads changed since this run finished; {stale_note}")
    return {**asdict(run), **st, "status": "skipped" if ok else "missing", "stale": stale}


def _default_grids(grid, smoke: bool, notebooks) -> list[dict]:
    """The book's runs when no selection was given: the smoke grid, the grid file, or every notebook's defaults."""
    if smoke:
        return [{"notebooks": notebooks or "all", "params": ["smoke"], "categories": [None], "seeds": [None]}]
    if grid is not None or DEFAULT_GRID.is_file():
        return [{**g, "notebooks": notebooks} if notebooks else g for g in load_grid(grid or DEFAULT_GRID)]
    return [{"notebooks": notebooks or "all", "params": ["default"], "categories": [None], "seeds": [None]}]


def build_book(*, grid=None, grids=None, sets=(), budget_grid=BUDGET_GRID, smoke: bool = False, notebooks=None,
               jobs: int = 1, executor=None, threads: int = 1, force: bool = False, runs_dir="runs",
               book_dir=BOOK_DIR, out_dir=None, timeout: float | None = None,
               run: bool = True, build: bool = True, chapters=BOOK_CHAPTERS, progress: bool = True,
               log=print) -> dict:
    """Run the grid, execute the book's chapters over its results, and build the HTML with Jupyter Book.

    Args:
        grid: grid file (default ``notebooks/params/grid.yaml``, else every notebook with its defaults).
        grids: grids already read (``python -m adcore book``'s selection flags); they replace ``grid``, ``smoke``
            and ``notebooks``.
        sets: ``--set`` values (:func:`adcore.runs.plan.parse_sets`), applied to every run.
        budget_grid: the budget chapter's grid file (``None``: no budget runs). Its runs are never executed here
            (``python -m adcore run --grid <it>`` does that); the chapter shows the finished ones and lists the rest.
        smoke: every notebook with its ``smoke`` parameter file instead (the CI-sized book).
        notebooks: restrict to these notebooks.
        jobs, executor, threads: how the paper notebooks run (see :func:`adcore.runs.execute.execute_runs`); the
            chapters always run here, one at a time.
        runs_dir: where runs live (finished ones are reused).
        book_dir: the book's sources (``_config.yml``, ``_toc.yml``, ``intro.md``, ``chapters/*.ipynb``).
        out_dir: where ``_build/src`` (staged sources) and ``_build/html`` go; default ``book_dir``.
        run: execute the paper notebooks (False: only reuse finished runs).
        build: call ``jupyter-book build``.
        chapters: which of the book's own chapters to include (a smaller book for tests).

    Returns:
        dict(html=index.html path, statuses=[...], failed=[...], seconds=...).
    """
    t0 = time.time()
    book_dir = Path(book_dir)
    out_dir = Path(out_dir or book_dir)
    stage = out_dir / "_build" / "src"
    nb_dir = Path(notebooks[0]).parent if notebooks and str(notebooks[0]).endswith(".ipynb") else NOTEBOOKS_DIR
    if grids is None:
        grids = _default_grids(grid, smoke, notebooks)
    runs = plan_grids(grids, runs_dir=runs_dir, notebooks_dir=nb_dir, threads=threads, sets=sets)
    budget_runs = []
    if budget_grid is not None and Path(budget_grid).is_file():  # never run here: listed, and shown where finished
        budget_grids = load_grid(budget_grid)
        budget_grids = [{**g, "notebooks": notebooks} if notebooks else g for g in budget_grids]
        budget_runs = plan_grids(budget_grids, runs_dir=runs_dir, notebooks_dir=nb_dir, threads=threads)
    unknown = [c for c in chapters if c not in BOOK_CHAPTERS]
    if unknown:
        raise ValueError(f"unknown chapter(s) {unknown}; the book's chapters are {list(BOOK_CHAPTERS)}")
    chapter_src = {c: book_dir / "chapters" / f"{c}.ipynb" for c in chapters}
    chapter_src = {c: p for c, p in chapter_src.items() if p.is_file()}
    for c, p in chapter_src.items():
        parse_parameters(p)  # a chapter without a parameters cell fails here, before any run
    for name in ("_config.yml", "_toc.yml"):
        if not (book_dir / name).is_file():
            raise ValueError(f"book sources {str(book_dir)!r} lack {name}")
    if build:
        fetch_widget_js(book_dir / "_static" / "vendor")  # needs npm: fail before the runs, not after
    log(f"{len(runs)} notebook run(s) planned: {', '.join(r.key for r in runs)}")
    if run and len(runs) > 1:
        expected = [expected_seconds(r) for r in runs]
        log("they start longest expected first: " + ", ".join(
            f"{runs[i].name} {expected[i][0]:.0f} s ({expected[i][1]})" for i in start_order(runs)))

    if run:
        statuses = execute_runs(runs, jobs=jobs, executor=executor, force=force, timeout=timeout, progress=progress,
                                log=log)
    else:
        # rebuild from what finished, even where the notebook has changed since (said so, not hidden)
        statuses = [_finished_status(r, log, "using the older run (--no-run)") for r in runs]
        missing = [s["key"] for s in statuses if s["status"] == "missing"]
        if missing:
            raise RuntimeError(f"--no-run, but these runs have not finished: {missing}")

    # stage the sources: config, intro, vendored JS, the first run of each notebook, then the chapters
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    for name in ("_config.yml", "intro.md", "references.bib", "logo.png"):
        if (book_dir / name).is_file():
            shutil.copy2(book_dir / name, stage / name)
    if (book_dir / "_static").is_dir() and any(p.name != "vendor" for p in (book_dir / "_static").iterdir()):
        shutil.copytree(book_dir / "_static", stage / "_static", ignore=shutil.ignore_patterns("vendor"))
    # Through html_extra_path (see _config.yml), not html_static_path: Jupyter Book adds every .js file found in the
    # static paths to every page, which would load the widget manager twice (three viewers on screen) and on pages
    # without widgets. myst-nb's nb_ipywidgets_js adds it where a page has widgets.
    if (book_dir / "_static" / "vendor").is_dir():
        shutil.copytree(book_dir / "_static" / "vendor", stage / "_vendor" / "_static" / "vendor-js")
    (stage / "papers").mkdir()
    produced = {"intro"}
    seen = set()
    for st in statuses:
        if st["name"] in seen or not Path(st["output"]).is_file():
            continue
        seen.add(st["name"])
        _stage_notebook(Path(st["output"]), stage / "papers" / f"{st['name']}.ipynb")
        produced.add(f"papers/{st['name']}")
    manifest = write_manifest(statuses, stage / "runs.json")
    budget_statuses = [_finished_status(r, log, "shown all the same (the budget chapter names it)")
                       for r in budget_runs]
    budget_manifest = write_manifest(budget_statuses, stage / "budget-runs.json")
    if budget_runs:
        done = sum(s["status"] == "skipped" for s in budget_statuses)
        log(f"budget grid: {done} of {len(budget_runs)} runs finished" + (
            "" if done == len(budget_runs) else f"; run the rest with `python -m adcore run --grid {budget_grid} "
                                                "--jobs 2`, then build the book again"))

    (stage / "chapters").mkdir()
    chapter_runs = []
    for c, p in chapter_src.items():
        defaults = parse_parameters(p)
        injected = {k: v for k, v in {"manifest": str(manifest.resolve()), "repo_root": str(REPO),
                                      "budget_manifest": str(budget_manifest.resolve()),
                                      "budget_grid": str(budget_grid)}.items() if k in defaults}
        chapter_runs.append(Run(notebook=str(p.resolve()), name=c, params_name="chapter", params=injected,
                                key=f"chapter-{c}", run_dir=str((out_dir / "_build" / "chapter-runs" / c).resolve()),
                                output=str((stage / "chapters" / f"{c}.ipynb").resolve()), notebook_sha=_sha(p)))
    chapter_statuses = execute_runs(chapter_runs, jobs=1, force=True, timeout=timeout, progress=progress, log=log)
    for c, st in zip(chapter_src, chapter_statuses):
        if Path(st["output"]).is_file():
            produced.add(f"chapters/{c}")
    build_roots = (REPO, Path(runs_dir).resolve().parent, out_dir, default_cache_dir())
    for page in list((stage / "papers").glob("*.ipynb")) + list((stage / "chapters").glob("*.ipynb")):
        _publish_paths(page, build_roots)

    toc, dropped = _stage_toc(yaml.safe_load((book_dir / "_toc.yml").read_text()), produced)
    if dropped:
        log(f"not in this book (no executed notebook): {', '.join(dropped)}")
        # links to the left-out pages become plain text (a missing target is a warning, and warnings fail the build)
        for md_file in stage.glob("*.md"):
            text = re.sub(r"\[([^\]]+)\]\(((?:chapters|papers)/\w+)\)",
                          lambda m: m.group(0) if m.group(2) in produced else m.group(1), md_file.read_text())
            md_file.write_text(text)
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))

    html = None
    if build:
        cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())", "build",
               str(stage), "--path-output", str(out_dir), "-W", "-n", "--keep-going"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = (proc.stdout + proc.stderr).splitlines()
            problems = [ln for ln in lines if "WARNING" in ln or "ERROR" in ln or "Error" in ln] or lines[-30:]
            raise RuntimeError(f"jupyter-book build failed (exit {proc.returncode}), warnings are errors:\n"
                               + "\n".join(problems[:40]))
        html = (out_dir / "_build" / "html" / "index.html").resolve()
        _place_widget_fonts(html.parent, stage / "_vendor" / "_static" / "vendor-js" / "html-manager")
    all_statuses = statuses + chapter_statuses
    failed = [s for s in all_statuses if s["status"] == "failed"]
    return {"html": html, "statuses": all_statuses, "failed": failed, "seconds": round(time.time() - t0, 1),
            "stage": stage}


def environment_info(repo_root=".") -> dict:
    """Versions, hardware and the git commit, for the reproducibility appendix."""
    import importlib.metadata as md
    import platform

    info = {"python": platform.python_version(), "platform": platform.platform(), "CPU cores": os.cpu_count()}
    try:
        import torch

        info["GPU"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU only)"
    except ImportError:
        info["GPU"] = "unknown (torch not importable)"
    for pkg in ("adcore", "torch", "torchvision", "triton", "timm", "numpy", "scipy", "scikit-learn", "scikit-image",
                "pandas", "matplotlib", "papermill", "jupyter-book", "myst-nb", "ipywidgets"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = "not installed"
    git = ["git", "-C", str(repo_root)]
    head = subprocess.run(git + ["rev-parse", "--short=12", "HEAD"], capture_output=True, text=True)
    info["git commit"] = head.stdout.strip() if head.returncode == 0 else "none (no commit yet)"
    dirty = subprocess.run(git + ["status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
    if head.returncode == 0 and dirty.returncode == 0:
        info["git commit"] += " (with uncommitted changes)" if dirty.stdout.strip() else ""
    versions = Path(repo_root) / BOOK_DIR / "_static" / "vendor" / "VERSIONS"
    if versions.is_file():
        info["widget JavaScript"] = ", ".join(versions.read_text().split("\n")).strip(", ")
    return info


