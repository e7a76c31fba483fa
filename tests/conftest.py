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
