"""Suite-wide set-up that must happen before any test module is imported, and the shared fake MVTec AD fixtures.

The suite runs on pytest-xdist workers (``make test``: ``-n 2``). Session fixtures run once per worker; anything
they write goes under that worker's own ``tmp_path_factory`` folder, except the one file both may share (the fake
weights), which is written once under a lock.
"""
import os
from pathlib import Path

import pytest
import torch
from filelock import FileLock

from adcore.data import make_fake_mvtec, make_fake_weights

# Triton reads TRITON_INTERPRET when a kernel is *defined*, i.e. when `kernels` is first imported — possibly by a model
# test collected before the kernel tests. Without a GPU every Triton path in the suite runs on the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two cores in CI: more threads than cores only adds contention, and each xdist worker gets its share of them.
torch.set_num_threads(max(1, min(2, torch.get_num_threads()) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", 1))))

# Rough seconds each slow module takes in `make test` on 2 cores (its tests' --durations summed, 2026-12-04); only
# their order matters. `make test` hands whole modules to the xdist workers in collection order (--dist loadscope
# --no-loadscope-reorder), so collecting the slowest first starts them at once and lets the short ones fill the end.
MODULE_SECONDS = {
    "test_dask_runner.py": 398, "test_user_path.py": 301, "test_deploy_openvino.py": 156, "test_deploy.py": 140,
    "test_runner.py": 123, "test_notebooks_vit.py": 112, "test_book.py": 88, "test_gpu_check_script.py": 80,
    "test_notebooks_rd.py": 71, "test_paper_shapes_rd.py": 68, "test_paper_shapes_vit.py": 67,
    "test_deploy_hostile.py": 51, "test_viewer.py": 38, "test_lab_browser.py": 38, "test_textures_threshold.py": 21,
}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.name, 0))  # stable: each module's tests stay in order


#: The categories of ``fake_mvtec_tree``: objects and a texture, so that both MVTec AD means have a row.
FAKE_CATEGORIES = ("bottle", "cable", "carpet")  # two objects and a texture; the docs print bottle and cable


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
def fake_mvtec_factory(tmp_path_factory):
    """``tree(categories, **make_fake_mvtec_kwargs) -> root``: make_fake_mvtec, written once per session and worker
    for each distinct set of arguments. The trees are shared: a test that changes files must write its own."""
    made = {}

    def tree(categories=FAKE_CATEGORIES, **kwargs) -> Path:
        key = (tuple([categories] if isinstance(categories, str) else categories), tuple(sorted(kwargs.items())))
        if key not in made:
            made[key] = make_fake_mvtec(tmp_path_factory.mktemp("fake_mvtec"), key[0], **kwargs)
        return made[key]

    return tree


@pytest.fixture(scope="session")
def fake_mvtec_tree(fake_mvtec_factory) -> Path:
    """A fake MVTec AD root with ``FAKE_CATEGORIES`` at 64 px: 8 train, 3 good and 3 defective test images each."""
    return fake_mvtec_factory(FAKE_CATEGORIES, image_size=64, n_train=8, n_test=3)


@pytest.fixture(scope="session")
def fake_wrn_weights(tmp_path_factory) -> Path:
    """A randomly initialised torchvision wide_resnet50_2 state dict (276 MB, about 3 s to write), for
    ``weights_path=``. Under xdist the workers share one file in the run's temporary folder."""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # <tmp>/pytest-N, above each worker's popen-gwK
    path = shared / "wide_resnet50_2-fake.pth"
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            make_fake_weights(path)
    return path
