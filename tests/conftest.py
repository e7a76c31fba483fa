"""Suite-wide set-up that must happen before any test module is imported."""
import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is *defined*, i.e. when `kernels` is first imported — possibly by a model
# test collected before the kernel tests. Without a GPU every Triton path in the suite runs on the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores in CI: more threads than cores only adds contention.
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def dev():
    """Device the Triton kernels run on in this process: CPU under the interpreter, else CUDA."""
    import kernels.anomaly_attention as aa  # both kernel modules read TRITON_INTERPRET when first imported
    import kernels.mdn_nll as mdn

    if aa.INTERPRET and mdn.INTERPRET:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("no CUDA device and the kernels were decorated without TRITON_INTERPRET=1")


@pytest.fixture(scope="session")
def fake_mvtec_tree(tmp_path_factory):
    """Three MVTec AD categories (two objects, one texture) in MVTec AD's layout, small and quick to read."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("mvtec")
    rng = np.random.default_rng(0)
    for cat in ("bottle", "cable", "carpet"):
        for sub in ("train/good", "test/good", "test/broken", "ground_truth/broken"):
            (root / cat / sub).mkdir(parents=True)
        base = rng.integers(60, 200, (1, 1, 3))
        for i in range(8):
            img = np.clip(base + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / cat / "train/good" / f"{i:03d}.png")
        for i in range(3):
            good = np.clip(base + rng.normal(0, 12, (64, 64, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(good).save(root / cat / "test/good" / f"{i:03d}.png")
            bad, mask = good.copy(), np.zeros((64, 64), np.uint8)
            bad[16 + 4 * i:36 + 4 * i, 20:40] = 255 - bad[16 + 4 * i:36 + 4 * i, 20:40]
            mask[16 + 4 * i:36 + 4 * i, 20:40] = 255
            Image.fromarray(bad).save(root / cat / "test/broken" / f"{i:03d}.png")
            Image.fromarray(mask).save(root / cat / "ground_truth/broken" / f"{i:03d}_mask.png")
    return root


@pytest.fixture(scope="session")
def fake_wrn_weights(tmp_path_factory):
    """A randomly initialised WideResNet-50-2 in torchvision's naming: the paper configs' weights, offline."""
    import torchvision

    path = tmp_path_factory.mktemp("weights") / "wide_resnet50_2-random.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.wide_resnet50_2().state_dict(), path)
    return path
