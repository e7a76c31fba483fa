"""adcore.validation: the test-free epoch choice (synthetic anomalies in held-out training images) and fit's hook."""
from __future__ import annotations

import pytest
import torch

import adcore
from adcore.validation import SyntheticValidationSet, choose_epochs, epoch_curve, load_curve, main, split_train

S = 32
TINY_ANOVIT = dict(image_size=S, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_width=16)


def _dataset(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": im, "path": f"img{i}.png"} for i, im in enumerate(torch.rand(n, 3, S, S, generator=g))]


def _fit(epoch_end=None):
    adcore.seed_everything(0)
    model = adcore.create_model("anovit", **TINY_ANOVIT)
    adcore.fit(model, _dataset(), num_epochs=3, batch_size=3, seed=1, progress=False, epoch_end=epoch_end)
    return model


def test_epoch_end_sees_every_epoch_and_cannot_change_training():
    seen = []

    def greedy(model, stage, epoch):  # draws from every global RNG, as an evaluation might
        seen.append((stage, epoch, model.training))
        torch.rand(100)
        import random

        import numpy as np
        random.random(), np.random.rand()

    with_hook, without = _fit(greedy), _fit()
    assert [(s, e) for s, e, _ in seen] == [("main", 1), ("main", 2), ("main", 3)]
    for (name, a), b in zip(with_hook.state_dict().items(), without.state_dict().values()):
        assert torch.equal(a, b), name


def test_synthetic_set_pairs_clean_and_pseudo_anomalous_copies():
    held = _dataset(5)
    val = SyntheticValidationSet(held, seed=3)
    assert len(val) == 10
    for i in range(5):
        clean, bad = val[i], val[i + 5]
        assert clean["label"] == 0 and clean["mask"].sum() == 0 and torch.equal(clean["image"], held[i]["image"])
        assert bad["label"] == 1 and bad["mask"].sum() > 0 and bad["defect"] == "pseudo"
        outside = bad["mask"] == 0
        assert torch.equal(bad["image"][:, outside], held[i]["image"][:, outside])  # only the masked pixels change
        assert not torch.equal(bad["image"], held[i]["image"])
    again = SyntheticValidationSet(held, seed=3)
    assert torch.equal(again.images, val.images)  # drawn from its own seed, not from the global state


def test_split_train_is_disjoint_and_checks_holdout():
    data = _dataset(10)
    fitting, held = split_train(data, 3, seed=0)
    assert len(fitting) == 7 and len(held) == 3
    assert not set(fitting.indices) & set(held.indices)
    for bad in (0, 10, -1):
        with pytest.raises(ValueError, match="holdout"):
            split_train(data, bad)


def test_choose_epochs_prefers_fewer_among_ties():
    assert choose_epochs({5: 0.70, 10: 0.75, 20: 0.74}) == 10
    assert choose_epochs({5: 0.7504, 10: 0.7496, 20: 0.70}) == 5  # equal at three decimals
    assert choose_epochs({2: 0.5, 30: 0.9}) == 30
    assert choose_epochs({2: 0.5, 20: 0.6, 30: 0.9}, max_epochs=20) == 20  # 30 epochs exceed the budget
    with pytest.raises(ValueError, match="max_epochs"):
        choose_epochs({5: 0.5}, max_epochs=2)


def test_epoch_curve_on_textures_end_to_end(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text(f"model_params: {TINY_ANOVIT}\nimage_size: {S}\ncategories: [brick]\nbatch_size: 8\n")
    out = tmp_path / "curve.json"
    assert main(["anovit", "--params", str(params), "--epochs", "2", "1", "--holdout", "8", "--max-epochs", "1",
                 "--out", str(out)]) == 0
    curve = load_curve(out)
    assert curve["epochs"] == [1, 2] and set(curve["curves"]) == {"brick"}
    for metrics in curve["curves"]["brick"].values():
        assert 0.0 <= metrics["pixel_auroc"] <= 1.0 and 0.0 <= metrics["image_auroc"] <= 1.0
    assert curve["chosen_epochs"] == 1 and curve["max_epochs"] == 1
    with pytest.raises(ValueError, match="epochs"):
        epoch_curve("anovit", model_params=TINY_ANOVIT, image_size=S, categories=["brick"], epochs=[0])
    with pytest.raises(ValueError, match="single-stage model with a constant learning rate"):
        epoch_curve("aand", image_size=S, categories=["brick"], epochs=[1])
    params.write_text("image_size: 32\nepochs: [1]\n")  # epochs belong on the command line
    with pytest.raises(SystemExit):
        main(["anovit", "--params", str(params), "--out", str(out)])
