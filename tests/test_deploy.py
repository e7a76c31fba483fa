"""From notebook to inspection line: the model file, the threshold, ``python -m adcore train/predict/export``.

The whole user path runs once on ``textures`` (``test_user_path_*``, sharing one trained kNN model): train on a
folder of good images → load in a fresh process → predict on a folder mixing good, anomalous and broken files →
export to ONNX → onnxruntime agrees with the torch path on the whole test split.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import adcore
from adcore.artifact import ArtifactError, load_plain
from adcore.deploy.postprocess import Postprocess, ScoringGraph
from adcore.deploy.threshold import conformal_rank, fit_threshold, quantile_threshold
from adcore.evaluation import _postprocess

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _cli(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "adcore", *map(str, args)], cwd=cwd, env=ENV, capture_output=True,
                         text=True, timeout=600)
    if check and out.returncode != 0:
        raise AssertionError(f"adcore {args[0]} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


# ----------------------------------------------------------------------------------------------- post-processing

@pytest.mark.parametrize("h, size", [(16, 128), (32, 256), (8, 8), (5, 5), (3, 20), (128, 128)])
def test_postprocess_module_matches_scipy(h, size):
    # maps smaller than the kernel radius (16) make the reflection wrap several times
    amap = torch.from_numpy(np.random.default_rng(h).standard_normal((2, h, h)).astype(np.float32))
    ref = _postprocess(amap, (size, size), 4.0)
    out = Postprocess((size, size), 4.0)(amap).numpy()
    assert out.shape == ref.shape == (2, size, size)
    assert np.abs(out - ref).max() <= 1e-5 * (ref.max() - ref.min())


def test_postprocess_without_smoothing_is_the_bilinear_upsample():
    amap = torch.rand(1, 4, 4)
    assert np.allclose(Postprocess((16, 16), 0)(amap).numpy(), _postprocess(amap, (16, 16), 0), atol=1e-7)


# ----------------------------------------------------------------------------------------------- threshold

def test_threshold_is_the_conformal_order_statistic():
    scores = np.arange(1, 200, dtype=float)[::-1]  # 199 scores, 1..199, unsorted
    t = fit_threshold(scores, scores, scores - 1, fpr=0.01)
    assert conformal_rank(199, 0.01) == 198 and t["value"] == 198.0 and t["pixel_value"] == 198.0
    assert t["n_holdout"] == 199 and t["target_fpr"] == 0.01 and t["achievable_fpr"] <= 0.01
    assert t["holdout_scores"] == sorted(scores.tolist()) and t["holdout_summary"]["max"] == 199.0
    # too few images for 1 %: the largest score, and the record says what rate that backs
    t = fit_threshold([3.0, 1.0, 2.0], [3.0, 1.0, 2.0], [0, 0, 0], fpr=0.01)
    assert t["value"] == 3.0 and t["achievable_fpr"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="false-positive rate"):
        fit_threshold([1.0], [1.0], [0.0], fpr=0)
    with pytest.raises(ValueError, match="NaN"):
        fit_threshold([1.0, float("nan")], [1.0, 1.0], [0.0, 0.0])


def test_threshold_keeps_its_false_positive_rate_on_exchangeable_scores():
    # the guarantee: E[FPR] <= target for any score distribution, when new good images are like the held-out ones
    rng = np.random.default_rng(0)
    fprs = [(rng.gamma(2.0, size=5000) > quantile_threshold(rng.gamma(2.0, size=299), 0.05)).mean()
            for _ in range(400)]
    assert 0.035 < np.mean(fprs) <= 0.05 + 0.003


# ----------------------------------------------------------------------------------------------- model file safety

class _Payload:
    """Unpickling this creates ``path``: the stand-in for arbitrary code in a shared file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.makedirs, (self.path,)


def _malicious(path: Path, marker: Path, base: dict) -> None:
    torch.save({**base, "extra": _Payload(marker)}, path)
    with open(path, "rb") as f:  # prove the payload is live: an unsafe load runs it
        torch.load(f, weights_only=False)
    assert marker.exists()
    marker.rmdir()


def test_a_model_file_with_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    _malicious(tmp_path / "evil.pt", marker, {"format": "adcore-model"})
    with pytest.raises(ArtifactError, match="refused to load model file .*Nothing in it was run"):
        adcore.load(tmp_path / "evil.pt")
    assert not marker.exists()


class _Toy(adcore.AnomalyModel):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(3, 3, 1)

    def training_step(self, images, stage):
        return {"loss": (self.net(images) - images).pow(2).mean()}


class _Images(torch.utils.data.Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        return {"image": torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(i))}


def test_a_training_checkpoint_with_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"
    (tmp_path / "ckpt").mkdir()
    _malicious(tmp_path / "ckpt" / "last.pt", marker, {"model_name": None, "stage_index": 0, "next_epoch": 1})
    with pytest.raises(ArtifactError, match="refused to load checkpoint"):
        adcore.fit(_Toy(), _Images(), num_epochs=2, lr=1e-2, batch_size=4, checkpoint_dir=tmp_path / "ckpt",
                   resume=True, progress=False)
    assert not marker.exists()


def test_checkpoints_load_without_unpickling_and_restore_numpy_rng(tmp_path):
    from adcore.training import _rng_state, _set_rng_state

    adcore.fit(_Toy(), _Images(), num_epochs=1, lr=1e-2, batch_size=4, checkpoint_dir=tmp_path, progress=False)
    state = load_plain(tmp_path / "last.pt", "checkpoint")  # weights_only=True
    np.random.seed(3)
    np.random.rand(7)
    saved = _rng_state()
    expected = np.random.rand(5)
    np.random.rand(11)
    _set_rng_state({**state["rng"], "numpy": saved["numpy"]})
    assert np.array_equal(np.random.rand(5), expected)


@pytest.fixture(scope="module")
def tiny_model_file(tmp_path_factory):
    torch.manual_seed(0)
    model = adcore.create_model("anovit", image_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2)
    path = tmp_path_factory.mktemp("tiny") / "tiny.pt"
    adcore.save(model.eval(), path, image_size=32, threshold=fit_threshold([1.0, 2.0], [1.0, 2.0], [0.0, 0.0]))
    return model, path


def test_save_load_round_trip_scores_exactly(tiny_model_file):
    model, path = tiny_model_file
    loaded = adcore.load(path)
    assert loaded.artifact["model_name"] == "anovit" and loaded.artifact["preprocessing"]["image_size"] == 32
    assert loaded.artifact["threshold"]["value"] == 2.0
    images = torch.rand(2, 3, 32, 32)
    a, b = model.predict(images), loaded.predict(images)
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.pred_score, b.pred_score)


def _rewrite(src: Path, dst: Path, **changes) -> None:
    obj = torch.load(src, weights_only=True)
    obj.update(changes)
    torch.save(obj, dst)


def test_a_file_from_another_adcore_version_is_refused(tiny_model_file, tmp_path):
    _rewrite(tiny_model_file[1], tmp_path / "old.pt", adcore_version="0.0.1")
    with pytest.raises(ArtifactError, match=r"written by adcore 0\.0\.1 .*this is adcore"):
        adcore.load(tmp_path / "old.pt")


def test_damaged_files_are_refused(tiny_model_file, tmp_path):
    data = tiny_model_file[1].read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="damaged"):
        adcore.load(tmp_path / "cut.pt")
    # a changed weight: the archive still parses, the checksum does not match
    obj = torch.load(tiny_model_file[1], weights_only=True)
    key = next(k for k, v in obj["state_dict"].items() if v.is_floating_point() and v.numel() > 10)
    obj["state_dict"][key].view(-1)[3] += 1e-3
    torch.save(obj, tmp_path / "changed.pt")
    with pytest.raises(ArtifactError, match="damaged: its contents do not match their checksum"):
        adcore.load(tmp_path / "changed.pt")
    (tmp_path / "text.pt").write_text("not a model")
    with pytest.raises(ArtifactError, match="damaged or not a torch archive"):
        adcore.load(tmp_path / "text.pt")
    torch.save({"model": {}}, tmp_path / "ckpt.pt")
    with pytest.raises(ArtifactError, match="not an adcore model file"):
        adcore.load(tmp_path / "ckpt.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adcore.load(tmp_path / "missing.pt")


def test_save_refuses_non_plain_metadata_and_unknown_models(tiny_model_file, tmp_path):
    model = tiny_model_file[0]
    with pytest.raises(TypeError, match="plain data"):
        adcore.save(model, tmp_path / "x.pt", image_size=32, training={"when": object()})
    with pytest.raises(TypeError, match="adcore.create_model"):
        adcore.save(torch.nn.Linear(2, 2), tmp_path / "y.pt", image_size=32)


def test_a_model_that_cannot_export_says_why(tmp_path):
    from adcore.deploy.export import ExportError, export_model
    from adcore.types import AnomalyModel, AnomalyOutput

    class DataDependent(AnomalyModel):
        def predict(self, images):
            amap = images.mean(1)
            if amap.mean() > 0.5:  # Python control flow on tensor values cannot become one graph
                amap = amap * 2
            return AnomalyOutput(amap.flatten(1).amax(1), amap)

    meta = {"model_name": "data_dependent", "preprocessing": {"image_size": 16, "sigma": 4.0}}
    with pytest.raises(ExportError, match="'data_dependent' cannot be exported to ONNX"):
        export_model(DataDependent(), tmp_path / "m.onnx", meta)
    assert not (tmp_path / "m.onnx").exists()


# ----------------------------------------------------------------------------------------------- the user path

@pytest.fixture(scope="module")
def user_path(tmp_path_factory):
    """A kNN model trained by the CLI on a plain folder of ``textures`` brick good images, and a mixed test folder."""
    base = tmp_path_factory.mktemp("user")
    test = adcore.load_dataset("textures", "brick", "test", image_size=128)
    train = adcore.load_dataset("textures", "brick", "train", image_size=128)
    good = base / "good_parts"
    good.mkdir()
    for p in train.paths:
        shutil.copy(p, good / Path(p).name)
    mixed = base / "new_parts"
    (mixed / "line2").mkdir(parents=True)
    picks = {"good": [0, 1], "hole": [0], "blotch": [0]}
    for i, (path, defect) in enumerate(zip(test.paths, test.defects)):
        if picks.get(defect) and int(Path(path).stem) in picks[defect]:
            shutil.copy(path, mixed / f"{defect}_{Path(path).name}")
    Image.open(mixed / "good_000.png").convert("RGB").resize((200, 150)).save(mixed / "line2" / "colour_small.jpg")
    Image.open(mixed / "hole_000.png").convert("RGB").save(mixed / "line2" / "rgb_copy.png")  # training was grey
    data = (mixed / "good_001.png").read_bytes()
    (mixed / "truncated.png").write_bytes(data[: len(data) // 3])
    (mixed / "fake.png").write_text("this is not an image")
    (mixed / "notes.txt").write_text("shift 2, line 3")
    model = base / "model.pt"
    out = _cli("train", "knn", "--data", good, "--out", model, "--no-progress", cwd=base)
    assert "threshold" in out.stdout and "held-out good images" in out.stdout
    return {"base": base, "model": model, "mixed": mixed, "test": test, "n_train_files": len(train)}


def test_user_path_train_writes_a_complete_model_file(user_path):
    meta = adcore.artifact.read(user_path["model"])
    assert meta["model_name"] == "knn" and meta["adcore_version"] == adcore.__version__
    assert meta["recipe"]["which"] == "default" and meta["preprocessing"]["image_size"] == 128
    t, tr = meta["threshold"], meta["training"]
    assert t["target_fpr"] == 0.01 and t["n_holdout"] == tr["n_holdout"] == len(t["holdout_scores"]) == 16
    assert tr["n_train"] + tr["n_holdout"] == user_path["n_train_files"]
    assert t["value"] == max(t["holdout_scores"]) and t["achievable_fpr"] == pytest.approx(1 / 17)
    assert not (user_path["base"] / "model.pt.train").exists()  # the checkpoint folder is gone once the file is written


def test_user_path_load_in_a_fresh_process_reproduces_the_scores_exactly(user_path):
    # this process did not train the model: the held-out scores stored at training time must come back bit for bit
    model = adcore.load(user_path["model"])
    meta = model.artifact
    images = torch.stack([torch.from_numpy(adcore.data.folder.read_image(p, 128).transpose(2, 0, 1).copy()).float() / 255
                          for p in meta["training"]["holdout_paths"]])
    scores, _ = ScoringGraph(model, 128)(images)
    assert sorted(scores.double().tolist()) == meta["threshold"]["holdout_scores"]


def test_user_path_predict_writes_rows_pngs_and_error_rows(user_path):
    base, mixed = user_path["base"], user_path["mixed"]
    out = _cli("predict", user_path["model"], mixed, "--out", base / "pred", "--masks", "--batch-size", "3",
               "--no-progress", cwd=base)
    rows = list(csv.DictReader(open(base / "pred" / "predictions.csv", newline="")))
    by_name = {Path(r["path"]).name: r for r in rows}
    assert sorted(by_name) == sorted(p.name for p in mixed.rglob("*") if p.is_file())
    assert list(rows[0]) == ["path", "score", "anomalous", "threshold", "overlay", "mask", "error", "model_sha256"]
    assert {r["model_sha256"] for r in rows} == {adcore.artifact.file_sha256(user_path["model"])}
    for name in ("truncated.png", "fake.png", "notes.txt"):
        assert by_name[name]["score"] == "" and "unreadable or truncated" in by_name[name]["error"]
    threshold = float(rows[0]["threshold"])
    ok = [r for r in rows if not r["error"]]
    assert len(ok) == 6
    for r in ok:
        assert r["anomalous"] == ("yes" if float(r["score"]) > threshold else "no")
        native = Image.open(r["path"])
        overlay, mask = Image.open(base / "pred" / r["overlay"]), Image.open(base / "pred" / r["mask"])
        assert overlay.size == mask.size == native.size and overlay.mode == "RGB"
        assert set(np.unique(np.asarray(mask)).tolist()) <= {0, 255}
    assert by_name["colour_small.jpg"]["overlay"] and Image.open(base / "pred" / by_name["colour_small.jpg"]
                                                                 ["overlay"]).size == (200, 150)
    assert by_name["hole_000.png"]["anomalous"] == "yes"
    # an RGB copy of a grey image is read as training read the grey ones: the same score
    assert Image.open(mixed / "hole_000.png").mode == "L"
    assert by_name["rgb_copy.png"]["score"] == by_name["hole_000.png"]["score"]
    # a rerun skips everything done; a torn last line (killed mid-write) is dropped and that image redone
    csv_path = base / "pred" / "predictions.csv"
    text = csv_path.read_text()
    last = text.rstrip("\n").rsplit("\n", 1)[1]
    csv_path.write_text(text[: len(text) - len(last) - 1] + last[:10])
    out = _cli("predict", user_path["model"], mixed, "--out", base / "pred", "--no-progress", cwd=base)
    # scored rows are skipped; error rows (issue 21: a file may have been mid-copy) are retried, not kept twice
    assert f"{sum(not r['error'] for r in rows[:-1])} image(s) already in" in out.stdout
    assert f"{sum(bool(r['error']) for r in rows[:-1])} error row(s) from the last run: retried" in out.stdout
    again = list(csv.DictReader(open(csv_path, newline="")))
    assert len(again) == len(rows) and sorted(r["path"] for r in again) == sorted(r["path"] for r in rows)

def test_predict_says_which_input_matches_nothing(user_path, capsys):
    from adcore.__main__ import main

    assert main(["predict", str(user_path["model"]), str(user_path["base"] / "no_such_folder"), "--out",
                 str(user_path["base"] / "p2")]) == 2
    assert "no_such_folder' is no file or folder and matches no file" in capsys.readouterr().err


def test_user_path_export_agrees_with_torch_on_the_textures_test_split(user_path):
    from adcore.deploy.export import agreement, onnx_session

    onnx_path = user_path["base"] / "model.onnx"
    out = _cli("export", user_path["model"], "--format", "onnx", "--out", onnx_path, cwd=user_path["base"])
    assert "checked with onnxruntime" in out.stdout and onnx_path.exists()
    import onnx

    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    model = adcore.load(user_path["model"])
    threshold = model.artifact["threshold"]["value"]
    assert json.loads(props["adcore"])["threshold"]["value"] == threshold  # a runtime without torch reads it here
    session, graph = onnx_session(onnx_path), ScoringGraph(model, 128).eval()
    test = user_path["test"]
    loader = torch.utils.data.DataLoader(test, batch_size=8, shuffle=False)
    decisions_t, decisions_o, worst = [], [], 0.0
    for batch in loader:
        r = agreement(graph, session, batch["image"])
        worst = max(worst, r["map_rel"])
        decisions_t += (r["score_torch"] > threshold).tolist()
        decisions_o += (r["score_onnx"] > threshold).tolist()
    assert worst <= 1e-4, f"ONNX map differs from torch by {worst:.2e} of its range"
    assert decisions_t == decisions_o and len(decisions_t) == len(test)


def test_train_resumes_after_an_interrupt_and_refuses_other_settings(tmp_path, monkeypatch, capsys):
    import adcore.deploy.train as deploy_train

    rng = np.random.default_rng(0)
    (tmp_path / "good").mkdir()
    for i in range(10):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "good" / f"{i}.png")
    tiny = {"image_size": 32, "embed_dim": 16, "depth": 1, "num_heads": 2, "num_epochs": 2, "batch_size": 4}
    kw = dict(overrides=tiny, holdout=0.3, progress=False)
    deploy_train.train("anovit", tmp_path / "good", tmp_path / "straight.pt", **kw)

    real = deploy_train.score_images

    def interrupted(*a, **k):  # training finished and was checkpointed; the threshold step is cut off
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy_train, "score_images", interrupted)
    with pytest.raises(KeyboardInterrupt):
        deploy_train.train("anovit", tmp_path / "good", tmp_path / "resumed.pt", **kw)
    assert (tmp_path / "resumed.pt.train" / "last.pt").exists() and not (tmp_path / "resumed.pt").exists()
    monkeypatch.setattr(deploy_train, "score_images", real)
    with pytest.raises(ValueError, match="other settings .*model_params.*--fresh"):
        deploy_train.train("anovit", tmp_path / "good", tmp_path / "resumed.pt",
                           **{**kw, "overrides": {**tiny, "embed_dim": 8}})
    capsys.readouterr()
    deploy_train.train("anovit", tmp_path / "good", tmp_path / "resumed.pt", **kw)
    assert "resuming the interrupted training" in capsys.readouterr().out
    a, b = (torch.load(tmp_path / f, weights_only=True) for f in ("straight.pt", "resumed.pt"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["threshold"]["holdout_scores"] == b["threshold"]["holdout_scores"]


@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_predict_reads_images_as_training_did(tmp_path, resample):
    from adcore.data.folder import read_image
    from adcore.deploy.predict import _read

    rgb = np.random.default_rng(1).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "part.png")
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.png")
    for name in ("part.png", "grey.png"):
        native, small = _read(str(tmp_path / name), 32, resample)
        assert native.shape == (50, 70, 3)
        assert np.array_equal(small, read_image(str(tmp_path / name), 32, resample))


def test_the_model_file_records_the_resize_filter(tiny_model_file, tmp_path):
    adcore.save(tiny_model_file[0], tmp_path / "b.pt", image_size=32, resample="bicubic")
    assert adcore.artifact.read(tmp_path / "b.pt")["preprocessing"]["resample"] == "bicubic"
    assert adcore.artifact.read(tiny_model_file[1])["preprocessing"]["resample"] == "bilinear"
