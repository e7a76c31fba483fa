"""Issue 19 §4 and the parts of §1 that live in the training loop: defaults that respect a GPU, each with its slow twin.

- DataLoader workers change nothing on the CPU (bit for bit), AAND's in-step pseudo-anomalies included;
- lean checkpoints leave the frozen backbone out, check it on resume, and a resumed run equals an uninterrupted one;
- ``fit_seconds`` adds up over resumes; ``amp`` is recorded and really runs in bf16;
- the decoded cache is on where memory allows and reads each file once per run;
- a dataset whose size was not asked for is served at the model's size, in ``fit`` and in ``evaluate``;
- DMAD's cosine period and AAND's milestones follow an epoch override unless set in epochs;
- test curves are off unless asked for; every paper.yaml says ``amp: false`` and (where the notebook measures
  curves) ``test_curve_every: 0``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import adcore
from adcore import fit, load_dataset
from adcore.data import folder
from adcore.runs.experiment import resolve_image_size, run_experiment
from adcore.runs.params import parse_parameters
from adcore.training import CHECKPOINT_NAME, EpochShuffle, _loader
from adcore.utils import seed_everything

ROOT = Path(__file__).resolve().parents[1]
NATIVE = 48  # the fake tree's image side: neither the models' 128 nor a size any recipe asks for

# Tiny AAND: EfficientNet-Lite0 (offline weights), narrow student; Stage I draws pseudo-anomalies from the global RNG
# inside training_step, so these tests also cover "augmentations drawn while training".
TINY_AAND = dict(num_items=4, bottleneck_dim=32, ocbe_blocks=1, decoder_blocks=1, foreground="auto")


def _fake_mvtec(root: Path, category: str = "cable", n_train: int = 6) -> Path:
    """<root>/<category>/{train/good, test/good, test/cut, ground_truth/cut} at NATIVE px, MVTec AD's layout.

    To be replaced by ``adcore.data.make_fake_mvtec`` when it lands (issue 19 §2).
    """
    rng = np.random.default_rng(0)
    cat = root / category
    for split, defect, n in [("train", "good", n_train), ("test", "good", 2), ("test", "cut", 2)]:
        (cat / split / defect).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(40, 200, (NATIVE, NATIVE, 3)).astype(np.uint8)
            if defect == "cut":
                pixels[10:20, 10:20] = 255
                (cat / "ground_truth" / defect).mkdir(parents=True, exist_ok=True)
                mask = np.zeros((NATIVE, NATIVE), np.uint8)
                mask[10:20, 10:20] = 255
                Image.fromarray(mask).save(cat / "ground_truth" / defect / f"{i:03d}_mask.png")
            Image.fromarray(pixels).save(cat / split / defect / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _fake_mvtec(tmp_path_factory.mktemp("mvtec"))


def _aand(**kw):
    seed_everything(0)
    return adcore.create_model("aand", **{**TINY_AAND, **kw})


def _train_aand(tree, **fit_kw):
    model = _aand()
    data = load_dataset("mvtec", "cable", "train", data_root=tree, image_size=32)
    history = fit(model, data, num_epochs={"amplify": 1, "distill": 2}, lr=5e-3, batch_size=2, seed=1,
                  progress=False, **fit_kw)
    return model, history


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- workers


def test_epoch_shuffle_gives_the_order_training_always_used():
    for seed in (0, 7, 2**61 + 5):
        old = [b.tolist() for b in _loader(list(range(11)), 3, shuffle=True, seed=seed)]
        order = EpochShuffle(11)
        order.set_seed(seed)
        new = [b.tolist() for b in torch.utils.data.DataLoader(list(range(11)), batch_size=3, sampler=order)]
        assert new == old


def test_workers_change_nothing_on_cpu(tree):
    plain, plain_history = _train_aand(tree, num_workers=0)
    workers, workers_history = _train_aand(tree, num_workers=2)
    assert workers.fit_timing["num_workers"] == 2 and plain.fit_timing["num_workers"] == 0
    assert [h["loss"] for h in workers_history] == [h["loss"] for h in plain_history]
    assert _same_weights(plain, workers)


def test_num_workers_default_and_bad_values(tree):
    from adcore.training import default_num_workers

    assert default_num_workers("cpu") == 0
    model, _ = _train_aand(tree)
    assert model.fit_timing["num_workers"] == 0 and model.fit_timing["pin_memory"] is False
    with pytest.raises(ValueError, match="num_workers"):
        _train_aand(tree, num_workers=-1)


# ---------------------------------------------------------------- lean checkpoints and resume


class Interrupt(Exception):
    pass


def test_lean_checkpoint_resumes_bit_for_bit(tree, tmp_path):
    reference, reference_history = _train_aand(tree)
    # interrupted in the first step of the second Stage-II epoch: after 1 + 1 epochs, a checkpoint mid stage
    model = _aand()
    step, calls = model.training_step, []

    def interrupted(images, stage):
        calls.append(stage)
        if calls.count("distill") == 4:  # 3 batches an epoch (6 images, batch 2): the first of epoch 2
            raise Interrupt
        return step(images, stage)

    model.training_step = interrupted
    data = load_dataset("mvtec", "cable", "train", data_root=tree, image_size=32)
    kw = dict(num_epochs={"amplify": 1, "distill": 2}, lr=5e-3, batch_size=2, seed=1, progress=False,
              checkpoint_dir=tmp_path / "ckpt")
    with pytest.raises(Interrupt):
        fit(model, data, **kw)
    state = torch.load(tmp_path / "ckpt" / CHECKPOINT_NAME, weights_only=True)
    assert (state["stage_index"], state["next_epoch"]) == (1, 1)
    assert not [k for k in state["model"] if k.startswith("encoder.")], "the frozen backbone was stored"
    frozen = state["frozen"]["encoder"]
    assert frozen["name"] == "efficientnet_lite0" and len(frozen["sha256"]) == 64
    assert state["elapsed_seconds"] > 0 and state["sessions"] == 1

    resumed = _aand()
    history = fit(resumed, data, resume=True, **kw)
    assert [h["loss"] for h in history] == [h["loss"] for h in reference_history]
    assert _same_weights(reference, resumed)
    # fit_seconds adds the interrupted session's (from the checkpoint) to this one's
    assert resumed.fit_timing["sessions"] == 2 and resumed.fit_timing["seconds"] > state["elapsed_seconds"]

    # another backbone's weights: resume refuses, naming the backbone
    other = _aand()
    with torch.no_grad():
        next(other.encoder.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match="frozen backbone 'encoder' = efficientnet_lite0"):
        fit(other, data, resume=True, **kw)


def test_full_checkpoint_is_the_slow_twin(tree, tmp_path):
    sizes = {}
    for lean in (True, False):
        model, _ = _train_aand(tree, checkpoint_dir=tmp_path / str(lean), lean_checkpoint=lean)
        path = tmp_path / str(lean) / CHECKPOINT_NAME
        state = torch.load(path, weights_only=True)
        assert any(k.startswith("encoder.") for k in state["model"]) is not lean
        sizes[lean] = path.stat().st_size
        resumed = _aand()  # a finished run resumes to the same weights either way
        fit(resumed, load_dataset("mvtec", "cable", "train", data_root=tree, image_size=32),
            num_epochs={"amplify": 1, "distill": 2}, lr=5e-3, batch_size=2, seed=1, progress=False,
            checkpoint_dir=tmp_path / str(lean), resume=True)
        assert _same_weights(model, resumed)
    assert sizes[True] < sizes[False]


# ---------------------------------------------------------------- mixed precision


def test_amp_trains_in_bf16_and_is_recorded(tree, tmp_path):
    _, fp32 = _train_aand(tree, amp=False)
    _, default = _train_aand(tree)
    assert [h["loss"] for h in default] == [h["loss"] for h in fp32]  # off by default
    model = _aand()
    seen = []
    encode = model.encode
    model.encode = lambda images: [seen.append(f.dtype) or f for f in encode(images)]
    data = load_dataset("mvtec", "cable", "train", data_root=tree, image_size=32)
    history = fit(model, data, num_epochs={"amplify": 1, "distill": 1}, lr=5e-3, batch_size=2, seed=1,
                  progress=False, amp=True)
    assert torch.bfloat16 in seen and all(np.isfinite(h["loss"]) for h in history)
    assert [h["loss"] for h in history] != [h["loss"] for h in fp32[:len(history)]]
    with pytest.raises(ValueError, match="amp"):
        fit(model, data, num_epochs={"amplify": 1, "distill": 1}, progress=False, amp="yes")

    result = run_experiment("aand", model_params=TINY_AAND, dataset="mvtec", data_root=str(tree),
                            categories=["cable"], image_size=32, num_epochs={"amplify": 1, "distill": 1},
                            batch_size=2, amp=True, results_dir=None, checkpoint_root=None, progress=False,
                            keep_arrays=False, keep_models=False).results[0]
    assert result["params"]["amp"] is True and result["runtime"]["amp"] is True


# ---------------------------------------------------------------- decoded cache


def test_cache_default_follows_the_memory_available(tree, monkeypatch):
    import psutil

    class Memory:
        available = 10**6  # 1 MB: the 6-image split at 48 px (55 KB) fits in a quarter; at 512 px (6.3 MB) it does not

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Memory())
    assert load_dataset("mvtec", "cable", "train", data_root=tree).cache_in_memory
    assert not load_dataset("mvtec", "cable", "train", data_root=tree, image_size=512).cache_in_memory
    assert not load_dataset("mvtec", "cable", "train", data_root=tree, cache_in_memory=False).cache_in_memory


def test_each_image_is_decoded_once_per_run(tree, monkeypatch):
    reads = []
    read_image = folder.read_image
    monkeypatch.setattr(folder, "read_image", lambda path, *a: reads.append(path) or read_image(path, *a))
    run_experiment("aand", model_params=TINY_AAND, dataset="mvtec", data_root=str(tree), categories=["cable"],
                   image_size=32, num_epochs={"amplify": 1, "distill": 2}, batch_size=2, results_dir=None,
                   checkpoint_root=None, progress=False, test_curve_every=1, keep_arrays=False)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == 6 + 4  # train + test, each once
    reads.clear()
    run_experiment("aand", model_params=TINY_AAND, dataset="mvtec", data_root=str(tree), categories=["cable"],
                   image_size=32, num_epochs={"amplify": 1, "distill": 2}, batch_size=2, results_dir=None,
                   checkpoint_root=None, progress=False, cache_in_memory=False, keep_arrays=False)
    assert len(reads) > 2 * (6 + 4)  # the slow twin reads every file on every pass


# ---------------------------------------------------------------- one image size: the model's


def test_unasked_size_is_the_models_in_fit_and_evaluate(tree):
    train = load_dataset("mvtec", "cable", "train", data_root=tree)
    assert train.image_size == NATIVE and not train.size_given
    # a ViT built for 128 px trains on the 48-px folder instead of failing on the shape
    seed_everything(0)
    vit = adcore.create_model("anovit")
    fit(vit, train, num_epochs=1, batch_size=3, progress=False)
    assert vit.trained_image_size == 128
    result = adcore.evaluate(vit, load_dataset("mvtec", "cable", "test", data_root=tree), write=False)
    assert result["image_size"] == 128 and result["resolution"] == "128x128"
    # a convolutional model trains at its recipe's size, not the folder's
    dmad = adcore.create_model("dmad", num_codes=8, offset_width=4, ocbe_width=8)
    fit(dmad, train, num_epochs=1, batch_size=3, progress=False)
    assert dmad.trained_image_size == adcore.get_recipe("dmad").image_size == 128
    # a size asked for is kept
    asked = load_dataset("mvtec", "cable", "train", data_root=tree, image_size=32)
    fit(dmad, asked, num_epochs=1, batch_size=3, progress=False)
    assert dmad.trained_image_size == 32


def test_run_experiment_size_is_the_models_and_recorded(tree):
    assert resolve_image_size("dmad") == 128 and resolve_image_size("dmad", 64) == 64
    assert resolve_image_size("anovit", None, {"image_size": 96}) == 96
    with pytest.raises(ValueError, match="image_size=64 but model_params builds anovit for image_size=128"):
        resolve_image_size("anovit", 64, {"image_size": 128})
    with pytest.raises(ValueError, match="image_size"):
        resolve_image_size("dmad", 0)
    exp = run_experiment("anovit", model_params=dict(patch_size=16, embed_dim=32, depth=1, num_heads=2,
                                                      decoder_width=16),
                         dataset="mvtec", data_root=str(tree), categories=["cable"], num_epochs=1, batch_size=3,
                         results_dir=None, checkpoint_root=None, progress=False, keep_arrays=False)
    r = exp.results[0]
    assert r["image_size"] == r["params"]["image_size"] == r["runtime"]["image_size"] == 128
    assert r["params"]["model_params"]["image_size"] == 128 and exp.models["cable"].image_size == 128
    assert "test_curve" not in r and r["runtime"]["test_curve_every"] is None  # curves are opt-in
    assert r["fit_seconds"] > 0 and r["fit_timing"]["sessions"] == 1 and r["fit_timing"]["steps"] == 2


def test_deterministic_is_a_run_setting_applied_on_cuda(tree, monkeypatch):
    """issue 20: a CUDA run sets deterministic mode before it trains (the fused attention's dQ then avoids atomics);
    the results record it. The device is faked for run_experiment alone; fit still runs on the CPU."""
    import adcore.runs.experiment as experiment

    calls = []
    monkeypatch.setattr(experiment, "set_deterministic", calls.append)
    monkeypatch.setattr(experiment, "resolve_device", lambda device: torch.device("cuda"))
    kw = dict(dataset="mvtec", data_root=str(tree), categories=["cable"], image_size=32, results_dir=None,
              checkpoint_root=None, progress=False, keep_arrays=False, keep_models=False)
    r = run_experiment("center_prior", **kw).results[0]
    assert calls == [True] and r["runtime"]["deterministic"] is True
    assert run_experiment("center_prior", deterministic=False, **kw).results[0]["runtime"]["deterministic"] is False
    assert calls == [True, False]
    with pytest.raises(ValueError, match="deterministic must be True or False"):
        run_experiment("center_prior", deterministic="yes", **kw)


# ---------------------------------------------------------------- run-time decisions and schedules


def test_results_record_what_training_decided(tree):
    r = run_experiment("aand", model_params={**TINY_AAND, "milestones_distill": (0.5,)}, dataset="mvtec",
                       data_root=str(tree), categories=["cable"], image_size=32,
                       num_epochs={"amplify": 1, "distill": 4}, batch_size=2, results_dir=None, checkpoint_root=None,
                       progress=False, keep_arrays=False).results[0]
    # foreground "auto" on MVTec's cable: the centred disk, with the images' native side
    assert r["decided"]["foreground"] == {"mode": "disk", "threshold": 0.0, "native_side": NATIVE}
    assert r["decided"]["milestones"] == {"amplify": None, "distill": [2]}


def test_schedules_follow_an_epoch_override():
    paper = adcore.get_recipe("dmad", "paper").model_params
    dmad = adcore.create_model("dmad", num_codes=8, offset_width=4, cosine_epochs=paper["cosine_epochs"])
    for epochs in (400, 50):
        dmad.planned_epochs = {"main": epochs}
        assert dmad.cosine_period() == epochs
        _, scheduler = dmad.configure_optimizers("main", 0.005)
        assert scheduler.T_max == epochs
    explicit = adcore.create_model("dmad", num_codes=8, offset_width=4, cosine_epochs=400)
    explicit.planned_epochs = {"main": 50}
    assert explicit.cosine_period() == 400  # an int is set explicitly and wins
    with pytest.raises(ValueError, match="cosine_epochs"):
        adcore.create_model("dmad", cosine_epochs=2.5)

    recipe = adcore.get_recipe("aand", "paper").model_params
    aand = adcore.create_model("aand", **TINY_AAND, milestones_amplify=recipe["milestones_amplify"],
                               milestones_distill=recipe["milestones_distill"])
    aand.planned_epochs = {"amplify": 100, "distill": 120}
    assert aand.stage_milestones("amplify") == [80, 90] and aand.stage_milestones("distill") == [96, 108]
    aand.planned_epochs = {"amplify": 50, "distill": 50}
    assert aand.stage_milestones("amplify") == [40, 45]
    _, scheduler = aand.configure_optimizers("distill", 0.005)
    assert sorted(scheduler.milestones) == [40, 45]
    fixed = adcore.create_model("aand", **TINY_AAND, milestones_distill=(96, 108))
    fixed.planned_epochs = {"amplify": 50, "distill": 50}
    assert fixed.stage_milestones("distill") == [96, 108]
    for bad in ((0.9, 0.8), (80, 0.9), (1.5,), ()):
        with pytest.raises(ValueError, match="milestones_distill"):
            adcore.create_model("aand", **TINY_AAND, milestones_distill=bad)


def test_fit_tells_the_model_its_epochs(tree):
    model, _ = _train_aand(tree)
    assert model.planned_epochs == {"amplify": 1, "distill": 2}


# ---------------------------------------------------------------- notebooks and paper configs


@pytest.mark.parametrize("notebook", ["vt_adl", "advit", "anovit", "dmad", "aand"])
def test_paper_configs_say_fp32_and_no_test_curves(notebook):
    defaults = parse_parameters(ROOT / "notebooks" / f"{notebook}.ipynb")
    paper = yaml.safe_load((ROOT / "notebooks" / "params" / notebook / "paper.yaml").read_text())
    assert defaults["amp"] is False and paper["amp"] is False
    assert defaults["deterministic"] is True and "deterministic" not in paper  # the book's runs: repeatable on a GPU
    assert defaults["num_workers"] is None and defaults["cache_in_memory"] is None
    assert defaults["image_size"] is None and isinstance(paper["image_size"], int)
    if "test_curve_every" in defaults:  # the notebooks whose curves the shortcuts chapter reads
        assert defaults["test_curve_every"] == 1 and paper["test_curve_every"] == 0
