"""adcore.validation: the test-free epoch choice (synthetic anomalies in held-out training images) and fit's hook."""
from __future__ import annotations

import pytest
import torch

import adcore
from adcore.validation import (SyntheticValidationSet, choose_epochs, choose_epochs_by_loss, epoch_curve, load_curve,
                               main, mean_relative_loss, split_train)

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


def _loss(values):
    return {e + 1: v for e, v in enumerate(values)}


def test_loss_converged_stops_a_flat_curve_at_its_first_epoch():
    assert choose_epochs_by_loss(_loss([0.5] * 10), max_epochs=8) == 1
    assert choose_epochs_by_loss(_loss([0.5, 0.498, 0.497, 0.499, 0.5, 0.5]), max_epochs=6) == 1  # gains < 1 %


def test_loss_converged_trains_an_improving_curve_to_the_cap():
    falling = _loss([0.9 ** e for e in range(40)])  # 10 % better every epoch
    assert choose_epochs_by_loss(falling, max_epochs=25) == 25
    assert choose_epochs_by_loss(falling) == 40  # no cap: the last measured epoch
    assert choose_epochs_by_loss(falling, max_epochs=1) == 1
    for cap in (0, 41):  # the cap must lie within the measured epochs
        with pytest.raises(ValueError, match="measure up to the cap"):
            choose_epochs_by_loss(falling, max_epochs=cap)


def test_loss_converged_is_not_fooled_by_a_plateau_before_the_loss_falls_again():
    # AnoViT's held-out loss on textures: ~7 % down by epoch 4, flat to epoch 20, then falling again (real shape).
    stuck = _loss([1.0, 0.96, 0.94, 0.934] + [0.93] * 16 + [0.93 * 0.95 ** k for k in range(1, 11)])
    assert choose_epochs_by_loss(stuck, max_epochs=30) == 30
    assert choose_epochs_by_loss(stuck, max_epochs=20) == 4  # within the budget, the plateau is where it stops


def test_loss_converged_sees_through_noise_to_the_plateau():
    # Falls to epoch 6 with one noisy rise at epoch 3, then wobbles by under 1 % around 0.50.
    noisy = _loss([1.0, 0.8, 0.85, 0.6, 0.55, 0.5, 0.502, 0.499, 0.501, 0.5, 0.498, 0.503])
    assert choose_epochs_by_loss(noisy, max_epochs=12) == 6
    assert choose_epochs_by_loss(noisy, max_epochs=12, tol=0.1) == 5  # a 10 % tolerance stops one epoch sooner
    assert choose_epochs_by_loss(noisy, max_epochs=12, tol=0.0) == 11  # no tolerance: the noise's minimum
    with pytest.raises(ValueError, match="tol"):
        choose_epochs_by_loss(noisy, tol=1.0)
    with pytest.raises(ValueError, match="consecutive"):
        choose_epochs_by_loss({1: 1.0, 3: 0.9})


def test_mean_relative_loss_weighs_categories_equally():
    rel = mean_relative_loss({"a": {1: 2.0, 2: 1.0}, "b": {1: 0.01, 2: 0.01}})
    assert rel == {1: 1.0, 2: 0.75}


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
    assert main(["anovit", "--params", str(params), "--epochs", "1", "3", "--holdout", "8", "--max-epochs", "2",
                 "--rule", "loss_converged", "--tol", "0.0", "--out", str(out)]) == 0
    curve = load_curve(out)
    assert curve["rule"] == "loss_converged" and curve["params"]["tol"] == 0.0
    assert sorted(curve["val_loss"]["brick"]) == sorted(curve["mean_rel_loss"]) == [1, 2, 3]  # every epoch
    assert sorted(curve["curves"]["brick"]) == [1, 3] and curve["mean_rel_loss"][1] == 1.0
    assert curve["chosen_epochs"] == choose_epochs_by_loss(curve["mean_rel_loss"], 2, tol=0.0)
    params.write_text("image_size: 32\nepochs: [1]\n")  # epochs belong on the command line
    with pytest.raises(SystemExit):
        main(["anovit", "--params", str(params), "--out", str(out)])


def test_score_variants_reuse_the_trained_model():
    tiny = dict(image_size=S, patch_size=8, embed_dim=32, depth=2, num_heads=2, latent_dim=64, num_components=3,
                decoder_width=16, assoc_weight=0.0)
    variants = {"same": {"assoc_weight": 0.0}, "assoc_position": {"assoc_weight": 1.0, "assoc_norm": "position"}}
    curve = epoch_curve("advit", model_params=tiny, image_size=S, categories=["brick"], epochs=[1], holdout=8,
                        variants=variants, progress=False)
    assert set(curve["variants"]) == set(variants)
    same, weighted = curve["variants"]["same"], curve["variants"]["assoc_position"]
    assert same["curves"] == curve["curves"] and same["mean_image_auroc"] == curve["mean_image_auroc"]
    assert weighted["settings"] == variants["assoc_position"] and set(weighted["curves"]["brick"]) == {1}
    for bad, match in (({"x": {"no_such_attribute": 1}}, "does not have"), ({"x": {}}, "non-empty")):
        with pytest.raises(ValueError, match=match):
            epoch_curve("advit", model_params=tiny, image_size=S, categories=["brick"], epochs=[1], holdout=8,
                        variants=bad, progress=False)
    with pytest.raises(ValueError, match="rule"):
        epoch_curve("advit", model_params=tiny, image_size=S, categories=["brick"], epochs=[1], rule="best")
