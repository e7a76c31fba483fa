"""border_max_fraction: the share of good test images whose map peaks within 8 px of the border, in every result."""
import numpy as np
import pytest
import torch

from adcore import evaluate
from adcore.evaluation import BORDER_MARGIN, border_max_fraction
from adcore.types import AnomalyModel, AnomalyOutput

SIZE = 32


def _peaked(peaks) -> np.ndarray:
    """(N, S, S) zero maps with a single 1 at each (row, col)."""
    maps = np.zeros((len(peaks), SIZE, SIZE), np.float32)
    for i, (r, c) in enumerate(peaks):
        maps[i, r, c] = 1.0
    return maps


def test_counts_good_images_whose_peak_is_in_the_border_band():
    assert BORDER_MARGIN == 8
    # Good images: in the band (rows/cols 0-7 and 24-31) or just inside it; then one anomalous image in a corner.
    peaks = [(0, 15), (16, 16), (7, 16), (8, 16), (16, 24), (16, 23), (0, 0)]
    labels = np.array([0, 0, 0, 0, 0, 0, 1])
    assert border_max_fraction(_peaked(peaks), labels) == pytest.approx(3 / 6)
    # The anomalous image is not a good image: counting it would give 4/7.
    assert border_max_fraction(_peaked(peaks), np.zeros(7, int)) == pytest.approx(4 / 7)
    assert border_max_fraction(_peaked(peaks), labels, margin=1) == pytest.approx(1 / 6)


def test_no_good_image_gives_none_and_bad_shapes_are_errors():
    assert border_max_fraction(_peaked([(0, 0)]), np.array([1])) is None
    with pytest.raises(ValueError, match="labels"):
        border_max_fraction(_peaked([(0, 0), (5, 5)]), np.array([0]))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        border_max_fraction(np.zeros((SIZE, SIZE)), np.array([0]))


class _Peaks(torch.utils.data.Dataset):
    """Four 32-px images; the first two good. The image's red channel carries where the model's map will peak."""

    name, category, image_size, has_masks = "peaks", "toy", SIZE, True
    peaks = [(1, 1), (16, 16), (16, 16), (30, 5)]

    def __len__(self):
        return len(self.peaks)

    def __getitem__(self, i):
        image = torch.zeros(3, SIZE, SIZE)
        image[0, self.peaks[i][0], self.peaks[i][1]] = 1.0
        mask = torch.zeros(SIZE, SIZE, dtype=torch.uint8)
        if i >= 2:
            mask[12:20, 12:20] = 1
        return {"image": image, "mask": mask, "label": int(i >= 2), "path": f"peaks/{i}.png", "defect": "x"}


class _RedChannel(AnomalyModel):
    def predict(self, images):
        amap = images[:, 0]
        return AnomalyOutput(amap.flatten(1).amax(1), amap)


def test_every_evaluate_result_reports_it_on_the_smoothed_maps():
    # Good image 0 peaks at (1, 1): smoothing (sigma 4, reflecting edges) keeps its maximum in the band; good image 1
    # peaks in the centre.
    result = evaluate(_RedChannel(), _Peaks(), write=False)
    assert result["border_max_fraction"] == pytest.approx(0.5)
