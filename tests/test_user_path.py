"""A user's whole path on a dataset of their own, as the README prints it: the papers' settings pointed at a folder
in MVTec AD's layout from the command line, every notebook shortened to one epoch per stage, then the book of
exactly those runs, whose comparison page holds one table, categories down and methods across."""
import ast
import re
import shlex
import shutil
from pathlib import Path

import pytest

from adcore.__main__ import main
from adcore.runs import collect, plan

REPO = Path(__file__).resolve().parent.parent
CATEGORIES = ("bottle", "carpet")
# One epoch per stage, a small size, CPU: the shortest run of every paper config (ADViT and VT-ADL then see 1 patch of
# 64 px, AnoViT 16 of 16 px).
SHORT = ["image_size=64", "num_epochs=1", "amplify_epochs=1", "distill_epochs=1", "batch_size=4", "device=cpu",
         "num_threads=1"]
# Narrow heads on top, for the end-to-end runs only: the layering and the book are under test, not the paper widths,
# whose checkpoints would write gigabytes (the paper-shape tests train those).
NARROW = ["embed_dim=32", "depth=1", "num_heads=2", "num_components=3", "latent_dim=64", "decoder_width=16",
          "num_codes=16", "offset_width=4", "ocbe_width=16", "bottleneck_dim=256", "ocbe_blocks=1",
          "decoder_blocks=[1, 1, 1]", "decoder_ratio=0.25"]


def _user_args(fake_mvtec, weights):
    return ["--params", "paper", "--set", *SHORT, *NARROW, f"weights_path={weights}", "--data-root", str(fake_mvtec),
            "--categories", *CATEGORIES]


@pytest.fixture(scope="module")
def user_tree(fake_mvtec_factory):
    """The two categories the user runs, with few images: twelve notebook runs train on it."""
    return fake_mvtec_factory(CATEGORIES, image_size=64, n_train=4, n_test=2)


@pytest.fixture(scope="module")
def user_book(user_tree, fake_wrn_weights, tmp_path_factory):
    """1. ``run`` with the user's flags; 2. ``book`` with the same flags over those runs (it runs none again)."""
    tmp = tmp_path_factory.mktemp("user")
    runs_dir = tmp / "runs"
    args = _user_args(user_tree, fake_wrn_weights)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        assert main(["run", *args, "--runs-dir", str(runs_dir), "--jobs", "2", "--no-progress"]) == 0
        for ckpt in runs_dir.glob("*/*/checkpoints"):  # resume is tested elsewhere; pytest keeps three sessions
            shutil.rmtree(ckpt)
        assert main(["book", *args, "--runs-dir", str(runs_dir), "--out", str(tmp / "book"), "--no-progress",
                     "--no-run", "--chapters", "data", "comparison", "reproducibility"]) == 0
    return tmp


@pytest.mark.notebook
def test_papers_settings_on_a_users_mvtec_folder_make_one_table(user_book):
    html = (user_book / "book" / "_build" / "html" / "chapters" / "comparison.html").read_text()
    assert "mvtec, parameters <code" in html and "2 of 15 categories" in html
    tables = re.findall(r"<table.*?</table>", html, re.S)
    main_tables = [t for t in tables if "I-AUROC" in t]
    assert len(main_tables) == 1  # one (dataset, parameter set): one table, whatever the number of runs
    table = main_tables[0]
    for row in (*CATEGORIES, "mean", "textures mean", "objects mean"):
        assert re.search(rf">\s*{row}\s*<", table), row
    for method in ("vt_adl", "advit", "anovit", "dmad", "aand", "knn", "center_prior"):
        assert table.count(f">{method}<") == 1, method  # one column group per method, not one per run
    assert "(paper)" in table  # VT-ADL's per-category numbers beside ours


@pytest.mark.notebook
def test_the_appendix_reproduces_each_run_with_the_users_folder(user_book, user_tree, capsys):
    manifest = collect.load_manifest(user_book / "runs" / "manifest.json")
    assert len(manifest) == 12 and all(r["status"] in ("ok", "skipped") for r in manifest)
    for run in manifest:
        cmd = collect.reproduce_command(run, repo_root=REPO)
        assert f"data_root={user_tree}" in cmd
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(REPO)
            assert main([*shlex.split(cmd)[3:], "--dry-run"]) == 0
        assert f"  {run['key']}  " in capsys.readouterr().out  # the command plans the very same run
    dmad = [r for r in collect.collect_results(manifest) if r["notebook"] == "dmad"]
    assert dmad and all(r.get("pixel_from") == "dmad-px" for r in dmad)  # pixel columns from DMAD's pixel model
    sizes = {r["method"]: r.get("image_size") for r in collect.collect_results(manifest)}
    assert set(sizes.values()) == {64}, sizes


def test_a_folder_of_ones_own_runs_with_set_dataset(user_tree, fake_wrn_weights, tmp_path, capsys, monkeypatch):
    """A folder in MVTec AD's layout that is not MVTec AD (its own category names): every paper config plans on it,
    and the baselines run on it for real, their results naming the folder."""

    folder = tmp_path / "my_parts"
    for src, name in zip(CATEGORIES, ("widget", "gasket")):
        shutil.copytree(user_tree / src, folder / name)
    monkeypatch.chdir(REPO)
    flags = ["--params", "paper", "--set", *SHORT, f"weights_path={fake_wrn_weights}", f"dataset={folder}",
             "--runs-dir", str(tmp_path / "runs")]
    assert main(["run", *flags, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^6 run\(s\):", out, re.M) and out.count(f"'dataset': '{folder}'") == 6
    # the baselines train nothing, so the epoch keys would reach no selected notebook: an error, by design
    assert main(["run", "baselines", *flags, "--categories", "gasket", "--no-progress"]) == 2
    assert "no selected notebook has a parameter 'num_epochs'" in capsys.readouterr().err
    assert main(["run", "baselines", "--params", "paper", "--set", "image_size=64", "device=cpu",
                 f"weights_path={fake_wrn_weights}", f"dataset={folder}", "--runs-dir", str(tmp_path / "runs"),
                 "--categories", "gasket", "--no-progress"]) == 0
    results = collect.collect_results(collect.load_manifest(tmp_path / "runs" / "manifest.json"))
    assert {(r["method"], r["category"]) for r in results} == {("knn", "gasket"), ("center_prior", "gasket")}
    assert all(r["params"]["dataset"] == str(folder) and r["image_size"] == 64 for r in results)


def test_a_paper_config_without_data_root_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["run", "dmad", "--params", "paper", "--runs-dir", str(tmp_path), "--dry-run"]) == 2
    assert "--data-root" in capsys.readouterr().err


def test_missing_backbone_weights_stop_the_plan(fake_mvtec_tree, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert main(["run", "aand", "--params", "paper", "--data-root", str(fake_mvtec_tree), "--set",
                 f"weights_path={tmp_path / 'nope.pth'}", "--runs-dir", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "nope.pth" in err and "does not exist" in err


def test_set_layers_over_parameter_files_and_a_stray_key_is_an_error(fake_mvtec_tree, fake_wrn_weights, tmp_path,
                                                                     monkeypatch):
    monkeypatch.chdir(REPO)
    mine = tmp_path / "my-mvtec.yaml"
    mine.write_text(f"data_root: {fake_mvtec_tree}\nbatch_size: 2\n")
    nbs = plan.resolve_notebooks(["dmad", "aand"])
    sets = plan.parse_sets([f"weights_path={fake_wrn_weights}", "dmad.batch_size=3", "lr=1e-3"])
    runs = plan.plan_runs(nbs, [f"paper+{mine}"], runs_dir=tmp_path, sets=sets)
    by = {r.name: r for r in runs}
    assert by["dmad"].params["batch_size"] == 3 and by["aand"].params["batch_size"] == 2  # --set after the files
    assert by["dmad"].params["lr"] == by["aand"].params["lr"] == 1e-3  # YAML's 1e-3 (no dot) read as a number
    assert by["dmad"].params["data_root"] == str(fake_mvtec_tree) and by["dmad"].params_name == "paper+my-mvtec"
    assert by["dmad"].params["num_epochs"] == 400  # the paper file, under the user's file
    # a list stays one run per entry; a key no selected notebook has is an error, as is a notebook not selected
    assert len(plan.plan_runs(nbs, ["paper", "smoke"], runs_dir=tmp_path, sets=sets, check_data=False)) == 4
    with pytest.raises(plan.ParameterError, match="no selected notebook has a parameter 'num_epoch'"):
        plan.plan_runs(nbs, ["smoke"], runs_dir=tmp_path, sets=plan.parse_sets(["num_epoch=1"]))
    with pytest.raises(plan.ParameterError, match="not selected"):
        plan.plan_runs(nbs, ["smoke"], runs_dir=tmp_path, sets=plan.parse_sets(["vt_adl.num_epochs=1"]))


def test_the_run_key_covers_every_layer_and_the_weights_file(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    nbs = plan.resolve_notebooks(["dmad"])
    weights = tmp_path / "a.pth"
    weights.write_bytes(b"weights")  # the plan only finds and hashes the file

    def key(*sets, weights=weights):
        return plan.plan_runs(nbs, ["smoke"], runs_dir=tmp_path, sets=plan.parse_sets(
            [f"weights_path={weights}", "backbone=wide_resnet50_2", *sets]))[0].key

    base = key()
    assert key() == base and key("num_epochs=2") != base
    other = tmp_path / "b.pth"
    other.write_bytes(b"weightz")
    assert key(weights=other) != base


def test_the_run_key_covers_the_embedded_benchmarks_version(tmp_path, monkeypatch):
    from adcore.data import textures

    monkeypatch.chdir(REPO)
    nbs = plan.resolve_notebooks(["baselines"])

    def key():
        return plan.plan_runs(nbs, ["smoke"], runs_dir=tmp_path, check_data=False)[0].key

    assert plan.plan_runs(nbs, ["smoke"], runs_dir=tmp_path, check_data=False)[0].resolved["dataset"] == "textures"
    base = key()
    monkeypatch.setattr(textures, "VERSION", textures.VERSION + 1)
    assert key() != base


def _printed_commands() -> list[tuple[str, str]]:
    """(where, command) for every `python -m adcore run|book` and `papermill` line the README, the intro and the data
    chapter print for a dataset on disk (a line naming /data/...), with its backslash continuations joined."""
    import nbformat

    sources = {"README.md": (REPO / "README.md").read_text(), "book/intro.md": (REPO / "book" / "intro.md").read_text()}
    data = nbformat.read(str(REPO / "book" / "chapters" / "data.ipynb"), as_version=4)
    sources["book/chapters/data.ipynb"] = "\n".join(c.source for c in data.cells if c.cell_type == "markdown")
    found = []
    for where, text in sources.items():
        for block in re.findall(r"```bash\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = line.split("  #")[0].strip()
                if re.match(r"(python -m adcore (run|book)|papermill) ", line) and "/data/" in line:
                    found.append((where, line))
    return found


def test_the_docs_print_commands_for_a_users_dataset():
    wheres = {w for w, _ in COMMANDS}
    assert wheres == {"README.md", "book/intro.md", "book/chapters/data.ipynb"}, wheres


COMMANDS = _printed_commands()


@pytest.mark.parametrize("where,command", COMMANDS,
                         ids=[f"{w.split('/')[-1]}-{i}" for i, (w, _) in enumerate(COMMANDS)])
def test_every_printed_command_for_a_users_dataset_runs_as_printed(where, command, fake_mvtec_tree, fake_wrn_weights,
                                                                   tmp_path, monkeypatch, capsys):
    """Placeholders become the fake tree (MVTec AD's layout, so it stands for MVTec AD and for a folder of one's own);
    a run is planned and listed (``--dry-run``), a papermill command prepared and its parameters checked as the
    notebook's first cell checks them. The paper configs find their WideResNet-50-2 in the torch hub cache."""
    import nbformat
    from papermill.cli import papermill as papermill_cli

    from adcore.runs.params import parse_parameters, validate_parameters

    (tmp_path / "my-site.yaml").write_text("batch_size: 2\n")
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "wide_resnet50_2-95faca4d.pth").symlink_to(fake_wrn_weights)
    subs = {"/data/mvtec_anomaly_detection": str(fake_mvtec_tree), "/data/my_parts": str(fake_mvtec_tree),
            "/shared/adcore-runs": str(tmp_path / "runs"), "my-site.yaml": str(tmp_path / "my-site.yaml"),
            "out.ipynb": str(tmp_path / "out.ipynb")}
    for a, b in subs.items():
        command = command.replace(a, b)
    args = shlex.split(command)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(REPO)
    if args[0] == "papermill":
        papermill_cli.main([*args[1:], "--prepare-only"], standalone_mode=False)
        nb = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4)
        injected = next(c.source for c in nb.cells if "injected-parameters" in c.metadata.get("tags", []))
        values = {a.targets[0].id: ast.literal_eval(a.value) for a in ast.parse(injected).body}
        validate_parameters(parse_parameters(REPO / args[1]), values)  # as the notebook's check_parameters does
        return
    args = args[3:] + ([] if "--dry-run" in args else ["--dry-run"])
    args += [] if "--runs-dir" in args else ["--runs-dir", str(tmp_path / "runs")]
    assert main(args) == 0, f"{where}: {command}\n{capsys.readouterr().err}"
    assert re.search(r"^\d+ run\(s\):", capsys.readouterr().out, re.M)
