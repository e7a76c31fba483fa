"""The shared machinery: registry, fit (checkpoints, resume, divergence), evaluate (results files), parameters."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from adcore import evaluate, fit
from adcore.runs.params import ParameterError, check_parameters, validate_parameters
from adcore.recipes import Recipe
from adcore.registry import create_model, register_model
from adcore.training import NonFiniteLossError
from adcore.types import AnomalyModel, AnomalyOutput
from adcore.utils import atomic_write_bytes, seed_everything


class ToySet(torch.utils.data.Dataset):
    """8×8 images; test images with label 1 carry a bright square that the mask marks."""

    name, category, image_size, has_masks = "toy", "squares", 8, True

    def __init__(self, n=12, split="train", seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, 8, 8, generator=g) * 0.5
        self.masks = torch.zeros(n, 8, 8, dtype=torch.uint8)
        self.labels = np.zeros(n, dtype=int)
        if split == "test":
            for i in range(n // 2):
                self.images[i, :, 2:5, 2:5] = 1.0
                self.masks[i, 2:5, 2:5] = 1
                self.labels[i] = 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i], "label": int(self.labels[i]), "path": f"toy/{i}.png",
                "defect": "square" if self.labels[i] else "good"}


class ToyAE(AnomalyModel):
    """A per-pixel linear autoencoder with input noise, so training consumes the global RNG every step."""

    stages = ("first", "second")
    recipes = {"default": Recipe(num_epochs={"first": 2, "second": 1}, lr=0.05, batch_size=4, image_size=8,
                                 source="a toy for the loop's own tests")}

    def __init__(self, fail_at_step=None, interrupt_at_step=None):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh(), nn.Conv2d(4, 3, 1))
        self.fail_at_step, self.interrupt_at_step, self.steps = fail_at_step, interrupt_at_step, 0

    def configure_optimizers(self, stage, lr):
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def training_step(self, images, stage):
        self.steps += 1
        if self.steps == self.interrupt_at_step:
            raise KeyboardInterrupt
        noisy = images + 0.1 * torch.randn_like(images)
        loss = ((self.net(noisy) - images) ** 2).mean()
        if self.steps == self.fail_at_step:
            loss = loss * float("nan")
        return {"loss": loss, "noise_seen": noisy.mean()}

    def predict(self, images):
        amap = ((self.net(images) - images) ** 2).mean(1)
        return AnomalyOutput(amap.flatten(1).max(1).values, amap)


register_model("_toy_ae")(ToyAE)


def _train(tmp_path, **kw):
    seed_everything(0)
    model = ToyAE(**kw)
    return model, dict(num_epochs={"first": 2, "second": 2}, lr=1e-2, batch_size=4, seed=3,
                       checkpoint_dir=tmp_path / "ckpt", progress=False)


# 3 steps an epoch, 2 epochs a stage: before any checkpoint, mid stage 1, first step of stage 2, last step of all.
@pytest.mark.parametrize("interrupt_at", [2, 5, 7, 12])
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, interrupt_at):
    data = ToySet()
    ref, kw = _train(tmp_path / "a")
    ref_history = fit(ref, data, **kw)
    model, kw = _train(tmp_path / "b", interrupt_at_step=interrupt_at)
    with pytest.raises(KeyboardInterrupt):
        fit(model, data, **kw)
    resumed, kw = _train(tmp_path / "b")
    history = fit(resumed, data, resume=True, **kw)
    assert [h["loss"] for h in history] == [h["loss"] for h in ref_history]
    for a, b in zip(ref.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    again, kw = _train(tmp_path / "b")  # resuming a finished run trains nothing and restores the final weights
    assert len(fit(again, data, resume=True, **kw)) == len(ref_history) and again.steps == 0
    assert all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(), again.state_dict().values()))


def test_nan_loss_stops_with_location_and_keeps_last_checkpoint(tmp_path):
    data = ToySet()
    model, kw = _train(tmp_path, fail_at_step=5)  # 3 steps per epoch: step 5 is epoch 2 of stage "first"
    with pytest.raises(NonFiniteLossError, match=r"stage 'first', epoch 2/2, step 2.*last good checkpoint"):
        fit(model, data, **kw)
    state = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)
    assert state["next_epoch"] == 1 and len(state["history"]) == 3
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_fit_rejects_bad_arguments():
    model = ToyAE()
    with pytest.raises(ValueError, match="exactly the model's stages"):
        fit(model, ToySet(), num_epochs={"first": 1}, progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        fit(model, ToySet(), batch_size=0, progress=False)
    with pytest.raises(ValueError, match="resume=True needs a checkpoint_dir"):
        fit(model, ToySet(), resume=True, progress=False)


def test_evaluate_writes_results_without_overwriting(tmp_path):
    model = ToyAE()
    fit(model, ToySet(), num_epochs=1, lr=1e-2, batch_size=4, progress=False)
    test = ToySet(n=10, split="test", seed=1)
    r1 = evaluate(model, test, results_dir=tmp_path, params={"seed": 0})
    r2 = evaluate(model, test, results_dir=tmp_path, params={"seed": 0})
    assert r1["results_file"] != r2["results_file"]
    saved = json.loads(open(r1["results_file"]).read())
    for key in ("image_auroc", "pixel_auroc", "aupro", "model", "dataset", "category", "protocol", "resolution"):
        assert key in saved
    assert saved["resolution"] == "8x8" and saved["model"] == "_toy_ae"
    assert 0.0 <= saved["aupro"] <= 1.0 and saved["image_score"] == "max of smoothed map"
    assert not list(tmp_path.glob(".*partial*"))


def test_evaluate_f1_at_the_training_threshold(tmp_path):
    from adcore import metrics
    from adcore.evaluation import image_scores

    model = ToyAE()
    fit(model, ToySet(), num_epochs=1, lr=1e-2, batch_size=4, progress=False)
    train_scores = image_scores(model, ToySet())
    assert train_scores.shape == (12,)
    test = ToySet(n=10, split="test", seed=1)
    result, arrays = evaluate(model, test, write=False, train_scores=train_scores, return_arrays=True)
    threshold = float(train_scores.max())
    assert result["threshold_train_max"] == threshold and result["n_train_scored"] == 12
    assert result["f1_train_threshold"] == metrics.f1_at_threshold(arrays["labels"], arrays["scores"], threshold)
    good = arrays["scores"][arrays["labels"] == 0]
    assert result["fpr_train_threshold"] == float((good > threshold).mean())
    assert "f1_train_threshold" not in evaluate(model, test, write=False)
    with pytest.raises(ValueError, match="train_scores"):
        evaluate(model, test, write=False, train_scores=[float("nan")])


def test_evaluate_same_seed_same_metrics_on_cpu(tmp_path):
    results = []
    for _ in range(2):
        seed_everything(7)
        model = ToyAE()
        fit(model, ToySet(), num_epochs=1, lr=1e-2, batch_size=4, seed=7, progress=False)
        results.append(evaluate(model, ToySet(n=10, split="test", seed=1), write=False))
    for key in ("image_auroc", "pixel_auroc", "aupro"):
        assert results[0][key] == results[1][key]


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        create_model("nope")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['widht'\]"):
        create_model("_toy_ae", widht=3)
    assert isinstance(create_model("_toy_ae"), ToyAE)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_bytes(path, b"old")

    with pytest.raises(TypeError):
        atomic_write_bytes(path, object())  # not bytes: the write fails before the rename
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_parameters_unknown_and_ill_typed():
    defaults = {"num_epochs": 3, "lr": 1e-3, "dataset": "textures", "categories": None, "smoke": False}
    assert validate_parameters(defaults, {"lr": 1, "categories": ["brick"]})["lr"] == 1
    with pytest.raises(ParameterError, match=r"unknown parameter\(s\) \['epochs'\]"):
        validate_parameters(defaults, {"epochs": 3})
    with pytest.raises(ParameterError, match="num_epochs = 'ten' is a str, expected int"):
        validate_parameters(defaults, {"num_epochs": "ten"})
    with pytest.raises(ParameterError, match="smoke"):
        validate_parameters(defaults, {"smoke": 1})


def test_check_parameters_reads_papermill_injection():
    history = ["import adcore", 'dataset = "textures"  # which data\nnum_epochs = 3  # epochs',
               '# Parameters\nnum_epochs = 1\n', "params = check_parameters(globals())"]
    ns = {"In": history, "dataset": "textures", "num_epochs": 1}
    assert check_parameters(ns) == {"dataset": "textures", "num_epochs": 1}
    ns["In"] = history[:2] + ['# Parameters\nnum_epoch = 1\n', history[-1]]
    with pytest.raises(ParameterError, match="num_epoch"):
        check_parameters(ns)
    ns["In"] = [history[0], history[1], history[3]]  # interactive: no injection
    assert check_parameters({**ns, "num_epochs": 3})["num_epochs"] == 3


def test_resume_from_a_checkpoint_of_another_architecture_says_what_to_do(tmp_path):
    model, kw = _train(tmp_path)
    fit(model, ToySet(), **kw)
    changed, kw = _train(tmp_path)
    changed.net[0] = nn.Conv2d(3, 5, 1)  # the model code changed since the checkpoint was written
    changed.net[2] = nn.Conv2d(5, 3, 1)
    with pytest.raises(ValueError, match=r"does not fit this model .*net\.0\.weight.*resume=False"):
        fit(changed, ToySet(), resume=True, **kw)


def test_fit_without_training_arguments_uses_the_default_recipe():
    # ToyAE's recipe: 2 + 1 epochs of 3 steps (12 images, batch 4), lr 0.05 halved each epoch by its scheduler.
    seed_everything(0)
    history = fit(ToyAE(), ToySet(), progress=False)
    assert [(h["stage"], h["epoch"]) for h in history[::3]] == [("first", 0), ("first", 1), ("second", 0)]
    seed_everything(0)
    explicit = fit(ToyAE(), ToySet(), num_epochs={"first": 2, "second": 1}, lr=0.05, batch_size=4, progress=False)
    assert [h["loss"] for h in history] == [h["loss"] for h in explicit]
    # An argument given explicitly wins over the recipe.
    assert len(fit(ToyAE(), ToySet(), num_epochs=1, progress=False)) == 6


def test_fit_names_what_is_missing_when_a_model_has_no_recipe():
    class NoRecipe(ToyAE):
        recipes = {}

    with pytest.raises(ValueError, match="declares no default recipe; pass lr, batch_size"):
        fit(NoRecipe(), ToySet(), num_epochs=1, progress=False)


def test_test_curve_is_measured_without_changing_training(tmp_path):
    from adcore import run_experiment

    kw = dict(categories=["brick"], image_size=32, num_epochs={"first": 1, "second": 3}, lr=1e-2, batch_size=16,
              results_dir=None, progress=False, keep_arrays=False)
    plain = run_experiment("_toy_ae", checkpoint_root=None, **kw)
    with_curve = run_experiment("_toy_ae", checkpoint_root=tmp_path, test_curve_every=2, **kw)
    r0, r1 = plain.results[0], with_curve.results[0]
    # scored after epochs 2 of the last stage only; the scored model is the one training goes on with
    assert [(c["stage"], c["epoch"]) for c in r1["test_curve"]] == [("second", 2)]
    assert "test_curve" not in r0
    for key in ("image_auroc", "pixel_auroc", "aupro", "f1_train_threshold"):
        assert r0[key] == r1[key], key
    assert plain.histories["brick"] == with_curve.histories["brick"]
    # a rerun resumes from the finished checkpoint and keeps the curve written beside it
    again = run_experiment("_toy_ae", checkpoint_root=tmp_path, test_curve_every=2, **kw).results[0]
    assert again["test_curve"] == r1["test_curve"]
    # the last epoch's point is the finished model, so it equals the final evaluation
    every = run_experiment("_toy_ae", checkpoint_root=None, test_curve_every=1, **kw).results[0]
    assert [c["epoch"] for c in every["test_curve"]] == [1, 2, 3]
    assert {k: every["test_curve"][-1][k] for k in ("image_auroc", "pixel_auroc", "aupro")} == \
        {k: every[k] for k in ("image_auroc", "pixel_auroc", "aupro")}
    with pytest.raises(ValueError, match="test_curve_every"):
        run_experiment("_toy_ae", checkpoint_root=None, test_curve_every=0.5, **kw)
