"""The centre-prior reference: one fixed centred map for every image, scored under the shared protocol."""
import numpy as np
import pytest
import torch

import adcore


def test_the_map_is_the_same_centred_blob_for_every_image():
    model = adcore.create_model("center_prior", grid=16)
    out = model.predict(torch.rand(3, 3, 32, 32))
    assert out.anomaly_map.shape == (3, 16, 16)
    assert torch.equal(out.anomaly_map[0], out.anomaly_map[2])
    m = out.anomaly_map[0]
    assert m[7:9, 7:9].min() == m.max() and m[0, 0] == m.min()  # peak at the centre, lowest in a corner
    assert torch.equal(m, m.flip(0)) and torch.equal(m, m.T)
    with pytest.raises(ValueError, match="sigma"):
        adcore.create_model("center_prior", sigma=0)


def test_it_scores_chance_on_images_and_its_placement_on_pixels():
    test = adcore.load_dataset("textures", "brick", "test", image_size=64)
    model = adcore.create_model("center_prior")
    adcore.fit(model, adcore.load_dataset("textures", "brick", "train", image_size=64), progress=False)
    result = adcore.evaluate(model, test, write=False)
    assert result["image_auroc"] == 0.5  # every image gets the same score
    # the embedded defects sit near the centre: a blind centred blob is far above chance on pixels
    assert result["pixel_auroc"] > 0.65
    assert np.isfinite(result["aupro"])
